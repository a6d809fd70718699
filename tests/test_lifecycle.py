"""Closing, context managers, garbage collection and leaks."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

import kvmpy

from .support import (
    CONSOLE,
    DEV_OUT,
    EXIT_PORT,
    MARK,
    MARK_AND_SPIN,
    once_guests_run,
    open_fds,
    real_mode_vm,
    user_mode_vm,
)

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]


def test_closed_vm_refuses_everything() -> None:
    vm = kvmpy.Vm()
    cpu = vm.create_vcpu()
    vm.close()
    vm.close()  # idempotent
    assert vm.closed
    for call in (
        lambda: vm.add_memory(0, 0x1000),
        lambda: vm.create_vcpu(),
        lambda: vm.read(0, 1),
        lambda: vm.write(0, b"x"),
        lambda: vm.on_io(0x10, lambda e: None),
        lambda: vm.add_console(),
        lambda: cpu.run(),
        lambda: cpu.regs,
        lambda: cpu.set_regs(rax=1),
        lambda: cpu.sregs,
    ):
        with pytest.raises(kvmpy.VmClosedError):
            call()
    assert "closed" in repr(vm)


def test_context_manager_closes_and_propagates() -> None:
    with pytest.raises(RuntimeError, match="inside"):
        with kvmpy.Vm() as vm:
            raise RuntimeError("inside")
    assert vm.closed


def test_close_releases_every_fd() -> None:
    gc.collect()
    before = open_fds()
    vms = []
    cpus = []
    for _ in range(5):
        vm = kvmpy.Vm()
        vm.add_memory(0, 0x10000)
        cpus += [vm.create_vcpu(), vm.create_vcpu()]
        vms.append(vm)
    assert open_fds() == before + 15  # a VM fd and two vCPU fds each
    for vm in vms:
        vm.close()
    # Closed even though the Vcpu objects are still referenced.
    assert open_fds() == before
    assert all(v.closed for v in vms) and len(cpus) == 10


def test_dropping_objects_without_close_releases_fds(guest: Guest) -> None:
    gc.collect()
    before = open_fds()
    for _ in range(20):
        vm, cpu = real_mode_vm(guest("hello_real"))
        # A handler that refers to its own VM makes a reference cycle through Rust.
        vm.on_io(CONSOLE, lambda e, vm=vm: None)
        assert cpu.run(timeout=10).reason == "hlt"
        del vm, cpu
    gc.collect()
    assert open_fds() == before


def test_cycles_through_vcpus_and_regions_are_collected(guest: Guest) -> None:
    """Handlers that refer to the vCPU or a memory region (not only the VM) form reference
    cycles through Rust; the garbage collector still frees them and their fds."""
    gc.collect()
    before = open_fds()
    for _ in range(10):
        vm, cpu = real_mode_vm(guest("hello_real"))
        ram = vm.memory_regions[0]
        vm.on_io(CONSOLE, lambda e, cpu=cpu, ram=ram: (cpu.regs, ram.read(0, 1)) and None)
        assert cpu.run(timeout=10).reason == "hlt"
        assert cpu.vm is vm
        del vm, cpu, ram
    gc.collect()
    assert open_fds() == before


def test_create_run_close_cycles_do_not_leak(guest: Guest) -> None:
    code = guest("counter64")
    gc.collect()
    before = open_fds()
    for _ in range(100):
        vm, cpu = user_mode_vm(code, rdi=3)
        with vm:
            vm.add_console(DEV_OUT)
            vm.add_exit_port(EXIT_PORT)
            assert cpu.run(timeout=10).reason == "exit"
    gc.collect()
    assert open_fds() == before


def test_close_from_another_thread_stops_the_running_vcpu() -> None:
    vm, cpu = user_mode_vm(MARK_AND_SPIN, rdi=MARK)
    closer = once_guests_run(vm, vm.close)  # once the guest spins in its `jmp $`
    exit = cpu.run(timeout=30)
    closer.join()
    assert exit.reason == "stopped"  # not "timeout": the close kicked it out
    assert vm.closed


def test_handler_closing_its_own_vm_gets_a_clear_error(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:

        @vm.on_io(CONSOLE)
        def closer(exit: kvmpy.IoExit) -> None:
            vm.close()

        with pytest.raises(kvmpy.VcpuBusyError, match="cannot close the VM from a handler"):
            cpu.run(timeout=10)
        assert not vm.closed
    assert vm.closed


def test_vcpu_ids(vm: kvmpy.Vm) -> None:
    a = vm.create_vcpu()
    b = vm.create_vcpu()
    c = vm.create_vcpu(id=7)
    assert (a.id, b.id, c.id) == (0, 1, 7)
    assert [v.id for v in vm.vcpus] == [0, 1, 7]
    with pytest.raises(ValueError, match="already exists"):
        vm.create_vcpu(id=1)
    with pytest.raises(ValueError, match="out of range"):
        vm.create_vcpu(id=1 << 20)
    with pytest.raises(ValueError, match="outside the range"):
        vm.create_vcpu(id=-1)
    assert repr(c) == "Vcpu(id=7)"
