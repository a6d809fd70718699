"""A device written in Python: a random-number port the guest reads eight times; the
guest sums the bytes and reports the sum on another port.

Output:
    the guest read 8 bytes and reported their sum: 1020
"""

import kvmpy

# Real mode: cx = 8; bx = 0; l: in al, 0x60; add bl, al; adc bh, 0; loop l;
# mov ax, bx; out 0x61, ax; hlt
code = bytes([
    0xB9, 0x08, 0x00,  # mov cx, 8
    0x31, 0xDB,        # xor bx, bx
    0xE4, 0x60,        # l: in al, 0x60
    0x00, 0xC3,        # add bl, al
    0x80, 0xD7, 0x00,  # adc bh, 0
    0xE2, 0xF7,        # loop l
    0x89, 0xD8,        # mov ax, bx
    0xE7, 0x61,        # out 0x61, ax
    0xF4,              # hlt
])  # fmt: skip


class Dice:
    """Port 0x60 gives the next "random" byte (0x7f and 0x80 in turn, so that the
    example's output is fixed); port 0x61 receives the guest's answer."""

    def __init__(self) -> None:
        self.reads = 0
        self.answer: int | None = None

    def __call__(self, exit: kvmpy.IoExit) -> int | None:
        if exit.port == 0x60 and not exit.is_write:
            self.reads += 1
            return 0x7F if self.reads % 2 else 0x80
        if exit.port == 0x61 and exit.is_write:
            self.answer = exit.value
        return None


dice = Dice()
with kvmpy.Vm() as vm:
    vm.add_memory(0, 1 << 20).write(0x1000, code)
    vm.on_io(range(0x60, 0x62), dice)
    cpu = vm.create_vcpu()
    cpu.setup_real_mode(ip=0x1000)
    exit = cpu.run(timeout=10)
    assert exit.reason == "hlt", kvmpy.explain(exit, cpu)
    print(f"the guest read {dice.reads} bytes and reported their sum: {dice.answer}")
