/*
 * gdb_counter.c - the guest the gdb stub is tested with (built with -g -O0, so gdb has
 * its line table and every variable lives in memory).
 *
 * main calls bump() ROUNDS times; bump adds its argument to the global `counter`.
 * It prints "counter = 55\n" and returns 55 (the exit code).
 */
#include "kvmpy_guest.h"

#define ROUNDS 10

volatile uint64_t counter;

uint64_t bump(uint64_t by)
{
    counter += by;
    return counter;
}

int main(uint64_t arg0, uint64_t arg1)
{
    (void)arg0;
    (void)arg1;
    uint64_t total = 0;
    for (uint64_t i = 1; i <= ROUNDS; i++) {
        total = bump(i);
    }
    kvmpy_puts("counter = ");
    kvmpy_print_dec(total);
    kvmpy_putc('\n');
    return (int)total;
}
