"""``python -m kvmpy run IMAGE``: run a flat binary, an ELF or a Multiboot kernel."""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import kvmpy
from kvmpy.explain import explain
from kvmpy.sdk import SHIPPED_GUESTS, shipped_guest

MODES = ("real", "protected", "long", "long-user", "multiboot")
MULTIBOOT_MAGIC = 0x1BADB002
EXIT_TIMEOUT = 124
"""Exit status when the guest ran past ``--timeout`` (as timeout(1))."""
EXIT_STOPPED = 125
"""Exit status when the guest stopped without an exit code (exception, triple fault, ...)."""
POLL = 0.02
"""Seconds between two looks at the console while the guest runs."""


class UsageError(Exception):
    """A mistake on the command line or in the image: reported in one line, status 2."""


def parse_int(text: str) -> int:
    """``4096``, ``0x1000``, ``1_000``, ``1e6`` (when that is a whole number)."""
    text = text.strip().replace("_", "")
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def parse_count(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K``, ``0x100000``: a whole number of 4 KiB pages."""
    m = re.fullmatch(r"\s*(0[xX][0-9a-fA-F_]+|[0-9_]+)\s*([kmgKMG])?i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M)")
    size = (
        parse_int(m.group(1))
        << {None: 0, "k": 10, "m": 20, "g": 30}[m.group(2) and m.group(2).lower()]
    )
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 4 KiB")
    return size


def parse_port(text: str) -> int:
    port = parse_int(text)
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {text} is outside 0..0xffff")
    return port


def parse_gdb_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = ""
    try:
        number = int(port, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}") from None
    if not 0 <= number <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0..65535")
    return host.strip("[]") or "127.0.0.1", number


def parse_reg(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name.strip().lower() not in kvmpy.Regs().as_dict():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a register name, not {text!r}")
    return name.strip().lower(), parse_int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="a flat binary, an ELF or a Multiboot kernel (a file, or the name of a guest "
        f"shipped with kvmpy: {', '.join(SHIPPED_GUESTS)})",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="CPU mode (default: multiboot for a Multiboot kernel, long-user for a 64-bit "
        "ELF or a flat binary, protected for a 32-bit ELF)",
    )
    p.add_argument(
        "--memory", type=parse_size, default=64 << 20, metavar="SIZE", help="RAM (default 64M)"
    )
    p.add_argument(
        "--load",
        type=parse_int,
        metavar="ADDR",
        help="where a flat binary goes (default 0x10000; 0x1000 in real mode)",
    )
    p.add_argument(
        "--entry", type=parse_int, metavar="ADDR", help="entry point (default: the image's)"
    )
    p.add_argument(
        "--console",
        type=parse_port,
        default=0x3F8,
        metavar="PORT",
        help="port whose OUT bytes go to stdout (default 0x3f8)",
    )
    p.add_argument(
        "--uart",
        action="store_true",
        help="put a 16550 UART (8 ports) at the console port instead of a plain console "
        "port (always for Multiboot kernels, which poll its status register)",
    )
    p.add_argument(
        "--exit-port",
        type=parse_port,
        default=0xF4,
        metavar="PORT",
        help="an OUT of v there ends the run with exit code v (default 0xf4)",
    )
    p.add_argument(
        "--debug-exit",
        type=parse_port,
        metavar="PORT",
        help="QEMU's isa-debug-exit instead: an OUT of v ends the run with exit code "
        "(v << 1) | 1 (the default for Multiboot kernels, at 0xf4)",
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop the guest after this long"
    )
    p.add_argument("--cmdline", default="", help="Multiboot command line")
    p.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE[=CMDLINE]",
        help="a Multiboot module (repeatable)",
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=1,
        metavar="N",
        help="vCPUs, all starting at the entry with the same registers; the first to stop "
        "ends the run",
    )
    p.add_argument(
        "--gdb",
        type=parse_gdb_address,
        metavar="HOST:PORT",
        help="wait for gdb on HOST:PORT (e.g. :1234) with the guest stopped at its entry; "
        "the guest runs on when gdb detaches",
    )
    p.add_argument(
        "--reg",
        type=parse_reg,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a register before the run, e.g. --reg rdi=1000 (repeatable)",
    )


@dataclass
class Image:
    data: bytes
    mode: str
    elf_bits: int | None
    symbols: dict[str, int] = field(default_factory=dict)


def read_image(name: str) -> bytes:
    path = Path(name)
    if not path.exists() and name in SHIPPED_GUESTS:
        path = shipped_guest(name)
    try:
        return path.read_bytes()
    except OSError as e:
        hint = ""
        if isinstance(e, FileNotFoundError):
            hint = f" (guests shipped with kvmpy: {', '.join(SHIPPED_GUESTS)})"
        raise UsageError(f"cannot read {name}: {e.strerror or e}{hint}") from None


def has_multiboot_header(data: bytes) -> bool:
    """Whether a Multiboot v1 header (magic, flags, checksum) lies in the first 8 KiB."""
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def classify(data: bytes) -> Image:
    elf_bits = None
    if data[:4] == b"\x7fELF" and len(data) > 4:
        elf_bits = {1: 32, 2: 64}.get(data[4])
        if elf_bits is None:
            raise UsageError("an ELF file of unknown class (neither 32- nor 64-bit)")
    if has_multiboot_header(data) and elf_bits != 64:
        mode = "multiboot"
    elif elf_bits == 32:
        mode = "protected"
    else:
        mode = "long-user"
    return Image(data, mode, elf_bits)


def tables_at(memory: int, taken: list[tuple[int, int]], size: int) -> int:
    """Where the mode's tables go: 0x1000, or the top of RAM when the image is there."""
    for base in (0x1000, memory - size - 0x1000):
        if base >= 0x1000 and all(base + size <= a or a + n <= base for a, n in taken):
            return base
    raise UsageError("no room in guest RAM for the CPU tables: give more --memory")


def run(args: argparse.Namespace) -> int:
    """Runs the image per ``args``; returns the process exit status."""
    if not 1 <= args.cpus <= 64:
        raise UsageError(f"--cpus must be 1 to 64, not {args.cpus}")
    if args.timeout is not None and not 0 < args.timeout <= 1e9:
        raise UsageError("--timeout must be a number of seconds above 0")
    data = read_image(args.image)
    if not data:
        raise UsageError(f"{args.image} is empty")
    try:
        image = classify(data)
    except UsageError as e:
        raise UsageError(f"cannot load {args.image}: {e}") from None
    mode = args.mode or image.mode
    if mode == "multiboot" and args.cpus > 1:
        raise UsageError("a Multiboot kernel starts on one vCPU: drop --cpus")
    avail = kvmpy.available()
    if not avail:
        raise UsageError(f"KVM is unavailable: {avail.reason}")
    out: BinaryIO = sys.stdout.buffer
    with kvmpy.Vm() as vm:
        try:
            vm.add_memory(0, args.memory)
        except kvmpy.GuestMemoryError as e:
            raise UsageError(f"--memory {args.memory:#x}: {e}") from None
        uart = args.uart or mode == "multiboot"
        console: kvmpy.Console | kvmpy.Uart = (
            vm.add_uart(args.console) if uart else vm.add_console(args.console)
        )
        debug_exit = args.debug_exit
        if debug_exit is None and mode == "multiboot":
            debug_exit = args.exit_port
        if debug_exit is not None:
            vm.add_debug_exit(debug_exit)
        else:
            vm.add_exit_port(args.exit_port)
        cpus = [vm.create_vcpu() for _ in range(args.cpus)]
        symbols: dict[str, int] = {}
        try:
            if mode == "multiboot":
                modules: list[str | tuple[str, str]] = []
                for m in args.module:
                    path, sep, cmdline = m.partition("=")
                    modules.append((path, cmdline) if sep else path)
                loaded = vm.load_multiboot(
                    cpus[0], image.data, cmdline=args.cmdline, modules=list(modules)
                )
                entry = loaded.entry
                if args.entry is not None:
                    cpus[0].set_regs(rip=args.entry)
            else:
                if image.elf_bits is not None:
                    loaded = vm.load_elf(image.data)
                    entry, taken, symbols = loaded.entry, loaded.segments, loaded.symbols
                else:
                    load = (
                        args.load
                        if args.load is not None
                        else (0x1000 if mode == "real" else 0x10000)
                    )
                    vm.load_flat(image.data, load)
                    entry, taken = load, [(load, len(image.data))]
                if args.entry is not None:
                    entry = args.entry
                setup_cpus(cpus, mode, entry, args.memory, taken)
        except (kvmpy.KvmError, ValueError, OSError) as e:
            raise UsageError(f"cannot load {args.image}: {e}") from None
        for cpu in cpus:
            if args.reg:
                cpu.set_regs(**dict(args.reg))

        def flush() -> None:
            data = console.take()
            if data:
                out.write(data)
                out.flush()

        if args.gdb is not None:
            status = debug(vm, args.gdb, flush)
            if status is not None:
                return status
        vm.start(timeout=args.timeout, until="any")
        exits: list[kvmpy.ExitInfo] | None = None

        def joined() -> bool:
            nonlocal exits
            exits = vm.join(POLL)
            return exits is not None

        if not wait_streaming(joined, flush):
            return 130
        assert exits is not None
        return report(exits, cpus, symbols, args.timeout)


def wait_streaming(done: Callable[[], bool], flush: Callable[[], None]) -> bool:
    """Calls `done` (which waits up to POLL) until it is true, streaming the console
    output between calls; False after Ctrl-C (said on stderr)."""
    try:
        while not done():
            flush()
    except KeyboardInterrupt:
        flush()
        print("kvmpy run: interrupted", file=sys.stderr)
        return False
    finally:
        flush()
    return True


def debug(vm: kvmpy.Vm, address: tuple[str, int], flush: Callable[[], None]) -> int | None:
    """One gdb session with the guest at its entry. Returns the exit status when the
    session ended the run (the guest exited, gdb killed it, Ctrl-C), None to run on."""
    host, port = address
    try:
        server = vm.gdb_server(port, host)
    except (OSError, kvmpy.KvmError, ValueError) as e:
        raise UsageError(f"--gdb {host}:{port}: {e}") from None
    with server:
        print(
            f"kvmpy run: waiting for gdb on {server.host}:{server.port} "
            f"(gdb IMAGE -ex 'target remote {server.host}:{server.port}')",
            file=sys.stderr,
            flush=True,
        )
        if not wait_streaming(lambda: server.wait(POLL), flush):
            return 130
        ending = server.ending or ""
    if ending.startswith("the guest exited with code "):
        return int(ending.rsplit(" ", 1)[1])
    if ending == "gdb sent kill":
        print("kvmpy run: gdb killed the guest", file=sys.stderr)
        return EXIT_STOPPED
    return None


def setup_cpus(
    cpus: list[kvmpy.Vcpu], mode: str, entry: int, memory: int, taken: list[tuple[int, int]]
) -> None:
    if mode == "real":
        if entry >= 1 << 20:
            raise UsageError(f"entry {entry:#x} is above 1 MiB, out of reach of real mode")
        cs = (entry >> 4) & 0xF000
        for cpu in cpus:
            cpu.setup_real_mode(cs=cs, ip=entry - (cs << 4))
            cpu.set_regs(rsp=0x8000)
        return
    if mode == "protected":
        tables = tables_at(memory, taken, 0x1000)
        top = min(memory, 1 << 32)
        for cpu in cpus:
            cpu.setup_protected_mode(tables_addr=tables)
            cpu.set_regs(rip=entry, rsp=(tables if tables > 0x1000 else top) - 16)
        return
    gib = min(512, max(1, -(-memory // (1 << 30))))
    tables = tables_at(memory, taken, 0x9000 + gib * 0x1000)
    for cpu in cpus:
        cpu.setup_long_mode(
            user=mode == "long-user", tables_addr=tables, map_gib=gib, exceptions=True
        )
        cpu.set_regs(rip=entry, rsp=(tables if tables > 0x1000 else memory) - 16)


def report(
    exits: list[kvmpy.ExitInfo],
    cpus: list[kvmpy.Vcpu],
    symbols: dict[str, int],
    timeout: float | None,
) -> int:
    """The exit status for the vCPUs' final exits; a line on stderr unless the guest exited
    with a code or halted."""
    # The vCPU that ended the run (the others were stopped because it did).
    index = next((i for i, e in enumerate(exits) if e.reason != "stopped"), 0)
    exit, cpu = exits[index], cpus[index]
    if isinstance(exit, kvmpy.GuestExit):
        return min(exit.code, 255)
    if exit.reason == "hlt":
        return 0
    who = f"vCPU {index}: " if len(cpus) > 1 else ""
    print(f"kvmpy run: {who}{explain(exit, cpu, symbols, timeout=timeout)}", file=sys.stderr)
    return EXIT_TIMEOUT if exit.reason == "timeout" else EXIT_STOPPED


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except UsageError as e:
        print(f"kvmpy run: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout closed early (`| head`): not an error of the guest.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
