"""The gdb remote stub: a real gdb against a C guest, the remote protocol by hand
(Ctrl-C, threads, garbage, a second client), bad arguments, and `run --gdb`."""

from __future__ import annotations

import _thread
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvmpy

from .support import GUESTS, wait_until

pytestmark = pytest.mark.kvm

SOURCE = GUESTS / "c" / "gdb_counter.c"
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian: apt install gdb)")


@pytest.fixture(scope="module")
def elf(guest_dir: Path) -> Path:
    return guest_dir.parent / "c" / "build" / "gdb_counter.elf"


def line_of(text: str) -> int:
    """The line number of the guest's source line that contains `text`."""
    for number, line in enumerate(SOURCE.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} is not in {SOURCE}")


def counter_vm(elf: Path) -> tuple[kvmpy.Vm, kvmpy.Vcpu, kvmpy.Console, dict[str, int]]:
    """The gdb test guest at its entry, in 64-bit user mode with exception stubs."""
    vm = kvmpy.Vm()
    vm.add_memory(0, 4 << 20)
    image = vm.load_elf(elf)
    console = vm.add_console(0x3F8)
    vm.add_exit_port(0xF4)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True, tables_addr=0x200000)
    cpu.set_regs(rip=image.entry, rsp=0x1F0000)
    return vm, cpu, console, image.symbols


def loop_vm(cpus: int = 1) -> kvmpy.Vm:
    """vCPUs spinning in `jmp $` at 0x10000 + 0x10 * i (forever)."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 4 << 20)
    for i in range(cpus):
        ram.write(0x10000 + 0x10 * i, bytes([0x90, 0xEB, 0xFE]))  # nop; jmp $
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True, exceptions=True, tables_addr=0x200000)
        cpu.set_regs(rip=0x10000 + 0x10 * i)
    return vm


def counting_vm() -> tuple[kvmpy.Vm, kvmpy.MemoryRegion, kvmpy.Vcpu]:
    """A vCPU adding 1 to the qword at 0x20000 forever (`inc [0x20000]` at 0x10000, `jmp`
    back at 0x10008): the count shows that it runs."""
    vm = kvmpy.Vm()
    ram = vm.add_memory(0, 4 << 20)
    ram.write(0x10000, bytes([0x48, 0xFF, 0x04, 0x25, 0, 0, 2, 0, 0xEB, 0xF6]))
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True, tables_addr=0x200000)
    cpu.set_regs(rip=0x10000)
    return vm, ram, cpu


def gdb(elf: Path, port: int, *commands: str) -> str:
    """Runs gdb in batch mode against the stub on `port`; returns what it printed."""
    assert GDB is not None
    args = [GDB, "-batch", "-nx", "-ex", "set pagination off", "-ex", f"file {elf}"]
    args += ["-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def registers(output: str) -> dict[str, int]:
    """`info registers` lines: name -> value."""
    return {
        m.group(1): int(m.group(2), 16)
        for m in re.finditer(r"^(\w+)\s+(0x[0-9a-f]+)\s", output, re.MULTILINE)
    }


class Remote:
    """A gdb remote-protocol client, by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def _byte(self) -> int:
        if not self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.buf = data
        b, self.buf = self.buf[0], self.buf[1:]
        return b

    def reply(self) -> str:
        """The next packet's data (acknowledged)."""
        while (b := self._byte()) != ord("$"):
            pass
        data = bytearray()
        while (b := self._byte()) != ord("#"):
            data.append(b)
        self._byte(), self._byte()
        self.sock.sendall(b"+")
        # Run-length encoding: "c*N" is c and then N - 29 more of it.
        return re.sub(r"(.)\*(.)", lambda m: m[1] * (ord(m[2]) - 28), data.decode())

    def send(self, data: str) -> None:
        checksum = sum(data.encode()) & 0xFF
        self.sock.sendall(f"${data}#{checksum:02x}".encode())

    def ask(self, data: str) -> str:
        self.send(data)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def remote_of() -> Iterator[list[Remote]]:
    opened: list[Remote] = []
    yield opened
    for r in opened:
        r.close()


