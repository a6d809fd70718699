"""Exits in words: one line that says why a guest stopped and what to try."""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from kvmpy._native import (
    ExceptionExit,
    ExitInfo,
    FailEntryExit,
    GuestExit,
    InternalErrorExit,
    IoExit,
    MmioExit,
    UnknownExit,
    Vcpu,
    _disassemble,
)
from kvmpy.errors import KvmError

EXCEPTION_NAMES: dict[int, str] = {
    0: "divide error",
    1: "debug exception",
    2: "non-maskable interrupt",
    3: "breakpoint",
    4: "overflow",
    5: "bound range exceeded",
    6: "invalid opcode",
    7: "device not available",
    8: "double fault",
    10: "invalid TSS",
    11: "segment not present",
    12: "stack-segment fault",
    13: "general protection fault",
    14: "page fault",
    16: "x87 floating-point error",
    17: "alignment check",
    18: "machine check",
    19: "SIMD floating-point exception",
    21: "control protection exception",
}


def symbolize(address: int, symbols: Mapping[str, int] | None) -> str:
    """``"main+0x1c"`` for an address inside an image with ``symbols`` (name -> address,
    as ``LoadedImage.symbols``), or ``""`` when no symbol precedes it."""
    if not symbols:
        return ""
    named = sorted((addr, name) for name, addr in symbols.items() if addr and name)
    i = bisect.bisect_right(named, (address, "\uffff")) - 1
    if i < 0:
        return ""
    addr, name = named[i]
    return name if addr == address else f"{name}+{address - addr:#x}"


def _code_bits(cpu: Vcpu) -> int:
    s = cpu.sregs
    if s.efer & (1 << 10) and s.cs.l:
        return 64
    if s.cr0 & 1 and s.cs.db:
        return 32
    return 16


def _linear_rip(cpu: Vcpu) -> int:
    rip = cpu.regs.rip
    return rip if _code_bits(cpu) == 64 else (cpu.sregs.cs.base + rip) & 0xFFFF_FFFF


def instruction_at(cpu: Vcpu, address: int | None = None) -> str | None:
    """The instruction at ``address`` (default: the vCPU's rip) disassembled, or None when
    there is no guest RAM there."""
    address = _linear_rip(cpu) if address is None else address
    try:
        code = cpu.read_virtual(address, 15)
    except (KvmError, ValueError):
        try:
            code = cpu.read_virtual(address, 1)
        except (KvmError, ValueError):
            return None
    insns = _disassemble(code, _code_bits(cpu), address)
    return insns[0][2] if insns else None


def _where(cpu: Vcpu | None, symbols: Mapping[str, int] | None, decode: bool = True) -> str:
    if cpu is None:
        return ""
    rip = _linear_rip(cpu)
    sym = symbolize(rip, symbols)
    insn = instruction_at(cpu, rip) if decode else None
    return f" at rip={rip:#x}" + (f" ({sym})" if sym else "") + (f": {insn}" if insn else "")


def _cpl(cpu: Vcpu) -> int:
    return cpu.sregs.cs.selector & 3 if cpu.sregs.cr0 & 1 else 0


def explain(
    exit: ExitInfo,
    cpu: Vcpu | None = None,
    symbols: Mapping[str, int] | None = None,
    *,
    timeout: float | None = None,
) -> str:
    """One line that says why a run ended and, where it can, what to try.

    ``cpu`` (the vCPU that exited) adds where it stopped and the instruction there;
    ``symbols`` (``LoadedImage.symbols``) turn addresses into ``function+offset``.
    """
    if isinstance(exit, GuestExit):
        return f"the guest exited with code {exit.code} (port {exit.port:#x})"
    if isinstance(exit, ExceptionExit):
        what = EXCEPTION_NAMES.get(exit.vector, f"exception {exit.vector}")
        sym = symbolize(exit.rip, symbols)
        line = f"{exit.name} {what} at rip={exit.rip:#x}" + (f" ({sym})" if sym else "")
        if cpu is not None:
            insn = instruction_at(cpu, exit.rip)
            if insn:
                line += f": {insn}"
        if exit.vector == 14:
            access = "write" if exit.error_code & 2 else "read"
            kind = "fetch" if exit.error_code & 16 else access
            present = "protection violation" if exit.error_code & 1 else "not mapped"
            line += f" ({kind} of {exit.cr2:#x}: {present})"
        elif exit.error_code:
            line += f" (error code {exit.error_code:#x})"
        if exit.vector == 13 and exit.cs & 3 == 3:
            line += "; at CPL3 privileged instructions (hlt, cli, mov to cr*) raise #GP"
        return line
    if isinstance(exit, InternalErrorExit):
        line = f"internal error: {exit}"
        if cpu is not None and not exit.instruction_bytes:
            rip = _linear_rip(cpu)
            if instruction_at(cpu, rip) is None:
                line += f" (there is no guest RAM at rip={rip:#x})"
        return line
    if isinstance(exit, IoExit):
        what = f"wrote {exit.value:#x} to" if exit.is_write else "read from"
        return (
            f"the guest {what} I/O port {exit.port:#x}, which no device handles"
            # Whether rip is at the OUT or past it depends on the host's KVM: not decoded.
            f"{_where(cpu, symbols, decode=False)}"
        )
    if isinstance(exit, MmioExit):
        what = f"wrote {exit.value:#x} to" if exit.is_write else "read from"
        return (
            f"the guest {what} {exit.address:#x}, where there is no RAM and no MMIO handler"
            f"{_where(cpu, symbols)}"
        )
    if isinstance(exit, FailEntryExit):
        return (
            "the CPU refused to enter the guest (hardware entry failure reason "
            f"{exit.hardware_entry_failure_reason:#x}): the vCPU's registers describe a "
            "state it cannot run; set up a mode with setup_real_mode/setup_long_mode"
        )
    if isinstance(exit, UnknownExit):
        return f"an exit kvmpy does not interpret (KVM_EXIT {exit.kvm_exit_reason})"
    reason = exit.reason
    if reason == "shutdown":
        line = "the guest shut down (a triple fault)" + _where(cpu, symbols)
        if cpu is not None and _cpl(cpu) == 3:
            line += (
                "; a CPL3 guest triple-faults on any exception when there is no IDT, "
                "for example on a privileged instruction (hlt, cli, mov to cr*): "
                "setup_long_mode(exceptions=True) reports the exception instead"
            )
        else:
            line += (
                "; an exception occurred with no usable IDT (or while delivering one): "
                "setup_long_mode(exceptions=True) reports exceptions instead"
            )
        return line
    if reason == "timeout":
        after = f" after {timeout:g} s" if timeout is not None else ""
        return f"timed out{after}" + _where(cpu, symbols)
    if reason == "hlt":
        return "the guest halted (hlt)" + _where(cpu, symbols)
    if reason == "stopped":
        return "the run was stopped" + _where(cpu, symbols)
    return f"{reason}: {exit!r}"


__all__ = ["EXCEPTION_NAMES", "explain", "instruction_at", "symbolize"]
