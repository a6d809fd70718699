"""``python -m kvmpy.fuzz replay harness.py INPUT``, and ``fuzz.main(target)``."""

from __future__ import annotations

import argparse
import runpy
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmpy.fuzz import _afl
from kvmpy.fuzz._fuzzer import Fuzzer, StatusLine, read_corpus
from kvmpy.fuzz._target import Target
from kvmpy.fuzz._triage import Triage

HARNESS_NAME = "__kvmpy_fuzz_harness__"
"""``__name__`` while ``replay`` loads a harness: its ``if __name__ == "__main__"`` part
does not run."""


def load_harness(path: str) -> Target:
    """Runs the harness script at ``path`` and returns the :class:`Target` it defines (a
    global named ``target``, or its only global ``Target``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no harness script {path}")
    scope = runpy.run_path(path, run_name=HARNESS_NAME)
    if isinstance(scope.get("target"), Target):
        return scope["target"]  # type: ignore[no-any-return]
    found = [v for v in scope.values() if isinstance(v, Target)]
    if len(found) != 1:
        raise ValueError(
            f"{path} must define one kvmpy.fuzz.Target (a global named `target`), "
            f"found {len(found)}"
        )
    return found[0]


def run_inputs(target: Target, paths: Sequence[str], out: Path | None, harness: str | None) -> int:
    """Runs each input file once and prints its outcome's report; with ``out``, saves the
    crashes' buckets there. Exit status: 0 if every input ran clean, 1 otherwise."""
    triage = Triage()
    for p in paths:
        data = Path(p).read_bytes()
        outcome = target.run(data)
        triage.add(data, outcome)
        print(f"{p}: {outcome.report()}", end="")
    if out is not None and triage.buckets:
        triage.save(out, harness)
    return 1 if triage.buckets else 0


def main(target: Target, argv: Sequence[str] | None = None) -> int:
    """A harness script's entry point.

    - ``python harness.py INPUT...`` runs the inputs and prints their reports (``--out
      DIR`` saves the crashes, bucketed); exit status 0 if every input ran clean.
    - ``python harness.py [--corpus DIR] [--out DIR] [--duration S] [--executions N]
      [--jobs N] [--seed N]`` fuzzes (in-process, coverage-guided, until a limit or
      Ctrl-C) with a live status line; crashes go to ``DIR/crashes/<bucket>/`` (input,
      report, a one-line reproducer). ``--jobs N`` runs N worker processes, each with its
      own VM, sharing their corpus through ``DIR/queue``. Exit status: 0, or 1 if a
      crash was found, 2 for bad arguments.

    Started by afl-fuzz (``afl-fuzz -i IN -o OUT -- python harness.py [@@]``), it is
    an AFL++ fork server in persistent mode instead: each of its children builds the
    target with ``target.rebuild`` (set by ``Target.from_elf``), which needs coverage,
    and answers afl-fuzz's inputs itself, in a loop in Rust (see ``kvmpy.fuzz._afl``).
    Keep afl-fuzz and the harness on one CPU (afl-fuzz's own binding, its default, or
    ``-b CPU``, or ``taskset``): a hand-off between CPUs can cost more than the input.
    """
    if _afl.under_afl():
        if target.rebuild is None:
            print(
                "kvmpy.fuzz: under afl-fuzz each fork-server child builds its own VM: build "
                "the target with Target.from_elf, or set target.rebuild to a function that "
                "builds it",
                file=sys.stderr,
            )
            return 2
        words = list(sys.argv[1:] if argv is None else argv)
        return _afl.serve(target.rebuild, [w for w in words if not w.startswith("-")])
    parser = argparse.ArgumentParser(
        description="Fuzz a kvmpy fuzz target, or run inputs through it (given INPUT files)."
    )
    parser.add_argument("inputs", nargs="*", help="input files to run (no fuzzing)")
    parser.add_argument("--out", type=Path, help="findings directory (crashes, queue)")
    parser.add_argument("--corpus", type=Path, help="a directory of seed inputs")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--executions", type=int, help="stop after this many inputs")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    harness = sys.argv[0] or None
    if args.inputs:
        return run_inputs(target, args.inputs, args.out, harness)
    try:
        return _fuzz(target, args, harness)
    except (OSError, ValueError) as e:
        print(f"kvmpy.fuzz: {e}", file=sys.stderr)
        return 2


def _fuzz(target: Target, args: argparse.Namespace, harness: str | None) -> int:
    for name in ("duration", "executions"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be above 0, got {value}")
    if not 1 <= args.jobs <= 256:
        raise ValueError(f"--jobs must be from 1 to 256, got {args.jobs}")
    seeds = read_corpus(args.corpus) if args.corpus is not None else []
    if args.jobs > 1 and args.out is None:
        raise ValueError("--jobs needs --out: the workers share their corpus there")
    sync = None if args.out is None else args.out / "queue"
    workers: list[subprocess.Popen[bytes]] = []
    if args.worker == 0 and args.jobs > 1:
        if harness is None:
            raise ValueError("--jobs needs the harness script's path (sys.argv[0])")
        for k in range(1, args.jobs):
            cmd = [sys.executable, harness, "--out", str(args.out), "--seed", str(args.seed + k)]
            cmd += ["--worker", str(k), "--jobs", str(args.jobs)]
            if args.corpus is not None:
                cmd += ["--corpus", str(args.corpus)]
            for name in ("duration", "executions"):
                if getattr(args, name) is not None:
                    cmd += [f"--{name}", str(getattr(args, name))]
            workers.append(subprocess.Popen(cmd))
    fuzzer = Fuzzer(
        target,
        seeds=seeds,
        out=args.out,
        seed=args.seed,
        sync_dir=sync,
        worker=f"w{args.worker}",
        harness=harness,
    )
    line = StatusLine(
        f"[w{args.worker}] " if args.jobs > 1 else "",
        target.coverage_blocks or None,
        every=5.0 if args.worker == 0 else 30.0,
    )
    try:
        stats = fuzzer.run(
            executions=args.executions,
            duration=args.duration,
            status=line,
            status_every=1.0,
        )
    except KeyboardInterrupt:
        for w in workers:
            w.send_signal(signal.SIGINT)
        for w in workers:
            w.wait()
        print(file=sys.stderr)
        print(fuzzer.triage.report(), end="", file=sys.stderr)
        return 130
    line.done(stats)
    failed = sum(w.wait() not in (0, 1) for w in workers)
    print(fuzzer.triage.report(), end="", file=sys.stderr)
    if failed:
        print(f"kvmpy.fuzz: {failed} worker(s) failed", file=sys.stderr)
        return 2
    found = bool(fuzzer.triage.buckets)
    if args.out is not None and (args.out / "crashes").is_dir():
        found = found or any((args.out / "crashes").iterdir())
    return 1 if found else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m kvmpy.fuzz``."""
    parser = argparse.ArgumentParser(prog="python -m kvmpy.fuzz")
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="run inputs through a harness and print reports")
    replay.add_argument("harness", help="the harness script (defines a kvmpy.fuzz.Target)")
    replay.add_argument("inputs", nargs="+", help="input files")
    args = parser.parse_args(argv)
    try:
        target = load_harness(args.harness)
        for p in args.inputs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"no input file {p}")
    except (OSError, ValueError) as e:
        print(f"kvmpy.fuzz: {e}", file=sys.stderr)
        return 2
    with target:
        return run_inputs(target, args.inputs, None, args.harness)
