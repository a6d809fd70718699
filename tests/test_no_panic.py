"""Every public call, with every kind of wrong argument: a Python exception or a result,
never a Rust panic (`PanicException`, a `BaseException` that `except Exception` misses)
and never a crash of the interpreter."""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvmpy

from .support import REAL_LOAD, real_mode_vm

pytestmark = pytest.mark.kvm

HOSTILE: list[Any] = [
    -1,
    0,
    1,
    4096,
    2**32,
    2**64,
    -(2**70),
    2**200,
    1e20,
    -0.5,
    float("nan"),
    float("inf"),
    True,
    None,
    "",
    "x" * 300,
    b"",
    b"\xff" * 9,
    bytearray(3),
    memoryview(b"ab"),
    [],
    [2**64],
    {},
    {2**64: -1},
    (1, 2),
    object(),
    lambda *a: 2**80,
]

# hlt ; jmp back to the hlt: every run ends at once with a HLT exit.
HLT_LOOP = bytes([0xF4, 0xEB, 0xFD])


def public_methods(obj: object) -> list[str]:
    return sorted(
        name
        for name in dir(obj)
        if not name.startswith("_") and callable(getattr(type(obj), name, None))
    )


def argument_lists(fn: Callable[..., Any]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """No argument; one, two and three of the same hostile value; each keyword parameter
    alone with each hostile value."""
    yield ((), {})
    for arity, v in itertools.product((1, 2, 3), HOSTILE):
        yield ((v,) * arity, {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    for name, p in params.items():
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            for v in HOSTILE:
                yield ((), {name: v})


def call_every_way(obj: object, name: str, before: Callable[[], object] = lambda: None) -> int:
    """Calls `obj.name` with every argument list, `before()` each time; returns how many
    calls were made."""
    fn = getattr(obj, name)
    calls = 0
    for args, kwargs in argument_lists(fn):
        before()
        calls += 1
        try:
            fn(*args, **kwargs)
        except Exception:
            pass  # any clear Python exception is fine; a panic is a BaseException
    return calls


def fresh() -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm, cpu = real_mode_vm(HLT_LOOP)
    return vm, cpu


def at_the_hlt(vm: kvmpy.Vm, cpu: kvmpy.Vcpu) -> Callable[[], None]:
    """Puts the guest back at its `hlt` loop in real mode (a call may have changed its
    mode, registers or memory), so that every run ends at once."""

    def reset() -> None:
        if vm.closed:
            return
        if vm.started:
            vm.stop()
            try:
                vm.join()
            except Exception:
                pass  # the error of a run the call started (a handler's, say)
        vm.write(REAL_LOAD, HLT_LOOP)
        cpu.setup_real_mode(cs=0, ip=REAL_LOAD)

    return reset


FACTORIES: dict[str, Callable[[kvmpy.Vm, kvmpy.Vcpu], object]] = {
    "vm": lambda vm, cpu: vm,
    "vcpu": lambda vm, cpu: cpu,
    "region": lambda vm, cpu: vm.memory_regions[0],
    "console": lambda vm, cpu: vm.add_console(0x3F8),
    "uart": lambda vm, cpu: vm.add_uart(0x2F8),
    "kvm": lambda vm, cpu: kvmpy.Kvm(),
    "regs": lambda vm, cpu: cpu.regs,
    "snapshot": lambda vm, cpu: vm.snapshot(),
}


BLOCKING = {
    # Waits for a gdb client to end a session: tests/test_gdb.py drives it with one, and
    # sweeps gdb_server, which takes the same arguments and returns at once.
    ("vm", "serve_gdb"),
}


@pytest.mark.parametrize("target", list(FACTORIES))
def test_every_public_call_survives_every_wrong_argument(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a call given a file name (Snapshot.save) writes
    vm, cpu = fresh()
    with vm:
        names = public_methods(FACTORIES[target](vm, cpu))
    assert names, f"{target} has no public methods"
    for name in names:
        if (target, name) in BLOCKING:
            continue
        # Each method on its own VM (a call may close it, or queue an interrupt that a
        # real-mode guest never takes), each call with the guest back at its `hlt`.
        vm, cpu = fresh()
        with vm:
            obj = FACTORIES[target](vm, cpu)
            assert call_every_way(obj, name, at_the_hlt(vm, cpu)) > 0


def test_hardware_breakpoints_survive_every_wrong_address() -> None:
    # The sweep above gives `hardware` alone; here with every address, on both objects.
    vm, cpu = fresh()
    with vm:
        for obj, v in itertools.product((vm, cpu), HOSTILE):
            for hardware in (True, v):
                try:
                    obj.add_breakpoint(v, hardware=hardware)
                    obj.remove_breakpoint(v)
                except Exception:
                    pass  # any clear Python exception is fine
        vm.write(REAL_LOAD, HLT_LOOP)
        cpu.setup_real_mode(cs=0, ip=REAL_LOAD)
        assert cpu.run(timeout=10).reason == "hlt", "the VM stays usable"


def test_module_functions_survive_every_wrong_argument() -> None:
    for name in ("available",):
        call_every_way(kvmpy, name)
    for cls in (kvmpy.Vm, kvmpy.Kvm, kvmpy.CpuidEntry):
        for args, kwargs in argument_lists(cls):
            try:
                obj = cls(*args, **kwargs)
            except Exception:
                continue
            if isinstance(obj, kvmpy.Vm):
                obj.close()


@pytest.mark.parametrize("kind", ["regs", "sregs", "segment", "dtable", "cpuid"])
def test_setting_fields_to_wrong_values_never_panics(kind: str) -> None:
    vm, cpu = fresh()
    with vm:
        obj: object = {
            "regs": lambda: cpu.regs,
            "sregs": lambda: cpu.sregs,
            "segment": lambda: cpu.sregs.cs,
            "dtable": lambda: cpu.sregs.gdt,
            "cpuid": lambda: cpu.get_cpuid()[0],
        }[kind]()
        fields = [n for n in dir(obj) if not n.startswith("_") and not callable(getattr(obj, n))]
        assert fields
        for name, value in itertools.product(fields, HOSTILE):
            try:
                setattr(obj, name, value)
            except Exception:
                pass
        if kind == "regs":
            try:
                cpu.set_regs(**{f: getattr(obj, f) for f in fields})
            except Exception:
                pass


def test_coverage_arguments_survive_every_wrong_value() -> None:
    from kvmpy._native import FuzzExecutor, _find_blocks

    call_every_way(kvmpy._native, "_find_blocks")
    for code, base, entries in itertools.product(HOSTILE[:8], HOSTILE[:8], ([0], [2**64], [-1])):
        try:
            _find_blocks(b"\x90\xeb\xfe" if code == 0 else code, base, entries, entries)
        except Exception:
            pass
    vm, cpu = fresh()
    with vm:
        vm.add_exit_port(0xF4)
        snap = vm.snapshot()
        for name in ("coverage", "coverage_mode", "map_size"):
            for value in [*HOSTILE, [REAL_LOAD], [REAL_LOAD, REAL_LOAD]]:
                try:
                    ex = FuzzExecutor(vm, cpu, snap, input_end=0x9000, max_len=8, **{name: value})
                    ex.run(b"")
                    del ex
                except Exception:
                    pass


def test_afl_serve_arguments_survive_every_wrong_value() -> None:
    import mmap

    from kvmpy._native import FuzzExecutor

    vm, cpu = fresh()
    with vm:
        vm.add_exit_port(0xF4)
        snap = vm.snapshot()
        ex = FuzzExecutor(vm, cpu, snap, input_end=0x9000, max_len=8, timeout=0.01)
        assert ex.afl_map_size is None
        state = mmap.mmap(-1, 4096)
        ctl_r, ctl_w = os.pipe()
        os.close(ctl_w)  # a control pipe at its end: a loop would stop at once
        base: dict[str, Any] = {
            "ctl_fd": ctl_r,
            "status_fd": ctl_r,
            "state": state,
            "trace_shm": -1,
        }
        try:
            for name in (*base, "input_shm", "input_file", "round_pending"):
                for value in [*HOSTILE, bytearray(8), memoryview(b"1234")]:
                    kwargs = dict(base, **{name: value})
                    with pytest.raises((ValueError, TypeError, OverflowError)):  # no coverage
                        ex.afl_serve(**kwargs)
        finally:
            os.close(ctl_r)


def test_campaign_arguments_survive_every_wrong_value() -> None:
    from kvmpy._native import FuzzExecutor

    vm, cpu = fresh()
    with vm:
        vm.add_exit_port(0xF4)
        snap = vm.snapshot()
        ex = FuzzExecutor(vm, cpu, snap, input_end=0x9000, max_len=8, timeout=0.01)
        base: dict[str, Any] = {"executions": 3}
        for name in (
            "seeds",
            "seed",
            "executions",
            "duration",
            "sync_dir",
            "worker",
            "on_crash",
            "on_timeout",
            "on_status",
            "status_every",
        ):
            for value in HOSTILE:
                # Every campaign is bounded: by 3 executions, or 0.05 s where those vary.
                kwargs = dict(base, **{name: value})
                if name == "executions":
                    kwargs["duration"] = 0.05
                try:
                    ex.fuzz(**kwargs)
                except Exception:
                    pass
        # Still usable; this guest's every run ends in HLT, which the fuzzer counts as a
        # crash, and a campaign needs a seed that runs clean.
        with pytest.raises(ValueError, match="every seed crashed or timed out"):
            ex.fuzz([b"\x00"], executions=2)
