"""Snapshots: `vm.snapshot()` captures a whole VM, `vm.restore()` puts it back exactly."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvmpy

from .support import EXIT_PORT, LONG_LOAD, open_fds

pytestmark = pytest.mark.kvm

INPUT = 0x20000  # the qword snapshot64.S reads to choose what it does
DATA = 0x100000  # where snapshot64.S writes its pages
RAM = 2 << 20
DUMP_CODE = 0x18000  # a program that stores XMM0-15, MXCSR and the x87 control word
DUMP = 0x1F0000
RANDOM_CODE = 0x19000
MSR_SYSENTER_CS = 0x174
MSR_KERNEL_GS_BASE = 0xC0000102


def dump_program() -> bytes:
    code = b""
    for i in range(16):  # movdqu [DUMP + 16 * i], xmm<i>
        rex = b"\x44" if i >= 8 else b""
        code += b"\xf3" + rex + b"\x0f\x7f" + bytes([0x04 | (i & 7) << 3, 0x25])
        code += struct.pack("<I", DUMP + 16 * i)
    code += b"\x0f\xae\x1c\x25" + struct.pack("<I", DUMP + 0x100)  # stmxcsr
    code += b"\xd9\x3c\x25" + struct.pack("<I", DUMP + 0x104)  # fnstcw
    return code + b"\xe6\xf4"  # out 0xf4, al


def random_program(rng: random.Random) -> bytes:
    """Random CPL3 code that changes general registers, flags, XMM registers and memory
    in the data area, then exits through the exit port."""
    code = b""
    for _ in range(rng.randrange(1, 40)):
        kind = rng.randrange(4)
        r = rng.choice([x for x in range(16) if x != 4])  # leave RSP alone
        if kind == 0:  # mov r64, imm64
            code += bytes([0x48 | (r >> 3), 0xB8 + (r & 7)]) + struct.pack(
                "<Q", rng.getrandbits(64)
            )
        elif kind == 1:  # mov [disp32], r64 somewhere in the data area
            addr = DATA + rng.randrange(0, 0xE0000, 8)
            code += bytes([0x48 | (r >> 3) << 2, 0x89, 0x04 | (r & 7) << 3, 0x25])
            code += struct.pack("<I", addr)
        elif kind == 2:  # movq xmm<x>, r64
            x = rng.randrange(16)
            code += bytes([0x66, 0x48 | (x >> 3) << 2 | (r >> 3), 0x0F, 0x6E])
            code += bytes([0xC0 | (x & 7) << 3 | (r & 7)])
        else:  # add r64, r64 (flags)
            s = rng.choice([x for x in range(16) if x != 4])
            code += bytes([0x48 | (s >> 3) << 2 | (r >> 3), 0x01, 0xC0 | (s & 7) << 3 | (r & 7)])
    return code + b"\xe6\xf4"


# Every test runs with KVM's dirty bitmap and again with its dirty ring (`dirty_ring=N`)
# tracking the pages the guest writes.
RING: int | None = None


@pytest.fixture(autouse=True, params=[None, 4096], ids=["bitmap", "ring"])
def tracking(request: pytest.FixtureRequest) -> Iterator[int | None]:
    global RING
    RING = request.param
    yield RING
    RING = None


def make_vm(
    guest_dir: Path, *, exceptions: bool = False, **vm_args: bool
) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm(dirty_ring=RING, **vm_args)
    ram = vm.add_memory(0, RAM)
    ram.write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
    ram.write(DUMP_CODE, dump_program())
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=exceptions)
    cpu.set_regs(rip=LONG_LOAD, rdi=3, rsi=0x1000)
    return vm, cpu


def vector_state(vm: kvmpy.Vm, cpu: kvmpy.Vcpu) -> bytes:
    """XMM0-15, MXCSR and the x87 control word, as the guest itself stores them."""
    cpu.set_regs(rip=DUMP_CODE)
    assert cpu.run(timeout=10).reason == "exit"
    return vm.read(DUMP, 0x106)


def assert_as_snapshot(vm: kvmpy.Vm, snap: kvmpy.Snapshot, cpus: list[kvmpy.Vcpu]) -> None:
    assert vm.read(0, RAM) == snap.read(0, RAM)
    for i, cpu in enumerate(cpus):
        assert cpu.regs == snap.regs(i)
        assert cpu.sregs == snap.sregs(i)


def test_random_guest_programs_and_host_writes_are_undone(guest_dir: Path) -> None:
    rng = random.Random(0x5EED)
    vm, cpu = make_vm(guest_dir)
    with vm:
        ram = vm.memory_regions[0]
        cpu.set_regs(rip=RANDOM_CODE, rbx=7, rflags=0x3002)
        snap = vm.snapshot()
        vectors = vector_state(vm, cpu)
        vm.restore(snap)
        msrs = snap.msrs(0)
        assert MSR_SYSENTER_CS in msrs and MSR_KERNEL_GS_BASE in msrs
        for case in range(60):
            vm.write(RANDOM_CODE, random_program(rng))
            assert cpu.run(timeout=10).reason == "exit", f"case {case}"
            assert cpu.regs != snap.regs(0)
            for _ in range(rng.randrange(4)):
                offset = rng.randrange(0, RAM - 64)
                data = rng.randbytes(rng.randrange(1, 64))
                if rng.random() < 0.5:
                    ram.write(offset, data)
                else:
                    vm.write(offset, data)
            full = cpu.stats()["full_restores"]
            if case % 3 == 0:
                cpu.set_msrs(
                    {MSR_SYSENTER_CS: rng.getrandbits(16), MSR_KERNEL_GS_BASE: 0x1000 * case}
                )
                cpu.set_sregs(
                    fs=kvmpy.Segment(base=0x7000 * case, selector=0, type=3, present=1, s=1, dpl=3)
                )
            vm.restore(snap)
            # Only host changes to state user code cannot touch need the full restore.
            assert cpu.stats()["full_restores"] == full + (case % 3 == 0), f"case {case}"
            assert_as_snapshot(vm, snap, [cpu])
            assert cpu.get_msrs([MSR_SYSENTER_CS, MSR_KERNEL_GS_BASE]) == {
                k: msrs[k] for k in (MSR_SYSENTER_CS, MSR_KERNEL_GS_BASE)
            }
            if case % 10 == 0:
                assert vector_state(vm, cpu) == vectors, f"case {case}"
                vm.restore(snap)


def test_restore_replays_the_same_run(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
        for rdi in (1, 16, 190, 0):
            vm.restore(snap)
            cpu.set_regs(rdi=rdi)
            assert cpu.run(timeout=10).reason == "exit"
            pages = [struct.unpack("<Q", vm.read(DATA + 0x1000 * i, 8))[0] for i in range(rdi)]
            assert pages == [0x1000 + i for i in range(rdi)]
            vm.restore(snap)
            assert_as_snapshot(vm, snap, [cpu])


def test_restore_after_a_crash_returns_to_user_mode(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir, exceptions=True)
    with vm:
        snap = vm.snapshot()
        vm.write(INPUT, struct.pack("<Q", 2))
        exit = cpu.run(timeout=10)
        assert exit.reason == "exception" and exit.name == "#PF"
        assert cpu.sregs.cs.dpl == 0  # inside the ring-0 reporting stub
        full = cpu.stats()["full_restores"]
        vm.restore(snap)
        assert cpu.stats()["full_restores"] == full + 1
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.sregs.cs.dpl == 3
        assert cpu.run(timeout=10).reason == "exit"
        assert vm.read(DATA, 8) == struct.pack("<Q", 0x1000)


def test_restore_after_a_timeout_in_a_tight_loop(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
        vm.write(INPUT, struct.pack("<Q", 1))
        assert cpu.run(timeout=0.05).reason == "timeout"
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.run(timeout=10).reason == "exit"


def test_restore_after_a_handler_exception(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:

        @vm.on_io(0x10)
        def boom(exit: kvmpy.IoExit) -> None:
            raise RuntimeError("handler failed")

        snap = vm.snapshot()
        vm.write(INPUT, struct.pack("<Q", 3))
        with pytest.raises(RuntimeError, match="handler failed"):
            cpu.run(timeout=10)
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.run(timeout=10).reason == "exit"
        assert vm.read(DATA + 0x2000, 8) == struct.pack("<Q", 0x1002)


def test_four_vcpus(guest_dir: Path) -> None:
    vm = kvmpy.Vm(dirty_ring=RING)
    with vm:
        vm.add_memory(0, RAM).write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
        vm.add_exit_port(EXIT_PORT)
        cpus = []
        for i in range(4):
            cpu = vm.create_vcpu()
            cpu.setup_long_mode(user=True)
            cpu.set_regs(rip=LONG_LOAD, rdi=i + 1, rsi=0x100 * i)
            cpus.append(cpu)
        snap = vm.snapshot()
        assert snap.vcpu_ids == [0, 1, 2, 3]
        for _ in range(3):
            assert [e.reason for e in vm.run(timeout=10)] == ["exit"] * 4
            vm.restore(snap)
            assert_as_snapshot(vm, snap, cpus)


def test_with_irqchip_and_pit(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir, irqchip=True, pit=True)
    with vm:
        snap = vm.snapshot()
        cpu.set_sregs(cr8=5)  # the in-kernel LAPIC's task priority
        vm.set_irq_line(4, True)
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.run(timeout=10).reason == "exit"
        assert vm.read(DATA, 8) == struct.pack("<Q", 0x1000)


def test_views_make_a_region_wholly_dirty(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        ram = vm.memory_regions[0]
        snap = vm.snapshot()
        view = memoryview(ram)
        view[0x150000:0x150004] = b"view"
        view.release()
        vm.load_flat(b"flat", 0x160000)
        vm.restore(snap)
        assert vm.read(0x150000, 4) == bytes(4)
        assert vm.read(0x160000, 4) == bytes(4)
        with memoryview(ram) as live:
            vm.restore(snap)
            live[0x170000] = 1
            vm.restore(snap)  # the view is still exported: the whole region is copied
            assert vm.read(0x170000, 1) == b"\0"
        assert_as_snapshot(vm, snap, [cpu])


def test_dirty_pages_still_reports_and_restore_still_sees_them(guest_dir: Path) -> None:
    vm = kvmpy.Vm(dirty_ring=RING)
    with vm:
        ram = vm.add_memory(0, RAM, dirty_log=True)
        ram.write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LONG_LOAD, rdi=2, rsi=1)
        snap = vm.snapshot()
        assert cpu.run(timeout=10).reason == "exit"
        assert {DATA, DATA + 0x1000} <= set(ram.dirty_pages())
        assert DATA not in set(ram.dirty_pages())  # reported once
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])


def test_devices_are_restored(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        console = vm.add_console(0x3F8)
        uart = vm.add_uart(0x2F8)
        uart.feed(b"abc")
        code = bytes(
            [0xBA, 0xF8, 0x03, 0, 0, 0xB0, ord("x"), 0xEE]
        )  # mov edx, 0x3f8; mov al, 'x'; out dx, al
        code += bytes(
            [0x66, 0xBA, 0xF8, 0x02, 0xEC, 0xE6, 0xF4]
        )  # mov dx, 0x2f8; in al, dx; out 0xf4, al
        vm.write(RANDOM_CODE, code)
        cpu.set_regs(rip=RANDOM_CODE, rflags=0x3002)  # IF=0: a queued interrupt waits
        snap = vm.snapshot()
        cpu.interrupt(0x30)
        assert cpu.run(timeout=10).reason == "exit"
        assert console.output() == b"x" and cpu.regs.rax & 0xFF == ord("a")
        vm.restore(snap)
        assert console.output() == b""
        assert cpu.run(timeout=10).reason == "exit"
        assert cpu.regs.rax & 0xFF == ord("a")  # the UART's input was put back
        assert console.output() == b"x"
        # Without IF the interrupt queued after the snapshot would still wait; the restore
        # dropped it: with IF=1 and no IDT it would triple-fault (a "shutdown" exit).
        vm.restore(snap)
        cpu.set_regs(rflags=0x3202)
        assert cpu.run(timeout=10).reason == "exit"


def test_restore_into_another_vm_with_the_same_layout(guest_dir: Path) -> None:
    vm1, cpu1 = make_vm(guest_dir)
    vm2, cpu2 = make_vm(guest_dir)
    with vm1, vm2:
        cpu1.set_regs(rdi=5, rsi=0x777)
        vm1.write(0x150000, b"only in vm1")
        snap = vm1.snapshot()
        vm2.write(0x160000, b"only in vm2")
        vm2.restore(snap)
        assert_as_snapshot(vm2, snap, [cpu2])
        assert cpu2.run(timeout=10).reason == "exit"
        assert vm2.read(DATA + 0x4000, 8) == struct.pack("<Q", 0x777 + 4)
        vm2.restore(snap)
        assert_as_snapshot(vm2, snap, [cpu2])


def test_mismatched_vms_are_refused_before_anything_changes(guest_dir: Path) -> None:
    vm1, _ = make_vm(guest_dir)
    with vm1:
        snap = vm1.snapshot()
        with kvmpy.Vm() as small:
            small.add_memory(0, RAM // 2)
            small.create_vcpu()
            small.write(0x1000, b"keep")
            with pytest.raises(ValueError, match="memory regions"):
                small.restore(snap)
            assert small.read(0x1000, 4) == b"keep"
        vm2, _ = make_vm(guest_dir)
        with vm2:
            vm2.create_vcpu()
            with pytest.raises(ValueError, match="vCPU ids"):
                vm2.restore(snap)
        vm3, _ = make_vm(guest_dir, irqchip=True)
        with vm3:
            with pytest.raises(ValueError, match="irqchip"):
                vm3.restore(snap)
        vm4, _ = make_vm(guest_dir)
        with vm4:
            vm4.add_console(0x3F8)
            with pytest.raises(ValueError, match="devices"):
                vm4.restore(snap)
        vm5, cpu5 = make_vm(guest_dir)
        with vm5:
            entries = [  # another CPU model name
                kvmpy.CpuidEntry(e.function, e.index, e.flags, e.eax ^ 1, e.ebx, e.ecx, e.edx)
                if e.function == 0x80000002
                else e
                for e in cpu5.get_cpuid()
            ]
            cpu5.set_cpuid(entries)
            vm5.write(0x1000, b"keep")
            with pytest.raises(ValueError, match="CPUID is not the one"):
                vm5.restore(snap)
            assert vm5.read(0x1000, 4) == b"keep"


def test_snapshot_and_restore_refuse_while_running(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
        vm.write(INPUT, struct.pack("<Q", 1))
        vm.start()
        with pytest.raises(kvmpy.VcpuBusyError):
            vm.snapshot()
        with pytest.raises(kvmpy.VcpuBusyError):
            vm.restore(snap)
        vm.stop()
        assert [e.reason for e in vm.join(10) or []] == ["stopped"]
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])


def test_a_read_waiting_for_respond_must_be_answered_first(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        vm.write(RANDOM_CODE, bytes([0xE4, 0x10, 0xE6, 0xF4]))  # in al, 0x10 ; out 0xf4, al
        cpu.set_regs(rip=RANDOM_CODE)
        exit = cpu.run(timeout=10)
        assert exit.reason == "io" and not exit.is_write
        with pytest.raises(kvmpy.VcpuBusyError, match="respond"):
            vm.snapshot()
        cpu.respond(0x42)
        snap = vm.snapshot()
        assert snap.regs(0).rax & 0xFF == 0x42
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(snap)
        assert cpu.regs.rax & 0xFF == 0x42


def test_snapshot_reading_is_checked(guest_dir: Path) -> None:
    vm, _ = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
    assert snap.memory_regions == [(0, RAM)]
    with pytest.raises(kvmpy.VmClosedError):
        vm.snapshot()
    with pytest.raises(kvmpy.VmClosedError):
        vm.restore(snap)
    with pytest.raises(TypeError):
        kvmpy.Vm().restore(object())  # type: ignore[arg-type]
    with pytest.raises(kvmpy.GuestMemoryError):
        snap.read(RAM - 4, 8)
    for gpa, n in ((0, 1 << 62), (RAM, 1), (2**64 - 1, 2), (0, 2**64 - 1)):
        with pytest.raises(kvmpy.GuestMemoryError):
            snap.read(gpa, n)
    assert snap.read(RAM - 4, 4) == bytes(4) and snap.read(0, 0) == b""
    with pytest.raises(IndexError):
        snap.regs(1)
    assert "vcpus=1" in repr(snap)


def test_long_restore_loop_keeps_fds_and_memory_flat(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
        for _ in range(500):
            cpu.run(timeout=10)
            vm.restore(snap)
        fds, rss = open_fds(), rss_kib()
        for _ in range(20_000):
            cpu.run(timeout=10)
            vm.restore(snap)
        assert open_fds() == fds
        assert rss_kib() - rss < 8 * 1024, "RSS grew by more than 8 MiB over 20,000 restores"
        assert_as_snapshot(vm, snap, [cpu])


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def test_save_and_load_round_trip(guest_dir: Path, tmp_path: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        console = vm.add_console(0x3F8)
        vm.write(RANDOM_CODE, bytes([0xB0, 0x6B, 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xE6, 0xF4]))
        cpu.set_regs(rip=RANDOM_CODE)  # mov al, 'k'; mov dx, 0x3f8; out dx, al; out 0xf4, al
        assert cpu.run(timeout=10).reason == "exit"
        cpu.set_regs(rip=LONG_LOAD, rdi=2, rsi=9)
        snap = vm.snapshot()
        path = tmp_path / "boot.kvmsnap"
        snap.save(path)
        # Sparse: two regions' worth of zero pages are not stored.
        assert path.stat().st_size < 64 * 4096
        loaded = kvmpy.Snapshot.load(str(path))
        assert loaded.read(0, RAM) == snap.read(0, RAM)
        assert loaded.regs(0) == snap.regs(0) and loaded.sregs(0) == snap.sregs(0)
        assert loaded.msrs(0) == snap.msrs(0)
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(loaded)
        assert_as_snapshot(vm, snap, [cpu])
        assert console.output() == b"k"
        vm2, cpu2 = make_vm(guest_dir)
        with vm2:
            vm2.add_console(0x3F8)
            vm2.restore(loaded)
            assert_as_snapshot(vm2, snap, [cpu2])
            assert cpu2.run(timeout=10).reason == "exit"
            assert vm2.read(DATA + 0x1000, 8) == struct.pack("<Q", 10)


def test_bad_snapshot_files_name_the_problem(guest_dir: Path, tmp_path: Path) -> None:
    vm, _ = make_vm(guest_dir)
    with vm:
        path = tmp_path / "good.kvmsnap"
        vm.snapshot().save(path)
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header": data[:10],
        "checksum": data[:5000] + bytes([data[5000] ^ 1]) + data[5001:],
        "newer": data[:8] + struct.pack("<I", 99) + data[12:],
        "not a kvmpy snapshot": b"\x7fELF" + data[4:],
    }
    for problem, content in cases.items():
        bad = tmp_path / f"{problem}.kvmsnap"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=problem):
            kvmpy.Snapshot.load(bad)
    with pytest.raises(FileNotFoundError):
        kvmpy.Snapshot.load(tmp_path / "missing.kvmsnap")
    with kvmpy.Vm() as empty:
        with pytest.raises(FileNotFoundError, match="cannot write"):
            empty.snapshot().save(tmp_path / "no" / "such" / "dir.kvmsnap")
        with pytest.raises(IsADirectoryError):
            empty.snapshot().save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    with pytest.raises(TypeError):
        kvmpy.Snapshot.load(42)  # type: ignore[arg-type]
    with kvmpy.Vm() as other:  # a loaded snapshot is checked against the VM like any other
        other.add_memory(0, RAM // 2)
        with pytest.raises(ValueError, match="memory regions"):
            other.restore(kvmpy.Snapshot.load(path))
    with kvmpy.Vm() as empty:  # a VM without vCPUs round-trips too
        empty.add_memory(0x10000, 0x2000).write(0, b"only memory")
        empty.snapshot().save(tmp_path / "empty.kvmsnap")
        loaded = kvmpy.Snapshot.load(tmp_path / "empty.kvmsnap")
        assert loaded.vcpu_ids == [] and loaded.read(0x10000, 11) == b"only memory"


def test_snapshots_and_views_release_their_memory_and_fds(guest_dir: Path) -> None:
    vm, _ = make_vm(guest_dir)
    with vm:
        for _ in range(5):
            kvmpy.Vm.from_snapshot(vm.snapshot()).close()
        fds, rss = open_fds(), rss_kib()
        for _ in range(200):
            snap = vm.snapshot()
            other = kvmpy.Vm.from_snapshot(snap)
            other.close()
            del snap, other
        assert open_fds() == fds
        assert rss_kib() - rss < 16 * 1024, "RSS grew by more than 16 MiB over 200 snapshots"


def test_restore_to_the_exit_instruction_runs_it_again(guest_dir: Path) -> None:
    # out 0xf4, al ; inc rbx ; out 0xf4, al: a restore to the first OUT must not skip it.
    vm, cpu = make_vm(guest_dir)
    with vm:
        vm.write(RANDOM_CODE, bytes([0xE6, 0xF4, 0x48, 0xFF, 0xC3, 0xE6, 0xF4]))
        cpu.set_regs(rip=RANDOM_CODE, rbx=0)
        snap = vm.snapshot()
        for _ in range(3):
            assert cpu.run(timeout=10).reason == "exit"
            vm.restore(snap)
        assert cpu.run(timeout=10).reason == "exit"
        regs = cpu.regs
        assert (regs.rip, regs.rbx) == (RANDOM_CODE + 2, 0)
        assert cpu.run(timeout=10).reason == "exit"
        assert (cpu.regs.rip, cpu.regs.rbx) == (RANDOM_CODE + 7, 1)


def test_an_exit_port_write_left_pending_is_not_completed_at_the_restored_rip(
    guest_dir: Path,
) -> None:
    # inc eax ; inc eax ; out 0xf4, al. A run ends on the OUT, which KVM completes at the
    # next entry (kvmpy does not re-enter just for that, and nothing here reads the
    # registers, which would complete it). The restore moves RIP back to the first inc:
    # KVM's complete_fast_pio_out skips an instruction only where the linear RIP is still
    # the OUT's, so both incs run again and the exit value stays 2 (a skip of the OUT's
    # two bytes at the restored RIP would make it 1).
    vm, cpu = make_vm(guest_dir)
    with vm:
        vm.write(RANDOM_CODE, bytes([0xFF, 0xC0, 0xFF, 0xC0, 0xE6, 0xF4]))
        cpu.set_regs(rip=RANDOM_CODE, rax=0)
        snap = vm.snapshot()
        values = []
        for _ in range(5):
            exit = cpu.run(timeout=10)
            assert exit.reason == "exit"
            values.append(exit.code)
            vm.restore(snap)
        assert values == [2] * 5
        assert cpu.stats()["full_restores"] == 0


def test_a_vm_from_a_snapshot_gets_its_cpuid(guest_dir: Path) -> None:
    vm = kvmpy.Vm()
    with vm:
        vm.add_memory(0, RAM)
        cpu = vm.create_vcpu()
        entries = [
            kvmpy.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx & ~(1 << 31), e.edx)
            if e.function == 1
            else e
            for e in cpu.get_cpuid()
        ]
        cpu.set_cpuid(entries)  # no "hypervisor present" bit
        snap = vm.snapshot()
    with kvmpy.Vm.from_snapshot(snap) as other:
        leaf1 = next(e for e in other.vcpus[0].get_cpuid() if e.function == 1)
        assert leaf1.ecx & (1 << 31) == 0


def snapshot_views() -> int:
    """How many mappings of snapshot memory this process has."""
    with open("/proc/self/maps") as f:
        return sum("memfd:kvmpy-snapshot" in line for line in f)


def test_vms_from_one_snapshot_share_its_memory(guest_dir: Path, tmp_path: Path) -> None:
    vm, cpu = make_vm(guest_dir, irqchip=True)
    with vm:
        vm.add_console(0x3F8)
        vm.write(0x150000, b"clean image")
        snap = vm.snapshot()
    views = snapshot_views()
    vms = [kvmpy.Vm.from_snapshot(snap, dirty_ring=RING) for _ in range(2)]
    vms.append(kvmpy.Vm.from_snapshot(kvmpy.Snapshot.load(_saved(snap, tmp_path))))
    # One private view per VM (the loaded snapshot, gone again, kept no mapping).
    assert snapshot_views() == views + 3
    try:
        for i, other in enumerate(vms):
            assert other.irqchip and len(other.vcpus) == 1
            assert other.dirty_ring == (RING if i < 2 else None)
            other.add_exit_port(EXIT_PORT)
            ocpu = other.vcpus[0]
            assert other.read(0, RAM) == snap.read(0, RAM)
            assert ocpu.regs == snap.regs(0) and ocpu.sregs == snap.sregs(0)
            ocpu.set_regs(rsi=0x100 * (i + 1))
            assert ocpu.run(timeout=10).reason == "exit"
            assert other.read(DATA, 8) == struct.pack("<Q", 0x100 * (i + 1))
            other.write(0x150000, b"dirty")
        # Each VM wrote its own copy: the others and the snapshot are untouched.
        assert snap.read(0x150000, 11) == b"clean image"
        assert vms[0].read(DATA, 8) == struct.pack("<Q", 0x100)
        for other in vms[:2]:
            with pytest.raises(ValueError, match="devices"):
                other.restore(snap)  # the snapshot had a console; these VMs have none
            other.add_console(0x3F8)
            other.restore(snap)
            assert other.read(0, RAM) == snap.read(0, RAM)
            assert other.vcpus[0].regs == snap.regs(0)
            with memoryview(other.memory_regions[0]) as view:  # the whole region is put back
                view[0x160000] = 7
            other.restore(snap)
            assert other.read(0, RAM) == snap.read(0, RAM)
        # A snapshot of a VM whose memory is a view of another snapshot's.
        other = vms[0]
        other.write(0x150000, bytes(11))
        own = other.snapshot()
        with memoryview(other.memory_regions[0]) as view:
            view[0x150000] = 1
        other.restore(own)
        assert other.read(0x150000, 11) == bytes(11)
        other.restore(snap)
        assert other.read(0x150000, 11) == b"clean image"
        other.restore(own)
        assert other.read(0, RAM) == own.read(0, RAM)
    finally:
        for other in vms:
            other.close()


def _saved(snap: kvmpy.Snapshot, tmp_path: Path) -> Path:
    path = tmp_path / "shared.kvmsnap"
    snap.save(path)
    return path


def test_a_changed_layout_is_refused_and_a_restored_one_is_copied_whole(guest_dir: Path) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        snap = vm.snapshot()
        extra = vm.add_memory(RAM, 0x10000)
        with pytest.raises(ValueError, match="memory regions"):
            vm.restore(snap)
        vm.remove_memory(extra)
        ram = vm.memory_regions[0]
        vm.remove_memory(ram)
        vm.add_memory(0, RAM)  # the same layout, new (zeroed, untracked) memory
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(snap)
        assert_as_snapshot(vm, snap, [cpu])


MSR_IA32_TSC = 0x10
# rdtsc ; shl rdx, 32 ; or rax, rdx ; out 0xf4, al
RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xE6, 0xF4])
AHEAD = 1 << 50  # TSC ticks: years at any frequency


def read_tsc(cpu: kvmpy.Vcpu) -> int:
    cpu.set_regs(rip=RANDOM_CODE)
    assert cpu.run(timeout=10).reason == "exit"
    return cpu.regs.rax


def host_sets_the_tsc(cpu: kvmpy.Vcpu) -> bool:
    """Whether this host's KVM honours a host write of IA32_TSC (a nested PVM host runs
    every guest on the host's TSC and ignores it)."""
    tsc = cpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    cpu.set_msrs({MSR_IA32_TSC: tsc + AHEAD})
    moved = cpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] >= tsc + AHEAD
    cpu.set_msrs({MSR_IA32_TSC: tsc})
    return moved


