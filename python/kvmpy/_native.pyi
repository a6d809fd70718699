"""Type stubs of kvmpy's native core (``kvmpy._native``)."""

from collections.abc import Callable
from typing import Any, TypeVar, final, overload

from typing_extensions import disjoint_base

from kvmpy._exits import ExitReason

_F = TypeVar("_F", bound=Callable[..., Any])
_BytesLike = bytes | bytearray | memoryview

__all__ = [
    "KVM_API_VERSION",
    "Console",
    "CpuidEntry",
    "DTable",
    "DebugExit",
    "ExitInfo",
    "ExitPort",
    "FailEntryExit",
    "GuestExit",
    "InternalErrorExit",
    "IoExit",
    "Kvm",
    "MemoryRegion",
    "MmioExit",
    "Regs",
    "Segment",
    "Sregs",
    "SystemEventExit",
    "UnknownExit",
    "Vcpu",
    "Vm",
]

KVM_API_VERSION: int

@final
class CpuidEntry:
    @property
    def function(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def eax(self) -> int: ...
    @property
    def ebx(self) -> int: ...
    @property
    def ecx(self) -> int: ...
    @property
    def edx(self) -> int: ...

@final
class Kvm:
    def __new__(cls) -> Kvm: ...
    @property
    def api_version(self) -> int: ...
    @property
    def vcpu_mmap_size(self) -> int: ...
    @property
    def recommended_vcpus(self) -> int: ...
    @property
    def max_vcpus(self) -> int: ...
    @property
    def max_memslots(self) -> int: ...
    def check_extension(self, cap: str | int) -> int: ...
    def capabilities(self) -> dict[str, int]: ...
    def supported_cpuid(self) -> list[CpuidEntry]: ...

@final
class MemoryRegion:
    @property
    def guest_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def slot(self) -> int: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def dirty_log(self) -> bool: ...
    @property
    def attached(self) -> bool: ...
    def read(self, offset: int, n: int) -> bytes: ...
    def write(self, offset: int, data: _BytesLike) -> None: ...
    def dirty_pages(self) -> list[int]: ...
    def __len__(self) -> int: ...

@final
class Regs:
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int
    def __new__(cls, **fields: int) -> Regs: ...
    def as_dict(self) -> dict[str, int]: ...

@final
class Segment:
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int
    unusable: int
    def __new__(
        cls,
        *,
        base: int = 0,
        limit: int = 0xFFFF,
        selector: int = 0,
        type: int = 3,
        present: int = 1,
        dpl: int = 0,
        db: int = 0,
        s: int = 1,
        l: int = 0,
        g: int = 0,
        avl: int = 0,
        unusable: int = 0,
    ) -> Segment: ...

@final
class DTable:
    base: int
    limit: int
    def __new__(cls, base: int = 0, limit: int = 0xFFFF) -> DTable: ...

@final
class Sregs:
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DTable
    idt: DTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: list[int]

@disjoint_base
class ExitInfo:
    @property
    def reason(self) -> ExitReason: ...
    @property
    def vcpu_id(self) -> int: ...
    @property
    def stopped(self) -> bool: ...
    def stop(self) -> None: ...

@final
class IoExit(ExitInfo):
    @property
    def port(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def is_write(self) -> bool: ...
    @property
    def data(self) -> bytes: ...
    @property
    def value(self) -> int: ...

@final
class MmioExit(ExitInfo):
    @property
    def address(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def is_write(self) -> bool: ...
    @property
    def data(self) -> bytes: ...
    @property
    def value(self) -> int: ...

@final
class GuestExit(ExitInfo):
    @property
    def code(self) -> int: ...
    @property
    def port(self) -> int: ...

@final
class FailEntryExit(ExitInfo):
    @property
    def hardware_entry_failure_reason(self) -> int: ...
    @property
    def cpu(self) -> int: ...

@final
class InternalErrorExit(ExitInfo):
    @property
    def suberror(self) -> int: ...
    @property
    def data(self) -> list[int]: ...

@final
class SystemEventExit(ExitInfo):
    @property
    def event_type(self) -> int: ...
    @property
    def data(self) -> list[int]: ...

@final
class DebugExit(ExitInfo):
    @property
    def exception(self) -> int: ...
    @property
    def pc(self) -> int: ...
    @property
    def dr6(self) -> int: ...
    @property
    def dr7(self) -> int: ...

@final
class UnknownExit(ExitInfo):
    @property
    def kvm_exit_reason(self) -> int: ...

@final
class Console:
    @property
    def port(self) -> int: ...
    def output(self) -> bytes: ...
    def take(self) -> bytes: ...
    def clear(self) -> None: ...

@final
class ExitPort:
    @property
    def port(self) -> int: ...

@final
class Vcpu:
    @property
    def id(self) -> int: ...
    @property
    def regs(self) -> Regs: ...
    @regs.setter
    def regs(self, regs: Regs) -> None: ...
    def set_regs(self, **fields: int) -> None: ...
    @property
    def sregs(self) -> Sregs: ...
    @sregs.setter
    def sregs(self, sregs: Sregs) -> None: ...
    def set_sregs(self, **fields: int | Segment | DTable) -> None: ...
    def setup_real_mode(self, *, cs: int = 0, ip: int = 0) -> None: ...
    def setup_long_mode(
        self, *, user: bool = True, tables_addr: int = 0x1000, map_gib: int = 1
    ) -> None: ...
    def run(self, timeout: float | None = None) -> ExitInfo: ...
    def respond(self, value: int | bytes) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

@disjoint_base
class Vm:
    def __new__(cls) -> Vm: ...
    def add_memory(
        self, guest_addr: int, size: int, *, readonly: bool = False, dirty_log: bool = False
    ) -> MemoryRegion: ...
    def remove_memory(self, region: MemoryRegion) -> None: ...
    @property
    def memory_regions(self) -> list[MemoryRegion]: ...
    def read(self, gpa: int, n: int) -> bytes: ...
    def write(self, gpa: int, data: _BytesLike) -> None: ...
    def create_vcpu(self, id: int | None = None) -> Vcpu: ...
    @property
    def vcpus(self) -> list[Vcpu]: ...
    @overload
    def on_io(self, ports: int | range, handler: _F) -> _F: ...
    @overload
    def on_io(self, ports: int | range, handler: None = None) -> Callable[[_F], _F]: ...
    @overload
    def on_mmio(self, address: int, size: int, handler: _F) -> _F: ...
    @overload
    def on_mmio(self, address: int, size: int, handler: None = None) -> Callable[[_F], _F]: ...
    @overload
    def on_hlt(self, handler: _F) -> _F: ...
    @overload
    def on_hlt(self, handler: None = None) -> Callable[[_F], _F]: ...
    def remove_handler(self, handler: object) -> int: ...
    def add_console(self, port: int = 0x3F8, *, limit: int = 1 << 20) -> Console: ...
    def add_exit_port(self, port: int) -> ExitPort: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Vm: ...
    def __exit__(self, *args: object) -> None: ...
