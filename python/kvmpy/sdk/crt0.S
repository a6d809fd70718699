/*
 * crt0.S - entry point of kvmpy C guests (64-bit, CPL3, see kvmpy_guest.h).
 *
 * Entry : RIP = 0x100000 (_start is placed first in .text by guest.ld),
 *         RDI = arg0, RSI = arg1 as set by the host; RSP is ignored.
 * Does  : RSP = __stack_top, RBP = 0, DF = 0, zero [__bss_start, __bss_end),
 *         EAX = main(arg0, arg1), `outl %eax, $0xf4` (exit port), `jmp .`.
 *
 * Also provides weak memcpy/memmove/memset/memcmp, because GCC may emit
 * calls to them even with -ffreestanding (struct copies, loop idioms).
 */

        .code64
        .section .text.start, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        cld
        mov     %rdi, %r12              /* arg0: callee-saved across main */
        mov     %rsi, %r13              /* arg1 */
        mov     $__stack_top, %esp      /* linked below 4 GiB: zero-extends */
        xor     %ebp, %ebp

        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %rdi, %rcx
        xor     %eax, %eax
        rep stosb

        mov     %r12, %rdi
        mov     %r13, %rsi
        call    main                    /* RSP 16-aligned before the call */

        outl    %eax, $0xf4             /* exit.code = low 32 bits */
1:      jmp     1b
        .size   _start, . - _start

/* void *memcpy(void *dst, const void *src, size_t n) */
        .section .text.memcpy, "ax", @progbits
        .weak   memcpy
        .type   memcpy, @function
memcpy:
        mov     %rdi, %rax
        mov     %rdx, %rcx
        rep movsb
        ret
        .size   memcpy, . - memcpy

/* void *memmove(void *dst, const void *src, size_t n) */
        .section .text.memmove, "ax", @progbits
        .weak   memmove
        .type   memmove, @function
memmove:
        mov     %rdi, %rax
        mov     %rdx, %rcx
        mov     %rdi, %r8
        sub     %rsi, %r8               /* dst - src (unsigned) */
        cmp     %rdx, %r8
        jb      2f                      /* dst inside (src, src+n): go down */
        rep movsb
        ret
2:      lea     -1(%rdi,%rdx), %rdi
        lea     -1(%rsi,%rdx), %rsi
        std
        rep movsb
        cld
        ret
        .size   memmove, . - memmove

/* void *memset(void *dst, int c, size_t n) */
        .section .text.memset, "ax", @progbits
        .weak   memset
        .type   memset, @function
memset:
        mov     %rdi, %r8
        mov     %esi, %eax
        mov     %rdx, %rcx
        rep stosb
        mov     %r8, %rax
        ret
        .size   memset, . - memset

/* int memcmp(const void *a, const void *b, size_t n) */
        .section .text.memcmp, "ax", @progbits
        .weak   memcmp
        .type   memcmp, @function
memcmp:
        xor     %eax, %eax
        test    %rdx, %rdx
        jz      3f
        mov     %rdx, %rcx
        repe cmpsb
        movzbl  -1(%rdi), %eax
        movzbl  -1(%rsi), %ecx
        sub     %ecx, %eax
3:      ret
        .size   memcmp, . - memcmp

        .section .note.GNU-stack, "", @progbits
