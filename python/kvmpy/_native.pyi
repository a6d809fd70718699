"""Type stubs of kvmpy's native core (``kvmpy._native``)."""

import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypeVar, final, overload

from typing_extensions import disjoint_base

from kvmpy._exits import ExitReason
from kvmpy._types import VcpuStats

# What each kind of handler takes and returns: mypy refuses a handler of the wrong kind.
_IoHandler = TypeVar("_IoHandler", bound=Callable[[IoExit], int | bytes | None])
_MmioHandler = TypeVar("_MmioHandler", bound=Callable[[MmioExit], int | bytes | None])
_HltHandler = TypeVar("_HltHandler", bound=Callable[[ExitInfo], None])
_BreakpointHandler = TypeVar("_BreakpointHandler", bound=Callable[[BreakpointExit], None])
_HostFunction = TypeVar("_HostFunction", bound=Callable[..., int | None])
_BytesLike = bytes | bytearray | memoryview
_Image = _BytesLike | str | os.PathLike[str]

__all__ = [
    "KVM_API_VERSION",
    "Console",
    "CpuidEntry",
    "BreakpointExit",
    "DTable",
    "DebugExit",
    "ExceptionExit",
    "ExitInfo",
    "ExitPort",
    "FailEntryExit",
    "FuzzExecutor",
    "GdbServer",
    "GuestExit",
    "InternalErrorExit",
    "IoExit",
    "Kvm",
    "LoadedImage",
    "MemoryRegion",
    "MmioExit",
    "PGO",
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
    "Vm",
    "__version__",
    "_debug_support",
    "_disassemble",
    "_exit_reasons",
    "_find_blocks",
    "_kick_signal",
    "_shutdown_all",
]

KVM_API_VERSION: int
__version__: str
PGO: bool
"""Whether this build of the native core was optimised with the committed profile
(``pgo/build.sh``; release wheels are)."""

def _disassemble(
    code: _BytesLike, bits: int = 64, ip: int = 0, count: int = 1
) -> list[tuple[int, bytes, str]]:
    """Decodes up to `count` instructions of `code` as `bits`-bit code (16, 32 or 64) at
    `ip`: a list of `(address, bytes, text)` in Intel syntax; an invalid instruction is
    `"(bad)"` and ends the list.
    """

def _find_blocks(
    code: _BytesLike, base: int, entries: list[int], check: list[int] = ...
) -> tuple[list[int], list[int], list[int]]:
    """The basic blocks of the 64-bit code `code` at virtual address `base`, found by
    recursive-descent disassembly from `entries` (addresses; those outside the code are
    ignored): `(block_starts, instruction_starts, bad)`, sorted lists, where `bad` are the
    `check` addresses (none by default) that lie inside a decoded instruction without
    being its start.
    """

def _shutdown_all() -> None: ...
def _exit_reasons() -> list[str]: ...
def _kick_signal() -> int: ...
def _debug_support() -> dict[str, str | bool]:
    """What this host's KVM intercepts for guest debugging (probed once per process in a
    small test VM): `mechanism` (`"kvm"`: KVM_EXIT_DEBUG; `"exception-stubs"`: #BP/#DB
    through kvmpy's exception stubs; `KVMPY_DEBUG_MECHANISM` picks one instead),
    `sw_breakpoints`, `single_step`, `hw_breakpoints`, `watchpoints` (whether KVM
    intercepts each), and `breakpoints`: how breakpoints (a debugger's and fuzzing
    coverage's) reach kvmpy in its user mode (`"kvm"`: `int3` intercepted; `"port-io"`: a
    one-byte `out dx, al` patch, an exit straight from CPL3; `KVMPY_BREAKPOINT_MECHANISM`
    picks one instead).
    """

@final
class CpuidEntry:
    """One entry of a CPUID table."""
    def __new__(
        cls,
        function: int,
        index: int = 0,
        flags: int = 0,
        eax: int = 0,
        ebx: int = 0,
        ecx: int = 0,
        edx: int = 0,
    ) -> CpuidEntry: ...
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
    """The host's KVM: API version, capabilities and supported CPUID.

    All VMs share one open `/dev/kvm`; creating a `Kvm` raises `KvmUnavailable` when
    it cannot be opened.
    """
    def __new__(cls) -> Kvm: ...
    @property
    def api_version(self) -> int:
        """The KVM API version (always 12)."""
    @property
    def vcpu_mmap_size(self) -> int:
        """Size in bytes of a vCPU's shared `kvm_run` area."""
    @property
    def recommended_vcpus(self) -> int:
        """Recommended number of vCPUs per VM."""
    @property
    def max_vcpus(self) -> int:
        """Maximum number of vCPUs per VM."""
    @property
    def max_memslots(self) -> int:
        """Maximum number of memory slots per VM."""
    def check_extension(self, cap: str | int) -> int:
        """`KVM_CHECK_EXTENSION`: 0 when unsupported, otherwise a positive, capability-specific
        value.
        """
    def capabilities(self) -> dict[str, int]:
        """Every named capability and its `KVM_CHECK_EXTENSION` value."""
    def supported_cpuid(self) -> list[CpuidEntry]:
        """`KVM_GET_SUPPORTED_CPUID`: the CPUID entries this host's KVM can give a guest."""

@final
class LoadedImage:
    """What a loader put in guest memory."""
    @property
    def entry(self) -> int:
        """The entry point."""
    @property
    def bits(self) -> int:
        """32 or 64 (the ELF class; 32 for Multiboot kernels loaded with the a.out kludge)."""
    @property
    def segments(self) -> list[tuple[int, int]]:
        """`(guest address, size in memory)` of each loaded segment."""
    @property
    def symbols(self) -> dict[str, int]:
        """Symbol name -> address, from the ELF symbol table (empty for other images)."""
    @property
    def boot_info(self) -> int | None:
        """Guest physical address of the multiboot_info structure (Multiboot kernels only)."""

@final
class GdbServer:
    """A gdb remote stub for a VM, listening on TCP: made by `vm.gdb_server()`.

    gdb connects with `target remote HOST:PORT` and sees each vCPU as a thread. The first
    client gets the session; a client that connects while it lasts is refused (gdb prints
    "Remote failure reply: E.kvmpy: another gdb is attached to this VM"). When the session
    ends (gdb detaches, kills, disconnects or breaks the connection), the vCPUs are left
    stopped where they are and gdb's breakpoints are removed: `wait()` returns and the VM
    can be run from Python again. The server then stops listening.
    """

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the free port chosen for `port=0`)."""
    @property
    def host(self) -> str:
        """The address the server listens on."""
    @property
    def client(self) -> str | None:
        """`"HOST:PORT"` of the gdb client being served, or None."""
    @property
    def refused(self) -> int:
        """How many clients were refused because another one was being served."""
    @property
    def ending(self) -> str | None:
        """How the session ended (`"gdb detached"`, `"gdb sent kill"`, `"the guest exited with
        code N"`, `"the gdb connection broke: ..."`, `"the session failed: ..."`, `"the
        server was closed"`), or None while it has not.
        """
    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the session has ended, at most `timeout` seconds; returns whether it
        has. Raises the first exception a handler raised while gdb ran the guest, and
        `KeyboardInterrupt` on Ctrl-C (after closing the server).
        """
    def close(self) -> None:
        """Ends the session (the vCPUs are stopped and left as they are) or stops waiting for
        a client. Idempotent.
        """
    def __enter__(self) -> GdbServer: ...
    def __exit__(self, *args: object) -> None: ...
    @property
    def vm(self) -> Vm:
        """The VM being debugged."""

