"""kvmpy: script KVM virtual machines from Python.

Create a :class:`Vm`, give it memory, load code, create a :class:`Vcpu`, set its
registers and :meth:`Vcpu.run` it. The vCPU runs at hardware speed on a native thread
with the GIL released; only the exits you register Python handlers for reach Python.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass

from kvmpy._exits import ExitReason
from kvmpy._native import (
    KVM_API_VERSION,
    BreakpointExit,
    Console,
    CpuidEntry,
    DebugExit,
    DTable,
    ExceptionExit,
    ExitInfo,
    ExitPort,
    FailEntryExit,
    GdbServer,
    GuestExit,
    InternalErrorExit,
    IoExit,
    Kvm,
    LoadedImage,
    MemoryRegion,
    MmioExit,
    Regs,
    Segment,
    Snapshot,
    Sregs,
    StepExit,
    SystemEventExit,
    Uart,
    UnknownExit,
    Vcpu,
    Vm,
    WatchpointExit,
    _shutdown_all,
)
from kvmpy._native import __version__ as __version__
from kvmpy._types import VcpuStats
from kvmpy.errors import (
    GuestMemoryError,
    KvmError,
    KvmUnavailable,
    KvmUnsupported,
    VcpuBusyError,
    VmClosedError,
)
from kvmpy.explain import explain
from kvmpy.sdk import CompileError, compile_guest, guest_sdk, shipped_guest

# vCPU threads started by Vm.start() must stop before the interpreter goes away.
atexit.register(_shutdown_all)

Exit = ExitInfo
"""The base class of every exit object (``kvmpy.Exit`` is ``kvmpy.ExitInfo``)."""


@dataclass(frozen=True)
class Availability:
    """Whether KVM can be used here; false-y when not, with the reason."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def available() -> Availability:
    """Tells whether ``/dev/kvm`` can be used by this process, and why not.

    >>> if not kvmpy.available():
    ...     print(kvmpy.available().reason)
    """
    try:
        kvm = Kvm()
    except KvmUnavailable as e:
        return Availability(False, str(e))
    return Availability(True, f"KVM API version {kvm.api_version}")


__all__ = [
    "KVM_API_VERSION",
    "Availability",
    "BreakpointExit",
    "CompileError",
    "Console",
    "CpuidEntry",
    "DTable",
    "DebugExit",
    "ExceptionExit",
    "Exit",
    "ExitInfo",
    "ExitPort",
    "ExitReason",
    "FailEntryExit",
    "GdbServer",
    "GuestExit",
    "GuestMemoryError",
    "InternalErrorExit",
    "IoExit",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "KvmUnsupported",
    "LoadedImage",
    "MemoryRegion",
    "MmioExit",
    "Regs",
    "Segment",
    "Snapshot",
    "Sregs",
    "StepExit",
    "WatchpointExit",
    "SystemEventExit",
    "Uart",
    "UnknownExit",
    "Vcpu",
    "VcpuBusyError",
    "VcpuStats",
    "Vm",
    "VmClosedError",
    "available",
    "compile_guest",
    "explain",
    "guest_sdk",
    "shipped_guest",
]
