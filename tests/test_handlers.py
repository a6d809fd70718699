"""Registering and removing handlers, and their bad inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kvmpy

from .support import CONSOLE, DEV_IN, DEV_OUT, LONG_LOAD, REAL_LOAD, real_mode_vm, user_mode_vm

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]


def test_on_io_returns_the_handler_in_both_forms(vm: kvmpy.Vm) -> None:
    def a(exit: kvmpy.IoExit) -> None:
        pass

    assert vm.on_io(0x10, a) is a

    @vm.on_io(range(0x20, 0x28))
    def b(exit: kvmpy.IoExit) -> None:
        pass

    assert b.__name__ == "b"
    assert vm.remove_handler(a) == 1
    assert vm.remove_handler(b) == 1


def test_port_ranges_cover_every_port_in_them(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("double_real"))
    with vm:
        ports: list[int] = []

        @vm.on_io(range(DEV_IN, DEV_OUT + 1))
        def device(exit: kvmpy.IoExit) -> int | None:
            ports.append(exit.port)
            return None if exit.is_write else (0 if len(ports) > 2 else 5)

        assert cpu.run(timeout=10).reason == "hlt"
        assert ports == [DEV_IN, DEV_OUT, DEV_IN]


@pytest.mark.parametrize(
    ("ports", "error"),
    [
        (-1, ValueError),
        (0x10000, ValueError),
        (range(0, 0x10001), ValueError),
        (range(5, 5), ValueError),
        (range(0, 10, 2), ValueError),
        ("0x10", TypeError),
        (1.5, TypeError),
    ],
)
def test_bad_ports(vm: kvmpy.Vm, ports: object, error: type) -> None:
    with pytest.raises(error):
        vm.on_io(ports, lambda e: None)  # type: ignore[arg-type]
    with pytest.raises(error):
        vm.on_io(ports)  # type: ignore[arg-type,call-overload]


def test_handlers_must_be_callable(vm: kvmpy.Vm) -> None:
    with pytest.raises(TypeError, match="callable"):
        vm.on_io(0x10, 42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="callable"):
        vm.on_io(0x10)(42)
    with pytest.raises(TypeError, match="callable"):
        vm.on_mmio(0xA0000, 0x10, "nope")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="callable"):
        vm.on_hlt(None or 3)  # type: ignore[call-overload]


def test_overlapping_port_handlers_are_rejected(vm: kvmpy.Vm) -> None:
    vm.on_io(range(0x10, 0x20), lambda e: None)
    with pytest.raises(ValueError, match="overlap"):
        vm.on_io(0x1F, lambda e: None)
    with pytest.raises(ValueError, match="overlap"):
        vm.add_console(0x15)
    with pytest.raises(ValueError, match="overlap"):
        vm.add_exit_port(0x10)
    vm.on_io(0x20, lambda e: None)  # adjacent is fine


def test_mmio_ranges_must_not_overlap_ram_or_each_other(vm: kvmpy.Vm) -> None:
    vm.add_memory(0, 0x10000)
    with pytest.raises(kvmpy.GuestMemoryError, match="overlaps memory region"):
        vm.on_mmio(0xF000, 0x2000, lambda e: None)
    vm.on_mmio(0x10000, 0x1000, lambda e: None)
    with pytest.raises(kvmpy.GuestMemoryError, match="overlaps the MMIO range"):
        vm.on_mmio(0x10800, 0x1000, lambda e: None)
    with pytest.raises(kvmpy.GuestMemoryError, match="overlaps the MMIO range"):
        vm.add_memory(0x10000, 0x1000)
    with pytest.raises(kvmpy.GuestMemoryError, match="must not be zero"):
        vm.on_mmio(0x20000, 0, lambda e: None)
    with pytest.raises(kvmpy.GuestMemoryError, match="overflows"):
        vm.on_mmio(2**64 - 0x10, 0x20, lambda e: None)


def test_remove_handler_removes_every_registration(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        seen: list[int] = []

        def h(exit: kvmpy.IoExit) -> None:
            seen.append(exit.port)

        vm.on_io(CONSOLE, h)
        vm.on_io(0x500, h)
        vm.on_mmio(0xA0000, 0x100, h)
        vm.on_hlt(h)
        assert vm.remove_handler(h) == 4
        with pytest.raises(ValueError, match="not registered"):
            vm.remove_handler(h)
        # Nothing handles the console any more: run() returns its first OUT.
        assert cpu.run(timeout=10).reason == "io"
        assert seen == []


def test_devices_can_be_removed_and_replaced(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        console = vm.add_console(CONSOLE)
        exit_port = vm.add_exit_port(0xF4)
        assert vm.remove_handler(console) == 1
        assert vm.remove_handler(exit_port) == 1
        with pytest.raises(ValueError):
            vm.remove_handler(console)
        seen = bytearray()
        vm.on_io(CONSOLE, lambda e: seen.extend(e.data))
        assert cpu.run(timeout=10).reason == "hlt"
        assert seen == b"Hello from a KVM guest!\n"
        assert console.output() == b""


def test_handler_added_by_a_handler_takes_effect_at_once(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        console: list[kvmpy.Console] = []

        @vm.on_io(CONSOLE)
        def first(exit: kvmpy.IoExit) -> None:
            vm.remove_handler(first)
            console.append(vm.add_console(CONSOLE))

        assert cpu.run(timeout=10).reason == "hlt"
        assert console[0].output() == b"ello from a KVM guest!\n"


def test_handler_removed_by_itself_leaves_the_next_out_to_run(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        seen = bytearray()

        @vm.on_io(CONSOLE)
        def three(exit: kvmpy.IoExit) -> None:
            seen.extend(exit.data)
            if len(seen) == 3:
                vm.remove_handler(three)

        before = cpu.stats()
        ex = cpu.run(timeout=10)
        # The fourth OUT finds no handler any more: run() returns it.
        assert isinstance(ex, kvmpy.IoExit)
        assert (ex.port, ex.data, ex.is_write) == (CONSOLE, b"l", True)
        assert seen == b"Hel"
        after = cpu.stats()
        assert after["handler_calls"] - before["handler_calls"] == 3
        assert after["exits"] - before["exits"] == 4


def test_console_limit_keeps_the_newest_output(guest: Guest) -> None:
    vm, cpu = real_mode_vm(guest("hello_real"))
    with vm:
        console = vm.add_console(CONSOLE, limit=8)
        assert cpu.run(timeout=10).reason == "hlt"
        out = console.output()
        assert 0 < len(out) <= 8
        assert b"Hello from a KVM guest!\n".endswith(out)
        assert console.take() == out
        assert console.output() == b""
        with pytest.raises(ValueError, match="positive"):
            vm.add_console(0x2F8, limit=0)


def test_exit_object_repr_and_type(vm: kvmpy.Vm) -> None:
    assert issubclass(kvmpy.IoExit, kvmpy.Exit)
    assert kvmpy.Exit is kvmpy.ExitInfo
    assert kvmpy.ExitReason("io") is kvmpy.ExitReason.IO
    assert {r.value for r in kvmpy.ExitReason} >= {
        "io",
        "mmio",
        "hlt",
        "shutdown",
        "exit",
        "timeout",
        "fail_entry",
        "internal_error",
        "system_event",
    }


def test_exit_objects_a_handler_keeps_stay_as_they_were() -> None:
    # Real mode: mov cx, 5 ; l: mov ax, cx ; out 0x11, ax ; in al, 0x10 ; loop l ; hlt
    code = bytes([0xB9, 0x05, 0x00, 0x89, 0xC8, 0xE7, DEV_OUT, 0xE4, DEV_IN, 0xE2, 0xF8, 0xF4])
    vm, cpu = real_mode_vm(code)
    with vm:
        kept: list[kvmpy.IoExit] = []
        seen: list[tuple[int, int, bool]] = []

        @vm.on_io(DEV_OUT)
        def out(exit: kvmpy.IoExit) -> None:
            seen.append((exit.port, exit.value, exit.is_write))
            if exit.value % 2:
                kept.append(exit)  # odd values: the handler keeps the object

        @vm.on_io(DEV_IN)
        def inp(exit: kvmpy.IoExit) -> int:
            seen.append((exit.port, exit.value, exit.is_write))
            return 0

        assert cpu.run(timeout=10).reason == "hlt"
        assert seen == [
            x for v in (5, 4, 3, 2, 1) for x in ((DEV_OUT, v, True), (DEV_IN, 0, False))
        ]
        assert [(e.port, e.size, e.value, e.data, e.is_write) for e in kept] == [
            (DEV_OUT, 2, v, v.to_bytes(2, "little"), True) for v in (5, 3, 1)
        ]
        assert len({id(e) for e in kept}) == 3


@pytest.mark.parametrize("mode", ["real", "user"])
def test_the_rip_a_port_io_handler_sees(mode: str) -> None:
    """IN: the IN itself. OUT: the OUT itself (Linux's KVM) or the next instruction (some
    nested KVMs), as the README says; the guest goes on after the instruction either way."""
    code = bytes([0xE6, DEV_OUT, 0xE4, DEV_IN, 0xE6, DEV_OUT])  # out ; in ; out
    vm, cpu = real_mode_vm(code) if mode == "real" else user_mode_vm(code)
    base = REAL_LOAD if mode == "real" else LONG_LOAD
    with vm:
        rips: list[tuple[bool, int]] = []
        vm.on_io(DEV_IN, lambda e: rips.append((False, cpu.regs.rip)) or 7)

        @vm.on_io(DEV_OUT)
        def out(exit: kvmpy.IoExit) -> None:
            rips.append((True, cpu.regs.rip))
            if len(rips) == 3:
                exit.stop()

        assert cpu.run(timeout=10).stopped
        (_, out1), (_, in1), (_, out2) = rips
        assert in1 == base + 2
        assert out1 in (base, base + 2)
        assert out2 - (base + 4) == out1 - base  # one rule for every OUT on a host
        assert cpu.regs.rax & 0xFF == 7
