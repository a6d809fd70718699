"""Memory regions: layout rules, access, the buffer protocol's lifetime, dirty logging."""

from __future__ import annotations

import gc

import pytest

import kvmpy

from .support import REAL_LOAD, real_mode_vm

pytestmark = pytest.mark.kvm


def test_region_attributes_and_access(vm: kvmpy.Vm) -> None:
    ram = vm.add_memory(0x100000, 0x20000)
    assert (ram.guest_addr, ram.size, ram.readonly, ram.dirty_log) == (
        0x100000,
        0x20000,
        False,
        False,
    )
    assert ram.attached and len(ram) == 0x20000
    assert isinstance(ram.slot, int)
    ram.write(0x10, b"hello")
    assert ram.read(0x10, 5) == b"hello"
    assert vm.read(0x100010, 5) == b"hello"
    ram.write(0x20, bytearray(b"ba"))
    ram.write(0x30, memoryview(b"mv"))
    assert ram.read(0x20, 2) == b"ba" and ram.read(0x30, 2) == b"mv"
    assert ram.read(0, 0) == b""
    assert "MemoryRegion(guest_addr=0x100000" in repr(ram)


def test_new_memory_reads_as_zero(vm: kvmpy.Vm) -> None:
    ram = vm.add_memory(0, 0x4000)
    assert ram.read(0, 0x4000) == bytes(0x4000)


@pytest.mark.parametrize(
    ("addr", "size", "match"),
    [
        (0, 0, "must not be zero"),
        (0, 0x1001, "page size"),
        (0x800, 0x1000, "page size"),
        (2**64 - 0x1000, 0x2000, "overflows"),
    ],
)
def test_bad_region_layouts(vm: kvmpy.Vm, addr: int, size: int, match: str) -> None:
    with pytest.raises(kvmpy.GuestMemoryError, match=match):
        vm.add_memory(addr, size)


def test_negative_arguments_are_rejected(vm: kvmpy.Vm) -> None:
    with pytest.raises(ValueError, match="outside the range"):
        vm.add_memory(-0x1000, 0x1000)


def test_overlapping_regions_are_rejected(vm: kvmpy.Vm) -> None:
    vm.add_memory(0x10000, 0x10000)
    for addr, size in [(0x10000, 0x1000), (0x8000, 0x9000), (0x1F000, 0x2000), (0, 0x100000)]:
        with pytest.raises(kvmpy.GuestMemoryError, match="overlaps"):
            vm.add_memory(addr, size)
    # Adjacent is fine.
    vm.add_memory(0x20000, 0x1000)
    vm.add_memory(0xF000, 0x1000)
    assert [r.guest_addr for r in vm.memory_regions] == [0xF000, 0x10000, 0x20000]


def test_region_accesses_out_of_bounds(vm: kvmpy.Vm) -> None:
    ram = vm.add_memory(0, 0x2000)
    with pytest.raises(kvmpy.GuestMemoryError, match="outside the region"):
        ram.read(0x1FFF, 2)
    with pytest.raises(kvmpy.GuestMemoryError, match="outside the region"):
        ram.write(0x2000, b"x")
    with pytest.raises(kvmpy.GuestMemoryError):
        ram.read(2**64 - 1, 2)
    with pytest.raises(TypeError, match="bytes-like"):
        ram.write(0, "text")  # type: ignore[arg-type]


def test_vm_access_spans_regions_but_not_holes(vm: kvmpy.Vm) -> None:
    vm.add_memory(0, 0x1000)
    vm.add_memory(0x1000, 0x1000)
    vm.add_memory(0x3000, 0x1000)
    vm.write(0xFFE, b"abcd")
    assert vm.read(0xFFE, 4) == b"abcd"
    with pytest.raises(kvmpy.GuestMemoryError, match="not entirely inside guest memory"):
        vm.read(0x1FFE, 4)  # runs into the hole at 0x2000
    with pytest.raises(kvmpy.GuestMemoryError):
        vm.write(0x5000, b"x")
    with pytest.raises(kvmpy.GuestMemoryError):
        vm.read(2**64 - 1, 8)
    with pytest.raises(kvmpy.GuestMemoryError):
        vm.read(0, 2**62)  # refused before anything is allocated


def test_memoryview_is_live_guest_memory(vm: kvmpy.Vm) -> None:
    ram = vm.add_memory(0, 0x1000)
    view = memoryview(ram)
    assert (view.nbytes, view.readonly, view.format) == (0x1000, False, "B")
    view[0:3] = b"xyz"
    assert ram.read(0, 3) == b"xyz"
    ram.write(8, b"\x07")
    assert view[8] == 7