@final
class FuzzExecutor:
    """Runs inputs on `vcpu` of `vm`, restoring `snapshot` after each. The low-level loop
    under `kvmpy.fuzz.Target`; most programs use that instead.

    An input of `n` bytes is written at `input_end - n` (so it ends where the input area
    ends); `addr_reg` and `len_reg` (`"rdi"`, `"rsi"`, `"rdx"`, `"rcx"`, `"r8"`, `"r9"`,
    or None) get its address and length. Each run lasts at most `timeout` seconds.
    `exception_stack_top` (`tables_addr + 0x7000` of `setup_long_mode(exceptions=True)`)
    lets a crash's registers show the guest's RAX and RDX, which the exception stubs save
    there.

    `coverage` (guest-virtual block addresses, or None) turns on block coverage: a
    breakpoint patched at each block in the executor's own copy of `snapshot` (which
    itself never shows one); `coverage_mode` `"once"` takes a block's patch out on its
    first hit, for good (one exit per block per campaign), `"armed"` keeps it and counts
    every hit as an AFL edge; `map_size` (a power of two) is the AFL-style map's size.
    """

    def __new__(
        cls,
        vm: Vm,
        vcpu: Vcpu,
        snapshot: Snapshot,
        *,
        input_end: int,
        max_len: int,
        addr_reg: str | None = "rdi",
        len_reg: str | None = "rsi",
        timeout: float = 1.0,
        exception_stack_top: int | None = None,
        coverage: list[int] | None = None,
        coverage_mode: str = "once",
        map_size: int = 65536,
    ) -> FuzzExecutor: ...
    def run(self, data: _BytesLike) -> tuple[ExitInfo, Regs | None, list[int]]:
        """Runs one input (bytes-like, at most `max_len` bytes) and restores the snapshot.
        Returns `(exit, regs, new_blocks)`: the exit that ended the run (`GuestExit` for
        the exit port, `ExceptionExit`, `MmioExit` for an access with no RAM behind it,
        reason `"timeout"`, ...), except after a clean exit the registers when it ended
        (for an exception, the faulting context's), and the blocks this run covered for
        the first time (empty without coverage). Ctrl-C stops the run and raises
        `KeyboardInterrupt`.
        """
    @property
    def coverage_map(self) -> bytes | None:
        """The AFL-style coverage map (`map_size` bytes; None without coverage): in "once"
        mode, 1 at `hash(block) & (map_size - 1)` for each block covered so far; in
        "armed" mode, the last run's edge hit counts.
        """
    @property
    def blocks_covered(self) -> int:
        """How many blocks have been covered (hit at least once) since coverage began."""
    @property
    def coverage_blocks(self) -> int:
        """How many blocks are patched for coverage (0 without coverage)."""
    @property
    def afl_map_size(self) -> int | None:
        """The size of the coverage map afl-fuzz should scan for this executor (None without
        coverage): in "once" mode one byte per coverage block, rounded up to 64; in
        "armed" mode `map_size`.
        """
    def afl_serve(
        self,
        ctl_fd: int,
        status_fd: int,
        state: bytearray | memoryview | mmap.mmap,
        *,
        trace_shm: int,
        input_shm: int | None = None,
        input_file: str | os.PathLike[str] | None = None,
        round_pending: bool = False,
    ) -> None:
        """Runs afl-fuzz's rounds in this process until afl-fuzz closes `ctl_fd` (the
        persistent loop of a child of `kvmpy.fuzz`'s fork server; the GIL is released):
        per round, read a control word from `ctl_fd`, write this process's pid to
        `status_fd`, read the input (from the System V segment `input_shm`, else the file
        `input_file`, else stdin), run it, write the coverage into the segment
        `trace_shm` (`afl_map_size` bytes), write the status (0, or 11 for a crash). On a
        timeout it waits to be killed. `state` (writable, 24 bytes at least, aligned to
        8, shared with the fork server): its first u32 is set to 1 from just before the
        pid is written until just after the status is, and 0 between rounds; the u64 at
        offset 8 counts the inputs run and the u64 at offset 16 the nanoseconds spent
        running them. With `round_pending`, the first round's
        control word was read by the fork server.
        """
    @property
    def coverage_mechanism(self) -> str | None:
        """How coverage breakpoints reach kvmpy on this host and target (None without
        coverage): `"kvm"` (`int3`, intercepted by KVM), `"port-io"` (`out dx, al`: an
        exit straight from user mode with IOPL=3 or ring 0) or `"exception-stubs"`
        (`int3` through kvmpy's exception stubs).
        """
    @property
    def max_len(self) -> int:
        """The longest input `run()` accepts."""
    def fuzz(
        self,
        seeds: Sequence[_BytesLike] = (),
        *,
        seed: int = 0,
        executions: int | None = None,
        duration: float | None = None,
        sync_dir: str | os.PathLike[str] | None = None,
        worker: str = "w0",
        on_crash: Callable[[bytes], object] | None = None,
        on_timeout: Callable[[bytes], object] | None = None,
        on_status: Callable[[dict[str, float]], bool | None] | None = None,
        status_every: float = 0.5,
    ) -> dict[str, float]:
        """Fuzzes with LibAFL's mutations and this executor's coverage map as feedback (the
        loop runs with the GIL released), starting from `seeds` (bytes-like; none: one
        empty input), until `executions` inputs ran, `duration` seconds passed, or
        `on_status` returned False. `seed` makes the campaign reproducible.

        `on_crash(input)` is called for an input in a new crash bucket (its exception
        vector and rip, or its other kind of end) or a shorter one for a known bucket;
        `on_timeout(input)` for a timeout shorter than those before. `on_status(stats)`
        is called about every `status_every` seconds. With `sync_dir`, the inputs that
        grew the corpus are written there as `<worker>-<n>` and other workers' files in
        it are read, so that several processes share one corpus. Returns the final stats:
        a dict with `executions`, `corpus`, `blocks_covered`, `crash_buckets`, `crashes`,
        `timeouts`, `last_new_coverage`, `imported` and `seconds`. Ctrl-C stops it with
        `KeyboardInterrupt`.
        """