def test_resets_keep_the_clocks_running_and_other_restores_set_them_back(
    guest_dir: Path, tmp_path: Path
) -> None:
    vm, cpu = make_vm(guest_dir)
    with vm:
        settable = host_sets_the_tsc(cpu)
        vm.write(RANDOM_CODE, RDTSC_CODE)
        cpu.set_regs(rip=RANDOM_CODE)
        time.sleep(0.05)  # kvmclock past any new VM's own start
        snap = vm.snapshot()
        tsc0 = snap.msrs(0)[MSR_IA32_TSC]
        khz = snap.tsc_khz(0)
        assert khz is not None and khz > 0
        assert snap.clock is not None
        # The host moves the TSC far ahead (where it can): a reset (full, as the host
        # changed state, then fast) leaves it running from there, never sets it back.
        cpu.set_msrs({MSR_IA32_TSC: tsc0 + AHEAD})
        ahead = tsc0 + AHEAD if settable else tsc0
        seen = []
        for _ in range(3):
            assert cpu.run(timeout=10).reason == "exit"
            seen.append(cpu.regs.rax)
            vm.restore(snap)
        assert ahead <= seen[0] <= seen[1] <= seen[2]
        assert cpu.stats()["full_restores"] == 1
        # Restoring a snapshot the VM is not based on sets the TSC back to its value
        # (where the host lets it; elsewhere the guest's TSC is the host's, never back).
        later = vm.snapshot()
        assert later.msrs(0)[MSR_IA32_TSC] >= ahead
        assert later.clock is not None and later.clock >= snap.clock
        vm.restore(snap)
        back = read_tsc(cpu)
        if settable:
            assert tsc0 <= back < tsc0 + AHEAD
        else:
            assert seen[2] <= back < tsc0 + AHEAD
        vm.restore(later)
        assert read_tsc(cpu) >= (tsc0 + AHEAD if settable else back)
        saved = tmp_path / "clock.kvmsnap"
        snap.save(saved)
    loaded = kvmpy.Snapshot.load(saved)
    assert (loaded.clock, loaded.tsc_khz(0)) == (snap.clock, khz)
    # A new VM from the snapshot starts with its TSC and its kvmclock.
    for source in (snap, loaded):
        start = time.monotonic_ns()
        with kvmpy.Vm.from_snapshot(source) as other:
            other.add_exit_port(EXIT_PORT)
            assert tsc0 <= read_tsc(other.vcpus[0]) < tsc0 + AHEAD
            clock = other.snapshot().clock
            elapsed = time.monotonic_ns() - start
            # kvmclock counts nanoseconds: from the snapshot's value, for at most as long
            # as the host took since (a new VM's own clock starts near 0).
            assert clock is not None and snap.clock <= clock <= snap.clock + elapsed + 10**6


