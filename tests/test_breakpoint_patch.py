"""Debugger breakpoints through the one-byte ``out dx, al`` patch, where KVM does not
intercept ``int3`` and the code may do port I/O (kvmpy's user mode with IOPL=3, ring 0):
the same breakpoints, steps and snapshots as with ``int3``, and a #GP at the patch (code
that may not do port I/O) still a breakpoint."""

from __future__ import annotations

import os

import pytest

import kvmpy
from kvmpy._native import _debug_support

from .support import EXIT_PORT, LONG_LOAD, raw

pytestmark = pytest.mark.kvm

# xor eax, eax ; mov ecx, 3 ; L: inc eax ; dec ecx ; jnz L ; out 0xf4, al
LOOP = bytes.fromhex("31c0b903000000ffc0ffc975fae6f4")
AT = LONG_LOAD + 7  # the `inc eax`


def expected_patch(iopl3: bool = True) -> int | None:
    """The byte kvmpy patches for a breakpoint on this host (None: refused), in code
    that may do port I/O or not (``KVMPY_BREAKPOINT_MECHANISM`` may pick one)."""
    if iopl3:
        return 0xEE if _debug_support()["breakpoints"] == "port-io" else 0xCC
    if os.environ.get("KVMPY_BREAKPOINT_MECHANISM") == "port-io":
        return None
    return 0xCC


def loop_vm(user: bool) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, LOOP)
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=user, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD, rsp=0x80000)
    return vm, cpu


@pytest.mark.parametrize("user", [True, False], ids=["user", "ring0"])
def test_a_breakpoint_hits_steps_and_continues(user: bool) -> None:
    vm, cpu = loop_vm(user)
    with vm:
        cpu.add_breakpoint(AT)
        patch = expected_patch()
        region = vm.memory_regions[0]
        assert bytes(memoryview(region)[AT : AT + 1]) == bytes([patch or 0])
        assert vm.read(AT, 1) == b"\xff", "memory shows the original"
        assert region.read(AT, 1) == b"\xff", "so does a region's read"
        if not user and patch == 0xCC and _debug_support()["mechanism"] != "kvm":
            # int3 at ring 0 where KVM does not intercept it: on a host that emulates
            # ring-0 code and cannot emulate int3, an emulation failure at the patch.
            exit = cpu.run(timeout=10)
            if exit.reason == "internal_error":
                assert cpu.regs.rip == AT
                return
            cpu.set_regs(rip=LONG_LOAD, rax=0)
        hits = []
        for _ in range(3):
            exit = cpu.run(timeout=10)
            assert exit.reason == "breakpoint" and exit.address == cpu.regs.rip == AT
            hits.append(cpu.regs.rax)
        assert hits == [0, 1, 2], "the inc at the breakpoint ran once per pass"
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == 3
        # A step from the breakpoint runs its own instruction.
        cpu.set_regs(rip=LONG_LOAD)
        assert cpu.run(timeout=10).reason == "breakpoint"
        assert cpu.step() == AT + 2 and cpu.regs.rax == 1


def test_snapshots_hide_the_patch_and_a_restore_puts_it_back() -> None:
    vm, cpu = loop_vm(True)
    with vm:
        cpu.add_breakpoint(AT)
        snap = vm.snapshot()
        assert snap.read(AT, 1) == b"\xff"
        assert cpu.run(timeout=10).reason == "breakpoint"
        vm.restore(snap)
        assert raw(vm.memory_regions[0], AT, 1) == bytes([expected_patch() or 0])
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rax == 0
        cpu.remove_breakpoint(AT)
        assert raw(vm.memory_regions[0], AT, 1) == b"\xff"
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == 3


def test_a_patch_reached_where_port_io_faults_is_still_a_breakpoint() -> None:
    vm, cpu = loop_vm(True)
    with vm:
        cpu.add_breakpoint(AT)  # at IOPL=3: the port-I/O patch where KVM does not intercept
        cpu.set_regs(rflags=0x2)  # IOPL=0: an `out` at CPL3 is a #GP now
        exit = cpu.run(timeout=10)
        assert exit.reason == "breakpoint" and cpu.regs.rip == AT
        assert cpu.regs.rflags & 0x3000 == 0
        assert cpu.step() == AT + 2 and cpu.regs.rax == 1
        # A breakpoint added at IOPL=0 is an int3 (an `out` would fault there).
        if expected_patch(False) is None:  # the port-I/O patch, forced, where it faults
            with pytest.raises(kvmpy.KvmUnsupported, match="port I/O faults"):
                cpu.add_breakpoint(AT + 4)
            return
        cpu.add_breakpoint(AT + 4)  # the jnz
        assert raw(vm.memory_regions[0], AT + 4, 1) == bytes([expected_patch(False) or 0])
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rip == AT + 4
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rip == AT


@pytest.mark.parametrize("forced", ["exception-stubs", "port-io"])
def test_the_mechanism_can_be_picked(forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_BREAKPOINT_MECHANISM", forced)
    vm, cpu = loop_vm(True)
    with vm:
        cpu.add_breakpoint(AT)
        patch = 0xEE if forced == "port-io" else 0xCC
        assert raw(vm.memory_regions[0], AT, 1) == bytes([patch])
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rax == 0
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rax == 1
