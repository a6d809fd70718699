"""Shared fixtures: KVM availability, guest binaries, VM helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kvmpy

from .support import GUESTS

_AVAILABLE = kvmpy.available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``kvm`` skip only when /dev/kvm cannot be used; with
    KVMPY_REQUIRE_KVM=1 (set by CI) that is an error instead of a skip."""
    if _AVAILABLE:
        return
    if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
        raise pytest.UsageError(f"KVMPY_REQUIRE_KVM=1 but KVM is unavailable: {_AVAILABLE.reason}")
    skip = pytest.mark.skip(reason=f"KVM unavailable: {_AVAILABLE.reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm")


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """Builds the guests from source once per session."""
    subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    return GUESTS / "build"


@pytest.fixture(scope="session")
def guest(guest_dir: Path) -> Callable[[str], bytes]:
    """``guest("hello_real")`` -> the flat binary built from guests/hello_real.S."""

    def load(name: str) -> bytes:
        return (guest_dir / f"{name}.bin").read_bytes()

    return load


@pytest.fixture
def vm() -> Iterator[kvmpy.Vm]:
    with kvmpy.Vm() as v:
        yield v
