"""What a breakpoint costs on this host, side by side with a plain exit from user mode.

``python -m benchmarks.debug_exits [--n N]`` runs, interleaved repetition by repetition,
four variants on the same 64-bit user-mode loop (``add rax, 1; [out 0xf4, al]; jmp``),
one event per ``cpu.run()`` (or per handler call), and prints microseconds per event and
the ratio to the first row:

- ``out exit``: the loop ends each run with ``out 0xf4, al`` to an exit port: the cost of
  an exit straight from CPL3 (what a patch that exits with an ``out`` would cost);
- ``breakpoint``: a breakpoint on the ``add``; each run returns at it and the next one
  steps over it (hit + single step + re-arm);
- ``breakpoint handler``: the same with ``vm.on_breakpoint`` letting the guest go on
  (no return to Python's ``run()`` per hit);
- ``step``: ``cpu.step()`` per instruction;
- ``... (int3)``: the two breakpoint variants with ``int3`` patched in
  (``KVMPY_BREAKPOINT_MECHANISM=exception-stubs``), where kvmpy's choice on a host whose
  KVM does not intercept is the one-byte ``out dx, al`` patch;
- ``watched store (miss)``: a store loop (``mov [rdi], rax; add; cmp; jb``) whose stores
  go to a page with a write watchpoint, next to the watched bytes: each store exits and
  kvmpy does it (one run for all; per store);
- ``watchpoint hit``: the same loop storing to the watched bytes: each run returns with
  a ``watchpoint`` exit;
- ``store under single steps``: the same loop stepped instruction by instruction, the way
  a debugger without watchpoints (gdb's fallback) sees each store (per store: 4 steps).

Each variant checks the guest's counter, so a wrong run fails instead of being timed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import kvmpy
from kvmpy._native import _debug_support

CODE = 0x10000
OUT_LOOP = bytes([0x48, 0x83, 0xC0, 0x01, 0xE6, 0xF4, 0xEB, 0xF8])  # add rax,1; out; jmp
BP_LOOP = bytes([0x48, 0x83, 0xC0, 0x01, 0xEB, 0xFA])  # add rax, 1; jmp -6


def _vm(code: bytes) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 2 << 20).write(CODE, code)
    vm.add_exit_port(0xF4)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True)
    cpu.set_regs(rip=CODE, rax=0)
    return vm, cpu


def out_exit(n: int) -> float:
    vm, cpu = _vm(OUT_LOOP)
    with vm:
        cpu.run(timeout=10)
        t = time.perf_counter()
        for _ in range(n):
            cpu.run(timeout=10)
        dt = time.perf_counter() - t
        assert cpu.regs.rax == n + 1
    return dt / n


def breakpoint_run(n: int) -> float:
    vm, cpu = _vm(BP_LOOP)
    with vm:
        cpu.add_breakpoint(CODE)
        cpu.run(timeout=10)  # stops at the first hit, before the add
        t = time.perf_counter()
        for _ in range(n):
            assert cpu.run(timeout=10).reason == "breakpoint"
        dt = time.perf_counter() - t
        assert cpu.regs.rax == n
    return dt / n


def breakpoint_handler(n: int) -> float:
    vm, cpu = _vm(BP_LOOP)
    with vm:
        cpu.add_breakpoint(CODE)
        left = [n]

        @vm.on_breakpoint
        def hit(exit: kvmpy.BreakpointExit) -> None:
            left[0] -= 1
            if left[0] < 0:
                exit.stop()

        t = time.perf_counter()
        cpu.run(timeout=60)
        dt = time.perf_counter() - t
        assert cpu.regs.rax == n
    return dt / n


def step(n: int) -> float:
    vm, cpu = _vm(BP_LOOP)
    with vm:
        t = time.perf_counter()
        cpu.step(n)
        dt = time.perf_counter() - t
        assert cpu.regs.rax == (n + 1) // 2
    return dt / n


WATCHED = 0x30000
# 0x10000 mov [rdi], rax ; add rax, 1 ; cmp rax, rcx ; jb 0x10000 ; out 0xf4, al
STORE_LOOP = bytes.fromhex("4889074883c0014839c872f4e6f4")


def watched_miss(n: int) -> float:
    vm, cpu = _vm(STORE_LOOP)
    with vm:
        cpu.add_watchpoint(WATCHED, 8, "write")
        cpu.set_regs(rdi=WATCHED + 0x100, rcx=n)
        t = time.perf_counter()
        assert cpu.run(timeout=60).reason == "exit"
        dt = time.perf_counter() - t
        assert int.from_bytes(vm.read(WATCHED + 0x100, 8), "little") == n - 1
    return dt / n


def watched_hit(n: int) -> float:
    vm, cpu = _vm(STORE_LOOP)
    with vm:
        cpu.add_watchpoint(WATCHED, 8, "write")
        cpu.set_regs(rdi=WATCHED, rcx=n + 1)
        t = time.perf_counter()
        for _ in range(n):
            assert cpu.run(timeout=10).reason == "watchpoint"
        dt = time.perf_counter() - t
        assert int.from_bytes(vm.read(WATCHED, 8), "little") == n - 1
    return dt / n


def stepped_store(n: int) -> float:
    vm, cpu = _vm(STORE_LOOP)
    with vm:
        cpu.set_regs(rdi=WATCHED + 0x100, rcx=n + 1)
        t = time.perf_counter()
        cpu.step(4 * n)
        dt = time.perf_counter() - t
        assert int.from_bytes(vm.read(WATCHED + 0x100, 8), "little") == n - 1
    return dt / n


def with_int3(f: Callable[[int], float]) -> Callable[[int], float]:
    """``f`` with breakpoints patched as ``int3`` (through the exception stubs where KVM
    does not intercept)."""

    def run(n: int) -> float:
        os.environ["KVMPY_BREAKPOINT_MECHANISM"] = "exception-stubs"
        try:
            return f(n)
        finally:
            del os.environ["KVMPY_BREAKPOINT_MECHANISM"]

    return run


VARIANTS = {
    "out exit": out_exit,
    "breakpoint": breakpoint_run,
    "breakpoint handler": breakpoint_handler,
    "breakpoint (int3)": with_int3(breakpoint_run),
    "breakpoint handler (int3)": with_int3(breakpoint_handler),
    "step": step,
    "watched store (miss)": watched_miss,
    "watchpoint hit": watched_hit,
    "store under single steps": stepped_store,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"guest debugging here: {_debug_support()}")
    best: dict[str, float] = {}
    for _ in range(args.reps):
        for name, f in VARIANTS.items():
            best[name] = min(best.get(name, float("inf")), f(args.n))
    base = best["out exit"]
    for name, per in best.items():
        print(f"{name:26} {per * 1e6:8.1f} us/event  {per / base:5.1f}x")


if __name__ == "__main__":
    main()
