"""Fuzz targets: an address space where mistakes fault, one input per run, outcomes."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmpy._native import (
    ExceptionExit,
    FuzzExecutor,
    GuestExit,
    MmioExit,
    Regs,
    Snapshot,
    Vcpu,
    Vm,
    _disassemble,
    _find_blocks,
)
from kvmpy.explain import EXCEPTION_NAMES, symbolize

PAGE = 0x1000
TABLES = 0x1000
"""Where ``Target.from_elf`` puts kvmpy's tables (supervisor-only, inside the NULL area)."""
EXIT_PORT = 0xF4
CONSOLE_PORT = 0x3F8
HOOK_BYTE = b"\xf4"
"""A crash hook is a ``hlt`` patched over the hooked address: privileged, so reaching it
from user mode raises #GP right there, on any KVM, with no breakpoint support needed."""
_RETURN_STUB = b"\xe7\xf4\xeb\xfe"  # out 0xf4, eax ; jmp $
_PF_W, _PF_X = 2, 1

OUTCOME_KINDS = ("ok", "crash", "timeout", "unmapped", "shutdown", "internal_error", "other")
COVERAGE_MODES = ("once", "armed")


@dataclass(frozen=True)
class Outcome:
    """How one input ended. ``kind`` is one of:

    - ``"ok"``: the target returned; ``code`` is its 32-bit return value;
    - ``"crash"``: a CPU exception or a crash hook: ``vector``, ``name``, ``rip``,
      ``cr2``, ``error_code``, ``regs`` (the faulting context's), ``instruction``,
      ``location``, ``hook``;
    - ``"timeout"``: ``regs`` says where the run was stopped, which is chance, so it is
      left out of comparisons and reports;
    - ``"unmapped"``: an access to guest-physical memory with no RAM behind it:
      ``address``, ``is_write``; ``rip`` is the accessing instruction, or on KVMs that
      complete the access before reporting it, the next one;
    - ``"shutdown"``, ``"internal_error"``, or ``"other"`` (an exit nobody handles, such
      as port I/O to a port with no device; ``reason`` says which).

    With coverage, ``new_coverage`` holds the blocks this input covered first (sorted
    addresses; a tuple, empty when it found nothing new). It is left out of comparisons:
    the same input run again finds nothing new.
    """

    kind: str
    reason: str
    code: int | None = None
    vector: int | None = None
    name: str | None = None
    error_code: int | None = None
    rip: int | None = None
    cr2: int | None = None
    address: int | None = None
    is_write: bool | None = None
    hook: str | None = None
    instruction: str | None = None
    location: str = ""
    regs: Regs | None = field(default=None, compare=False)
    new_coverage: tuple[int, ...] = field(default=(), compare=False)

    @property
    def is_crash(self) -> bool:
        """True for every outcome but ``"ok"``: what a fuzzer keeps."""
        return self.kind != "ok"

    @property
    def bucket(self) -> tuple[str, int | None, int | None]:
        """``(kind, vector, rip)``: inputs with the same bucket are the same bug (all
        timeouts share one bucket: where a hang is interrupted is chance)."""
        return (self.kind, self.vector, self.rip)

    def summary(self) -> str:
        """One line: ``crash #PF page fault at rip=0x100044 (null_read+0x4): mov rax, qword
        ptr [rsi] (read of 0x8: not mapped)``."""
        if self.kind == "ok":
            return f"ok (returned {self.code})"
        where = ""
        if self.rip is not None:
            where = f" at rip={self.rip:#x}"
            if self.location:
                where += f" ({self.location})"
            if self.instruction:
                where += f": {self.instruction}"
        if self.kind == "timeout":
            return "timeout"
        if self.kind == "unmapped":
            access = "write to" if self.is_write else "read of"
            return f"unmapped {access} {self.address:#x} (no guest RAM there){where}"
        if self.kind == "crash" and self.hook is not None:
            return f"crash hook {self.hook} reached{where}"
        if self.kind == "crash":
            line = f"crash {self.name} {EXCEPTION_NAMES.get(self.vector or 0, '')}{where}"
            if self.vector == 14 and self.cr2 is not None and self.error_code is not None:
                ec = self.error_code
                access = "fetch" if ec & 16 else "write" if ec & 2 else "read"
                why = "protection" if ec & 1 else "not mapped"
                mode = "user" if ec & 4 else "kernel"
                line += f" ({mode} {access} of {self.cr2:#x}: {why})"
            elif self.error_code:
                line += f" (error code {self.error_code:#x})"
            return line
        return f"{self.kind} ({self.reason}){where}"

    def report(self) -> str:
        """A multi-line text report: the summary, then the registers."""
        lines = [self.summary()]
        if self.regs is not None and self.kind != "timeout":
            r = self.regs
            names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
            names += ["r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]
            for i in range(0, len(names), 4):
                lines.append(
                    "  " + "  ".join(f"{n:>6}={getattr(r, n):#018x}" for n in names[i : i + 4])
                )
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Segment:
    gpa: int
    size: int
    flags: int


def _elf_segments(image: bytes) -> list[_Segment]:
    """The PT_LOAD segments of a 64-bit ELF with their permission flags."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise ValueError("not a 64-bit ELF image")
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    out = []
    for i in range(phnum):
        p_type, p_flags, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + i * phentsize
        )
        if p_type == 1 and p_memsz:
            out.append(_Segment(p_paddr, p_memsz, p_flags))
    return out


def _code_blocks(
    vm: Vm,
    segments: list[_Segment],
    symbols: Mapping[str, int],
    roots: Iterable[int],
    coverage: str | Iterable[str | int],
) -> list[int]:
    """Block starts for ``from_elf(coverage=...)``: ``"disasm"`` (recursive descent from
    every symbol in the code and ``roots``), ``"symbols"`` (the symbols in the code), or
    addresses and symbol names, checked to lie in the code at instruction starts."""
    code = [s for s in segments if s.flags & _PF_X]

    def segment_of(addr: int) -> _Segment | None:
        return next((s for s in code if s.gpa <= addr < s.gpa + s.size), None)

    starts = {a for a in [*symbols.values(), *roots] if segment_of(a) is not None}
    if coverage == "symbols":
        return sorted(starts)
    wanted: list[int] = []
    if coverage != "disasm":
        if isinstance(coverage, (str, bytes)):
            raise ValueError(
                f'coverage must be "disasm", "symbols", a list of addresses or symbol names, '
                f"or None, not {coverage!r}"
            )
        for item in coverage:
            if isinstance(item, str):
                if item not in symbols:
                    raise ValueError(f"coverage block {item!r} is not a symbol of the target")
                wanted.append(symbols[item])
            elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                wanted.append(item)
            else:
                raise TypeError(f"a coverage block is an address or a symbol name, not {item!r}")
        spans = ", ".join(f"{s.gpa:#x}..{s.gpa + s.size:#x}" for s in code)
        for addr in wanted:
            if segment_of(addr) is None:
                raise ValueError(
                    f"coverage block {addr:#x} is outside the target's code (its executable "
                    f"segments: {spans})"
                )
    found: set[int] = set()
    for seg in code:
        roots_here = sorted(a for a in starts if seg.gpa <= a < seg.gpa + seg.size)
        check = [a for a in wanted if seg.gpa <= a < seg.gpa + seg.size]
        blocks, _, bad = _find_blocks(vm.read(seg.gpa, seg.size), seg.gpa, roots_here, check)
        if bad:
            raise ValueError(
                f"coverage block {bad[0]:#x} is not at the start of an instruction (it lies "
                "inside one that the disassembly of the target's code decoded)"
            )
        found.update(blocks)
    return sorted(found) if coverage == "disasm" else sorted(set(wanted))


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


class Target:
    """A fuzz target: a VM, the vCPU that runs each input and the snapshot every input
    starts from. ``run(data)`` writes the input so that it ends at ``input_end``, puts its
    address and length in ``input_arg`` and ``length_arg``, runs for at most
    ``timeout_ms``, classifies how it ended (an :class:`Outcome`) and restores the
    snapshot. ``vm``, ``cpu``, ``snapshot``, ``symbols``, ``max_len`` and ``input_end``
    are attributes. The loop of one run is native code with the GIL released.

    Build one from a guest ELF with :meth:`from_elf`, or by hand from a VM whose vCPU is
    ready to run the code under test (``setup_long_mode(exceptions=True)`` so that faults
    are reported; ``user_map=`` for an address space where mistakes fault). The VM must
    end a clean run with an exit port write (``vm.add_exit_port``). ``crash_hooks``
    (symbol names or addresses) count as a crash when reached; they are patched into the
    VM's memory and a fresh snapshot is taken. ``symbols`` (name -> address) name the
    places in reports.

    ``coverage`` (block addresses, guest-virtual) turns on block coverage, with a
    breakpoint patched at each block start (see :meth:`from_elf` for finding them):
    ``coverage_mode="once"`` takes a block's breakpoint out on its first hit, in memory
    and in the clean image restores use, so each block costs one exit for the whole
    campaign; ``"armed"`` keeps them and counts every hit (AFL edge hit counts, two exits
    per hit). ``coverage_map`` is the AFL-style map (``map_size`` bytes, a power of
    two), ``blocks_covered`` how many blocks were hit, ``coverage_blocks`` how many are
    patched, ``coverage_mechanism`` how the breakpoints reach kvmpy on this host
    (``"kvm"``, ``"port-io"`` or ``"exception-stubs"``). ``snapshot`` never holds a
    breakpoint byte, and neither does what ``vm.read`` shows.
    """

    def __init__(
        self,
        vm: Vm,
        cpu: Vcpu,
        snapshot: Snapshot,
        *,
        input_end: int,
        max_len: int,
        input_arg: str | None = "rdi",
        length_arg: str | None = "rsi",
        timeout_ms: float = 100,
        symbols: Mapping[str, int] | None = None,
        crash_hooks: Iterable[str | int] = (),
        exception_stack_top: int | None = None,
        coverage: Iterable[str | int] | None = None,
        coverage_mode: str = "once",
        map_size: int = 65536,
    ) -> None:
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
            raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
        if coverage_mode not in COVERAGE_MODES:
            raise ValueError(f'coverage_mode must be "once" or "armed", not {coverage_mode!r}')
        if isinstance(map_size, bool) or not isinstance(map_size, int):
            raise TypeError(f"map_size must be an int, got {map_size!r}")
        if map_size <= 0 or map_size & (map_size - 1):
            raise ValueError(f"map_size must be a power of two, not {map_size}")
        self.vm = vm
        self.cpu = cpu
        self.symbols: dict[str, int] = dict(symbols or {})
        self.hooks: dict[int, str] = {}
        for hook in crash_hooks:
            addr = self._address(hook, "crash hook")
            self.hooks[addr] = hook if isinstance(hook, str) else f"{addr:#x}"
        if self.hooks:
            vm.restore(snapshot)
            for addr in self.hooks:
                vm.write(addr, HOOK_BYTE)
            snapshot = vm.snapshot()
        self.snapshot = snapshot
        self.max_len = max_len
        self.input_end = input_end
        self.timeout_ms = timeout_ms
        blocks = None
        if coverage is not None:
            if isinstance(coverage, (str, bytes)):
                raise TypeError(
                    "coverage must be block addresses or symbol names (an iterable), "
                    f"got {coverage!r}"
                )
            blocks = sorted({self._address(b, "coverage block") for b in coverage})
        self._executor = FuzzExecutor(
            vm,
            cpu,
            snapshot,
            input_end=input_end,
            max_len=max_len,
            addr_reg=input_arg,
            len_reg=length_arg,
            timeout=timeout_ms / 1000,
            exception_stack_top=exception_stack_top,
            coverage=blocks,
            coverage_mode=coverage_mode,
            map_size=map_size,
        )

    @property
    def coverage_map(self) -> bytes | None:
        """The AFL-style coverage map (None without coverage): in ``"once"`` mode 1 (or
        more, where blocks share a slot) at ``hash(block) & (map_size - 1)`` for every
        block covered so far; in ``"armed"`` mode the last run's edge hit counts."""
        return self._executor.coverage_map

    @property
    def blocks_covered(self) -> int:
        """How many blocks have been hit since coverage began (0 without coverage)."""
        return self._executor.blocks_covered

    @property
    def coverage_blocks(self) -> int:
        """How many blocks are patched for coverage (0 without coverage)."""
        return self._executor.coverage_blocks

    @property
    def coverage_mechanism(self) -> str | None:
        """How coverage breakpoints reach kvmpy: ``"kvm"`` (``int3`` that KVM
        intercepts), ``"port-io"`` (a one-byte ``out dx, al`` patch: an exit straight from
        user mode), ``"exception-stubs"`` (``int3`` through kvmpy's exception stubs), or
        None without coverage."""
        return self._executor.coverage_mechanism

    def _address(self, where: str | int, what: str) -> int:
        if isinstance(where, str):
            if where not in self.symbols:
                known = ", ".join(sorted(n for n in self.symbols if not n.startswith("__"))[:20])
                raise ValueError(
                    f"{what} {where!r} is not a symbol of the target (it has: {known})"
                )
            return self.symbols[where]
        if isinstance(where, bool) or not isinstance(where, int) or where < 0:
            raise TypeError(f"{what} must be a symbol name or an address, got {where!r}")
        return where

    @classmethod
    def from_elf(
        cls,
        path: str | os.PathLike[str],
        *,
        entry: str | int,
        input_arg: str | None = "rdi",
        length_arg: str | None = "rsi",
        max_len: int = 4096,
        timeout_ms: float = 100,
        crash_hooks: Iterable[str | int] = (),
        stack_size: int = 0x10000,
        extra_memory: Iterable[tuple[int, int, str]] = (),
        coverage: str | Iterable[str | int] | None = None,
        coverage_mode: str = "once",
        map_size: int = 65536,
    ) -> Target:
        """A target that calls the function ``entry`` (a symbol or an address) of the
        64-bit guest ELF at ``path`` (a kvmpy C guest, or any static executable that runs
        at CPL3) with each input, in an address space where mistakes fault:

        - the ELF's segments are mapped with their own permissions (code not writable,
          data not executable), each input in its own area that ends at a page end (one
          byte past the input faults), a ``stack_size`` stack with an unmapped page
          below it (a stack overflow faults), and nothing else;
        - the first 64 KiB are not mapped for the guest (a NULL access faults) and
          kvmpy's tables (GDT, TSS, IDT, exception stubs, page tables, inside that area)
          are supervisor-only: a write to them from the guest is a #PF;
        - ``entry`` returns to a stub that ends the run with its return value (an ``"ok"``
          outcome with ``code``); the guest's console (port 0x3F8) is collected.

        ``extra_memory`` maps more for the guest: ``(address, size, permissions)`` with
        permissions made of ``"r"``, ``"w"``, ``"x"`` (a heap arena, a buffer the target
        expects at a fixed address); RAM is added to cover it, zero-filled.

        ``coverage`` turns on block coverage (see :class:`Target`) with blocks from
        ``"disasm"`` (recursive-descent disassembly of the ELF's executable segments from
        ``entry``, the ELF entry point and every symbol in them), ``"symbols"`` (the
        symbols in the code: function-level coverage) or a list of addresses and symbol
        names (each must lie in the code, at an instruction start).
        """
        image = Path(path).read_bytes()
        segments = _elf_segments(image)
        if not segments:
            raise ValueError(f"{path}: no loadable segments")
        end = max(s.gpa + s.size for s in segments)
        stub = _round_up(end, PAGE) + PAGE
        stack_bottom = stub + 2 * PAGE
        stack_size = _round_up(max(stack_size, PAGE), PAGE)
        stack_top = stack_bottom + stack_size
        input_start = stack_top + PAGE
        input_end = input_start + _round_up(max(max_len, 1), PAGE)
        extra = [(int(a), int(n), str(p)) for a, n, p in extra_memory]
        top = max([input_end + PAGE] + [a + n for a, n, _ in extra])
        ram = _round_up(top, 2 << 20)
        vm = Vm()
        try:
            vm.add_memory(0, ram)
            loaded = vm.load_elf(image)
            target_symbols = dict(loaded.symbols)
            if isinstance(entry, str) and entry not in target_symbols:
                known = ", ".join(sorted(n for n in target_symbols if not n.startswith("__"))[:20])
                raise ValueError(f"entry symbol {entry!r} is not in {path} (it has: {known})")
            vm.write(stub, _RETURN_STUB)
            vm.add_exit_port(EXIT_PORT)
            vm.add_console(CONSOLE_PORT)
            user_map: list[tuple[int, int, str]] = []
            for s in segments:
                perms = "r" + ("w" if s.flags & _PF_W else "") + ("x" if s.flags & _PF_X else "")
                user_map.append((s.gpa, s.size, perms))
            user_map += [
                (stub, PAGE, "rx"),
                (stack_bottom, stack_size, "rw"),
                (input_start, input_end - input_start, "rw"),
                *extra,
            ]
            cpu = vm.create_vcpu()
            cpu.setup_long_mode(user=True, exceptions=True, tables_addr=TABLES, user_map=user_map)
            rip = target_symbols[entry] if isinstance(entry, str) else entry
            blocks = None
            if coverage is not None:
                roots = [rip, loaded.entry]
                blocks = _code_blocks(vm, segments, target_symbols, roots, coverage)
            vm.write(stack_top - 8, stub.to_bytes(8, "little"))
            cpu.set_regs(rip=rip, rsp=stack_top - 8, rbp=0)
            return cls(
                vm,
                cpu,
                vm.snapshot(),
                input_end=input_end,
                max_len=max_len,
                input_arg=input_arg,
                length_arg=length_arg,
                timeout_ms=timeout_ms,
                symbols=target_symbols,
                crash_hooks=crash_hooks,
                exception_stack_top=TABLES + 0x7000,
                coverage=blocks,
                coverage_mode=coverage_mode,
                map_size=map_size,
            )
        except BaseException:
            vm.close()
            raise

    def run(self, data: bytes | bytearray | memoryview) -> Outcome:
        """Runs one input (at most ``max_len`` bytes, else ``ValueError``) from the
        snapshot, classifies how it ended and restores the snapshot."""
        exit, regs, new = self._executor.run(data)
        outcome = self._classify(exit, regs)
        if new:
            return replace(outcome, new_coverage=tuple(sorted(new)))
        return outcome

    def _instruction(self, rip: int) -> str | None:
        try:
            code = self.snapshot.read(rip, 15)
        except ValueError:
            return None
        insns = _disassemble(code, 64, rip)
        return insns[0][2] if insns else None

    def _classify(self, exit: object, regs: Regs | None) -> Outcome:
        reason = str(getattr(exit, "reason", "unknown"))
        if isinstance(exit, GuestExit):
            return Outcome("ok", reason, code=exit.code)
        if isinstance(exit, ExceptionExit):
            rip = exit.rip
            hook = self.hooks.get(rip) if exit.vector == 13 else None
            return Outcome(
                "crash",
                reason,
                vector=exit.vector,
                name=exit.name,
                error_code=exit.error_code,
                rip=rip,
                cr2=exit.cr2,
                hook=hook,
                instruction=None if hook is not None else self._instruction(rip),
                location=symbolize(rip, self.symbols),
                regs=regs,
            )
        if reason == "timeout":
            return Outcome("timeout", reason, regs=regs)
        at = regs.rip if regs is not None else None
        instruction = None if at is None else self._instruction(at)
        location = "" if at is None else symbolize(at, self.symbols)
        if isinstance(exit, MmioExit):
            return Outcome(
                "unmapped",
                reason,
                address=exit.address,
                is_write=exit.is_write,
                rip=at,
                instruction=instruction,
                location=location,
                regs=regs,
            )
        kind = reason if reason in ("shutdown", "internal_error") else "other"
        return Outcome(kind, reason, rip=at, instruction=instruction, location=location, regs=regs)

    def close(self) -> None:
        """Closes the target's VM."""
        self.vm.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
