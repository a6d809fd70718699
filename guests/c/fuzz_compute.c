/*
 * fuzz_compute.c - a compute-heavy target for kvmpy.fuzz: hash(data, len) runs 64
 * rounds of a mixing function over the input (at least 1e5 instructions for any
 * input) and writes through a NULL pointer when the digest's low 16 bits are 0x1337.
 * Fuzz entry: hash(data, len) (rdi, rsi).
 */
#include "kvmpy_guest.h"

static uint32_t *volatile digest_sink;
volatile uint64_t hash_result;

uint64_t hash(const uint8_t *data, uint64_t len)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (int round = 0; round < 64; round++) {
        for (uint64_t i = 0; i < len; i++) {
            h ^= data[i] + (uint64_t)round;
            h *= 0x100000001b3ull;
        }
        /* A fixed amount of work per round, whatever the input's length. */
        for (int k = 0; k < 400; k++)
            h = (h << 7 | h >> 57) ^ (h * 0x9e3779b97f4a7c15ull) ^ (uint64_t)k;
    }
    hash_result = h;
    if ((h & 0xffff) == 0x1337)
        *digest_sink = (uint32_t)h;
    return h;
}

int main(uint64_t data, uint64_t len)
{
    return (int)(hash((const uint8_t *)data, len) & 0x7f);
}
