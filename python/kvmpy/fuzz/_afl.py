"""Running a harness under AFL++'s ``afl-fuzz`` (the forkserver protocol of AFL++ 4.0x, in
persistent mode).

KVM refuses a VM to any process but the one that made it, so the process afl-fuzz
starts is only the fork server: it forks a child that builds its own target (with the
recipe ``Target.from_elf`` recorded) and runs input after input in it, each reset from
the snapshot. The child talks to afl-fuzz's control and status pipes itself, in Rust with
the GIL released (``FuzzExecutor.afl_serve``): per input it reads the control word,
writes its pid, runs the input, writes the coverage and the status (a crash as a status
that reads as "killed by SIGSEGV", while the child lives on). The fork server only waits
for the child's death: when afl-fuzz kills it on a timeout, the server writes its status
(afl-fuzz is waiting for one: a word of memory shared with the child says so) and forks a
new child for the next input.

The hello announces the map afl-fuzz should scan (``FS_OPT_MAPSIZE``): in "once" mode one
byte per coverage block, each set to 1 once the campaign covered its block (a new block is
a new entry for afl-fuzz); in "armed" mode the target's ``map_size`` bytes of edge hit
counts. Inputs come from afl-fuzz's shared memory (``__AFL_SHM_FUZZ_ID``) when offered,
else from the input file (``@@``) or stdin.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmpy.fuzz._target import Target

FORKSRV_FD = 198
"""afl-fuzz's control pipe (read); FORKSRV_FD + 1 is the status pipe (written)."""
FS_OPT_ENABLED = 0x80000001
FS_OPT_MAPSIZE = 0x40000000
FS_OPT_SHDMEM_FUZZ = 0x01000000
FS_OPT_MAX_MAPSIZE = (0x00FFFFFE >> 1) + 1
"""The largest map a hello can announce (8 MiB)."""
IDLE, RUNNING, BEGUN = 0, 1, 2
"""The shared phase word (``engine::afl::Phase``): between rounds; in a round (the pid is
written); a round whose control word the server read and whose child has not written its
pid yet."""


def hello(map_size: int, shm_input: bool) -> int:
    """The fork server's first word to afl-fuzz: options, and the map size to scan."""
    word = FS_OPT_ENABLED | (FS_OPT_SHDMEM_FUZZ if shm_input else 0)
    if 1 < map_size <= FS_OPT_MAX_MAPSIZE:
        word |= FS_OPT_MAPSIZE | ((map_size - 1) << 1)
    return word


def under_afl() -> bool:
    """Whether this process was started by afl-fuzz as a fork server."""
    if "__AFL_SHM_ID" not in os.environ:
        return False
    try:
        os.fstat(FORKSRV_FD)
        os.fstat(FORKSRV_FD + 1)
    except OSError:
        return False
    return True


