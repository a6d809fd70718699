"""Helpers for the tests: guest conventions and ready-made VMs."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import kvmpy

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"

# Guest conventions (see guests/*.S).
CONSOLE = 0x3F8
DEV_IN = 0x10
DEV_OUT = 0x11
EXIT_PORT = 0xF4
REAL_LOAD = 0x1000
LONG_LOAD = 0x10000

# A 64-bit guest that marks that it has run, then spins natively with no more exits:
# inc qword [rdi] ; jmp $      (the `jmp $` is at offset 3)
MARK_AND_SPIN = bytes([0x48, 0xFF, 0x07, 0xEB, 0xFE])
SPIN_OFFSET = 3
MARK = 0x20000  # where tests point RDI (one u64 per vCPU: MARK, MARK + 8, ...)


def real_mode_vm(code: bytes, ram_size: int = 0x80000) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    """A VM with RAM at 0, `code` at 0x1000 and a vCPU in real mode at 0:0x1000."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, ram_size)
    ram.write(REAL_LOAD, code)
    cpu = vm.create_vcpu()
    cpu.setup_real_mode(cs=0, ip=REAL_LOAD)
    cpu.set_regs(rsp=0x8000)
    return vm, cpu


def user_mode_vm(code: bytes, rdi: int = 0) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    """A VM with 2 MiB of RAM, `code` at 0x10000 and a vCPU in 64-bit user mode there."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 2 << 20)
    ram.write(LONG_LOAD, code)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    cpu.set_regs(rip=LONG_LOAD, rdi=rdi)
    return vm, cpu


def counts_up(data: bytes) -> bool:
    """Whether `data` is a run of consecutive byte values (mod 256), as counter64 writes."""
    return all((b - a) & 0xFF == 1 for a, b in itertools.pairwise(data))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Polls `condition` until it is true. The timeout only turns a hang into a failure that
    says what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)


def rerun_file_with(env: dict[str, str], test_file: str, deselect: str) -> None:
    """Runs every test of `test_file` but those `deselect` (a `-k` expression) again in a
    new pytest process with `env` added (a mechanism forced), and checks that all pass
    and none is skipped."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
        + ["-k", deselect],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def marked(vm: kvmpy.Vm, count: int = 1) -> bool:
    """Whether `count` vCPUs running MARK_AND_SPIN (RDI = MARK, MARK + 8, ...) have marked,
    that is, are in their `jmp $`."""
    return all(vm.read(MARK + 8 * i, 8) != bytes(8) for i in range(count))


def wait_for_guests(vm: kvmpy.Vm, count: int = 1) -> None:
    wait_until(lambda: marked(vm, count), f"{count} vCPU(s) to run their guest")


class When(threading.Thread):
    """A thread that waits until `condition()` holds, then calls `action()`. `join()`
    re-raises what went wrong in it."""

    def __init__(
        self, condition: Callable[[], object], action: Callable[[], object], what: str
    ) -> None:
        super().__init__()
        self.condition, self.action, self.what = condition, action, what
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            wait_until(self.condition, self.what)
            self.action()
        except BaseException as e:  # noqa: BLE001 (handed to join())
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def once_guests_run(vm: kvmpy.Vm, action: Callable[[], object], count: int = 1) -> When:
    """Calls `action` from another thread once `count` MARK_AND_SPIN vCPUs spin in their
    guest (natively, in `jmp $`)."""
    return When(lambda: marked(vm, count), action, f"{count} vCPU(s) to run their guest")


# For scripts run by interrupt_script: `announce(vm, count)` prints "running" from another
# thread once `count` MARK_AND_SPIN vCPUs have marked, so Ctrl-C lands while they spin.
ANNOUNCE_RUNNING = textwrap.dedent(
    f"""
    import signal, threading, time

    def announce(vm, count=1):
        def wait():
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})  # for the main thread
            while any(vm.read({MARK:#x} + 8 * i, 8) == bytes(8) for i in range(count)):
                time.sleep(0.0005)
            print("running", flush=True)

        threading.Thread(target=wait, daemon=True).start()
    """
)


# Prepended to a child's script that must hear Ctrl-C: a child inherits an ignored SIGINT
# (as under `nohup`, or from a shell that started the tests in the background), and Python
# then leaves it ignored instead of raising KeyboardInterrupt.
CTRL_C_HEARD = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def interrupt_script(script: str) -> tuple[str, int]:
    """Runs `script` in a fresh interpreter; once it prints "running" (which it does only
    when its guest has run and spins natively), sends SIGINT (Ctrl-C). Returns its
    remaining output and its exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_HEARD + script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return out.strip() + err, proc.returncode


def raw(region: kvmpy.MemoryRegion, offset: int, n: int) -> bytes:
    """`n` bytes at `offset` of `region` as they are in memory (breakpoint and coverage
    patches included, which `region.read` hides): through a memoryview."""
    return bytes(memoryview(region)[offset : offset + n])


def run_beside(
    cpus: list[kvmpy.Vcpu],
    side: Callable[[threading.Event], None],
    again: str = "",
    timeout: Callable[[], float] = lambda: 60.0,
) -> list[kvmpy.ExitInfo]:
    """Runs each vCPU on a thread of its own, each run with `timeout()` seconds (a run
    that ends for the reason `again` is started again), while `side(done)` runs on
    another thread until `done` is set; returns how the runs ended."""
    done = threading.Event()
    ends: list[kvmpy.ExitInfo] = []

    def run(cpu: kvmpy.Vcpu) -> None:
        while (e := cpu.run(timeout=timeout())).reason == again:
            pass
        ends.append(e)

    runs = [threading.Thread(target=run, args=(cpu,)) for cpu in cpus]
    helper = threading.Thread(target=side, args=(done,))
    helper.start()
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    done.set()
    helper.join()
    return ends
