"""Fuzz targets: an address space where mistakes fault, one input per run, outcomes."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    ) -> None:
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
            raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
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
        )

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
            )
        except BaseException:
            vm.close()
            raise

    def run(self, data: bytes | bytearray | memoryview) -> Outcome:
        """Runs one input (at most ``max_len`` bytes, else ``ValueError``) from the
        snapshot, classifies how it ended and restores the snapshot."""
        exit, regs = self._executor.run(data)
        return self._classify(exit, regs)

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
