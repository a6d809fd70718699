"""`python -m kvmpy`, the shipped demo guests, and the README's examples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvmpy
import kvmpy.sdk
from kvmpy.__main__ import lcg

from .support import GUESTS, ROOT


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.kvm
def test_demo_runs_both_guests() -> None:
    proc = run_module("demo", "--iterations", "123457")
    assert proc.returncode == 0, proc.stderr
    assert "Hello from a KVM guest!" in proc.stdout
    assert "Hello from 64-bit user mode!" in proc.stdout
    assert f"result {lcg(123457):#018x}" in proc.stdout
    assert "matches" in proc.stdout


@pytest.mark.kvm
def test_info_describes_kvm_and_ends_with_a_verdict() -> None:
    proc = run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert "KVM API version: 12" in proc.stdout
    assert re.search(r"capabilities: .*user_memory", proc.stdout)
    last = proc.stdout.splitlines()[-1]
    assert re.fullmatch(
        r"verdict: KVM usable; (nested software KVM: 64-bit user-mode code runs natively .*"
        r"ring-0 code is emulated .*|(nested )?hardware virtualization: every CPU mode runs "
        r"natively .*)",
        last,
    ), last


def test_info_names_the_build() -> None:
    import kvmpy._native as native

    assert isinstance(native.PGO, bool)
    first = run_module("info").stdout.splitlines()[0]
    suffix = " (profile-optimised build)" if native.PGO else ""
    assert first == f"kvmpy {kvmpy.__version__}{suffix}"


def test_bad_command_line() -> None:
    assert run_module().returncode == 2
    assert run_module("demo", "--iterations", "-1").returncode == 2
    assert run_module("demo", "--iterations", "1.5").returncode == 2
    assert run_module("demo", "--bogus").returncode == 2


def test_version_is_cargos() -> None:
    cargo = re.search(r'^version = "(.+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert cargo is not None
    assert kvmpy.__version__ == cargo.group(1)
    proc = run_module("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"kvmpy {cargo.group(1)}"


@pytest.mark.parametrize("args", [[], ["run"], ["cc"], ["demo"]])
def test_help_is_plain_text(args: list[str]) -> None:
    proc = run_module(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m kvmpy" in proc.stdout
    assert "``" not in proc.stdout and ":class:" not in proc.stdout and ":meth:" not in proc.stdout


@pytest.mark.kvm
def test_demo_accepts_the_iterations_its_help_shows() -> None:
    proc = run_module("demo", "--iterations", "1e3")
    assert proc.returncode == 0, proc.stderr
    assert f"result {lcg(1000):#018x}" in proc.stdout
    assert "(default 1e8)" in run_module("demo", "--help").stdout


def test_lcg_jump_ahead_matches_the_plain_loop() -> None:
    x = 0
    for i in range(200):
        assert lcg(i) == x
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64


def nm_names(elf: Path) -> list[str]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[-1] for line in out.splitlines())


def test_shipped_guests_match_their_sources(guest_dir: Path) -> None:
    shipped = ROOT / "python" / "kvmpy" / "guests"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == sorted(kvmpy.sdk.SHIPPED_GUESTS)
    for name in names:
        built = guest_dir / name
        if not built.exists():
            # A C guest: its bytes depend on the compiler's version, its symbols do not.
            built = GUESTS / "c" / "build" / name
            assert nm_names(shipped / name) == nm_names(built), (
                f"{name} is stale: run `make -C guests install`"
            )
            continue
        assert (shipped / name).read_bytes() == built.read_bytes(), (
            f"{name} is stale: run `make -C guests install`"
        )
    assert (GUESTS / "Makefile").exists()
