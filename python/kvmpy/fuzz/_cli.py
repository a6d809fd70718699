"""``python -m kvmpy.fuzz replay harness.py INPUT``, and ``fuzz.main(target)``."""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmpy.fuzz import _afl
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
    """A harness script's entry point: ``python harness.py INPUT...`` runs the inputs
    and prints their reports (``--out DIR`` saves the crashes, bucketed). Returns the
    exit status (0: every input ran clean).

    Started by afl-fuzz (``afl-fuzz -i IN -o OUT -- python harness.py [@@]``), it is
    an AFL++ fork server in persistent mode instead: each of its children builds the
    target with ``target.rebuild`` (set by ``Target.from_elf``), which needs coverage,
    and runs afl-fuzz's inputs in it (see ``kvmpy.fuzz._afl``)."""
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
    parser = argparse.ArgumentParser(description="Run inputs through a kvmpy fuzz target.")
    parser.add_argument("inputs", nargs="+", help="input files")
    parser.add_argument("--out", type=Path, help="save the crashes' buckets here")
    args = parser.parse_args(argv)
    return run_inputs(target, args.inputs, args.out, sys.argv[0] or None)


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
