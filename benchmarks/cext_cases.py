"""The C-extension floor for a Python-handler exit (``cext_exit.c``).

The runner compiles ``cext_exit.c`` into a temporary directory with ``cc -O2 -shared -fPIC``
against this interpreter's headers and loads it from there. Its run loop releases the GIL
around each ``KVM_RUN`` and calls a Python handler with an int and a bytes object per exit:
the least any binding that hands exits to Python must do.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

from benchmarks.common import BenchError, find_cc

SOURCE = Path(__file__).resolve().parent / "cext_exit.c"
MODULE = "cext_exit"


def _include_dir() -> Path:
    return Path(sysconfig.get_paths()["include"])


def unavailable() -> str | None:
    """Why the extension cannot be built here (no Python headers), or None."""
    header = _include_dir() / "Python.h"
    if not header.exists():
        return f"{header} is missing (install the Python development headers)"
    return None


def _lib(out_dir: Path) -> Path:
    return out_dir / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def build(out_dir: Path) -> ModuleType:
    """Compiles ``cext_exit.c`` into ``out_dir`` and imports it from there."""
    lib = _lib(out_dir)
    cmd = [
        find_cc(),
        "-O2",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        f"-I{_include_dir()}",
        "-o",
        str(lib),
        str(SOURCE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"compiling the C extension failed: {' '.join(cmd)}\n{proc.stderr}")
    return load(out_dir)


def load(out_dir: Path) -> ModuleType:
    """Imports the extension ``build`` compiled into ``out_dir``."""
    lib = _lib(out_dir)
    spec = importlib.util.spec_from_file_location(MODULE, lib)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load the C extension {lib}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ignore(port: int, data: bytes) -> None:
    """A Python handler that does nothing: what remains is the cost of calling it."""


class Exits:
    """counter64 on one VM of the C extension, kept for many runs; every device OUT is
    handed to a Python handler that does nothing or, without ``python``, to nothing at
    all (raw C's loop, run inside this Python process)."""

    def __init__(self, module: ModuleType, guest: Path, *, python: bool = True) -> None:
        self.exits = module.Exits(str(guest))
        self.handler = _ignore if python else None

    def __call__(self, n: int) -> float:
        """Seconds for one run with ``n`` device exits (n + 1 exits in all), timed in C
        around the run loop as ``raw_kvm serve`` times its own."""
        seconds, exits, calls, wrong = self.exits.run(n, self.handler)
        if exits != n + 1 or calls != n or wrong:
            raise BenchError(
                f"C extension counter64 N={n}: {exits} exits, {calls} handler calls, "
                f"{wrong} OUTs with unexpected data"
            )
        return float(seconds)

    def close(self) -> None:
        """Closes the VM."""
        self.exits.close()
