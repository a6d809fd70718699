/*
 * kvmpy_guest.h - freestanding runtime for C guests of kvmpy.
 *
 * Build a guest with `python -m kvmpy cc guest.c -o guest.elf` (this file,
 * crt0.S and guest.ld are in the directory kvmpy.guest_sdk() returns), run it
 * with `python -m kvmpy run guest.elf` or load it with vm.load_elf().
 *
 * Environment (what the host sets up with cpu.setup_long_mode(user=True)):
 *   64-bit long mode, CPL3, paging on, first 1 GiB identity mapped with 2 MiB
 *   user/writable pages, IOPL=3 and a TSS I/O bitmap allowing every port.
 *   No interrupts.  With setup_long_mode(exceptions=True) (as `kvmpy run`
 *   does) a CPU exception ends run() with an ExceptionExit (reason
 *   "exception": vector, rip, cr2); without it there is no IDT and any
 *   exception triple-faults (reason "shutdown").  Privileged instructions
 *   (hlt, cli, ...) raise #GP at CPL3: end with kvmpy_exit() instead.
 *   Guests are built with -mgeneral-regs-only.
 *
 * Under kvmpy.fuzz (fuzz.Target.from_elf(elf, entry="fn")):
 *   fn(data, len) is called directly for each input, on its own 64 KiB stack
 *   (crt0.S does not run; .bss is zero as loaded) and its return value ends
 *   the run (outcome "ok", code = EAX).  Only the ELF's segments, that stack
 *   and the input are mapped: code read-only (guest.ld puts writable data on
 *   its own page), data not executable, nothing in the first 64 KiB, kvmpy's
 *   tables supervisor-only.  A stray access is a #PF crash outcome.
 *
 * Image (guest.ld, crt0.S):
 *   Loaded and entered at guest-physical/virtual 0x100000 (1 MiB); the flat
 *   build/NAME.bin is copied there verbatim.  _start sets RSP to __stack_top
 *   (64 KiB stack after .bss), zeroes .bss, then calls
 *       int main(uint64_t arg0, uint64_t arg1)
 *   with arg0/arg1 = the RDI/RSI the host set before run().  When main
 *   returns, the low 32 bits of its return value are written to the exit port
 *   (exit.code), and the guest spins on `jmp .` if it is resumed.
 *
 * Ports:
 *   0x3F8  console    8-bit  `outb %al, %dx` per byte   (vm.add_console(0x3F8))
 *   0xF4   exit       32-bit `outl %eax, $0xf4`          (vm.add_exit_port(0xF4))
 *                     run() ends with reason "exit", exit.code = EAX.
 *   0xF5   host call  32-bit `outl %eax, $0xf5`
 *          in : EAX = function number (32-bit),
 *               arguments RDI, RSI, RDX, R10, R8, R9 (Linux syscall order);
 *               unused argument registers hold unspecified values.
 *          out: RAX = 64-bit result written by the host.
 *          RCX and R11 are treated as clobbered (reserved for the host);
 *          every other register is preserved.  The host may read and write
 *          guest memory during the call (the asm has a "memory" clobber).
 */
#ifndef KVMPY_GUEST_H
#define KVMPY_GUEST_H

#include <stdint.h>
#include <stddef.h>

#define KVMPY_CONSOLE_PORT  0x3F8
#define KVMPY_EXIT_PORT     0xF4
#define KVMPY_HOSTCALL_PORT 0xF5

/* The entry point called by crt0.S. */
int main(uint64_t arg0, uint64_t arg1);

/* ---- host calls --------------------------------------------------------- */

/* The "outl %eax, $0xf5" is emitted as a string so that the port number is
 * an 8-bit immediate (no DX needed).  "+a" because EAX carries the function
 * number in and the result out. */
#define KVMPY__HOSTCALL_ASM "outl %%eax, $0xf5"
#define KVMPY__HOSTCALL_CLOBBERS "rcx", "r11", "memory", "cc"

