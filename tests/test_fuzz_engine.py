"""The in-process fuzzer: LibAFL over a kvmpy Target, the harness CLI (`--corpus`,
`--out`, `--executions`, `--jobs`), findings saved whole, bad arguments refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy import fuzz

pytestmark = pytest.mark.kvm

SEEDS = [b"KVL\x01a", b"KVCD\x01\x02\x03\x00"]
"""What a user would start from: one well-formed record of each type."""


@pytest.fixture(scope="module")
def parser(guest_dir: Path) -> Path:
    return guest_dir.parent / "c" / "build" / "fuzz_parser.elf"


def parser_target(parser: Path, **kw: object) -> fuzz.Target:
    return fuzz.Target.from_elf(  # type: ignore[arg-type]
        parser, entry="parse", max_len=64, timeout_ms=100, coverage="disasm", **kw
    )


def planted(outcome: fuzz.Outcome) -> str | None:
    """Which planted bug of fuzz_parser.c an outcome is."""
    if outcome.name == "#DE" and outcome.location.startswith("parse+"):
        return "division"
    if outcome.name == "#PF" and outcome.cr2 == 0 and outcome.location.startswith("parse+"):
        return "null-write"
    if outcome.is_crash and outcome.kind == "crash":
        return "stack-overflow"  # copy_record's 16-byte buffer: a smashed return address
    return None


def test_the_fuzzer_finds_every_planted_bug_within_bounded_executions(parser: Path) -> None:
    found: dict[str, int] = {}
    with parser_target(parser) as target:
        fuzzer = fuzz.Fuzzer(target, seeds=SEEDS, seed=1)
        stats = fuzzer.run(executions=300_000)
        for bucket in fuzzer.triage.buckets.values():
            bug = planted(bucket.outcome)
            if bug is not None:
                found[bug] = found.get(bug, 0) + 1
        # Each bucket's input reproduces its crash.
        for key, bucket in fuzzer.triage.buckets.items():
            assert target.run(bucket.data).bucket == key
    assert set(found) == {"division", "null-write", "stack-overflow"}, (found, stats)
    assert stats.executions >= 300_000
    assert stats.crash_buckets >= len(fuzzer.triage.buckets) - 1  # timeouts share one
    assert stats.blocks_covered == target.coverage_blocks or stats.blocks_covered >= 30
    assert stats.corpus >= 8


def test_the_same_seed_gives_the_same_campaign(parser: Path) -> None:
    def campaign(seed: int) -> tuple[int, int, int, list[bytes]]:
        with parser_target(parser) as target:
            f = fuzz.Fuzzer(target, seeds=SEEDS, seed=seed)
            s = f.run(executions=15_000)
            inputs = sorted(b.data for b in f.triage.buckets.values())
            return s.corpus, s.crashes, s.last_new_coverage, inputs

    assert campaign(7) == campaign(7)
    assert campaign(7) != campaign(8)


def test_a_status_callback_sees_progress_and_can_stop_the_campaign(parser: Path) -> None:
    seen: list[fuzz.FuzzStats] = []

    def status(s: fuzz.FuzzStats) -> bool:
        seen.append(s)
        return s.executions < 2_000

    with parser_target(parser) as target:
        stats = fuzz.Fuzzer(target, seeds=SEEDS).run(status=status, status_every=0)
    assert seen and seen[-1].executions >= 2_000
    assert stats.executions < 1_000_000
    assert [s.executions for s in seen] == sorted(s.executions for s in seen)
    assert "execs" in stats.line(40) and "/40" in stats.line(40)


def test_an_exception_in_a_callback_ends_the_campaign_with_it(parser: Path) -> None:
    def status(s: fuzz.FuzzStats) -> None:
        raise RuntimeError("stop here")

    with parser_target(parser) as target:
        with pytest.raises(RuntimeError, match="stop here"):
            fuzz.Fuzzer(target, seeds=SEEDS).run(status=status, status_every=0)
        # The target is still usable.
        assert target.run(b"KVL\x01a").kind == "ok"


def test_campaign_arguments_are_checked(parser: Path) -> None:
    with parser_target(parser) as target:
        ex = target._executor
        with pytest.raises(ValueError, match="executions, duration or an on_status"):
            ex.fuzz([b"x"])
        with pytest.raises(ValueError, match="duration"):
            ex.fuzz([b"x"], duration=-1)
        with pytest.raises(ValueError, match="status_every"):
            ex.fuzz([b"x"], executions=1, status_every=float("nan"))
        with pytest.raises(TypeError):
            ex.fuzz(["text"], executions=1)  # type: ignore[list-item]
        with pytest.raises(ValueError, match="worker name"):
            ex.fuzz([b"x"], executions=1, sync_dir="/tmp", worker="../up")
        # Seeds longer than max_len are cut, not refused.
        stats = fuzz.Fuzzer(target, seeds=[b"K" * 1000]).run(executions=10)
        assert stats.executions >= 10


HARNESS = """
import sys
from kvmpy import fuzz
target = fuzz.Target.from_elf({elf!r}, entry="parse", max_len=64, timeout_ms=100,
                              coverage="disasm")