def test_xsave_state_is_captured_whole_or_refused(guest_dir: Path) -> None:
    # KVM_CAP_XSAVE2: the bytes of a VM's XSAVE state (larger than 4096 with AMX state
    # the process enabled for guests); a snapshot holds 4096.
    size = kvmpy.Kvm().check_extension("xsave2")
    vm, cpu = make_vm(guest_dir)
    with vm:
        if size > 4096:
            with pytest.raises(kvmpy.KvmUnsupported, match="KVM_CAP_XSAVE2"):
                vm.snapshot()
            return
        before = vector_state(vm, cpu)
        snap = vm.snapshot()
        vm.write(RANDOM_CODE, random_program(random.Random(5)))
        cpu.set_regs(rip=RANDOM_CODE)
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(snap)
        assert vector_state(vm, cpu) == before


def test_a_full_dirty_ring_is_harvested_and_the_run_goes_on(guest_dir: Path) -> None:
    # 1500 pages written in one run through a ring of 256 entries: KVM exits with
    # KVM_EXIT_DIRTY_RING_FULL several times, each harvested inside run().
    vm = kvmpy.Vm(dirty_ring=256)
    with vm:
        ram = vm.add_memory(0, 8 << 20)
        ram.write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LONG_LOAD, rdi=1500, rsi=7)
        snap = vm.snapshot()
        for _ in range(2):
            exits = cpu.stats()["exits"]
            assert cpu.run(timeout=30).reason == "exit"
            assert cpu.stats()["exits"] - exits > 1500 // 256
            assert vm.read(DATA + 1499 * 0x1000, 8) == struct.pack("<Q", 7 + 1499)
            vm.restore(snap)
            assert vm.read(0, 8 << 20) == snap.read(0, 8 << 20)
            assert cpu.regs == snap.regs(0)


