"""What the gdb stub costs per instruction, side by side with a single step from Python.

``python -m benchmarks.gdb_stub [--n N]`` runs, interleaved repetition by repetition (best
of 3), on the same 64-bit user-mode loop (``dec rcx; jnz``, then a write to 0x20000):

- ``cpu.step()``: a single step from Python (the baseline);
- ``gdb stepi``: a single step asked over the remote protocol (``vCont;s``, as gdb's
  ``stepi`` sends it), answered by the stub (the step runs on the stub's thread);
- ``stub watchpoint``: ``continue`` under a write watchpoint (``Z2``): the stub steps the
  guest instruction by instruction until the write, per instruction;
- ``gdb software watchpoint``: Debian's gdb with ``set can-use-hw-watchpoints 0`` and
  ``watch *(long *)0x20000``, per instruction (two runs of different lengths, so gdb's
  start-up cancels out); skipped without gdb.

Each variant checks where the guest ended, so a wrong run fails instead of being timed.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time

import kvmpy

CODE = 0x10000
WATCHED = 0x20000
# loop: dec rcx; jnz loop; mov [0x20000], rax; jmp $
LOOP = bytes([0x48, 0xFF, 0xC9, 0x75, 0xFB, 0x48, 0x89, 0x04, 0x25, 0, 0, 2, 0, 0xEB, 0xFE])
END = CODE + 13  # the jmp $ after the write


def _vm(rounds: int) -> tuple[kvmpy.Vm, kvmpy.Vcpu]:
    vm = kvmpy.Vm()
    vm.add_memory(0, 4 << 20).write(CODE, LOOP)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True, tables_addr=0x200000)
    cpu.set_regs(rip=CODE, rcx=rounds, rax=7)
    return vm, cpu


class _Remote:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gdb does
        self.file = self.sock.makefile("rb")

    def ask(self, data: str) -> str:
        self.sock.sendall(f"${data}#{sum(data.encode()) & 0xFF:02x}".encode())
        while self.file.read(1) != b"$":
            pass
        reply = bytearray()
        while (b := self.file.read(1)) != b"#":
            reply += b
        self.file.read(2)
        self.sock.sendall(b"+")
        return reply.decode()


def python_step(n: int) -> float:
    vm, cpu = _vm(n)
    with vm:
        t = time.perf_counter()
        cpu.step(2 * n)
        dt = time.perf_counter() - t
        assert cpu.regs.rcx == 0
    return dt / (2 * n)


def gdb_stepi(n: int) -> float:
    vm, cpu = _vm(n)
    with vm, vm.gdb_server() as server:
        r = _Remote(server.port)
        t = time.perf_counter()
        for _ in range(2 * n):
            assert r.ask("vCont;s:1").startswith("T05")
        dt = time.perf_counter() - t
        r.ask("D")
        server.wait(10)
        assert cpu.regs.rcx == 0
    return dt / (2 * n)


def stub_watchpoint(n: int) -> float:
    vm, cpu = _vm(n)
    with vm, vm.gdb_server() as server:
        r = _Remote(server.port)
        assert r.ask(f"Z2,{WATCHED:x},8") == "OK"
        t = time.perf_counter()
        assert "watch:" in r.ask("vCont;c")
        dt = time.perf_counter() - t
        r.ask("D")
        server.wait(10)
        assert cpu.regs.rip == END
    return dt / (2 * n + 1)


def _gdb_watch(rounds: int) -> float:
    vm, cpu = _vm(rounds)
    with vm, vm.gdb_server() as server:
        t = time.perf_counter()
        done = subprocess.run(
            ["gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{server.port}"]
            + ["-ex", "set can-use-hw-watchpoints 0", "-ex", f"watch *(long *){WATCHED:#x}"]
            + ["-ex", "continue", "-ex", "detach"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        dt = time.perf_counter() - t
        server.wait(10)
        assert "New value = 7" in done.stdout, done.stdout + done.stderr
        assert cpu.regs.rip == END
    return dt


def gdb_software_watchpoint(n: int) -> float:
    short, long = max(n // 10, 1), n
    return (_gdb_watch(long) - _gdb_watch(short)) / (2 * (long - short))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="loop rounds per variant (2 insns each)")
    args = p.parse_args()
    variants = [
        ("cpu.step()", python_step),
        ("gdb stepi", gdb_stepi),
        ("stub watchpoint", stub_watchpoint),
    ]
    if shutil.which("gdb"):
        variants.append(("gdb software watchpoint", gdb_software_watchpoint))
    best = {name: float("inf") for name, _ in variants}
    for _ in range(3):
        for name, fn in variants:
            best[name] = min(best[name], fn(args.n))
    base = best[variants[0][0]]
    print(f"guest debugging here: {kvmpy._native._debug_support()}")
    for name, _ in variants:
        print(f"{name:26} {best[name] * 1e6:8.1f} us/instruction {best[name] / base:6.1f}x")


if __name__ == "__main__":
    main()
