"""Compiles a C guest with the SDK shipped in kvmpy (needs gcc) and runs it; the guest
asks Python for Fibonacci numbers with a host call.

Output:
    fib(10) = 55, fib(20) = 6765, fib(50) = 12586269025
"""

import tempfile
from pathlib import Path

import kvmpy

SOURCE = r"""
#include "kvmpy_guest.h"

int main(uint64_t a, uint64_t b)
{
    (void)a;
    (void)b;
    static const uint64_t ns[] = {10, 20, 50};
    for (int i = 0; i < 3; i++) {
        kvmpy_puts(i ? ", fib(" : "fib(");
        kvmpy_print_dec(ns[i]);
        kvmpy_puts(") = ");
        kvmpy_print_dec(kvmpy_hostcall1(7, ns[i]));
    }
    kvmpy_putc('\n');
    return 0;
}
"""


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


with tempfile.TemporaryDirectory() as tmp:
    source = Path(tmp, "fib.c")
    source.write_text(SOURCE)
    elf = kvmpy.compile_guest(source, Path(tmp, "fib.elf"))
    with kvmpy.Vm() as vm:
        vm.add_memory(0, 4 << 20)
        image = vm.load_elf(elf)
        console = vm.add_console(0x3F8)
        vm.add_exit_port(0xF4)
        vm.host_function(7, fib)
        cpu = vm.create_vcpu()
        cpu.setup_long_mode(user=True, exceptions=True)
        cpu.set_regs(rip=image.entry)
        exit = cpu.run(timeout=10)
        assert isinstance(exit, kvmpy.GuestExit), kvmpy.explain(exit, cpu, image.symbols)
        print(console.output().decode(), end="")
