# hello_real.S - print a greeting from 16-bit real mode.
#
# Load address : guest-physical 0x1000 (flat binary, linked at 0x1000)
# Entry point  : CS=0 (base 0), IP=0x1000
# CPU mode     : 16-bit real mode
# Inputs       : DS=ES=SS=0, SP=0x8000 (host-provided); no register inputs
# Ports        : 0x3F8 (console, 8-bit OUT)
# Behaviour    : writes "Hello from a KVM guest!\n" (24 bytes) one byte per
#                `out dx, al` to port 0x3F8, then executes `hlt`
#                (KVM_EXIT_HLT). If resumed it halts again.

        .code16
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        cld
        mov     si, offset msg          # DS:SI -> message (DS=0)
        mov     dx, 0x3f8
1:      lodsb
        test    al, al
        jz      2f
        out     dx, al
        jmp     1b
2:      hlt
        jmp     2b

msg:    .asciz  "Hello from a KVM guest!\n"
