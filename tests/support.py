"""Helpers for the tests: guest conventions and ready-made VMs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kvmpy

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"

# Guest conventions (see guests/*.S).
CONSOLE = 0x3F8
DEV_IN = 0x10
DEV_OUT = 0x11
EXIT_PORT = 0xF4
REAL_LOAD = 0x1000
LONG_LOAD = 0x10000


def real_mode_vm(code: bytes, ram_size: int = 0x80000) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    """A VM with RAM at 0, `code` at 0x1000 and a vCPU in real mode at 0:0x1000."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, ram_size)
    ram.write(REAL_LOAD, code)
    cpu = vm.create_vcpu()
    cpu.setup_real_mode(cs=0, ip=REAL_LOAD)
    cpu.set_regs(rsp=0x8000)
    return vm, cpu


def user_mode_vm(code: bytes, rdi: int = 0) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    """A VM with 2 MiB of RAM, `code` at 0x10000 and a vCPU in 64-bit user mode there."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 2 << 20)
    ram.write(LONG_LOAD, code)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    cpu.set_regs(rip=LONG_LOAD, rdi=rdi)
    return vm, cpu


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def interrupt_script(script: str) -> tuple[str, int]:
    """Runs `script` in a fresh interpreter; once it prints "running", waits a moment and
    sends SIGINT (Ctrl-C). Returns its remaining output and its exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    time.sleep(0.2)  # let it enter the guest
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return out.strip() + err, proc.returncode
