"""The run loop's foundations: exit kinds defined once, the kick signal, argument rules,
no panic from any public call, and runs racing a close."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time

import pytest

import kvmpy
import kvmpy._native as native

from .support import ROOT, user_mode_vm

JMP_SELF = bytes([0xEB, 0xFE])


def test_exit_reasons_are_the_engines() -> None:
    assert sorted(r.value for r in kvmpy.ExitReason) == sorted(native._exit_reasons())


def run_script(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


SPIN_SCRIPT = """
import sys
sys.path.insert(0, "tests")
from support import user_mode_vm
vm, cpu = user_mode_vm(bytes([0xEB, 0xFE]))
"""


@pytest.mark.kvm
def test_the_kick_signal_never_replaces_a_host_programs_handler() -> None:
    script = (
        "import signal\n"
        "def mine(signum, frame): pass\n"
        "signal.signal(signal.SIGRTMIN + 1, mine)\n"
        + SPIN_SCRIPT
        + "print(cpu.run(timeout=0.2).reason)\n"
        "import kvmpy._native as n\n"
        "print(n._kick_signal() != signal.SIGRTMIN + 1)\n"
        "print(signal.getsignal(signal.SIGRTMIN + 1) is mine)\n"
    )
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["timeout", "True", "True"]


@pytest.mark.kvm
def test_a_kick_during_a_handlers_blocking_call_does_not_break_it() -> None:
    """stop() kicks the vCPU's thread while its handler blocks in read(2), called through
    ctypes so that Python's own retry on EINTR cannot hide a broken call: the call is
    restarted and returns the byte written after the kicks; then the run ends, stopped."""
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    # out 0x20, al ; jmp $
    vm, cpu = user_mode_vm(bytes([0xE6, 0x20, 0xEB, 0xFE]))
    inside = threading.Event()
    got: list[tuple[int, int, bytes]] = []

    def blocks(exit: kvmpy.IoExit) -> None:
        inside.set()
        buf = ctypes.create_string_buffer(1)
        n = libc.read(r, buf, 1)
        got.append((n, ctypes.get_errno() if n < 0 else 0, buf.raw))

    def kicks() -> None:
        assert inside.wait(30)
        for _ in range(5):
            cpu.stop()
            time.sleep(0.005)
        os.write(w, b"x")

    try:
        with vm:
            vm.on_io(0x20, blocks)
            kicker = threading.Thread(target=kicks)
            kicker.start()
            exit = cpu.run(timeout=30)
            kicker.join()
    finally:
        os.close(r)
        os.close(w)
    assert got == [(1, 0, b"x")]
    assert exit.reason == "stopped"


@pytest.mark.kvm
def test_no_free_realtime_signal_is_a_clear_error() -> None:
    script = (
        "import signal\n"
        "for s in range(signal.SIGRTMIN + 1, signal.SIGRTMAX + 1):\n"
        "    signal.signal(s, lambda *a: None)\n" + SPIN_SCRIPT + "try:\n"
        "    cpu.run(timeout=0.2)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("KvmError ")
    assert "real-time signal" in done.stdout


@pytest.mark.kvm
def test_a_region_larger_than_the_host_needs_overcommit() -> None:
    with kvmpy.Vm() as vm, pytest.raises(kvmpy.GuestMemoryError, match="overcommit=True"):
        vm.add_memory(0, (1 << 43) - 4096)


@pytest.mark.kvm
@pytest.mark.parametrize(
    "call",
    [
        lambda vm, cpu, ram: cpu.run(timeout=1e20),
        lambda vm, cpu, ram: cpu.run(timeout=float("inf")),
        lambda vm, cpu, ram: cpu.run(timeout=float("nan")),
        lambda vm, cpu, ram: cpu.run(timeout=-1),
        lambda vm, cpu, ram: vm.run(timeout=1e20),
        lambda vm, cpu, ram: vm.start(timeout=1e300),
        lambda vm, cpu, ram: vm.join(timeout=1e20),
        lambda vm, cpu, ram: vm.add_memory(0, -4096),
        lambda vm, cpu, ram: vm.add_memory(2**64, 4096),
        lambda vm, cpu, ram: vm.add_memory(2**64 - 4096, 4096),
        lambda vm, cpu, ram: vm.create_vcpu(-1),
        lambda vm, cpu, ram: vm.create_vcpu(2**64),
        lambda vm, cpu, ram: cpu.interrupt(2**32),
        lambda vm, cpu, ram: cpu.interrupt(-1),
        lambda vm, cpu, ram: cpu.interrupt(256),
        lambda vm, cpu, ram: vm.read(2**64 - 1, 2),
        lambda vm, cpu, ram: vm.read(0, 2**64),
        lambda vm, cpu, ram: vm.read(0, -1),
        lambda vm, cpu, ram: vm.write(-1, b"x"),
        lambda vm, cpu, ram: ram.read(2**64 - 1, 2),
        lambda vm, cpu, ram: ram.write(2**63, b"x"),
        lambda vm, cpu, ram: cpu.read_virtual(0, 2**63),
        lambda vm, cpu, ram: cpu.read_virtual(-1, 1),
        lambda vm, cpu, ram: cpu.translate(2**64),
        lambda vm, cpu, ram: cpu.set_regs(rax=2**64),
        lambda vm, cpu, ram: cpu.setup_long_mode(tables_addr=2**64 - 4096),
        lambda vm, cpu, ram: cpu.setup_long_mode(map_gib=2**40),
        lambda vm, cpu, ram: cpu.setup_real_mode(cs=-1),
        lambda vm, cpu, ram: cpu.get_msrs([2**32]),
        lambda vm, cpu, ram: cpu.set_msrs({0x10: 2**64}),
        lambda vm, cpu, ram: vm.on_mmio(2**64 - 1, 2, lambda e: None),
        lambda vm, cpu, ram: vm.on_io(2**16, lambda e: None),
        lambda vm, cpu, ram: vm.add_console(-1),
        lambda vm, cpu, ram: vm.add_console(0x3F8, limit=-1),
        lambda vm, cpu, ram: vm.host_function(2**32, lambda: 0),
        lambda vm, cpu, ram: vm.set_irq_line(2**32, True),
        lambda vm, cpu, ram: vm.load_flat(b"\x90", 2**64 - 1),
    ],
)
def test_bad_numbers_raise_value_errors_never_a_panic(call) -> None:  # type: ignore[no-untyped-def]
    vm, cpu = user_mode_vm(JMP_SELF)
    with vm:
        ram = vm.memory_regions[0]
        with pytest.raises((ValueError, kvmpy.KvmError)) as info:
            call(vm, cpu, ram)
        # Not an OverflowError, not a PanicException (a BaseException).
        assert not isinstance(info.value, OverflowError)


@pytest.mark.kvm
def test_vm_run_racing_a_close_never_returns_none() -> None:
    outcomes = set()
    for _ in range(30):
        vm, _cpu = user_mode_vm(JMP_SELF)
        vm.create_vcpu().setup_long_mode(user=True)
        started = threading.Event()

        def close_soon(vm: kvmpy.Vm = vm, started: threading.Event = started) -> None:
            started.wait()
            vm.close()

        closer = threading.Thread(target=close_soon)
        closer.start()
        try:
            vm.start(timeout=30)
            started.set()
            exits = vm.join(timeout=30)
            assert exits is not None
            assert all(e is not None and e.reason == "stopped" for e in exits)
            outcomes.add("stopped")
        except kvmpy.VmClosedError:
            outcomes.add("closed")
        finally:
            started.set()
            closer.join()
            vm.close()
    assert outcomes <= {"stopped", "closed"} and outcomes


@pytest.mark.kvm
def test_a_forked_child_runs_its_own_vms_with_timeouts() -> None:
    """A process that ran a vCPU, then forked: the child's runs (new VMs: KVM refuses
    the parent's) time out as they should. The thread id cached before the fork is not
    the child's, and a timer aimed at it could not be created."""
    script = (
        SPIN_SCRIPT + "import os\n"
        "print(cpu.run(timeout=0.05).reason, flush=True)\n"
        "vm.close()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    vm2, cpu2 = user_mode_vm(bytes([0xEB, 0xFE]))\n"
        "    try:\n"
        "        print(cpu2.run(timeout=0.05).reason, flush=True)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e, flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["timeout", "timeout"], done.stdout
