"""The guest SDK: a freestanding C runtime for 64-bit user-mode guests, shipped inside the
package, and the compiler command that uses it (``python -m kvmpy cc``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-m64",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-fno-pie",
    "-no-pie",
    "-fno-pic",
    "-mcmodel=small",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-ffunction-sections",
    "-fdata-sections",
)
"""The compiler flags of a guest (the repository's ``guests/c/Makefile`` uses the same)."""

LDFLAGS: tuple[str, ...] = (
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
    "-Wl,--orphan-handling=error",
    "-Wl,-z,noexecstack",
    "-Wl,-n",
)
"""The linker flags of a guest, besides ``-T guest.ld``."""

SHIPPED_GUESTS: dict[str, str] = {
    "hello_real.bin": "16-bit real mode, load at 0x1000: prints a greeting and halts",
    "hello64.bin": "64-bit user mode, load at 0x10000: prints a greeting, runs RDI loop steps",
    "snapshot64.bin": "64-bit user mode, load at 0x10000: a fuzzing-style target (its input "
    "at 0x20000 picks: write RDI pages and exit, spin, fault)",
    "multiboot_hello.elf": "a Multiboot v1 kernel: prints its command line over a 16550 UART",
    "fuzz_parser.elf": "a fuzz target, parse(data, len): a record parser with three planted "
    "bugs (guests/c/fuzz_parser.c)",
    "fuzz_compute.elf": "a compute-heavy fuzz target, hash(data, len): over 1e5 instructions "
    "per input (guests/c/fuzz_compute.c)",
    "fuzz_decode.elf": "a compute-heavy fuzz target whose work is loads, stores and branches, "
    "decode(data, len): about 2e6 instructions per input (guests/c/fuzz_decode.c)",
}
"""The prebuilt guests in the package (``shipped_guest(name)``), with what they do."""


class CompileError(Exception):
    """The guest could not be compiled: no compiler, or the compiler reported errors."""


def guest_sdk() -> Path:
    """The directory of the guest SDK: ``kvmpy_guest.h`` (console, exit, host calls),
    ``crt0.S`` (entry point) and ``guest.ld`` (link script: load and entry at 0x100000).

    For a Makefile: ``SDK := $(shell python -c 'import kvmpy; print(kvmpy.guest_sdk())')``.
    """
    return Path(str(resources.files("kvmpy").joinpath("sdk")))


def shipped_guest(name: str) -> Path:
    """The path of a prebuilt guest shipped with kvmpy (see ``SHIPPED_GUESTS``):
    ``kvmpy.shipped_guest("multiboot_hello.elf")``."""
    if name not in SHIPPED_GUESTS:
        raise ValueError(f"no shipped guest {name!r}; there are: {', '.join(SHIPPED_GUESTS)}")
    return Path(str(resources.files("kvmpy").joinpath("guests", name)))


def compile_command(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    extra: Sequence[str] = (),
    cc: str | None = None,
) -> list[str]:
    """The compiler command line that builds ``sources`` (C or assembler) into the guest
    ELF ``output``; ``extra`` flags (``-DNAME``, ``-O0``, ...) come after the SDK's."""
    sdk = guest_sdk()
    compiler = cc or os.environ.get("CC") or "gcc"
    return [
        compiler,
        *CFLAGS,
        f"-I{sdk}",
        "-T",
        str(sdk / "guest.ld"),
        *LDFLAGS,
        *extra,
        "-o",
        str(output),
        str(sdk / "crt0.S"),
        *(str(s) for s in sources),
    ]


def compile_guest(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    extra: Sequence[str] = (),
    cc: str | None = None,
) -> Path:
    """Compiles a freestanding 64-bit user-mode guest with the SDK (gcc and binutils are
    all it needs) and returns the path of the ELF, ready for ``vm.load_elf`` or
    ``python -m kvmpy run``. Raises ``CompileError`` with the compiler's messages."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    cmd = compile_command(sources, output, extra, cc)
    if shutil.which(cmd[0]) is None:
        raise CompileError(
            f"compiler {cmd[0]!r} not found: install gcc and binutils "
            "(Debian/Ubuntu: apt install gcc binutils) or set CC"
        )
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(done.stderr.strip() or f"{cmd[0]} failed with status {done.returncode}")
    return Path(output)


__all__ = [
    "CFLAGS",
    "LDFLAGS",
    "SHIPPED_GUESTS",
    "CompileError",
    "compile_command",
    "compile_guest",
    "guest_sdk",
    "shipped_guest",
]