if __name__ == "__main__":
    sys.exit(fuzz.main(target))
"""


def harness_in(tmp_path: Path, parser: Path) -> tuple[Path, Path]:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS.format(elf=str(parser)))
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i, s in enumerate(SEEDS):
        (seeds / f"seed{i}").write_bytes(s)
    return harness, seeds


def run_harness(
    harness: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(harness), *args], capture_output=True, text=True, timeout=timeout
    )


def check_findings(out: Path, harness: Path) -> list[Path]:
    """Every bucket directory is whole: an input, its report, a reproducer that gives
    the same report."""
    buckets = sorted(p for p in (out / "crashes").iterdir() if not p.name.startswith("."))
    for d in buckets:
        assert {p.name for p in d.iterdir() if not p.name.startswith(".")} == {
            "input",
            "report.txt",
            "repro.txt",
        }
        repro = (d / "repro.txt").read_text().split()
        assert repro[:4] == ["python", "-m", "kvmpy.fuzz", "replay"]
        replay = subprocess.run(
            [sys.executable, *repro[1:]], capture_output=True, text=True, timeout=120
        )
        assert replay.returncode == 1, replay.stderr
        assert (d / "report.txt").read_text() in replay.stdout
    return buckets


def test_the_harness_cli_fuzzes_and_saves_reproducible_findings(
    parser: Path, tmp_path: Path
) -> None:
    harness, seeds = harness_in(tmp_path, parser)
    out = tmp_path / "findings"
    r = run_harness(
        harness, "--corpus", str(seeds), "--out", str(out), "--executions", "150000", "--seed", "1"
    )
    assert r.returncode == 1, r.stderr  # crashes found
    assert "execs" in r.stderr and "crashes" in r.stderr
    buckets = check_findings(out, harness)
    assert buckets
    assert len(list((out / "queue").iterdir())) >= 3


def test_jobs_run_workers_that_share_one_corpus(parser: Path, tmp_path: Path) -> None:
    harness, seeds = harness_in(tmp_path, parser)
    out = tmp_path / "findings"
    r = run_harness(
        harness,
        "--corpus",
        str(seeds),
        "--out",
        str(out),
        "--executions",
        "20000",
        "--jobs",
        "2",
    )
    assert r.returncode in (0, 1), r.stderr
    assert "[w0]" in r.stderr and "[w1]" in r.stderr
    names = [p.name for p in (out / "queue").iterdir()]
    assert any(n.startswith("w0-") for n in names) and any(n.startswith("w1-") for n in names)
    if (out / "crashes").exists():
        check_findings(out, harness)


def test_a_harness_killed_mid_run_leaves_whole_findings(parser: Path, tmp_path: Path) -> None:
    harness, seeds = harness_in(tmp_path, parser)
    out = tmp_path / "findings"
    proc = subprocess.Popen(
        [sys.executable, str(harness), "--corpus", str(seeds), "--out", str(out), "--seed", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            crashes = out / "crashes"
            if crashes.is_dir() and len(list(crashes.iterdir())) >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert check_findings(out, harness)


def test_the_harness_cli_refuses_bad_arguments(parser: Path, tmp_path: Path) -> None:
    harness, seeds = harness_in(tmp_path, parser)
    r = run_harness(harness, "--corpus", str(tmp_path / "missing"), "--executions", "10")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_harness(harness, "--corpus", str(seeds / "seed0"), "--executions", "10")
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_harness(harness, "--jobs", "2", "--executions", "10")
    assert r.returncode == 2 and "--jobs needs --out" in r.stderr
    r = run_harness(harness, "--jobs", "0", "--executions", "10")
    assert r.returncode == 2 and "--jobs" in r.stderr
    r = run_harness(harness, "--duration", "-1")
    assert r.returncode == 2 and "--duration" in r.stderr
    # A corpus file that cannot be read (even by root: reading /proc/self/mem at 0 fails).
    (seeds / "unreadable").symlink_to("/proc/self/mem")
    r = run_harness(harness, "--corpus", str(seeds), "--executions", "10")
    assert r.returncode == 2 and "cannot read the corpus file" in r.stderr
    assert "unreadable" in r.stderr