def test_dirty_ring_sizes_and_host_limits() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, RAM)
        snap = vm.snapshot()
    with pytest.raises(ValueError, match="dirty_ring=0"):
        kvmpy.Vm.from_snapshot(snap, dirty_ring=0)
    limit = kvmpy.Kvm().check_extension("dirty_log_ring")
    if limit == 0:
        with pytest.raises(kvmpy.KvmUnsupported, match="KVM_CAP_DIRTY_LOG_RING"):
            kvmpy.Vm(dirty_ring=4096)
        return
    for bad in (0, 100, 128, limit // 16 * 2, -1, 2**40):
        with pytest.raises((ValueError, OverflowError)):
            kvmpy.Vm(dirty_ring=bad)
    with kvmpy.Vm(dirty_ring=limit // 16) as vm:
        assert vm.dirty_ring == limit // 16
    with kvmpy.Vm() as vm:
        assert vm.dirty_ring is None


def test_capture_of_a_big_sparse_guest_holds_every_page_it_wrote(guest_dir: Path) -> None:
    # A capture looks only at the pages the process touched: the guest's, the host's,
    # and pages written and zeroed again; what it holds must be exactly the memory.
    size = 64 << 20
    vm = kvmpy.Vm(dirty_ring=RING)
    with vm:
        ram = vm.add_memory(0, size)
        ram.write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LONG_LOAD, rdi=100, rsi=3)
        assert cpu.run(timeout=10).reason == "exit"
        rng = random.Random(9)
        for _ in range(50):
            vm.write(rng.randrange(0, size - 16), rng.randbytes(16))
        vm.write(0x3000000, b"\1" * 4096)
        vm.write(0x3000000, bytes(4096))  # touched, zero again
        with memoryview(ram) as view:
            view[size - 1] = 0x77  # the last byte, through a view
        snap = vm.snapshot()
        assert snap.read(0, size) == vm.read(0, size)
        with kvmpy.Vm.from_snapshot(snap) as other:
            assert other.read(0, size) == vm.read(0, size)
            # A view of the snapshot's memory is read whole: untouched, it reads the image.
            other.write(0x2000000, b"other")
            again = other.snapshot()
            assert again.read(0, size) == other.read(0, size)
            assert again.read(size - 1, 1) == b"\x77"


PVCLOCK = 0x30000  # where the guest asks KVM for its kvmclock page
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
SLACK_NS = 10**6  # rounding between the guest's and KVM's reading of one clock


def kvmclock_now(vm: kvmpy.Vm, cpu: kvmpy.Vcpu) -> int:
    """The time a guest reads from kvmclock: the pvclock page KVM keeps in guest memory,
    scaled from a guest `rdtsc` (Linux's `pvclock_clocksource_read`)."""
    tsc = read_tsc(cpu)
    _, _, stamp, system_time, mul, shift = struct.unpack("<IIQQIb", vm.read(PVCLOCK, 29))
    delta = tsc - stamp
    delta = delta << shift if shift >= 0 else delta >> -shift
    return system_time + ((delta * mul) >> 32)


def test_the_guest_kvmclock_runs_on_across_resets_and_is_set_back_elsewhere(
    guest_dir: Path,
) -> None:
    vm = kvmpy.Vm(dirty_ring=RING)
    with vm:
        vm.add_memory(0, RAM)
        # mov ecx, MSR ; mov eax, PVCLOCK | 1 ; xor edx, edx ; wrmsr ; out 0xf4, al
        enable = b"\xb9" + struct.pack("<I", MSR_KVM_SYSTEM_TIME_NEW)
        enable += b"\xb8" + struct.pack("<I", PVCLOCK | 1) + b"\x31\xd2\x0f\x30\xe6\xf4"
        vm.write(DUMP_CODE, enable)
        vm.write(RANDOM_CODE, RDTSC_CODE)
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False)  # ring 0: the guest turns kvmclock on
        cpu.set_regs(rip=DUMP_CODE)
        assert cpu.run(timeout=10).reason == "exit"
        time.sleep(0.05)  # kvmclock past any new VM's own start
        snap = vm.snapshot()
        assert snap.clock is not None
        first = kvmclock_now(vm, cpu)
        assert snap.clock <= first
        # A reset puts the pvclock page back, but the guest's time runs on, and it still
        # agrees with KVM's clock (read by a snapshot, which takes no time from the guest).
        vm.restore(snap)
        start = time.monotonic_ns()
        again = kvmclock_now(vm, cpu)
        later = vm.snapshot()
        elapsed = time.monotonic_ns() - start
        assert later.clock is not None and first <= again
        assert later.clock - elapsed - SLACK_NS <= again <= later.clock + SLACK_NS
        # Restoring a snapshot the VM is not based on sets the guest's time back.
        vm.restore(snap)
        assert snap.clock <= kvmclock_now(vm, cpu) <= later.clock
        vm.restore(snap)
        start = time.monotonic_ns()
        with kvmpy.Vm.from_snapshot(snap) as other:
            other.add_exit_port(EXIT_PORT)
            back = kvmclock_now(other, other.vcpus[0])
            kvm_back = other.snapshot().clock
            elapsed = time.monotonic_ns() - start
        # A new VM's guest reads the snapshot's time, moved on only by what passed since.
        assert kvm_back is not None
        assert snap.clock <= back <= kvm_back + SLACK_NS
        assert kvm_back <= snap.clock + elapsed + SLACK_NS


