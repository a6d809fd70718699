"""The guest SDK shipped in the package and `python -m kvmpy cc`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kvmpy
import kvmpy.sdk

from .support import GUESTS

GUEST_C = r"""
#include "kvmpy_guest.h"

int main(uint64_t a, uint64_t b)
{
    kvmpy_puts("sum ");
    kvmpy_print_dec(kvmpy_hostcall2(1, a, b));
    kvmpy_putc('\n');
    return 3;
}
"""


def cc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "cc", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_the_sdk_ships_in_the_package() -> None:
    sdk = kvmpy.guest_sdk()
    assert sorted(p.name for p in sdk.iterdir() if p.suffix) == [
        "crt0.S",
        "guest.ld",
        "kvmpy_guest.h",
    ]
    assert sdk.parent == Path(kvmpy.__file__).parent
    assert "kvmpy_hostcall6" in (sdk / "kvmpy_guest.h").read_text()


@pytest.mark.kvm
def test_cc_builds_a_guest_that_runs(tmp_path: Path) -> None:
    (tmp_path / "guest.c").write_text(GUEST_C)
    done = cc("guest.c", "-o", "guest.elf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        image = vm.load_elf(tmp_path / "guest.elf")
        assert image.entry == 0x100000 and "main" in image.symbols
        console = vm.add_console(0x3F8)
        vm.add_exit_port(0xF4)
        vm.host_function(1, lambda a, b: a + b)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True, exceptions=True)
        cpu.set_regs(rip=image.entry, rdi=40, rsi=2)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit), exit
        assert (exit.code, console.output()) == (3, b"sum 42\n")


def test_cc_defaults_the_output_name_and_passes_flags_on(tmp_path: Path) -> None:
    (tmp_path / "guest.c").write_text(GUEST_C.replace("return 3;", "return VALUE;"))
    done = cc("guest.c", "-DVALUE=5", "-O0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "guest.elf").read_bytes()[:4] == b"\x7fELF"


def test_cc_reports_compiler_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.c").write_text("int main(void) { return undefined; }\n")
    done = cc("bad.c", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("kvmpy cc: ") and "undefined" in done.stderr
    assert "Traceback" not in done.stderr
    done = cc("bad.c", "--cc", "no-such-compiler", cwd=tmp_path)
    assert done.returncode == 1
    assert "compiler 'no-such-compiler' not found: install gcc and binutils" in done.stderr
    with pytest.raises(kvmpy.CompileError, match="undefined"):
        kvmpy.compile_guest(tmp_path / "bad.c", tmp_path / "bad.elf")


def test_cc_builds_what_the_repository_makefile_builds(tmp_path: Path, guest_dir: Path) -> None:
    built = GUESTS / "c" / "build"
    for name in ("hello", "checksum", "crash"):
        elf = kvmpy.compile_guest(GUESTS / "c" / f"{name}.c", tmp_path / f"{name}.elf")
        flat = tmp_path / f"{name}.bin"
        subprocess.run(["objcopy", "-O", "binary", str(elf), str(flat)], check=True)
        assert flat.read_bytes() == (built / f"{name}.bin").read_bytes(), name


def test_shipped_guests() -> None:
    for name in kvmpy.sdk.SHIPPED_GUESTS:
        assert kvmpy.shipped_guest(name).is_file()
    with pytest.raises(ValueError, match="no shipped guest 'nope'; there are: hello_real.bin"):
        kvmpy.shipped_guest("nope")
