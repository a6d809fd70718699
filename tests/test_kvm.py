"""The host's KVM: availability, capabilities, CPUID."""

from __future__ import annotations

import pytest

import kvmpy

pytestmark = pytest.mark.kvm


def test_available_says_yes_with_a_reason() -> None:
    a = kvmpy.available()
    assert a
    assert a.ok is True
    assert "12" in a.reason


def test_api_version_and_limits() -> None:
    kvm = kvmpy.Kvm()
    assert kvm.api_version == kvmpy.KVM_API_VERSION == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert 1 <= kvm.recommended_vcpus <= kvm.max_vcpus
    assert kvm.max_memslots >= 32


def test_check_extension_by_name_and_number() -> None:
    kvm = kvmpy.Kvm()
    # Every x86 KVM since 2.6.x has user memory; KVM_CAP_USER_MEMORY is 3.
    assert kvm.check_extension("user_memory") > 0
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == kvm.check_extension(3)
    assert kvm.check_extension("nr_memslots") == kvm.max_memslots


def test_check_extension_rejects_unknown_names_and_types() -> None:
    kvm = kvmpy.Kvm()
    with pytest.raises(ValueError, match="unknown KVM capability"):
        kvm.check_extension("warp_drive")
    with pytest.raises(TypeError):
        kvm.check_extension(1.5)  # type: ignore[arg-type]
    # An unknown number is simply unsupported.
    assert kvm.check_extension(100000) == 0


def test_capabilities_lists_named_capabilities() -> None:
    caps = kvmpy.Kvm().capabilities()
    assert caps["user_memory"] > 0
    assert caps["immediate_exit"] > 0  # kvmpy's timeouts rely on it
    assert all(isinstance(v, int) and v >= 0 for v in caps.values())


def test_supported_cpuid_has_the_basic_leaves() -> None:
    entries = kvmpy.Kvm().supported_cpuid()
    functions = {e.function for e in entries}
    assert {0, 1, 0x80000000, 0x80000001} <= functions
    ext = next(e for e in entries if e.function == 0x80000001)
    assert ext.edx & (1 << 29), "long mode must be supported"
    assert "CpuidEntry(function=0x0" in repr(entries[0])
