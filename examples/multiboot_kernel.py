"""Boots the Multiboot kernel shipped with kvmpy as QEMU's -kernel would, with a UART
and an isa-debug-exit port.

Output:
    Hello from a multiboot kernel!
    cmdline: console=ttyS0
    modules: 1
    exit code 0x43
"""

import kvmpy

with kvmpy.Vm() as vm:
    vm.add_memory(0, 4 << 20)
    uart = vm.add_uart(0x3F8)
    vm.add_debug_exit(0xF4)
    cpu = vm.create_vcpu()
    kernel = kvmpy.shipped_guest("multiboot_hello.elf")
    vm.load_multiboot(cpu, kernel, cmdline="console=ttyS0", modules=[(b"initrd", "initrd")])
    exit = cpu.run(timeout=30)
    assert isinstance(exit, kvmpy.GuestExit), kvmpy.explain(exit, cpu)
    print(uart.output().decode(), end="")
    print(f"exit code {exit.code:#x}")
