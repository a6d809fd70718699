# fpu64.S - loads a known FPU/SSE state, exits, then records the state it runs with.
#
# Load address : guest-physical 0x10000 (identity mapped, linked at 0x10000)
# Entry point  : RIP=0x10000
# CPU mode     : 64-bit long mode, CPL3 (user), paging on, IOPL=3, as after
#                setup_long_mode(user=True)
# Data         : 0x21000: XMM0..XMM15's values (256 bytes), then at 0x21100 an MXCSR
#                value and at 0x21104 another
# Behaviour    : _start loads XMM0..XMM15 and MXCSR (0x21100) from the data, pushes
#                pi, 1 and log2(e) on the x87 stack, then `out 0xf4, al` (exit).
#                `record` (where that exit leaves RIP, 0x100a8) stores the state
#                it starts with (`fxsave64 [0x30000]`), then changes all of it (every
#                XMM register all ones, MXCSR from 0x21104, the x87 stack emptied and
#                0.0 pushed) and exits with `out 0xf4, al`; run again, it records again.
# Ports        : 0xF4 (exit, 8-bit OUT)
# Clobbers     : RAX, the FPU/SSE state; memory at 0x30000 (512 bytes)

        .code64
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        .irp    i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu  xmm\i, [0x21000 + \i * 16]
        .endr
        ldmxcsr [0x21100]
        fldpi
        fld1
        fldl2e
        out     0xf4, al
record:
        fxsave64 [0x30000]
        .irp    i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        pcmpeqd xmm\i, xmm\i
        .endr
        ldmxcsr [0x21104]
        fninit
        fldz
        out     0xf4, al
        jmp     record
