/*
 * fuzz_parser.c - a small record parser with three planted bugs at different depths,
 * a target for kvmpy.fuzz.  Fuzz entry: parse(data, len) (rdi, rsi); returns 0..3.
 *
 * Input: "KV" then a record type byte, then the record.
 *   prefix "BUG!"           -> writes through a NULL pointer            (#PF, shallow)
 *   'L' n payload[n]        -> copies n bytes into a 16-byte stack buffer:
 *                              n > 16 overwrites the return address    (#PF/#GP, medium)
 *   'C' a b c d sum         -> if sum == a + b + c + d (mod 256) and a == 'D':
 *                              divides by (b - c)                        (#DE when b == c, deep)
 * Anything else is rejected with a small return value.
 */
#include "kvmpy_guest.h"

/* A pointer the optimizer cannot prove NULL: the write stays a real store. */
static uint32_t *volatile record_sink;
volatile uint64_t parse_result;

static __attribute__((noinline)) uint64_t copy_record(const uint8_t *p, uint64_t n)
{
    volatile uint8_t buf[16];
    for (uint64_t i = 0; i < n; i++)
        buf[i] = p[i];
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n && i < sizeof(buf); i++)
        sum += buf[i];
    return sum;
}

int parse(const uint8_t *data, uint64_t len)
{
    if (len >= 4 && data[0] == 'B' && data[1] == 'U' && data[2] == 'G' && data[3] == '!') {
        *record_sink = 0x0bad; /* record_sink is NULL */
        return 3;
    }
    if (len < 3 || data[0] != 'K' || data[1] != 'V')
        return 1;
    switch (data[2]) {
    case 'L': {
        if (len < 4)
            return 2;
        uint64_t n = data[3];
        if (len < 4 + n)
            return 2;
        parse_result = copy_record(data + 4, n);
        return 0;
    }
    case 'C': {
        if (len < 8)
            return 2;
        uint8_t sum = (uint8_t)(data[3] + data[4] + data[5] + data[6]);
        if (sum != data[7] || data[3] != 'D')
            return 2;
        volatile uint32_t divisor = (uint32_t)data[4] - data[5];
        parse_result = 1000u / divisor;
        return 0;
    }
    default:
        return 2;
    }
}

int main(uint64_t data, uint64_t len)
{
    return parse((const uint8_t *)data, len);
}
