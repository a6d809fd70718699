"""The in-process fuzzer's executions per second (``fuzz.Fuzzer``: LibAFL's mutations,
queue and map feedback, the loop in Rust) against two loops on one fixed input: the
raw-C floor (``raw_kvm fuzz``: write the input, registers through kvm_run's sync area,
run, ``KVM_GET_DIRTY_LOG``, copy the dirty pages back; no mutation, no coverage) and a
Python loop of ``Target.run``; on the two shipped fuzz targets, interleaved. kvmpy runs
with coverage ("disasm", one-shot): after the first repetition no block is left patched,
so it pays only the execution itself. The fuzzer's inputs are at most the fixed input's
length (``max_len``), so neither side runs longer inputs.

``python -m benchmarks.fuzz_engine [--reps N] [--inputs K]``. Prints microseconds per
execution (median of the repetitions) and the ratio of executions per second; no timing
is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import kvmpy
from benchmarks.common import RawKvm, RawServer, compile_raw_kvm, interleave
from kvmpy import fuzz

FUZZ_TARGET = 0.9
"""The target: the fuzzer's executions per second at least 0.9x the raw-C floor's."""
IMAGE = 0x100000

TARGETS = (
    ("fuzz_parser.elf", "parse", b"KVL\x08abcdefgh"),  # a few hundred instructions
    ("fuzz_compute.elf", "hash", b"kvmpy fuzz " * 4),  # over 1e5 instructions
    ("fuzz_decode.elf", "decode", b"kvmpy fuzz " * 4),  # about 2e6: loads, stores, branches
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


class RawFuzz(RawServer):
    """``raw_kvm fuzz``: the target's flat image in a C VM, kept for many loops."""

    def __init__(self, raw: RawKvm, t: fuzz.Target, entry: str, out_dir: Path) -> None:
        end = max(t.symbols.get(n, 0) for n in ("__image_end", "__stack_top"))
        image = out_dir / f"{entry}.bin"
        image.write_bytes(t.snapshot.read(IMAGE, end - IMAGE))
        super().__init__(raw, "fuzz", image, hex(t.symbols[entry]))

    def per_exec(self, data: bytes, k: int) -> Callable[[], float]:
        def measure() -> float:
            return float(self.ask(f"{data.hex()} {k}")["seconds"]) / k * 1e6

        return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inputs", type=int, default=3000, help="inputs per repetition")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvmpy-bench-"))
    raw = RawKvm(compile_raw_kvm(tmp))
    print(
        "| target | Fuzzer (µs/exec) | raw C (µs/exec) | Target.run loop (µs/exec) "
        f"| Fuzzer execs/s ÷ raw C (target ≥ {FUZZ_TARGET}×) | ÷ Target.run loop |"
    )
    print("|---|---|---|---|---|---|")
    for name, entry, data in TARGETS:
        path = kvmpy.shipped_guest(name)
        with fuzz.Target.from_elf(path, entry=entry, coverage="disasm", max_len=len(data)) as t:
            server = RawFuzz(raw, t, entry, tmp)
            try:
                values = interleave(
                    {
                        "engine": engine(t, data, args.inputs),
                        "raw": server.per_exec(data, args.inputs),
                        "plain": plain(t, data, args.inputs),
                    },
                    args.reps,
                    warmup=1,
                )
            finally:
                server.close()
            e, r, p = (statistics.median(values[k]) for k in ("engine", "raw", "plain"))
            print(f"| {name} | {e:.1f} | {r:.1f} | {p:.1f} | {r / e:.2f}× | {p / e:.2f}× |")


if __name__ == "__main__":
    main()
