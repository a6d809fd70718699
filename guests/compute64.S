# compute64.S - 64-bit LCG benchmark, runs at CPL3 without touching memory.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# Entry point  : RIP=0x10000
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3
#                NOTE: on PVM-backed nested KVM, RFLAGS.IOPL is ignored for
#                CPL3 code; the host must also load TR with a 64-bit TSS whose
#                I/O permission bitmap allows the ports below (e.g. iomap base
#                0x68, 8192 zero bytes + 0xff, TSS limit 0x2068), otherwise
#                the OUT raises #GP -> triple fault (KVM_EXIT_SHUTDOWN).
# Inputs       : RDI = iteration count N (unsigned 64-bit, may be 0)
#                No stack or data memory needed (no push/call/loads/stores).
# Ports        : 0x11 (device-out, 32-bit OUT, twice), 0xF4 (exit, 8-bit OUT)
# Behaviour    : x0 = 0; x_{i+1} = x_i * 6364136223846793005
#                                 + 1442695040888963407  (mod 2^64), N times.
#                Then: `out dx, eax` to 0x11 with low 32 bits of x_N
#                      (at this exit RAX = x_N, RBX = x_N),
#                      `out dx, eax` to 0x11 with high 32 bits of x_N,
#                      `out dx, al`  to 0xF4 with AL = 0 (RBX = x_N still).
#                Afterwards `jmp .` forever (host stops at the 0xF4 exit).
# Clobbers     : RAX, RBX, RCX, RDX, RSI, R8 (RDI is preserved)

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        xor     eax, eax                        # x = 0
        mov     rcx, rdi                        # counter
        movabs  rsi, 6364136223846793005        # multiplier
        movabs  r8, 1442695040888963407         # increment
        test    rcx, rcx
        jz      2f
        .p2align 4
1:      imul    rax, rsi
        add     rax, r8
        dec     rcx
        jnz     1b
2:      mov     rbx, rax                        # keep x_N in RBX
        mov     edx, 0x11
        out     dx, eax                         # low 32 bits
        shr     rax, 32
        out     dx, eax                         # high 32 bits
        mov     edx, 0xf4
        xor     eax, eax
        out     dx, al                          # exit
3:      jmp     3b