static inline uint64_t kvmpy_hostcall0(uint32_t fn)
{
    uint64_t rax = fn;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     :
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall1(uint32_t fn, uint64_t a0)
{
    uint64_t rax = fn;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall2(uint32_t fn, uint64_t a0, uint64_t a1)
{
    uint64_t rax = fn;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0), "S"(a1)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall3(uint32_t fn, uint64_t a0, uint64_t a1,
                                       uint64_t a2)
{
    uint64_t rax = fn;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0), "S"(a1), "d"(a2)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall4(uint32_t fn, uint64_t a0, uint64_t a1,
                                       uint64_t a2, uint64_t a3)
{
    uint64_t rax = fn;
    register uint64_t r10 __asm__("r10") = a3;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0), "S"(a1), "d"(a2), "r"(r10)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall5(uint32_t fn, uint64_t a0, uint64_t a1,
                                       uint64_t a2, uint64_t a3, uint64_t a4)
{
    uint64_t rax = fn;
    register uint64_t r10 __asm__("r10") = a3;
    register uint64_t r8 __asm__("r8") = a4;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

static inline uint64_t kvmpy_hostcall6(uint32_t fn, uint64_t a0, uint64_t a1,
                                       uint64_t a2, uint64_t a3, uint64_t a4,
                                       uint64_t a5)
{
    uint64_t rax = fn;
    register uint64_t r10 __asm__("r10") = a3;
    register uint64_t r8 __asm__("r8") = a4;
    register uint64_t r9 __asm__("r9") = a5;
    __asm__ volatile(KVMPY__HOSTCALL_ASM
                     : "+a"(rax)
                     : "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8), "r"(r9)
                     : KVMPY__HOSTCALL_CLOBBERS);
    return rax;
}

/* ---- console and exit --------------------------------------------------- */

static inline void kvmpy_outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void kvmpy_outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void kvmpy_putc(char c)
{
    kvmpy_outb(KVMPY_CONSOLE_PORT, (uint8_t)c);
}

static inline void kvmpy_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kvmpy_putc(s[i]);
}

static inline void kvmpy_puts(const char *s)
{
    while (*s)
        kvmpy_putc(*s++);
}

/* Ends run() with reason "exit" and exit.code = code.  If the host runs the
 * vCPU again it spins here forever (never falls through). */
__attribute__((noreturn)) static inline void kvmpy_exit(uint32_t code)
{
    __asm__ volatile("outl %%eax, $0xf4\n\t"
                     "1: jmp 1b"
                     :
                     : "a"(code)
                     : "memory");
    __builtin_unreachable();
}

/* Lowercase hex, exactly `digits` digits (1..16, zero padded, no prefix). */
static inline void kvmpy_print_hex_n(uint64_t v, unsigned digits)
{
    if (digits < 1)
        digits = 1;
    if (digits > 16)
        digits = 16;
    while (digits--)
        kvmpy_putc("0123456789abcdef"[(v >> (digits * 4)) & 0xf]);
}

/* "0x" followed by the value in lowercase hex without leading zeros. */
static inline void kvmpy_print_hex(uint64_t v)
{
    unsigned digits = 1;
    while (digits < 16 && (v >> (digits * 4)) != 0)
        digits++;
    kvmpy_putc('0');
    kvmpy_putc('x');
    kvmpy_print_hex_n(v, digits);
}

/* Unsigned decimal. */
static inline void kvmpy_print_dec(uint64_t v)
{
    char buf[20]; /* 2^64 - 1 has 20 digits */
    unsigned i = sizeof buf;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    kvmpy_write(buf + i, sizeof buf - i);
}

/* Signed decimal. */
static inline void kvmpy_print_sdec(int64_t v)
{
    if (v < 0) {
        kvmpy_putc('-');
        kvmpy_print_dec(-(uint64_t)v);
    } else {
        kvmpy_print_dec((uint64_t)v);
    }
}

#endif /* KVMPY_GUEST_H */
