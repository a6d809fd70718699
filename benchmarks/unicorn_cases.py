"""The peer: the Unicorn CPU emulator (``pip install unicorn``) running the same guest bytes.

Unicorn executes the flat binaries in ``UC_MODE_64`` with a Python hook on ``OUT``
(``UC_HOOK_INSN`` with ``UC_X86_INS_OUT``): the hook counts device writes and stops the
emulation at the exit port, like a kvmpy Python handler and exit port.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from benchmarks.common import DEVICE_PORT, EXIT_PORT, GUEST_RAM, LOAD_ADDR, BenchError
from kvmpy.__main__ import lcg


def unavailable() -> str | None:
    """Why Unicorn cannot be used here, or None if it can."""
    try:
        import unicorn  # noqa: F401
    except ImportError as e:
        return f"`unicorn` is not importable ({e}); install it with `pip install unicorn`"
    return None


def _run(code: bytes, rdi: int) -> tuple[float, int, int]:
    """Runs ``code`` from LOAD_ADDR with RDI = ``rdi`` until it writes to the exit port.
    Returns (seconds in emu_start, device writes, RBX at the end)."""
    # Imported dynamically: unicorn is optional and has no type information.
    u: Any = importlib.import_module("unicorn")
    x86: Any = importlib.import_module("unicorn.x86_const")
    uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
    uc.mem_map(0, GUEST_RAM)
    uc.mem_write(LOAD_ADDR, code)
    uc.reg_write(x86.UC_X86_REG_RDI, rdi)
    state = {"writes": 0, "exited": False}

    def on_out(uc: Any, port: int, size: int, value: int, user_data: Any) -> None:
        if port == DEVICE_PORT:
            state["writes"] += 1
        elif port == EXIT_PORT:
            state["exited"] = True
            uc.emu_stop()

    uc.hook_add(u.UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
    start = time.perf_counter()
    uc.emu_start(LOAD_ADDR, LOAD_ADDR + len(code))
    elapsed = time.perf_counter() - start
    if not state["exited"]:
        raise BenchError("Unicorn: the guest did not reach the exit port")
    return elapsed, int(state["writes"]), int(uc.reg_read(x86.UC_X86_REG_RBX))


def exits(code: bytes, n: int) -> float:
    """Seconds to run counter64 with ``n`` device writes (n + 1 OUT hook calls)."""
    elapsed, writes, _ = _run(code, n)
    if writes != n:
        raise BenchError(f"Unicorn counter64 N={n}: {writes} device writes")
    return elapsed


def compute(code: bytes, n: int) -> float:
    """Seconds for compute64 with ``n`` LCG iterations."""
    elapsed, writes, rbx = _run(code, n)
    if writes != 2 or rbx != lcg(n):
        raise BenchError(f"Unicorn compute64 N={n}: rbx {rbx:#x} != {lcg(n):#x}")
    return elapsed
