"""Debugging: software breakpoints, single steps, tracing, and the host probe that picks
how they reach kvmpy.

Whether this host's KVM intercepts `int3` and single steps is probed once
(`kvmpy._native._debug_support()`). Every behaviour test goes through the public API and
so exercises the mechanism the host got: on a nested software KVM the exception-stub
path, on bare-metal KVM the KVM_EXIT_DEBUG path.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

import kvmpy
from kvmpy._native import _debug_support

from .support import rerun_file_with, run_beside

pytestmark = pytest.mark.kvm

CODE = 0x10000
# rcx = rdi; loop: add rax, rcx; dec rcx; jnz loop; out 0xf4, al
LOOP = bytes(
    [0x48, 0x89, 0xF9]  # 0x10000 mov rcx, rdi
    + [0x48, 0x01, 0xC8]  # 0x10003 add rax, rcx   (the jump target)
    + [0x48, 0xFF, 0xC9]  # 0x10006 dec rcx
    + [0x75, 0xF8]  # 0x10009 jnz 0x10003
    + [0xE6, 0xF4]  # 0x1000b out 0xf4, al
)
ADD, DEC, JNZ, OUT = 0x10003, 0x10006, 0x10009, 0x1000B
# Where KVM cannot be used the probe cannot run, and every test here skips (kvm marker).
STUBS = bool(kvmpy.available()) and _debug_support()["mechanism"] == "exception-stubs"


def machine(
    code: bytes = LOOP, *, exceptions: bool = True, cpus: int = 1
) -> tuple[kvmpy.Vm, list[kvmpy.Vcpu]]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(CODE, code)
    vm.add_exit_port(0xF4)
    made = []
    for i in range(cpus):
        cpu = vm.create_vcpu()
        # Each vCPU its own tables: the exception stubs' stack and report are per set.
        tables = {"tables_addr": 0x1000 + i * 0x40000, "exception_port": 0xF6 + i}
        cpu.setup_long_mode(user=True, exceptions=exceptions, **tables)
        cpu.set_regs(rip=CODE, rdi=3, rax=0)
        made.append(cpu)
    return vm, made


def hits(cpu: kvmpy.Vcpu) -> tuple[list[tuple[int, int]], kvmpy.ExitInfo]:
    seen = []
    while (e := cpu.run(timeout=10)).reason == "breakpoint":
        assert isinstance(e, kvmpy.BreakpointExit)
        assert cpu.regs.rip == e.address
        assert cpu.sregs.cs.selector & 3 == 3, "back in user mode, as the guest was"
        seen.append((e.address, cpu.regs.rcx))
    return seen, e


def _info_line(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "kvmpy", "info"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout
    return next(x for x in out.splitlines() if x.startswith("guest debugging: "))


def test_the_mechanism_follows_what_the_probe_found() -> None:
    d = _debug_support()
    assert d == _debug_support()
    intercepts = bool(d["sw_breakpoints"]) and bool(d["single_step"])
    forced = os.environ.get("KVMPY_DEBUG_MECHANISM")
    assert d["mechanism"] == forced or ("kvm" if intercepts else "exception-stubs")
    line = _info_line({"KVMPY_DEBUG_MECHANISM": ""})
    assert ("KVM_EXIT_DEBUG" in line) == intercepts
    assert ("exception stubs" in line) != intercepts
    hardware = bool(d["hw_breakpoints"]) and intercepts
    assert ("hardware breakpoints: DR0-DR3" in line) == hardware, line
    line = _info_line({"KVMPY_DEBUG_MECHANISM": "exception-stubs"})
    assert "exception stubs" in line and "hardware breakpoints: none" in line, line
    line = _info_line({"KVMPY_DEBUG_MECHANISM": "kvm"})
    assert ("KVM_EXIT_DEBUG" if intercepts else "does not intercept int3") in line


def test_the_exception_stub_path_passes_the_same_tests() -> None:
    # Where KVM intercepts, every other test here runs the KVM_EXIT_DEBUG path: run them
    # all again with the exception-stub path forced (where it does not, the same path).
    rerun_file_with(
        {"KVMPY_DEBUG_MECHANISM": "exception-stubs"}, __file__, "not exception_stub_path"
    )


def test_breakpoints_at_several_addresses_are_hit_in_order() -> None:
    vm, (cpu,) = machine()
    with vm:
        for a in (ADD, DEC, OUT):
            assert cpu.add_breakpoint(a) == a
        assert sorted(cpu.breakpoints) == [ADD, DEC, OUT]
        seen, e = hits(cpu)
        assert seen == [(ADD, 3), (DEC, 3), (ADD, 2), (DEC, 2), (ADD, 1), (DEC, 1), (OUT, 0)]
        assert e.reason == "exit" and cpu.regs.rax == 6


def test_a_breakpoint_on_a_one_byte_instruction_before_a_jump_target() -> None:
    # 0x10000 mov ecx, 2; 0x10005 nop; 0x10006 dec ecx (target); jnz 0x10006; out
    code = bytes([0xB9, 2, 0, 0, 0, 0x90, 0xFF, 0xC9, 0x75, 0xFC, 0xE6, 0xF4])
    vm, (cpu,) = machine(code)
    with vm:
        cpu.add_breakpoint(0x10005)
        cpu.add_breakpoint(0x10006)
        seen, e = hits(cpu)
        assert [a for a, _ in seen] == [0x10005, 0x10006, 0x10006]
        assert e.reason == "exit" and cpu.regs.rcx == 0
        assert vm.read(0x10005, 2) == bytes([0x90, 0xFF])


def test_removing_a_breakpoint_while_stopped_on_it() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        assert cpu.run(timeout=10).reason == "breakpoint"
        cpu.remove_breakpoint(ADD)
        assert cpu.breakpoints == []
        assert vm.read(CODE, len(LOOP)) == LOOP
        e = cpu.run(timeout=10)
        assert e.reason == "exit" and cpu.regs.rax == 6
        with pytest.raises(ValueError, match="no breakpoint at 0x10003"):
            cpu.remove_breakpoint(ADD)


def test_a_stop_before_the_step_over_a_breakpoint_keeps_the_vcpu_on_it() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rcx == 3
        cpu.stop()
        e = cpu.run(timeout=10)
        assert e.reason == "stopped" and cpu.regs.rip == ADD and cpu.regs.rax == 0, "not run"
        assert cpu.regs.rflags & 0x100 == 0
        seen, e = hits(cpu)
        assert seen == [(ADD, 2), (ADD, 1)], "the next run steps over it: no second report"
        assert e.reason == "exit" and cpu.regs.rax == 6


def test_vm_wide_breakpoints_and_another_vcpus_breakpoint() -> None:
    vm, (cpu0, cpu1) = machine(cpus=2)
    with vm:
        cpu0.add_breakpoint(DEC)  # vCPU 0's only: vCPU 1 runs past it
        seen, e = hits(cpu1)
        assert seen == [] and e.reason == "exit" and cpu1.regs.rax == 6
        assert vm.read(DEC, 1) == bytes([0x48]), "memory shows the original byte"
        region = vm.memory_regions[0]
        at = DEC - region.guest_addr
        assert region.read(at, 1) == bytes([0x48]), "so does a region's read"
        assert memoryview(region)[at] != 0x48, "a view is the memory as it is: the patch"
        vm.add_breakpoint(OUT)
        assert vm.breakpoints == [OUT] and cpu0.breakpoints == [DEC]
        seen, e = hits(cpu0)
        assert [a for a, _ in seen] == [DEC, DEC, DEC, OUT]
        cpu1.set_regs(rip=CODE, rdi=1, rax=0)
        seen, _ = hits(cpu1)
        assert seen == [(OUT, 0)]
        vm.remove_breakpoint(OUT)
        with pytest.raises(ValueError):
            vm.remove_breakpoint(OUT)


def test_a_guests_own_int3_reaches_the_guest() -> None:
    # int3; out 0xf4  -- with a kvmpy breakpoint elsewhere
    vm, (cpu,) = machine(bytes([0xCC, 0xE6, 0xF4]) + LOOP)
    with vm:
        cpu.add_breakpoint(CODE + 3 + 3)
        e = cpu.run(timeout=10)
        assert isinstance(e, kvmpy.ExceptionExit) and e.name == "#BP"


def test_snapshots_never_hold_a_breakpoint_byte() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        snap = vm.snapshot()
        assert snap.read(CODE, len(LOOP)) == LOOP
        seen, e = hits(cpu)
        assert len(seen) == 3 and e.reason == "exit"
        for _ in range(2):  # restored memory gets the patch again
            vm.restore(snap)
            assert hits(cpu)[0] == seen
        cpu.remove_breakpoint(ADD)
        vm.restore(snap)
        assert hits(cpu)[0] == [] and cpu.regs.rax == 6
        # A breakpoint set after the snapshot: the restored page gets it too.
        vm.restore(snap)
        cpu.add_breakpoint(OUT)
        vm.restore(snap)
        assert hits(cpu)[0] == [(OUT, 0)]
        assert vm.snapshot().read(OUT, 1) == bytes([0xE6])


def test_step_returns_the_new_rip_and_steps_over_breakpoints() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        assert cpu.step() == ADD
        assert cpu.step() == DEC, "stepping from a breakpoint executes its instruction"
        assert cpu.step(2) == ADD
        assert isinstance(cpu.last_exit, kvmpy.StepExit) and cpu.last_exit.rip == ADD
        assert cpu.regs.rflags & 0x100 == 0, "no trap flag left behind"
        assert cpu.run(timeout=10).reason == "breakpoint" and cpu.regs.rip == ADD
        assert (cpu.regs.rcx, cpu.regs.rax) == (1, 5), "one loop iteration, from the breakpoint"
        cpu.remove_breakpoint(ADD)
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == 6


def test_stepping_rep_movsb_and_a_faulting_instruction() -> None:
    # mov ecx, 3; mov esi, 0x20000; mov edi, 0x20100; rep movsb; ud2
    code = bytes([0xB9, 3, 0, 0, 0, 0xBE, 0, 0, 2, 0, 0xBF, 0, 1, 2, 0, 0xF3, 0xA4, 0x0F, 0x0B])
    vm, (cpu,) = machine(code)
    with vm:
        vm.write(0x20000, b"abc")
        assert cpu.step(3) == 0x1000F
        rips = []
        while cpu.regs.rip == 0x1000F:
            rips.append(cpu.step())
        assert vm.read(0x20100, 3) == b"abc"
        assert rips[-1] == 0x10011 and 1 <= len(rips) <= 3  # one step per iteration
        cpu.step()
        e = cpu.last_exit
        assert isinstance(e, kvmpy.ExceptionExit) and e.name == "#UD" and e.rip == 0x10011


def test_trace_yields_executed_instructions() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.set_regs(rdi=2)
        texts = [(rip, text) for rip, _, text in cpu.trace()]
        assert texts == [
            (CODE, "mov rcx, rdi"),
            (ADD, "add rax, rcx"),
            (DEC, "dec rcx"),
            (JNZ, "jne 0x10003"),
            (ADD, "add rax, rcx"),
            (DEC, "dec rcx"),
            (JNZ, "jne 0x10003"),
            (OUT, "out 0xf4, al"),
        ]
        assert cpu.last_exit is not None and cpu.last_exit.reason == "exit"
        cpu.set_regs(rip=CODE, rdi=3)
        assert [r for r, _, _ in cpu.trace(count=3)] == [CODE, ADD, DEC]
        assert cpu.regs.rip == JNZ, "all three were executed"
        assert [b for _, b, _ in cpu.trace(until=ADD)] == [bytes([0x75, 0xF8])]
        assert cpu.regs.rip == ADD


def test_bad_breakpoints_watchpoints_and_steps() -> None:
    vm, (cpu,) = machine()
    with vm:
        with pytest.raises(kvmpy.GuestMemoryError, match="not mapped"):
            cpu.add_breakpoint(0x7FFF_0000_0000)
        with pytest.raises(kvmpy.GuestMemoryError):
            cpu.add_breakpoint(0x3000_0000)  # mapped, but no RAM behind it
        with pytest.raises(ValueError, match="1, 2, 4 or 8"):
            cpu.add_watchpoint(0x20000, 3)
        with pytest.raises(ValueError, match="aligned"):
            cpu.add_watchpoint(0x20001, 8)
        with pytest.raises(ValueError, match="kind"):
            cpu.add_watchpoint(0x20000, 8, "read")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least 1"):
            cpu.step(0)
        with pytest.raises(TypeError):
            cpu.add_breakpoint("main")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            cpu.add_breakpoint(-1)
    with pytest.raises(kvmpy.VmClosedError):
        cpu.step()
    with pytest.raises(kvmpy.VmClosedError):
        cpu.add_breakpoint(ADD)
    with kvmpy.Vm() as bare:
        with pytest.raises(ValueError, match="create a vCPU first"):
            bare.add_breakpoint(CODE)


def test_without_exception_stubs_a_clear_error_names_the_host_limit() -> None:
    vm, (cpu,) = machine(exceptions=False)
    with vm:
        if STUBS:
            limit = r"does not intercept int3.*exceptions=True"
            with pytest.raises(kvmpy.KvmUnsupported, match="breakpoints reach.*" + limit):
                cpu.add_breakpoint(ADD)
            with pytest.raises(kvmpy.KvmUnsupported, match="single steps reach.*" + limit):
                cpu.step()
            assert cpu.regs.rip == CODE, "nothing ran"
        else:  # KVM intercepts: breakpoints need no exception stubs
            cpu.add_breakpoint(ADD)
            assert cpu.run(timeout=10).reason == "breakpoint"


def test_on_breakpoint_handlers_return_stop_and_raise() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        seen = []

        @vm.on_breakpoint
        def count(exit: kvmpy.BreakpointExit) -> None:
            seen.append((exit.address, cpu.regs.rcx))

        e = cpu.run(timeout=10)
        assert e.reason == "exit" and cpu.regs.rax == 6
        assert seen == [(ADD, 3), (ADD, 2), (ADD, 1)]
        assert cpu.stats()["handler_calls"] == 3

        vm.remove_handler(count)

        @vm.on_breakpoint
        def stop_at_two(exit: kvmpy.BreakpointExit) -> None:
            if cpu.regs.rcx == 2:
                exit.stop()

        cpu.set_regs(rip=CODE, rax=0)
        e = cpu.run(timeout=10)
        assert isinstance(e, kvmpy.BreakpointExit) and e.stopped and cpu.regs.rcx == 2
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == 6

        @vm.on_breakpoint
        def boom(exit: kvmpy.BreakpointExit) -> None:
            raise RuntimeError("boom")

        cpu.set_regs(rip=CODE, rax=0)
        with pytest.raises(RuntimeError, match="boom"):
            cpu.run(timeout=10)
        assert cpu.regs.rip == ADD, "stopped at the breakpoint, usable again"

        @vm.on_breakpoint
        def wrong(exit: kvmpy.BreakpointExit) -> None:
            return 5  # type: ignore[return-value]

        with pytest.raises(TypeError, match="breakpoints must return None"):
            cpu.run(timeout=10)
        vm.remove_handler(wrong)
        assert cpu.run(timeout=10).reason == "breakpoint"


def test_a_run_from_a_breakpoint_set_by_hand_hits_it_and_a_restore_resumes() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(CODE)
        e = cpu.run(timeout=10)
        assert isinstance(e, kvmpy.BreakpointExit) and e.address == CODE
        assert cpu.regs.rax == 0, "stopped before the first instruction"
        snap = vm.snapshot()  # taken while stopped at the breakpoint
        assert snap.read(CODE, 3) == LOOP[:3]
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == 6
        for _ in range(2):
            vm.restore(snap)
            assert cpu.run(timeout=10).reason == "exit", "a restore resumes from it"
        cpu.set_regs(rip=CODE, rax=0)
        assert cpu.run(timeout=10).reason == "breakpoint"


def test_new_code_written_over_a_breakpoint_replaces_it() -> None:
    vm, (cpu,) = machine()
    with vm:
        cpu.add_breakpoint(ADD)
        vm.write(ADD, bytes([0x48, 0x29, 0xC8]))  # sub rax, rcx
        cpu.remove_breakpoint(ADD)
        assert vm.read(ADD, 3) == bytes([0x48, 0x29, 0xC8]), "the new code stays"
        assert cpu.run(timeout=10).reason == "exit" and cpu.regs.rax == (-6) & (2**64 - 1)


def test_an_exception_during_a_step_leaves_no_trap_flag_behind() -> None:
    # int3 (the guest's own); nop; out 0xf4, al
    vm, (cpu,) = machine(bytes([0xCC, 0x90, 0xE6, 0xF4]))
    with vm:
        cpu.add_breakpoint(CODE + 2)
        cpu.step()
        e = cpu.last_exit
        if STUBS:  # the stub reports the guest's #BP; running on returns after the int3
            assert isinstance(e, kvmpy.ExceptionExit) and e.name == "#BP"
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.BreakpointExit) and exit.address == CODE + 2
        assert cpu.run(timeout=10).reason == "exit"


def test_breakpoints_on_vcpus_running_in_parallel() -> None:
    # Each vCPU runs its own copy of the loop (one at CODE, one 0x100 later).
    vm, cpus = machine(LOOP + bytes(0x100 - len(LOOP)) + LOOP, cpus=2)
    with vm:
        cpus[1].set_regs(rip=CODE + 0x100, rdi=2)
        vm.add_breakpoint(DEC)
        vm.add_breakpoint(DEC + 0x100)
        seen: list[list[int]] = [[], []]
        for _ in range(3):
            for i, e in enumerate(vm.run(timeout=10)):
                if e.reason == "breakpoint":
                    assert isinstance(e, kvmpy.BreakpointExit)
                    assert e.address == DEC + 0x100 * i
                    seen[i].append(cpus[i].regs.rcx)
                else:
                    assert e.reason == "exit"
                    cpus[i].set_regs(rip=OUT + 0x100 * i)  # at its exit port from now on
        assert seen == [[3, 2, 1], [2, 1]]
        assert [c.regs.rax for c in cpus] == [6, 3]


def test_no_vcpu_misses_a_vm_wide_breakpoint_another_steps_over() -> None:
    # Both vCPUs run the same loop: inc qword [rbx]; dec rcx (the breakpoint); jnz; out.
    # Each counts its own iterations at rbx; a handler counts the hits each one reports.
    # While one vCPU steps over the breakpoint, the other must still stop at it.
    code = bytes([0x48, 0xFF, 0x03, 0x48, 0xFF, 0xC9, 0x75, 0xF8, 0xE6, 0xF4])
    data, rounds = 0x100000, 300
    vm, cpus = machine(code, cpus=2)
    with vm:
        for i, cpu in enumerate(cpus):
            cpu.set_regs(rbx=data + 8 * i, rcx=rounds)
        vm.add_breakpoint(CODE + 3)
        seen = [0, 0]

        @vm.on_breakpoint
        def count(exit: kvmpy.BreakpointExit) -> None:
            assert exit.address == CODE + 3
            seen[exit.vcpu_id] += 1

        exits = vm.run(timeout=60)
        assert [e.reason for e in exits] == ["exit", "exit"]
        counted = [int.from_bytes(vm.read(data + 8 * i, 8), "little") for i in range(2)]
        assert counted == [rounds, rounds], "each vCPU ran its loop to the end"
        assert seen == counted, "every pass over the breakpoint was reported"

        # Without a handler: each vCPU's run returns at the breakpoint, and the next run
        # steps over it, on two threads at once.
        vm.remove_handler(count)
        vm.write(data, bytes(16))
        for i, cpu in enumerate(cpus):
            cpu.set_regs(rip=CODE, rbx=data + 8 * i, rcx=rounds)

        def runs(i: int) -> None:
            while cpus[i].run(timeout=60).reason == "breakpoint":
                seen[i] += 1

        seen = [0, 0]
        threads = [threading.Thread(target=runs, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counted = [int.from_bytes(vm.read(data + 8 * i, 8), "little") for i in range(2)]
        assert counted == [rounds, rounds] and seen == counted


def _run_while_another_thread_toggles_a_breakpoint(
    code: bytes, data: int, rounds: int, at: int = CODE + 3
) -> kvmpy.Console:
    vm, (_, cpu) = machine(code, cpus=2)
    with vm:
        console = vm.add_console(0x77)
        cpu.set_regs(rbx=data, rcx=rounds, rdx=0x77)
        hits = []

        @vm.on_breakpoint
        def count(exit: kvmpy.BreakpointExit) -> None:
            hits.append(exit.address)

        done, toggled = threading.Event(), threading.Event()

        def toggle() -> None:
            while not done.is_set():
                vm.add_breakpoint(at)
                vm.remove_breakpoint(at)
                toggled.set()

        t = threading.Thread(target=toggle)
        t.start()
        toggled.wait()
        try:
            e = cpu.run(timeout=30)
        finally:
            done.set()
            t.join()
        assert e.reason == "exit", e
        assert int.from_bytes(vm.read(data, 8), "little") == rounds
        assert set(hits) <= {at}
        assert vm.read(CODE, len(code)) == code and vm.breakpoints == []
    return console


def test_a_breakpoint_removed_while_a_vcpu_runs_over_it_is_never_an_io_exit() -> None:
    # vCPU 1 loops over a VM-wide breakpoint that another thread sets and removes again
    # and again (vCPU 0, idle, translates it). A vCPU that trapped at the patch just
    # before its removal must run the original instruction, not take the trap for the
    # guest's own instruction (an `out dx, al` here, or the guest's `int3`).
    code = bytes([0x48, 0xFF, 0x03, 0x48, 0xFF, 0xC9, 0x75, 0xF8, 0xE6, 0xF4])
    for _ in range(20):
        _run_while_another_thread_toggles_a_breakpoint(code, 0x100000, 3_000_000)


def test_a_removed_breakpoint_on_a_port_write_runs_the_write_exactly_once() -> None:
    # The breakpoint is on the loop's `out dx, al`, the very byte of the port-io patch:
    # whether a vCPU ran the patch or the original there, the guest wrote once. Each OUT
    # reaches the console exactly once, and the loop ends (no write re-run forever).
    # inc qword [rbx]; out dx, al; dec rcx; jnz -9; out 0xf4, al
    code = bytes([0x48, 0xFF, 0x03, 0xEE, 0x48, 0xFF, 0xC9, 0x75, 0xF7, 0xE6, 0xF4])
    for _ in range(10):
        console = _run_while_another_thread_toggles_a_breakpoint(code, 0x100000, 2000)
        assert len(console.output()) == 2000


def test_stepping_over_a_breakpoint_on_a_port_write_writes_once() -> None:
    # mov dx, 0x77; out dx, al; out 0xf4, al: the breakpoint is on `out dx, al`.
    code = bytes([0x66, 0xBA, 0x77, 0x00, 0xEE, 0xE6, 0xF4])
    vm, (cpu,) = machine(code)
    with vm:
        calls = []
        vm.on_io(0x77, lambda e: calls.append(e.data))
        cpu.add_breakpoint(CODE + 4)
        e = cpu.run(timeout=10)
        assert e.reason == "breakpoint" and cpu.regs.rip == CODE + 4 and calls == []
        assert cpu.step() == CODE + 5 and len(calls) == 1
        cpu.set_regs(rip=CODE + 4)
        assert cpu.run(timeout=10).reason == "breakpoint", "set by hand: hit again"
        e = cpu.run(timeout=10)
        assert e.reason == "exit" and len(calls) == 2


def test_a_breakpoint_on_outsb_is_refused_where_the_patch_is_a_port_write() -> None:
    # mov dx, 0x77; outsb; out 0xf4, al
    code = bytes([0x66, 0xBA, 0x77, 0x00, 0x6E, 0xE6, 0xF4])
    vm, (cpu,) = machine(code)
    with vm:
        console = vm.add_console(0x77)
        cpu.set_regs(rsi=CODE)
        if _debug_support()["breakpoints"] == "port-io":
            with pytest.raises(kvmpy.KvmUnsupported, match="outsb"):
                cpu.add_breakpoint(CODE + 4)
            assert cpu.breakpoints == [] and vm.read(CODE, len(code)) == code
        else:
            cpu.add_breakpoint(CODE + 4)
            assert cpu.run(timeout=10).reason == "breakpoint"
        assert cpu.run(timeout=10).reason == "exit"
        assert console.output() == code[:1], "outsb wrote the byte at RSI once"


def test_steps_and_traces_go_one_instruction_at_a_time_over_port_io_and_mmio() -> None:
    # out dx, al; in al, dx; mov [0x300000], al (MMIO); out 0x77, al; nop; out 0xf4, al.
    # Each access is completed by a handler: the step ends right after its instruction
    # (where the host drops the #DB of such an instruction, kvmpy ends the step itself).
    code = bytes.fromhex("eeec88042500003000e67790e6f4")
    vm, (cpu,) = machine(code)
    with vm:
        io: list[tuple[bool, bytes]] = []
        mmio: list[bytes] = []

        def port(e: kvmpy.IoExit) -> int | None:
            io.append((e.is_write, e.data))
            return None if e.is_write else 5

        vm.on_io(0x77, port)
        vm.on_mmio(0x300000, 0x1000, lambda e: mmio.append(e.data))
        cpu.set_regs(rdx=0x77, rax=0x41, rip=CODE)
        rips = [cpu.step() - CODE for _ in range(5)]
        assert rips == [1, 2, 9, 0xB, 0xC]
        assert io == [(True, b"\x41"), (False, b""), (True, b"\x05")] and mmio == [b"\x05"]
        assert cpu.regs.rflags & 0x100 == 0, "kvmpy's TF is gone after each step"
        cpu.set_regs(rip=CODE)
        assert [rip - CODE for rip, _, _ in cpu.trace(count=5)] == [0, 1, 2, 9, 0xB]
        assert cpu.regs.rip == CODE + 0xC
        assert cpu.run(timeout=10).reason == "exit"


def _two_vcpus_under_random_breakpoints(code: bytes, rng: random.Random, rounds: int) -> None:
    vm, (_, *cpus) = machine(code, cpus=3)
    with vm:
        outs = [0, 0]

        def out(e: kvmpy.IoExit) -> None:
            outs[e.vcpu_id - 1] += 1

        vm.on_io(0x77, out)
        vm.on_breakpoint(lambda e: None)
        for i, cpu in enumerate(cpus):
            cpu.set_regs(rbx=0x100000 + 8 * i, rcx=rounds, rdx=0x77, rip=CODE)

        def toggle(done: threading.Event) -> None:
            while not done.is_set():
                at = rng.choice([CODE, CODE + 3, CODE + 4, CODE + 7])
                vm.add_breakpoint(at)
                time.sleep(rng.random() * 1e-4)
                vm.remove_breakpoint(at)

        _check_loops(vm, run_beside(cpus, toggle), outs, rounds)
        assert vm.read(CODE, len(code)) == code and vm.breakpoints == []


def _check_loops(vm: kvmpy.Vm, ends: list[kvmpy.ExitInfo], outs: list[int], rounds: int) -> None:
    """Both vCPUs ran their loop to the exit port, each OUT and increment once."""
    assert [e.reason for e in ends] == ["exit", "exit"]
    counted = [int.from_bytes(vm.read(0x100000 + 8 * i, 8), "little") for i in range(2)]
    assert counted == outs == [rounds, rounds]


def test_random_breakpoints_under_two_stepping_vcpus_leave_the_code_intact() -> None:
    # Two vCPUs loop over four VM-wide breakpoints that another thread sets and removes
    # at random (vCPU 0, idle, translates them): a step over one (its patch out, then
    # back) races its removal. Every loop runs as written (each OUT once) and no patch
    # byte is left behind in memory.
    # inc qword [rbx]; out dx, al; dec rcx; jnz -9; out 0xf4, al
    code = bytes([0x48, 0xFF, 0x03, 0xEE, 0x48, 0xFF, 0xC9, 0x75, 0xF7, 0xE6, 0xF4])
    rng = random.Random(7)
    for _ in range(8):
        _two_vcpus_under_random_breakpoints(code, rng, 3000)


def _two_vcpus_stopped_at_random(code: bytes, rng: random.Random, rounds: int) -> None:
    vm, cpus = machine(code, cpus=2)
    with vm:
        outs, hits = [0, 0], [0, 0]

        def out(e: kvmpy.IoExit) -> None:
            outs[e.vcpu_id] += 1

        def hit(e: kvmpy.BreakpointExit) -> None:
            hits[e.vcpu_id] += 1

        vm.on_io(0x77, out)
        vm.on_breakpoint(hit)
        vm.add_breakpoint(CODE + 3)
        vm.add_breakpoint(CODE + 4)
        for i, cpu in enumerate(cpus):
            cpu.set_regs(rbx=0x100000 + 8 * i, rcx=rounds, rdx=0x77, rip=CODE)

        def stopper(done: threading.Event) -> None:
            while not done.is_set():
                time.sleep(rng.random() * 2e-3)
                rng.choice(cpus).stop()

        _check_loops(vm, run_beside(cpus, stopper, again="stopped"), outs, rounds)
        assert hits == [2 * rounds, 2 * rounds], "each breakpoint hit reported once"
        assert vm.read(CODE, len(code)) == code


def test_stops_at_random_never_lose_or_repeat_a_breakpoint_or_a_step() -> None:
    # Two vCPUs loop over two VM-wide breakpoints (stepped over under all-stop) while
    # another thread stops one of them at random; each run is started again until the
    # guest exits. A stop that comes while a vCPU waits to step over a breakpoint it
    # reported, or while its step's #DB is inside the exception stub, must neither
    # report that breakpoint again nor leave the #DB to a later run.
    # inc qword [rbx]; out dx, al; dec rcx; jnz -9; out 0xf4, al
    code = bytes([0x48, 0xFF, 0x03, 0xEE, 0x48, 0xFF, 0xC9, 0x75, 0xF7, 0xE6, 0xF4])
    rng = random.Random(11)
    for _ in range(4):
        _two_vcpus_stopped_at_random(code, rng, 2000)
