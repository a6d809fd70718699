"""kvmpy.fuzz block coverage: blocks from disassembly, symbols or a list; one exit per
block per campaign in "once" mode, hit counts in "armed" mode; no patch byte ever shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvmpy
from kvmpy import fuzz
from kvmpy._native import FuzzExecutor, _debug_support, _find_blocks

from .support import EXIT_PORT, LONG_LOAD, raw

pytestmark = pytest.mark.kvm

# The inputs of a small campaign on fuzz_parser, from shallow to deep.
CAMPAIGN = [b"nope", b"KV", b"KVX", b"KVL\x04abcd", b"KVC", b"BUG!", b"KVCD\x02\x01\x00\x47"]

# xor eax, eax ; mov ecx, 5 ; L: inc eax ; dec ecx ; jnz L ; inc eax ; out 0xf4, eax
LOOP = bytes.fromhex("31c0b905000000ffc0ffc975faffc0e7f4")
LOOP_BLOCKS = [LONG_LOAD, LONG_LOAD + 7, LONG_LOAD + 0xD]


@pytest.fixture(scope="module")
def parser(guest_dir: Path) -> Path:
    return guest_dir.parent / "c" / "build" / "fuzz_parser.elf"


def parser_target(elf: Path, **kw: object) -> fuzz.Target:
    return fuzz.Target.from_elf(elf, entry="parse", max_len=512, timeout_ms=200, **kw)  # type: ignore[arg-type]


def loop_target(user: bool, mode: str) -> fuzz.Target:
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, LOOP)
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=user, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD, rsp=0x80000)  # at ring 0, #BP and #DB frames go there
    return fuzz.Target(
        vm,
        cpu,
        vm.snapshot(),
        input_end=0x30000,
        max_len=8,
        coverage=LOOP_BLOCKS,
        coverage_mode=mode,
    )


def test_deeper_inputs_cover_more_blocks(parser: Path) -> None:
    with parser_target(parser, coverage="disasm") as t:
        assert t.coverage_blocks > 20
        assert t.coverage_mechanism == _debug_support()["breakpoints"]
        seen: set[int] = set()
        counts = []
        for data in CAMPAIGN:
            o = t.run(data)
            assert not seen & set(o.new_coverage), "a block is new once"
            assert list(o.new_coverage) == sorted(o.new_coverage)
            seen |= set(o.new_coverage)
            counts.append(t.blocks_covered)
        assert t.blocks_covered == len(seen)
        assert counts == sorted(counts) and counts[0] < counts[1] < counts[3]
        # The record parser goes deeper than the rejection: it found more new blocks.
        shallow = len(t.run(b"no").new_coverage)
        assert shallow == 0
        assert t.symbols["copy_record"] in seen, "the call into copy_record was followed"
        # The map: one slot per covered block (nothing else).
        cmap = t.coverage_map
        assert cmap is not None and len(cmap) == 65536
        assert 0 < sum(1 for b in cmap if b) <= len(seen)
        assert sum(cmap) == len(seen), "once mode: one count per block"


def test_each_block_costs_one_exit_for_the_whole_campaign(parser: Path, mechanism: str) -> None:
    with parser_target(parser) as plain:
        before = plain.cpu.stats()["exits"]
        plain_outcomes = [plain.run(d) for d in CAMPAIGN]
        plain_exits = plain.cpu.stats()["exits"] - before
    with parser_target(parser, coverage="disasm") as t:
        before = t.cpu.stats()["exits"]
        outcomes = [t.run(d) for d in CAMPAIGN]
        exits = t.cpu.stats()["exits"] - before
        assert outcomes == plain_outcomes, "coverage changes no outcome"
        assert exits == plain_exits + t.blocks_covered
        # Again: every block covered is out for good, also after the restores.
        before = t.cpu.stats()["exits"]
        assert [t.run(d) for d in CAMPAIGN] == plain_outcomes
        assert t.cpu.stats()["exits"] - before == plain_exits
        assert all(not t.run(d).new_coverage for d in CAMPAIGN)


def test_no_patch_byte_is_ever_shown(parser: Path, tmp_path: Path) -> None:
    with parser_target(parser) as plain:
        parse = plain.symbols["parse"]
        clean = plain.snapshot.read(parse, 0x100)
    with parser_target(parser, coverage="disasm") as t:
        region = t.vm.memory_regions[0]
        patch = 0xCC if t.coverage_mechanism != "port-io" else 0xEE
        assert raw(region, parse, 1) == bytes([patch]), "the patch is in memory"
        assert t.vm.read(parse, 0x100) == clean
        assert t.snapshot.read(parse, 0x100) == clean
        assert t.vm.snapshot().read(parse, 0x100) == clean
        t.snapshot.save(tmp_path / "a.snap")
        t.vm.snapshot().save(tmp_path / "b.snap")
        for name in ("a.snap", "b.snap"):
            assert kvmpy.Snapshot.load(tmp_path / name).read(parse, 0x100) == clean
        # Covered: the original byte is back in memory, and a restore keeps it there.
        t.run(b"nope")
        assert raw(region, parse, 1) == clean[:1]
        t.vm.restore(t.snapshot)
        assert t.run(b"nope").new_coverage == ()
        assert raw(region, parse, 1) == clean[:1]
        # After a restore to the user's snapshot (no patches), a run still counts the
        # blocks it covers first: the target goes back to its patched copy first.
        t.vm.restore(t.snapshot)
        assert t.run(b"KVL\x01a").new_coverage


# Every mechanism this host can use: kvmpy's choice, and each forced.
MECHANISMS = ["chosen", "exception-stubs", "port-io"]


@pytest.fixture(params=MECHANISMS)
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param != "chosen":
        monkeypatch.setenv("KVMPY_BREAKPOINT_MECHANISM", request.param)
        return str(request.param)
    # kvmpy's choice, unless the environment of the whole run picks one.
    return os.environ.get("KVMPY_BREAKPOINT_MECHANISM") or "chosen"


@pytest.mark.parametrize("user", [True, False], ids=["user", "ring0"])
@pytest.mark.parametrize("mode", ["once", "armed"])
def test_a_block_runs_its_own_first_instruction(user: bool, mode: str, mechanism: str) -> None:
    # Each block starts with `inc eax`: the guest returns 6 only if each ran exactly once
    # per pass, with a breakpoint on it or not.
    with loop_target(user, mode) as t:
        if mechanism != "chosen":
            assert t.coverage_mechanism == mechanism
        for i in range(3):
            o = t.run(b"")
            if (mechanism, user, o.kind) == ("exception-stubs", False, "internal_error"):
                # A host that emulates ring-0 code (a nested software KVM) whose emulator
                # cannot run int3: an emulation failure at the block. kvmpy's own choice
                # there is the port-I/O patch, which works at ring 0 too.
                assert o.rip == LOOP_BLOCKS[0] and o.instruction == "xor eax, eax"
                return
            assert (o.kind, o.code) == ("ok", 6), o.summary()
            if mode == "once":
                assert o.new_coverage == (tuple(LOOP_BLOCKS) if i == 0 else ())
        assert t.blocks_covered == 3


def test_armed_mode_counts_every_hit() -> None:
    with loop_target(True, "armed") as t:
        for _ in range(2):
            before = t.cpu.stats()["exits"]
            assert t.run(b"").code == 6
            cmap = t.coverage_map
            assert cmap is not None
            # Edges: entry, entry -> loop, loop -> loop (4 times), loop -> end.
            assert sorted(b for b in cmap if b) == [1, 1, 1, 4]
            assert t.cpu.stats()["exits"] - before >= 1 + 7, "every hit exits"
    with loop_target(True, "once") as t:
        t.run(b"")
        assert t.coverage_map is not None and sum(t.coverage_map) == 3


def test_symbols_and_lists_of_blocks(parser: Path) -> None:
    with parser_target(parser, coverage="symbols") as t:
        functions = set(t.symbols.values())
        assert t.coverage_blocks >= 3
        new = t.run(b"KVL\x01a").new_coverage
        assert {t.symbols["parse"], t.symbols["copy_record"]} <= set(new) <= functions
    with parser_target(
        parser, coverage=["parse", "copy_record"], coverage_mode="armed", map_size=1024
    ) as t:
        assert t.coverage_blocks == 2
        assert t.run(b"nope").new_coverage == (t.symbols["parse"],)
        assert t.coverage_map is not None and len(t.coverage_map) == 1024


def test_a_crash_hook_on_a_block_still_crashes(parser: Path) -> None:
    elf = parser.parent / "fuzz_cases.elf"
    with fuzz.Target.from_elf(
        elf, entry="calls_report", crash_hooks=["report_bug"], coverage="disasm"
    ) as t:
        assert t.run(b"fine").kind == "ok"
        for _ in range(2):
            o = t.run(b"!bug")
            assert (o.kind, o.hook) == ("crash", "report_bug")


def test_data_in_the_code_segment_is_never_patched(parser: Path) -> None:
    # fuzz_cases' lookup_table (a symbol, data in the read-only executable segment) holds
    # bytes that decode as calls and jumps: only function symbols start the disassembly.
    elf = parser.parent / "fuzz_cases.elf"
    with fuzz.Target.from_elf(elf, entry="table_lookup", coverage="disasm") as t:
        table = t.symbols["lookup_table"]
        clean = t.snapshot.read(table, 16)
        assert raw(t.vm.memory_regions[0], table, 16) == clean, "no patch in the table"
        assert [t.run(bytes([i])).code for i in range(16)] == list(clean)


def test_without_coverage_there_is_no_map(parser: Path) -> None:
    with parser_target(parser) as t:
        assert (t.coverage_map, t.blocks_covered, t.coverage_blocks) == (None, 0, 0)
        assert t.coverage_mechanism is None and t.run(b"KV").new_coverage == ()


def _debug_support_without_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | bool]:
    with monkeypatch.context() as m:
        m.delenv("KVMPY_BREAKPOINT_MECHANISM", raising=False)
        return _debug_support()


def test_a_mechanism_that_cannot_work_is_refused(
    parser: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMPY_BREAKPOINT_MECHANISM", "carrier-pigeon")
    with pytest.raises(ValueError, match="KVMPY_BREAKPOINT_MECHANISM must be"):
        parser_target(parser, coverage="disasm")
    with pytest.raises(ValueError, match="KVMPY_BREAKPOINT_MECHANISM must be"):
        _debug_support()
    if _debug_support_without_env(monkeypatch)["mechanism"] != "kvm":
        monkeypatch.setenv("KVMPY_BREAKPOINT_MECHANISM", "kvm")
        with pytest.raises(kvmpy.KvmUnsupported, match="does not intercept int3"):
            parser_target(parser, coverage="disasm")
    monkeypatch.delenv("KVMPY_BREAKPOINT_MECHANISM")
    with parser_target(parser, coverage="disasm") as t:
        assert t.run(b"KV").new_coverage


def test_bad_coverage_arguments_raise_clear_errors(parser: Path) -> None:
    with pytest.raises(ValueError, match="power of two"):
        parser_target(parser, coverage="disasm", map_size=1000)
    with pytest.raises(ValueError, match="coverage_mode"):
        parser_target(parser, coverage="disasm", coverage_mode="sometimes")
    with pytest.raises(ValueError, match='"disasm", "symbols"'):
        parser_target(parser, coverage="everything")
    with pytest.raises(ValueError, match="outside the target's code"):
        parser_target(parser, coverage=[0x400000])
    with pytest.raises(ValueError, match="not a symbol"):
        parser_target(parser, coverage=["no_such_block"])
    with parser_target(parser) as t:
        inside = t.symbols["parse"] + 1  # inside its first instruction
    with pytest.raises(ValueError, match="not at the start of an instruction"):
        parser_target(parser, coverage=[inside])
    with pytest.raises(TypeError, match="address or a symbol"):
        parser_target(parser, coverage=[1.5])
    # The engine's own checks, for targets built by hand.
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(LONG_LOAD, LOOP)
    vm.add_exit_port(EXIT_PORT)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True)
    cpu.set_regs(rip=LONG_LOAD)
    snap = vm.snapshot()
    kw: dict[str, object] = {"input_end": 0x30000, "max_len": 8}
    with vm:
        with pytest.raises(ValueError, match="is not mapped"):
            FuzzExecutor(vm, cpu, snap, coverage=[1 << 46], **kw)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least one block"):
            FuzzExecutor(vm, cpu, snap, coverage=[], **kw)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="power of two"):
            FuzzExecutor(vm, cpu, snap, coverage=[LONG_LOAD], map_size=3, **kw)  # type: ignore[arg-type]
        first = FuzzExecutor(vm, cpu, snap, coverage=[LONG_LOAD], **kw)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="has block coverage already"):
            FuzzExecutor(vm, cpu, snap, coverage=[LONG_LOAD], **kw)  # type: ignore[arg-type]
        assert first.run(b"")[0].code == 6
        del first
        # Gone with its executor: the VM runs as before, with no patch in memory.
        assert raw(vm.memory_regions[0], LONG_LOAD, len(LOOP)) == LOOP
        again = FuzzExecutor(vm, cpu, snap, coverage=[LONG_LOAD + 7], **kw)  # type: ignore[arg-type]
        assert again.run(b"")[2] == [LONG_LOAD + 7]


def test_find_blocks_follows_branches_and_flags_bad_addresses() -> None:
    starts, insns, bad = _find_blocks(LOOP, LONG_LOAD, [LONG_LOAD], [LONG_LOAD + 8, LONG_LOAD + 9])
    assert starts == LOOP_BLOCKS
    assert insns == [LONG_LOAD + o for o in (0, 2, 7, 9, 0xB, 0xD, 0xF)]
    assert bad == [LONG_LOAD + 8]


def test_info_names_the_coverage_mechanism() -> None:
    from kvmpy.__main__ import debugging

    d = _debug_support()
    assert d["breakpoints"] in ("kvm", "port-io", "exception-stubs")
    assert f"fuzzing coverage in user mode: {d['breakpoints']} (" in debugging()
