"""Crash triage: bucket outcomes, keep each bucket's smallest input, write reports."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmpy.fuzz._target import Outcome


@dataclass
class Bucket:
    """One bug: the smallest input seen for it, its outcome and how often it was hit."""

    outcome: Outcome
    data: bytes
    hits: int = 1

    @property
    def name(self) -> str:
        """A directory name: ``crash-v14-0x100044``, ``timeout``, ``unmapped-0x100230``."""
        kind, vector, rip = self.outcome.bucket
        parts = [kind]
        if vector is not None:
            parts.append(f"v{vector}")
        if rip is not None:
            parts.append(f"{rip:#x}")
        return "-".join(parts)


class Triage:
    """Collects the outcomes that are not ``"ok"``, bucketed by ``(kind, vector, rip)``;
    each bucket keeps its smallest input (the first one seen among equals)."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, int | None, int | None], Bucket] = {}

    def add(self, data: bytes, outcome: Outcome) -> bool:
        """Records one input's outcome; True if it opened a new bucket."""
        if not outcome.is_crash:
            return False
        key = outcome.bucket
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = Bucket(outcome, bytes(data))
            return True
        bucket.hits += 1
        if len(data) < len(bucket.data):
            bucket.data, bucket.outcome = bytes(data), outcome
        return False

    def report(self) -> str:
        """A text report: one paragraph per bucket, most hit first."""
        if not self.buckets:
            return "no crashes\n"
        out = []
        for b in sorted(self.buckets.values(), key=lambda b: (-b.hits, b.name)):
            out.append(f"[{b.name}] {b.hits} input(s), smallest {len(b.data)} byte(s)")
            out.append(b.outcome.report())
        return "\n".join(out)

    def save(self, directory: str | os.PathLike[str], harness: str | None = None) -> list[Path]:
        """Writes ``directory/<bucket>/input`` and ``report.txt`` for each bucket (and,
        given the harness script's path, ``repro.txt`` with the replay command). Each file
        is written whole or not at all (a temporary file renamed into place)."""
        root = Path(directory)
        written = []
        for b in self.buckets.values():
            d = root / b.name
            d.mkdir(parents=True, exist_ok=True)
            _write_atomic(d / "input", b.data)
            _write_atomic(d / "report.txt", b.outcome.report().encode())
            if harness is not None:
                cmd = f"python -m kvmpy.fuzz replay {harness} {d / 'input'}\n"
                _write_atomic(d / "repro.txt", cmd.encode())
            written.append(d)
        return written


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
