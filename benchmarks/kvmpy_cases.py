"""The kvmpy side of each figure: each function does one repetition and returns seconds."""

from __future__ import annotations

import threading
import time

import kvmpy
from benchmarks.common import DEVICE_PORT, EXIT_PORT, GUEST_RAM, LOAD_ADDR, BenchError
from kvmpy.__main__ import lcg


def _ignore(exit: kvmpy.IoExit) -> None:
    """A Python handler that does nothing: what remains is the cost of calling it."""


class Exits:
    """counter64 on one kvmpy VM kept for many runs, its device port handled by a Rust
    device (a console) or, with ``python``, by a Python handler."""

    def __init__(self, code: bytes, *, python: bool) -> None:
        self.vm = kvmpy.Vm()
        ram = self.vm.add_memory(0, GUEST_RAM)
        ram.write(LOAD_ADDR, code)
        self.vm.add_exit_port(EXIT_PORT)
        self.console = None
        if python:
            self.vm.on_io(DEVICE_PORT, _ignore)
        else:
            self.console = self.vm.add_console(DEVICE_PORT)
        self.cpu = self.vm.create_vcpu()
        self.cpu.setup_long_mode(user=True)

    def __call__(self, n: int) -> float:
        """Seconds for one run with ``n`` device exits (n + 1 exits in all)."""
        cpu = self.cpu
        before = cpu.stats()
        cpu.set_regs(rip=LOAD_ADDR, rdi=n)
        start = time.perf_counter()
        ex = cpu.run()
        elapsed = time.perf_counter() - start
        after = cpu.stats()
        exits = after["exits"] - before["exits"]
        if self.console is not None:
            writes = len(self.console.take())
        else:
            writes = after["handler_calls"] - before["handler_calls"]
        if ex.reason != "exit" or exits != n + 1 or writes != n:
            raise BenchError(f"kvmpy counter64 N={n}: {ex!r}, {exits} exits, {writes} writes")
        return elapsed

    def close(self) -> None:
        """Closes the VM."""
        self.vm.close()


class Runs:
    """A guest that does one OUT to an exit port per run, on one kvmpy VM kept for many runs:
    each ``cpu.run()`` enters the guest once and returns on that OUT (reason "exit"); the
    next run finishes the OUT and jumps back to it."""

    CODE = bytes([0xE6, EXIT_PORT, 0xEB, 0xFC])  # 1: out 0xf4, al; jmp 1b

    def __init__(self) -> None:
        self.vm = kvmpy.Vm()
        self.vm.add_memory(0, GUEST_RAM).write(LOAD_ADDR, self.CODE)
        self.vm.add_exit_port(EXIT_PORT)
        self.cpu = self.vm.create_vcpu()
        self.cpu.setup_long_mode(user=True)
        self.cpu.set_regs(rip=LOAD_ADDR)

    def __call__(self, k: int, timeout: float | None) -> float:
        """Seconds for ``k`` runs, each ``cpu.run()`` or, with ``timeout``,
        ``cpu.run(timeout=timeout)``."""
        cpu = self.cpu
        other = 0
        before = cpu.stats()["exits"]
        if timeout is None:
            start = time.perf_counter()
            for _ in range(k):
                if cpu.run().reason != "exit":
                    other += 1
            elapsed = time.perf_counter() - start
        else:
            start = time.perf_counter()
            for _ in range(k):
                if cpu.run(timeout=timeout).reason != "exit":
                    other += 1
            elapsed = time.perf_counter() - start
        exits = cpu.stats()["exits"] - before
        # The vCPU's timer, left set by an earlier run with an earlier deadline, may fire
        # during this batch (once per 10 s at most) and interrupt a run, with or without a
        # timeout: one more return from KVM_RUN.
        spurious = 1 + int(elapsed / 10)
        if other or not k <= exits <= k + spurious:
            raise BenchError(
                f"kvmpy runs (timeout={timeout}): {other} of {k} runs did not end at the exit "
                f"port, {exits} exits"
            )
        return elapsed

    def close(self) -> None:
        """Closes the VM."""
        self.vm.close()