# Ring 0: xor ecx, ecx ; mov eax, XCR0 ; xor edx, edx ; xsetbv ; out 0xf4, al. Then at
# CPL3, each part ending in `out 0xf4, al`: fill (ZMM31 and YMM7 all ones, K1 = 0xffff),
# clobber (all zero), dump (ZMM31 to DUMP, YMM7 to DUMP + 0x40, K1 to DUMP + 0x60).
AVX512_CODE = bytes.fromhex(
    "31c9b8e700000031d20f01d1e6f4"  # XCR0 = x87 | SSE | AVX | opmask | ZMM_Hi256 | Hi16_ZMM
    "6203054025ffff62f3452825ffffc5f446c9e6f4"  # +0x0e vpternlogd zmm31/ymm7; kxnorw k1
    "62010540efffc5c5efffc5f447c9e6f4"  # +0x22 vpxord zmm31; vpxor ymm7; kxorw k1
    "6261fe487f3c2500001f00c5fe7f3c2540001f00c5f8910c2560001f00e6f4"  # +0x32 stores
)
AVX512_PARTS = (0x0E, 0x22, 0x32)
# The same without AVX-512 (XCR0 = x87 | SSE | AVX), for CPUs that lack it: YMM7 only.
AVX_CODE = bytes.fromhex(
    "31c9b80700000031d20f01d1e6f462f3452825ffffe6f4c5c5efffe6f4c5fe7f3c2540001f00e6f4"
)
AVX_PARTS = (0x0E, 0x17, 0x1D)
CR4_OSXSAVE = 1 << 18


