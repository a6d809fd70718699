"""The peer harness: a function of a 64-bit ELF guest run by Unicorn, fuzzed by afl-fuzz
through unicornafl (``pip install unicorn unicornafl``), the way unicornafl's examples do.

The address space mirrors ``kvmpy.fuzz.Target.from_elf``: the ELF's PT_LOAD segments with
their own permissions, nothing mapped below them (a NULL access faults), a return page
whose address is the exit (reaching it, or an ``out`` to kvmpy's exit port 0xF4, ends
the input cleanly), a stack, and the input
written so that it ends at a page end. Each input: the input in place, RDI = its address,
RSI = its length, RSP on a return address, RIP at the entry. Any Unicorn error (an
unmapped or forbidden access, a CPU exception) is a crash, which is how unicornafl
reports a crash to afl-fuzz.

Under afl-fuzz: ``python -m benchmarks.unicorn_fuzz ELF ENTRY [--max-len N] @@``
(persistent mode, the child lives on across inputs and crashes, like kvmpy's). Without
afl-fuzz, each input file named is run once and its outcome printed.

Versions: ``pip install unicornafl==2.0.2 unicorn==2.0.0rc6`` (the Unicorn core that
unicornafl 2.0.2 bundles; a newer ``unicorn`` binding refuses that core or mixes two
cores in one process and crashes). unicornafl 2.1.0, the newest on PyPI, links the
``unicorn`` package's core but its block hook indexes afl-fuzz's map with an unmasked
32-bit hash: the child segfaults on its first block (afl-fuzz: "the program crashed
with one of the test cases provided").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIP = "pip install unicornafl==2.0.2 unicorn==2.0.0rc6"
PAGE = 0x1000
EXIT_PORT = 0xF4
STACK_SIZE = 0x10000
PF_X, PF_W = 1, 2


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def unicorn_modules() -> tuple[Any, Any]:
    """``unicorn`` and ``unicorn.x86_const``, imported dynamically (optional, untyped)."""
    return importlib.import_module("unicorn"), importlib.import_module("unicorn.x86_const")


def unicornafl_module() -> Any:
    """``unicornafl``. Its 2.1.0 release reads ``distutils.sysconfig`` without importing
    it, which fails on Python 3.11 unless something imported it first: do that."""
    try:
        importlib.import_module("distutils.sysconfig")
    except ImportError:
        pass
    return importlib.import_module("unicornafl")


def unavailable() -> str | None:
    """Why the Unicorn harness cannot run under afl-fuzz here, or None if it can."""
    try:
        unicorn_modules()
        unicornafl_module()
    except (ImportError, AttributeError) as e:
        return f"unicorn + unicornafl are not importable ({e}): {PIP}"
    if importlib.metadata.version("unicornafl") == "2.1.0":
        return f"unicornafl 2.1.0 segfaults on its first block (see this module's doc): {PIP}"
    return None


@dataclass(frozen=True)
class Segment:
    vaddr: int
    data: bytes
    memsz: int
    flags: int


def elf_segments(image: bytes) -> list[Segment]:
    """The PT_LOAD segments of a 64-bit little-endian ELF."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise ValueError("not a 64-bit ELF image")
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    out = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + i * phentsize
        )
        if p_type == 1 and p_memsz:
            out.append(Segment(p_vaddr, image[p_offset : p_offset + p_filesz], p_memsz, p_flags))
    return out


