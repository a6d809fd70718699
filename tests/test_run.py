"""The run loop: every exit kind with a real guest, handler rules, timeouts, stop."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import kvmpy

from .support import (
    CONSOLE,
    DEV_IN,
    DEV_OUT,
    EXIT_PORT,
    LONG_LOAD,
    MARK,
    MARK_AND_SPIN,
    SPIN_OFFSET,
    counts_up,
    once_guests_run,
    real_mode_vm,
    user_mode_vm,
)

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]

JMP_SELF = bytes([0xEB, 0xFE])  # jmp $
UD2 = bytes([0x0F, 0x0B])  # ud2


def test_real_mode_hello_prints_on_the_console_and_halts(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        console = vm.add_console(CONSOLE)
        exit = cpu.run(timeout=10)
        assert exit.reason == "hlt"
        assert exit.reason is kvmpy.ExitReason.HLT
        assert type(exit) is kvmpy.ExitInfo
        assert exit.vcpu_id == 0
        assert console.output() == b"Hello from a KVM guest!\n"
        assert console.port == CONSOLE


def test_unhandled_port_io_is_returned_to_the_caller(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.IoExit)
        assert exit.reason == "io"
        assert (exit.port, exit.size, exit.count, exit.is_write) == (CONSOLE, 1, 1, True)
        assert exit.data == b"H" and exit.value == ord("H")
        assert "OUT port=0x3f8" in repr(exit)
        # Drive the loop exit by exit, as a VMM would.
        text = bytearray(exit.data)
        while (exit := cpu.run(timeout=10)).reason == "io":
            assert isinstance(exit, kvmpy.IoExit)
            text += exit.data
        assert exit.reason == "hlt"
        assert text == b"Hello from a KVM guest!\n"


def test_in_handler_value_reaches_the_guest(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        inputs = iter([21, 0x7FFFFFFF, 0xFFFFFFFF, 0])
        outputs: list[int] = []
        seen: list[kvmpy.IoExit] = []

        @vm.on_io(DEV_IN)
        def read(exit: kvmpy.IoExit) -> int:
            seen.append(exit)
            return next(inputs)

        vm.on_io(DEV_OUT, lambda exit: outputs.append(exit.value))
        assert cpu.run(timeout=10).reason == "hlt"
        assert outputs == [42, 0xFFFFFFFE, 0xFFFFFFFE]
        assert all(not e.is_write and e.size == 4 and e.data == b"" for e in seen)
        assert cpu.stats()["handler_calls"] == 7


def test_in_handler_may_return_bytes_or_negative_ints(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        inputs = iter([b"\x01\x00\x00\x00", -1, bytes(4)])
        outputs: list[bytes] = []
        vm.on_io(DEV_IN, lambda exit: next(inputs))
        vm.on_io(DEV_OUT, lambda exit: outputs.append(exit.data))
        assert cpu.run(timeout=10).reason == "hlt"
        assert outputs == [b"\x02\x00\x00\x00", b"\xfe\xff\xff\xff"]


def test_unhandled_in_can_be_answered_by_the_caller(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.IoExit) and not exit.is_write and exit.port == DEV_IN
        with pytest.raises(ValueError, match="exactly 4"):
            cpu.respond(b"\x01")
        cpu.respond(1000)
        with pytest.raises(ValueError, match="no IN or MMIO read is waiting"):
            cpu.respond(1)  # already answered
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.IoExit) and exit.is_write and exit.value == 2000
        with pytest.raises(ValueError, match="no IN or MMIO read is waiting"):
            cpu.respond(1)  # an OUT needs no answer
        exit = cpu.run(timeout=10)
        assert exit.reason == "io" and not exit.is_write  # type: ignore[attr-defined]
        # Without an answer the guest reads 0 and halts.
        assert cpu.run(timeout=10).reason == "hlt"


def test_unhandled_mmio_read_can_be_answered_by_the_caller(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("mmio_real"))
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.MmioExit) and not exit.is_write
        cpu.respond(b"\x10\x00\x00\x00")
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.MmioExit) and exit.is_write and exit.value == 0x11


def test_mmio_handler_reads_and_writes(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("mmio_real"))
    with vm:
        log: list[tuple[int, int, bool, bytes]] = []
        regs = {0xA0000: 0x11223344, 0xA0010: 0x5A, 0xA0020: 0xBEEF}

        @vm.on_mmio(0xA0000, 0x1000)
        def device(exit: kvmpy.MmioExit) -> int | None:
            log.append((exit.address, exit.size, exit.is_write, exit.data))
            return None if exit.is_write else regs[exit.address]

        assert cpu.run(timeout=10).reason == "hlt"
        assert log == [
            (0xA0000, 4, False, b""),
            (0xA0004, 4, True, (0x11223345).to_bytes(4, "little")),
            (0xA0010, 1, False, b""),
            (0xA0011, 1, True, b"\x5a"),
            (0xA0020, 2, False, b""),
            (0xA0022, 2, True, b"\xef\xbe"),
        ]


def test_unhandled_mmio_is_returned(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("mmio_real"))
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.MmioExit)
        assert (exit.reason, exit.address, exit.size, exit.is_write) == ("mmio", 0xA0000, 4, False)
        assert "read address=0xa0000" in repr(exit)
        exit = cpu.run(timeout=10)  # the read got 0, so the guest writes 1
        assert isinstance(exit, kvmpy.MmioExit)
        assert (exit.address, exit.is_write, exit.value) == (0xA0004, True, 1)


def test_user_mode_guest_computes_natively_and_exits_through_the_exit_port(
    guest: Guest,
) -> None:
    n = 1_000_000
    vm, cpu = user_mode_vm(guest("hello64"), rdi=n)
    with vm:
        console = vm.add_console(CONSOLE)
        port = vm.add_exit_port(EXIT_PORT)
        halves: list[int] = []
        vm.on_io(DEV_OUT, lambda exit: halves.append(exit.value))
        exit = cpu.run(timeout=30)
        assert isinstance(exit, kvmpy.GuestExit)
        assert exit.reason == "exit" and exit.code == 0 and exit.port == EXIT_PORT == port.port
        assert console.output() == b"Hello from 64-bit user mode!\n"
        result = halves[0] | halves[1] << 32
        assert result == 0x82F6E3747082AB40  # x_1e6 of the LCG, computed independently
        assert cpu.regs.rbx == result
        assert cpu.sregs.cs.dpl == 3


def test_exit_code_is_the_value_written() -> None:
    # mov ax, 0x1234 ; out 0xf4, ax
    vm, cpu = real_mode_vm(bytes([0xB8, 0x34, 0x12, 0xE7, EXIT_PORT]))
    with vm:
        vm.add_exit_port(EXIT_PORT)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit)
        assert exit.code == 0x1234
        assert cpu.regs.rip == 0x1000 + 5  # the OUT is complete: RIP is past it
        assert "GuestExit(code=4660" in repr(exit)


def test_string_io_is_handled_element_by_element() -> None:
    # mov si, 0x1100 ; mov cx, 5 ; mov dx, 0x3f8 ; cld ; rep outsb ; hlt
    code = bytes([0xBE, 0x00, 0x11, 0xB9, 0x05, 0x00, 0xBA, 0xF8, 0x03, 0xFC, 0xF3, 0x6E, 0xF4])
    vm, cpu = real_mode_vm(code)
    with vm:
        vm.memory_regions[0].write(0x1100, b"rep!\n")
        console = vm.add_console(CONSOLE)
        assert cpu.run(timeout=10).reason == "hlt"
        assert console.output() == b"rep!\n"


def test_hlt_handler_resumes_the_guest() -> None:
    # hlt ; hlt ; mov al, 7 ; out 0xf4, al
    vm, cpu = real_mode_vm(bytes([0xF4, 0xF4, 0xB0, 0x07, 0xE6, EXIT_PORT]))
    with vm:
        vm.add_exit_port(EXIT_PORT)
        halts: list[kvmpy.Exit] = []
        vm.on_hlt(halts.append)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 7
        assert len(halts) == 2 and all(h.reason == "hlt" for h in halts)


def test_handler_stop_returns_that_exit(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        count = 0

        @vm.on_io(CONSOLE)
        def stop_at_third(exit: kvmpy.IoExit) -> None:
            nonlocal count
            count += 1
            if count == 3:
                exit.stop()

        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.IoExit)
        assert exit.stopped and exit.data == b"l"
        assert count == 3
        # Running again continues after the stopped OUT.
        assert cpu.run(timeout=10).reason == "hlt"
        assert count == len(b"Hello from a KVM guest!\n")


def test_in_handler_can_answer_and_stop(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:

        @vm.on_io(DEV_IN)
        def answer_and_stop(exit: kvmpy.IoExit) -> int:
            exit.stop()
            return 0x55

        exit = cpu.run(timeout=10)
        assert exit.stopped and exit.reason == "io"
        # The IN was completed before run() returned: the value is already in EAX.
        assert cpu.regs.rax & 0xFFFFFFFF == 0x55


def test_handler_exception_is_reraised_with_its_traceback(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:

        class DeviceFault(Exception):
            pass

        def broken_device(exit: kvmpy.IoExit) -> None:
            raise DeviceFault(f"bad byte {exit.data!r}")

        vm.on_io(CONSOLE, broken_device)
        with pytest.raises(DeviceFault, match="bad byte b'H'") as info:
            cpu.run(timeout=10)
        assert any(entry.name == "broken_device" for entry in info.traceback)
        # The VM and vCPU remain usable.
        vm.remove_handler(broken_device)
        console = vm.add_console(CONSOLE)
        assert cpu.run(timeout=10).reason == "hlt"
        assert console.output() == b"ello from a KVM guest!\n"


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        ("text", TypeError, "must return an int or 4 bytes"),
        (None, TypeError, "must return an int or 4 bytes"),
        (b"\x01\x02", ValueError, "returned 2 bytes .* exactly 4"),
        (1 << 32, ValueError, "does not fit in 4 byte"),
        (-(1 << 31) - 1, ValueError, "does not fit in 4 byte"),
        (2**70, ValueError, "does not fit"),
        (1.0, TypeError, "returned float"),
    ],
)
def test_in_handler_wrong_answers(guest: Guest, answer: object, error: type, match: str) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        vm.on_io(DEV_IN, lambda exit: answer)
        with pytest.raises(error, match=match):
            cpu.run(timeout=10)


def test_write_handler_must_return_none(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        vm.on_io(CONSOLE, lambda exit: 1)
        with pytest.raises(TypeError, match="must return None"):
            cpu.run(timeout=10)


def test_mmio_handler_wrong_size(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("mmio_real"))
    with vm:
        vm.on_mmio(0xA0000, 0x100, lambda exit: b"\x00")
        with pytest.raises(ValueError, match="MMIO read of 4 byte.* at 0xa0000"):
            cpu.run(timeout=10)


def test_timeout_stops_an_endless_loop() -> None:
    vm, cpu = real_mode_vm(JMP_SELF)
    with vm:
        start = time.monotonic()
        exit = cpu.run(timeout=0.2)
        assert exit.reason == "timeout"
        assert time.monotonic() - start >= 0.2
        assert cpu.regs.rip == 0x1000
        # A zero timeout returns at once with the same reason.
        assert cpu.run(timeout=0).reason == "timeout"


def test_timeout_in_native_user_mode_code() -> None:
    # 64-bit: jmp $ (runs natively on nested KVM; the kick must still land).
    vm, cpu = user_mode_vm(JMP_SELF)
    with vm:
        assert cpu.run(timeout=0.2).reason == "timeout"


def test_timeout_while_exits_keep_coming(guest: Guest) -> None:
    vm, cpu = user_mode_vm(guest("counter64"), rdi=2**62)
    with vm:
        console = vm.add_console(DEV_OUT, limit=1024)
        assert cpu.run(timeout=0.2).reason == "timeout"
        assert cpu.stats()["handler_calls"] == 0
        # The guest was busy with exits (handled in Rust) when the deadline came.
        out = console.output()
        assert len(out) > 1 and counts_up(out)


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_bad_timeouts(timeout: float) -> None:
    vm, cpu = real_mode_vm(JMP_SELF)
    with vm, pytest.raises(ValueError, match="timeout"):
        cpu.run(timeout=timeout)


def test_stop_from_another_thread() -> None:
    vm, cpu = user_mode_vm(MARK_AND_SPIN, rdi=MARK)
    with vm:
        stopper = once_guests_run(vm, cpu.stop)  # once the guest spins in its `jmp $`
        exit = cpu.run(timeout=30)
        stopper.join()
        assert exit.reason == "stopped"
        assert cpu.regs.rip == LONG_LOAD + SPIN_OFFSET
        # A stop requested while the vCPU is not running is kept for its next run, which
        # returns "stopped" at once; the run after that runs normally.
        cpu.stop()
        before = cpu.stats()["exits"]
        assert cpu.run(timeout=5).reason == "stopped"
        assert cpu.stats()["exits"] == before  # the guest was not entered
        assert cpu.run(timeout=0.05).reason == "timeout"


def test_triple_fault_is_a_shutdown_exit() -> None:
    # ud2 in 64-bit user mode with no IDT: #UD -> #DF -> triple fault.
    vm, cpu = user_mode_vm(UD2)
    with vm:
        assert cpu.run(timeout=10).reason == "shutdown"


def test_run_on_a_busy_vcpu_is_refused() -> None:
    vm, cpu = user_mode_vm(MARK_AND_SPIN, rdi=MARK)
    with vm:
        errors: list[BaseException] = []

        def second_run() -> None:  # once the guest spins in its `jmp $`
            try:
                cpu.run(timeout=1)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            try:
                _ = cpu.regs
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            cpu.stop()

        t = once_guests_run(vm, second_run)
        assert cpu.run(timeout=10).reason == "stopped"
        t.join()
        assert [type(e) for e in errors] == [kvmpy.VcpuBusyError, kvmpy.VcpuBusyError]
        assert "running on another thread" in str(errors[0])


def test_handler_may_use_its_own_vcpu(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        seen: list[int] = []

        @vm.on_io(DEV_IN)
        def read(exit: kvmpy.IoExit) -> int:
            seen.append(cpu.regs.rip)
            if len(seen) == 2:
                cpu.set_regs(rip=0x1000)  # handlers may change state, too
            if len(seen) > 3:
                return 0
            with pytest.raises(kvmpy.VcpuBusyError, match="already running on this thread"):
                cpu.run()
            return 1

        vm.on_io(DEV_OUT, lambda exit: None)
        assert cpu.run(timeout=10).reason == "hlt"
        assert len(seen) == 4


def test_many_python_exits_are_counted_exactly(guest: Guest) -> None:
    n = 500
    vm, cpu = user_mode_vm(guest("counter64"), rdi=n)
    with vm:
        values: list[int] = []
        vm.on_io(DEV_OUT, lambda exit: values.append(exit.value))
        vm.add_exit_port(EXIT_PORT)
        assert cpu.run(timeout=30).reason == "exit"
        assert values == [i & 0xFF for i in range(n)]
        assert cpu.stats()["handler_calls"] == n
