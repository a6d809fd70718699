"""The command line: ``python -m kvmpy demo|info|run|cc``."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources

import kvmpy
from kvmpy import _native, _run, sdk

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


def _is_vm() -> bool | None:
    """Whether this host is itself a virtual machine (the CPU's hypervisor flag)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return " hypervisor" in flags


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# loop: dec rcx ; jnz loop ; out 0xf4, al
_COUNT_DOWN = bytes([0x48, 0xFF, 0xC9, 0x75, 0xFB, 0xE6, 0xF4])


def instruction_rate(user: bool, iterations: int) -> float:
    """Instructions per second of a 64-bit loop at CPL3 (``user``) or CPL0, measured on a
    second run, once the first has faulted in the guest's pages."""
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 2 << 20).write(LONG_MODE_LOAD, _COUNT_DOWN)
        vm.add_exit_port(EXIT_PORT)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=user)
        elapsed = 0.0
        for _ in range(2):
            cpu.set_regs(rip=LONG_MODE_LOAD, rcx=iterations)
            start = time.perf_counter()
            exit = cpu.run(timeout=30)
            elapsed = time.perf_counter() - start
            if exit.reason != "exit":
                raise RuntimeError(f"the probe ended with {exit!r}")
    return 2 * iterations / elapsed


def _approx(rate: float) -> str:
    return f"~{rate:.0e}".replace("e+0", "e").replace("e+", "e")


def verdict(is_vm: bool | None) -> str:
    """What this host's KVM runs natively, measured with two small guests."""
    user = instruction_rate(True, 2_000_000)
    kernel = instruction_rate(False, 20_000)
    if kernel * 20 < user:
        kind = "nested software KVM" if is_vm else "software KVM"
        return (
            f"KVM usable; {kind}: 64-bit user-mode code runs natively "
            f"({_approx(user)} instructions/s measured), ring-0 code is emulated "
            f"({_approx(kernel)} instructions/s): for speed, run guests at CPL3 "
            "(setup_long_mode(user=True)); some instructions end ring-0 runs with an "
            "internal_error exit"
        )
    where = "nested hardware virtualization" if is_vm else "hardware virtualization"
    return f"KVM usable; {where}: every CPU mode runs natively ({_approx(user)} instructions/s)"


def debugging() -> str:
    """One line: how breakpoints and single steps reach kvmpy on this host."""
    from kvmpy._native import _debug_support

    try:
        d = _debug_support()
    except kvmpy.KvmError as e:
        return f"unavailable: {e}"
    names = ("sw_breakpoints", "single_step", "hw_breakpoints", "watchpoints")
    caught = ", ".join(n for n in names if d[n]) or "nothing"
    if d["mechanism"] == "kvm":
        how = "breakpoints and steps through KVM_EXIT_DEBUG"
    else:
        how = (
            "single steps, and breakpoints where port I/O faults, through kvmpy's "
            "exception stubs (setup_long_mode(exceptions=True))"
        )
    patch = {
        "kvm": "int3 through KVM_EXIT_DEBUG",
        "port-io": "a one-byte out dx, al patch, an exit straight from user mode",
        "exception-stubs": "int3 through kvmpy's exception stubs",
    }.get(str(d.get("breakpoints")), "unknown")
    watch = str(d.get("watch_mechanism"))
    if watch == "memslot":
        watch = (
            "memslot (the watched page gets a read-only memory slot, or none for "
            "read/write watchpoints: its accesses exit to kvmpy)"
        )
    elif watch == "debug-registers":
        watch = "debug-registers (DR0-DR3 through KVM_GUESTDBG_USE_HW_BP)"
    block = "held off (KVM_GUESTDBG_BLOCKIRQ)" if d.get("block_irq") else "not held off"
    if d["hw_breakpoints"] and d["mechanism"] == "kvm":
        hardware = "DR0-DR3, shared with debug-register watchpoints"
    else:
        hardware = "none (add_breakpoint(hardware=True) raises KvmUnsupported)"
    return (
        f"{how}; KVM intercepts: {caught}; breakpoints and fuzzing coverage in user mode: "
        f"{d.get('breakpoints')} ({patch}); hardware breakpoints: {hardware}; "
        f"watchpoints: {watch}; KVM_CAP_SET_GUEST_DEBUG2: "
        f"{int(d.get('guest_debug_flags', 0)):#x}, interrupts during KVM single steps: {block}"
    )


