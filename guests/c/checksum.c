/*
 * checksum.c - Adler-32 of a buffer the host placed in guest memory.
 *
 *   main(addr, len): adler32 of the `len` bytes at guest address `addr`,
 *   printed as "adler32 = 0xXXXXXXXX\n", reported with host call 1
 *   (kvmpy_hostcall1(1, sum)); returns 0.
 */
#include "kvmpy_guest.h"

#define ADLER_MOD  65521u
#define ADLER_NMAX 5552u   /* largest n with 255n(n+1)/2 + (n+1)(MOD-1) < 2^32 */

static uint32_t adler32(const uint8_t *p, uint64_t len)
{
    uint32_t a = 1, b = 0;
    while (len) {
        uint32_t n = len < ADLER_NMAX ? (uint32_t)len : ADLER_NMAX;
        len -= n;
        while (n--) {
            a += *p++;
            b += a;
        }
        a %= ADLER_MOD;
        b %= ADLER_MOD;
    }
    return b << 16 | a;
}

int main(uint64_t addr, uint64_t len)
{
    uint32_t sum = adler32((const uint8_t *)(uintptr_t)addr, len);
    kvmpy_puts("adler32 = 0x");
    kvmpy_print_hex_n(sum, 8);
    kvmpy_putc('\n');
    kvmpy_hostcall1(1, sum);
    return 0;
}
