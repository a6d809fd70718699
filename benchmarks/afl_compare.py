"""kvmpy against Unicorn + unicornafl under afl-fuzz, on the three shipped fuzz targets.

For each target (``fuzz_parser.elf`` ``parse``: a few hundred instructions and three
planted bugs; ``fuzz_compute.elf`` ``hash``: over 1e5 instructions per input, one chain of
multiplies; ``fuzz_decode.elf`` ``decode``: about 2e6 per input, loads, stores and
branches), afl-fuzz
runs for ``--duration`` seconds (``-V``) on a kvmpy harness (``fuzz.main(target)``, block
coverage from disassembly, "once" mode) and then on the Unicorn harness of
``benchmarks.unicorn_fuzz`` (unicornafl's edge coverage), one after the other, from the
same seeds, in persistent mode both. From each run's ``fuzzer_stats``: executions per
second and executions done; the time to the first crash is the first saved crash's mtime
less the moment afl-fuzz was started.

Then the fork-server overhead: the inputs of kvmpy's final corpus, run in one process
through ``fuzz.Target.run`` (and through the Unicorn harness's ``run``), µs per
execution, against 1e6 / ``execs_per_sec`` under afl-fuzz; and, for kvmpy, against the
harness's own mean time per run on the very inputs afl-fuzz ran (``KVMPY_AFL_STATS``),
which does not depend on how the final corpus differs from afl-fuzz's mutations. And the round
trip of one u32 between Python processes over pipes: direct, as kvmpy's fork-server
child answers afl-fuzz, and relayed through a third process (afl-fuzz -> server ->
child -> server -> afl-fuzz), what a fork server that relays every input costs.

Last, afl-fuzz's own floor here: ``afl_null.c``, a C fork server that runs nothing.

``python -m benchmarks.afl_compare [--duration S] [--targets parser,compute,decode]
[--pin CPU] [--floor-only] [--kvmpy-only]``. ``--kvmpy-only`` runs only kvmpy's side and
its overhead row (no Unicorn needed), with afl-fuzz's floor measured right after.
``--pin`` keeps afl-fuzz, the fork server and its child on one CPU (afl-fuzz's own binding
is off here: ``AFL_NO_AFFINITY``): on this nested host a wake-up on the other CPU costs
tens of µs, paid at every hand-off between the processes.
Needs afl-fuzz (AFL++) and the Unicorn pair named in ``benchmarks.unicorn_fuzz``
(``pip install unicornafl==2.0.2 unicorn==2.0.0rc6``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kvmpy
from benchmarks.common import ROOT
from benchmarks.unicorn_fuzz import UnicornTarget
from benchmarks.unicorn_fuzz import unavailable as unicorn_unavailable
from kvmpy import fuzz

MAX_LEN = 512
TARGETS = {
    "parser": ("fuzz_parser.elf", "parse", [b"BUG#", b"KVL\x02ab", b"KVC\x00\x00\x00\x00\x00"]),
    "compute": ("fuzz_compute.elf", "hash", [b"kvmpy fuzz " * 4, b"hello"]),
    "decode": ("fuzz_decode.elf", "decode", [b"kvmpy fuzz " * 4, b"hello"]),
}
KVMPY_HARNESS = """\
from kvmpy import fuzz
target = fuzz.Target.from_elf({elf!r}, entry={entry!r}, max_len={max_len}, timeout_ms=100,
                              coverage="disasm")
if __name__ == "__main__":
    raise SystemExit(fuzz.main(target))
