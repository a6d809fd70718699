"""Fuzz executions per second: ``fuzz.Target.run`` (one native call per input) against
the same steps through kvmpy's general API (``vm.write``, ``cpu.set_regs``, ``cpu.run``,
``vm.restore``: four calls per input), on the two shipped fuzz targets, interleaved.

``python -m benchmarks.fuzz_exec [--reps N] [--inputs K]``. Prints microseconds per
execution (median of the repetitions) and the ratio; no timing is asserted anywhere.
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


def per_exec(loop: Callable[[int], None], k: int) -> Callable[[], float]:
    def measure() -> float:
        t0 = time.perf_counter()
        loop(k)
        return (time.perf_counter() - t0) / k * 1e6

    return measure


def loops(t: fuzz.Target, data: bytes) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The two loops for target ``t`` and input ``data``."""
    vm, cpu, snap = t.vm, t.cpu, t.snapshot
    addr = t.input_end - len(data)  # where Target.run puts it

    def native(k: int) -> None:
        for _ in range(k):
            t.run(data)

    def general(k: int) -> None:
        for _ in range(k):
            vm.write(addr, data)
            cpu.set_regs(rdi=addr, rsi=len(data))
            cpu.run(timeout=0.1)
            vm.restore(snap)

    return native, general


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--inputs", type=int, default=2000, help="inputs per repetition")
    args = parser.parse_args()
    print("| target | Target.run (µs/exec) | general API (µs/exec) | ratio |")
    print("|---|---|---|---|")
    for name, entry, data in TARGETS:
        with fuzz.Target.from_elf(kvmpy.shipped_guest(name), entry=entry) as t:
            assert t.run(data).kind == "ok"
            native, general = loops(t, data)
            t.cpu.set_regs(rdi=t.input_end - len(data), rsi=len(data))
            t.vm.write(t.input_end - len(data), data)
            assert t.cpu.run(timeout=1).reason == "exit"
            t.vm.restore(t.snapshot)
            values = interleave(
                {
                    "native": per_exec(native, args.inputs),
                    "general": per_exec(general, args.inputs),
                },
                args.reps,
                warmup=1,
            )
            a, b = statistics.median(values["native"]), statistics.median(values["general"])
            print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
