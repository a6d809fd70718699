"""A harness script under AFL++'s afl-fuzz: the fork server in persistent mode, coverage
into afl-fuzz's map, crashes and hangs reported as afl-fuzz expects, and the crashes it
saves replayed by ``python -m kvmpy.fuzz replay``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support import wait_until

pytestmark = pytest.mark.kvm

AFL = shutil.which("afl-fuzz")
needs_afl = pytest.mark.skipif(AFL is None, reason="afl-fuzz is not installed (apt: afl++)")

HARNESS = """
from kvmpy import fuzz
target = fuzz.Target.from_elf({elf!r}, entry={entry!r}, max_len=512, timeout_ms=100,
                              coverage="disasm")
if __name__ == "__main__":
    raise SystemExit(fuzz.main(target))
"""

AFL_ENV = {
    "AFL_SKIP_BIN_CHECK": "1",  # the target is a Python script
    "AFL_NO_UI": "1",
    "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1",
    "AFL_SKIP_CPUFREQ": "1",
    "AFL_NO_AFFINITY": "1",
}


def afl_fuzz(
    tmp: Path,
    elf: Path,
    entry: str,
    seeds: list[bytes],
    seconds: int,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Path:
    """Runs afl-fuzz on a harness for ``elf``'s ``entry`` for at most ``seconds``; returns
    its output directory (``default/`` of ``-o``)."""
    harness = tmp / "harness.py"
    harness.write_text(HARNESS.format(elf=str(elf), entry=entry))
    seeds_dir = tmp / "in"
    seeds_dir.mkdir()
    for i, seed in enumerate(seeds):
        (seeds_dir / f"seed{i}").write_bytes(seed)
    assert AFL is not None
    cmd = [AFL, "-D", "-V", str(seconds), "-i", str(seeds_dir), "-o", str(tmp / "out"), *extra]
    cmd += ["--", sys.executable, str(harness), "@@"]
    run = subprocess.run(
        cmd,
        env=os.environ | AFL_ENV | (env or {}),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # They go as they notice afl-fuzz is gone (a child tears its VM down first).
    wait_until(lambda: not harness_processes(harness), "the fork server and its children to end")
    return tmp / "out" / "default"


def harness_processes(harness: Path) -> list[int]:
    """The processes still running ``harness``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(harness).encode() in cmdline:
            found.append(int(proc.name))
    return found


def saved(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("id:"))


def stats(out: Path) -> dict[str, str]:
    lines = (out / "fuzzer_stats").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


