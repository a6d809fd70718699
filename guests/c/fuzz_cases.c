/*
 * fuzz_cases.c - one function per way a fuzz target can end, for kvmpy.fuzz's tests.
 * Each takes (data, len) in (rdi, rsi), like any fuzz entry.
 */
#include "kvmpy_guest.h"

static inline uint64_t opaque(uint64_t v)
{
    __asm__("" : "+r"(v));
    return v;
}

volatile uint64_t sink;

int returns_len(const uint8_t *data, uint64_t len)
{
    (void)data;
    return (int)len;
}

int null_read(const uint8_t *data, uint64_t len)
{
    (void)data;
    return (int)*(volatile uint64_t *)(uintptr_t)opaque(8 + len);
}

int null_write(const uint8_t *data, uint64_t len)
{
    (void)data;
    *(volatile uint64_t *)(uintptr_t)opaque(0x10 + len) = 1;
    return 0;
}

/* Writes 8 bytes at the address held in the input's first 8 bytes. */
int write_at(const uint8_t *data, uint64_t len)
{
    if (len < 8)
        return -1;
    uint64_t addr = 0;
    for (int i = 7; i >= 0; i--)
        addr = addr << 8 | data[i];
    *(volatile uint64_t *)(uintptr_t)opaque(addr) = 0x4141414141414141ull;
    return 0;
}

/* Writes over its own code. */
int write_code(const uint8_t *data, uint64_t len)
{
    (void)data;
    (void)len;
    *(volatile uint8_t *)(uintptr_t)opaque((uint64_t)(uintptr_t)&write_code) = 0xcc;
    return 0;
}

__attribute__((noinline)) uint64_t recurse(uint64_t n)
{
    volatile uint8_t frame[256];
    frame[0] = (uint8_t)n;
    if (opaque(n) == 0) /* never: n starts at 1 */
        return frame[0];
    return recurse(n + 1) + frame[0];
}

int stack_overflow(const uint8_t *data, uint64_t len)
{
    (void)data;
    return (int)recurse(len | 1);
}

int spin(const uint8_t *data, uint64_t len)
{
    (void)data;
    for (;;)
        sink += len;
}

int invalid_opcode(const uint8_t *data, uint64_t len)
{
    (void)data;
    (void)len;
    __asm__ volatile("ud2");
    return 0;
}

int divide_by_zero(const uint8_t *data, uint64_t len)
{
    (void)data;
    volatile uint64_t one = 1, zero = opaque(len - len);
    return (int)(one / zero);
}

__attribute__((noinline)) void report_bug(uint64_t code)
{
    sink = code;
}

/* Calls report_bug() when the input starts with '!': a crash hook target. */
int calls_report(const uint8_t *data, uint64_t len)
{
    if (len > 0 && data[0] == '!')
        report_bug(len);
    return 0;
}

/* Hangs when the input starts with "HA", crashes (NULL write) on "CR", else returns 0:
 * a target whose hangs and crashes depend on the input (for afl-fuzz runs). */
int hangs_or_crashes(const uint8_t *data, uint64_t len)
{
    if (len >= 2 && data[0] == 'H' && data[1] == 'A')
        for (;;)
            sink += len;
    if (len >= 2 && data[0] == 'C' && data[1] == 'R')
        *(volatile uint64_t *)opaque(0) = len;
    return 0;
}

/* A constant table in the code segment (.rodata): data that coverage must not patch. */
static const uint8_t lookup_table[16] = {
    0x11, 0xcc, 0xee, 0x90, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc3, 0x5a, 0xa5, 0x3c, 0x7e, 0xeb, 0xfe,
};

/* Returns lookup_table[data[0] & 15]. */
int table_lookup(const uint8_t *data, uint64_t len)
{
    return len ? lookup_table[data[0] & 15] : -1;
}

typedef int (*entry_fn)(const uint8_t *, uint64_t);

/* Referenced from main so that --gc-sections keeps every entry. */
static entry_fn const entries[] = {
    returns_len, null_read, null_write, write_at, write_code, stack_overflow,
    spin, invalid_opcode, divide_by_zero, calls_report, hangs_or_crashes, table_lookup,
};

/* main(index, 0) runs entries[index] on an empty input. */
int main(uint64_t index, uint64_t unused)
{
    (void)unused;
    if (index >= sizeof(entries) / sizeof(entries[0]))
        return -1;
    return entries[opaque(index)]((const uint8_t *)0, 0);
}
