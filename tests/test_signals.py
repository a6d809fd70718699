"""Ctrl-C during run(), and exits the host's KVM produces only in some modes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

import kvmpy

from .support import interrupt_script

pytestmark = pytest.mark.kvm

SCRIPT = textwrap.dedent(
    """
    import sys, kvmpy
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 2 << 20)
    ram.write(0x10000, bytes([0xEB, 0xFE]))  # jmp $
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    cpu.set_regs(rip=0x10000)
    print("running", flush=True)
    try:
        cpu.run(timeout=60)
    except KeyboardInterrupt:
        print("interrupted", cpu.regs.rip == 0x10000, flush=True)
        vm.close()
        sys.exit(3)
    print("not interrupted", flush=True)
    """
)


def test_ctrl_c_stops_the_guest_and_raises_keyboard_interrupt() -> None:
    start = time.monotonic()
    out, status = interrupt_script(SCRIPT)
    assert time.monotonic() - start < 25
    assert out == "interrupted True"
    assert status == 3


def test_emulation_failure_is_an_internal_error_exit() -> None:
    """`lock cmpxchg16b` at ring 0: on nested (software) KVM the host's instruction
    emulator cannot run it and reports KVM_EXIT_INTERNAL_ERROR; on bare-metal KVM it runs
    natively and the guest reaches its `jmp $`, so the run times out."""
    # lock cmpxchg16b [rip + 0xf7] (the 16-byte aligned 0x10100) ; jmp $
    code = bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0D, 0xF7, 0x00, 0x00, 0x00, 0xEB, 0xFE])
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(0x10000, code)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False)
        cpu.set_regs(rip=0x10000)
        exit = cpu.run(timeout=2)
        if exit.reason == "timeout":
            assert cpu.regs.rip == 0x10009  # ran natively, now in the loop
            return
        assert isinstance(exit, kvmpy.InternalErrorExit)
        assert exit.reason == "internal_error"
        assert exit.suberror == 1  # KVM_INTERNAL_ERROR_EMULATION
        assert isinstance(exit.data, list)
        assert "InternalErrorExit(suberror=1" in repr(exit)


def test_interpreter_exits_while_a_daemon_thread_runs_a_vcpu() -> None:
    script = textwrap.dedent(
        """
        import threading, time, kvmpy
        vm = kvmpy.Vm()
        vm.add_memory(0, 2 << 20).write(0x10000, bytes([0xEB, 0xFE]))
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=0x10000)
        threading.Thread(target=cpu.run, daemon=True).start()
        other = kvmpy.Vm()
        other.add_memory(0, 2 << 20).write(0x10000, bytes([0xEB, 0xFE]))
        c2 = other.create_vcpu()
        c2.setup_long_mode(user=True)
        c2.set_regs(rip=0x10000)
        other.start()  # a background run nobody joins
        time.sleep(0.2)
        print("bye", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bye"