@needs_afl
def test_afl_fuzz_finds_the_parser_crash_and_replay_reproduces_it(
    guest_dir: Path, tmp_path: Path
) -> None:
    elf = guest_dir.parent / "c" / "build" / "fuzz_parser.elf"
    until_crash = {"AFL_BENCH_UNTIL_CRASH": "1"}  # stop at the first crash
    out = afl_fuzz(tmp_path, elf, "parse", [b"BUG#", b"KVL\x02ab"], 60, env=until_crash)
    crashes = saved(out / "crashes")
    assert crashes, "afl-fuzz found no crash"
    assert int(stats(out)["corpus_count"]) >= 2
    replay = [sys.executable, "-m", "kvmpy.fuzz", "replay", str(tmp_path / "harness.py")]
    first = subprocess.run([*replay, str(crashes[0])], capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stdout + first.stderr
    assert re.search(r"crash #(PF|GP|DE) ", first.stdout), first.stdout
    again = subprocess.run([*replay, str(crashes[0])], capture_output=True, text=True, timeout=120)
    assert again.stdout == first.stdout


@needs_afl
def test_afl_fuzz_kills_on_timeouts_and_the_fork_server_goes_on(
    guest_dir: Path, tmp_path: Path
) -> None:
    # hangs_or_crashes: "HA..." hangs, "CR..." crashes. From "CA", afl-fuzz's arithmetic
    # stage reaches both, the hang first (byte 0 is tried before byte 1); each hang makes
    # afl-fuzz kill the child, and the fork server starts a new one for the next input.
    # The run ends at the first crash (however long a loaded machine takes to get there).
    elf = guest_dir.parent / "c" / "build" / "fuzz_cases.elf"
    until_crash = {"AFL_BENCH_UNTIL_CRASH": "1"}
    out = afl_fuzz(tmp_path, elf, "hangs_or_crashes", [b"CA"], 120, "-t", "300", env=until_crash)
    hangs, crashes = saved(out / "hangs"), saved(out / "crashes")
    assert hangs and crashes, stats(out)
    assert all(h.read_bytes().startswith(b"HA") for h in hangs)
    assert all(c.read_bytes().startswith(b"CR") for c in crashes)

    def execs(p: Path) -> int:
        return int(re.search(r"execs:(\d+)", p.name).group(1))  # type: ignore[union-attr]

    assert execs(crashes[0]) > execs(hangs[0]), "fuzzing went on after the hang"


def test_a_target_without_rebuild_is_refused_under_afl_fuzz(tmp_path: Path) -> None:
    harness = tmp_path / "harness.py"
    harness.write_text(
        "import kvmpy\n"
        "from kvmpy import fuzz\n"
        "vm = kvmpy.Vm()\n"
        "vm.add_memory(0, 2 << 20).write(0x10000, bytes.fromhex('e6f4'))\n"
        "vm.add_exit_port(0xF4)\n"
        "cpu = vm.create_vcpu()\n"
        "cpu.setup_long_mode(user=True, exceptions=True)\n"
        "cpu.set_regs(rip=0x10000)\n"
        "target = fuzz.Target(vm, cpu, vm.snapshot(), input_end=0x30000, max_len=8)\n"
        "raise SystemExit(fuzz.main(target))\n"
    )
    # Started as afl-fuzz starts a fork server: its two pipes at fds 198 and 199.
    shell = 'exec "$0" "$1" 198</dev/null 199>/dev/null'
    run = subprocess.run(
        ["bash", "-c", shell, sys.executable, str(harness)],
        env=os.environ | {"__AFL_SHM_ID": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "target.rebuild" in run.stderr


class FakeAfl:
    """afl-fuzz's side of the forkserver protocol, driven by a test: the two pipes at the
    harness's fds 198 and 199, a System V segment for the coverage map, inputs in a
    file (``@@``)."""

    IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0

    def __init__(
        self,
        tmp: Path,
        elf: Path,
        entry: str,
        armed: bool = False,
        shm_input: bool = False,
        stats: Path | None = None,
    ) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.shmat.restype = ctypes.c_void_p
        self.libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.shm_id = self.libc.shmget(self.IPC_PRIVATE, 1 << 16, self.IPC_CREAT | 0o600)
        assert self.shm_id >= 0
        self.map_addr = self.libc.shmat(self.shm_id, None, 0)
        env = {"__AFL_SHM_ID": str(self.shm_id)}
        if stats is not None:
            env["KVMPY_AFL_STATS"] = str(stats)
        self.fuzz_id = -1
        if shm_input:  # afl-fuzz's input segment: a u32 length, then the bytes
            self.fuzz_id = self.libc.shmget(self.IPC_PRIVATE, 4 + 4096, self.IPC_CREAT | 0o600)
            assert self.fuzz_id >= 0
            self.fuzz_addr = self.libc.shmat(self.fuzz_id, None, 0)
            env["__AFL_SHM_FUZZ_ID"] = str(self.fuzz_id)
        self.harness = tmp / "harness.py"
        harness = HARNESS.format(elf=str(elf), entry=entry)
        if armed:
            armed_mode = 'coverage="disasm", coverage_mode="armed"'
            harness = harness.replace('coverage="disasm"', armed_mode)
        self.harness.write_text(harness)
        self.input = tmp / "input"
        ctl_r, self.ctl = os.pipe()
        self.st, st_w = os.pipe()
        shell = f'exec "$0" "$1" "$2" 198<&{ctl_r} 199>&{st_w} {ctl_r}<&- {st_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, sys.executable, str(self.harness), str(self.input)],
            pass_fds=(ctl_r, st_w),
            env=os.environ | env,
        )
        os.close(ctl_r)
        os.close(st_w)

    def read_u32(self) -> int:
        data = b""
        while len(data) < 4:
            chunk = os.read(self.st, 4 - len(data))
            assert chunk, "the fork server closed its status pipe"
            data += chunk
        return int.from_bytes(data, "little")

    def start(self, data: bytes, was_killed: int = 0) -> int:
        """Begins a round: clears the map, writes the input and the control word;
        returns the pid afl-fuzz would kill on a timeout."""
        import ctypes

        ctypes.memset(self.map_addr, 0, 1 << 16)
        if self.fuzz_id >= 0:
            ctypes.memmove(self.fuzz_addr, len(data).to_bytes(4, "little") + data, 4 + len(data))
        else:
            self.input.write_bytes(data)
        os.write(self.ctl, was_killed.to_bytes(4, "little"))
        return self.read_u32()

    def trace(self) -> bytes:
        import ctypes

        return ctypes.string_at(self.map_addr, 1 << 16)

    def close(self) -> int:
        os.close(self.ctl)
        code = self.proc.wait(timeout=60)
        os.close(self.st)
        self.libc.shmdt(ctypes_void(self.map_addr))
        self.libc.shmctl(self.shm_id, self.IPC_RMID, None)
        if self.fuzz_id >= 0:
            self.libc.shmdt(ctypes_void(self.fuzz_addr))
            self.libc.shmctl(self.fuzz_id, self.IPC_RMID, None)
        return code


def ctypes_void(addr: int) -> object:
    import ctypes

    return ctypes.c_void_p(addr)


def test_the_child_answers_afl_fuzz_itself_and_the_server_reports_a_timeout_kill(
    guest_dir: Path, tmp_path: Path
) -> None:
    import signal

    from kvmpy import fuzz

    elf = guest_dir.parent / "c" / "build" / "fuzz_cases.elf"
    with fuzz.Target.from_elf(
        str(elf), entry="hangs_or_crashes", max_len=512, timeout_ms=100, coverage="disasm"
    ) as t:
        blocks = t.coverage_blocks
    afl = FakeAfl(tmp_path, elf, "hangs_or_crashes", stats=tmp_path / "stats")
    try:
        hello = afl.read_u32()
        # FS_OPT_ENABLED | FS_OPT_MAPSIZE, the map a byte per block rounded up to 64.
        assert hello & 0x80000001 == 0x80000001 and hello & 0x40000000
        map_size = ((hello & 0x00FFFFFE) >> 1) + 1
        assert map_size == (blocks + 63) // 64 * 64
        assert not hello & 0x01000000, "no input shared memory was offered"

        child = afl.start(b"CA")
        assert child not in (afl.proc.pid, 0)
        assert afl.read_u32() == 0
        first = afl.trace()
        assert 0 < first.count(1) <= blocks and not any(first[map_size:])

        # A crash: a status that reads as killed by SIGSEGV, and the same child goes on.
        assert afl.start(b"CRASH") == child
        status = afl.read_u32()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        crash = afl.trace()
        assert crash.count(1) >= first.count(1), "once mode: every covered block, each time"
        assert afl.start(b"CA") == child and afl.read_u32() == 0

        # A hang: no answer until afl-fuzz kills the child; the fork server reports
        # that, and the next round runs in a new child.
        assert afl.start(b"HANG") == child
        os.kill(child, signal.SIGKILL)
        status = afl.read_u32()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        second = afl.start(b"CA", was_killed=1)
        assert second not in (child, afl.proc.pid, 0)
        assert afl.read_u32() == 0
        assert afl.start(b"CRASH") == second
        status = afl.read_u32()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    finally:
        code = afl.close()
    assert code == 0
    wait_until(
        lambda: not harness_processes(afl.harness), "the fork server and its children to end"
    )
    # Both children counted every input they finished, in the file that outlives them:
    # five (the hang was killed before its run ended).
    runs, mean_us = fuzz.read_afl_stats(tmp_path / "stats")
    assert runs == 5
    assert mean_us > 0


def test_a_hanging_child_and_its_fork_server_end_when_afl_fuzz_goes_away(
    guest_dir: Path, tmp_path: Path
) -> None:
    elf = guest_dir.parent / "c" / "build" / "fuzz_cases.elf"
    afl = FakeAfl(tmp_path, elf, "hangs_or_crashes")
    try:
        afl.read_u32()  # the hello
        child = afl.start(b"HANG")
        assert child not in (afl.proc.pid, 0)
    finally:
        code = afl.close()  # without killing the child, nor reading a status
    assert code == 0
    wait_until(
        lambda: not harness_processes(afl.harness), "the fork server and its children to end"
    )


def test_armed_coverage_gives_afl_fuzz_each_inputs_edge_counts(
    guest_dir: Path, tmp_path: Path
) -> None:
    elf = guest_dir.parent / "c" / "build" / "fuzz_parser.elf"
    afl = FakeAfl(tmp_path, elf, "parse", armed=True)
    try:
        hello = afl.read_u32()
        assert hello & 0x40000000 and ((hello & 0x00FFFFFE) >> 1) + 1 == 65536  # map_size
        maps = []
        for data in (b"nope", b"KVL\x02ab", b"nope"):
            afl.start(data)
            assert afl.read_u32() == 0
            maps.append(afl.trace())
        # Hit counts per input: the same input gives the same map, a deeper one more.
        assert maps[0] == maps[2] and any(maps[0])
        assert sum(map(bool, maps[1])) > sum(map(bool, maps[0]))
    finally:
        code = afl.close()
    assert code == 0


def test_inputs_from_afl_fuzz_shared_memory(guest_dir: Path, tmp_path: Path) -> None:
    import signal

    elf = guest_dir.parent / "c" / "build" / "fuzz_cases.elf"
    afl = FakeAfl(tmp_path, elf, "hangs_or_crashes", shm_input=True)
    try:
        hello = afl.read_u32()
        assert hello & 0x01000000, "FS_OPT_SHDMEM_FUZZ"
        os.write(afl.ctl, (0x80000001 | 0x01000000).to_bytes(4, "little"))  # afl-fuzz's yes
        child = afl.start(b"CA")
        assert afl.read_u32() == 0
        # The input is read from the segment (no file is written): a crash is seen.
        assert afl.start(b"CRASH") == child
        status = afl.read_u32()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert not afl.input.exists()
    finally:
        code = afl.close()
    assert code == 0


def test_read_afl_stats_refuses_a_file_that_is_not_one(tmp_path: Path) -> None:
    from kvmpy import fuzz

    short = tmp_path / "short"
    short.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="not a KVMPY_AFL_STATS file"):
        fuzz.read_afl_stats(short)
    with pytest.raises(FileNotFoundError):
        fuzz.read_afl_stats(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_bytes(bytes(4096))  # no run yet
    assert fuzz.read_afl_stats(empty) == (0, 0.0)
