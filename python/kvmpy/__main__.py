"""Command line: ``python -m kvmpy demo`` runs guests; ``python -m kvmpy info`` describes KVM."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources

import kvmpy

# The demo guests' conventions (see guests/*.S).
CONSOLE_PORT = 0x3F8
RESULT_PORT = 0x11
EXIT_PORT = 0xF4
REAL_MODE_LOAD = 0x1000
LONG_MODE_LOAD = 0x10000
LCG_MUL = 6364136223846793005
LCG_ADD = 1442695040888963407


def guest_binary(name: str) -> bytes:
    """The bytes of a guest shipped inside the package (``kvmpy/guests/NAME.bin``)."""
    return resources.files("kvmpy").joinpath("guests", f"{name}.bin").read_bytes()


def lcg(n: int) -> int:
    """What the 64-bit demo guest computes (``n`` steps of x = x * MUL + ADD mod 2**64
    from 0), by jumping ahead in O(log n) steps, to check its answer."""
    mask = 2**64 - 1
    acc_mul, acc_add = 1, 0
    mul, add = LCG_MUL, LCG_ADD
    while n:
        if n & 1:
            acc_mul, acc_add = (acc_mul * mul) & mask, (acc_add * mul + add) & mask
        mul, add = (mul * mul) & mask, ((mul + 1) * add) & mask
        n >>= 1
    return acc_add


def run_real_mode_hello() -> str:
    """Runs the 16-bit real-mode guest; returns what it printed."""
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, 1 << 20)
        ram.write(REAL_MODE_LOAD, guest_binary("hello_real"))
        console = vm.add_console(CONSOLE_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_real_mode(cs=0, ip=REAL_MODE_LOAD)
        cpu.set_regs(rsp=0x8000)
        exit = cpu.run(timeout=10)
        if exit.reason != "hlt":
            raise RuntimeError(f"real-mode guest ended with {exit!r}")
        return console.output().decode()


def run_user_mode_hello(iterations: int) -> tuple[str, int, float]:
    """Runs the 64-bit user-mode guest: it prints, then computes ``iterations`` LCG
    steps natively and reports the result with OUT. Returns (output, result, seconds)."""
    with kvmpy.Vm() as vm:
        ram = vm.add_memory(0, 2 << 20)
        ram.write(LONG_MODE_LOAD, guest_binary("hello64"))
        console = vm.add_console(CONSOLE_PORT)
        vm.add_exit_port(EXIT_PORT)
        halves: list[int] = []
        vm.on_io(RESULT_PORT, lambda e: halves.append(e.value))
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True)
        cpu.set_regs(rip=LONG_MODE_LOAD, rdi=iterations)
        start = time.perf_counter()
        exit = cpu.run(timeout=60)
        elapsed = time.perf_counter() - start
        if exit.reason != "exit" or len(halves) != 2:
            raise RuntimeError(f"64-bit guest ended with {exit!r}")
        return console.output().decode(), halves[0] | halves[1] << 32, elapsed


def demo(iterations: int) -> int:
    print("kvmpy demo: two guests, run by KVM, their I/O handled by kvmpy.\n")
    print("1. A 16-bit real-mode guest prints over the console port and halts:")
    print("   " + run_real_mode_hello().rstrip("\n"))
    print(f"\n2. A 64-bit user-mode guest prints, then runs {iterations:,} loop iterations:")
    output, result, elapsed = run_user_mode_hello(iterations)
    print("   " + output.rstrip("\n"))
    print(
        f"   result {result:#018x} in {elapsed * 1e3:.1f} ms "
        f"({iterations / elapsed / 1e6:,.0f} M iterations/s)"
    )
    expected = lcg(iterations)
    if expected != result:
        print(f"   MISMATCH: Python computes {expected:#018x}")
        return 1
    print("   (matches the result Python computes)")
    print("\nDone.")
    return 0


def _nested() -> str:
    try:
        flags = next(
            line
            for line in open("/proc/cpuinfo", encoding="ascii", errors="replace")
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    return "yes (this host is itself a VM)" if " hypervisor" in flags else "no (bare metal)"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def info() -> int:
    avail = kvmpy.available()
    print(f"kvmpy {kvmpy.__version__}")
    print(f"CPU: {_cpu_model()}")
    print(f"KVM nested: {_nested()}")
    if not avail:
        print(f"KVM: unavailable: {avail.reason}")
        return 1
    kvm = kvmpy.Kvm()
    print(f"KVM API version: {kvm.api_version}")
    print(f"vCPUs per VM: {kvm.recommended_vcpus} recommended, {kvm.max_vcpus} max")
    print(f"memory slots per VM: {kvm.max_memslots}")
    print(f"supported CPUID entries: {len(kvm.supported_cpuid())}")
    caps = kvm.capabilities()
    print("capabilities: " + ", ".join(f"{k}={v}" if v > 1 else k for k, v in caps.items() if v))
    missing = [k for k, v in caps.items() if not v]
    print("not supported: " + (", ".join(missing) or "-"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo guests")
    d.add_argument(
        "--iterations",
        type=int,
        default=100_000_000,
        help="loop iterations of the 64-bit guest (default 1e8)",
    )
    sub.add_parser("info", help="describe this host's KVM")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    avail = kvmpy.available()
    if not avail:
        print(f"kvmpy demo: KVM is unavailable: {avail.reason}", file=sys.stderr)
        return 1
    if args.iterations < 0:
        parser.error("--iterations must be >= 0")
    return demo(args.iterations)


if __name__ == "__main__":
    sys.exit(main())
