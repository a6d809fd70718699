"""CPU modes, guest exceptions as exits, and virtual-address translation."""

from __future__ import annotations

import pytest

import kvmpy

from .support import EXIT_PORT, LONG_LOAD, user_mode_vm

pytestmark = pytest.mark.kvm

# Each faulting snippet with the offset of the faulting instruction.
DIVIDE_BY_ZERO = (bytes([0x31, 0xC9, 0xF7, 0xF1]), 2)  # xor ecx, ecx ; div ecx
UD2 = (bytes([0x0F, 0x0B]), 0)  # ud2
NON_CANONICAL = (  # movabs rax, 0x8000000000000000 ; mov rax, [rax]
    bytes([0x48, 0xB8]) + (1 << 63).to_bytes(8, "little") + bytes([0x48, 0x8B, 0x00]),
    10,
)
UNMAPPED = (bytes([0xB8, 0x00, 0x00, 0x00, 0x40, 0x48, 0x8B, 0x00]), 5)  # mov rax, [1 GiB]


def exception_vm(code: bytes, user: bool) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=user, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD)
    return vm, cpu


@pytest.mark.parametrize("user", [True, False], ids=["cpl3", "cpl0"])
@pytest.mark.parametrize(
    ("snippet", "vector", "name"),
    [
        (DIVIDE_BY_ZERO, 0, "#DE"),
        (UD2, 6, "#UD"),
        (NON_CANONICAL, 13, "#GP"),
        (UNMAPPED, 14, "#PF"),
    ],
)
def test_exceptions_become_exits(
    snippet: tuple[bytes, int], vector: int, name: str, user: bool
) -> None:
    code, offset = snippet
    vm, cpu = exception_vm(code, user)
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.ExceptionExit), exit
        assert exit.reason == "exception"
        assert (exit.vector, exit.name) == (vector, name)
        assert exit.rip == LONG_LOAD + offset
        assert exit.cs & 3 == (3 if user else 0)
        if vector == 14:
            assert exit.cr2 == 0x4000_0000
            # Not present, read; from user mode the U/S bit is set.
            assert exit.error_code == (0x4 if user else 0x0)
        else:
            assert exit.error_code == 0
        assert name in repr(exit)


def test_breakpoint_from_user_mode() -> None:
    vm, cpu = exception_vm(bytes([0xCC]), user=True)  # int3
    with vm:
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.ExceptionExit)
        assert (exit.name, exit.rip) == ("#BP", LONG_LOAD + 1)  # a trap: RIP is after it


def test_without_stubs_a_fault_is_a_triple_fault() -> None:
    vm, cpu = user_mode_vm(UD2[0])
    with vm:
        assert cpu.run(timeout=10).reason == "shutdown"


def test_exception_port_conflicts_are_reported() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(LONG_LOAD, UD2[0])
        console = vm.add_console(0xF6)
        cpu = vm.create_vcpu()
        with pytest.raises(ValueError, match="overlap"):
            cpu.setup_long_mode(exceptions=True)
        cpu.setup_long_mode(exceptions=True, exception_port=0xF7)
        second = vm.create_vcpu()
        second.setup_long_mode(exceptions=True, exception_port=0xF7)  # same tables: fine
        # Both vCPUs report their exceptions through port 0xf7, not the console's port.
        for c in (cpu, second):
            c.set_regs(rip=LONG_LOAD)
            exit = c.run(timeout=10)
            assert isinstance(exit, kvmpy.ExceptionExit), exit
            assert (exit.name, exit.rip) == ("#UD", LONG_LOAD)
        assert console.output() == b""


def test_vcpus_sharing_tables_that_fault_at_once_each_get_their_own_report() -> None:
    # Each vCPU spins RCX times, then reads [RDI]: an address past the 1 GiB identity map,
    # one per vCPU, so each #PF's CR2 (and the RSP of the faulting context) says whose it
    # is. Started together, they fault together; the exception stubs are shared.
    # l: dec rcx ; jnz l ; mov rax, [rdi]
    code = bytes([0x48, 0xFF, 0xC9, 0x75, 0xFB, 0x48, 0x8B, 0x07])
    n = 4
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
        cpus = [vm.create_vcpu() for _ in range(n)]
        for c in cpus:
            c.setup_long_mode(user=True, exceptions=True)
        trs = {c.sregs.tr.base for c in cpus}
        assert len(trs) == n, "each vCPU has its own TSS (and exception stack)"
        for k, c in enumerate(cpus):
            c.set_regs(rip=LONG_LOAD, rcx=1000, rdi=(1 << 30) + k * 0x1000, rsp=0x80000 - k * 8)
        snap = vm.snapshot()
        for _ in range(25):
            exits = vm.run(timeout=30)
            for k, exit in enumerate(exits):
                assert isinstance(exit, kvmpy.ExceptionExit), exit
                assert (exit.name, exit.rip) == ("#PF", LONG_LOAD + 5)
                assert (exit.cr2, exit.rsp) == ((1 << 30) + k * 0x1000, 0x80000 - k * 8)
            vm.restore(snap)


