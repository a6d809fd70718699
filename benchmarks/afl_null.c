/*
 * afl_null.c - the floor of an afl-fuzz execution on this machine: a fork server that
 * runs nothing. It answers afl-fuzz's control word at once, as if a persistent child
 * (itself) had run the input and exited cleanly, and marks two map bytes (afl-fuzz
 * refuses a target that leaves its map empty). No fork, no relay, no target.
 * Built and run by benchmarks/afl_compare.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <sys/shm.h>
#include <unistd.h>

#define FORKSRV_FD 198

int main(void)
{
    const char *id = getenv("__AFL_SHM_ID");
    uint8_t *map = id ? shmat(atoi(id), NULL, 0) : NULL;
    uint32_t word = 0, pid = (uint32_t)getpid(), status = 0;
    if (map == NULL || map == (void *)-1)
        return 1;
    if (write(FORKSRV_FD + 1, &status, 4) != 4)
        return 1;
    while (read(FORKSRV_FD, &word, 4) == 4) {
        map[0] = 1;
        map[1] = 1;
        if (write(FORKSRV_FD + 1, &pid, 4) != 4 || write(FORKSRV_FD + 1, &status, 4) != 4)
            return 1;
    }
    return 0;
}
