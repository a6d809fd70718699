"""Fuzz executions per second: ``fuzz.Target.run`` (one native call per input) against
the same steps through kvmpy's general API (``vm.write``, ``cpu.set_regs``, ``cpu.run``,
``vm.restore``: four calls per input), on the two shipped fuzz targets, interleaved.

Then the cost of one coverage block hit with each mechanism this host can use (the
``out dx, al`` patch, ``int3`` through the exception stubs, ``int3`` that KVM
intercepts), against the exit that ends every execution: a CPL3 guest of ``BLOCKS``
one-instruction blocks runs once with every block patched (each costs an exit) and once
more with none left; the difference, less the same difference without coverage, divided
by the blocks, is the cost of a hit.

``python -m benchmarks.fuzz_exec [--reps N] [--inputs K] [--coverage-only]``. Prints
microseconds per execution or per hit (median of the repetitions) and the ratios; no
timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
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


BLOCKS = 400
LOAD = 0x10000


def blocks_guest() -> tuple[bytes, list[int]]:
    """``BLOCKS`` times ``inc eax ; jmp +0`` (each jump's target starts a block), then
    ``out 0xf4, eax``: the code and its block addresses."""
    code = bytes.fromhex("ffc0eb00") * BLOCKS + bytes.fromhex("e7f4")
    return code, [LOAD] + [LOAD + 4 * i for i in range(1, BLOCKS + 1)]


def hit_cost(mechanism: str | None, mode: str = "once") -> Callable[[], float]:
    """Microseconds per block hit with ``mechanism`` (None: no coverage, the baseline
    difference between a first and a second run)."""
    code, blocks = blocks_guest()

    def measure() -> float:
        vm = kvmpy.Vm()
        vm.add_memory(0, 2 << 20).write(LOAD, code)
        vm.add_exit_port(0xF4)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True, exceptions=True)
        cpu.set_regs(rip=LOAD)
        if mechanism is not None:
            os.environ["KVMPY_COVERAGE_MECHANISM"] = mechanism
        try:
            t = fuzz.Target(
                vm,
                cpu,
                vm.snapshot(),
                input_end=0x30000,
                max_len=8,
                coverage=None if mechanism is None else blocks,
                coverage_mode=mode,
            )
        finally:
            os.environ.pop("KVMPY_COVERAGE_MECHANISM", None)
        with t:
            t0 = time.perf_counter()
            first = t.run(b"")
            t1 = time.perf_counter()
            second = t.run(b"")
            t2 = time.perf_counter()
            assert first.code == second.code == BLOCKS, (first, second)
            if mechanism is not None and mode == "once":
                assert len(first.new_coverage) == len(blocks) and not second.new_coverage
        if mode == "armed":
            return (t1 - t0) * 1e6 / len(blocks)
        return ((t1 - t0) - (t2 - t1)) * 1e6 / len(blocks)

    return measure


def coverage_costs(reps: int) -> None:
    from kvmpy._native import _debug_support

    chosen = str(_debug_support()["coverage"])
    names = ["port-io", "exception-stubs"] + (["kvm"] if chosen == "kvm" else [])
    variants = {"none": hit_cost(None)}
    variants |= {name: hit_cost(name) for name in names}
    variants["port-io armed"] = hit_cost("port-io", "armed")
    values = interleave(variants, reps, warmup=1)
    base = statistics.median(values["none"])
    # The exit that ends each execution, for scale: a whole execution without coverage.
    print(f"\ncoverage: {BLOCKS + 1} blocks, kvmpy's choice here: {chosen}")
    print("| mechanism | µs per block hit | ratio to port-io |")
    print("|---|---|---|")
    port = statistics.median(values["port-io"]) - base
    for name in [*names, "port-io armed"]:
        cost = statistics.median(values[name]) - (0 if "armed" in name else base)
        print(f"| {name} | {cost:.1f} | {cost / port:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--inputs", type=int, default=2000, help="inputs per repetition")
    parser.add_argument("--coverage-only", action="store_true")
    args = parser.parse_args()
    if args.coverage_only:
        coverage_costs(args.reps)
        return
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
    coverage_costs(args.reps)


if __name__ == "__main__":
    main()
