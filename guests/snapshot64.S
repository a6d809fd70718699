# snapshot64.S - a fuzzing-style target: reads an input, writes pages, exits.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# Entry point  : RIP=0x10000
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3, as after
#                setup_long_mode(user=True) (exceptions=True for mode 2)
# Inputs       : the qword at 0x20000 (INPUT) selects what the guest does:
#                0: writes RSI + i to the first qword of page i of the area at
#                   0x100000, for i = 0 .. RDI-1 (RDI = page count, may be 0),
#                   then `out 0xf4, al` (exit) and `jmp .`
#                1: spins forever (`jmp .`), never exiting
#                2: reads unmapped guest-virtual 0x8000000000: a page fault
#                3: `out 0x10, al` (a handler's port), then the mode-0 path
#                other: the mode-0 path
# Ports        : 0x10 (mode 3), 0xF4 (exit, 8-bit OUT)
# Clobbers     : RAX, RCX, RDX; XMM0 = RSI

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        mov     rax, [0x20000]
        cmp     rax, 1
        je      spin
        cmp     rax, 2
        je      fault
        cmp     rax, 3
        jne     write
        out     0x10, al
write:
        movq    xmm0, rsi
        xor     ecx, ecx
        mov     edx, 0x100000
1:      cmp     rcx, rdi
        jae     2f
        lea     rax, [rsi + rcx]
        mov     [rdx], rax
        add     rdx, 0x1000
        inc     rcx
        jmp     1b
2:      out     0xf4, al
        jmp     .
spin:   jmp     spin
fault:  movabs  rax, 0x8000000000
        mov     rax, [rax]
        jmp     .
