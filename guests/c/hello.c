/*
 * hello.c - console output and a host call.
 *
 * Prints "Hello from C!\n", calls host function 2 with (6, 7), prints
 * "6 * 7 = <result>\n" and returns the result as the exit code.
 */
#include "kvmpy_guest.h"

int main(uint64_t arg0, uint64_t arg1)
{
    (void)arg0;
    (void)arg1;
    kvmpy_puts("Hello from C!\n");
    uint64_t r = kvmpy_hostcall2(2, 6, 7);
    kvmpy_puts("6 * 7 = ");
    kvmpy_print_dec(r);
    kvmpy_putc('\n');
    return (int)r;
}