@final
class Snapshot:
    """A whole VM at an exit boundary: every vCPU's state as KVM holds it (general, special,
    FPU/SSE/AVX and debug registers, XCRs, the MSRs KVM lists, vCPU events, MP state, and
    with an irqchip the LAPIC, PIC, IOAPIC and PIT), guest memory and the state of
    kvmpy's devices (console and UART buffers, UART registers, queued interrupts).

    Made by `Vm.snapshot()`; put back with `Vm.restore(snapshot)`, into the same VM or
    another with the same memory layout, vCPUs and devices. Immutable.
    """
    @property
    def vcpu_ids(self) -> list[int]:
        """The ids of the snapshot's vCPUs, in the VM's order."""
    @property
    def memory_regions(self) -> list[tuple[int, int]]:
        """`(guest_addr, size)` of each memory region, by address."""
    def read(self, gpa: int, n: int) -> bytes:
        """Reads `n` bytes of the snapshot's guest physical memory at `gpa`."""
    def regs(self, index: int) -> Regs:
        """The general registers of the vCPU at `index` (in `vcpu_ids` order)."""
    def sregs(self, index: int) -> Sregs:
        """The special registers of the vCPU at `index` (in `vcpu_ids` order)."""
    def msrs(self, index: int) -> dict[int, int]:
        """The MSRs saved for the vCPU at `index`: `{index: value}`."""
    @property
    def clock(self) -> int | None:
        """The VM's kvmclock when the snapshot was taken, in nanoseconds (`None` for a file written
        before kvmpy saved it, or a host without KVM_CAP_ADJUST_CLOCK). A restore into the VM
        whose memory is based on this snapshot (a reset) leaves the guest's clocks running; any
        other restore sets kvmclock and each vCPU's TSC back to the snapshot's values.
        """
    def tsc_khz(self, index: int) -> int | None:
        """The TSC frequency in kHz of the vCPU at `index` (in `vcpu_ids` order), or `None` for a
        file written before kvmpy saved it, or a host that cannot tell. Restoring into a vCPU
        whose TSC runs at another frequency sets it where the host can (KVM_CAP_TSC_CONTROL) and
        raises `KvmUnsupported` where it cannot.
        """
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the snapshot to a file: a versioned format (kvmpy and CPU vendor in the
        header) holding every vCPU's state, device state and the memory pages that are
        not all zero, with a checksum.
        """
    @staticmethod
    def load(path: str | os.PathLike[str]) -> Snapshot:
        """Reads a snapshot file written by `save`. A file that is truncated, corrupt, of a
        newer format version, written for another KVM structure layout or taken on
        another CPU vendor raises `ValueError` naming the problem (`OSError` when it cannot
        be read). Whether it fits a VM is checked by `Vm.restore`.
        """

@final
class MemoryRegion:
    """A region of guest physical memory backed by host memory.

    Offsets given to `read`/`write` are relative to the region's start. The region also
    supports the buffer protocol: `memoryview(region)` is a live, writable view of guest
    memory that stays valid for as long as it exists, even after the region is removed
    or the VM closed. Writes through a view cannot be tracked page by page: a snapshot
    restore copies a region back whole when a view of it existed since the last snapshot
    or restore.
    """
    @property
    def guest_addr(self) -> int:
        """Guest physical address of the region's first byte."""
    @property
    def size(self) -> int:
        """Size of the region in bytes."""
    @property
    def slot(self) -> int:
        """The KVM memory slot number."""
    @property
    def readonly(self) -> bool:
        """Whether guest writes to the region exit as MMIO writes instead of landing."""
    @property
    def dirty_log(self) -> bool:
        """Whether KVM logs the pages the guest writes."""
    @property
    def attached(self) -> bool:
        """Whether the region is still part of its VM (not removed, VM not closed)."""
    def read(self, offset: int, n: int) -> bytes:
        """Reads `n` bytes at region offset `offset`, as `Vm.read` does: the original bytes
        where breakpoints or coverage patches are (a `memoryview` of the region shows the
        memory as it is, patches included).
        """
    def write(self, offset: int, data: _BytesLike) -> None:
        """Writes a bytes-like object at region offset `offset`."""
    def dirty_pages(self) -> list[int]:
        """The region-relative byte offsets of the pages the guest wrote since the last call
        (`KVM_GET_DIRTY_LOG`, which also resets the log). Needs `dirty_log=True`. In a VM
        with `dirty_ring=N` the pages come from the vCPUs' rings, which needs them stopped.
        """
    def __len__(self) -> int: ...

@final
class Regs:
    """The general purpose registers, `rip` and `rflags` of a vCPU (`KVM_GET_REGS`).

    A snapshot: change fields and assign it back with `cpu.regs = regs`, or use
    `cpu.set_regs(rax=..., rip=...)`.
    """

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
    def as_dict(self) -> dict[str, int]:
        """The registers as a dict."""

@final
class Segment:
    """One segment register's visible and hidden state (`struct kvm_segment`)."""

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
    """A descriptor table register (GDTR/IDTR)."""

    base: int
    limit: int
    def __new__(cls, base: int = 0, limit: int = 0xFFFF) -> DTable: ...

@final
class Sregs:
    """The special registers of a vCPU (`KVM_GET_SREGS`): segments, descriptor tables,
    control registers, EFER and the APIC base.

    A snapshot, like `Regs`: assign it back with `cpu.sregs = sregs`, or use
    `cpu.set_sregs(cr0=..., cs=Segment(...))`.
    """

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
    """What `run()` returns and what a handler receives: why the vCPU left the guest.

    `reason` is a `kvmpy.ExitReason`, a str enum that compares equal to `"io"`, `"mmio"`,
    `"hlt"`, ... Kinds with more to say are subclasses (`IoExit`, `MmioExit`, ...).
    """
    @property
    def reason(self) -> ExitReason:
        """Why the vCPU exited."""
    @property
    def vcpu_id(self) -> int:
        """The id of the vCPU that exited."""
    @property
    def stopped(self) -> bool:
        """Whether `stop()` was called on this exit."""
    def stop(self) -> None:
        """From a handler: stop the run after this exit; `run()` then returns this exit."""

@final
class IoExit(ExitInfo):
    """A port I/O exit (`in`/`out`)."""
    @property
    def port(self) -> int:
        """The I/O port."""
    @property
    def size(self) -> int:
        """Access size in bytes: 1, 2 or 4."""
    @property
    def count(self) -> int:
        """Number of elements of string I/O (`rep outsb`); handlers see one element at a time."""
    @property
    def is_write(self) -> bool:
        """True for OUT, False for IN."""
    @property
    def data(self) -> bytes:
        """The bytes the guest wrote (OUT), or `b""` for IN."""
    @property
    def value(self) -> int:
        """The bytes the guest wrote as a little-endian integer (0 for IN)."""

