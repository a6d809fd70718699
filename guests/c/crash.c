/*
 * crash.c - raise a CPU exception on purpose (no IDT -> triple fault, so
 * run() returns reason "shutdown").
 *
 *   main(kind): 0 -> #DE divide by zero
 *               1 -> #UD (ud2)
 *               2 -> #PF write to 0x40000000 (beyond the 1 GiB identity map)
 *               3 -> #GP load from non-canonical 0x8000000000000000
 *               otherwise returns 7 (exit code 7).
 */
#include "kvmpy_guest.h"

/* Hides a constant from the optimizer (no folding, no bounds warnings). */
static inline uint64_t opaque(uint64_t v)
{
    __asm__("" : "+r"(v));
    return v;
}

int main(uint64_t kind, uint64_t arg1)
{
    (void)arg1;
    switch (kind) {
    case 0: {
        /* Both operands volatile: with a constant dividend GCC turns
         * 1 / x into (x == 1) and no DIV is emitted. */
        volatile uint64_t one = 1, zero = 0;
        volatile uint64_t q = one / zero;
        return (int)q;
    }
    case 1:
        __asm__ volatile("ud2");
        break;
    case 2:
        *(volatile uint64_t *)(uintptr_t)opaque(0x40000000) = 1;
        break;
    case 3:
        return (int)*(volatile uint64_t *)(uintptr_t)opaque(0x8000000000000000ull);
    default:
        break;
    }
    return 7;
}
