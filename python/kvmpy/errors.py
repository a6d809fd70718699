"""Exceptions raised by kvmpy.

Every error that comes from KVM or from using kvmpy's objects wrongly derives from
:class:`KvmError`. Plain argument mistakes (a size of the wrong type, a negative value)
raise the usual ``TypeError``/``ValueError``; a handler that returns the wrong kind of
value makes ``run()`` raise ``TypeError``/``ValueError`` naming the handler and the exit.
"""

from __future__ import annotations


class KvmError(Exception):
    """Base class of kvmpy's errors.

    ``errno`` is the OS error number when the error comes from a failed ioctl or
    system call, otherwise ``None``.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailable(KvmError):
    """``/dev/kvm`` is missing, cannot be opened, or speaks an unsupported API version."""


class KvmUnsupported(KvmError):
    """This host's KVM cannot do what was asked; the message names the host's limit and
    what to do instead (``python -m kvmpy info`` says what the host supports)."""


class GuestMemoryError(KvmError, ValueError):
    """A bad memory region or guest address.

    Raised for a size that is zero or not page aligned, a region that overlaps another
    region or an MMIO handler, and an access outside guest memory or outside a region.
    """


class VmClosedError(KvmError):
    """The VM (or the vCPU or memory region that belonged to it) has been closed."""


class VcpuBusyError(KvmError):
    """The vCPU is running on another thread, or ``run()`` was called re-entrantly."""


__all__ = [
    "GuestMemoryError",
    "KvmError",
    "KvmUnavailable",
    "KvmUnsupported",
    "VcpuBusyError",
    "VmClosedError",
]