@needs_gdb
def test_gdb_breaks_steps_and_watches_what_the_guest_does(elf: Path) -> None:
    vm, cpu, console, symbols = counter_vm(elf)
    with vm:
        # Session 1: break main, continue, registers and stack; detach.
        with vm.gdb_server() as server:
            out = gdb(
                elf, server.port, "break main", "continue", "info registers", "x/8xg $rsp", "detach"
            )
            assert server.wait(30), out
            assert server.ending == "gdb detached"
        assert f"main (arg0=0, arg1=0) at gdb_counter.c:{line_of('total = 0')}" in out, out
        shown = registers(out)
        regs = cpu.regs
        assert symbols["main"] < regs.rip < symbols["main"] + 0x40
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r15"):
            assert shown[name] == getattr(regs, name), name
        assert shown["rip"] == regs.rip
        assert shown["eflags"] == regs.rflags
        assert shown["cs"] == cpu.sregs.cs.selector
        stack = re.findall(r"^0x[0-9a-f]+:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out, re.MULTILINE)
        words = [int(w, 16) for pair in stack for w in pair]
        assert words == list(struct.unpack("<8Q", cpu.read_virtual(regs.rsp, 64)))
        assert vm.breakpoints == [], "gdb's breakpoints go with its session"

        # Session 2, from where session 1 left the guest: stepi, next, a watchpoint.
        with vm.gdb_server() as server:
            out = gdb(
                elf,
                server.port,
                "x/2i $pc",
                "stepi",
                "info registers rip",
                "next",
                "watch counter",
                "continue",
                "print counter",
                "info registers rip",
                "detach",
            )
            assert server.wait(60), out
        # stepi: RIP at the instruction after the one x/2i showed first.
        listed = re.findall(r"^(?:=>)?\s+(0x[0-9a-f]+) <main\+\d+>:", out, re.MULTILINE)
        assert int(listed[0], 16) == regs.rip
        rips = [int(v, 16) for v in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.MULTILINE)]
        assert rips[0] == int(listed[1], 16), out
        assert f"{line_of('total = bump(i)')}\t        total = bump(i);" in out, out
        assert re.search(r"Hardware watchpoint \d+: counter\n\nOld value = 0\nNew value = 1\n", out)
        assert f"bump (by=1) at gdb_counter.c:{line_of('return counter')}" in out, out
        assert "$1 = 1" in out, out
        # The guest is stopped where gdb left it.
        assert cpu.regs.rip == rips[1]
        assert symbols["bump"] <= rips[1] < symbols["main"]
        assert struct.unpack("<Q", cpu.read_virtual(symbols["counter"], 8)) == (1,)

        # Session 3: a read watchpoint (bump reads counter before it adds to it), an
        # access watchpoint (the write that follows), then gdb's own software watchpoints.
        with vm.gdb_server() as server:
            out = gdb(
                elf,
                server.port,
                "rwatch counter",
                "continue",
                "delete",
                "awatch counter",
                "continue",
                "delete",
                "set can-use-hw-watchpoints 0",
                "watch counter",
                "continue",
                "detach",
            )
            assert server.wait(60), out
        assert re.search(r"Hardware read watchpoint \d+: counter\n\nValue = 1\n", out), out
        assert re.search(r"Hardware access \(read/write\) watchpoint \d+: counter\n\n", out), out
        assert re.search(r"\nWatchpoint \d+: counter\n\nOld value = 1\nNew value = 3\n", out), out
        # gdb's watchpoints went with its session: all four can be set from Python.
        for i in range(4):
            cpu.add_watchpoint(symbols["counter"] + 8 * i, 8)
        for i in range(4):
            cpu.remove_watchpoint(symbols["counter"] + 8 * i, 8)
        assert struct.unpack("<Q", cpu.read_virtual(symbols["counter"], 8)) == (3,)

        # Session 4: finish (out of bump), then next over the call to bump(3).
        with vm.gdb_server() as server:
            out = gdb(elf, server.port, "finish", "next", "next", "next", "print counter", "detach")
            assert server.wait(60), out
        assert "Value returned is $1 = 3" in out, out
        lines = re.findall(r"^(\d+)\t", out, re.MULTILINE)
        for_line, call_line = line_of("for (uint64_t"), line_of("total = bump(i)")
        assert lines[-3:] == [str(for_line), str(call_line), str(for_line)], out
        assert "$2 = 6" in out, out
        # And the guest runs on from Python.
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 55
        assert console.output() == b"counter = 55\n"


