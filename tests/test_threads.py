"""Several vCPUs on native threads: start/join/run/stop, failures, interrupts, leaks."""

from __future__ import annotations

import gc
import os
import textwrap
import threading
from collections.abc import Callable

import pytest

import kvmpy

from .support import (
    ANNOUNCE_RUNNING,
    DEV_OUT,
    EXIT_PORT,
    LONG_LOAD,
    MARK,
    MARK_AND_SPIN,
    SPIN_OFFSET,
    When,
    counts_up,
    interrupt_script,
    marked,
    open_fds,
    real_mode_vm,
    user_mode_vm,
    wait_for_guests,
    wait_until,
)

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]

COUNT, WAIT, SET = LONG_LOAD, LONG_LOAD + 0x100, LONG_LOAD + 0x200
COUNTER, FLAG = 0x20000, 0x20010
JMP_SELF = bytes([0xEB, 0xFE])
SPINNERS = [(LONG_LOAD, {"rdi": MARK}), (LONG_LOAD, {"rdi": MARK + 8})]  # with MARK_AND_SPIN


def smp_vm(
    code: bytes, entries: list[tuple[int, dict[str, int]]]
) -> tuple[kvmpy.Vm, list[kvmpy.Vcpu]]:
    """A VM with `code` at 0x10000 and one 64-bit user-mode vCPU per (rip, regs) entry."""
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
    vm.add_exit_port(EXIT_PORT)
    cpus = []
    for rip, regs in entries:
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=rip, **regs)
        cpus.append(cpu)
    return vm, cpus


def vcpu_threads() -> int:
    """The process's kvmpy vCPU threads (named kvmpy-vcpuN)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().startswith("kvmpy-vcpu")
        except OSError:
            pass  # the thread ended meanwhile
    return count


def vcpu_thread_states() -> list[str]:
    """The scheduler states (R, S, ...) of the process's kvmpy vCPU threads."""
    states = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if comm.startswith("kvmpy-vcpu"):
            states.append(rest.split()[0])
    return states


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024


def test_vcpus_share_memory_and_count_atomically(guest: Guest) -> None:
    n, k = 200_000, 3
    vm, cpus = smp_vm(guest("smp64"), [(COUNT, {"rdi": n, "rsi": k})] * k)
    with vm:
        totals: list[tuple[int, int]] = []
        vm.on_io(DEV_OUT, lambda e: totals.append((e.vcpu_id, e.value)))
        exits = vm.run(timeout=60)
        assert [e.reason for e in exits] == ["exit"] * k
        assert [e.vcpu_id for e in exits] == [0, 1, 2]
        assert int.from_bytes(vm.read(COUNTER, 8), "little") == n * k
        # After the barrier every vCPU saw the final total.
        assert sorted(totals) == [(i, n * k) for i in range(k)]
        assert [c.last_exit.reason for c in cpus] == ["exit"] * k  # type: ignore[union-attr]


def test_a_vcpu_waits_for_a_flag_another_sets(guest: Guest) -> None:
    vm, cpus = smp_vm(guest("smp64"), [(WAIT, {}), (SET, {"rdi": 0xC0FFEE, "rsi": 1_000_000})])
    with vm:
        seen: list[int] = []
        vm.on_io(DEV_OUT, lambda e: seen.append(e.value))
        exits = vm.run(timeout=60)
        assert [e.reason for e in exits] == ["exit", "exit"]
        assert seen == [0xC0FFEE]


def test_start_join_and_stop() -> None:
    vm, cpus = smp_vm(MARK_AND_SPIN, SPINNERS)
    with vm:
        vm.start()
        assert vm.started
        wait_for_guests(vm, 2)
        assert vm.join(timeout=0.1) is None  # still running
        with pytest.raises(kvmpy.VcpuBusyError, match="join"):
            vm.start()
        with pytest.raises(kvmpy.VcpuBusyError):
            cpus[0].run(timeout=0.1)
        with pytest.raises(kvmpy.VcpuBusyError):
            _ = cpus[1].regs
        vm.stop()
        exits = vm.join(timeout=10)
        assert exits is not None and [e.reason for e in exits] == ["stopped", "stopped"]
        assert not vm.started
        # State is readable after the stop: both were stopped in their `jmp $`.
        assert all(c.regs.rip == LONG_LOAD + SPIN_OFFSET for c in cpus)
        assert all(c.sregs.cs.dpl == 3 for c in cpus)
        with pytest.raises(ValueError, match="nothing to join"):
            vm.join()


