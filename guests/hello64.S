# hello64.S - greeting from 64-bit user mode, followed by the LCG.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# Entry point  : RIP=0x10000
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3
#                NOTE: on PVM-backed nested KVM, RFLAGS.IOPL is ignored for
#                CPL3 code; the host must also load TR with a 64-bit TSS whose
#                I/O permission bitmap allows the ports below (e.g. iomap base
#                0x68, 8192 zero bytes + 0xff, TSS limit 0x2068), otherwise
#                the OUT raises #GP -> triple fault (KVM_EXIT_SHUTDOWN).
# Inputs       : RDI = LCG iteration count N (unsigned 64-bit, may be 0)
#                Reads its own string (RIP-relative); no stack, no writes.
# Ports        : 0x3F8 (console, 8-bit OUT), 0x11 (device-out, 32-bit OUT),
#                0xF4 (exit, 8-bit OUT)
# Behaviour    : writes "Hello from 64-bit user mode!\n" (29 bytes) one byte
#                per `out dx, al` to 0x3F8; then exactly like compute64:
#                x_N of the LCG (x0=0, x*6364136223846793005+1442695040888963407)
#                low 32 bits then high 32 bits via `out dx, eax` to 0x11,
#                then `out dx, al` with AL=0 to 0xF4 (RBX = x_N), then `jmp .`.
# Clobbers     : RAX, RBX, RCX, RDX, RSI, R8 (RDI is preserved)

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        cld
        lea     rsi, [rip + msg]
        mov     edx, 0x3f8
1:      lodsb
        test    al, al
        jz      2f
        out     dx, al
        jmp     1b

2:      xor     eax, eax                        # x = 0
        mov     rcx, rdi
        movabs  rsi, 6364136223846793005
        movabs  r8, 1442695040888963407
        test    rcx, rcx
        jz      4f
        .p2align 4
3:      imul    rax, rsi
        add     rax, r8
        dec     rcx
        jnz     3b
4:      mov     rbx, rax
        mov     edx, 0x11
        out     dx, eax                         # low 32 bits
        shr     rax, 32
        out     dx, eax                         # high 32 bits
        mov     edx, 0xf4
        xor     eax, eax
        out     dx, al                          # exit
5:      jmp     5b

msg:    .asciz  "Hello from 64-bit user mode!\n"
