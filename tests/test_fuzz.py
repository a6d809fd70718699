"""kvmpy.fuzz: an address space where mistakes fault, one outcome per way a run ends,
triage and deterministic replay."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

import kvmpy
from kvmpy import fuzz

from .support import EXIT_PORT, LONG_LOAD

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def cases(guest_dir: Path) -> Path:
    return guest_dir.parent / "c" / "build" / "fuzz_cases.elf"


@pytest.fixture(scope="module")
def parser(guest_dir: Path) -> Path:
    return guest_dir.parent / "c" / "build" / "fuzz_parser.elf"


def run_entry(elf: Path, entry: str, data: bytes = b"", **kw: object) -> fuzz.Outcome:
    with fuzz.Target.from_elf(elf, entry=entry, max_len=64, timeout_ms=50, **kw) as t:  # type: ignore[arg-type]
        outcome = t.run(data)
        # Deterministic, and the restore really went back: the same input, the same outcome.
        assert t.run(data) == outcome
        return outcome


def page_fault(o: fuzz.Outcome, cr2: int, write: bool, present: bool) -> None:
    assert (o.kind, o.vector, o.name, o.cr2) == ("crash", 14, "#PF", cr2)
    assert o.error_code is not None
    assert o.error_code & 4, "the fault comes from user mode"
    assert bool(o.error_code & 2) == write
    assert bool(o.error_code & 1) == present


def test_a_clean_return_is_ok_with_the_return_value(cases: Path) -> None:
    o = run_entry(cases, "returns_len", b"12345")
    assert (o.kind, o.code, o.is_crash, o.regs) == ("ok", 5, False, None)


def test_null_read_and_null_write_fault(cases: Path) -> None:
    o = run_entry(cases, "null_read", b"ab")  # reads 8 + len
    page_fault(o, 10, write=False, present=False)
    assert o.location == "null_read+0x4" and o.instruction == "mov rax, [rsi]"
    assert o.regs is not None and o.regs.rsi == 10 and o.rip == o.regs.rip
    o = run_entry(cases, "null_write")
    page_fault(o, 0x10, write=True, present=False)
    assert o.location.startswith("null_write+")


def test_a_user_write_to_kvmpys_tables_is_a_page_fault(cases: Path) -> None:
    with fuzz.Target.from_elf(cases, entry="write_at", max_len=64) as t:
        gdt, idt = t.cpu.sregs.gdt.base, t.cpu.sregs.idt.base
        for addr in (gdt, idt, gdt + 0x4000 + 0x1000, gdt + 0x7000):  # GDT, IDT, stubs, PML4
            o = t.run(struct.pack("<Q", addr))
            page_fault(o, addr, write=True, present=True)
        # The tables are intact and the target still works.
        assert t.snapshot.read(gdt, 0x8000) == t.vm.read(gdt, 0x8000)
        assert t.run(b"short").kind == "ok"


def test_code_is_not_writable(cases: Path) -> None:
    o = run_entry(cases, "write_code")
    assert o.cr2 is not None
    page_fault(o, o.cr2, write=True, present=True)
    assert o.location.startswith("write_code")


def test_undeclared_memory_faults_even_where_there_is_ram(cases: Path) -> None:
    with fuzz.Target.from_elf(cases, entry="write_at", max_len=64) as t:
        o = t.run(struct.pack("<Q", 0x1F0000))  # RAM, but not declared for the guest
        page_fault(o, 0x1F0000, write=True, present=False)
        assert o.regs is not None and o.regs.rax == 0x1F0000  # saved by the stubs


def test_reading_one_byte_past_the_input_faults(cases: Path) -> None:
    # write_at reads 8 bytes: a 7-byte input makes it return early, an 8-byte one works
    # (it then writes into the NULL area): the input ends at the end of its mapped area.
    with fuzz.Target.from_elf(cases, entry="write_at", max_len=8) as t:
        assert t.run(b"\0" * 7).code == 0xFFFFFFFF
        page_fault(t.run(b"\0" * 8), 0, write=True, present=False)


def test_stack_overflow_hits_the_guard_page(cases: Path) -> None:
    o = run_entry(cases, "stack_overflow")
    assert o.cr2 is not None and o.regs is not None
    page_fault(o, o.cr2, write=True, present=False)
    assert o.location.startswith("recurse")
    assert o.regs.rsp - 0x1000 <= o.cr2 < o.regs.rsp + 0x1000


def spin_address(elf: Path) -> int:
    with fuzz.Target.from_elf(elf, entry="spin") as t:
        return t.symbols["spin"]


def test_a_tight_loop_times_out(cases: Path) -> None:
    o = run_entry(cases, "spin")
    assert (o.kind, o.reason, o.summary(), o.bucket) == ("timeout",) * 3 + (
        ("timeout", None, None),
    )
    assert o.regs is not None
    assert 0 <= o.regs.rip - spin_address(cases) < 0x20, "stopped inside the loop"
    assert "rip=" not in o.report(), "where a hang is stopped is chance: not reported"


def test_invalid_opcode_and_divide_error(cases: Path) -> None:
    o = run_entry(cases, "invalid_opcode")
    assert (o.kind, o.vector, o.name, o.instruction) == ("crash", 6, "#UD", "ud2")
    assert o.location == "invalid_opcode"
    o = run_entry(cases, "divide_by_zero")
    assert (o.kind, o.vector, o.name) == ("crash", 0, "#DE")
    assert o.instruction is not None and o.instruction.startswith("div")


def test_a_crash_hook_counts_as_a_crash_when_reached(cases: Path) -> None:
    with fuzz.Target.from_elf(cases, entry="calls_report", crash_hooks=["report_bug"]) as t:
        assert t.run(b"fine").kind == "ok"
        o = t.run(b"!bug")
        assert (o.kind, o.hook, o.rip) == ("crash", "report_bug", t.symbols["report_bug"])
        assert "crash hook report_bug reached" in o.summary()
        assert t.run(b"fine").kind == "ok"
    with fuzz.Target.from_elf(cases, entry="calls_report") as t:
        assert t.run(b"!bug").kind == "ok"  # without the hook it is no crash


def test_after_a_crash_the_next_input_runs_at_cpl3(cases: Path) -> None:
    with fuzz.Target.from_elf(cases, entry="write_at", max_len=64) as t:
        full = t.cpu.stats()["full_restores"]
        assert t.run(struct.pack("<Q", 0)).kind == "crash"
        # The crash ended inside the ring-0 stubs; the restore put the vCPU back at CPL3.
        assert t.cpu.sregs.cs.selector & 3 == 3 and t.cpu.sregs.cs.dpl == 3
        assert t.cpu.regs == t.snapshot.regs(0)
        assert t.cpu.stats()["full_restores"] > full
        assert t.run(b"\0" * 7).kind == "ok"


def test_an_access_with_no_ram_behind_it_is_unmapped() -> None:
    # A hand-built target with the plain identity map: 0x400000 is mapped, but no RAM.
    code = bytes.fromhex("48c70700000000")  # mov qword [rdi], 0  (rdi: from the input)
    code = bytes.fromhex("488b3f") + code + bytes.fromhex("e6f4")  # mov rdi,[rdi]; ...; out
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD)
    with fuzz.Target(
        vm, cpu, vm.snapshot(), input_end=0x30000, max_len=8, symbols={"store": LONG_LOAD}
    ) as t:
        assert t.run(struct.pack("<Q", 0x20000)).kind == "ok"
        o = t.run(struct.pack("<Q", 0x400000))
        assert (o.kind, o.reason, o.address, o.is_write) == ("unmapped", "mmio", 0x400000, True)
        # RIP: the store itself, or (on KVMs that complete the access before the exit,
        # like the nested one `python -m kvmpy info` calls "software KVM") the next one.
        assert (o.rip, o.location) in ((LONG_LOAD + 3, "store+0x3"), (LONG_LOAD + 10, "store+0xa"))
        assert "unmapped write to 0x400000" in o.summary()
        assert t.run(struct.pack("<Q", 0x20000)).kind == "ok"


def checksummed(a: int, b: int, c: int, d: int) -> bytes:
    return b"KVC" + bytes([a, b, c, d, (a + b + c + d) & 0xFF])


def test_planted_bugs_each_crash_where_they_are(parser: Path) -> None:
    with fuzz.Target.from_elf(parser, entry="parse", max_len=512, timeout_ms=100) as t:
        assert t.run(b"KVL\x04abcd").kind == "ok"
        assert t.run(b"nope").code == 1
        null = t.run(b"BUG!")
        assert (null.kind, null.name, null.cr2) == ("crash", "#PF", 0)
        assert null.location.startswith("parse+")
        smash = t.run(b"KVL\x40" + b"A" * 0x40)  # returns to 0x4141414141414141
        assert smash.kind == "crash" and smash.name in ("#GP", "#PF")
        assert t.run(checksummed(ord("D"), 2, 1, 0)).code == 0
        assert t.run(checksummed(ord("D"), 2, 2, 0)[:-1] + b"\0").code == 2  # bad checksum
        assert t.run(checksummed(ord("E"), 2, 2, 0)).code == 2  # wrong tag
        div = t.run(checksummed(ord("D"), 2, 2, 0))
        assert (div.kind, div.name, div.location.split("+")[0]) == ("crash", "#DE", "parse")
        assert len({null.bucket, smash.bucket, div.bucket}) == 3


def test_the_compute_target_is_deterministic() -> None:
    elf = kvmpy.shipped_guest("fuzz_compute.elf")
    with fuzz.Target.from_elf(elf, entry="hash", max_len=256, timeout_ms=1000) as t:
        a, b = t.run(b"hello"), t.run(b"hellp")
        assert a.kind == b.kind == "ok" and a.code != b.code
        assert t.run(b"hello") == a


def test_the_decode_target_is_deterministic_and_has_its_bug() -> None:
    elf = kvmpy.shipped_guest("fuzz_decode.elf")
    with fuzz.Target.from_elf(elf, entry="decode", max_len=256, timeout_ms=2000) as t:
        a, b = t.run(b"hello"), t.run(b"hellp")
        assert a.kind == b.kind == "ok" and a.code != b.code
        assert t.run(b"hello") == a
        crash = t.run(b"DEC!")
        assert (crash.kind, crash.name, crash.cr2) == ("crash", "#PF", 0)
        assert crash.location.startswith("decode+")


def test_triage_keeps_the_smallest_input_per_bucket(parser: Path, tmp_path: Path) -> None:
    triage = fuzz.Triage()
    with fuzz.Target.from_elf(parser, entry="parse", max_len=512) as t:
        for data in (b"BUG!long", b"KVL\x01a", b"BUG!", b"BUG!xx", b"KVL\x30" + b"B" * 0x30):
            triage.add(data, t.run(data))
    assert len(triage.buckets) == 2
    null = next(b for b in triage.buckets.values() if b.outcome.cr2 == 0)
    assert (null.data, null.hits) == (b"BUG!", 3)
    report = triage.report()
    assert "3 input(s), smallest 4 byte(s)" in report and "#PF" in report
    dirs = triage.save(tmp_path / "crashes", "harness.py")
    assert sorted(p.name for p in (tmp_path / "crashes").iterdir()) == sorted(d.name for d in dirs)
    assert (dirs[0] / "input").is_file() and (dirs[0] / "report.txt").is_file()
    assert "replay harness.py" in (dirs[0] / "repro.txt").read_text()
    assert not [p for p in (tmp_path / "crashes").rglob(".*")], "no temporary files left"


HARNESS = """
from kvmpy import fuzz
target = fuzz.Target.from_elf({elf!r}, entry="parse", max_len=512, timeout_ms=100)
if __name__ == "__main__":
    raise SystemExit(fuzz.main(target))