@final
class MmioExit(ExitInfo):
    """An MMIO exit: an access to guest physical memory with no RAM behind it."""
    @property
    def address(self) -> int:
        """Guest physical address of the access."""
    @property
    def size(self) -> int:
        """Access size in bytes (1 to 8)."""
    @property
    def is_write(self) -> bool:
        """True for a write, False for a read."""
    @property
    def data(self) -> bytes:
        """The bytes the guest wrote, or `b""` for a read."""
    @property
    def value(self) -> int:
        """The bytes the guest wrote as a little-endian integer (0 for a read)."""

@final
class GuestExit(ExitInfo):
    """The guest wrote to an exit port (`vm.add_exit_port`): `code` is the value written."""
    @property
    def code(self) -> int:
        """The value the guest wrote."""
    @property
    def port(self) -> int:
        """The exit port."""

@final
class FailEntryExit(ExitInfo):
    """`KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest (invalid guest state)."""
    @property
    def hardware_entry_failure_reason(self) -> int:
        """The hardware's reason code (a VMX exit reason or an SVM error code)."""
    @property
    def cpu(self) -> int:
        """The host CPU the entry failed on."""

@final
class InternalErrorExit(ExitInfo):
    """`KVM_EXIT_INTERNAL_ERROR`: KVM could not handle something, for example an instruction
    its emulator does not know. `str(exit)` says what happened and what to try.
    """
    @property
    def suberror(self) -> int:
        """`KVM_INTERNAL_ERROR_*` (1 = emulation failure, 2 = simultaneous exceptions, 3 = event
        delivery failed, 4 = unexpected exit reason).
        """
    @property
    def data(self) -> list[int]:
        """Extra words KVM reported."""
    @property
    def rip(self) -> int:
        """`rip` when the exit happened (the instruction that failed, for an emulation failure)."""
    @property
    def bits(self) -> int:
        """The code size at `rip`: 16, 32 or 64 (0 if the registers could not be read)."""
    @property
    def reset_state(self) -> bool:
        """Whether the vCPU was still in the state it was created in (no mode set up)."""
    @property
    def suberror_name(self) -> str:
        """The suberror in words: `"emulation failure"`, `"simultaneous exceptions"`, ..."""
    @property
    def instruction_bytes(self) -> bytes:
        """The bytes at `rip` KVM reported for an emulation failure (up to 15; `b""` when it
        reported none, e.g. because there is no RAM at `rip`).
        """
    @property
    def instruction(self) -> str | None:
        """The failing instruction disassembled, with its bytes in hex:
        `"f0 48 0f c7 0c 25 00 00 30 00 (lock cmpxchg16b [0x300000])"`; None without bytes.
        """

@final
class SystemEventExit(ExitInfo):
    """`KVM_EXIT_SYSTEM_EVENT`: the guest asked for a shutdown, reset or crash report."""
    @property
    def event_type(self) -> int:
        """`KVM_SYSTEM_EVENT_*` (1 = shutdown, 2 = reset, 3 = crash, ...)."""
    @property
    def data(self) -> list[int]:
        """Extra words KVM reported."""

@final
class DebugExit(ExitInfo):
    """`KVM_EXIT_DEBUG`: a breakpoint or single step (with guest debugging enabled)."""
    @property
    def exception(self) -> int: ...
    @property
    def pc(self) -> int: ...
    @property
    def dr6(self) -> int: ...
    @property
    def dr7(self) -> int: ...

@final
class BreakpointExit(ExitInfo):
    """A breakpoint set with `add_breakpoint` was reached: reason `"breakpoint"`. The vCPU
    is stopped before the instruction at `address` (its RIP); running on executes it.
    """
    @property
    def address(self) -> int:
        """The guest-virtual address of the breakpoint."""

@final
class StepExit(ExitInfo):
    """One instruction was executed by `cpu.step()`: reason `"step"`."""
    @property
    def rip(self) -> int:
        """The RIP after the instruction."""

@final
class WatchpointExit(ExitInfo):
    """An access hit a watchpoint set with `add_watchpoint`: reason `"watchpoint"`. The
    access is done (a write is in memory); RIP is after the instruction, or still at a
    `rep` string instruction that has iterations left.
    """
    @property
    def address(self) -> int:
        """The guest-virtual address the watchpoint was set at."""
    @property
    def length(self) -> int:
        """The watchpoint's length in bytes."""
    @property
    def kind(self) -> str:
        """The watchpoint's kind: `"write"` or `"rw"`."""
    @property
    def access(self) -> int:
        """The guest-physical address of the access that hit it."""
    @property
    def size(self) -> int:
        """The size of that access in bytes."""
    @property
    def is_write(self) -> bool:
        """Whether the access was a write."""
    @property
    def rip(self) -> int:
        """RIP when the run ended."""
    @property
    def old(self) -> int:
        """The watched bytes before the access, little-endian."""
    @property
    def new(self) -> int:
        """The watched bytes after the access, little-endian."""

@final
class ExceptionExit(ExitInfo):
    """A CPU exception in the guest, reported by the IDT stubs that
    `setup_long_mode(exceptions=True)` installs: reason `"exception"`.
    """
    @property
    def vector(self) -> int:
        """The exception vector (0 = #DE, 6 = #UD, 13 = #GP, 14 = #PF, ...)."""
    @property
    def error_code(self) -> int:
        """The error code the CPU pushed (0 for exceptions without one)."""
    @property
    def rip(self) -> int:
        """The address of the faulting instruction."""
    @property
    def cs(self) -> int:
        """CS at the fault (its low 2 bits are the privilege level)."""
    @property
    def rflags(self) -> int: ...
    @property
    def rsp(self) -> int: ...
    @property
    def cr2(self) -> int:
        """CR2: the faulting address of a page fault."""
    @property
    def name(self) -> str:
        """The exception's mnemonic: `"#DE"`, `"#UD"`, `"#GP"`, `"#PF"`, ..."""

@final
class UnknownExit(ExitInfo):
    """An exit kvmpy does not interpret; `kvm_exit_reason` is the raw `KVM_EXIT_*` number."""
    @property
    def kvm_exit_reason(self) -> int: ...

@final
class Console:
    """A console device on one I/O port, handled natively (no Python call per byte).

    Every byte the guest writes with OUT to the port is collected; IN from the port reads 0.
    At most `limit` bytes are kept: past that the oldest output is dropped.
    """
    @property
    def port(self) -> int:
        """The console's I/O port."""
    def output(self) -> bytes:
        """What the guest has written so far."""
    def take(self) -> bytes:
        """Returns what the guest has written and empties the buffer."""
    def clear(self) -> None:
        """Empties the buffer."""

