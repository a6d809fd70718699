# mmio_real.S - exercise an MMIO device at guest-physical 0xA0000.
#
# Load address : guest-physical 0x1000 (flat binary, linked at 0x1000)
# Entry point  : CS=0 (base 0), IP=0x1000
# CPU mode     : 16-bit real mode
# Inputs       : DS=ES=SS=0, SP=0x8000 (host-provided); no register inputs
# Ports        : none. MMIO at 0xA0000 (host must NOT map RAM there)
# Behaviour    : DS=0xA000, then in this order (KVM_EXIT_MMIO each):
#                  1. read  4 bytes @ 0xA0000  -> v
#                  2. write 4 bytes @ 0xA0004  <- (v + 1) mod 2^32
#                  3. read  1 byte  @ 0xA0010  -> b
#                  4. write 1 byte  @ 0xA0011  <- b
#                  5. read  2 bytes @ 0xA0020  -> w
#                  6. write 2 bytes @ 0xA0022  <- w
#                then `hlt` (KVM_EXIT_HLT).

        .code16
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        mov     ax, 0xa000
        mov     ds, ax
        mov     eax, dword ptr ds:0x0
        add     eax, 1
        mov     dword ptr ds:0x4, eax
        mov     al, byte ptr ds:0x10
        mov     byte ptr ds:0x11, al
        mov     ax, word ptr ds:0x20
        mov     word ptr ds:0x22, ax
1:      hlt
        jmp     1b
