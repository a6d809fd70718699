/*
 * fuzz_decode.c - a compute-heavy fuzz target whose work is in memory and branches, the
 * way a decoder's or a decompressor's is (fuzz_compute's is one chain of multiplies):
 * decode(data, len) expands the input into a 64 KiB state table, then takes 2^17
 * table-driven steps whose path depends on the data (a load, a branch and a store each),
 * about 2e6 instructions per input. An input that starts with "DEC!" then writes
 * through a NULL pointer. Fuzz entry: decode(data, len) (rdi, rsi).
 */
#include "kvmpy_guest.h"

static uint32_t *volatile state_sink;
static uint8_t table[1 << 16];
volatile uint64_t decode_result;

uint64_t decode(const uint8_t *data, uint64_t len)
{
    uint32_t x = 0x9e3779b9u;
    uint64_t j = 0;
    for (uint32_t i = 0; i < sizeof(table); i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        table[i] = (uint8_t)(x ^ (len ? data[j] : 0));
        if (++j >= len)
            j = 0;
    }
    uint32_t s = (uint32_t)len;
    for (uint32_t step = 0; step < (1u << 17); step++) {
        uint8_t b = table[s & 0xffff];
        if (b & 1)
            s = s * 33 + b;
        else
            s ^= (uint32_t)b << (step & 15);
        table[(s >> 3) & 0xffff] = (uint8_t)(b + step);
    }
    decode_result = s;
    if (len >= 4 && data[0] == 'D' && data[1] == 'E' && data[2] == 'C' && data[3] == '!')
        *state_sink = s;
    return s;
}

int main(uint64_t data, uint64_t len)
{
    return (int)(decode((const uint8_t *)data, len) & 0x7f);
}
