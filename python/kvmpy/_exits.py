"""The reasons a vCPU's run can end."""

from __future__ import annotations

from enum import StrEnum


class ExitReason(StrEnum):
    """Why ``run()`` returned (or why a handler was called).

    A ``str`` enum: ``exit.reason == "io"`` works as well as
    ``exit.reason is ExitReason.IO``.
    """

    IO = "io"
    """Port I/O (``in``/``out``) that no handler took: an ``IoExit``."""
    MMIO = "mmio"
    """An access to guest memory with no RAM behind it: an ``MmioExit``."""
    HLT = "hlt"
    """The guest executed ``hlt`` and no HLT handler is registered."""
    SHUTDOWN = "shutdown"
    """The guest triple-faulted (or otherwise shut down)."""
    EXIT = "exit"
    """The guest wrote to an exit port: a ``GuestExit`` with ``code``."""
    TIMEOUT = "timeout"
    """``run(timeout=...)`` expired."""
    STOPPED = "stopped"
    """``Vcpu.stop()`` or ``Vm.close()`` stopped the run."""
    FAIL_ENTRY = "fail_entry"
    """The hardware refused to enter the guest: a ``FailEntryExit``."""
    INTERNAL_ERROR = "internal_error"
    """KVM could not handle something (e.g. emulation failure): an ``InternalErrorExit``."""
    SYSTEM_EVENT = "system_event"
    """A shutdown/reset/crash request: a ``SystemEventExit``."""
    DEBUG = "debug"
    """A debug exit (breakpoint, single step): a ``DebugExit``."""
    EXCEPTION = "exception"
    """A CPU exception reported by ``setup_long_mode(exceptions=True)``'s stubs: an
    ``ExceptionExit``."""
    BREAKPOINT = "breakpoint"
    """A breakpoint set with ``add_breakpoint`` was reached: a ``BreakpointExit``."""
    STEP = "step"
    """``Vcpu.step()`` executed one instruction: a ``StepExit``."""
    WATCHPOINT = "watchpoint"
    """An access hit a watchpoint set with ``add_watchpoint``: a ``WatchpointExit``."""
    UNKNOWN = "unknown"
    """Any other ``KVM_EXIT_*``: an ``UnknownExit`` with the raw number."""
