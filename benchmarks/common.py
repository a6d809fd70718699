"""Shared pieces of the benchmark runner: guests, the C baseline, statistics, the machine."""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root."""
GUESTS_DIR = ROOT / "guests"
GUEST_BUILD = GUESTS_DIR / "build"
RAW_KVM_SOURCE = Path(__file__).resolve().parent / "raw_kvm.c"

# The guests' conventions (see guests/counter64.S and guests/compute64.S).
LOAD_ADDR = 0x10000
DEVICE_PORT = 0x11
EXIT_PORT = 0xF4
GUEST_RAM = 2 << 20


class BenchError(RuntimeError):
    """A benchmark could not run (missing tool, failed build, wrong guest result)."""


# ---------------------------------------------------------------------------- guests


def guest_path(name: str) -> Path:
    """The flat binary ``guests/build/NAME.bin``, building the guests first if it is missing."""
    path = GUEST_BUILD / f"{name}.bin"
    if not path.exists():
        if shutil.which("make") is None:
            raise BenchError(f"{path} is missing and `make` is not installed to build it")
        print(f"building the guests: make -C {GUESTS_DIR}", file=sys.stderr)
        proc = subprocess.run(
            ["make", "-C", str(GUESTS_DIR)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not path.exists():
            raise BenchError(
                f"`make -C {GUESTS_DIR}` failed (it needs GNU as and ld):\n"
                f"{proc.stdout}{proc.stderr}"
            )
    return path


def guest_bytes(name: str) -> bytes:
    """The bytes of guest ``NAME`` (see :func:`guest_path`)."""
    return guest_path(name).read_bytes()


# ---------------------------------------------------------------------------- raw C


def find_cc() -> str:
    """The C compiler ``cc``; fails if it is not on PATH."""
    cc = shutil.which("cc")
    if cc is None:
        raise BenchError(
            "no C compiler: `cc` is not on PATH. The raw-KVM baseline (benchmarks/raw_kvm.c) "
            "needs one; install gcc or clang."
        )
    return cc


def compile_raw_kvm(out_dir: Path) -> Path:
    """Compiles ``raw_kvm.c`` with ``cc -O2`` into ``out_dir``; returns the executable."""
    cc = find_cc()
    exe = out_dir / "raw_kvm"
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(RAW_KVM_SOURCE), "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"compiling the C baseline failed: {' '.join(cmd)}\n{proc.stderr}")
    return exe


@dataclass(frozen=True)
class RawKvm:
    """The compiled C baseline; each call runs it once and returns its JSON answer."""

    exe: Path

    def __call__(self, *args: object) -> dict[str, Any]:
        """Runs ``raw_kvm ARGS...``; fails with its stderr if it does not succeed."""
        cmd = [str(self.exe), *(str(a) for a in args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


class RawServer:
    """A ``raw_kvm`` server process (``raw_kvm MODE ARGS...``) that keeps its VM for many
    requests: a line in, a JSON line out."""

    def __init__(self, raw: RawKvm, mode: str, *args: object) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [str(raw.exe), mode, *(str(a) for a in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ask(self, request: str) -> dict[str, Any]:
        """Sends one request line; returns the server's JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{request}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise BenchError(f"raw_kvm {self.mode} failed: {err.strip()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        """Ends the server process."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class ExitServer(RawServer):
    """``raw_kvm serve``: the C baseline's counter64 VM, kept for many runs."""

    def __init__(self, raw: RawKvm, guest: Path) -> None:
        super().__init__(raw, "serve", guest)

    def __call__(self, n: int) -> float:
        """Seconds the C run loop took for ``n`` device exits (n + 1 exits in all)."""
        answer = self.ask(f"{n}")
        if answer["exits"] != n + 1:
            raise BenchError(f"raw_kvm serve: {answer['exits']} exits for N={n}")
        return float(answer["seconds"])


def cc_version() -> str:
    """The first line of ``cc --version``."""
    try:
        out = subprocess.run(["cc", "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """The median and spread of one series of repetitions."""

    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarizes ``values`` (at least one)."""
        if not values:
            raise ValueError("no values to summarize")
        if len(values) >= 2:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        else:
            q1 = q3 = values[0]
        return cls(len(values), statistics.median(values), min(values), max(values), q1, q3)

    def as_dict(self) -> dict[str, float]:
        """The summary as a JSON-friendly dict."""
        return {
            "n": self.n,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
        }


def interleave(
    variants: dict[str, Callable[[], float]], reps: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Runs every variant once per repetition, alternating their order each repetition so
    that drift on a noisy machine hits all of them alike. ``warmup`` rounds are discarded.
    Returns each variant's values in repetition order (so they pair up by index)."""
    keys = list(variants)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(warmup + reps):
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            value = variants[k]()
            if r >= warmup:
                out[k].append(value)
    return out


# ---------------------------------------------------------------------------- machine


def process_mappings() -> int:
    """How many memory mappings (VMAs) this process has."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        return sum(1 for _ in f)


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def has_debug_info(path: str) -> bool | None:
    """Whether the ELF file at ``path`` has a ``.debug_info`` section (a debug build of the
    extension; release builds of kvmpy have none). None if it cannot be read."""
    try:
        data = Path(path).read_bytes()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            return None
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        strtab_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
        for i in range(shnum):
            name_off = struct.unpack_from("<I", data, shoff + i * shentsize)[0]
            start = strtab_off + name_off
            name = data[start : data.index(b"\0", start)]
            if name == b".debug_info":
                return True
        return False
    except (OSError, ValueError, struct.error, IndexError):
        return None


def machine_info() -> dict[str, Any]:
    """A description of this machine and the software measured."""
    import kvmpy
    import kvmpy._native as native

    flags = _cpuinfo_field("flags").split()
    debug = has_debug_info(native.__file__)
    info = subprocess.run(
        [sys.executable, "-m", "kvmpy", "info"], capture_output=True, text=True, check=False
    )
    try:
        unicorn_version: str | None = str(importlib.import_module("unicorn").__version__)
    except ImportError:
        unicorn_version = None
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "git": git.stdout.strip() or None,
        "cpu": _cpuinfo_field("model name") or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "nested": "hypervisor" in flags,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kvmpy": kvmpy.__version__,
        "kvmpy_build": {True: "debug", False: "release", None: "unknown"}[debug]
        + (", PGO" if native.PGO else ""),
        "kvmpy_native": native.__file__,
        "unicorn": unicorn_version,
        "cc": cc_version(),
        "kvmpy_info": (info.stdout + info.stderr).strip(),
    }