@needs_gdb
def test_a_second_gdb_is_refused_with_a_clear_message(elf: Path, remote_of: list[Remote]) -> None:
    vm, cpu, _, _ = counter_vm(elf)
    with vm, vm.gdb_server() as server:
        first = Remote(server.port)
        remote_of.append(first)
        assert first.ask("?").startswith("T05")
        assert server.client is not None
        out = gdb(elf, server.port, "info registers rip")
        assert "another gdb is attached to this VM" in out, out
        assert server.refused == 1
        assert server.ending is None, "the first session goes on"
        assert first.ask("qfThreadInfo").startswith("m")
        first.send("D")
        assert first.reply() == "OK"
        assert server.wait(10) and server.ending == "gdb detached"


def test_garbage_and_a_disconnect_mid_packet_leave_the_vm_usable(
    elf: Path, remote_of: list[Remote]
) -> None:
    vm, cpu, console, _ = counter_vm(elf)
    with vm, vm.gdb_server() as server:
        r = Remote(server.port)
        remote_of.append(r)
        r.sock.sendall(b"\x00\xffgarbage$zz#00$m10000")  # a bad checksum, then half a packet
        r.close()
        assert server.wait(10)
        assert server.ending is not None and server.ending.startswith("the gdb connection broke")
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit) and exit.code == 55
        assert console.output() == b"counter = 55\n"


def test_a_session_with_vcpus_python_runs_fails_clearly(remote_of: list[Remote]) -> None:
    vm, ram, _ = counting_vm()
    with vm:
        vm.start()
        wait_until(lambda: ram.read(0x20000, 8) != bytes(8), "the guest to run")
        with vm.gdb_server() as server:
            r = Remote(server.port)
            remote_of.append(r)
            r.send("g")
            with pytest.raises(ConnectionError):
                r.reply()
            assert server.wait(10)
            assert server.ending is not None
            assert server.ending.startswith("the session failed: ")
            assert "vCPU 0 is running on another thread" in server.ending
        vm.stop()
        assert [e.reason for e in vm.join(10) or []] == ["stopped"]


@needs_gdb
def test_ctrl_c_in_gdb_interrupts_the_guest() -> None:
    vm, ram, cpu = counting_vm()
    with vm, vm.gdb_server() as server:
        assert GDB is not None
        args = [GDB, "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{server.port}"]
        args += ["-ex", "continue", "-ex", "info registers rip", "-ex", "detach"]
        gdb = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: ram.read(0x20000, 8) != bytes(8), "gdb's continue")
            gdb.send_signal(signal.SIGINT)  # what Ctrl-C in gdb's terminal does
            out, _ = gdb.communicate(timeout=60)
        finally:
            gdb.kill()
        assert server.wait(30), out
        assert "Program received signal SIGINT, Interrupt." in out, out
        rip = int(re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.MULTILINE)[0], 16)
        assert rip in (0x10000, 0x10008) and cpu.regs.rip == rip


def test_closing_the_vm_ends_the_session(remote_of: list[Remote]) -> None:
    vm, ram, _ = counting_vm()
    server = vm.gdb_server()
    r = Remote(server.port)
    remote_of.append(r)
    r.send("vCont;c")
    wait_until(lambda: ram.read(0x20000, 8) != bytes(8), "gdb's continue")
    vm.close()  # stops the guest: gdb hears SIGINT, and the next request ends the session
    assert r.reply().startswith("T02")
    r.send("g")
    assert server.wait(10)
    assert server.ending == "the session failed: Target threw a fatal error: VM is closed"
    server.close()


