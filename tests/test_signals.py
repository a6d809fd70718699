"""Ctrl-C during run(), and exits the host's KVM produces only in some modes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import kvmpy

from .support import (
    ANNOUNCE_RUNNING,
    CONSOLE,
    LONG_LOAD,
    MARK,
    MARK_AND_SPIN,
    SPIN_OFFSET,
    interrupt_script,
    user_mode_vm,
    wait_until,
)

pytestmark = pytest.mark.kvm

SCRIPT = ANNOUNCE_RUNNING + textwrap.dedent(
    f"""
    import sys, kvmpy
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 2 << 20)
    ram.write({LONG_LOAD:#x}, {MARK_AND_SPIN!r})  # inc qword [rdi] ; jmp $
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    cpu.set_regs(rip={LONG_LOAD:#x}, rdi={MARK:#x})
    announce(vm)
    try:
        cpu.run(timeout=60)
    except KeyboardInterrupt:
        print("interrupted at", hex(cpu.regs.rip), flush=True)
        vm.close()
        sys.exit(3)
    print("not interrupted", flush=True)
    """
)


def test_ctrl_c_stops_the_guest_and_raises_keyboard_interrupt() -> None:
    out, status = interrupt_script(SCRIPT)
    # Ctrl-C reached the main thread while it ran the guest's `jmp $` natively; run()
    # raised KeyboardInterrupt long before its 60 s timeout (communicate() allows 30 s).
    assert out == f"interrupted at {LONG_LOAD + SPIN_OFFSET:#x}"
    assert status == 3


def test_emulation_failure_is_an_internal_error_exit() -> None:
    """`lock cmpxchg16b` on MMIO at ring 0: KVM must emulate an access to memory that no
    slot backs, and its instruction emulator cannot run cmpxchg16b, so KVM ends the run
    with KVM_EXIT_INTERNAL_ERROR (emulation), on bare-metal and nested KVM alike."""
    mmio = 0x300000  # 16-byte aligned, identity mapped, past the 2 MiB of RAM
    # lock cmpxchg16b [mmio] ; jmp $
    code = bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0C, 0x25]) + mmio.to_bytes(4, "little")
    code += bytes([0xEB, 0xFE])
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
        reads: list[int] = []

        @vm.on_mmio(mmio, 0x1000)
        def device(exit: kvmpy.MmioExit) -> bytes | None:
            reads.append(exit.address)  # the emulator may read the operand first
            return None if exit.is_write else bytes(exit.size)

        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False)
        cpu.set_regs(rip=LONG_LOAD)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.InternalErrorExit), exit
        assert exit.reason == "internal_error"
        assert exit.suberror == 1  # KVM_INTERNAL_ERROR_EMULATION
        assert isinstance(exit.data, list)
        assert "InternalErrorExit(suberror=1" in repr(exit)
        assert all(mmio <= a < mmio + 16 for a in reads)
        assert cpu.regs.rip == LONG_LOAD  # the instruction did not complete


def test_interpreter_exits_while_a_daemon_thread_runs_a_vcpu() -> None:
    script = textwrap.dedent(
        f"""
        import threading, time, kvmpy
        vm = kvmpy.Vm()
        vm.add_memory(0, 2 << 20).write({LONG_LOAD:#x}, {MARK_AND_SPIN!r})
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip={LONG_LOAD:#x}, rdi={MARK:#x})
        threading.Thread(target=cpu.run, daemon=True).start()
        other = kvmpy.Vm()
        other.add_memory(0, 2 << 20).write({LONG_LOAD:#x}, {MARK_AND_SPIN!r})
        c2 = other.create_vcpu()
        c2.setup_long_mode(user=True)
        c2.set_regs(rip={LONG_LOAD:#x}, rdi={MARK:#x})
        other.start()  # a background run nobody joins
        # Exit only once both guests run (each has marked and spins in `jmp $`).
        while vm.read({MARK:#x}, 8) == bytes(8) or other.read({MARK:#x}, 8) == bytes(8):
            time.sleep(0.0005)
        print("bye", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bye"


def test_a_handler_exit_after_the_interpreter_has_gone_ends_quietly() -> None:
    """A daemon thread's run meets a handler exit once the interpreter has finalized (the
    process lives on in a C exit function, here `getchar()` until stdin closes): there is
    no Python to call, and the run's thread ends without printing anything (a Rust panic
    report did, before)."""
    script = textwrap.dedent(
        """
        import ctypes, threading, time, kvmpy
        vm = kvmpy.Vm()
        mem = vm.add_memory(0, 2 << 20)
        # loop: mov ecx, 3_000_000 ; spin: dec ecx ; jnz spin ; out 0x10, al ; jmp loop
        mem.write(0x10000, bytes.fromhex("b9c0c62d00ffc975fce610ebf3"))
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=0x10000)
        calls = []
        vm.on_io(0x10)(lambda e: calls.append(e.port))
        libc = ctypes.CDLL(None)
        ctypes.pythonapi.Py_AtExit(ctypes.cast(libc.getchar, ctypes.c_void_p))
        threading.Thread(target=cpu.run, daemon=True).start()
        while len(calls) < 3:
            time.sleep(0.001)
        print("bye", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "bye"
        # The interpreter finalizes, then waits in getchar(); the guest exits to its
        # handler about every millisecond meanwhile.
        time.sleep(0.3)
        out, err = proc.communicate(input="", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "panicked" not in err and err.strip() == "", err


def test_ctrl_c_between_two_guest_entries_is_not_lost() -> None:
    """A SIGINT that reaches the main thread while it is outside KVM_RUN, in the run loop
    between two exits, still ends the run. The guest writes to a Rust console in a loop,
    so the main thread spends a part of its time between entries and no later KVM_RUN
    would ever be interrupted by a signal already delivered: each of many runs must end
    with KeyboardInterrupt, none by the watchdog."""
    # loop: out dx, al ; jmp loop      (dx = the console port)
    code = bytes([0x66, 0xBA]) + CONSOLE.to_bytes(2, "little") + bytes([0xEE, 0xEB, 0xFD])
    for trial in range(100):
        lost = interrupt_one_run(code, after=50 + trial)
        assert not lost, f"trial {trial}: the SIGINT was lost"


def interrupt_one_run(code: bytes, after: int) -> bool:
    """Runs `code` on the main thread; once the console has `after` bytes, another thread
    sends SIGINT to the main thread. True if the run had to be stopped by a watchdog."""
    main = threading.get_ident()
    vm, cpu = user_mode_vm(code)
    with vm:
        console = vm.add_console(port=CONSOLE)
        done = threading.Event()
        lost = threading.Event()

        def interrupt_then_watch() -> None:
            wait_until(lambda: len(console.output()) > after, "console output")
            signal.pthread_kill(main, signal.SIGINT)
            if not done.wait(10):
                lost.set()
                cpu.stop()

        helper = threading.Thread(target=interrupt_then_watch)
        helper.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                cpu.run()
        finally:
            done.set()
            helper.join()
    return lost.is_set()


def test_ctrl_c_during_a_python_handler_interrupts_the_handler() -> None:
    """Nothing holds SIGINT back while a handler runs: Ctrl-C raises KeyboardInterrupt in
    the handler's own code (here, a long sleep), which ends the run with it."""
    main = threading.get_ident()
    # out 0x20, al ; jmp $
    vm, cpu = user_mode_vm(bytes([0xE6, 0x20, 0xEB, 0xFE]))
    inside = threading.Event()
    finished: list[bool] = []

    def sleeps(exit: kvmpy.IoExit) -> None:
        inside.set()
        time.sleep(60)
        finished.append(True)

    def interrupt() -> None:
        assert inside.wait(30)
        signal.pthread_kill(main, signal.SIGINT)

    with vm:
        vm.on_io(0x20, sleeps)
        helper = threading.Thread(target=interrupt)
        helper.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                cpu.run(timeout=120)
        finally:
            helper.join()
    assert finished == []
