"""Checked by mypy (`make lint`, CI), never run: the stubs type each handler, so a handler
of the wrong kind is an error. Each `type: ignore[...]` marks a line mypy must refuse;
`warn_unused_ignores` (strict mode) makes an accepted one an error."""

from __future__ import annotations

import kvmpy


def io(exit: kvmpy.IoExit) -> int | None:
    return None if exit.is_write else 1


def mmio(exit: kvmpy.MmioExit) -> bytes | None:
    return None if exit.is_write else bytes(exit.size)


def hlt(exit: kvmpy.ExitInfo) -> None:
    exit.stop()


def at_breakpoint(exit: kvmpy.BreakpointExit) -> None:
    print(hex(exit.address))


def add(a: int, b: int) -> int:
    return a + b


def typed(vm: kvmpy.Vm, cpu: kvmpy.Vcpu) -> int:
    assert vm.on_io(0x10, io) is io  # the handler comes back with its own type
    vm.on_mmio(0xD000, 0x1000, mmio)
    vm.on_hlt(hlt)
    vm.host_function(1, add)

    @vm.on_io(range(0x20, 0x28))
    def decorated(exit: kvmpy.IoExit) -> bytes:
        return bytes(exit.size)

    vm.on_io(0x10, mmio)  # type: ignore[type-var]
    vm.on_mmio(0xD000, 0x1000, io)  # type: ignore[type-var]
    vm.on_io(0x10, lambda exit: "a string")  # type: ignore[type-var]
    vm.on_hlt(io)  # type: ignore[type-var]
    assert vm.on_breakpoint(at_breakpoint) is at_breakpoint
    vm.on_breakpoint(io)  # type: ignore[type-var]
    vm.host_function(2, lambda: "a string")  # type: ignore[type-var]
    stats = cpu.stats()
    stats["nope"]  # type: ignore[typeddict-item]
    return stats["exits"] + stats["handler_calls"]
