"""64-bit user-mode code runs natively: a loop of 100 million iterations, one exit.

Output:
    sum of 1..100000000 = 5000000050000000
    exits: 1
"""

import kvmpy

N = 100_000_000
code = bytes([
    0x48, 0x89, 0xF9,  # mov rcx, rdi
    0x48, 0x01, 0xC8,  # l: add rax, rcx
    0x48, 0xFF, 0xC9,  # dec rcx
    0x75, 0xF8,        # jnz l
    0xE6, 0xF4,        # out 0xf4, al
])  # fmt: skip

with kvmpy.Vm() as vm:
    vm.add_memory(0, 2 << 20).write(0x10000, code)
    vm.add_exit_port(0xF4)
    cpu = vm.create_vcpu()
    cpu.setup_long_mode(user=True)
    cpu.set_regs(rip=0x10000, rdi=N, rax=0)
    exit = cpu.run(timeout=60)
    assert exit.reason == "exit", kvmpy.explain(exit, cpu)
    print(f"sum of 1..{N} = {cpu.regs.rax}")
    print(f"exits: {cpu.stats()['exits']}")
