"""``python -m benchmarks``: kvmpy against the hardware limit and its peers, side by side.

Measures, in one run and interleaved repetition by repetition:

1. exit round trip (guest OUT -> host -> guest): raw C, kvmpy with a Rust device, kvmpy with
   a Python handler, a minimal C extension calling a Python handler (the floor for any
   binding that does), plain Python on the KVM API, Unicorn with a Python hook;
2. guest compute (an LCG loop): C without a VM, raw C KVM, kvmpy, Unicorn;
3. VM creation (VM + 64 MiB + 1 vCPU, then close): raw C, kvmpy, plain Python;
4. register round trip (read + write the general registers): raw C, kvmpy, plain Python;
5. multi-vCPU exit throughput with 1 and 2 vCPUs: raw C, kvmpy Rust devices, Python handlers;
6. a run with a timeout: kvmpy's ``cpu.run()`` against ``cpu.run(timeout=10.0)``, one exit each;
7. a snapshot reset loop (run a target writing N pages, restore): raw C against kvmpy, and a
   4 GiB guest against a 64 MiB one.

Prints a markdown report (median, spread, ratios, targets) and writes every repetition's
value as JSON. Targets are reported as pass/MISS and never fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import cext_cases, kvmpy_cases, rawpy, snapshot_cases, unicorn_cases
from benchmarks.common import (
    BenchError,
    ExitServer,
    RawKvm,
    compile_raw_kvm,
    guest_bytes,
    guest_path,
    interleave,
    machine_info,
    process_mappings,
)
from benchmarks.report import (
    Figure,
    Headline,
    Row,
    Target,
    figure_json,
    figure_markdown,
    headline_markdown,
    headline_rows,
    paired_deltas,
    paired_ratios,
)

FIGURES = ("exits", "compute", "create", "regs", "multi", "timeout", "snapshot")
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"

RUST_EXIT_TARGET = Target("ratio", 1.05, "≤ 1.05× raw C")
PYTHON_EXIT_TARGET = Target("delta", 0.3, "≤ raw C + 0.3 µs")
CREATE_TARGET = Target("ratio", 1.2, "≤ 1.2× raw C")
COMPUTE_TARGET = Target("ratio", 1.02, "≤ 1.02× raw C")
TIMEOUT_TARGET = Target("delta", 1.0, "≤ 1 µs more per run")


@dataclass(frozen=True)
class Config:
    """Sizes and repetition counts of one run."""

    reps: int
    """Repetitions of the exit, VM creation and register figures."""
    warmup: int
    """Discarded rounds before the measured ones."""
    exit_n: int
    """Device exits per counter64 run."""
    exit_reps: int
    compute_n: int
    """LCG iterations of compute64 in KVM (and of the C loop without a VM)."""
    unicorn_compute_n: int
    """LCG iterations of compute64 under Unicorn (far slower)."""
    compute_reps: int
    create_k: int
    """VMs created per repetition."""
    regs_k: int
    """Register round trips per repetition."""
    multi_n: int
    """Device exits per vCPU per run in the multi-vCPU figure."""
    multi_reps: int
    timeout_k: int
    """Runs (one exit each) per repetition in the timeout figure."""
    timeout_reps: int
    snapshot_k: int
    """Run + restore iterations per repetition in the snapshot figure."""
    snapshot_reps: int


FULL = Config(
    reps=41,
    warmup=1,
    exit_n=1_000,
    exit_reps=201,
    compute_n=1_000_000_000,
    unicorn_compute_n=10_000_000,
    compute_reps=7,
    create_k=100,
    regs_k=5_000,
    multi_n=5_000,
    multi_reps=21,
    timeout_k=1_000,
    timeout_reps=201,
    snapshot_k=1_000,
    snapshot_reps=21,
)
SMOKE = Config(
    reps=2,
    warmup=0,
    exit_n=200,
    exit_reps=2,
    compute_n=1_000_000,
    unicorn_compute_n=100_000,
    compute_reps=1,
    create_k=3,
    regs_k=200,
    multi_n=200,
    multi_reps=1,
    timeout_k=20,
    timeout_reps=2,
    snapshot_k=10,
    snapshot_reps=1,
)


def runs(n: int) -> str:
    """``1 run``, ``2 runs``, ..."""
    return f"{n} run" if n == 1 else f"{n} runs"


class Runner:
    """Runs the figures with one compiled C baseline and the guests."""

    def __init__(
        self, cfg: Config, raw: RawKvm, unicorn_missing: str | None, build_dir: Path
    ) -> None:
        self.cfg = cfg
        self.raw = raw
        self.unicorn_missing = unicorn_missing
        self.build_dir = build_dir
        """Where C code compiled at run time goes (a temporary directory)."""
        self.cext_missing = cext_cases.unavailable()
        self._cext: ModuleType | None = None
        self.counter = guest_bytes("counter64")
        self.counter_path = guest_path("counter64")
        self.compute = guest_bytes("compute64")
        self.compute_path = guest_path("compute64")

    def _skipped_unicorn(self, fig: Figure) -> None:
        if self.unicorn_missing:
            fig.notes.append(f"Unicorn rows skipped: {self.unicorn_missing}.")

    def cext(self) -> ModuleType:
        """The C-extension floor (``cext_exit.c``), compiled and loaded on first use."""
        if self._cext is None:
            self._cext = cext_cases.build(self.build_dir)
        return self._cext

    def exits(self) -> Figure:
        """Figure 1: the exit round trip, per exit."""
        cfg, n, code = self.cfg, self.cfg.exit_n, self.counter
        per_exit = 1e6 / (n + 1)
        with ExitStack() as stack:
            # One VM per variant, kept for all its runs: runs of all variants alternate
            # closely, and VM setup and teardown stay out of the way.
            rawc = stack.enter_context(closing(ExitServer(self.raw, self.counter_path)))
            rust = stack.enter_context(closing(kvmpy_cases.Exits(code, python=False)))
            python = stack.enter_context(closing(kvmpy_cases.Exits(code, python=True)))
            purepy = stack.enter_context(closing(rawpy.Exits(code)))
            variants: dict[str, Callable[[], float]] = {
                "rawc": lambda: rawc(n) * per_exit,
                "rust": lambda: rust(n) * per_exit,
                "python": lambda: python(n) * per_exit,
            }
            if not self.cext_missing:
                floor = stack.enter_context(
                    closing(cext_cases.Exits(self.cext(), self.counter_path))
                )
                variants["cext"] = lambda: floor(n) * per_exit
                inproc = stack.enter_context(
                    closing(cext_cases.Exits(self.cext(), self.counter_path, python=False))
                )
                variants["cloop"] = lambda: inproc(n) * per_exit
            variants["purepy"] = lambda: purepy(n) * per_exit
            if not self.unicorn_missing:
                variants["unicorn"] = lambda: unicorn_cases.exits(code, n) * per_exit
            v = interleave(variants, cfg.exit_reps, cfg.warmup)
        fig = Figure(
            "exits",
            "1. Exit round trip (guest OUT → host → guest)",
            "µs/exit",
            f"counter64: {n:,} OUTs to port 0x11 + 1 to the exit port per run, "
            f"{runs(cfg.exit_reps)} each (+{cfg.warmup} warm-up), interleaved; "
            "one VM per variant for all its runs",
        )
        fig.rows = [
            Row("rawc", "raw C, KVM_RUN loop", v["rawc"], short="raw C"),
            Row(
                "rust", "kvmpy, Rust device (console on 0x11)", v["rust"], "rawc", RUST_EXIT_TARGET
            ),
            Row(
                "python",
                "kvmpy, Python handler (`lambda e: None`)",
                v["python"],
                "rawc",
                PYTHON_EXIT_TARGET,
            ),
        ]
        if "cext" in v:
            fig.rows.append(Row("cext", "C extension + Python handler (floor)", v["cext"], "rawc"))
            fig.rows.append(
                Row("cloop", "raw C's loop inside this Python process", v["cloop"], "rawc")
            )
        fig.rows.append(Row("purepy", "plain Python, fcntl.ioctl + ctypes", v["purepy"], "rawc"))
        if "unicorn" in v:
            fig.rows.append(
                Row(
                    "unicorn",
                    "Unicorn, Python OUT hook",
                    v["unicorn"],
                    "rawc",
                    note="emulated: no VM exit",
                )
            )
        rawc_row, rust_row, python_row = fig.rows[0], fig.rows[1], fig.rows[2]
        overhead = paired_deltas(python_row, rust_row)
        fig.notes.append(
            "kvmpy's Python-handler overhead over its Rust device, paired run by run: "
            f"median {overhead.median:+.2f} µs/exit (IQR {overhead.q1:+.2f} to "
            f"{overhead.q3:+.2f})."
        )
        cext_row = fig.row("cext")
        if cext_row is not None:
            fig.notes.append(
                "The C-extension floor (`benchmarks/cext_exit.c`) is the least a binding that "
                "calls Python on each exit must do: release the GIL around `KVM_RUN`, then "
                "build an int (the port) and a bytes object (the data) and call "
                "`handler(port, data)` (a Python function that does nothing)."
            )
            floor = paired_deltas(cext_row, rawc_row)
            kvmpy_delta = paired_deltas(python_row, rawc_row)
            beyond = paired_deltas(python_row, cext_row)
            fig.notes.append(
                "Per exit against raw C, paired medians: C-extension floor "
                f"{floor.median:+.2f} µs, kvmpy's Python handler {kvmpy_delta.median:+.2f} µs; "
                f"kvmpy beyond the floor: {beyond.median:+.2f} µs/exit (IQR {beyond.q1:+.2f} "
                f"to {beyond.q3:+.2f})."
            )
            if floor.median > PYTHON_EXIT_TARGET.limit:
                fig.notes.append(
                    f"On this host the floor alone is {floor.median:+.2f} µs over raw C, "
                    f"more than the Python-handler target allows "
                    f"({PYTHON_EXIT_TARGET.text}): no binding that calls Python on each "
                    "exit meets that target here; what kvmpy adds is its distance to the "
                    "floor."
                )
            cloop_row = fig.row("cloop")
            if cloop_row is not None:
                own = paired_deltas(rust_row, cloop_row)
                fig.notes.append(
                    "The same C loop without the Python call, inside this process (the "
                    "extension's `run(n, None)`), is the engine's own reference: each exit "
                    "leaves the host's caches cold, so what a loop touches per exit, more "
                    "than what it executes, sets its cost. kvmpy's Rust device beyond it, "
                    f"paired: {own.median:+.2f} µs/exit (IQR {own.q1:+.2f} to "
                    f"{own.q3:+.2f})."
                )
        else:
            fig.notes.append(f"C-extension floor skipped: {self.cext_missing}.")
        self._skipped_unicorn(fig)
        return fig

    def compute_fig(self) -> Figure:
        """Figure 2: guest compute, per LCG iteration."""
        cfg, n, un = self.cfg, self.cfg.compute_n, self.cfg.unicorn_compute_n
        variants: dict[str, Callable[[], float]] = {
            "native": lambda: self.raw("native", n)["seconds"] * 1e9 / n,
            "rawc": lambda: self.raw("compute", self.compute_path, n)["seconds"] * 1e9 / n,
            "kvmpy": lambda: kvmpy_cases.compute(self.compute, n) * 1e9 / n,
        }
        if not self.unicorn_missing:
            variants["unicorn"] = lambda: unicorn_cases.compute(self.compute, un) * 1e9 / un
        v = interleave(variants, cfg.compute_reps, min(cfg.warmup, 1))
        fig = Figure(
            "compute",
            "2. Guest compute (compute64: imul, add, dec, jnz per iteration)",
            "ns/iteration",
            f"N = {n:,} iterations in KVM and natively"
            + ("" if self.unicorn_missing else f", {un:,} under Unicorn")
            + f"; {runs(cfg.compute_reps)} each, interleaved",
        )
        fig.rows = [
            Row("rawc", "raw C, KVM", v["rawc"], short="raw C"),
            Row("kvmpy", "kvmpy", v["kvmpy"], "rawc", COMPUTE_TARGET),
            Row("native", "C, same loop on the host (no VM)", v["native"], "rawc"),
        ]
        if "unicorn" in v:
            fig.rows.append(Row("unicorn", "Unicorn", v["unicorn"], "rawc", note=f"N = {un:,}"))
        self._skipped_unicorn(fig)
        return fig

    def create(self) -> Figure:
        """Figure 3: VM creation, per VM."""
        cfg, k = self.cfg, self.cfg.create_k
        # KVM_CREATE_VM costs more in a process with more memory mappings (see BENCHMARKS.md),
        # and this Python process has many more than the small C program: a second C row
        # pads the C process to as many mappings, to tell that cost from kvmpy's own.
        maps = process_mappings()
        v = interleave(
            {
                "rawc": lambda: self.raw("create", k)["seconds"] * 1e6 / k,
                "rawc_padded": lambda: self.raw("create", k, maps)["seconds"] * 1e6 / k,
                "kvmpy": lambda: kvmpy_cases.create(k) * 1e6 / k,
                "purepy": lambda: rawpy.create(k) * 1e6 / k,
            },
            cfg.reps,
            cfg.warmup,
        )
        fig = Figure(
            "create",
            "3. VM creation (VM + 64 MiB memory slot + 1 vCPU with CPUID, then close)",
            "µs/VM",
            f"{k} VMs created and closed per run, {runs(cfg.reps)} each, interleaved",
        )
        fig.rows = [
            Row("rawc", "raw C", v["rawc"]),
            Row(
                "kvmpy",
                "kvmpy: `Vm()`, `add_memory`, `create_vcpu`, `close()`",
                v["kvmpy"],
                "rawc",
                CREATE_TARGET,
            ),
            Row("purepy", "plain Python, fcntl.ioctl + ctypes", v["purepy"], "rawc"),
            Row(
                "rawc_padded",
                f"raw C in a process padded to {maps} memory mappings, as many as this runner",
                v["rawc_padded"],
                "rawc",
            ),
        ]
        kvmpy_row, padded = fig.rows[1], fig.rows[3]
        fig.notes.append(
            "kvmpy ÷ raw C with as many memory mappings (paired median): "
            f"{paired_ratios(kvmpy_row, padded).median:.3g}×."
        )
        return fig

    def regs(self) -> Figure:
        """Figure 4: register round trip from Python, per round trip."""
        cfg, k = self.cfg, self.cfg.regs_k
        v = interleave(
            {
                "rawc": lambda: self.raw("regs", k)["seconds"] * 1e6 / k,
                "assign": lambda: kvmpy_cases.regs(k, set_regs=False) * 1e6 / k,
                "set_regs": lambda: kvmpy_cases.regs(k, set_regs=True) * 1e6 / k,
                "mirror": lambda: kvmpy_cases.regs(k, set_regs=False, after_run=True) * 1e6 / k,
                "purepy": lambda: rawpy.regs(k) * 1e6 / k,
            },
            cfg.reps,
            cfg.warmup,
        )
        fig = Figure(
            "regs",
            "4. Register round trip (read all general registers, write them back)",
            "µs/round trip",
            f"{k:,} round trips per run, {runs(cfg.reps)} each, interleaved",
        )
        fig.rows = [
            Row("rawc", "raw C: KVM_GET_REGS + KVM_SET_REGS", v["rawc"], short="raw C"),
            Row("assign", "kvmpy: `r = cpu.regs; cpu.regs = r` (2 ioctls)", v["assign"], "rawc"),
            Row(
                "set_regs",
                "kvmpy: `cpu.regs` + `cpu.set_regs(rax=…)` (3 ioctls)",
                v["set_regs"],
                "rawc",
            ),
            Row(
                "mirror",
                "kvmpy after the vCPU has run: `r = cpu.regs; cpu.regs = r` (no ioctl)",
                v["mirror"],
                "rawc",
            ),
            Row("purepy", "plain Python: 2 × fcntl.ioctl on a ctypes struct", v["purepy"], "rawc"),
        ]
        fig.notes.append(
            "`cpu.set_regs(**fields)` reads the registers, changes the named ones and writes "
            "them back, so it costs one KVM_GET_REGS more than `cpu.regs = r`."
        )
        fig.notes.append(
            "Once a vCPU has run, kvmpy reads and writes the general registers in the "
            "`kvm_run` area (KVM_CAP_SYNC_REGS): KVM stores them there on every exit and loads "
            "changed ones on the next entry, so a harness that resets registers between runs "
            "makes no register ioctl at all."
        )
        return fig

    def multi(self) -> Figure:
        """Figure 5: exit throughput with 1 and 2 vCPUs (one VM, one thread per vCPU)."""
        cfg, n, code = self.cfg, self.cfg.multi_n, self.counter

        def raw(vcpus: int) -> float:
            out = self.raw("multi", self.counter_path, n, vcpus)
            return float(out["exits"] / out["seconds"])

        def kv(vcpus: int, python: bool) -> float:
            seconds, exits = kvmpy_cases.multi(code, n, vcpus, python=python)
            return exits / seconds

        variants: dict[str, Callable[[], float]] = {}
        for vcpus in (1, 2):
            variants[f"rawc{vcpus}"] = partial(raw, vcpus)
            variants[f"rust{vcpus}"] = partial(kv, vcpus, False)
            variants[f"python{vcpus}"] = partial(kv, vcpus, True)
        v = interleave(variants, cfg.multi_reps, min(cfg.warmup, 1))
        fig = Figure(
            "multi",
            "5. Multi-vCPU exit throughput (one VM, one thread per vCPU, all exits summed)",
            "exits/s",
            f"counter64 with {n:,} device exits per vCPU, {runs(cfg.multi_reps)} each, interleaved",
            higher_is_better=True,
        )
        for vcpus in (1, 2):
            fig.rows += [
                Row(f"rawc{vcpus}", f"raw C, {vcpus} vCPU", v[f"rawc{vcpus}"], short="raw C"),
                Row(
                    f"rust{vcpus}",
                    f"kvmpy, Rust device, {vcpus} vCPU",
                    v[f"rust{vcpus}"],
                    f"rawc{vcpus}",
                ),
                Row(
                    f"python{vcpus}",
                    f"kvmpy, Python handler, {vcpus} vCPU",
                    v[f"python{vcpus}"],
                    f"rawc{vcpus}",
                ),
            ]
        scaling = []
        for name, key in (("raw C", "rawc"), ("kvmpy Rust", "rust"), ("kvmpy Python", "python")):
            one, two = fig.row(f"{key}1"), fig.row(f"{key}2")
            assert one is not None and two is not None
            scaling.append(f"{name} {paired_ratios(two, one).median:.2f}×")
        fig.notes.append(
            "Scaling, 2 vCPUs ÷ 1 vCPU (throughput, paired median): " + ", ".join(scaling)
        )
        fig.notes.append("The ratio column is throughput ÷ raw C with as many vCPUs.")
        return fig

    def timeout(self) -> Figure:
        """Figure 6: a run with a timeout against one without, per run of one exit."""
        cfg, k = self.cfg, self.cfg.timeout_k
        with closing(kvmpy_cases.Runs()) as guest:
            # Both variants run the same vCPU, alternately.
            v = interleave(
                {
                    "plain": lambda: guest(k, None) * 1e6 / k,
                    "timeout": lambda: guest(k, 10.0) * 1e6 / k,
                },
                cfg.timeout_reps,
                cfg.warmup,
            )
        fig = Figure(
            "timeout",
            "6. Run with a timeout (a run that ends at its first exit)",
            "µs/run",
            f"`out 0xf4, al` to an exit port, then a jump back to it: one exit per run; "
            f"{k:,} runs per repetition, {runs(cfg.timeout_reps)} each (+{cfg.warmup} "
            "warm-up), interleaved on one vCPU",
        )
        fig.rows = [
            Row("plain", "kvmpy: `cpu.run()`", v["plain"], short="no timeout"),
            Row(
                "timeout",
                "kvmpy: `cpu.run(timeout=10.0)`",
                v["timeout"],
                "plain",
                TIMEOUT_TARGET,
            ),
        ]
        delta = paired_deltas(fig.rows[1], fig.rows[0])
        fig.notes.append(
            "A timeout's cost per run, paired run by run: median "
            f"{delta.median:+.2f} µs (IQR {delta.q1:+.2f} to {delta.q3:+.2f}). kvmpy keeps "
            "one POSIX timer per vCPU; a run whose deadline is no earlier than the expiry "
            "still set leaves the timer alone, so here it is set once per 10 s (it then "
            "fires early, and the run it interrupts sets it for its own deadline)."
        )
        return fig


HEADLINES = [
    Headline("Exit, Rust device: kvmpy ÷ raw C", "exits", "rust", "rawc", RUST_EXIT_TARGET),
    Headline("Exit, Python handler: kvmpy ÷ raw C", "exits", "python", "rawc", PYTHON_EXIT_TARGET),
    Headline("Exit, C-extension floor: − raw C", "exits", "cext", "rawc", kind="delta"),
    Headline(
        "Exit, Python handler: kvmpy − C-extension floor", "exits", "python", "cext", kind="delta"
    ),
    Headline("Exit, Python handler: kvmpy ÷ plain Python ioctl loop", "exits", "python", "purepy"),
    Headline("Exit, Python handler: kvmpy ÷ Unicorn (Python hook)", "exits", "python", "unicorn"),
    Headline("Compute: kvmpy ÷ raw C", "compute", "kvmpy", "rawc", COMPUTE_TARGET),
    Headline("Compute: kvmpy ÷ Unicorn (per iteration)", "compute", "kvmpy", "unicorn"),
    Headline("VM creation: kvmpy ÷ raw C", "create", "kvmpy", "rawc", CREATE_TARGET),
    Headline("VM creation: kvmpy ÷ plain Python", "create", "kvmpy", "purepy"),
    Headline("Register round trip: kvmpy ÷ raw C", "regs", "assign", "rawc"),
    Headline("Register round trip via set_regs: kvmpy ÷ raw C", "regs", "set_regs", "rawc"),
    Headline("Register round trip: kvmpy ÷ plain Python", "regs", "assign", "purepy"),
    Headline(
        "Register round trip after a run (kvm_run mirror): kvmpy ÷ raw C", "regs", "mirror", "rawc"
    ),
    Headline("2 vCPUs, Rust devices: kvmpy ÷ raw C (time per exit)", "multi", "rust2", "rawc2"),
    Headline(
        "2 vCPUs, Python handlers: kvmpy ÷ raw C (time per exit)", "multi", "python2", "rawc2"
    ),
    *(
        Headline(
            f"Snapshot reset, N={n} pages: kvmpy ÷ raw C",
            "snapshot",
            f"kvmpy{n}",
            f"rawc{n}",
            snapshot_cases.RESET_TARGET,
        )
        for n in snapshot_cases.PAGES
    ),
    *(
        Headline(
            f"Snapshot reset, N={n}: kvmpy ÷ raw C that also restores the FPU state",
            "snapshot",
            f"kvmpy{n}",
            f"rawfpu{n}",
        )
        for n in (1, 16)
    ),
    Headline(
        "Snapshot reset, N=16: 4 GiB guest ÷ 64 MiB guest",
        "snapshot",
        "big16",
        "kvmpy16",
        snapshot_cases.SIZE_TARGET,
    ),
    Headline(
        "Run with a timeout − run without (per run)",
        "timeout",
        "timeout",
        "plain",
        TIMEOUT_TARGET,
        kind="delta",
    ),
]


def machine_markdown(m: dict[str, Any]) -> list[str]:
    """The machine description as markdown."""
    nested = "yes (KVM inside a VM: nested)" if m["nested"] else "no (bare metal)"
    lines = [
        f"- CPU: {m['cpu']}, {m['cpus']} CPUs; kernel {m['kernel']}; nested: {nested}",
        f"- kvmpy {m['kvmpy']} ({m['kvmpy_build']} build), Python {m['python']}, "
        f"Unicorn {m['unicorn'] or 'not installed'}, {m['cc']}; "
        f"repository at {m['git'] or 'unknown commit'}",
        "",
        "`python -m kvmpy info`:",
        "",
        "```",
        m["kvmpy_info"],
        "```",
    ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="kvmpy against raw C KVM, plain Python KVM and Unicorn, interleaved.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and 1-2 repetitions: proves the runner works (no meaningful timings)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="FILE",
        help=f"where to write the results as JSON (default {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="also write the markdown report to FILE"
    )
    parser.add_argument(
        "--reps",
        type=int,
        metavar="N",
        help="repetitions of every figure (overrides the mode's counts)",
    )
    parser.add_argument(
        "--only", metavar="FIGS", help=f"comma-separated figures to run, of: {','.join(FIGURES)}"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="CPU to pin the single-vCPU figures to (default: the last allowed CPU; "
        "-1: no pinning). The multi-vCPU figure always runs on all allowed CPUs.",
    )
    return parser.parse_args(argv)


@contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Runs the body with this thread (and the processes and threads it starts) pinned
    to ``cpu``; does nothing for None."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.reps is not None:
        if args.reps < 1:
            print("benchmarks: --reps must be >= 1", file=sys.stderr)
            return 2
        cfg = replace(
            cfg,
            reps=args.reps,
            exit_reps=args.reps,
            compute_reps=args.reps,
            multi_reps=args.reps,
            timeout_reps=args.reps,
            snapshot_reps=args.reps,
        )
    figures = FIGURES
    if args.only:
        figures = tuple(f.strip() for f in args.only.split(",") if f.strip())
        unknown = [f for f in figures if f not in FIGURES]
        if unknown:
            print(f"benchmarks: unknown figure(s) {unknown}; known: {FIGURES}", file=sys.stderr)
            return 2

    import kvmpy

    avail = kvmpy.available()
    if not avail:
        print(f"benchmarks: KVM is unavailable: {avail.reason}", file=sys.stderr)
        if args.smoke and os.environ.get("KVMPY_REQUIRE_KVM") != "1":
            print("benchmarks: smoke run skipped (nothing to measure without KVM)", file=sys.stderr)
            return 0
        return 2
    allowed = sorted(os.sched_getaffinity(0))
    pin_cpu: int | None = allowed[-1] if args.cpu is None else args.cpu
    if pin_cpu is not None and pin_cpu < 0:
        pin_cpu = None
    if pin_cpu is not None and pin_cpu not in allowed:
        print(
            f"benchmarks: --cpu {pin_cpu} is not one of the allowed CPUs {allowed}", file=sys.stderr
        )
        return 2
    started = time.monotonic()
    date = datetime.now().astimezone()
    command = "python -m benchmarks" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
            raw = RawKvm(compile_raw_kvm(Path(tmp)))
            unicorn_missing = unicorn_cases.unavailable()
            if unicorn_missing:
                print(f"note: Unicorn rows skipped: {unicorn_missing}", file=sys.stderr)
            machine = machine_info()
            if machine["kvmpy_build"] == "debug":
                print(
                    "WARNING: kvmpy's native module is a debug build; rebuild with "
                    "`maturin develop --release` for meaningful timings",
                    file=sys.stderr,
                )
            runner = Runner(cfg, raw, unicorn_missing, Path(tmp))
            steps = {
                "exits": runner.exits,
                "compute": runner.compute_fig,
                "create": runner.create,
                "regs": runner.regs,
                "multi": runner.multi,
                "timeout": runner.timeout,
                "snapshot": lambda: snapshot_cases.figure(
                    raw, guest_path("snapshot64"), cfg.snapshot_k, cfg.snapshot_reps, cfg.warmup
                ),
            }
            results: list[Figure] = []
            for name in figures:
                t0 = time.monotonic()
                # Single-threaded figures run on one CPU, the runner and the C baseline's
                # process alike, so paired runs meet the same CPU (much less noise).
                cpu = None if name == "multi" else pin_cpu
                where = "all CPUs" if cpu is None else f"CPU {cpu}"
                print(f"[{name}] running on {where}...", file=sys.stderr, flush=True)
                with pinned(cpu):
                    results.append(steps[name]())
                print(f"[{name}] done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started

    headlines = headline_rows(results, HEADLINES)
    mode = "smoke (timings not meaningful)" if args.smoke else "full"
    lines = [
        "## kvmpy benchmarks",
        "",
        f"Command: `{command}` ({mode}, {elapsed:.0f} s); "
        f"date: {date.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
        *machine_markdown(machine)[:2],
        "- "
        + (
            "no CPU pinning"
            if pin_cpu is None
            else f"single-vCPU figures pinned to CPU {pin_cpu} (the runner and the C "
            "baseline alike); the multi-vCPU figure runs on all CPUs"
        ),
        "",
        "### Headline: paired time ratios (÷; < 1: kvmpy faster) and differences (−; < 0: faster)",
        "",
        *headline_markdown(headlines),
        "",
    ]
    for fig in results:
        lines += figure_markdown(fig)
    lines += ["### Machine", "", *machine_markdown(machine), ""]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    payload = {
        "command": command,
        "date": date.isoformat(),
        "mode": "smoke" if args.smoke else "full",
        "seconds": elapsed,
        "config": {**asdict(cfg), "pinned_cpu": pin_cpu},
        "machine": machine,
        "headline": headlines,
        "figures": [figure_json(f) for f in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"JSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