def test_ctrl_c_from_gdb_stops_the_running_guest(remote_of: list[Remote]) -> None:
    vm = loop_vm()
    cpu = vm.vcpus[0]
    with vm, vm.gdb_server() as server:
        r = Remote(server.port)
        remote_of.append(r)
        r.send("vCont;c")
        with pytest.raises(TimeoutError):
            r.sock.settimeout(0.3)
            r.reply()  # still running: no stop reply
        r.sock.settimeout(20)
        r.sock.sendall(b"\x03")
        assert r.reply().startswith("T02"), "SIGINT"
        # The same while the stub single-steps the guest for a write watchpoint of 16
        # bytes (longer than a page watchpoint), with a read watchpoint on the page too.
        assert r.ask("Z2,20000,10") == "OK"
        assert r.ask("Z3,20000,8") == "OK"
        assert r.ask("Z3,20001,8").startswith("E"), "unaligned read watchpoints: refused"
        r.send("vCont;c")
        with pytest.raises(TimeoutError):
            r.sock.settimeout(0.3)
            r.reply()
        r.sock.settimeout(20)
        r.sock.sendall(b"\x03")
        assert r.reply().startswith("T02"), "SIGINT"
        assert r.ask("z2,20000,10") == "OK"
        assert r.ask("z3,20000,8") == "OK"
        r.send("D")
        assert r.reply() == "OK"
        assert server.wait(10) and server.ending == "gdb detached"
        assert cpu.regs.rip in (0x10001, 0x10003), "in the loop, left stopped"
        assert cpu.run(timeout=0.2).reason == "timeout", "the VM runs again from Python"


def test_a_handler_exception_stops_the_guest_and_is_raised_by_wait(
    remote_of: list[Remote],
) -> None:
    vm = kvmpy.Vm()
    vm.add_memory(0, 4 << 20).write(0x10000, bytes([0xE6, 0x10, 0xEB, 0xFE]))  # out 0x10, al
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True, exceptions=True, tables_addr=0x200000)
    cpu.set_regs(rip=0x10000)

    @vm.on_io(0x10)
    def device(exit: kvmpy.IoExit) -> None:
        raise RuntimeError("the device broke")

    with vm, vm.gdb_server() as server:
        r = Remote(server.port)
        remote_of.append(r)
        r.send("vCont;c")
        assert r.reply().startswith("T06"), "SIGABRT"
        r.send("D")
        assert r.reply() == "OK"
        with pytest.raises(RuntimeError, match="the device broke"):
            server.wait(10)
        assert server.wait(0) is True, "raised once"
        assert server.ending == "gdb detached"


def test_each_vcpu_is_a_thread_with_its_own_registers(remote_of: list[Remote]) -> None:
    vm = loop_vm(cpus=2)
    with vm, vm.gdb_server() as server:
        r = Remote(server.port)
        remote_of.append(r)
        threads = r.ask("qfThreadInfo")
        assert threads.startswith("m") and sorted(int(t, 16) for t in threads[1:].split(",")) == [
            1,
            2,
        ]
        for tid, rip in ((1, 0x10000), (2, 0x10010)):
            assert r.ask(f"Hg{tid}") == "OK"
            regs = bytes.fromhex(r.ask("g"))
            assert struct.unpack_from("<Q", regs, 16 * 8) == (rip,), f"thread {tid}"
        # Memory by guest-virtual address, through the page tables.
        assert r.ask("m10010,3") == "90ebfe"
        assert r.ask("mffff800000000000,4").startswith("E")
        # A breakpoint on vCPU 1's loop: vCPU 1 reports it, as thread 2.
        assert r.ask("Z0,10011,1") == "OK"
        r.send("vCont;c")
        assert r.reply().startswith("T05"), "SIGTRAP"
        assert r.ask("Z0,10011,1") == "OK", "adding it twice is harmless"
        assert r.ask("z0,10011,1") == "OK"
        assert r.ask("m10011,2") == "ebfe", "memory shows no patch byte"
        r.send("k")
        assert server.wait(10) and server.ending == "gdb sent kill"
        assert vm.breakpoints == []