def test_avx_and_avx512_state_round_trips(guest_dir: Path) -> None:
    # What this host allows in the 4096 bytes of KVM_GET_XSAVE: the AVX upper halves and,
    # where the CPU has AVX-512, the ZMM registers and the mask registers.
    vm, cpu = make_vm(guest_dir)
    with vm:
        leaf7 = next(e for e in cpu.get_cpuid() if e.function == 7 and e.index == 0)
        avx512 = bool(leaf7.ebx & (1 << 16))
        code, (fill, clobber, dump) = (
            (AVX512_CODE, AVX512_PARTS) if avx512 else (AVX_CODE, AVX_PARTS)
        )
        vm.write(RANDOM_CODE, code)
        cpu.setup_long_mode(user=False)  # xsetbv is privileged
        cpu.set_sregs(cr4=cpu.sregs.cr4 | CR4_OSXSAVE)
        cpu.set_regs(rip=RANDOM_CODE)
        assert cpu.run(timeout=10).reason == "exit"
        cpu.setup_long_mode(user=True)
        cpu.set_sregs(cr4=cpu.sregs.cr4 | CR4_OSXSAVE)

        def part(at: int) -> None:
            cpu.set_regs(rip=RANDOM_CODE + at)
            assert cpu.run(timeout=10).reason == "exit"

        def state() -> bytes:
            part(dump)
            data = vm.read(DUMP, 0x62)
            return data if avx512 else data[0x40:0x60]

        part(fill)
        ones = state()
        assert ones == (b"\xff" * 0x62 if avx512 else b"\xff" * 0x20)
        snap = vm.snapshot()
        part(clobber)
        assert state() == bytes(len(ones))
        vm.restore(snap)
        assert state() == ones


