"""Exits handled by Rust devices never take the GIL; Python handlers take it once."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

import pytest

import kvmpy

from .support import DEV_OUT, EXIT_PORT, counts_up, user_mode_vm, wait_until

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
    vm, cpu = user_mode_vm(guest("counter64"), rdi=2**62)  # practically endless
    with vm:
        console = vm.add_console(DEV_OUT, limit=1 << 16)
        result: list[kvmpy.Exit] = []
        t = threading.Thread(target=lambda: result.append(cpu.run(timeout=120)))
        t.start()
        wait_until(console.output, "the guest to run")
        libc = ctypes.PyDLL(None)  # calls through PyDLL keep holding the GIL
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)  # and no other thread can ask for it meanwhile
        try:
            before = cpu.stats()["exits"]
            # Wait (at most ~10 s) for ten more exits: a vCPU that needed the GIL could
            # finish the one KVM_RUN it was in, and then block.
            for _ in range(10_000):
                libc.usleep(ctypes.c_uint(1000))
                if cpu.stats()["exits"] >= before + 10:
                    break
            during = cpu.stats()["exits"]
        finally:
            sys.setswitchinterval(interval)
        cpu.stop()
        t.join()
        assert during >= before + 10, "the vCPU made no progress while the GIL was held"
        assert result[0].reason == "stopped"
        assert counts_up(console.output())


def test_python_handler_calls_take_the_gil_once_each(guest: Guest) -> None:
    n = 300
    vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
    with vm:
        vm.on_io(DEV_OUT, lambda exit: None)
        vm.add_exit_port(EXIT_PORT)
        assert cpu.run(timeout=60).reason == "exit"
        assert cpu.stats()["handler_calls"] == n


def test_a_handler_that_runs_another_vcpu_nests_the_gil_hand_offs(guest: Guest) -> None:
    # The outer run's handler runs a second VM on the same thread, whose handler runs in
    # turn: each level takes and gives back the GIL on the thread that detached with it.
    n_outer, n_inner = 20, 15
    inner_vm, inner_cpu = user_mode_vm(guest("counter64"), rdi=n_inner)
    outer_vm, outer_cpu = user_mode_vm(guest("counter64"), rdi=n_outer)
    seen: list[tuple[str, int]] = []
    with inner_vm, outer_vm:
        inner_vm.on_io(DEV_OUT, lambda e: seen.append(("inner", e.data[0])))
        inner_vm.add_exit_port(EXIT_PORT)
        runs = 0

        def outer(e: kvmpy.IoExit) -> None:
            nonlocal runs
            seen.append(("outer", e.data[0]))
            if e.data[0] == 5:
                assert inner_cpu.run(timeout=60).reason == "exit"
                runs += 1

        outer_vm.on_io(DEV_OUT, outer)
        outer_vm.add_exit_port(EXIT_PORT)
        assert outer_cpu.run(timeout=60).reason == "exit"
    assert runs == 1
    outer_seen = [v for who, v in seen if who == "outer"]
    inner_seen = [v for who, v in seen if who == "inner"]
    assert outer_seen == list(range(n_outer))
    assert inner_seen == list(range(n_inner))
    at = seen.index(("outer", 5))
    assert seen[at + 1 : at + 1 + n_inner] == [("inner", i) for i in range(n_inner)]


def test_handlers_on_vcpu_threads_release_their_objects(guest: Guest) -> None:
    # Objects a handler makes and drops on a vCPU thread are freed (none kept, none
    # double-freed), run after run on fresh threads.
    n = 200
    token = object()
    before = sys.getrefcount(token)
    kept: list[int] = []
    for _ in range(3):
        vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
        with vm:
            vm.on_io(DEV_OUT, lambda e: kept.append(len([token, token])))
            vm.add_exit_port(EXIT_PORT)
            assert [e.reason for e in vm.run(timeout=60)] == ["exit"]
            assert cpu.stats()["handler_calls"] == n
    assert kept == [2] * (3 * n)
    assert sys.getrefcount(token) == before
