"""Figure 7: a fuzzing-style reset loop (run a target, restore the snapshot), kvmpy's
``vm.restore`` against the raw-C floor (``raw_kvm reset``: registers through kvm_run's sync
area, ``KVM_GET_DIRTY_LOG``, copy the dirty pages back from a clean copy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path

import kvmpy
from benchmarks.common import EXIT_PORT, LOAD_ADDR, BenchError, RawKvm, RawServer, interleave
from benchmarks.report import Figure, Row, Target

RESET_TARGET = Target("ratio", 1.15, "≤ 1.15× raw C")
SIZE_TARGET = Target("ratio", 1.2, "≤ 1.2× the 64 MiB guest")
PAGES = (1, 16, 190)
SMALL_MIB = 64
BIG_MIB = 4096
RING = 4096  # dirty ring entries per vCPU for the ring row
TOUCHED_MIB = 64  # what the capture rows' guests wrote
CAPTURE_TARGET = Target("ratio", 1.5, "≤ 1.5× the guest of just what it touched")


class ResetServer(RawServer):
    """``raw_kvm reset``: the C floor's snapshot64 VM, kept for many loops."""

    def __init__(self, raw: RawKvm, guest: Path, mib: int) -> None:
        super().__init__(raw, "reset", guest, mib)

    def __call__(self, n: int, k: int, fpu: bool = False) -> float:
        """Seconds for ``k`` iterations writing ``n`` pages each (with ``fpu``, also
        putting the FPU/SSE/AVX state back with KVM_SET_XSAVE)."""
        return float(self.ask(f"{n} {k} {int(fpu)}")["seconds"])


class Restores:
    """snapshot64 writing ``n`` pages per run in a kvmpy VM of ``mib`` MiB, with a
    snapshot taken before the first run; with ``ring``, a dirty ring of that many entries
    tracks the writes instead of the dirty bitmap."""

    def __init__(self, code: bytes, n: int, mib: int, ring: int | None = None) -> None:
        self.n = n
        self.vm = kvmpy.Vm(dirty_ring=ring)
        # overcommit: 4 GiB may exceed a small host's memory; the guest touches 2 MiB of it.
        self.vm.add_memory(0, mib << 20, overcommit=True).write(LOAD_ADDR, code)
        self.vm.add_exit_port(EXIT_PORT)
        self.cpu = self.vm.create_vcpu()
        self.cpu.setup_long_mode(user=True)
        self.cpu.set_regs(rip=LOAD_ADDR, rdi=n, rsi=0x100)
        self.snap = self.vm.snapshot()

    def __call__(self, k: int) -> float:
        """Seconds for ``k`` iterations of run + restore."""
        cpu, vm, snap = self.cpu, self.vm, self.snap
        full = cpu.stats()["full_restores"]
        start = time.perf_counter()
        for _ in range(k):
            if cpu.run().reason != "exit":
                raise BenchError("snapshot64 did not reach its exit port")
            vm.restore(snap)
        elapsed = time.perf_counter() - start
        if cpu.stats()["full_restores"] != full:
            raise BenchError("a restore rewrote all vCPU state: the loop is not the fast path")
        if self.n and vm.read(0x100000, 8) != bytes(8):
            raise BenchError("the restore left the target's writes in memory")
        return elapsed

    def close(self) -> None:
        """Closes the VM."""
        self.vm.close()


class Captures:
    """A kvmpy VM of ``mib`` MiB whose first ``touched_mib`` MiB the host wrote (every
    page non-zero): ``vm.snapshot()`` timed."""

    def __init__(self, mib: int, touched_mib: int) -> None:
        self.vm = kvmpy.Vm()
        self.vm.add_memory(0, mib << 20, overcommit=True).write(0, b"\x01" * (touched_mib << 20))

    def __call__(self, k: int) -> float:
        """Seconds for ``k`` snapshots."""
        start = time.perf_counter()
        for _ in range(k):
            self.vm.snapshot()
        return time.perf_counter() - start

    def close(self) -> None:
        """Closes the VM."""
        self.vm.close()


def _scaled(f: Callable[[], float], factor: float) -> float:
    return f() * factor