def _checksum(data: bytes) -> int:
    """The file format's checksum: FNV-1a's constants on little-endian words, then on
    the bytes left over."""
    h = 0xCBF29CE484222325
    whole = len(data) // 8 * 8
    for (w,) in struct.iter_unpack("<Q", data[:whole]):
        h = ((h ^ w) * 0x100000001B3) & (2**64 - 1)
    for b in data[whole:]:
        h = ((h ^ b) * 0x100000001B3) & (2**64 - 1)
    return h


def as_version_1(data: bytes) -> bytes:
    """A format-2 snapshot file rewritten as format 1 (before the clock was saved): each
    vCPU's TSC frequency and the clock taken out, the checksum made again."""
    out = bytearray()
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        at += n
        return data[at - n : at]

    def u32() -> int:
        return int.from_bytes(take(4), "little")

    out += take(8)  # magic
    assert u32() == 2
    out += struct.pack("<I", 1)
    name_len = u32()
    out += struct.pack("<I", name_len) + take(name_len) + take(12)
    sizes = [u32() for _ in range(13)]
    out += struct.pack("<13I", *sizes)
    vcpus = u32()
    out += struct.pack("<I", vcpus)
    for _ in range(vcpus):
        out += take(8 + sum(sizes[:7]))  # id, MP state ... vCPU events
        lapic = take(1)
        out += lapic + (take(sizes[7]) if lapic == b"\1" else b"")
        for size in (sizes[8], sizes[9], 4):  # MSRs, CPUID, queued interrupts
            n = u32()
            out += struct.pack("<I", n) + take(n * size)
        take(4)  # the TSC frequency: not in version 1
    irqchip = take(1)
    out += irqchip + (take(3 * sizes[10]) if irqchip == b"\1" else b"")
    pit = take(1)
    out += pit + (take(sizes[11]) if pit == b"\1" else b"")
    if take(1) == b"\1":  # the clock: not in version 1
        take(8)
    out += data[at:-8]
    return bytes(out) + struct.pack("<Q", _checksum(bytes(out)))