@needs_gdb
def test_gdb_lists_the_vcpus_as_threads_and_hbreak_where_the_host_has_it(elf: Path) -> None:
    d = kvmpy._native._debug_support()
    has_them = bool(d["hw_breakpoints"]) and d["mechanism"] == "kvm"
    vm = loop_vm(cpus=2)
    with vm, vm.gdb_server() as server:
        out = gdb(
            elf,
            server.port,
            "info threads",
            "thread 2",
            "info registers rip",
            "hbreak *0x10001",
            "continue",
            "info registers rip",
            "delete",
            "break *0x10001",
            "continue",
            "info registers rip",
            "detach",
        )
        assert server.wait(30), out
        assert vm.breakpoints == [], "gdb's breakpoints go with its session"
        assert vm.vcpus[0].regs.rip == 0x10001
        assert vm.vcpus[1].regs.rip in (0x10010, 0x10011), "stopped with vCPU 0"
    assert re.search(r"1\s+Thread 1\.1\s+0x0+10000 in", out), out
    assert re.search(r"2\s+Thread 1\.2\s+0x0+10010 in", out), out
    rips = [int(v, 16) for v in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.MULTILINE)]
    if has_them:
        assert "Hardware assisted breakpoint 1 at 0x10001" in out, out
        assert rips == [0x10010, 0x10001, 0x10001], out
    else:
        # gdb cannot insert the breakpoint and prints why; nothing runs, and the session
        # goes on (a patched breakpoint then stops thread 1 there).
        why = "did not fire in the probe guest" if not d["hw_breakpoints"] else "exception stubs"
        assert re.search(
            r"Cannot insert hardware breakpoint 1:\s*Remote failure reply: hardware "
            rf"breakpoints: [^\n]*{why}",
            out,
        ), out
        assert rips == [0x10010, 0x10010, 0x10001], out


def test_serve_gdb_blocks_until_the_session_ends() -> None:
    vm = loop_vm()
    with vm:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def client() -> None:
            for _ in range(600):
                try:
                    r = Remote(port)
                    break
                except ConnectionRefusedError:
                    threading.Event().wait(0.05)
            else:
                _thread.interrupt_main()  # never listening: fail instead of hanging
                return
            r.send("D")
            r.reply()
            r.close()

        t = threading.Thread(target=client)
        t.start()
        try:
            assert vm.serve_gdb(port) == "gdb detached"
        except KeyboardInterrupt:
            pytest.fail(f"serve_gdb({port}) never listened")
        finally:
            t.join()


def test_bad_arguments_and_hosts_it_cannot_debug() -> None:
    with kvmpy.Vm() as vm:
        with pytest.raises(ValueError, match="no vCPUs"):
            vm.gdb_server()
        vm.add_memory(0, 2 << 20)
        cpu = vm.create_vcpu()
        cpu.setup_real_mode()
        if kvmpy._native._debug_support()["mechanism"] == "exception-stubs":
            with pytest.raises(kvmpy.KvmUnsupported, match="exceptions=True"):
                vm.gdb_server()
        cpu.setup_long_mode(user=True, exceptions=True)
        with pytest.raises(ValueError, match="65535"):
            vm.gdb_server(65536)
        with pytest.raises(ValueError, match="cannot resolve"):
            vm.gdb_server(0, "no such host.invalid")
        with vm.gdb_server() as server:
            with pytest.raises(kvmpy.VcpuBusyError, match="already has a gdb server"):
                vm.gdb_server()
            with kvmpy.Vm() as other:
                other.add_memory(0, 2 << 20)
                other.create_vcpu().setup_long_mode(user=True, exceptions=True)
                with pytest.raises(OSError, match="cannot listen"):
                    other.gdb_server(server.port)
                other.gdb_server().close()
            assert repr(server).endswith("waiting for gdb)")
            assert server.vm is vm
        assert server.ending == "the server was closed"
        vm.gdb_server().close()  # closed: the VM may have another
        server.close()
        assert server.wait(0) is True
        with pytest.raises(ValueError):
            server.wait(-1)
    with pytest.raises(kvmpy.VmClosedError):
        vm.gdb_server()


