"""A fast restore's FPU/SSE state, loaded by kvmpy's restore stub in the guest: the state
the guest starts with equals the snapshot's on every reset, the stub is never seen (RIP,
RAX, RDX, flags, breakpoints, steps, stops), and every case the stub cannot serve falls
back to ``KVM_SET_XSAVE`` with the same result."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import kvmpy

pytestmark = pytest.mark.kvm

DATA = 0x21000  # fpu64.S: XMM0..15's values, then two MXCSR values
AREA = 0x30000  # fpu64.S: where `record` stores its FXSAVE area
RECORD = 0x100A8  # fpu64.S: the `record` label, where the first exit leaves RIP
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(256))
MXCSR = 0x1F80 | 0x6000  # round toward zero
STUB_GPA = 0x7F_FFF0_0000


@contextmanager
def fpu_vm(
    guest_dir: Path, **mode: object
) -> Iterator[tuple[kvmpy.Vm, kvmpy.Vcpu, kvmpy.Snapshot]]:
    """fpu64.S run to its first exit (a known FPU state loaded), snapshot taken there."""
    with kvmpy.Vm() as vm:
        mem = vm.add_memory(0, 2 << 20)
        mem.write(0x10000, (guest_dir / "fpu64.bin").read_bytes())
        mem.write(DATA, PATTERN + struct.pack("<II", MXCSR, 0x1F80))
        vm.add_exit_port(0xF4)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True, **mode)  # type: ignore[arg-type]
        cpu.set_regs(rip=0x10000, rdx=0x2222, rbx=0x3333)
        assert cpu.run(timeout=10).reason == "exit"
        cpu.set_regs(rax=0x1111)
        snap = vm.snapshot()
        yield vm, cpu, snap


def check_recorded(vm: kvmpy.Vm) -> None:
    """The FXSAVE area `record` stored holds the state _start loaded."""
    area = vm.read(AREA, 512)
    assert area[160 : 160 + 256] == PATTERN  # XMM0..15
    assert struct.unpack_from("<I", area, 24)[0] == MXCSR
    # x87: three registers pushed (TOP = 5), FCW at its reset value 0x37f.
    assert (struct.unpack_from("<H", area, 2)[0] >> 11) & 7 == 5
    assert struct.unpack_from("<H", area, 0)[0] == 0x37F


def run_record(vm: kvmpy.Vm, cpu: kvmpy.Vcpu, snap: kvmpy.Snapshot) -> None:
    assert cpu.run(timeout=10).reason == "exit"
    check_recorded(vm)
    vm.restore(snap)


def test_the_stub_puts_the_snapshot_fpu_state_back_on_every_reset(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        before = cpu.stats()["stub_loads"]
        for _ in range(40):
            run_record(vm, cpu, snap)
        assert cpu.stats()["stub_loads"] == before + 39  # all but the run before any restore
        assert cpu.stats()["full_restores"] == 0


def test_registers_show_the_snapshot_never_the_stub(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        flags = cpu.regs.rflags
        for _ in range(5):
            assert cpu.run(timeout=10).reason == "exit"
            vm.restore(snap)
            r = cpu.regs  # before the run: the snapshot's registers
            assert (r.rip, r.rax, r.rdx, r.rbx, r.rflags) == (RECORD, 0x1111, 0x2222, 0x3333, flags)
            assert cpu.run(timeout=10).reason == "exit"
            r = cpu.regs  # the stub ran first: RAX, RDX and the flags are the snapshot's
            assert (r.rax, r.rdx, r.rbx, r.rflags) == (0x1111, 0x2222, 0x3333, flags)
            check_recorded(vm)
            vm.restore(snap)


def test_registers_set_after_a_restore_are_the_ones_the_run_starts_with(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        cpu.set_regs(rdx=0x4444)
        assert cpu.run(timeout=10).reason == "exit"
        assert cpu.regs.rdx == 0x4444
        check_recorded(vm)


def test_a_stop_before_the_stub_ran_leaves_the_snapshot_state(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        cpu.stop()
        assert cpu.run(timeout=10).reason == "stopped"
        assert (cpu.regs.rip, cpu.regs.rax, cpu.regs.rdx) == (RECORD, 0x1111, 0x2222)
        loads = cpu.stats()["stub_loads"]
        run_record(vm, cpu, snap)  # the image is still pending: this run loads it
        assert cpu.stats()["stub_loads"] == loads + 1
        run_record(vm, cpu, snap)


def test_a_breakpoint_at_the_snapshot_rip_is_stepped_over_as_without_the_stub(
    guest_dir: Path,
) -> None:
    with fpu_vm(guest_dir, exceptions=True) as (vm, cpu, snap):
        cpu.add_breakpoint(RECORD)
        vm.restore(snap)
        loads = cpu.stats()["stub_loads"]
        for _ in range(3):
            # A run from where a restore put the vCPU steps over a breakpoint there.
            assert cpu.run(timeout=10).reason == "exit"
            check_recorded(vm)
            vm.restore(snap)
        assert cpu.stats()["stub_loads"] == loads  # the step needs KVM_SET_XSAVE


def test_a_breakpoint_after_the_snapshot_rip_is_hit_after_the_stub(guest_dir: Path) -> None:
    with fpu_vm(guest_dir, exceptions=True) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        cpu.add_breakpoint(RECORD + 9)
        loads = cpu.stats()["stub_loads"]
        for _ in range(3):
            e = cpu.run(timeout=10)
            assert e.reason == "breakpoint" and cpu.regs.rip == RECORD + 9
            assert (cpu.regs.rax, cpu.regs.rdx) == (0x1111, 0x2222)
            check_recorded(vm)
            vm.restore(snap)
        # The first run came through the stub; a restore from a breakpoint stop is a full
        # restore (KVM_SET_XSAVE with the rest of the state), so the others did not.
        assert cpu.stats()["stub_loads"] == loads + 1


def test_single_steps_after_a_restore_see_the_snapshot_rip(guest_dir: Path) -> None:
    with fpu_vm(guest_dir, exceptions=True) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        loads = cpu.stats()["stub_loads"]
        assert cpu.step() == RECORD + 9  # fxsave64 [0x30000] is 9 bytes
        check_recorded(vm)
        assert cpu.stats()["stub_loads"] == loads  # KVM_SET_XSAVE instead
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(snap)
        run_record(vm, cpu, snap)


def test_host_state_changes_after_a_restore_fall_back(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        loads = cpu.stats()["stub_loads"]
        cpu.set_sregs(cr4=cpu.sregs.cr4)  # the host wrote special registers: no stub
        run_record(vm, cpu, snap)
        assert cpu.stats()["stub_loads"] == loads


def test_a_fuzzing_address_space_maps_the_stub_read_only(guest_dir: Path) -> None:
    user_map = [(0x10000, 0x1000, "rx"), (0x21000, 0x1000, "r"), (0x30000, 0x1000, "rw")]
    with fpu_vm(guest_dir, user_map=user_map) as (vm, cpu, snap):
        for _ in range(5):
            run_record(vm, cpu, snap)
        assert cpu.stats()["stub_loads"] == 4  # all but the run before any restore
        # PDPT entry 511: the stub's page directory, user, read-only, Accessed preset.
        assert struct.unpack("<Q", vm.read(0x9000 + 511 * 8, 8))[0] == STUB_GPA | 0x25


def test_snapshots_and_reads_never_hold_stub_bytes(guest_dir: Path, tmp_path: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        tables = vm.read(0x1000, 0xA000)
        for _ in range(3):
            run_record(vm, cpu, snap)
        assert vm.read(0x1000, 0xA000) == tables
        with pytest.raises(kvmpy.GuestMemoryError):
            vm.read(STUB_GPA, 8)
        # The one trace in the tables: PDPT entry 511 maps the stub's page directory.
        assert struct.unpack_from("<Q", tables, 0x8000 + 511 * 8)[0] == STUB_GPA | 0x25
        path = tmp_path / "snap.kvmpy"
        snap.save(path)
        with kvmpy.Vm.from_snapshot(kvmpy.Snapshot.load(path)) as vm2:
            vm2.add_exit_port(0xF4)
            cpu2 = vm2.vcpus[0]
            snap2 = vm2.snapshot()
            for _ in range(3):
                run_record(vm2, cpu2, snap2)
            assert cpu2.stats()["stub_loads"] == 2


def test_guest_memory_cannot_cover_the_stub(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, _cpu, _snap):
        with pytest.raises(kvmpy.GuestMemoryError, match="FPU restore stub"):
            vm.add_memory(STUB_GPA, 0x1000)


def test_vcpus_without_a_stub_page_restore_the_fpu_with_the_ioctl(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, _snap):
        # vCPU ids 0..15 have stub pages; this one (sharing cpu's tables) falls back.
        other = vm.create_vcpu(16)
        s = cpu.sregs
        other.set_sregs(
            cs=s.cs,
            ss=s.ss,
            ds=s.ds,
            tr=s.tr,
            gdt=s.gdt,
            idt=s.idt,
            cr0=s.cr0,
            cr3=s.cr3,
            cr4=s.cr4,
            efer=s.efer,
        )
        other.set_regs(rip=0x10000, rflags=cpu.regs.rflags)
        assert other.run(timeout=10).reason == "exit"
        snap = vm.snapshot()
        for _ in range(3):
            run_record(vm, other, snap)
        assert other.stats()["stub_loads"] == 0


# vbroadcastss ymm0, [0x21000]; out 0xf4, al
# record: vextractf128 [0x30000], ymm0, 1; vpcmpeqd ymm0, ymm0, ymm0; out 0xf4, al
AVX_CODE = bytes.fromhex("c4e27d18042500100200e6f4c4e37d1904250000030001c5fd76c0e6f4")
XSETBV_CODE = bytes.fromhex("31c9b80700000031d20f01d1e6f4")  # XCR0 = x87|SSE|AVX; out
CR4_OSXSAVE = 1 << 18


def avx_vm(vm: kvmpy.Vm) -> kvmpy.Vcpu:
    mem = vm.add_memory(0, 2 << 20)
    mem.write(0x10000, AVX_CODE)
    mem.write(0x18000, XSETBV_CODE)
    mem.write(DATA, struct.pack("<I", 0x11223344))
    vm.add_exit_port(0xF4)
    return vm.create_vcpu()


def check_ymm_resets(vm: kvmpy.Vm, cpu: kvmpy.Vcpu) -> None:
    """From the first exit: YMM0's upper half as the snapshot had it on every reset."""
    snap = vm.snapshot()
    loads = cpu.stats()["stub_loads"]
    for _ in range(10):
        assert cpu.run(timeout=10).reason == "exit"
        assert vm.read(AREA, 16) == struct.pack("<I", 0x11223344) * 4
        vm.restore(snap)
    assert cpu.stats()["stub_loads"] == loads + 9


