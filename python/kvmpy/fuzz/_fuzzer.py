"""The in-process fuzzer: LibAFL's mutations and corpus over a :class:`Target`, the loop
in Rust with the GIL released; crashes triaged and saved as they are found."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from kvmpy.fuzz._target import Target
from kvmpy.fuzz._triage import Bucket, Triage, _write_atomic


@dataclass(frozen=True)
class FuzzStats:
    """Where a campaign stands (``Fuzzer.run`` returns the last one; a ``status``
    callback gets one about every ``status_every`` seconds)."""

    executions: int
    """Inputs run, seeds included."""
    corpus: int
    """Inputs kept because they covered something new."""
    blocks_covered: int
    crash_buckets: int
    """Distinct crashes, by (kind, vector, rip), that this campaign found."""
    crashes: int
    """Crashing executions."""
    timeouts: int
    last_new_coverage: int
    """The execution count when the corpus last grew."""
    imported: int
    """Inputs read from other workers (``sync_dir``)."""
    seconds: float

    @property
    def execs_per_second(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0

    def line(self, blocks_total: int | None = None) -> str:
        """One status line: execs/s, corpus, blocks, crashes (unique), timeouts, and
        when coverage last grew."""
        blocks = f"{self.blocks_covered}"
        if blocks_total:
            blocks += f"/{blocks_total}"
        return (
            f"{self.executions:,} execs ({self.execs_per_second:,.0f}/s)  corpus {self.corpus}  "
            f"blocks {blocks}  crashes {self.crash_buckets} ({self.crashes})  "
            f"timeouts {self.timeouts}  last new at {self.last_new_coverage:,}"
        )

    @classmethod
    def _from(cls, d: dict[str, float]) -> FuzzStats:
        return cls(**{f.name: d[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def read_corpus(directory: str | os.PathLike[str]) -> list[bytes]:
    """The files of a seed directory, sorted by name (hidden files left out). Raises
    ``FileNotFoundError``/``NotADirectoryError``/``PermissionError`` naming the path."""
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"the corpus directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"the corpus {root} is not a directory")
    seeds = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            seeds.append(p.read_bytes())
        except OSError as e:
            raise PermissionError(f"cannot read the corpus file {p}: {e.strerror}") from e
    return seeds


class Fuzzer:
    """Coverage-guided fuzzing of ``target`` in this process: LibAFL's havoc mutations,
    a queue of the inputs that covered new blocks, and the target's coverage map as
    feedback (give the target coverage: ``Target.from_elf(..., coverage="disasm")``;
    without it the fuzzer only mutates the seeds blindly).

    Every crash is re-run once through ``target.run`` for its full report, added to
    :attr:`triage`, and with ``out`` saved at once in ``out/crashes/<bucket>/``
    (``input``, ``report.txt``, ``repro.txt``), each file whole or not at all. A bucket
    directory another worker wrote keeps the smaller input. ``seed`` fixes the random
    choices: the same seed, seeds and target give the same campaign. ``sync_dir`` and
    ``worker`` share the corpus with other processes (see ``--jobs`` of
    :func:`kvmpy.fuzz.main`).
    """

    def __init__(
        self,
        target: Target,
        *,
        seeds: Iterable[bytes] = (),
        out: str | os.PathLike[str] | None = None,
        seed: int = 0,
        sync_dir: str | os.PathLike[str] | None = None,
        worker: str = "w0",
        harness: str | None = None,
    ) -> None:
        self.target = target
        self.seeds = [bytes(s)[: target.max_len] for s in seeds]
        self.out = None if out is None else Path(out)
        self.seed = seed
        self.sync_dir = None if sync_dir is None else Path(sync_dir)
        self.worker = worker
        self.harness = harness
        self.triage = Triage()

    def _found(self, data: bytes) -> None:
        outcome = self.target.run(data)
        new = self.triage.add(data, outcome)
        if self.out is None or not outcome.is_crash:
            return
        bucket = self.triage.buckets[outcome.bucket]
        if new or bucket.data == data:
            _save_bucket(self.out / "crashes", bucket, self.harness)

    def run(
        self,
        *,
        executions: int | None = None,
        duration: float | None = None,
        status: Callable[[FuzzStats], bool | None] | None = None,
        status_every: float = 1.0,
    ) -> FuzzStats:
        """Fuzzes until ``executions`` inputs ran or ``duration`` seconds passed (or,
        with neither, until ``status`` returns False or Ctrl-C); returns the final stats.
        ``status`` is called about every ``status_every`` seconds."""

        def on_status(d: dict[str, float]) -> bool | None:
            return None if status is None else status(FuzzStats._from(d))

        if self.sync_dir is not None:
            self.sync_dir.mkdir(parents=True, exist_ok=True)
        final = self.target._executor.fuzz(
            self.seeds,
            seed=self.seed,
            executions=executions,
            duration=duration,
            sync_dir=self.sync_dir,
            worker=self.worker,
            on_crash=self._found,
            on_timeout=self._found,
            on_status=on_status if status is not None else None,
            status_every=status_every,
        )
        return FuzzStats._from(final)


def _save_bucket(root: Path, bucket: Bucket, harness: str | None) -> None:
    """Writes ``root/<bucket>/``: a new bucket appears whole (its files are written in a
    hidden directory renamed into place), a known one has each file replaced whole."""
    d = root / bucket.name
    report = bucket.outcome.report().encode()
    repro = None
    if harness is not None:
        repro = f"python -m kvmpy.fuzz replay {harness} {d / 'input'}\n".encode()
    if not d.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{bucket.name}."))
        _write_bucket(tmp, report, repro, bucket.data)
        try:
            os.rename(tmp, d)
            return
        except OSError:  # another worker made it meanwhile: update theirs below
            shutil.rmtree(tmp, ignore_errors=True)
    existing = d / "input"
    try:
        if existing.stat().st_size <= len(bucket.data) and existing.read_bytes() != bucket.data:
            return  # another worker's input for this bucket is as small
    except FileNotFoundError:
        pass
    _write_bucket(d, report, repro, bucket.data)


def _write_bucket(d: Path, report: bytes, repro: bytes | None, data: bytes) -> None:
    # The report first: a bucket's `input` is there only once its report is.
    _write_atomic(d / "report.txt", report)
    if repro is not None:
        _write_atomic(d / "repro.txt", repro)
    _write_atomic(d / "input", data)


class StatusLine:
    """Prints a status line to stderr: rewritten in place on a terminal, a new line
    every ``every`` seconds otherwise."""

    def __init__(self, prefix: str, blocks_total: int | None, every: float = 5.0) -> None:
        self.prefix = prefix
        self.blocks_total = blocks_total
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = 0.0

    def __call__(self, stats: FuzzStats) -> None:
        text = f"{self.prefix}{stats.line(self.blocks_total)}"
        if self.tty:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def done(self, stats: FuzzStats) -> None:
        end = "\n" if self.tty else ""
        print(f"{end}{self.prefix}{stats.line(self.blocks_total)}", file=sys.stderr, flush=True)
