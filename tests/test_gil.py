"""Exits handled by Rust devices never take the GIL; Python handlers take it once."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

import pytest

import kvmpy

from .support import DEV_OUT, EXIT_PORT, user_mode_vm

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]


def test_rust_device_exits_do_not_call_into_python(guest: Guest) -> None:
    n = 2000
    vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
    with vm:
        console = vm.add_console(DEV_OUT, limit=1 << 16)
        vm.add_exit_port(EXIT_PORT)
        exit = cpu.run(timeout=60)
        assert exit.reason == "exit"
        stats = cpu.stats()
        assert stats["exits"] >= n + 1
        # The run loop's only GIL acquisition is the Python-handler call, counted here.
        assert stats["handler_calls"] == 0
        assert console.output() == bytes(i & 0xFF for i in range(n))


def test_rust_device_exits_run_while_another_thread_holds_the_gil(guest: Guest) -> None:
    """While the main thread holds the GIL without pause, a vCPU whose exits are all
    handled in Rust keeps making progress: nothing on its exit path waits for the GIL."""
    n = 20_000
    vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
    with vm:
        console = vm.add_console(DEV_OUT, limit=1 << 16)
        vm.add_exit_port(EXIT_PORT)
        result: list[kvmpy.Exit] = []
        t = threading.Thread(target=lambda: result.append(cpu.run(timeout=120)))
        t.start()
        while not console.output():  # wait until the guest is running
            time.sleep(0.0005)
        before = len(console.output())
        libc = ctypes.PyDLL(None)  # calls through PyDLL keep holding the GIL
        libc.usleep(ctypes.c_uint(300_000))
        during = len(console.output())
        t.join()
        assert result[0].reason == "exit"
        assert during > before, "the vCPU made no progress while the GIL was held"
        assert console.output() == bytes(i & 0xFF for i in range(n))


def test_python_handler_calls_take_the_gil_once_each(guest: Guest) -> None:
    n = 300
    vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
    with vm:
        vm.on_io(DEV_OUT, lambda exit: None)
        vm.add_exit_port(EXIT_PORT)
        assert cpu.run(timeout=60).reason == "exit"
        assert cpu.stats()["handler_calls"] == n
