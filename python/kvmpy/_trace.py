"""``Vcpu.trace``: the instructions a vCPU executes, one single step each."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmpy._native import _disassemble

if TYPE_CHECKING:
    from kvmpy._native import Vcpu


def _bits(cpu: Vcpu) -> int:
    s = cpu.sregs
    if s.efer & (1 << 10) and s.cs.l:
        return 64
    return 32 if s.cs.db else 16


def _code_at(cpu: Vcpu, rip: int) -> bytes:
    """Up to 15 bytes at ``rip`` (fewer where the mapping ends)."""
    for n in (15, 8, 4, 1):
        try:
            return cpu.read_virtual(rip, n)
        except Exception:
            continue
    return b""


def trace(cpu: Vcpu, count: int | None, until: int | None) -> Iterator[tuple[int, bytes, str]]:
    done = 0
    while count is None or done < count:
        rip = cpu.regs.rip
        if until is not None and rip == until:
            return
        insns = _disassemble(_code_at(cpu, rip), _bits(cpu), rip, 1)
        yield insns[0] if insns else (rip, b"", "(unreadable)")
        cpu.step()
        done += 1
        last = cpu.last_exit
        if last is None or last.reason != "step":
            return