def info() -> int:
    avail = kvmpy.available()
    is_vm = _is_vm()
    pgo = " (profile-optimised build)" if _native.PGO else ""
    print(f"kvmpy {kvmpy.__version__}{pgo}")
    print(f"CPU: {_cpu_model()}")
    host = {True: "a virtual machine (KVM here is nested)", False: "bare metal", None: "unknown"}
    print(f"host: {host[is_vm]}")
    if not avail:
        print(f"KVM: unavailable: {avail.reason}")
        print("verdict: KVM unusable: " + avail.reason)
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
    print("guest debugging: " + debugging())
    try:
        print("verdict: " + verdict(is_vm))
    except (kvmpy.KvmError, RuntimeError) as e:
        print(f"verdict: KVM opens, but a test guest failed: {e}")
        return 1
    return 0


DESCRIPTION = """\
Script KVM virtual machines from Python. Commands:

  demo   run two small guests (16-bit real mode, 64-bit user mode)
  info   describe this host's KVM and what it can run at native speed
  run    run a guest image: a flat binary, an ELF or a Multiboot kernel
  cc     compile a C guest with the guest SDK shipped in kvmpy

`python -m kvmpy COMMAND --help` describes each command.
"""

RUN_EPILOG = """\
The guest's console output goes to stdout as it arrives. The exit status is the
guest's exit code (an OUT to the exit port; values above 255 become 255) or 0
when it halts; when it stops any other way, a line on stderr says why and the
status is 125 (124 for --timeout). Mistakes in the arguments or the image: 2.
"""

CC_EPILOG = """\
Builds a freestanding 64-bit user-mode guest: crt0.S (entry at 0x100000, a
64 KiB stack, then main(rdi, rsi); its return value goes to the exit port 0xf4)
and kvmpy_guest.h (console, exit, host calls), from the directory
kvmpy.guest_sdk() names. Needs only gcc and binutils. Other options (-DNAME,
-O0, -Werror, ...) go to the compiler. Run the result with
`python -m kvmpy run guest.elf`.
"""


def cc(args: argparse.Namespace, extra: list[str]) -> int:
    output = args.output or str(args.sources[0]).rsplit(".", 1)[0] + ".elf"
    try:
        sdk.compile_guest(args.sources, output, extra=extra, cc=args.cc)
    except sdk.CompileError as e:
        print(f"kvmpy cc: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvmpy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvmpy {kvmpy.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="run the demo guests")
    d.add_argument(
        "--iterations",
        type=_run.parse_count,
        default=100_000_000,
        help="loop iterations of the 64-bit guest (default 1e8)",
    )
    sub.add_parser("info", help="describe this host's KVM")
    r = sub.add_parser(
        "run",
        help="run a guest image",
        description="Run a flat binary, an ELF or a Multiboot kernel in a new VM.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run.add_arguments(r)
    c = sub.add_parser(
        "cc",
        help="compile a C guest with the guest SDK",
        description="Compile C (or assembler) sources into a guest ELF.",
        epilog=CC_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="C or assembler files")
    c.add_argument("-o", dest="output", metavar="OUTPUT", help="the ELF (default: SOURCE.elf)")
    c.add_argument("--cc", help="the compiler (default: $CC, else gcc)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "cc":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "cc":
        return cc(args, extra)
    if args.command == "info":
        return info()
    if args.command == "run":
        return _run.main(args)
    avail = kvmpy.available()
    if not avail:
        print(f"kvmpy demo: KVM is unavailable: {avail.reason}", file=sys.stderr)
        return 1
    return demo(args.iterations)


if __name__ == "__main__":
    sys.exit(main())