def test_gdb_server_survives_every_wrong_argument() -> None:
    from .test_no_panic import HOSTILE, argument_lists

    vm = loop_vm()
    with vm:
        for args, kwargs in argument_lists(vm.gdb_server):
            try:
                server = vm.gdb_server(*args, **kwargs)
            except Exception:
                continue
            with server:
                assert server.wait(0) is False, "no client yet"
                for value in HOSTILE:
                    try:
                        server.close(value)
                    except TypeError:
                        pass
                server.close()
                for value in HOSTILE:  # after the session: returns at once, or raises
                    try:
                        server.wait(value)
                    except Exception:
                        pass
                assert server.ending == "the server was closed"


def test_run_waits_for_gdb_and_runs_on_when_it_detaches(elf: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(elf), "--gdb", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
    assert m, line
    r = Remote(int(m.group(1)))
    try:
        assert r.ask("Z0,100000,1") == "OK"  # the entry point: hit at once
        r.send("vCont;c")
        assert r.reply().startswith("T05")
        r.send("D")
        assert r.reply() == "OK"
    finally:
        r.close()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (55, "counter = 55\n"), err


def test_run_ends_when_gdb_kills_the_guest(elf: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(elf), "--gdb", ":0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", proc.stderr.readline())
    assert m
    r = Remote(int(m.group(1)))
    try:
        r.send("k")
    finally:
        r.close()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (125, ""), err
    assert "gdb killed the guest" in err


def test_run_rejects_a_bad_gdb_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", "hello64.bin", "--gdb", "localhost:x"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "expected HOST:PORT" in done.stderr


@needs_gdb
def test_python_handlers_see_python_breakpoints_and_gdb_sees_its_own(elf: Path) -> None:
    vm, cpu, console, symbols = counter_vm(elf)
    mark = 0x300000  # free memory: the handler writes how often it ran
    with vm:
        vm.add_breakpoint(symbols["bump"])
        seen: list[tuple[int, int]] = []

        @vm.on_breakpoint
        def count(exit: kvmpy.BreakpointExit) -> None:
            seen.append((exit.address, cpu.regs.rdi))
            vm.write(mark, len(seen).to_bytes(8, "little"))

        with vm.gdb_server() as server:
            out = gdb(
                elf,
                server.port,
                "break main",
                "continue",  # gdb's breakpoint: gdb stops, the handler is not called
                "x/1xg 0x300000",
                "break *bump",
                "continue",  # both set it: the handler runs first, then gdb stops
                "x/1xg 0x300000",
                "info registers rdi",
                "delete",
                "continue",  # Python's alone: the handler runs, gdb does not stop
            )
            assert server.wait(60), out
        assert f"main (arg0=0, arg1=0) at gdb_counter.c:{line_of('total = 0')}" in out, out
        marks = re.findall(r"^0x300000:\s+(0x[0-9a-f]+)", out, re.MULTILINE)
        assert [int(m, 16) for m in marks] == [0, 1], out
        assert re.search(r"^rdi\s+0x1\s", out, re.MULTILINE), out
        assert "SIGTRAP" not in out, out
        assert "exited with code 067" in out, out  # 55, which gdb prints in octal
        assert seen == [(symbols["bump"], i) for i in range(1, 11)]
        assert console.output() == b"counter = 55\n"
        assert vm.breakpoints == [symbols["bump"]], "Python's stays; gdb's went"