def _read_u32(fd: int) -> int | None:
    data = b""
    while len(data) < 4:
        try:
            chunk = os.read(fd, 4 - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return int(struct.unpack("<I", data)[0])


def _write_u32(fd: int, value: int) -> None:
    os.write(fd, struct.pack("<I", value & 0xFFFFFFFF))


STATS_ENV = "KVMPY_AFL_STATS"
"""Names a file in which the children keep, as they run, how many inputs they ran and how
long running them took (see :func:`read_afl_stats`)."""


def _state() -> mmap.mmap:
    """The page the fork server shares with its children: the round's phase, then the run
    counters. With ``KVMPY_AFL_STATS``, the page is that file's, so the counters outlive
    afl-fuzz's kill of the fork server at the end of a campaign."""
    path = os.environ.get(STATS_ENV)
    if not path:
        return mmap.mmap(-1, mmap.PAGESIZE)
    with open(path, "w+b") as f:
        f.truncate(mmap.PAGESIZE)
        return mmap.mmap(f.fileno(), mmap.PAGESIZE)


def read_afl_stats(path: str | os.PathLike[str]) -> tuple[int, float]:
    """The inputs the harness ran under afl-fuzz with ``KVMPY_AFL_STATS=path``, and the
    mean µs it spent running one (the target alone: no coverage, no pipes). afl-fuzz's
    µs per execution less that mean is what the harness and afl-fuzz add per input, on
    the very inputs afl-fuzz ran."""
    with open(path, "rb") as f:
        data = f.read(24)
    if len(data) < 24:
        raise ValueError(f"{path} is not a {STATS_ENV} file (too short)")
    runs, nanos = struct.unpack_from("<QQ", data, 8)
    return runs, (nanos / runs / 1e3 if runs else 0.0)


def serve(make_target: Callable[[], Target], inputs: Sequence[str]) -> int:
    """The fork server: talks to afl-fuzz until it goes away. ``make_target`` builds the
    target in each child; ``inputs`` is the input file afl-fuzz names (``@@``), if any."""
    shm_input = "__AFL_SHM_FUZZ_ID" in os.environ
    ctl, st = FORKSRV_FD, FORKSRV_FD + 1
    state = _state()  # shared with the children
    # The first child builds its target before the hello, which needs its map size.
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = _fork(make_target, inputs, state, shm_input, (ready_w, go_r), (ready_r, go_w))
    os.close(ready_w)
    os.close(go_r)
    map_size = _read_u32(ready_r)
    os.close(ready_r)
    if map_size is None:  # it could not build the target (it said why)
        os.close(go_w)
        _, status = os.waitpid(child, 0)
        return os.waitstatus_to_exitcode(status) or 1
    _write_u32(st, hello(map_size, shm_input))
    if shm_input and _read_u32(ctl) is None:
        os.close(go_w)
        os.waitpid(child, 0)
        return 0
    os.write(go_w, b"g")
    os.close(go_w)
    while True:
        _, status = os.waitpid(child, 0)
        phase = struct.unpack_from("<I", state)[0]
        try:
            if phase == BEGUN:  # it died before its first pid: broken
                _write_u32(st, child)
            if phase in (BEGUN, RUNNING):
                # It died in a round (killed by afl-fuzz on a timeout, or broken):
                # afl-fuzz waits for a status.
                _write_u32(st, status)
        except OSError:  # afl-fuzz is gone
            return 0
        if _read_u32(ctl) is None:  # afl-fuzz is gone
            return 0
        # A new round: the new child builds its target, then writes its pid.
        struct.pack_into("<I", state, 0, BEGUN)
        child = _fork(make_target, inputs, state, shm_input, None, ())


def _fork(
    make_target: Callable[[], Target],
    inputs: Sequence[str],
    state: mmap.mmap,
    shm_input: bool,
    ready: tuple[int, int] | None,
    server_ends: tuple[int, ...],
) -> int:
    """Forks a child that builds its target and runs afl-fuzz's rounds. With ``ready``
    (two pipe ends) it writes its map size on the first and waits for a byte on the
    second before its first round; without, its first round was begun by the server.
    ``server_ends`` are closed in the child."""
    pid = os.fork()
    if pid != 0:
        return pid
    for fd in server_ends:
        os.close(fd)
    code = 1
    try:
        code = _child(make_target, inputs, state, shm_input, ready)
    except BaseException:
        traceback.print_exc()  # seen with AFL_DEBUG_CHILD=1
    finally:
        os._exit(code)


def _child(
    make_target: Callable[[], Target],
    inputs: Sequence[str],
    state: mmap.mmap,
    shm_input: bool,
    ready: tuple[int, int] | None,
) -> int:
    """A child of the fork server: builds its own target, then runs afl-fuzz's rounds."""
    target = make_target()
    executor = target._executor
    map_size = executor.afl_map_size
    if map_size is None:
        print("kvmpy.fuzz: afl-fuzz needs a target with coverage=...", file=sys.stderr)
        return 1
    if ready is not None:
        ready_w, go_r = ready
        _write_u32(ready_w, map_size)
        os.close(ready_w)
        if not os.read(go_r, 1):  # the server is gone
            return 0
        os.close(go_r)
    executor.afl_serve(
        FORKSRV_FD,
        FORKSRV_FD + 1,
        state,
        trace_shm=int(os.environ["__AFL_SHM_ID"]),
        input_shm=int(os.environ["__AFL_SHM_FUZZ_ID"]) if shm_input else None,
        input_file=inputs[0] if inputs else None,
        round_pending=ready is None,
    )
    return 0
