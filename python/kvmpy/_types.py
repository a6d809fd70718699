"""Types the stubs of the native module use (defined here, at run time too)."""

from __future__ import annotations

from typing import TypedDict


class VcpuStats(TypedDict):
    """What ``Vcpu.stats()`` returns: counters since the vCPU was created."""

    exits: int
    """Returns from ``KVM_RUN``."""
    handler_calls: int
    """Python handler calls: the only times the run loop takes the GIL."""


__all__ = ["VcpuStats"]