"""
AFL_ENV = {
    "AFL_SKIP_BIN_CHECK": "1",  # the targets are Python scripts
    "AFL_NO_UI": "1",
    "AFL_SKIP_CPUFREQ": "1",
    "AFL_NO_AFFINITY": "1",
    "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1",
    "AFL_NO_CRASH_README": "1",
}


@dataclass
class AflRun:
    execs_per_sec: float
    execs_done: int
    corpus_count: int
    crashes: int
    timeouts: int
    first_crash_s: float | None
    out: Path
    own_us: float | None = None
    """kvmpy only: the harness's own mean µs per run, on the inputs afl-fuzz ran
    (``KVMPY_AFL_STATS``)."""

    @property
    def us_per_exec(self) -> float:
        return 1e6 / self.execs_per_sec if self.execs_per_sec else float("inf")


def read_stats(out: Path) -> dict[str, str]:
    lines = (out / "fuzzer_stats").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


PIN: int | None = None
"""With ``--pin CPU``: afl-fuzz and its target run on that one CPU."""


def _pin() -> None:
    if PIN is not None:
        os.sched_setaffinity(0, {PIN})


def run_afl(
    work: Path,
    name: str,
    seeds: Path,
    duration: int,
    harness: list[str],
    own_stats: Path | None = None,
) -> AflRun:
    """afl-fuzz for ``duration`` seconds on ``harness`` (a command with ``@@``); with
    ``own_stats``, a kvmpy harness keeps its run counters there."""
    afl = shutil.which("afl-fuzz")
    if afl is None:
        raise SystemExit("afl-fuzz is not installed (Debian: apt install afl++)")
    out = work / name
    cmd = [afl, "-V", str(duration), "-t", "1000", "-i", str(seeds), "-o", str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | AFL_ENV | {"PYTHONPATH": path}
    if own_stats is not None:
        env["KVMPY_AFL_STATS"] = str(own_stats)
    started = time.time()
    run = subprocess.run(
        [*cmd, "--", *harness],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=duration + 300,
        preexec_fn=_pin,
    )
    print(f"{name}: afl-fuzz ran {time.time() - started:.0f} s", file=sys.stderr)
    out = out / "default"
    if run.returncode != 0 or not (out / "fuzzer_stats").exists():
        raise SystemExit(f"afl-fuzz failed on {name}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    stats = read_stats(out)
    crashes = sorted(p for p in (out / "crashes").iterdir() if p.name.startswith("id:"))
    first = min((p.stat().st_mtime for p in crashes), default=None)
    return AflRun(
        execs_per_sec=float(stats["execs_per_sec"]),
        execs_done=int(stats["execs_done"]),
        corpus_count=int(stats["corpus_count"]),
        crashes=len(crashes),
        timeouts=int(stats.get("total_tmout", "0")),
        first_crash_s=None if first is None else first - started,
        out=out,
        own_us=None if own_stats is None else fuzz.read_afl_stats(own_stats)[1],
    )


def corpus(out: Path) -> list[bytes]:
    return [p.read_bytes()[:MAX_LEN] for p in sorted((out / "queue").iterdir()) if p.is_file()]


def in_process_us(run_one: object, inputs: list[bytes], reps: int = 5) -> float:
    """Median over ``reps`` passes of µs per execution of ``run_one`` over ``inputs``
    (after one warm-up pass)."""
    assert callable(run_one)
    k = max(1, 2000 // len(inputs))
    for data in inputs:
        run_one(data)
    values = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            for data in inputs:
                run_one(data)
        values.append((time.perf_counter() - t0) / (k * len(inputs)) * 1e6)
    return statistics.median(values)


def fmt_s(value: float | None) -> str:
    return "no crash" if value is None else f"{value:.0f} s"


def afl_on_kvmpy(work: Path, name: str, duration: int) -> tuple[str, str, Path, AflRun]:
    """Runs afl-fuzz on the kvmpy harness of target ``name`` from its seeds: the ELF, the
    entry, the seeds directory and the run's result."""
    guest, entry, seeds = TARGETS[name]
    elf = str(kvmpy.shipped_guest(guest))
    seeds_dir = work / f"seeds_{name}"
    seeds_dir.mkdir()
    for i, seed in enumerate(seeds):
        (seeds_dir / f"seed{i}").write_bytes(seed)
    harness = work / f"kvmpy_{name}.py"
    harness.write_text(KVMPY_HARNESS.format(elf=elf, entry=entry, max_len=MAX_LEN))
    k = run_afl(
        work,
        f"kvmpy_{name}",
        seeds_dir,
        duration,
        [sys.executable, str(harness)],
        own_stats=work / f"kvmpy_{name}.stats",
    )
    return elf, entry, seeds_dir, k


