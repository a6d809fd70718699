"""A 16-bit real-mode guest prints over a console port and halts.

Output:
    Hello from real mode!
    halted at 0x100f
"""

import kvmpy

MESSAGE = b"Hello from real mode!\n"
code = bytes([
    0xBE, 0x11, 0x10,  # mov si, 0x1011 (the message, after the code)
    0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0xB9, len(MESSAGE), 0x00,  # mov cx, len
    0xFC,              # cld
    0xAC,              # l: lodsb
    0xEE,              # out dx, al
    0xE2, 0xFC,        # loop l
    0xF4,              # hlt
    0x90, 0x90,        # nop ; nop (padding up to 0x1011)
])  # fmt: skip

with kvmpy.Vm() as vm:
    ram = vm.add_memory(0, 1 << 20)
    ram.write(0x1000, code + MESSAGE)
    console = vm.add_console(0x3F8)
    cpu = vm.create_vcpu()
    cpu.setup_real_mode(cs=0, ip=0x1000)
    exit = cpu.run(timeout=10)
    assert exit.reason == "hlt", kvmpy.explain(exit, cpu)
    print(console.output().decode(), end="")
    print(f"halted at {cpu.regs.rip:#x}")
