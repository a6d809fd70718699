"""Exits in words: InternalErrorExit's own description, kvmpy.explain, the disassembler."""

from __future__ import annotations

import warnings

import pytest

import kvmpy
import kvmpy._native as native
from kvmpy.explain import symbolize

from .support import LONG_LOAD, user_mode_vm

MMIO = 0x300000
# lock cmpxchg16b [MMIO]: KVM must emulate it (no RAM there) and its emulator cannot.
CMPXCHG16B = bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0C, 0x25]) + MMIO.to_bytes(4, "little")


@pytest.mark.kvm
def test_an_emulation_failure_shows_the_instruction() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(LONG_LOAD, CMPXCHG16B)
        vm.on_mmio(MMIO, 0x1000, lambda e: None if e.is_write else bytes(e.size))
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False)
        cpu.set_regs(rip=LONG_LOAD)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.InternalErrorExit), exit
        assert exit.suberror_name == "emulation failure"
        assert (exit.rip, exit.bits, exit.reset_state) == (LONG_LOAD, 64, False)
        if exit.instruction_bytes:  # kernels before 5.14 report no bytes
            assert exit.instruction_bytes.startswith(CMPXCHG16B)
            insn = "f0 48 0f c7 0c 25 00 00 30 00 (lock cmpxchg16b [0x300000])"
            assert exit.instruction == insn
            assert insn in str(exit) and insn in repr(exit)
        assert str(exit).startswith("emulation failure at rip=0x10000 (64-bit code): ")
        assert kvmpy.explain(exit, cpu).startswith("internal error: emulation failure")


@pytest.mark.kvm
def test_an_emulation_failure_with_no_ram_at_rip_says_so() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=False)
        cpu.set_regs(rip=0x400000)  # mapped by the page tables, but no RAM
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.InternalErrorExit), exit
        assert exit.instruction_bytes == b"" and exit.instruction is None
        assert "is there guest RAM at rip" in str(exit)
        assert kvmpy.explain(exit, cpu).endswith("(there is no guest RAM at rip=0x400000)")


@pytest.mark.kvm
def test_a_user_mode_triple_fault_hints_at_privileged_instructions() -> None:
    vm, cpu = user_mode_vm(bytes([0xF4]))  # hlt at CPL3: #GP, no IDT -> triple fault
    with vm:
        exit = cpu.run(timeout=10)
        assert exit.reason == "shutdown"
        line = kvmpy.explain(exit, cpu)
        assert line.startswith(f"the guest shut down (a triple fault) at rip={LONG_LOAD:#x}: hlt")
        assert "privileged instruction" in line and "exceptions=True" in line


@pytest.mark.kvm
def test_an_exception_exit_in_words() -> None:
    vm, cpu = user_mode_vm(bytes([0x48, 0x8B, 0x04, 0x25, 0, 0, 0, 0x40]))  # mov rax, [1 GiB]
    with vm:
        cpu.setup_long_mode(user=True, exceptions=True)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.ExceptionExit), exit
        line = kvmpy.explain(exit, cpu, {"start": LONG_LOAD})
        assert line == (
            f"#PF page fault at rip={LONG_LOAD:#x} (start): mov rax, [0x40000000] "
            "(read of 0x40000000: not mapped)"
        )


@pytest.mark.kvm
def test_exits_explained_without_a_vcpu() -> None:
    assert kvmpy.explain(native_exit("timeout"), timeout=2) == "timed out after 2 s"


def native_exit(reason: str) -> kvmpy.ExitInfo:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 0x10000).write(0x1000, bytes([0xEB, 0xFE]))
        cpu = vm.create_vcpu()
        cpu.setup_real_mode(ip=0x1000)
        exit = cpu.run(timeout=0.05)
        assert exit.reason == reason
        return exit


def test_symbols() -> None:
    symbols = {"main": 0x1000, "parse": 0x1040, "": 0x1010, "zero": 0}
    assert symbolize(0x1000, symbols) == "main"
    assert symbolize(0x1020, symbols) == "main+0x20"
    assert symbolize(0x1050, symbols) == "parse+0x10"
    assert symbolize(0xFFF, symbols) == ""
    assert symbolize(0x1000, None) == ""


def test_disassemble() -> None:
    code = bytes([0x48, 0x89, 0xF9, 0xEB, 0xFE, 0x0F, 0xFF])
    assert native._disassemble(code, 64, 0x10000, 5) == [
        (0x10000, b"\x48\x89\xf9", "mov rcx, rdi"),
        (0x10003, b"\xeb\xfe", "jmp 0x10003"),
        (0x10005, b"\x0f\xff", "(bad)"),
    ]
    assert native._disassemble(b"\x48", 32) == [(0, b"\x48", "dec eax")]
    assert native._disassemble(b"") == []
    with pytest.raises(ValueError, match="16, 32 or 64"):
        native._disassemble(b"\x90", 8)
    with pytest.raises(TypeError):
        native._disassemble("nop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="range"):
        native._disassemble(b"\x90", 64, -1)


@pytest.mark.kvm
def test_a_vcpu_run_without_a_mode_is_told_to_set_one_up() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 1 << 20)
        cpu = vm.create_vcpu()  # no setup_*: it fetches at 0xfffffff0, where there is no RAM
        with pytest.warns(RuntimeWarning, match="reset state"):
            exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.InternalErrorExit), exit
        assert exit.reset_state
        assert str(exit).endswith(
            "set up a mode first with setup_real_mode, setup_protected_mode, "
            "setup_long_mode or load_multiboot"
        )


@pytest.mark.kvm
def test_a_run_from_the_reset_state_warns_once_per_vcpu() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        fresh, ready = vm.create_vcpu(), vm.create_vcpu()
        ready.setup_real_mode(cs=0, ip=0x1000)
        vm.write(0x1000, bytes([0xF4]))  # hlt
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = fresh.run(timeout=5)
            assert first.reason in ("mmio", "internal_error", "shutdown", "fail_entry")
            fresh.run(timeout=5)
            assert ready.run(timeout=5).reason == "hlt"
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert len(messages) == 1, messages
        assert "vCPU 0 ran from its reset state" in messages[0]
        assert "0xfffffff0" in messages[0]