def kvmpy_overhead(names: list[str], duration: int) -> None:
    """kvmpy alone: afl-fuzz on its harness, then its final corpus in one process (on the
    same CPU, with ``--pin``), through ``Target.run`` and through the bare
    ``FuzzExecutor.run`` that the fork server's child runs under afl-fuzz."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="afl_kvmpy.") as tmp:
        work = Path(tmp)
        for name in names:
            elf, entry, _, k = afl_on_kvmpy(work, name, duration)
            inputs = corpus(k.out)
            allowed = os.sched_getaffinity(0)
            _pin()  # on the CPU afl-fuzz ran on
            with fuzz.Target.from_elf(
                elf, entry=entry, max_len=MAX_LEN, timeout_ms=100, coverage="disasm"
            ) as t:
                k_in = in_process_us(t.run, inputs)
                ex_in = in_process_us(t._executor.run, inputs)
            os.sched_setaffinity(0, allowed)
            rows.append((name, len(inputs), k, k_in, ex_in))
    where = "all CPUs" if PIN is None else f"pinned to CPU {PIN}"
    print(f"\nkvmpy under afl-fuzz -V {duration} ({where}) against its corpus in one process:\n")
    print(
        "| target | execs/s | corpus | µs/exec afl-fuzz | µs/exec Target.run | overhead "
        "| µs/exec FuzzExecutor.run | overhead over it "
        "| µs/run in the harness, afl-fuzz's inputs | overhead over it |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k, k_in, ex_in in rows:
        own = k.own_us or 0.0
        print(
            f"| {name} | {k.execs_per_sec:.0f} | {n} | {k.us_per_exec:.1f} | {k_in:.1f} "
            f"| +{k.us_per_exec - k_in:.1f} | {ex_in:.1f} | +{k.us_per_exec - ex_in:.1f} "
            f"| {own:.1f} | +{k.us_per_exec - own:.1f} |"
        )


def compare(names: list[str], duration: int) -> None:
    why = unicorn_unavailable()
    if why is not None:
        raise SystemExit(why)
    rows = []
    overhead = []
    with tempfile.TemporaryDirectory(prefix="afl_compare.") as tmp:
        work = Path(tmp)
        for name in names:
            elf, entry, seeds_dir, k = afl_on_kvmpy(work, name, duration)
            unicorn = [sys.executable, "-m", "benchmarks.unicorn_fuzz", elf, entry]
            unicorn += ["--max-len", str(MAX_LEN), "--afl", "@@"]
            u = run_afl(work, f"unicorn_{name}", seeds_dir, duration, unicorn)
            rows.append((name, k, u))
            inputs = corpus(k.out)
            with fuzz.Target.from_elf(
                elf, entry=entry, max_len=MAX_LEN, timeout_ms=100, coverage="disasm"
            ) as t:
                k_in = in_process_us(t.run, inputs)
            u_in = in_process_us(UnicornTarget(elf, entry, MAX_LEN).run, inputs)
            overhead.append((name, len(inputs), k, k_in, u, u_in))
    print(f"\nafl-fuzz -V {duration}, same seeds, kvmpy then Unicorn + unicornafl:\n")
    print(
        "| target | kvmpy execs/s | unicornafl execs/s | kvmpy ÷ unicornafl "
        "| kvmpy execs (crashes, timeouts, corpus) | unicornafl execs (same) "
        "| first crash kvmpy | first crash unicornafl |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, k, u in rows:
        print(
            f"| {name} | {k.execs_per_sec:.0f} | {u.execs_per_sec:.0f} "
            f"| {k.execs_per_sec / u.execs_per_sec:.2f}× "
            f"| {k.execs_done} ({k.crashes}, {k.timeouts}, {k.corpus_count}) "
            f"| {u.execs_done} ({u.crashes}, {u.timeouts}, {u.corpus_count}) "
            f"| {fmt_s(k.first_crash_s)} | {fmt_s(u.first_crash_s)} |"
        )
    print("\nµs per execution under afl-fuzz against the same corpus run in one process:\n")
    print(
        "| target | corpus | kvmpy afl-fuzz | kvmpy Target.run | kvmpy overhead "
        "| kvmpy runs, afl-fuzz's inputs | kvmpy overhead over them "
        "| unicornafl | Unicorn in-process | unicornafl overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k, k_in, u, u_in in overhead:
        own = k.own_us or 0.0
        print(
            f"| {name} | {n} | {k.us_per_exec:.1f} | {k_in:.1f} | +{k.us_per_exec - k_in:.1f} "
            f"| {own:.1f} | +{k.us_per_exec - own:.1f} "
            f"| {u.us_per_exec:.1f} | {u_in:.1f} | +{u.us_per_exec - u_in:.1f} |"
        )


def afl_floor(duration: int) -> None:
    """afl-fuzz's own cost per execution here: ``benchmarks/afl_null.c``, a fork server
    that answers at once and runs nothing, under afl-fuzz for ``duration`` seconds."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("\n(no C compiler: afl-fuzz's floor not measured)")
        return
    with tempfile.TemporaryDirectory(prefix="afl_floor.") as tmp:
        work = Path(tmp)
        binary = work / "afl_null"
        source = Path(__file__).resolve().parent / "afl_null.c"
        subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
        seeds = work / "seeds"
        seeds.mkdir()
        (seeds / "seed0").write_bytes(TARGETS["parser"][2][0])
        run = run_afl(work, "null", seeds, duration, [str(binary)])
    print(
        f"\nafl-fuzz's floor (afl_null.c, -V {duration}): {run.execs_per_sec:.0f} execs/s, "
        f"{run.us_per_exec:.1f} µs per execution"
    )


# ------------------------------------------------------------------ pipe round trips


def _relay(up_r: int, up_w: int, down_w: int, down_r: int) -> None:
    """A fork server that relays every input: read the control word, tell the child to
    go, write the child's pid, read its answer, write the status."""
    while True:
        word = os.read(up_r, 4)
        if len(word) < 4:
            os._exit(0)
        os.write(down_w, struct.pack("<I", 0))
        os.write(up_w, struct.pack("<I", 1234))
        answer = os.read(down_r, 4)
        if len(answer) < 4:
            os._exit(0)
        os.write(up_w, struct.pack("<I", 0))


def _echo(r: int, w: int) -> None:
    while True:
        word = os.read(r, 4)
        if len(word) < 4:
            os._exit(0)
        os.write(w, word)


def _spawn(run: Callable[..., None], keep: tuple[int, ...], fds: list[int]) -> int:
    """Forks a process that keeps only ``keep`` of ``fds`` open and runs ``run(*keep)``."""
    pid = os.fork()
    if pid == 0:
        for fd in fds:
            if fd not in keep:
                os.close(fd)
        run(*keep)
        os._exit(0)
    return pid


def pipe_round_trips(n: int = 20000) -> None:
    """µs per round trip: afl-fuzz's side talking to a child directly, and through a
    relay process (all Python here)."""
    results = {}
    allowed = os.sched_getaffinity(0)
    _pin()
    for relayed in (False, True):
        a_r, b_w = os.pipe()  # towards "afl-fuzz"
        b_r, a_w = os.pipe()  # from "afl-fuzz"
        c_r, s_w = os.pipe()  # server -> child
        s_r, c_w = os.pipe()  # child -> server
        fds = [a_r, b_w, b_r, a_w, c_r, s_w, s_r, c_w]
        if relayed:
            pids = [
                _spawn(_echo, (c_r, c_w), fds),
                _spawn(_relay, (b_r, b_w, s_w, s_r), fds),
            ]
        else:
            pids = [_spawn(_echo, (b_r, b_w), fds)]
        for fd in (b_r, b_w, c_r, c_w, s_r, s_w):
            os.close(fd)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(a_w, b"\0\0\0\0")
            os.read(a_r, 4)
            if relayed:
                os.read(a_r, 4)
        results[relayed] = (time.perf_counter() - t0) / n * 1e6
        os.close(a_w)
        os.close(a_r)
        for pid in pids:
            os.waitpid(pid, 0)
    os.sched_setaffinity(0, allowed)
    where = "all CPUs" if PIN is None else f"CPU {PIN}"
    print(f"\n| pipe round trip (Python processes, {where}) | µs |")
    print("|---|---|")
    print(f"| direct: parent -> child -> parent | {results[False]:.1f} |")
    print(f"| relayed through a fork server | {results[True]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds per afl-fuzz run")
    parser.add_argument("--targets", default="parser,compute,decode")
    parser.add_argument(
        "--pin", type=int, metavar="CPU", help="run afl-fuzz and its targets on this CPU only"
    )
    parser.add_argument(
        "--floor-only", action="store_true", help="only afl-fuzz's floor and the pipe round trips"
    )
    parser.add_argument(
        "--kvmpy-only", action="store_true", help="kvmpy's side only (no Unicorn), and the floor"
    )
    args = parser.parse_args()
    global PIN
    PIN = args.pin
    if args.floor_only:
        afl_floor(min(args.duration, 20))
        pipe_round_trips()
        return
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise SystemExit(f"unknown targets {unknown}: choose from {', '.join(TARGETS)}")
    if args.kvmpy_only:
        kvmpy_overhead(names, args.duration)
        afl_floor(min(args.duration, 20))
        return
    compare(names, args.duration)
    afl_floor(min(args.duration, 20))
    pipe_round_trips()


if __name__ == "__main__":
    main()