def elf_symbol(image: bytes, name: str) -> int:
    """The address of symbol ``name`` from the ELF's symbol table."""
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)
    ]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for k in range(size // max(entsize, 24)):
            st_name, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", image, offset + k * 24)
            end = image.index(b"\0", strtab + st_name)
            if image[strtab + st_name : end].decode() == name:
                return int(value)
    raise ValueError(f"no symbol {name!r} in the ELF")


class UnicornTarget:
    """``entry`` of the ELF at ``path`` in a Unicorn x86-64 machine, ready for inputs of at
    most ``max_len`` bytes."""

    def __init__(self, path: str | Path, entry: str, max_len: int = 512) -> None:
        uc_mod, x86 = unicorn_modules()
        self._x86 = x86
        image = Path(path).read_bytes()
        segments = elf_segments(image)
        self.entry = elf_symbol(image, entry)
        self.max_len = max_len
        uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_64)
        perm = {0: uc_mod.UC_PROT_READ, PF_W: uc_mod.UC_PROT_WRITE, PF_X: uc_mod.UC_PROT_EXEC}
        for s in segments:
            start = s.vaddr & ~(PAGE - 1)
            prot = perm[0] | (perm[PF_W] if s.flags & PF_W else 0)
            prot |= perm[PF_X] if s.flags & PF_X else 0
            uc.mem_map(start, _round_up(s.vaddr + s.memsz, PAGE) - start, prot)
            uc.mem_write(s.vaddr, s.data)
        end = _round_up(max(s.vaddr + s.memsz for s in segments), PAGE)
        # The same layout as kvmpy's Target.from_elf: a gap page between areas.
        self.exit = end + PAGE
        stack_bottom = self.exit + 2 * PAGE
        self.stack_top = stack_bottom + STACK_SIZE
        input_start = self.stack_top + PAGE
        self.input_end = input_start + _round_up(max(max_len, 1), PAGE)
        uc.mem_map(self.exit, PAGE, uc_mod.UC_PROT_READ | uc_mod.UC_PROT_EXEC)
        uc.mem_write(self.exit, b"\xf4")  # hlt, never reached: the exit stops before it
        uc.mem_map(stack_bottom, STACK_SIZE, uc_mod.UC_PROT_READ | uc_mod.UC_PROT_WRITE)
        rw = uc_mod.UC_PROT_READ | uc_mod.UC_PROT_WRITE
        uc.mem_map(input_start, self.input_end - input_start, rw)
        # The guests' own _start ends with `out 0xf4` after main returns: kvmpy's exit
        # port ends the run there, so the same OUT ends it here (else `jmp .` hangs).
        uc.hook_add(uc_mod.UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        self.uc = uc
        self._ret = struct.pack("<Q", self.exit)

    @staticmethod
    def _on_out(uc: Any, port: int, size: int, value: int, user_data: Any) -> None:
        if port == EXIT_PORT:
            uc.emu_stop()

    def place(self, uc: Any, data: bytes) -> None:
        """Puts one input in place and the registers at the entry."""
        x86 = self._x86
        data = bytes(data[: self.max_len])
        addr = self.input_end - len(data)
        uc.mem_write(addr, data)
        rsp = self.stack_top - 8
        uc.mem_write(rsp, self._ret)
        uc.reg_write(x86.UC_X86_REG_RSP, rsp)
        uc.reg_write(x86.UC_X86_REG_RDI, addr)
        uc.reg_write(x86.UC_X86_REG_RSI, len(data))
        uc.reg_write(x86.UC_X86_REG_RIP, self.entry)

    def run(self, data: bytes) -> str | None:
        """Runs one input in this process; returns None (it returned) or the Unicorn
        error that ended it (a crash)."""
        uc_mod, _ = unicorn_modules()
        self.place(self.uc, data)
        try:
            self.uc.emu_start(self.entry, self.exit, timeout=0, count=0)
        except uc_mod.UcError as e:
            return str(e)
        return None

    def afl_fuzz(self, input_file: str, persistent_iters: int = 0) -> None:
        """Serves afl-fuzz (``unicornafl.uc_afl_fuzz``) until it goes away;
        ``persistent_iters`` inputs per child (0: a child runs until it is killed)."""
        afl = unicornafl_module()

        def place_input(uc: Any, data: Any, persistent_round: int, _: Any) -> bool:
            self.place(uc, bytes(data))
            return True

        afl.uc_afl_fuzz(
            self.uc,
            input_file=input_file,
            place_input_callback=place_input,
            exits=[self.exit],
            persistent_iters=persistent_iters,
        )


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("elf")
    parser.add_argument("entry")
    parser.add_argument("inputs", nargs="+", help="input files (afl-fuzz's @@)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--persistent-iters", type=int, default=0)
    parser.add_argument("--afl", action="store_true", help="serve afl-fuzz (unicornafl)")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        target = UnicornTarget(args.elf, args.entry, args.max_len)
    except (OSError, ValueError) as e:
        print(f"unicorn_fuzz: {e}", file=sys.stderr)
        return 2
    if args.afl:
        afl = unicornafl_module()
        try:
            target.afl_fuzz(args.inputs[0], args.persistent_iters)
        except afl.UcAflError as e:
            if e.errno not in (afl.UC_AFL_RET_FINISHED, afl.UC_AFL_RET_NO_AFL):
                raise
        return 0
    status = 0
    for p in args.inputs:
        error = target.run(Path(p).read_bytes())
        print(f"{p}: {'ok' if error is None else 'crash ' + error}")
        status |= error is not None
    return status


if __name__ == "__main__":
    sys.exit(main())
