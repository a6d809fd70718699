"""The in-process fuzzer's executions per second (``fuzz.Fuzzer``: LibAFL's mutations,
queue and map feedback, the loop in Rust) against a plain loop of ``Target.run`` on one
fixed input (no mutation, no feedback, one native call per input), on the two shipped
fuzz targets, interleaved. Both run with coverage ("disasm", one-shot): after the first
repetition no block is left patched, so both pay only the execution itself.

``python -m benchmarks.fuzz_engine [--reps N] [--inputs K]``. Prints microseconds per
execution (median of the repetitions) and the ratio of executions per second; no timing
is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import kvmpy
from benchmarks.common import interleave
from kvmpy import fuzz

TARGETS = (
    ("fuzz_parser.elf", "parse", b"KVL\x08abcdefgh"),  # a few hundred instructions
    ("fuzz_compute.elf", "hash", b"kvmpy fuzz " * 4),  # over 1e5 instructions
)


def engine(t: fuzz.Target, data: bytes, k: int) -> Callable[[], float]:
    seed = iter(range(1_000_000))

    def measure() -> float:
        f = fuzz.Fuzzer(t, seeds=[data], seed=next(seed))
        stats = f.run(executions=k)
        return stats.seconds / stats.executions * 1e6

    return measure


def plain(t: fuzz.Target, data: bytes, k: int) -> Callable[[], float]:
    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            t.run(data)
        return (time.perf_counter() - t0) / k * 1e6

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inputs", type=int, default=3000, help="inputs per repetition")
    args = parser.parse_args()
    print("| target | Fuzzer (µs/exec) | Target.run loop (µs/exec) | execs/s ratio |")
    print("|---|---|---|---|")
    for name, entry, data in TARGETS:
        path = kvmpy.shipped_guest(name)
        # max_len = the seed's length: the fuzzer's inputs are no longer than the loop's.
        with fuzz.Target.from_elf(path, entry=entry, coverage="disasm", max_len=len(data)) as t:
            values = interleave(
                {"engine": engine(t, data, args.inputs), "plain": plain(t, data, args.inputs)},
                args.reps,
                warmup=1,
            )
            a, b = statistics.median(values["engine"]), statistics.median(values["plain"])
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
