"""Loaders: flat binaries, ELF executables, Multiboot v1 kernels, and their bad inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import kvmpy

from .support import CONSOLE, EXIT_PORT

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="session")
def c_elf(guest_dir: Path) -> Callable[[str], Path]:
    return lambda name: guest_dir.parent / "c" / "build" / f"{name}.elf"


def test_flat_loader(vm: kvmpy.Vm) -> None:
    vm.add_memory(0, 0x10000)
    vm.load_flat(b"\x01\x02\x03", 0x1000)
    assert vm.read(0x1000, 3) == b"\x01\x02\x03"
    with pytest.raises(kvmpy.GuestMemoryError):
        vm.load_flat(b"\x00" * 16, 0xFFF8)
    with pytest.raises(OSError, match="cannot read"):
        vm.load_flat("/nonexistent/guest.bin", 0)


def test_elf_guest_runs_from_its_entry_point(c_elf: Callable[[str], Path]) -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        image = vm.load_elf(c_elf("hello"))  # a path...
        assert (image.bits, image.entry) == (64, 0x100000)
        assert image.boot_info is None
        assert image.symbols["main"] > image.entry
        assert image.symbols["_start"] == image.entry
        assert all(0x100000 <= gpa < 0x200000 for gpa, _ in image.segments)
        console = vm.add_console(CONSOLE)
        vm.add_exit_port(EXIT_PORT)
        vm.host_function(2, lambda a, b: a * b)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=image.entry)
        exit = cpu.run(timeout=30)
        assert exit.reason == "exit" and exit.code == 42  # type: ignore[attr-defined]
        assert console.output() == b"Hello from C!\n6 * 7 = 42\n"
        # ...or bytes; the .bss past the file size is zeroed.
        bss_start = image.symbols["__bss_start"]
        vm.write(bss_start, b"\xff" * 8)
        vm.load_elf(c_elf("hello").read_bytes())
        assert vm.read(bss_start, 8) == bytes(8)


def test_elf_bad_inputs(c_elf: Callable[[str], Path]) -> None:
    data = c_elf("hello").read_bytes()
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        with pytest.raises(ValueError, match="not an ELF file"):
            vm.load_elf(b"MZ\x90\x00" + bytes(60))
        with pytest.raises(ValueError, match="(?i)truncated|malformed"):
            vm.load_elf(data[:80])
        with pytest.raises(ValueError, match="not an ELF file"):
            vm.load_elf(b"")
        with pytest.raises(TypeError):
            vm.load_elf(42)  # type: ignore[arg-type]
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 1 << 20)  # RAM ends where the image begins
        with pytest.raises(kvmpy.GuestMemoryError, match="not lie inside guest RAM"):
            vm.load_elf(data)
        assert vm.read(0xFF000, 16) == bytes(16)  # nothing written


def test_multiboot_kernel_prints_through_the_uart_and_exits(guest_dir: Path) -> None:
    kernel = guest_dir / "multiboot_hello.elf"
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        uart = vm.add_uart(0x3F8)
        vm.add_debug_exit(0xF4)
        cpu = vm.create_vcpu()
        image = vm.load_multiboot(
            cpu, kernel, cmdline="console=ttyS0 quiet", modules=[b"module one", (b"two", "m2")]
        )
        assert image.bits == 32 and image.boot_info is not None
        regs = cpu.regs
        assert (regs.rax, regs.rbx, regs.rip) == (0x2BADB002, image.boot_info, image.entry)
        assert cpu.sregs.cr0 & 0x80000001 == 1  # protected mode, paging off
        info = vm.read(image.boot_info, 88)
        flags = int.from_bytes(info[0:4], "little")
        assert flags & 0b1001001101 == 0b1001001101  # MEMORY, CMDLINE, MODS, MMAP, LOADER_NAME
        assert int.from_bytes(info[20:24], "little") == 2  # mods_count
        exit = cpu.run(timeout=60)
        assert isinstance(exit, kvmpy.GuestExit)
        assert exit.code == (0x21 << 1) | 1
        assert uart.output() == (
            b"Hello from a multiboot kernel!\ncmdline: console=ttyS0 quiet\nmodules: 2\n"
        )


def test_multiboot_bad_inputs(c_elf: Callable[[str], Path], guest_dir: Path) -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        cpu = vm.create_vcpu()
        with pytest.raises(ValueError, match="no multiboot header"):
            vm.load_multiboot(cpu, c_elf("hello"))  # an ELF, but not a multiboot kernel
        kernel = (guest_dir / "multiboot_hello.elf").read_bytes()
        with pytest.raises(kvmpy.GuestMemoryError, match="overlaps the GDT"):
            vm.load_multiboot(cpu, kernel, tables_addr=0x100000)
        with pytest.raises(ValueError, match="(?i)nul"):
            vm.load_multiboot(cpu, kernel, cmdline="a\0b")
        with pytest.raises(TypeError, match="module"):
            vm.load_multiboot(cpu, kernel, modules=[(b"x", "y", "z")])
        with kvmpy.Vm() as other:
            with pytest.raises(ValueError, match="another VM"):
                other.load_multiboot(cpu, kernel)
    with kvmpy.Vm() as small:
        small.add_memory(0, 1 << 20)
        with pytest.raises(kvmpy.GuestMemoryError, match="not lie inside guest RAM"):
            small.load_multiboot(small.create_vcpu(), kernel)