@final
class ExitPort:
    """A port whose OUT ends the run: `run()` returns a `GuestExit` with `code` set to the value
    written (1, 2 or 4 bytes, little endian). IN from the port reads 0.
    """
    @property
    def port(self) -> int:
        """The exit port."""
    @property
    def debug_exit(self) -> bool:
        """Whether codes follow the isa-debug-exit convention ((value << 1) | 1)."""

@final
class Uart:
    """A 16550-style UART on 8 ports from `port`, handled natively: what the guest transmits
    is collected (`output()`), what you `feed()` it the guest can receive. LSR always says
    the transmitter is ready, so guests that poll it before writing work.
    """
    @property
    def port(self) -> int:
        """The UART's base port."""
    def output(self) -> bytes:
        """What the guest has transmitted so far."""
    def take(self) -> bytes:
        """Returns what the guest has transmitted and empties the buffer."""
    def feed(self, data: _BytesLike) -> None:
        """Queues bytes for the guest to receive."""

@final
class Vcpu:
    """A virtual CPU of a `Vm`, created with `vm.create_vcpu()`."""
    @property
    def id(self) -> int:
        """The vCPU id (its APIC id)."""
    @property
    def regs(self) -> Regs:
        """A snapshot of the general purpose registers, `rip` and `rflags`."""
    @regs.setter
    def regs(self, regs: Regs) -> None: ...
    def set_regs(self, **fields: int) -> None:
        """Sets the named registers, leaving the others as they are:
        `cpu.set_regs(rip=0x1000, rsp=0x8000, rflags=2)`.
        """
    @property
    def sregs(self) -> Sregs:
        """A snapshot of the special registers: segments, GDT/IDT, control registers, EFER."""
    @sregs.setter
    def sregs(self, sregs: Sregs) -> None: ...
    def set_sregs(self, **fields: int | Segment | DTable) -> None:
        """Sets the named special registers, leaving the others as they are:
        `cpu.set_sregs(cr0=0x11, cs=kvmpy.Segment(selector=0, base=0))`.
        """
    def setup_real_mode(self, *, cs: int = 0, ip: int = 0) -> None:
        """Puts the vCPU in 16-bit real mode with `CS = cs` (base `cs * 16`) and `IP = ip`;
        the data and stack segments are set to 0.
        """
    def setup_long_mode(
        self,
        *,
        user: bool = True,
        tables_addr: int = 0x1000,
        map_gib: int = 1,
        huge_pages: bool = False,
        exceptions: bool = False,
        exception_port: int = 0xF6,
        user_map: list[tuple[int, int, str]] | None = None,
    ) -> None:
        """Puts the vCPU in 64-bit long mode with paging, at CPL3 (`user=True`, with IOPL=3
        so `in`/`out` exit to the host) or CPL0.

        Writes its structures into guest memory (RAM) from `tables_addr` (page aligned):
        GDT at `+0x0000`, TSS (with an I/O bitmap allowing every port) at `+0x1000`, IDT at
        `+0x4000`, exception stubs at `+0x5000`, their stack at `+0x6000`, PML4 at
        `+0x7000`, PDPT at `+0x8000` and, with 2 MiB pages, one page directory per GiB from
        `+0x9000`: `0x9000 + map_gib * 0x1000` bytes in all (`0x9000` with
        `huge_pages=True`, which maps 1 GiB pages). The first `map_gib` GiB are identity
        mapped, writable and user-accessible. PDPT entry 511 (guest virtual `0x7fc0000000`),
        when free, maps kvmpy's FPU restore stub read-only (see the README's snapshots).

        With `exceptions=True` the IDT's stubs report CPU exceptions: `run()` then returns an
        `ExceptionExit` (reason `"exception"`) with the vector, error code, RIP and CR2,
        instead of the guest triple-faulting (reason `"shutdown"`). They report through
        `exception_port`, which this registers with the VM. vCPUs may share `tables_addr`:
        each one after the first to set them up with exceptions gets its own TSS and
        exception stack, `0x4000` bytes each right after the page tables (which must be
        RAM inside the identity map), so that vCPUs faulting at once get their own reports.

        With `user_map`, a list of `(address, size, permissions)` (permissions: a string
        of `"r"`, `"w"`, `"x"`), the page tables instead map only those ranges (identity,
        4 KiB pages, each with its permissions), kvmpy's structures supervisor-only and
        nothing in the first 64 KiB: a NULL access, a write to code or to kvmpy's tables,
        or any access outside the ranges faults (a `#PF` with `exceptions=True`). The page
        tables then take as many pages from `+0x9000` as the ranges need.

        Sets the segments, CR0/CR3/CR4/EFER, GDTR/IDTR, TR and RFLAGS; the caller sets
        `rip` (and `rsp` if the guest uses a stack).
        """
    def setup_protected_mode(self, *, tables_addr: int = 0x1000) -> None:
        """Puts the vCPU in flat 32-bit protected mode with paging off, at CPL0: CS selector
        0x38 (32-bit code), data selectors 0x10, base 0, limit 4 GiB. Writes the GDT at
        `tables_addr` (page aligned, in RAM; 0x40 bytes). The caller sets `rip` (and
        `rsp`). Interrupts are off (IF=0).
        """
    def get_cpuid(self) -> list[CpuidEntry]:
        """The vCPU's CPUID table (`KVM_GET_CPUID2`). New vCPUs get the host's supported
        CPUID with the hypervisor bit and their APIC id set.
        """
    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """Replaces the vCPU's CPUID table (`KVM_SET_CPUID2`). Do it before the first run: KVM
        refuses changes once the vCPU has run.
        """
    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Reads model-specific registers: `{index: value}` for each index. Raises
        `KvmError` naming the first MSR KVM refused.
        """
    def set_msrs(self, values: dict[int, int]) -> None:
        """Writes model-specific registers from `{index: value}`. Raises `KvmError` naming the
        first MSR KVM refused (the ones before it were written).
        """
    def translate(self, vaddr: int) -> int:
        """Translates guest virtual address `vaddr` to a guest physical address by walking the
        vCPU's page tables (per its current CR0/CR3/CR4/EFER), as the CPU would. Raises
        `GuestMemoryError` when the address is not mapped.
        """
    def kvm_translate(self, vaddr: int) -> int | None:
        """`KVM_TRANSLATE`: KVM's own translation of `vaddr`, or None if KVM says it is not
        mapped. (Not every KVM implements it for every mode; `translate` does not need it.)
        """
    def read_virtual(self, vaddr: int, n: int) -> bytes:
        """Reads `n` bytes of guest virtual memory at `vaddr` through the vCPU's page tables
        (the range may cross pages).
        """
    def write_virtual(self, vaddr: int, data: _BytesLike) -> None:
        """Writes a bytes-like object to guest virtual memory at `vaddr` through the vCPU's
        page tables (ignoring their write-protection, as a debugger does).
        """
    def add_breakpoint(self, address: int, *, hardware: bool = False) -> int:
        """Sets a software breakpoint at guest-virtual `address` (translated by this vCPU's
        page tables) for this vCPU: when it gets there, `run()` returns a `BreakpointExit`
        (reason `"breakpoint"`) with RIP at `address`, before the instruction runs; the
        next run or step from there executes it (a run that starts at a breakpoint's
        address any other way, RIP set by hand, hits it at once). Any number of
        breakpoints; the guest's memory and every snapshot show the original bytes.
        Returns `address`.

        Where the host's KVM does not intercept `int3` (`python -m kvmpy info`), the vCPU
        needs `setup_long_mode(exceptions=True)`; otherwise this raises `KvmUnsupported`.

        `hardware=True` sets a debug-register breakpoint instead (DR0-DR3, no byte
        patched; the same `breakpoint` exit). Only hosts whose KVM delivers debug-register
        traps have them (bare-metal KVM: `python -m kvmpy info` says); elsewhere, as on
        nested software KVMs, it raises `KvmUnsupported` naming the probe's result (no
        patch is set instead). They share the four slots with debug-register
        watchpoints: a fifth user raises `ValueError`.
        """
    def remove_breakpoint(self, address: int) -> None:
        """Removes this vCPU's breakpoint at `address` (the original byte goes back);
        `ValueError` if there is none.
        """
    @property
    def breakpoints(self) -> list[int]:
        """The addresses of this vCPU's breakpoints, patched and hardware (not the VM-wide
        ones)."""
    def step(self, count: int = 1, *, timeout: float | None = None) -> int:
        """Executes `count` instructions, one at a time, and returns the new RIP. A
        breakpoint is not reported while stepping onto it; stepping on from it executes
        its instruction. Needs what breakpoints need (`KvmUnsupported` otherwise). If
        something else ends a step first (an exit port, an unhandled exit, a fault),
        stepping stops there: `cpu.last_exit` says what (its reason is `"step"` when every
        step completed).
        """
    def add_watchpoint(
        self, address: int, length: int, kind: Literal["write", "rw"] = "write"
    ) -> None:
        """Sets a watchpoint of `length` bytes (1, 2, 4 or 8, aligned to its length) at
        guest-virtual `address` for this vCPU: an access of `kind` (`"write"`, or `"rw"` for
        reads and writes) that touches those bytes ends `run()` with a `WatchpointExit`
        (reason `"watchpoint"`) once the instruction is done. At most 4 watchpoints per VM.

        The address is translated to guest-physical once, now, by this vCPU's page tables:
        a later change of the mapping is not followed. The page that holds it gets a KVM
        memory slot of its own (read-only for `"write"`, none for `"rw"`), so every write
        (every access, for `"rw"`) to that page exits to kvmpy, which does the access and
        lets the run go on unless the watched bytes were touched. Code cannot run from a
        page an `"rw"` watchpoint watches (such a run raises `KvmUnsupported`).
        `ValueError` for a bad length, alignment or kind, a fifth watchpoint or a read-only
        region; `GuestMemoryError` for an unmapped address; `KvmUnsupported` where the
        host has no read-only memory slots.
        """
    def remove_watchpoint(self, address: int, length: int) -> None:
        """Removes this vCPU's watchpoint at `address` of `length` bytes; `ValueError` if
        there is none.
        """
    def watchpoints(self) -> list[tuple[int, int, str]]:
        """This vCPU's watchpoints: `(address, length, kind)` tuples."""
    def trace(
        self, count: int | None = None, until: int | None = None
    ) -> Iterator[tuple[int, bytes, str]]:
        """An iterator of the instructions the vCPU executes, one single step each: a
        `(rip, bytes, text)` tuple per instruction (text in Intel syntax, from the iced-x86
        decoder), yielded before the instruction runs. It ends after `count` instructions,
        when RIP reaches `until`, or when a step ends any other way (`cpu.last_exit`).
        """
    def run(self, timeout: float | None = None) -> ExitInfo:
        """Runs the vCPU until an exit no handler takes, a handler stops it, the guest writes
        to an exit port, or `timeout` seconds pass; returns that exit.

        The GIL is released while the guest runs. The first exception a handler raises
        stops the vCPU and is re-raised here. Ctrl-C stops the guest and raises
        `KeyboardInterrupt` (when `run()` is called from the main thread); one that arrives
        while a handler of this run executes raises it in the handler, which ends the run.

        A vCPU that no mode was set up for runs from its reset state (at 0xfffffff0); when
        such a run ends with an MMIO, shutdown, failed-entry or internal-error exit, `run()`
        warns once per vCPU (`RuntimeWarning`).
        """
    def respond(self, value: int | bytes) -> None:
        """Answers the IN or MMIO read that the last `run()` returned because no handler took
        it: `value` (an int, or bytes of the access size) is what the guest reads when it
        runs again. Without an answer the guest reads zeros.
        """
    def interrupt(self, vector: int) -> None:
        """Queues interrupt `vector` (0-255) for the guest (`KVM_INTERRUPT`, for VMs without
        an in-kernel irqchip; with one, use `vm.set_irq_line`). It is injected as soon as
        the guest accepts interrupts (IF=1): at once if the vCPU is running, otherwise at
        the next `run()`. A vCPU halted in `hlt` wakes up to take it.
        """
    @property
    def last_exit(self) -> ExitInfo | None:
        """The exit that ended this vCPU's last run (by `run()` or `vm.start()`), or None
        before the first run or when the run ended with an exception.
        """
    def stop(self) -> None:
        """Asks the vCPU to stop: its `run()` returns an exit with reason `"stopped"`.
        Callable from any thread and from handlers. A stop requested while the vCPU is not
        running is kept for its next run, which then returns `"stopped"` at once without
        entering the guest: a stop is never lost to a run that is just starting.
        """
    def stats(self) -> VcpuStats:
        """Counters since the vCPU was created: `exits` (returns from `KVM_RUN`),
        `handler_calls` (Python handler calls, the only times the run loop takes the GIL),
        `full_restores` (snapshot restores that rewrote all of the vCPU's state; the
        others put back only the general registers and the FPU/SSE/AVX state, because
        nothing else can have changed) and `stub_loads` (runs that started in kvmpy's FPU
        restore stub, which loaded a fast restore's FPU/SSE/AVX state in the guest instead
        of an ioctl; see the snapshots documentation).
        """
    @property
    def vm(self) -> Vm:
        """The VM this vCPU belongs to."""

