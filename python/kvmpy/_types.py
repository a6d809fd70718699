"""Types the stubs of the native module use (defined here, at run time too)."""

from __future__ import annotations

from typing import TypedDict


class VcpuStats(TypedDict):
    """What ``Vcpu.stats()`` returns: counters since the vCPU was created."""

    exits: int
    """Returns from ``KVM_RUN``."""
    handler_calls: int
    """Python handler calls: the only times the run loop takes the GIL."""
    full_restores: int
    """Snapshot restores that rewrote all of the vCPU's state (the others put back only the
    general registers and the FPU/SSE/AVX state)."""
    stub_loads: int
    """Runs that started in kvmpy's FPU restore stub: fast restores whose FPU/SSE/AVX state
    the guest loaded itself instead of a ``KVM_SET_XSAVE`` ioctl."""


__all__ = ["VcpuStats"]