def compute(code: bytes, n: int) -> float:
    """Seconds for compute64 with ``n`` LCG iterations (run() call to exit port)."""
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, GUEST_RAM)
        ram.write(LOAD_ADDR, code)
        vm.add_exit_port(EXIT_PORT)
        vm.add_console(DEVICE_PORT)  # the two result OUTs, handled natively
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LOAD_ADDR, rdi=n)
        start = time.perf_counter()
        ex = cpu.run()
        elapsed = time.perf_counter() - start
        result = cpu.regs.rbx
    if ex.reason != "exit" or result != lcg(n):
        raise BenchError(f"kvmpy compute64 N={n}: {ex!r}, rbx {result:#x} != {lcg(n):#x}")
    return elapsed


def create(k: int, mem_size: int = 64 << 20) -> float:
    """Seconds to create and close ``k`` VMs, each with ``mem_size`` bytes of RAM and one
    vCPU."""
    start = time.perf_counter()
    for _ in range(k):
        vm = kvmpy.Vm()
        vm.add_memory(0, mem_size)
        vm.create_vcpu()
        vm.close()
    return time.perf_counter() - start


def regs(k: int, *, set_regs: bool, after_run: bool = False) -> float:
    """Seconds for ``k`` register round trips: ``r = cpu.regs`` then ``cpu.regs = r``, or
    with ``set_regs`` then ``cpu.set_regs(rax=...)`` (which reads the registers again).
    With ``after_run`` the vCPU first runs once (to an exit port), as in a harness that
    resets registers between runs."""
    with kvmpy.Vm() as vm:
        vm.add_memory(0, GUEST_RAM).write(LOAD_ADDR, bytes([0xE6, EXIT_PORT]))  # out 0xf4, al
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        if after_run:
            vm.add_exit_port(EXIT_PORT)
            cpu.set_regs(rip=LOAD_ADDR)
            if cpu.run(timeout=10).reason != "exit":
                raise BenchError("the register benchmark's guest did not reach its exit port")
        start = time.perf_counter()
        if set_regs:
            for i in range(k):
                r = cpu.regs
                cpu.set_regs(rax=r.rax + i)
        else:
            for i in range(k):
                r = cpu.regs
                r.rax = i
                cpu.regs = r
        elapsed = time.perf_counter() - start
    return elapsed


def multi(code: bytes, n: int, vcpus: int, *, python: bool) -> tuple[float, int]:
    """One VM, ``vcpus`` vCPUs each running counter64 with ``n`` device exits on its own
    thread. Returns (seconds from the first start to the last finish, total exits)."""
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, GUEST_RAM)
        ram.write(LOAD_ADDR, code)
        vm.add_exit_port(EXIT_PORT)
        if python:
            vm.on_io(DEVICE_PORT, _ignore)
        else:
            vm.add_console(DEVICE_PORT, limit=max(1 << 20, 2 * n * vcpus))
        cpus = [vm.create_vcpu() for _ in range(vcpus)]
        for cpu in cpus:
            cpu.setup_long_mode(user=True)
            cpu.set_regs(rip=LOAD_ADDR, rdi=n)
        barrier = threading.Barrier(vcpus)
        spans: list[tuple[float, float]] = []
        errors: list[BaseException] = []

        def worker(cpu: kvmpy.Vcpu) -> None:
            try:
                barrier.wait()
                start = time.perf_counter()
                ex = cpu.run()
                end = time.perf_counter()
                if ex.reason != "exit":
                    raise BenchError(f"kvmpy multi: vCPU {cpu.id} ended with {ex!r}")
                spans.append((start, end))
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(cpu,)) for cpu in cpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        total = sum(cpu.stats()["exits"] for cpu in cpus)
    if total != vcpus * (n + 1):
        raise BenchError(f"kvmpy multi: {total} exits, expected {vcpus * (n + 1)}")
    return max(e for _, e in spans) - min(s for s, _ in spans), total
