"""Standard PC pieces and host calls: UART, isa-debug-exit, host functions, CPUID, MSRs,
and freestanding C guests."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import kvmpy

from .support import CONSOLE, EXIT_PORT, real_mode_vm, user_mode_vm

pytestmark = pytest.mark.kvm

Guest = Callable[[str], bytes]
C_LOAD = 0x100000
BUFFER = 0x200000


@pytest.fixture(scope="session")
def c_guest(guest_dir: Path) -> Callable[[str], bytes]:
    """``c_guest("hello")`` -> the flat image built from guests/c/hello.c."""

    def load(name: str) -> bytes:
        return (guest_dir.parent / "c" / "build" / f"{name}.bin").read_bytes()

    return load


def c_vm(image: bytes, *args: int, exceptions: bool = False) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 4 << 20).write(C_LOAD, image)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=exceptions)
    regs = dict(zip(("rdi", "rsi"), args, strict=False))
    cpu.set_regs(rip=C_LOAD, **regs)
    return vm, cpu


def test_uart_transmits_to_the_host_and_receives_what_it_feeds() -> None:
    # Poll LSR (0x3fd) for THR empty, send 'A'; wait for data ready, echo it back; hlt.
    code = bytes([
        0xBA, 0xFD, 0x03,        # mov dx, 0x3fd
        0xEC,                    # wait: in al, dx
        0xA8, 0x20,              # test al, 0x20
        0x74, 0xFB,              # jz wait
        0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
        0xB0, 0x41,              # mov al, 'A'
        0xEE,                    # out dx, al
        0xBA, 0xFD, 0x03,        # mov dx, 0x3fd
        0xEC,                    # rx: in al, dx
        0xA8, 0x01,              # test al, 1
        0x74, 0xFB,              # jz rx
        0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
        0xEC,                    # in al, dx
        0xEE,                    # out dx, al
        0xF4,                    # hlt
    ])  # fmt: skip
    vm, cpu = real_mode_vm(code)
    with vm:
        uart = vm.add_uart(0x3F8)
        uart.feed(b"z")
        assert cpu.run(timeout=10).reason == "hlt"
        assert uart.output() == b"Az"
        assert uart.take() == b"Az" and uart.output() == b""
        assert cpu.stats()["handler_calls"] == 0
        assert vm.remove_handler(uart) == 1
        with pytest.raises(ValueError, match="past port 0xffff"):
            vm.add_uart(0xFFFC)


def test_debug_exit_follows_the_qemu_convention() -> None:
    vm, cpu = real_mode_vm(bytes([0xB0, 0x10, 0xE6, EXIT_PORT]))  # mov al, 0x10 ; out 0xf4, al
    with vm:
        port = vm.add_debug_exit()
        assert port.debug_exit and port.port == EXIT_PORT
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit)
        assert exit.code == (0x10 << 1) | 1


def test_c_guest_calls_a_python_host_function(c_guest: Callable[[str], bytes]) -> None:
    vm, cpu = c_vm(c_guest("hello"))
    with vm:
        console = vm.add_console(CONSOLE)
        vm.add_exit_port(EXIT_PORT)
        calls: list[tuple[int, int]] = []

        @vm.host_function(2)
        def multiply(a: int, b: int) -> int:
            calls.append((a, b))
            return a * b

        exit = cpu.run(timeout=30)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 42
        assert calls == [(6, 7)]
        assert console.output() == b"Hello from C!\n6 * 7 = 42\n"


@pytest.mark.parametrize("size", [0, 1, 5553, 100_000])
def test_c_guest_checksums_a_buffer_python_wrote(
    c_guest: Callable[[str], bytes], size: int
) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    vm, cpu = c_vm(c_guest("checksum"), BUFFER, size)
    with vm:
        vm.write(BUFFER, data)
        console = vm.add_console(CONSOLE)
        vm.add_exit_port(EXIT_PORT)
        results: list[int] = []
        vm.host_function(1, lambda checksum: results.append(checksum))
        exit = cpu.run(timeout=30)
        assert exit.reason == "exit" and exit.code == 0  # type: ignore[attr-defined]
        assert results == [zlib.adler32(data)]
        assert console.output() == f"adler32 = {zlib.adler32(data):#010x}\n".encode()


@pytest.mark.parametrize(("kind", "vector"), [(0, 0), (1, 6), (2, 14), (3, 13)])
def test_c_guest_crashes_are_reported(
    c_guest: Callable[[str], bytes], kind: int, vector: int
) -> None:
    vm, cpu = c_vm(c_guest("crash"), kind, exceptions=True)
    with vm:
        vm.add_exit_port(EXIT_PORT)
        exit = cpu.run(timeout=30)
        assert isinstance(exit, kvmpy.ExceptionExit), exit
        assert exit.vector == vector
        assert C_LOAD <= exit.rip < C_LOAD + 0x1000
        if vector == 14:
            assert exit.cr2 == 0x4000_0000


def test_host_function_rules(c_guest: Callable[[str], bytes]) -> None:
    # The guest calls function 2; various wrong registrations and answers.
    for setup, error, match in [
        (lambda vm: None, ValueError, "host function 2 .*not registered"),
        (lambda vm: vm.host_function(2, lambda a, b: "x"), TypeError, "must return an int"),
        (lambda vm: vm.host_function(2, lambda a, b: 2**64), ValueError, "does not fit"),
        (lambda vm: vm.host_function(2, lambda a, b: 1 / 0), ZeroDivisionError, "division by zero"),
    ]:
        vm, cpu = c_vm(c_guest("hello"))
        with vm:
            vm.add_console(CONSOLE)
            vm.host_function(3, lambda: None)  # the port exists even if 2 is missing
            setup(vm)
            with pytest.raises(error, match=match):
                cpu.run(timeout=30)
    with kvmpy.Vm() as vm:
        with pytest.raises(TypeError, match="callable"):
            vm.host_function(1, 5)  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="at most 6 arguments"):
            vm.host_function(1, lambda a, b, c, d, e, f, g: 0)
        with pytest.raises(ValueError, match="outside the range"):
            vm.host_function(-1, lambda: 0)
        vm.add_console(0x2F8)
        with pytest.raises(ValueError, match="overlap"):
            vm.host_function(1, lambda: 0, port=0x2F8)
    # A function that takes *args gets all six argument registers.
    code = bytes([
        0xBF, 0x01, 0x00, 0x00, 0x00,        # mov edi, 1
        0xBE, 0x02, 0x00, 0x00, 0x00,        # mov esi, 2
        0xBA, 0x03, 0x00, 0x00, 0x00,        # mov edx, 3
        0x41, 0xBA, 0x04, 0x00, 0x00, 0x00,  # mov r10d, 4
        0x41, 0xB8, 0x05, 0x00, 0x00, 0x00,  # mov r8d, 5
        0x41, 0xB9, 0x06, 0x00, 0x00, 0x00,  # mov r9d, 6
        0xB8, 0x01, 0x00, 0x00, 0x00,        # mov eax, 1
        0xE7, 0xF5,                          # out 0xf5, eax     (host function 1)
        0xE6, EXIT_PORT,                     # out 0xf4, al      (its result)
    ])  # fmt: skip
    vm, cpu = user_mode_vm(code)
    with vm:
        vm.add_exit_port(EXIT_PORT)
        calls: list[tuple[int, ...]] = []

        @vm.host_function(1)
        def total(*args: int) -> int:
            calls.append(args)
            return sum(args)

        exit = cpu.run(timeout=10)
        assert calls == [(1, 2, 3, 4, 5, 6)]
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 21


def test_negative_host_results_are_twos_complement(c_guest: Callable[[str], bytes]) -> None:
    vm, cpu = c_vm(c_guest("hello"))
    with vm:
        console = vm.add_console(CONSOLE)
        vm.add_exit_port(EXIT_PORT)
        vm.host_function(2, lambda a, b: -(a * b))
        exit = cpu.run(timeout=30)
        assert exit.reason == "exit"
        assert exit.code == (-42) & 0xFFFFFFFF  # type: ignore[attr-defined]
        assert b"6 * 7 = 18446744073709551574" in console.output()


def test_cpuid_get_and_set(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu(id=3)
    entries = cpu.get_cpuid()
    leaf1 = next(e for e in entries if e.function == 1)
    assert leaf1.ebx >> 24 == 3  # APIC id
    assert leaf1.ecx & (1 << 31)  # hypervisor bit
    custom = [e for e in entries if e.function != 0x40000000]
    custom.append(kvmpy.CpuidEntry(0x40000000, eax=0x40000001, ebx=0x706D766B))
    cpu.set_cpuid(custom)
    got = {(e.function, e.index): e for e in cpu.get_cpuid()}
    assert got[(0x40000000, 0)].ebx == 0x706D766B
    with pytest.raises(ValueError, match="too many CPUID entries"):
        cpu.set_cpuid([kvmpy.CpuidEntry(i) for i in range(1000)])


def test_cpuid_seen_by_the_guest() -> None:
    # cpuid with eax=0x40000000 ; out 0x11, eax (ebx) ; hlt     (real mode, 32-bit regs)
    code = bytes([0x66, 0xB8, 0x00, 0x00, 0x00, 0x40, 0x0F, 0xA2, 0x66, 0x89, 0xD8,
                  0x66, 0xE7, 0x11, 0xF4])  # fmt: skip
    vm, cpu = real_mode_vm(code)
    with vm:
        entries = [e for e in cpu.get_cpuid() if e.function != 0x40000000]
        entries.append(kvmpy.CpuidEntry(0x40000000, ebx=0x12345678))
        cpu.set_cpuid(entries)
        seen: list[int] = []
        vm.on_io(0x11, lambda e: seen.append(e.value))
        assert cpu.run(timeout=10).reason == "hlt"
        assert seen == [0x12345678]


def test_msrs(vm: kvmpy.Vm) -> None:
    cpu = vm.create_vcpu()
    ia32_tsc_aux, ia32_sysenter_cs = 0xC0000103, 0x174
    cpu.set_msrs({ia32_sysenter_cs: 0x10, ia32_tsc_aux: 7})
    assert cpu.get_msrs([ia32_sysenter_cs, ia32_tsc_aux]) == {
        ia32_sysenter_cs: 0x10,
        ia32_tsc_aux: 7,
    }
    with pytest.raises(kvmpy.KvmError, match="refused to read MSR 0xdeadbeef"):
        cpu.get_msrs([ia32_sysenter_cs, 0xDEADBEEF])
    with pytest.raises(kvmpy.KvmError, match="MSR 0xdeadbeef"):
        cpu.set_msrs({0xDEADBEEF: 1})