def test_at_most_sixteen_vcpus_share_one_set_of_exception_tables() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        cpus = [vm.create_vcpu() for _ in range(17)]
        for c in cpus[:16]:
            c.setup_long_mode(exceptions=True)
        cpus[0].setup_long_mode(exceptions=True)  # again: keeps its own place
        with pytest.raises(ValueError, match="at most 16 can share them"):
            cpus[16].setup_long_mode(exceptions=True)
        cpus[16].setup_long_mode(exceptions=True, tables_addr=0x100000)  # its own: fine


def test_one_gib_pages_map_the_same_addresses() -> None:
    # mov rax, [0x300008] ; out 0xf4, al
    code = bytes([0x48, 0x8B, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00, 0xE6, EXIT_PORT])
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, 4 << 20)
        ram.write(LONG_LOAD, code)
        ram.write(0x300008, (0x1122334455667788).to_bytes(8, "little"))
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        ext = next(e for e in kvmpy.Kvm().supported_cpuid() if e.function == 0x80000001)
        if not ext.edx & (1 << 26):
            # This host's KVM does not give guests 1 GiB pages: a clear error, not a crash.
            with pytest.raises(ValueError, match="1 GiB pages"):
                cpu.setup_long_mode(user=True, huge_pages=True, map_gib=4)
            return
        cpu.setup_long_mode(user=True, huge_pages=True, map_gib=4)
        cpu.set_regs(rip=LONG_LOAD)
        assert cpu.run(timeout=10).reason == "exit"
        assert cpu.regs.rax == 0x1122334455667788
        assert cpu.translate(0xC000_1234) == 0xC000_1234


def test_protected_mode_guest() -> None:
    # 32-bit code at 0x1000: mov eax, [0x2000] ; add eax, eax ; out 0x11, eax ; hlt
    code = bytes([0xA1, 0x00, 0x20, 0x00, 0x00, 0x01, 0xC0, 0xE7, 0x11, 0xF4])
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, 0x10000)
        ram.write(0x4000, code)
        ram.write(0x2000, (21).to_bytes(4, "little"))
        seen: list[int] = []
        vm.on_io(0x11, lambda e: seen.append(e.value))
        cpu = vm.create_vcpu()
        cpu.setup_protected_mode(tables_addr=0x1000)
        cpu.set_regs(rip=0x4000, rsp=0x8000)
        s = cpu.sregs
        assert (s.cs.db, s.cs.l, s.cr0 & 0x80000001) == (1, 0, 1)
        assert cpu.run(timeout=10).reason == "hlt"
        assert seen == [42]
        assert cpu.translate(0x1234_5678) == 0x1234_5678  # paging off: identity


def test_translate_walks_the_guests_page_tables() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        # Remap virtual 0x4000_0000 (beyond the identity map) to physical 0x18_0000 with a
        # 4 KiB page: PDPT[1] -> a PD at 0x1A_0000 -> a PT at 0x1A_1000.
        pdpt = cpu.sregs.cr3 + 0x1000
        vm.write(pdpt + 8, (0x1A_0000 | 7).to_bytes(8, "little"))
        vm.write(0x1A_0000, (0x1A_1000 | 7).to_bytes(8, "little"))
        vm.write(0x1A_1000, (0x18_0000 | 7).to_bytes(8, "little"))
        assert cpu.translate(0x4000_0123) == 0x18_0123
        assert cpu.kvm_translate(0x4000_0123) == 0x18_0123
        assert cpu.kvm_translate(0x4000_1000) is None  # not mapped
        assert cpu.translate(0x1F_FFFF) == 0x1F_FFFF
        with pytest.raises(kvmpy.GuestMemoryError, match="not mapped"):
            cpu.translate(0x4000_1000)
        with pytest.raises(kvmpy.GuestMemoryError, match="not canonical"):
            cpu.translate(1 << 63)
        # A write that crosses into an unmapped page writes nothing.
        with pytest.raises(kvmpy.GuestMemoryError, match="not mapped"):
            cpu.write_virtual(0x4000_0FFE, b"abcd")
        assert vm.read(0x18_0FFE, 2) == b"\0\0"
        cpu.write_virtual(0x4000_0FFE, b"ab")
        assert vm.read(0x18_0FFE, 2) == b"ab"
    # Virtual reads and writes go through the same walk, across pages.
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.write_virtual(0x1_0FFE, b"abcd")
        assert vm.read(0x1_0FFE, 4) == b"abcd"
        assert cpu.read_virtual(0x1_0FFE, 4) == b"abcd"
        with pytest.raises(kvmpy.GuestMemoryError):
            cpu.read_virtual(0x3FFF_FFFE, 4)  # runs past RAM (2 MiB) in physical memory
        with pytest.raises(kvmpy.GuestMemoryError):
            cpu.write_virtual(0x4000_0000 - 2, b"abcd")  # crosses into unmapped memory
        assert cpu.read_virtual(0x1_0FFE, 0) == b""
