/* exit_lines.c - counts the cache lines a process touches, from a valgrind lackey trace.
 *
 * Compiled by `python -m benchmarks.exit_lines` with `cc -O2`. Reads a
 * `valgrind --tool=lackey --trace-mem=yes` trace on stdin and prints, for every 64-byte
 * line that was accessed, "I|D ADDRESS COUNT" (instruction fetch or data access, the
 * line's address in hex, how many accesses touched it). An access that straddles two
 * lines counts for both.
 */
#include <stdio.h>
#include <stdlib.h>

#define SLOTS (1u << 24) /* open addressing; a Python process touches ~250,000 lines */

static unsigned long long keys[SLOTS];
static unsigned long counts[SLOTS];

static void count(unsigned long long line, int fetch) {
    unsigned long long key = ((line << 1) | (unsigned)fetch) + 1; /* 0 marks a free slot */
    unsigned long long h = (key * 0x9E3779B97F4A7C15ull) >> 40;
    for (;; h++) {
        unsigned long long *k = &keys[h & (SLOTS - 1)];
        if (*k == 0) *k = key;
        if (*k == key) {
            counts[h & (SLOTS - 1)]++;
            return;
        }
    }
}

int main(void) {
    char buf[256];
    while (fgets(buf, sizeof buf, stdin)) {
        /* "I  ADDR,SIZE" for a fetch, " L|S|M ADDR,SIZE" for data */
        int fetch = buf[0] == 'I';
        if (!fetch && !(buf[0] == ' ' && (buf[1] == 'L' || buf[1] == 'S' || buf[1] == 'M')))
            continue;
        char *end;
        unsigned long long addr = strtoull(buf + 3, &end, 16);
        unsigned long size = *end == ',' ? strtoul(end + 1, NULL, 10) : 1;
        if (size == 0) size = 1;
        for (unsigned long long l = addr >> 6; l <= (addr + size - 1) >> 6; l++) count(l, fetch);
    }
    for (unsigned long i = 0; i < SLOTS; i++)
        if (keys[i]) {
            unsigned long long key = keys[i] - 1;
            printf("%c %llx %lu\n", (key & 1) ? 'I' : 'D', (key >> 1) << 6, counts[i]);
        }
    return 0;
}