def figure(raw: RawKvm, guest: Path, k: int, reps: int, warmup: int) -> Figure:
    """Runs the interleaved loops and returns the figure (µs per iteration)."""
    code = guest.read_bytes()
    per = 1e6 / k
    with ExitStack() as stack:
        rawc = stack.enter_context(closing(ResetServer(raw, guest, SMALL_MIB)))
        variants: dict[str, Callable[[], float]] = {}
        for n in PAGES:
            ours = stack.enter_context(closing(Restores(code, n, SMALL_MIB)))
            variants[f"rawc{n}"] = partial(_scaled, partial(rawc, n, k), per)
            variants[f"kvmpy{n}"] = partial(_scaled, partial(ours, k), per)
        for n in (1, 16):
            variants[f"rawfpu{n}"] = partial(_scaled, partial(rawc, n, k, True), per)
        big = stack.enter_context(closing(Restores(code, 16, BIG_MIB)))
        variants["big16"] = partial(_scaled, partial(big, k), per)
        ring = stack.enter_context(closing(Restores(code, 16, BIG_MIB, RING)))
        variants["ring16"] = partial(_scaled, partial(ring, k), per)
        captures = max(1, k // 1000)
        for key, mib in (("capsmall", TOUCHED_MIB), ("capbig", BIG_MIB)):
            cap = stack.enter_context(closing(Captures(mib, TOUCHED_MIB)))
            variants[key] = partial(_scaled, partial(cap, captures), 1e6 / captures)
        v = interleave(variants, reps, warmup)
    fig = Figure(
        "snapshot",
        "7. Snapshot reset loop (run a target, restore)",
        "µs/iteration",
        f"guests/snapshot64.S writing N pages then `out 0xf4, al`, {SMALL_MIB} MiB guests; "
        f"{k:,} iterations per repetition, {reps} repetitions (+{warmup} warm-up), "
        "interleaved; one VM per variant",
    )
    for n in PAGES:
        fig.rows.append(
            Row(f"rawc{n}", f"raw C, N={n} (dirty log + copy + sync regs)", v[f"rawc{n}"])
        )
        fig.rows.append(
            Row(
                f"kvmpy{n}",
                f"kvmpy `cpu.run()` + `vm.restore(snap)`, N={n}",
                v[f"kvmpy{n}"],
                f"rawc{n}",
                RESET_TARGET,
            )
        )
    for n in (1, 16):
        fig.rows.append(
            Row(
                f"rawfpu{n}",
                f"raw C + KVM_SET_XSAVE, N={n} (the same state work as kvmpy)",
                v[f"rawfpu{n}"],
            )
        )
    fig.rows.append(
        Row(
            "big16",
            f"kvmpy, N=16, {BIG_MIB // 1024} GiB guest",
            v["big16"],
            "kvmpy16",
            SIZE_TARGET,
        )
    )
    fig.rows.append(
        Row(
            "ring16",
            f"kvmpy, N=16, {BIG_MIB // 1024} GiB guest, `dirty_ring={RING}`",
            v["ring16"],
            "big16",
        )
    )
    fig.rows.append(
        Row("capsmall", f"`vm.snapshot()` of a {TOUCHED_MIB} MiB guest, all written", v["capsmall"])
    )
    fig.rows.append(
        Row(
            "capbig",
            f"`vm.snapshot()` of a {BIG_MIB // 1024} GiB guest, {TOUCHED_MIB} MiB written",
            v["capbig"],
            "capsmall",
            CAPTURE_TARGET,
        )
    )
    fig.notes.append(
        "The capture rows are µs per `vm.snapshot()`, not per iteration: a capture looks "
        "only at the pages the process touched (/proc/self/pagemap), so its cost follows "
        "what the guest wrote, not its size."
    )
    fig.notes.append(
        "Per iteration kvmpy does what raw C does (one run to the exit port, the dirty log, "
        "the page copies, general registers through kvm_run) and also puts the FPU/SSE/AVX "
        "state back (KVM_SET_XSAVE: user code changes it without an exit, and no exit says "
        "so), re-protects the dirty pages with KVM_CLEAR_DIRTY_LOG where the host has manual "
        "protection, and compares the special registers and events KVM mirrors in kvm_run "
        "with the snapshot's. The 'raw C + KVM_SET_XSAVE' rows do the same state work in C."
    )
    return fig
