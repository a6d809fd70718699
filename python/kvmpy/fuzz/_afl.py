"""Running a harness under AFL++'s ``afl-fuzz`` (the forkserver protocol of AFL++ 4.0x, in
persistent mode, the unicornafl v3 way).

KVM refuses a VM to any process but the one that made it, so the process afl-fuzz
starts is only the fork server: it forks a child that builds its own target (with the
recipe ``Target.from_elf`` recorded) and runs input after input in it, each reset from
the snapshot. The child tells the server how each input ended through a pipe; the server
tells afl-fuzz (a crash as a status that reads as "killed by SIGSEGV", while the child
lives on). When afl-fuzz kills the child on a timeout, the server reports its real
status and forks a new child for the next input.

Coverage goes into afl-fuzz's shared map (``__AFL_SHM_ID``, ``AFL_MAP_SIZE`` bytes): in
"once" mode the campaign's map (each block is reported by the input that covered it
first, and then by every input: a new block is a new bit for afl-fuzz), in "armed" mode
each input's edge hit counts. Inputs come from afl-fuzz's shared memory
(``__AFL_SHM_FUZZ_ID``) when offered, else from the input file (``@@``) or stdin.
"""

from __future__ import annotations

import ctypes
import os
import signal
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
FS_OPT_SHDMEM_FUZZ = 0x01000000
CRASH_STATUS = signal.SIGSEGV
"""A wait status that reads as "killed by SIGSEGV": how a child that lives on reports a
crash."""
CHILD_NEXT, CHILD_CRASH = 0, 1


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


class _Shm:
    """A System V shared memory segment afl-fuzz made, attached."""

    def __init__(self, env: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        shm_id = int(os.environ[env])
        addr = libc.shmat(shm_id, None, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot attach {env}={shm_id}: {os.strerror(err)}")
        self.addr: int = addr


def serve(make_target: Callable[[], Target], inputs: Sequence[str]) -> int:
    """The fork server: talks to afl-fuzz until it goes away. ``make_target`` builds the
    target in each child; ``inputs`` is the input file afl-fuzz names (``@@``), if any."""
    shm_input = "__AFL_SHM_FUZZ_ID" in os.environ
    ctl, st = FORKSRV_FD, FORKSRV_FD + 1
    _write_u32(st, FS_OPT_ENABLED | (FS_OPT_SHDMEM_FUZZ if shm_input else 0))
    if shm_input and _read_u32(ctl) is None:
        return 0
    child: int | None = None
    go_w = result_r = -1
    while True:
        was_killed = _read_u32(ctl)
        if was_killed is None:  # afl-fuzz is gone
            if child is not None:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
            return 0
        if child is not None and was_killed:
            # afl-fuzz killed it (a timeout) after it had answered: write it off.
            os.waitpid(child, 0)
            child = None
        if child is not None:
            try:
                _write_u32(go_w, 0)
            except OSError:
                os.waitpid(child, 0)
                child = None
        if child is None:
            for fd in (go_w, result_r):
                if fd >= 0:
                    os.close(fd)
            go_r, go_w = os.pipe()
            result_r, result_w = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(go_w)
                os.close(result_r)
                os.close(ctl)
                os.close(st)
                code = 1
                try:
                    code = _child(make_target, inputs, go_r, result_w, shm_input)
                except BaseException:
                    traceback.print_exc()  # seen with AFL_DEBUG_CHILD=1
                finally:
                    os._exit(code)
            os.close(go_r)
            os.close(result_w)
        _write_u32(st, child)
        answer = _read_u32(result_r)
        if answer is None:  # the child died: killed on a timeout, or broken
            _, status = os.waitpid(child, 0)
            child = None
            _write_u32(st, status)
        else:
            _write_u32(st, CRASH_STATUS if answer == CHILD_CRASH else 0)


def _child(
    make_target: Callable[[], Target],
    inputs: Sequence[str],
    go_r: int,
    result_w: int,
    shm_input: bool,
) -> int:
    """A child of the fork server: builds its own target, then runs one input per go."""
    target = make_target()
    if target.coverage_map is None:
        print("kvmpy.fuzz: afl-fuzz needs a target with coverage=...", file=sys.stderr)
        return 1
    afl_map = int(os.environ.get("AFL_MAP_SIZE", "65536"))
    if len(target.coverage_map) > afl_map:
        print(
            f"kvmpy.fuzz: the target's map_size ({len(target.coverage_map)}) is larger than "
            f"afl-fuzz's map (AFL_MAP_SIZE={afl_map}): set AFL_MAP_SIZE={len(target.coverage_map)}",
            file=sys.stderr,
        )
        return 1
    trace = _Shm("__AFL_SHM_ID")
    map_size = len(target.coverage_map)
    fuzz_in = _Shm("__AFL_SHM_FUZZ_ID") if shm_input else None
    while True:
        if fuzz_in is not None:
            (n,) = struct.unpack("<I", ctypes.string_at(fuzz_in.addr, 4))
            data = ctypes.string_at(fuzz_in.addr + 4, min(n, target.max_len))
        elif inputs:
            with open(inputs[0], "rb") as f:
                data = f.read(target.max_len)
        else:
            data = os.pread(0, target.max_len, 0)
        outcome = target.run(data)
        cmap = target.coverage_map
        ctypes.memmove(trace.addr, cmap, map_size)
        if outcome.kind == "timeout":
            # A hang for afl-fuzz too: wait for its timeout to kill this child.
            while True:
                signal.pause()
        _write_u32(result_w, CHILD_CRASH if outcome.is_crash else CHILD_NEXT)
        if _read_u32(go_r) is None:
            return 0
