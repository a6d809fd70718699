"""Cache lines touched on every exit, counted under valgrind (not timed).

Each exit leaves the host's caches cold, so what a run loop touches per exit sets much
of its cost (BENCHMARKS.md, "What an exit costs is what it touches"). Timings move by
±0.05 µs/exit from run to run on a shared machine; this count does not move, so it shows
the effect of a change to the exit path that a timing cannot resolve.

    python -m benchmarks.exit_lines [--variants cloop,cext,rust,python] [--jobs 2]

For each variant it runs counter64 twice under ``valgrind --tool=lackey --trace-mem=yes``
(ASLR off, ``PYTHONHASHSEED=0``), with ``--short`` and ``--long`` exits, counts the
accesses to every 64-byte line (``exit_lines.c``), and reports the lines whose access
count grew by at least 0.9 per extra exit: the lines every exit touches, and the 4 KiB
pages they lie on (where the host flushes the TLB on every exit, each page costs a page
walk as well). Variants:

- ``cloop``: raw C's loop inside the Python process (the C extension, no Python call);
- ``cext``: the C-extension floor (GIL released around ``KVM_RUN``, a Python call);
- ``rust``: kvmpy with a Rust device (a console);
- ``python``: kvmpy with a Python handler that does nothing.

Each trace takes a few minutes; two run at a time by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from benchmarks import cext_cases, kvmpy_cases
from benchmarks.common import BenchError, find_cc, guest_bytes, guest_path

COUNTER_SOURCE = Path(__file__).resolve().parent / "exit_lines.c"
VARIANTS = ("cloop", "cext", "rust", "python")


def child(variant: str, n: int, cext_dir: str) -> None:
    """Runs counter64 with ``n`` device exits once (after 10 to warm up), set up as the
    exit figure sets it up."""
    exits: kvmpy_cases.Exits | cext_cases.Exits
    if variant in ("rust", "python"):
        exits = kvmpy_cases.Exits(guest_bytes("counter64"), python=variant == "python")
    else:
        module = cext_cases.load(Path(cext_dir))
        exits = cext_cases.Exits(module, guest_path("counter64"), python=variant == "cext")
    for k in (10, n):
        exits(k)
    exits.close()


def trace(counter: Path, variant: str, n: int, cext_dir: Path) -> dict[tuple[str, int], int]:
    """Access counts per (kind, line address) of one child run under lackey."""
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [
        "setarch",
        "-R",
        "valgrind",
        "--tool=lackey",
        "--trace-mem=yes",
        f"--log-fd={write_end}",
        sys.executable,
        "-m",
        "benchmarks.exit_lines",
        "--child",
        variant,
        str(n),
        str(cext_dir),
    ]
    with tempfile.TemporaryFile("w+") as out:
        count = subprocess.Popen([str(counter)], stdin=read_end, stdout=out)
        os.close(read_end)
        try:
            run = subprocess.run(
                cmd,
                pass_fds=(write_end,),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
                env=env,
            )
        finally:
            os.close(write_end)
            count.wait()
        if run.returncode != 0:
            raise BenchError(f"{variant} N={n} under valgrind failed:\n{run.stderr[-2000:]}")
        out.seek(0)
        counts = {}
        for row in out:
            kind, addr, hits = row.split()
            counts[(kind, int(addr, 16))] = int(hits)
    return counts


def per_exit(
    short: dict[tuple[str, int], int], long: dict[tuple[str, int], int], extra: int
) -> tuple[int, int, int, int]:
    """(code lines, data lines, code pages, data pages) whose access count grew by ≥ 0.9
    per extra exit: a page counts when any of its lines does."""
    lines = [k for k, v in long.items() if v - short.get(k, 0) >= 0.9 * extra]
    code = {addr for kind, addr in lines if kind == "I"}
    data = {addr for kind, addr in lines if kind != "I"}
    return (
        len(code),
        len(data),
        len({addr >> 12 for addr in code}),
        len({addr >> 12 for addr in data}),
    )


@contextmanager
def built(out_dir: Path, cext: bool) -> Iterator[Path]:
    """The line counter and, with ``cext``, the C extension, compiled into ``out_dir``."""
    counter = out_dir / "exit_lines"
    proc = subprocess.run(
        [find_cc(), "-O2", "-o", str(counter), str(COUNTER_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"compiling {COUNTER_SOURCE.name} failed:\n{proc.stderr}")
    if cext:
        cext_cases.build(out_dir)
    yield counter


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.exit_lines", description=__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--short", type=int, default=1_000, help="exits of the first run")
    p.add_argument("--long", type=int, default=11_000, help="exits of the second run")
    p.add_argument("--jobs", type=int, default=2, help="traces at a time")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    missing = [t for t in ("valgrind", "setarch") if shutil.which(t) is None]
    if unknown or missing or not 0 < args.short < args.long or args.jobs < 1:
        why = f"unknown variants {sorted(unknown)}" if unknown else f"{missing} not installed"
        if not (unknown or missing):
            why = "need 0 < --short < --long and --jobs >= 1"
        print(f"benchmarks.exit_lines: {why}", file=sys.stderr)
        return 2
    cext = bool({"cloop", "cext"} & set(variants))
    if cext and cext_cases.unavailable():
        print(f"benchmarks.exit_lines: {cext_cases.unavailable()}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory() as tmp, built(Path(tmp), cext) as counter:
            jobs = [(v, n) for v in variants for n in (args.short, args.long)]
            with ThreadPoolExecutor(args.jobs) as pool:
                found = pool.map(lambda j: trace(counter, j[0], j[1], Path(tmp)), jobs)
                traces = dict(zip(jobs, found, strict=True))
    except BenchError as e:
        print(f"benchmarks.exit_lines: {e}", file=sys.stderr)
        return 1
    extra = args.long - args.short
    print("| variant | code lines | data lines | lines per exit | code pages | data pages |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        code, data, code_pages, data_pages = per_exit(
            traces[(v, args.short)], traces[(v, args.long)], extra
        )
        print(f"| {v} | {code} | {data} | {code + data} | {code_pages} | {data_pages} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