def test_timeout_applies_to_each_vcpu() -> None:
    vm, _ = smp_vm(JMP_SELF, [(LONG_LOAD, {})] * 2)
    with vm:
        exits = vm.run(timeout=0.2)
        assert [e.reason for e in exits] == ["timeout", "timeout"]


def test_one_vcpu_stopping_alone_or_stopping_all(guest: Guest) -> None:
    code = guest("smp64")
    # vCPU 0 finishes quickly (SET with no delay), vCPU 1 waits on a flag nobody sets...
    vm, _ = smp_vm(code, [(SET, {"rdi": 0, "rsi": 0}), (WAIT, {})])
    with vm:
        exits = vm.run(timeout=0.3)  # until="all": vCPU 1 runs on until its timeout
        assert [e.reason for e in exits] == ["exit", "timeout"]
    vm, _ = smp_vm(code, [(SET, {"rdi": 0, "rsi": 0}), (WAIT, {})])
    with vm:
        exits = vm.run(timeout=30, until="any")  # the first to stop stops the others
        assert [e.reason for e in exits] == ["exit", "stopped"]
    with kvmpy.Vm() as vm, pytest.raises(ValueError, match="until"):
        vm.create_vcpu()
        vm.start(until="some")  # type: ignore[arg-type]


def test_handler_exception_stops_every_vcpu(guest: Guest) -> None:
    # vCPU 0 waits for FLAG, then OUTs it to 0x11, whose handler raises. By then vCPU 1
    # spins in `jmp $`, vCPU 2 loops on exits handled in Rust, and vCPU 3 has ended through
    # the exit port; none of the first three would ever end on its own.
    code = guest("smp64")
    vm, cpus = smp_vm(
        code,
        [(WAIT, {}), (0x30000, {"rdi": MARK}), (0x30010, {"rdi": MARK + 8}), (0x30020, {})],
    )

    class Boom(Exception):
        pass

    def explode(exit: kvmpy.IoExit) -> None:
        raise Boom(f"vCPU {exit.vcpu_id}")

    with vm:
        vm.write(0x30000, MARK_AND_SPIN)
        vm.write(0x30010, bytes([0x48, 0xFF, 0x07, 0xE6, 0x12, 0xEB, 0xFC]))  # mark; out 0x12
        vm.write(0x30020, bytes([0xE6, EXIT_PORT]))  # out 0xf4, al
        vm.add_console(0x12, limit=16)
        vm.on_io(DEV_OUT, explode)
        release = When(
            lambda: marked(vm, 2) and cpus[3].last_exit is not None,
            lambda: vm.write(FLAG, (1).to_bytes(8, "little")),
            "vCPUs 1 and 2 to run and vCPU 3 to finish",
        )
        with pytest.raises(Boom, match="vCPU 0"):
            vm.run(timeout=60)
        release.join()
        assert not vm.started
        reasons = [None if c.last_exit is None else str(c.last_exit.reason) for c in cpus]
        # The raiser's run ended with the exception; the ones still running were stopped
        # (not timed out); the one that had finished keeps its exit.
        assert reasons == [None, "stopped", "stopped", "exit"]