def test_avx_state_with_osxsave_goes_back_through_xrstor() -> None:
    with kvmpy.Vm() as vm:
        cpu = avx_vm(vm)
        cpu.setup_long_mode(user=False)  # XCR0 is set at ring 0
        cpu.set_sregs(cr4=cpu.sregs.cr4 | CR4_OSXSAVE)
        cpu.set_regs(rip=0x18000)
        assert cpu.run(timeout=10).reason == "exit"
        cpu.setup_long_mode(user=True)
        cpu.set_sregs(cr4=cpu.sregs.cr4 | CR4_OSXSAVE)
        cpu.set_regs(rip=0x10000)
        assert cpu.run(timeout=10).reason == "exit"
        check_ymm_resets(vm, cpu)


def test_avx_state_without_osxsave_goes_back_where_the_host_lets_cpl3_use_avx() -> None:
    with kvmpy.Vm() as vm:
        cpu = avx_vm(vm)
        cpu.setup_long_mode(user=True, exceptions=True)
        cpu.set_regs(rip=0x10000)
        e = cpu.run(timeout=10)
        if e.reason == "exception":
            assert e.name == "#UD"  # hardware: AVX needs CR4.OSXSAVE; fxrstor64 suffices
            return
        # A nested PVM-style host runs CPL3 code under its own CR4: AVX works, and the
        # stub loads it with xrstor64.
        assert e.reason == "exit"
        check_ymm_resets(vm, cpu)


def test_tables_changed_after_a_restore_fall_back(guest_dir: Path) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        run_record(vm, cpu, snap)
        loads = cpu.stats()["stub_loads"]
        vm.write(0x9000 + 511 * 8, bytes(8))  # PDPT entry 511 no longer maps the stub
        run_record(vm, cpu, snap)  # KVM_SET_XSAVE; the restore puts the entry back
        assert cpu.stats()["stub_loads"] == loads
        run_record(vm, cpu, snap)
        assert cpu.stats()["stub_loads"] == loads + 1


def test_a_snapshot_taken_right_after_a_restore_holds_the_restored_fpu_state(
    guest_dir: Path,
) -> None:
    with fpu_vm(guest_dir) as (vm, cpu, snap):
        run_record(vm, cpu, snap)  # the restore leaves the FPU image for the next run
        again = vm.snapshot()  # which the capture puts back first
        for _ in range(3):
            run_record(vm, cpu, again)
