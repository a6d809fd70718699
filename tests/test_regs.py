"""Registers and special registers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kvmpy

from .support import DEV_OUT, EXIT_PORT, LONG_LOAD, user_mode_vm

Guest = Callable[[str], bytes]

pytestmark = pytest.mark.kvm


def test_regs_round_trip(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    cpu.set_regs(rax=1, rbx=2, r15=2**64 - 1, rip=0x1234, rflags=2)
    r = cpu.regs
    assert (r.rax, r.rbx, r.r15, r.rip, r.rflags) == (1, 2, 2**64 - 1, 0x1234, 2)
    r.rcx = 99
    cpu.regs = r
    assert cpu.regs == r
    assert cpu.regs.as_dict()["rcx"] == 99
    assert "rip=0x1234" in repr(r)


def test_set_regs_leaves_other_registers_alone(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    cpu.set_regs(rax=5, rdx=6)
    cpu.set_regs(rax=7)
    assert (cpu.regs.rax, cpu.regs.rdx) == (7, 6)


def test_negative_values_are_twos_complement(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    cpu.set_regs(rax=-1)
    assert cpu.regs.rax == 2**64 - 1


def test_bad_register_values(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    with pytest.raises(TypeError, match="unknown register .eax."):
        cpu.set_regs(eax=1)
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        cpu.set_regs(rax=2**64)
    with pytest.raises(TypeError, match="rax must be an int"):
        cpu.set_regs(rax="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cpu.regs = "regs"  # type: ignore[assignment]
    assert kvmpy.Regs(rax=3).rax == 3


def test_sregs_round_trip(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    s = cpu.sregs
    # The reset state: real mode at the reset vector.
    assert s.cs.selector == 0xF000 and s.cr0 & 1 == 0
    cs = kvmpy.Segment(base=0x10000, selector=0x1000, type=0xB, limit=0xFFFF)
    cpu.set_sregs(cs=cs, cr3=0x5000, gdt=kvmpy.DTable(0x500, 0x37))
    s = cpu.sregs
    assert s.cs == cs
    assert s.cr3 == 0x5000
    assert (s.gdt.base, s.gdt.limit) == (0x500, 0x37)
    s.cr2 = 0xDEAD
    cpu.sregs = s
    assert cpu.sregs.cr2 == 0xDEAD
    assert "Sregs(cr0=" in repr(s)


def test_bad_sregs(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    with pytest.raises(TypeError, match="unknown special register"):
        cpu.set_sregs(cr5=1)
    with pytest.raises(TypeError, match="cs must be a kvmpy.Segment"):
        cpu.set_sregs(cs=0)
    with pytest.raises(TypeError, match="gdt must be a kvmpy.DTable"):
        cpu.set_sregs(gdt=kvmpy.Segment())
    # KVM itself rejects some states; that surfaces as KvmError with errno.
    with pytest.raises(kvmpy.KvmError) as info:
        cpu.set_sregs(cr0=0x80000000)  # paging without protected mode
    assert info.value.errno is not None


def test_long_mode_helper_sets_a_consistent_state(vm: kvmpy.Vm) -> None:
    vm.add_memory(0, 2 << 20)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    s = cpu.sregs
    assert s.efer & 0x500 == 0x500 and s.cr0 & 0x80000001 == 0x80000001
    assert (s.cs.l, s.cs.dpl, s.ss.dpl, s.cs.selector) == (1, 3, 3, 0x1B)
    assert s.cr3 == 0x8000 and s.tr.base == 0x2000
    assert s.idt.limit == 0  # no exception stubs unless asked for
    assert cpu.regs.rflags == 0x3002
    pml4 = vm.read(0x8000, 8)
    assert int.from_bytes(pml4, "little") & ~0xFFF == 0x9000
    cpu.setup_long_mode(user=False, tables_addr=0x100000, map_gib=4, exceptions=True)
    s = cpu.sregs
    assert s.cs.dpl == 0 and s.cr3 == 0x107000
    assert (s.idt.base, s.idt.limit) == (0x104000, 0xFFF)


def test_long_mode_helper_bad_inputs(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    with pytest.raises(kvmpy.GuestMemoryError):
        cpu.setup_long_mode()  # no RAM for the tables
    vm.add_memory(0, 0x10000)
    with pytest.raises(ValueError, match="page aligned"):
        cpu.setup_long_mode(tables_addr=0x1001)
    with pytest.raises(ValueError, match="1 to 512 GiB"):
        cpu.setup_long_mode(map_gib=0)
    with pytest.raises(kvmpy.GuestMemoryError):
        cpu.setup_long_mode(tables_addr=0x8000)  # tables run past the end of RAM
    assert vm.read(0x8000, 16) == bytes(16)  # and nothing was written


def test_registers_set_between_runs_reach_the_guest(guest: Guest) -> None:
    """After the first run registers live in kvm_run (KVM_CAP_SYNC_REGS where the host
    has it); what is written there between runs is what the guest starts with."""
    vm, cpu = user_mode_vm(guest("counter64"), rdi=5)
    with vm:
        console = vm.add_console(DEV_OUT)
        vm.add_exit_port(EXIT_PORT)
        assert cpu.run(timeout=10).reason == "exit"
        assert console.take() == bytes(range(5))
        for n in (3, 0, 7):
            cpu.set_regs(rip=LONG_LOAD, rdi=n)
            assert (cpu.regs.rip, cpu.regs.rdi) == (LONG_LOAD, n)
            assert cpu.run(timeout=10).reason == "exit"
            assert console.take() == bytes(range(n))
        # Whole-object assignment and the mode helpers take the same path.
        r = cpu.regs
        r.rip, r.rdi = LONG_LOAD, 2
        cpu.regs = r
        cpu.setup_long_mode(user=True)  # rewrites RFLAGS, keeps RIP/RDI
        assert (cpu.regs.rip, cpu.regs.rdi, cpu.regs.rflags) == (LONG_LOAD, 2, 0x3002)
        assert cpu.run(timeout=10).reason == "exit"
        assert console.take() == bytes(range(2))