def test_handler_exception_interrupts_vcpus_in_tight_loops(guest: Guest) -> None:
    # vCPU 1 sets FLAG (MARK_AND_SPIN with RDI = FLAG) and spins in `jmp $`; vCPU 0 waits
    # for FLAG and OUTs it to 0x11, whose handler raises while vCPU 1 spins.
    vm, cpus = smp_vm(guest("smp64"), [(WAIT, {}), (0x30000, {"rdi": FLAG})])
    with vm:
        vm.write(0x30000, MARK_AND_SPIN)
        vm.on_io(DEV_OUT, lambda e: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            vm.run(timeout=60)
        spinner = cpus[1].last_exit
        # "stopped", not "timeout": the spinner was kicked out, not waited for.
        assert spinner is not None and spinner.reason == "stopped"
        assert cpus[1].regs.rip == 0x30000 + SPIN_OFFSET


def test_vcpu_interrupt_wakes_a_running_guest() -> None:
    # Real mode, no irqchip: sti ; inc word [0x2000] ; jmp $
    # ISR at 0x1100: mov al, 9 ; out 0xf4, al
    vm, cpu = real_mode_vm(bytes([0xFB, 0xFF, 0x06, 0x00, 0x20, 0xEB, 0xFE]))
    with vm:
        ram = vm.memory_regions[0]
        ram.write(0x1100, bytes([0xB0, 0x09, 0xE6, EXIT_PORT]))
        ram.write(0x40 * 4, (0x1100).to_bytes(2, "little") + bytes(2))
        vm.add_exit_port(EXIT_PORT)
        vm.start(timeout=30)
        # Once the word is marked, the guest spins in `jmp $` with interrupts enabled.
        wait_until(lambda: ram.read(0x2000, 2) != bytes(2), "the guest to run")
        cpu.interrupt(0x40)
        exits = vm.join(timeout=30)
        assert exits is not None
        assert isinstance(exits[0], kvmpy.GuestExit) and exits[0].code == 9
        with pytest.raises(ValueError, match="outside 0..255"):
            cpu.interrupt(256)


def test_halted_guest_wakes_on_an_interrupt_queued_by_its_hlt_handler() -> None:
    # sti ; hlt ; mov al, 1 ; out 0xf4, al     ISR: mov al, 0x99 ; out 0x11, al ; iret
    vm, cpu = real_mode_vm(bytes([0xFB, 0xF4, 0xB0, 0x01, 0xE6, EXIT_PORT]))
    with vm:
        ram = vm.memory_regions[0]
        ram.write(0x1100, bytes([0xB0, 0x99, 0xE6, DEV_OUT, 0xCF]))
        ram.write(0x40 * 4, (0x1100).to_bytes(2, "little") + bytes(2))
        vm.add_exit_port(EXIT_PORT)
        seen: list[int] = []
        vm.on_io(DEV_OUT, lambda e: seen.append(e.value))
        vm.on_hlt(lambda e: cpu.interrupt(0x40))
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 1
        assert seen == [0x99]


def test_an_interrupt_queued_by_an_out_handler_comes_before_the_next_out() -> None:
    # Back-to-back OUTs are handled in one stretch of the run loop; an interrupt the handler
    # of the first queues must still be injected before the second.
    # sti ; mov al, 1 ; out 0x11, al ; mov al, 2 ; out 0x11, al ; mov al, 3 ; out 0xf4, al
    code = bytes([0xFB, 0xB0, 1, 0xE6, DEV_OUT, 0xB0, 2, 0xE6, DEV_OUT, 0xB0, 3, 0xE6, EXIT_PORT])
    vm, cpu = real_mode_vm(code)
    with vm:
        ram = vm.memory_regions[0]
        ram.write(0x1100, bytes([0xB0, 0x99, 0xE6, DEV_OUT, 0xCF]))  # ISR: OUT 0x99 ; iret
        ram.write(0x40 * 4, (0x1100).to_bytes(2, "little") + bytes(2))
        vm.add_exit_port(EXIT_PORT)
        seen: list[int] = []

        def handler(e: kvmpy.IoExit) -> None:
            seen.append(e.value)
            if e.value == 1:
                cpu.interrupt(0x40)

        vm.on_io(DEV_OUT, handler)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 3
        assert seen == [1, 0x99, 2]


def test_a_stop_requested_by_an_out_handler_ends_the_run_before_the_next_out() -> None:
    # mov al, 1 ; out 0x11, al ; mov al, 2 ; out 0x11, al ; mov al, 3 ; out 0xf4, al
    code = bytes([0xB0, 1, 0xE6, DEV_OUT, 0xB0, 2, 0xE6, DEV_OUT, 0xB0, 3, 0xE6, EXIT_PORT])
    vm, cpu = real_mode_vm(code)
    with vm:
        vm.add_exit_port(EXIT_PORT)
        seen: list[int] = []

        def handler(e: kvmpy.IoExit) -> None:
            seen.append(e.value)
            if e.value == 1:
                cpu.stop()

        vm.on_io(DEV_OUT, handler)
        assert cpu.run(timeout=10).reason == "stopped"
        # The first OUT is complete, the second not begun.
        assert seen == [1] and cpu.regs.rip == 0x1000 + 4
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 3
        assert seen == [1, 2]


def test_handlers_of_one_vcpu_run_on_whichever_thread_runs_it_next() -> None:
    # The handler path keeps where the running thread's interpreter state lies for the
    # length of a run; a later run on another thread (the first one gone by then, or a
    # thread of vm.start()) must find its own, or it would restore a dead thread's state.
    # mov al, 1 ; out 0x11, al ; mov al, 2 ; out 0x11, al ; mov al, 3 ; out 0xf4, al
    code = bytes([0xB0, 1, 0xE6, DEV_OUT, 0xB0, 2, 0xE6, DEV_OUT, 0xB0, 3, 0xE6, EXIT_PORT])
    vm, cpu = real_mode_vm(code)
    with vm:
        vm.add_exit_port(EXIT_PORT)
        seen: list[tuple[int, int]] = []
        vm.on_io(DEV_OUT, lambda e: seen.append((threading.get_ident(), e.value)))

        def run_here() -> int:
            cpu.set_regs(rip=0x1000)
            exit = cpu.run(timeout=10)
            assert isinstance(exit, kvmpy.GuestExit) and exit.code == 3
            return threading.get_ident()

        runners: list[int] = []
        for where in ("thread", "main", "thread", "start", "main"):
            if where == "main":
                runners.append(run_here())
            elif where == "thread":
                t = threading.Thread(target=lambda: runners.append(run_here()))
                t.start()
                t.join()
            else:
                cpu.set_regs(rip=0x1000)
                vm.start(timeout=10)
                (exit,) = vm.join()
                assert isinstance(exit, kvmpy.GuestExit) and exit.code == 3
                runners.append(seen[-1][0])
        # Each run's handler ran on the thread that ran the vCPU (a new thread may get
        # the ident of one that has ended, so idents alone do not tell the threads apart).
        assert len(runners) == 5 and runners[1] == runners[4] == threading.get_ident()
        assert seen == [(r, v) for r in runners for v in (1, 2)]


def test_a_handler_runs_with_its_own_threads_state_after_the_vcpu_changed_threads() -> None:
    # vCPU A runs on thread T, then T runs vCPU B (and stays in that run, without the
    # GIL) while the main thread runs A: A's handler must run with the main thread's
    # interpreter state (its threading.local), not with T's, which A's last run saw.
    code = bytes([0xB0, 1, 0xE6, DEV_OUT, 0xB0, 3, 0xE6, EXIT_PORT])  # OUT 1 ; exit 3
    vm_a, cpu_a = real_mode_vm(code)
    vm_b, cpu_b = real_mode_vm(bytes([0xB0, 1, 0xE6, DEV_OUT]) + JMP_SELF)  # OUT 1 ; spin
    with vm_a, vm_b:
        vm_a.add_exit_port(EXIT_PORT)
        local = threading.local()
        names: list[str] = []
        vm_a.on_io(DEV_OUT, lambda e: names.append(local.name))
        b_running = threading.Event()
        vm_b.on_io(DEV_OUT, lambda e: b_running.set())
        b_exit: list[kvmpy.ExitInfo] = []

        def on_t() -> None:
            local.name = "t"
            assert cpu_a.run(timeout=10).reason == "exit"
            b_exit.append(cpu_b.run(timeout=30))

        t = threading.Thread(target=on_t)
        t.start()
        try:
            assert b_running.wait(10)
            local.name = "main"
            cpu_a.set_regs(rip=0x1000)
            assert cpu_a.run(timeout=10).reason == "exit"
        finally:
            cpu_b.stop()
            t.join()
        assert names == ["t", "main"]
        assert b_exit[0].reason == "stopped"


def test_irqchip_line_wakes_a_halted_guest() -> None:
    # Program the PIC (vector base 0x40, only IRQ3 unmasked), sti, tell the host, hlt loop.
    pic = bytes(
        [
            0xB0,
            0x11,
            0xE6,
            0x20,
            0xB0,
            0x40,
            0xE6,
            0x21,
            0xB0,
            0x04,
            0xE6,
            0x21,
            0xB0,
            0x01,
            0xE6,
            0x21,
            0xB0,
            0xF7,
            0xE6,
            0x21,
        ]
    )
    main = pic + bytes([0xFB, 0xB0, ord("R"), 0xE6, 0x12, 0xF4, 0xEB, 0xFD])
    isr = bytes([0xB0, 0x20, 0xE6, 0x20, 0xB0, 0x07, 0xE6, EXIT_PORT, 0xCF])  # EOI; exit 7
    with kvmpy.Vm(irqchip=True) as vm:
        assert vm.irqchip
        ram = vm.add_memory(0, 0x80000)
        ram.write(0x1000, main)
        ram.write(0x1100, isr)
        ram.write(0x43 * 4, (0x1100).to_bytes(2, "little") + bytes(2))
        cpu = vm.create_vcpu()
        cpu.setup_real_mode(ip=0x1000)
        vm.add_exit_port(EXIT_PORT)
        ready = vm.add_console(0x12)
        halts: list[kvmpy.Exit] = []
        vm.on_hlt(halts.append)  # never called: the kernel handles HLT with an irqchip
        vm.start(timeout=30)
        wait_until(ready.output, "the guest to program the PIC")
        # After its OUT the vCPU thread only re-enters KVM_RUN, where the guest halts: once
        # the thread sleeps, it sleeps in the in-kernel HLT.
        wait_until(lambda: vcpu_thread_states() == ["S"], "the guest to halt")
        vm.set_irq_line(3, True)
        vm.set_irq_line(3, False)
        exits = vm.join(timeout=30)
        assert exits is not None and isinstance(exits[0], kvmpy.GuestExit)
        assert exits[0].code == 7
        assert halts == []
        with pytest.raises(ValueError, match="irqchip"):
            cpu.interrupt(0x40)
    with kvmpy.Vm() as plain, pytest.raises(ValueError, match="no in-kernel irqchip"):
        plain.set_irq_line(3, True)
    with pytest.raises(ValueError, match="pit=True needs irqchip"):
        kvmpy.Vm(pit=True)
    kvmpy.Vm(irqchip=True, pit=True).close()


def test_close_while_running_stops_the_vcpus() -> None:
    before = vcpu_threads()
    vm, _ = smp_vm(MARK_AND_SPIN, SPINNERS)
    vm.start()
    wait_for_guests(vm, 2)
    assert vcpu_threads() == before + 2
    vm.close()
    assert vcpu_threads() == before
    assert vm.closed


def test_dropping_the_last_reference_stops_the_vcpus() -> None:
    gc.collect()
    before_tasks, before_fds = vcpu_threads(), open_fds()
    vm, cpus = smp_vm(MARK_AND_SPIN, SPINNERS)
    vm.start()
    wait_for_guests(vm, 2)
    assert vcpu_threads() == before_tasks + 2
    del vm, cpus
    gc.collect()
    assert vcpu_threads() == before_tasks
    assert open_fds() == before_fds


@pytest.mark.parametrize("action", ["close", "join"])
def test_handler_closing_or_joining_its_vm_gets_an_error(guest: Guest, action: str) -> None:
    vm, _ = smp_vm(guest("smp64"), [(WAIT, {})])
    with vm:
        vm.write(FLAG, (1).to_bytes(8, "little"))  # the waiter OUTs to 0x11 at once
        vm.on_io(DEV_OUT, lambda e: getattr(vm, action)())
        with pytest.raises(kvmpy.VcpuBusyError, match=f"cannot {action} the VM from a handler"):
            vm.run(timeout=30)
        assert not vm.closed


def test_stress_eight_vcpus_with_python_handlers(guest: Guest) -> None:
    n, k = 300, 8
    vm = kvmpy.Vm()
    code = guest("counter64")
    with vm:
        vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
        vm.add_exit_port(EXIT_PORT)
        counts = [0] * k
        values: list[list[int]] = [[] for _ in range(k)]

        @vm.on_io(DEV_OUT)
        def count(exit: kvmpy.IoExit) -> None:
            counts[exit.vcpu_id] += 1
            values[exit.vcpu_id].append(exit.value)

        for _ in range(k):
            cpu = vm.create_vcpu()
            cpu.setup_long_mode(user=True)
            cpu.set_regs(rip=LONG_LOAD, rdi=n)
        exits = vm.run(timeout=120)
        assert [e.reason for e in exits] == ["exit"] * k
        assert counts == [n] * k
        assert all(v == [i & 0xFF for i in range(n)] for v in values)
        assert sum(c.stats()["handler_calls"] for c in vm.vcpus) == n * k


def test_create_run_close_cycles_keep_fds_and_memory_flat(guest: Guest) -> None:
    code = guest("smp64")

    def cycle() -> None:
        vm, _ = smp_vm(code, [(LONG_LOAD + 0x300, {})] * 2)
        with vm:
            assert [e.reason for e in vm.run(timeout=30)] == ["exit", "exit"]

    assert_cycles_stay_flat(cycle, rss_mib=16)


def assert_cycles_stay_flat(cycle: Callable[[], None], rss_mib: int) -> None:
    """Runs `cycle` 1,000 times after 50 to warm up: fds and vCPU threads stay as they
    were, RSS grows by less than `rss_mib` MiB."""
    for _ in range(50):  # warm up allocator pools
        cycle()
    gc.collect()
    fds, rss, tasks = open_fds(), rss_kib(), vcpu_threads()
    for _ in range(1000):
        cycle()
    gc.collect()
    assert open_fds() == fds
    assert vcpu_threads() == tasks
    grown = rss_kib() - rss
    assert grown < rss_mib * 1024, f"RSS grew by {grown} KiB over 1,000 cycles"


CTRL_C_SCRIPT = ANNOUNCE_RUNNING + textwrap.dedent(
    f"""
    import sys, kvmpy
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write({LONG_LOAD:#x}, {MARK_AND_SPIN!r})
    cpus = [vm.create_vcpu() for _ in range(2)]
    for i, c in enumerate(cpus):
        c.setup_long_mode(user=True)
        c.set_regs(rip={LONG_LOAD:#x}, rdi={MARK:#x} + 8 * i)
    announce(vm, count=2)
    try:
        vm.run(timeout=60)
    except KeyboardInterrupt:
        print("interrupted", [str(c.last_exit.reason) for c in cpus], flush=True)
        print("at", [hex(c.regs.rip) for c in cpus], flush=True)
        sys.exit(3)
    """
)


def test_ctrl_c_stops_every_vcpu() -> None:
    out, status = interrupt_script(CTRL_C_SCRIPT)
    spin = hex(LONG_LOAD + SPIN_OFFSET)
    assert out == f"interrupted ['stopped', 'stopped']\nat ['{spin}', '{spin}']"
    assert status == 3


def test_vcpus_run_in_parallel_with_the_main_thread(guest: Guest) -> None:
    """vm.start() returns while the guest runs, and the guest goes on producing output
    while the main thread runs Python: the main thread takes it, piece by piece."""
    vm, cpu = user_mode_vm(guest("counter64"), rdi=2**62)  # practically endless
    with vm:
        console = vm.add_console(DEV_OUT, limit=1 << 20)
        vm.start(timeout=60)
        pieces: list[bytes] = []

        def took_another() -> bool:
            piece = console.take()
            if piece:
                pieces.append(piece)
            return len(pieces) == 3

        wait_until(took_another, "three pieces of output")
        assert vm.join(timeout=0) is None  # still running
        vm.stop()
        exits = vm.join(timeout=30)
        assert exits is not None and [e.reason for e in exits] == ["stopped"]
        assert all(counts_up(p) for p in pieces)
        assert cpu.stats()["exits"] > sum(len(p) for p in pieces)


def test_stop_during_a_handler_completes_the_pending_in(guest: Guest) -> None:
    """vm.stop() while an IN handler runs: the answered IN is completed before the run
    ends, so the registers read afterwards hold the value and RIP is past the IN."""
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:

        @vm.on_io(0x10)
        def answer(exit: kvmpy.IoExit) -> int:
            vm.stop()
            return 0x1234

        exits = vm.run(timeout=30)
        assert exits[0].reason == "stopped"
        regs = cpu.regs
        assert regs.rax & 0xFFFFFFFF == 0x1234
        assert guest("double_real")[regs.rip - 0x1000 - 1] == 0xED  # just after `in eax, dx`


def test_run_cycles_with_python_handlers_keep_memory_flat() -> None:
    """A vCPU thread keeps an interpreter thread state while it runs Python handlers and
    frees it as it ends: 1,000 runs of two vCPU threads leave RSS, fds and threads flat."""
    # out 0x11, al (a Python handler) ; out 0xf4, al (exit)
    code = bytes([0xE6, DEV_OUT, 0xE6, EXIT_PORT])
    calls = [0]

    def cycle() -> None:
        with kvmpy.Vm() as vm:
            vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
            vm.add_exit_port(EXIT_PORT)
            vm.on_io(DEV_OUT, lambda e: calls.__setitem__(0, calls[0] + 1))
            for _ in range(2):
                cpu = vm.create_vcpu()
                cpu.setup_long_mode(user=True)
                cpu.set_regs(rip=LONG_LOAD)
            assert [e.reason for e in vm.run(timeout=30)] == ["exit", "exit"]

    assert_cycles_stay_flat(cycle, rss_mib=8)
    assert calls[0] == 2 * 1050