def test_a_version_1_file_still_loads_and_restores(guest_dir: Path, tmp_path: Path) -> None:
    vm, cpu = make_vm(guest_dir, irqchip=True)
    with vm:
        snap = vm.snapshot()
        snap.save(tmp_path / "v2.kvmsnap")
        (tmp_path / "v1.kvmsnap").write_bytes(as_version_1((tmp_path / "v2.kvmsnap").read_bytes()))
        old = kvmpy.Snapshot.load(tmp_path / "v1.kvmsnap")
        assert (old.clock, old.tsc_khz(0)) == (None, None)
        assert old.regs(0) == snap.regs(0) and old.msrs(0) == snap.msrs(0)
        assert cpu.run(timeout=10).reason == "exit"
        vm.restore(old)
        assert_as_snapshot(vm, snap, [cpu])
        assert cpu.run(timeout=10).reason == "exit"
        assert vm.read(DATA, 8) == struct.pack("<Q", 0x1000)


MSR_TSC_DEADLINE = 0x6E0
# mov eax, 0xfee00320 ; mov dword [rax], 0x50030 (LAPIC timer: TSC-deadline mode, masked,
# vector 0x30) ; out 0xf4, al
LVT_TSC_DEADLINE = bytes.fromhex("b82003e0fec70030000500e6f4")


def test_a_reset_moves_an_armed_tsc_deadline_with_the_running_tsc(guest_dir: Path) -> None:
    vm = kvmpy.Vm(irqchip=True, dirty_ring=RING)
    with vm:
        vm.add_memory(0, RAM)
        vm.write(RANDOM_CODE, LVT_TSC_DEADLINE)
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False, map_gib=4)  # ring 0 writes the LAPIC's registers
        cpu.set_regs(rip=RANDOM_CODE)
        assert cpu.run(timeout=10).reason == "exit"
        tsc = cpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        cpu.set_msrs({MSR_TSC_DEADLINE: tsc + 10**12})  # far ahead: it does not fire here
        snap = vm.snapshot()
        then, deadline = snap.msrs(0)[MSR_IA32_TSC], snap.msrs(0)[MSR_TSC_DEADLINE]
        assert deadline == tsc + 10**12
        cpu.set_regs(rip=RANDOM_CODE)
        assert cpu.run(timeout=10).reason == "exit"
        before = cpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        vm.restore(snap)  # ring 0: a full restore, the TSC left running
        now = cpu.get_msrs([MSR_IA32_TSC, MSR_TSC_DEADLINE])
        # The deadline moved by what the TSC ran since the snapshot: as far ahead as then.
        assert before - then <= now[MSR_TSC_DEADLINE] - deadline <= now[MSR_IA32_TSC] - then
        assert cpu.stats()["full_restores"] == 1


def test_dirty_pages_come_from_the_ring_and_survive_a_full_one(guest_dir: Path) -> None:
    vm = kvmpy.Vm(dirty_ring=256)
    with vm:
        ram = vm.add_memory(0, 8 << 20, dirty_log=True)
        other = vm.add_memory(16 << 20, 1 << 20, dirty_log=True)
        ram.write(LONG_LOAD, (guest_dir / "snapshot64.bin").read_bytes())
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LONG_LOAD, rdi=1500, rsi=1)
        ram.dirty_pages()
        assert cpu.run(timeout=30).reason == "exit"  # the ring filled up several times
        written = {DATA + 0x1000 * i for i in range(1500)}
        assert written <= set(ram.dirty_pages())
        assert not written & set(ram.dirty_pages())
        assert other.dirty_pages() == []