"""


def test_replay_reproduces_a_crash_deterministically(parser: Path, tmp_path: Path) -> None:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS.format(elf=str(parser)))
    crash = tmp_path / "crash"
    crash.write_bytes(b"BUG!")
    cmd = [sys.executable, "-m", "kvmpy.fuzz", "replay", str(harness), str(crash)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr
    assert "crash #PF page fault at rip=" in first.stdout and "(parse+" in first.stdout
    assert first.stdout == second.stdout
    # The harness itself runs inputs through fuzz.main.
    ok = tmp_path / "ok"
    ok.write_bytes(b"KVL\x01a")
    out = subprocess.run(
        [sys.executable, str(harness), str(ok)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok (returned 0)" in out.stdout
    bad = subprocess.run(
        cmd[:-1] + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "no input file" in bad.stderr


def test_bad_targets_and_inputs_raise_clear_errors(cases: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entry symbol 'no_such_function' is not in"):
        fuzz.Target.from_elf(cases, entry="no_such_function")
    with pytest.raises(ValueError, match="crash hook 'nope' is not a symbol"):
        fuzz.Target.from_elf(cases, entry="returns_len", crash_hooks=["nope"])
    with pytest.raises(ValueError, match="input_arg|addr_reg"):
        fuzz.Target.from_elf(cases, entry="returns_len", input_arg="rip")
    not_elf = tmp_path / "x.elf"
    not_elf.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        fuzz.Target.from_elf(not_elf, entry="main")
    with fuzz.Target.from_elf(cases, entry="returns_len", max_len=16) as t:
        with pytest.raises(ValueError, match="17 bytes, longer than max_len \\(16\\)"):
            t.run(b"x" * 17)
        with pytest.raises(TypeError):
            t.run("text")  # type: ignore[arg-type]
        assert t.run(b"x" * 16).code == 16  # still usable


def test_user_map_is_checked() -> None:
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20)
        cpu = vm.create_vcpu()
        with pytest.raises(ValueError, match="NULL area"):
            cpu.setup_long_mode(user_map=[(0, 0x1000, "rx")])
        with pytest.raises(ValueError, match="overlaps kvmpy's tables"):
            cpu.setup_long_mode(user_map=[(0x20000, 0x1000, "rw")], tables_addr=0x20000)
        with pytest.raises(ValueError, match="not all in guest RAM"):
            cpu.setup_long_mode(user_map=[(0x100000, 4 << 20, "rw")])
        with pytest.raises(ValueError, match="permissions"):
            cpu.setup_long_mode(user_map=[(0x100000, 0x1000, "rwz")])
        with pytest.raises(ValueError, match="huge_pages"):
            cpu.setup_long_mode(user_map=[(0x100000, 0x1000, "rw")], huge_pages=True)


def test_an_unmapped_read_and_an_unhandled_port_then_clean_runs() -> None:
    # mov rdi, [rdi] ; mov rax, [rdi] ; in al, 0x10 ; out 0xf4, al
    code = bytes.fromhex("488b3f488b07e410e6f4")
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, code)
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD)
    with fuzz.Target(vm, cpu, vm.snapshot(), input_end=0x30000, max_len=8) as t:
        for _ in range(2):  # neither leaves the vCPU waiting for an answer
            o = t.run(struct.pack("<Q", 0x400000))
            assert (o.kind, o.address, o.is_write) == ("unmapped", 0x400000, False)
            o = t.run(struct.pack("<Q", 0x20000))
            assert (o.kind, o.reason, o.rip, o.instruction) == (
                "other",
                "io",
                0x10006,
                "in al, 0x10",
            )


def test_extra_memory_is_mapped_with_its_permissions(cases: Path) -> None:
    extra = [(0x400000, 0x2000, "rw"), (0x500000, 0x1000, "r")]
    with fuzz.Target.from_elf(cases, entry="write_at", extra_memory=extra) as t:
        assert t.run(struct.pack("<Q", 0x401FF8)).kind == "ok"
        page_fault(t.run(struct.pack("<Q", 0x402000)), 0x402000, write=True, present=False)
        page_fault(t.run(struct.pack("<Q", 0x500000)), 0x500000, write=True, present=True)
        assert t.vm.read(0x401FF8, 8) == bytes(8), "restored"
    with pytest.raises(ValueError, match="NULL area"):
        fuzz.Target.from_elf(cases, entry="write_at", extra_memory=[(0x0, 0x1000, "rw")])
