# smp64.S - guests for several vCPUs sharing memory, with three entry points.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3 and a TSS whose I/O
#                bitmap allows the ports (kvmpy's setup_long_mode(user=True) does this)
# Shared data  : COUNTER at 0x20000 (u64), ARRIVED at 0x20008 (u64), FLAG at 0x20010 (u64)
#                (the host zeroes them before the run)
# Ports        : 0x11 (result, 32-bit OUT), 0xF4 (exit, 8-bit OUT of 0)
# No stack is used.
#
# Entry 0x10000 "count":  RDI = N, RSI = number of vCPUs running this entry.
#     N times `lock xadd` 1 into COUNTER; then `lock inc` ARRIVED and spin until
#     ARRIVED == RSI (a barrier); then OUT the low 32 bits of COUNTER to 0x11 (every vCPU
#     sees the final total) and OUT 0 to 0xF4.
# Entry 0x10100 "wait":   spin (with `pause`) until FLAG != 0; OUT FLAG's low 32 bits to
#     0x11; OUT 0 to 0xF4.
# Entry 0x10200 "set":    RDI = value; spin RSI times (a delay), store RDI into FLAG; OUT 0
#     to 0xF4.

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
        .equ COUNTER, 0x20000
        .equ ARRIVED, 0x20008
        .equ FLAG, 0x20010
_start:
count:
        mov     ecx, COUNTER
        test    rdi, rdi
        jz      2f
1:      mov     eax, 1
        lock xadd qword ptr [rcx], rax
        dec     rdi
        jnz     1b
2:      lock inc qword ptr [rcx + 8]
3:      cmp     qword ptr [rcx + 8], rsi
        jne     3b
        mov     rax, qword ptr [rcx]
        mov     edx, 0x11
        out     dx, eax
        jmp     done

        .org 0x100
wait:
        mov     ecx, FLAG
1:      pause
        mov     rax, qword ptr [rcx]
        test    rax, rax
        jz      1b
        mov     edx, 0x11
        out     dx, eax
        jmp     done

        .org 0x200
set:
        mov     ecx, FLAG
1:      test    rsi, rsi
        jz      2f
        dec     rsi
        jmp     1b
2:      mov     qword ptr [rcx], rdi
        jmp     done

        .org 0x300
done:
        xor     eax, eax
        mov     edx, 0xf4
        out     dx, al
        jmp     .