@disjoint_base
class Vm:
    """A KVM virtual machine.

    Holds guest memory regions, vCPUs and exit handlers. Use it as a context manager or
    call `close()`: closing stops running vCPUs, closes every KVM fd the VM owns and detaches
    its memory regions.
    """
    def __new__(
        cls, *, irqchip: bool = False, pit: bool = False, dirty_ring: int | None = None
    ) -> Vm: ...
    @property
    def dirty_ring(self) -> int | None:
        """The entries of each vCPU's dirty ring (`dirty_ring=N`), or `None`."""
    @property
    def irqchip(self) -> bool:
        """Whether the VM has an in-kernel irqchip."""
    def set_irq_line(self, irq: int, level: bool) -> None:
        """Sets the level of interrupt line `irq` of the in-kernel irqchip (`KVM_IRQ_LINE`):
        `set_irq_line(4, True)` then `set_irq_line(4, False)` makes an edge. Lines 0-15 go
        to the PIC and the IOAPIC, 16-23 to the IOAPIC.
        """
    def run(
        self, timeout: float | None = None, *, until: Literal["all", "any"] = "all"
    ) -> list[ExitInfo]:
        """Runs every vCPU on its own native thread until all have stopped, and returns
        their final exits (in `vcpus` order). `timeout` applies to each vCPU. With
        `until="any"` the first vCPU to stop stops the others; with `until="all"` (the
        default) each stops on its own. The first exception a handler raises on any vCPU
        stops them all and is raised here; so is `KeyboardInterrupt` (Ctrl-C).
        """
    def start(self, timeout: float | None = None, *, until: Literal["all", "any"] = "all") -> None:
        """Starts every vCPU on its own native thread and returns at once; see `run()`."""
    def join(self, timeout: float | None = None) -> list[ExitInfo] | None:
        """Waits for the vCPUs started by `start()` to stop, at most `timeout` seconds. Returns
        their final exits, or None if they are still running at the timeout. Raises the first
        handler exception, or `KeyboardInterrupt` on Ctrl-C (after stopping every vCPU).
        """
    def stop(self) -> None:
        """Asks every vCPU to stop; callable from any thread and from handlers. Their runs
        end with reason `"stopped"`; a vCPU that is not running stops its next run at once.
        """
    @property
    def started(self) -> bool:
        """Whether vCPUs started by `start()` have not been joined yet."""
    def add_memory(
        self,
        guest_addr: int,
        size: int,
        *,
        readonly: bool = False,
        dirty_log: bool = False,
        overcommit: bool = False,
    ) -> MemoryRegion:
        """Adds `size` bytes of RAM at guest physical address `guest_addr` (both page
        aligned). With `readonly=True` guest writes exit as MMIO writes; with
        `dirty_log=True` KVM logs written pages (see `MemoryRegion.dirty_pages`). A region
        larger than the host's memory is refused unless `overcommit=True`: KVM allocates
        metadata for every page of a region when it is added.
        """
    def remove_memory(self, region: MemoryRegion) -> None:
        """Removes a region from the guest's address space. Views of it stay valid; its
        `read`/`write` raise afterwards.
        """
    @property
    def memory_regions(self) -> list[MemoryRegion]:
        """The VM's memory regions, by guest address."""
    def read(self, gpa: int, n: int) -> bytes:
        """Reads `n` bytes of guest physical memory at `gpa`; the range may span regions but
        must lie entirely in guest RAM.
        """
    def write(self, gpa: int, data: _BytesLike) -> None:
        """Writes a bytes-like object to guest physical memory at `gpa`."""
    def create_vcpu(self, id: int | None = None) -> Vcpu:
        """Creates a vCPU. `id` defaults to the lowest id not in use. The vCPU gets the host's
        supported CPUID (with the hypervisor bit and its APIC id set).
        """
    def load_flat(self, image: _Image, address: int) -> None:
        """Writes a flat binary image (bytes-like, or a path to read) at guest physical
        `address`; it must lie entirely in RAM.
        """
    def load_elf(self, image: _Image) -> LoadedImage:
        """Loads an ELF executable (32- or 64-bit x86; bytes-like, or a path to read): each
        PT_LOAD segment at its physical address, zero-filled past its file size. Every
        segment and the entry point must lie in RAM. Returns a `LoadedImage` with the entry
        point and the symbol table. Set the vCPU's mode and `rip` yourself.
        """
    def load_multiboot(
        self,
        cpu: Vcpu,
        kernel: _Image,
        *,
        cmdline: str = "",
        modules: list[_Image | tuple[_Image, str]] | None = None,
        tables_addr: int = 0x1000,
    ) -> LoadedImage:
        """Boots a Multiboot v1 kernel as QEMU's `-kernel` does: loads it (ELF, or the a.out
        kludge), its `modules` (each bytes-like, a path, or a `(data, cmdline)` tuple) and
        the multiboot information (memory map, `cmdline`, modules) after the kernel, and
        puts `cpu` in 32-bit protected mode at the entry point with EAX = 0x2BADB002 and
        EBX = the information's address. The GDT goes at `tables_addr`.
        """
    @property
    def vcpus(self) -> list[Vcpu]:
        """The VM's vCPUs, by creation order."""
    @overload
    def on_io(self, ports: int | range, handler: _IoHandler) -> _IoHandler:
        """Registers `handler` for port I/O on `ports` (an int or a `range`). Without
        `handler`, returns a decorator. The handler gets an `IoExit`; for an IN it returns
        the value the guest reads (an int, or bytes of the access size), for an OUT it
        returns None. Returns the handler.
        """
    @overload
    def on_io(self, ports: int | range, handler: None = None) -> Callable[[_IoHandler], _IoHandler]:
        """Registers `handler` for port I/O on `ports` (an int or a `range`). Without
        `handler`, returns a decorator. The handler gets an `IoExit`; for an IN it returns
        the value the guest reads (an int, or bytes of the access size), for an OUT it
        returns None. Returns the handler.
        """
    @overload
    def on_mmio(self, address: int, size: int, handler: _MmioHandler) -> _MmioHandler:
        """Registers `handler` for MMIO accesses to `[address, address + size)`, which must not
        overlap RAM. Without `handler`, returns a decorator. The handler gets an `MmioExit`;
        for a read it returns the data (an int, or bytes of the access size).
        """
    @overload
    def on_mmio(
        self, address: int, size: int, handler: None = None
    ) -> Callable[[_MmioHandler], _MmioHandler]:
        """Registers `handler` for MMIO accesses to `[address, address + size)`, which must not
        overlap RAM. Without `handler`, returns a decorator. The handler gets an `MmioExit`;
        for a read it returns the data (an int, or bytes of the access size).
        """
    @overload
    def on_hlt(self, handler: _HltHandler) -> _HltHandler:
        """Registers `handler` for HLT exits (it returns None to resume the guest after the
        `hlt`, or calls `exit.stop()`). Without `handler`, returns a decorator. Without an
        HLT handler, `run()` returns on HLT.
        """
    @overload
    def on_hlt(self, handler: None = None) -> Callable[[_HltHandler], _HltHandler]:
        """Registers `handler` for HLT exits (it returns None to resume the guest after the
        `hlt`, or calls `exit.stop()`). Without `handler`, returns a decorator. Without an
        HLT handler, `run()` returns on HLT.
        """
    @overload
    def on_breakpoint(self, handler: _BreakpointHandler) -> _BreakpointHandler:
        """Registers `handler` for breakpoints (those of `add_breakpoint`): it gets the
        `BreakpointExit`, with the vCPU's registers as they are at the breakpoint, and
        returns None to let the guest run on (executing the instruction there), or calls
        `exit.stop()` to end the run with that exit. Without `handler`, returns a
        decorator. Without a breakpoint handler, `run()` returns at each breakpoint.
        """
    @overload
    def on_breakpoint(
        self, handler: None = None
    ) -> Callable[[_BreakpointHandler], _BreakpointHandler]:
        """Registers `handler` for breakpoints (those of `add_breakpoint`): it gets the
        `BreakpointExit`, with the vCPU's registers as they are at the breakpoint, and
        returns None to let the guest run on (executing the instruction there), or calls
        `exit.stop()` to end the run with that exit. Without `handler`, returns a
        decorator. Without a breakpoint handler, `run()` returns at each breakpoint.
        """
    def add_breakpoint(self, address: int, *, hardware: bool = False) -> int:
        """Sets a software breakpoint at guest-virtual `address` for every vCPU (translated by
        the first vCPU's page tables): see `Vcpu.add_breakpoint`. Returns `address`.
        `hardware=True`: a debug-register breakpoint in every vCPU, where the host has them
        (see `Vcpu.add_breakpoint`; `KvmUnsupported` elsewhere).
        """
    def remove_breakpoint(self, address: int) -> None:
        """Removes the VM-wide breakpoint at `address`; `ValueError` if there is none."""
    @property
    def breakpoints(self) -> list[int]:
        """The addresses of the VM-wide breakpoints set from Python, patched and hardware
        (not a gdb client's)."""
    def gdb_server(self, port: int = 0, host: str = "127.0.0.1") -> GdbServer:
        """Starts a gdb remote stub for this VM on `host:port` (port 0: a free port, see
        `GdbServer.port`) and returns at once; gdb connects with `target remote HOST:PORT`.
        See `GdbServer`. Raises `KvmUnsupported` where breakpoints cannot reach kvmpy (the
        vCPUs need `setup_long_mode(exceptions=True)` on hosts whose KVM does not intercept
        `int3`), `ValueError` without vCPUs, `OSError` when the port cannot be listened on,
        `VcpuBusyError` while another server of this VM has not ended.
        """
    def serve_gdb(self, port: int = 1234, host: str = "127.0.0.1") -> str:
        """Serves one gdb session on `host:port` and returns when it ends, saying how (see
        `GdbServer.ending`); the vCPUs are then stopped where gdb left them. Ctrl-C ends
        the session and raises `KeyboardInterrupt`.
        """
    def remove_handler(self, handler: object) -> int:
        """Removes every registration of `handler` (a function, a `Console` or an `ExitPort`).
        Returns how many were removed; raises `ValueError` if there were none.
        """
    def add_console(self, port: int = 0x3F8, *, limit: int = 1 << 20) -> Console:
        """Adds a console on `port`, handled natively: OUT bytes are collected (read them with
        `console.output()`), with no Python call per byte. Keeps the last `limit` bytes.
        """
    def add_exit_port(self, port: int) -> ExitPort:
        """Adds an exit port: a guest OUT to `port` ends `run()` with a `GuestExit` whose
        `reason` is `"exit"` and `code` the value written.
        """
    def add_debug_exit(self, port: int = 0xF4) -> ExitPort:
        """Adds QEMU's isa-debug-exit device on `port`: a guest write of v ends `run()` with a
        `GuestExit` whose `code` is `(v << 1) | 1`, as with `qemu -device isa-debug-exit`.
        """
    def add_uart(self, port: int = 0x3F8, *, limit: int = 1 << 20) -> Uart:
        """Adds a 16550-style UART on ports `port..port+8`, handled natively (no Python call
        per byte): read what the guest sent with `uart.output()`, give it input with
        `uart.feed(data)`. Keeps the last `limit` bytes of output.
        """
    @overload
    def host_function(
        self, number: int, handler: _HostFunction, *, port: int = 0xF5
    ) -> _HostFunction:
        """Registers `handler` as host function `number` (0 to 2**32-1), which guests call
        with `out <port>, eax` (EAX = number; arguments in RDI, RSI, RDX, R10, R8, R9; the
        result comes back in RAX). The handler gets as many arguments as it declares
        positional parameters and returns an int (or None for 0). Without `handler`, returns
        a decorator. All host functions of a VM share one port.
        """
    @overload
    def host_function(
        self, number: int, handler: None = None, *, port: int = 0xF5
    ) -> Callable[[_HostFunction], _HostFunction]:
        """Registers `handler` as host function `number` (0 to 2**32-1), which guests call
        with `out <port>, eax` (EAX = number; arguments in RDI, RSI, RDX, R10, R8, R9; the
        result comes back in RAX). The handler gets as many arguments as it declares
        positional parameters and returns an int (or None for 0). Without `handler`, returns
        a decorator. All host functions of a VM share one port.
        """
    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
    def close(self) -> None:
        """Stops running vCPUs, closes the VM's and vCPUs' fds and detaches memory regions.
        Idempotent. Raises `VcpuBusyError` when called from a handler of this VM's own
        vCPU (stop the run with `exit.stop()` and close after `run()` returns).
        """
    def snapshot(self) -> Snapshot:
        """Captures the whole VM (see `Snapshot`) at this exit boundary. No vCPU may be
        running (`VcpuBusyError`); an access a handler answered is completed first; a read
        returned by `run()` must be answered with `respond()` first. From now on KVM logs
        the pages the guest writes, so `restore` copies back only what changed.
        """
    def restore(self, snapshot: Snapshot) -> None:
        """Puts the VM back as `snapshot` saw it: memory (only the pages written since the
        snapshot or the last restore; a whole region if a writable view of it was
        exported since), every vCPU's state, the irqchip and PIT, kvmpy's devices. The
        snapshot may come from another VM with the same memory regions, vCPU ids and
        devices; a mismatch raises `ValueError` before anything changes.
        """
    @staticmethod
    def from_snapshot(snapshot: Snapshot, *, dirty_ring: int | None = None) -> Vm:
        """A new VM from a snapshot: the same memory regions, as copy-on-write views of the
        snapshot's memory (several VMs from one snapshot share its pages and pay only for
        the pages they write), vCPUs with the same ids, CPUID and state, and the same irqchip and
        PIT. kvmpy's devices and handlers are not created: add them, then
        `vm.restore(snapshot)` also puts the devices' state back. `dirty_ring=N` as for
        `Vm(...)`.
        """
    def __enter__(self) -> Vm: ...
    def __exit__(self, *args: object) -> None: ...
