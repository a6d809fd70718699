# counter64.S - N byte-sized port writes, for measuring exit cost.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# Entry point  : RIP=0x10000
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3
#                NOTE: on PVM-backed nested KVM, RFLAGS.IOPL is ignored for
#                CPL3 code; the host must also load TR with a 64-bit TSS whose
#                I/O permission bitmap allows the ports below (e.g. iomap base
#                0x68, 8192 zero bytes + 0xff, TSS limit 0x2068), otherwise
#                the OUT raises #GP -> triple fault (KVM_EXIT_SHUTDOWN).
# Inputs       : RDI = count N (unsigned 64-bit, may be 0)
#                No stack or data memory needed.
# Ports        : 0x11 (device-out, 8-bit OUT), 0xF4 (exit, 8-bit OUT)
# Behaviour    : for i = 0 .. N-1: `out dx, al` to 0x11 with AL = i & 0xff;
#                then `out dx, al` to 0xF4 with AL = 0; then `jmp .`.
#                Total exits: N + 1.
# Clobbers     : RAX, RCX, RDX (RDI is preserved)

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        xor     ecx, ecx                        # i = 0
        mov     edx, 0x11
        test    rdi, rdi
        jz      2f
1:      mov     eax, ecx
        out     dx, al
        inc     rcx
        cmp     rcx, rdi
        jne     1b
2:      mov     edx, 0xf4
        xor     eax, eax
        out     dx, al                          # exit
3:      jmp     3b
