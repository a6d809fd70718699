"""`python -m kvmpy run IMAGE`: images, modes, devices, exit statuses and messages."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .support import CTRL_C_HEARD, ROOT


def run_image(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", *args], capture_output=True, timeout=120, cwd=cwd
    )


@pytest.mark.kvm
def test_a_shipped_real_mode_guest_prints_and_halts(tmp_path: Path) -> None:
    done = run_image("--mode", "real", "hello_real.bin", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"Hello from a KVM guest!\n", b"")


@pytest.mark.kvm
def test_a_multiboot_kernel_gets_its_cmdline_and_modules(guest_dir: Path, tmp_path: Path) -> None:
    module = tmp_path / "mod.bin"
    module.write_bytes(b"x" * 100)
    done = run_image(
        str(guest_dir / "multiboot_hello.elf"),
        "--cmdline",
        "quiet splash",
        "--module",
        str(module),
        "--module",
        f"{module}=second",
    )
    assert done.stdout.decode().splitlines() == [
        "Hello from a multiboot kernel!",
        "cmdline: quiet splash",
        "modules: 2",
    ]
    assert done.returncode == (0x21 << 1) | 1, done.stderr  # isa-debug-exit by default


@pytest.mark.kvm
def test_a_c_guest_exits_with_its_code(guest_dir: Path) -> None:
    done = run_image(str(guest_dir.parent / "c" / "build" / "crash.elf"), "--reg", "rdi=9")
    assert (done.returncode, done.stderr) == (7, b"")


@pytest.mark.kvm
def test_a_flat_user_mode_guest_with_registers(guest_dir: Path) -> None:
    # compute64: RDI LCG steps, the result to port 0x11 (no device here), then exit 0.
    done = run_image(str(guest_dir / "hello64.bin"), "--reg", "rdi=0")
    assert done.stdout == b"Hello from 64-bit user mode!\n"
    assert done.returncode == 125
    assert done.stderr.decode().startswith(
        "kvmpy run: the guest wrote 0x0 to I/O port 0x11, which no device handles at rip="
    )


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (0, "#DE divide error at rip=0x"),
        (1, "#UD invalid opcode at rip=0x"),
        (2, "#PF page fault at rip=0x"),
        (3, "#GP general protection fault at rip=0x"),
    ],
)
def test_an_exception_names_the_function_and_instruction(
    guest_dir: Path, kind: int, message: str
) -> None:
    done = run_image(str(guest_dir.parent / "c" / "build" / "crash.elf"), "--reg", f"rdi={kind}")
    assert done.returncode == 125
    line = done.stderr.decode()
    assert line.startswith("kvmpy run: " + message), line
    assert " (main+0x" in line and line.count("\n") == 1
    if kind == 1:
        assert ": ud2" in line
    if kind == 2:
        assert "(write of 0x40000000: not mapped)" in line


@pytest.mark.kvm
def test_a_timeout_says_where_the_guest_was(tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(bytes([0x90, 0xEB, 0xFE]))  # nop ; jmp $
    done = run_image(str(spin), "--timeout", "0.2")
    assert done.returncode == 124
    assert done.stderr.decode() == "kvmpy run: timed out after 0.2 s at rip=0x10001: jmp 0x10001\n"


@pytest.mark.kvm
def test_a_ring0_triple_fault_is_explained(tmp_path: Path) -> None:
    image = tmp_path / "ud.bin"
    image.write_bytes(bytes([0x0F, 0x0B]))  # ud2 in 32-bit protected mode with no IDT
    done = run_image(str(image), "--mode", "protected")
    assert done.returncode == 125
    assert done.stderr.decode().startswith(
        "kvmpy run: the guest shut down (a triple fault) at rip=0x10000: ud2; "
    )


@pytest.mark.kvm
def test_several_vcpus(guest_dir: Path) -> None:
    # smp64 "count": each vCPU adds RDI to the counter, waits for RSI vCPUs, exits 0.
    done = run_image(
        str(guest_dir / "smp64.bin"), "--cpus", "3", "--reg", "rdi=1000", "--reg", "rsi=3"
    )
    assert done.returncode == 125  # the result port 0x11 has no device
    assert b"I/O port 0x11" in done.stderr and b"vCPU " in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-file"], "cannot read no-such-file: No such file or directory (guests shipped"),
        (["hello64.bin", "--memory", "1000"], "not a positive multiple of 4 KiB"),
        (["hello64.bin", "--memory", "lots"], "not a size"),
        (["hello64.bin", "--console", "0x10000"], "outside 0..0xffff"),
        (["hello64.bin", "--reg", "rxx=1"], "register name"),
        (["hello64.bin", "--mode", "vm86"], "invalid choice"),
        (["hello64.bin", "--cpus", "0"], "--cpus must be 1 to 64"),
        (["hello64.bin", "--timeout", "-1"], "--timeout must be"),
        pytest.param(["hello64.bin", "--memory", "8K"], "cannot load", marks=pytest.mark.kvm),
        (["multiboot_hello.elf", "--cpus", "2"], "one vCPU"),
        (["/dev/null"], "/dev/null is empty"),
        (["/"], "cannot read /: Is a directory"),
        pytest.param(
            ["hello_real.bin", "--mode", "real", "--load", "0x200000", "--memory", "1M"],
            "cannot load hello_real.bin: ",
            marks=pytest.mark.kvm,
        ),
    ],
)
def test_mistakes_are_one_line_and_status_2(args: list[str], message: str) -> None:
    done = run_image(*args)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse shows the usage first
    assert last.startswith(("kvmpy run: ", "python -m kvmpy run: error: ")), err
    assert message in last, err


@pytest.mark.kvm
def test_a_bad_multiboot_module_is_a_clear_error(guest_dir: Path) -> None:
    done = run_image(str(guest_dir / "multiboot_hello.elf"), "--module", "/nonexistent")
    assert done.returncode == 2
    assert done.stderr.decode().startswith("kvmpy run: cannot load ")
    assert "Traceback" not in done.stderr.decode()


@pytest.mark.kvm
def test_output_streams_while_the_guest_runs_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    image = tmp_path / "spin.bin"
    # mov dx, 0x3f8 ; mov al, 'h' ; out dx, al ; mov al, '\n' ; out dx, al ; jmp $
    image.write_bytes(
        bytes([0x66, 0xBA, 0xF8, 0x03, 0xB0, ord("h"), 0xEE, 0xB0, ord("\n"), 0xEE, 0xEB, 0xFE])
    )
    # `python -m kvmpy run IMAGE`, hearing Ctrl-C even where the tests' SIGINT is ignored.
    run_cli = "import runpy, sys; sys.argv[1:] = ['run', sys.argv[1]]; "
    run_cli += "runpy.run_module('kvmpy', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_HEARD + run_cli, str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"h\n"  # while the guest still spins
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == b"kvmpy run: interrupted\n"


@pytest.mark.kvm
def test_exit_codes_above_255_become_255(tmp_path: Path) -> None:
    image = tmp_path / "exit.bin"
    image.write_bytes(bytes([0xB8, 0x2C, 0x01, 0x00, 0x00, 0xE7, 0xF4]))  # mov eax, 300 ; out
    assert run_image(str(image)).returncode == 255
    image.write_bytes(bytes([0xB8, 0x00, 0x01, 0x00, 0x00, 0xE7, 0xF4]))  # 256 is not success
    assert run_image(str(image)).returncode == 255


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x7fELF\x07", "an ELF file of unknown class"),
        pytest.param(
            b"\x7fELF\x02\x01\x01", "truncated or malformed ELF file", marks=pytest.mark.kvm
        ),
    ],
)
def test_a_bad_elf_is_named(tmp_path: Path, data: bytes, message: str) -> None:
    image = tmp_path / "bad.elf"
    image.write_bytes(data)
    done = run_image(str(image))
    assert done.returncode == 2
    assert done.stderr.decode().startswith(f"kvmpy run: cannot load {image}: ")
    assert message in done.stderr.decode()