def test_memoryview_stays_valid_after_close_and_new_views_raise() -> None:
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 0x4000)
    ram.write(0x100, b"kept")
    view = memoryview(ram)
    vm.close()
    assert not ram.attached
    # The old view still reads and writes the (still mapped) memory...
    assert view[0x100:0x104].tobytes() == b"kept"
    view[0] = 1
    # ...even when nothing else references the region.
    del ram
    gc.collect()
    assert view[0x100:0x104].tobytes() == b"kept"
    view.release()


def test_closed_region_refuses_access_and_new_views() -> None:
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 0x1000)
    vm.close()
    with pytest.raises(kvmpy.VmClosedError):
        ram.read(0, 1)
    with pytest.raises(kvmpy.VmClosedError):
        ram.write(0, b"x")
    with pytest.raises(BufferError):
        memoryview(ram)


def test_remove_memory(vm: kvmpy.Vm) -> None:
    ram = vm.add_memory(0, 0x1000)
    other = vm.add_memory(0x1000, 0x1000)
    view = memoryview(ram)
    vm.remove_memory(ram)
    assert not ram.attached and other.attached
    assert [r.guest_addr for r in vm.memory_regions] == [0x1000]
    with pytest.raises(kvmpy.GuestMemoryError, match="removed"):
        ram.read(0, 1)
    with pytest.raises(kvmpy.GuestMemoryError):
        vm.read(0, 1)
    with pytest.raises(kvmpy.GuestMemoryError, match="not part of this VM"):
        vm.remove_memory(ram)
    view[0] = 5  # still valid
    # The slot and the address range can be reused.
    again = vm.add_memory(0, 0x2000 - 0x1000)
    assert again.read(0, 1) == b"\0"


def test_region_of_another_vm_is_rejected(vm: kvmpy.Vm) -> None:
    with kvmpy.Vm() as other:
        ram = other.add_memory(0, 0x1000)
        with pytest.raises(kvmpy.GuestMemoryError, match="another VM"):
            vm.remove_memory(ram)


def test_guest_sees_host_writes_and_host_sees_guest_writes() -> None:
    # mov byte [0x2000], 0x5a ; mov al, [0x2001] ; out 0x10, al ; hlt
    code = bytes([0xC6, 0x06, 0x00, 0x20, 0x5A, 0xA0, 0x01, 0x20, 0xE6, 0x10, 0xF4])
    vm, cpu = real_mode_vm(code)
    with vm:
        ram = vm.memory_regions[0]
        ram.write(0x2001, b"\x33")
        seen: list[int] = []
        vm.on_io(0x10, lambda e: seen.append(e.value))
        assert cpu.run(timeout=10).reason == "hlt"
        assert seen == [0x33]
        assert ram.read(0x2000, 1) == b"\x5a"


def test_readonly_region_turns_guest_writes_into_mmio_exits() -> None:
    # mov byte [0x2000], 0x77 ; hlt    (0x2000 is in a read-only region)
    code = bytes([0xC6, 0x06, 0x00, 0x20, 0x77, 0xF4])
    with kvmpy.Vm() as vm:
        low = vm.add_memory(0, 0x2000)
        low.write(REAL_LOAD, code)
        rom = vm.add_memory(0x2000, 0x1000, readonly=True)
        rom.write(0, b"\x11")
        assert rom.readonly
        cpu = vm.create_vcpu()
        cpu.setup_real_mode(ip=REAL_LOAD)
        exit = cpu.run(timeout=10)
        assert exit.reason == "mmio"
        assert isinstance(exit, kvmpy.MmioExit)
        assert (exit.address, exit.size, exit.is_write, exit.data) == (0x2000, 1, True, b"\x77")
        assert rom.read(0, 1) == b"\x11"  # unchanged
        assert cpu.run(timeout=10).reason == "hlt"


def test_dirty_pages_reports_guest_writes() -> None:
    # mov byte [0x3000], 1 ; mov byte [0x5000], 1 ; hlt
    code = bytes([0xC6, 0x06, 0x00, 0x30, 0x01, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4])
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, 0x10000, dirty_log=True)
        ram.write(REAL_LOAD, code)
        assert ram.dirty_log
        cpu = vm.create_vcpu()
        cpu.setup_real_mode(ip=REAL_LOAD)
        ram.dirty_pages()  # reset
        assert cpu.run(timeout=10).reason == "hlt"
        dirty = ram.dirty_pages()
        assert {0x3000, 0x5000} <= set(dirty)
        assert ram.dirty_pages() == []  # reading resets the log
    with kvmpy.Vm() as vm:
        plain = vm.add_memory(0, 0x1000)
        with pytest.raises(kvmpy.GuestMemoryError, match="dirty_log"):
            plain.dirty_pages()


def test_many_regions_use_distinct_slots(vm: kvmpy.Vm) -> None:
    regions = [vm.add_memory(i * 0x1000, 0x1000) for i in range(40)]
    assert len({r.slot for r in regions}) == 40
