# double_real.S - read 32-bit values from a device and write them back doubled.
#
# Load address : guest-physical 0x1000 (flat binary, linked at 0x1000)
# Entry point  : CS=0 (base 0), IP=0x1000
# CPU mode     : 16-bit real mode
# Inputs       : DS=ES=SS=0, SP=0x8000 (host-provided); no register inputs
# Ports        : 0x10 (device-in, 32-bit IN), 0x11 (device-out, 32-bit OUT)
# Behaviour    : loop { v = `in eax, dx` from 0x10 (size 4);
#                       if v == 0: `hlt` (KVM_EXIT_HLT);
#                       `out dx, eax` to 0x11 with (2*v) mod 2^32 (size 4) }

        .code16
        .intel_syntax noprefix
        .text
        .globl _start
_start:
1:      mov     dx, 0x10
        in      eax, dx
        test    eax, eax
        jz      2f
        add     eax, eax
        mov     dx, 0x11
        out     dx, eax
        jmp     1b
2:      hlt
        jmp     2b
