"""Plain Python on the KVM API: what a user without kvmpy writes.

``fcntl.ioctl`` on ``/dev/kvm``, ``ctypes`` structures for the KVM structs, the vCPU's
``kvm_run`` area mapped with ``mmap``, and a ``KVM_RUN`` loop in Python that reads the exit
reason from that mapping. The guest setup is the same as kvmpy's
``setup_long_mode(user=True)`` and ``raw_kvm.c``'s.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from types import TracebackType

from benchmarks.common import DEVICE_PORT, EXIT_PORT, GUEST_RAM, LOAD_ADDR, BenchError

# ioctl numbers (linux/kvm.h, x86_64).
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_EXIT_IO = 2
KVM_EXIT_IO_OUT = 1
TSS_ADDRESS = 0xFFFBD000  # what kvmpy passes to KVM_SET_TSS_ADDR

# Guest layout, as kvmpy's setup_long_mode(user=True) writes it.
GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
TSS_SIZE = 0x68 + 8192 + 1
PML4_ADDR = 0x5000
PDPT_ADDR = 0x6000
PD_ADDR = 0x7000


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs``."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``."""

    _fields_ = [
        *((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``."""

    _fields_ = [
        *((name, c_uint32) for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")),
        ("padding", c_uint32 * 3),
    ]


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` with room for 256 entries."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * 256)]


class KvmRunIo(ctypes.Structure):
    """The ``io`` member of ``struct kvm_run``'s exit union."""

    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class KvmRunHeader(ctypes.Structure):
    """The start of ``struct kvm_run``, up to the ``io`` exit member."""

    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("io", KvmRunIo),
    ]


for _struct, _size in ((KvmRegs, 144), (KvmSregs, 312), (KvmSegment, 24), (KvmCpuidEntry2, 40)):
    assert ctypes.sizeof(_struct) == _size, _struct


_libc = ctypes.CDLL(None, use_errno=True)


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure = 0) -> int:
    """``fcntl.ioctl``, retried on EINTR; structures are passed by reference (mutable)."""
    while True:
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(fd, request, arg)
            return int(fcntl.ioctl(fd, request, arg, True))
        except InterruptedError:
            continue


class _Kvm:
    """The ``/dev/kvm`` fd and what every VM needs from it, opened once per process."""

    _instance: _Kvm | None = None

    def __init__(self) -> None:
        self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.run_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        self.cpuid = KvmCpuid2(nent=256)
        _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, self.cpuid)

    @classmethod
    def get(cls) -> _Kvm:
        """The shared instance."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


class RawVm:
    """A VM with one memory slot at guest address 0 and one vCPU, in plain Python."""

    def __init__(self, mem_size: int = GUEST_RAM) -> None:
        kvm = _Kvm.get()
        self.vm_fd = _ioctl(kvm.fd, KVM_CREATE_VM)
        # fcntl.ioctl passes an int argument as a C int, too small for this address.
        if _libc.ioctl(self.vm_fd, KVM_SET_TSS_ADDR, ctypes.c_ulong(TSS_ADDRESS)) < 0:
            raise OSError(ctypes.get_errno(), "KVM_SET_TSS_ADDR")
        self.mem = mmap.mmap(
            -1,
            mem_size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
        )
        self._mem_anchor = ctypes.c_char.from_buffer(self.mem)
        region = KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=mem_size,
            userspace_addr=ctypes.addressof(self._mem_anchor),
        )
        _ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region)
        self.vcpu_fd = _ioctl(self.vm_fd, KVM_CREATE_VCPU, 0)
        self.run_map = mmap.mmap(self.vcpu_fd, kvm.run_size)
        self.run = KvmRunHeader.from_buffer(self.run_map)
        cpuid = kvm.cpuid
        for i in range(cpuid.nent):  # kvmpy's CPUID tweaks for vCPU 0
            e = cpuid.entries[i]
            if e.function == 1:
                e.ebx &= 0x00FFFFFF
                e.ecx |= 1 << 31
            elif e.function in (0xB, 0x1F):
                e.edx = 0
        _ioctl(self.vcpu_fd, KVM_SET_CPUID2, cpuid)

    def close(self) -> None:
        """Closes the vCPU and VM and unmaps the memory."""
        del self.run
        self.run_map.close()
        os.close(self.vcpu_fd)
        os.close(self.vm_fd)
        del self._mem_anchor
        self.mem.close()

    def __enter__(self) -> RawVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def load(self, addr: int, code: bytes) -> None:
        """Copies ``code`` into guest memory at ``addr``."""
        self.mem[addr : addr + len(code)] = code

    def setup_long_mode(self, rip: int, rdi: int) -> None:
        """64-bit CPL3 with paging, as kvmpy's ``setup_long_mode(user=True)``."""
        mem = self.mem
        struct.pack_into("<Q", mem, PML4_ADDR, PDPT_ADDR | 7)
        struct.pack_into("<Q", mem, PDPT_ADDR, PD_ADDR | 7)
        struct.pack_into("<512Q", mem, PD_ADDR, *((i << 21) | 0x87 for i in range(512)))
        lim = TSS_SIZE - 1
        tss_desc = (
            (lim & 0xFFFF)
            | ((lim >> 16) << 48)
            | ((TSS_ADDR & 0xFFFFFF) << 16)
            | (0x8B << 40)
            | ((TSS_ADDR >> 24) << 56)
        )
        gdt = [
            0,
            0x00AF9B000000FFFF,
            0x00CF93000000FFFF,
            0x00AFFB000000FFFF,
            0x00CFF3000000FFFF,
            tss_desc,
            0,
        ]
        struct.pack_into("<7Q", mem, GDT_ADDR, *gdt)
        mem[TSS_ADDR : TSS_ADDR + TSS_SIZE] = bytes(TSS_SIZE)
        struct.pack_into("<H", mem, TSS_ADDR + 0x66, 0x68)
        mem[TSS_ADDR + TSS_SIZE - 1] = 0xFF

        sregs = KvmSregs()
        _ioctl(self.vcpu_fd, KVM_GET_SREGS, sregs)
        code = KvmSegment(
            base=0, limit=0xFFFFFFFF, selector=0x1B, type=0xB, present=1, dpl=3, db=0, s=1, l=1, g=1
        )
        data = KvmSegment(
            base=0, limit=0xFFFFFFFF, selector=0x23, type=0x3, present=1, dpl=3, db=1, s=1, l=0, g=1
        )
        sregs.cs = code
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data)
        sregs.tr = KvmSegment(base=TSS_ADDR, limit=lim, selector=0x28, type=0xB, present=1)
        sregs.gdt = KvmDtable(base=GDT_ADDR, limit=7 * 8 - 1)
        sregs.idt = KvmDtable(base=0, limit=0)
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80050033, PML4_ADDR, 0x620, 0xD01
        _ioctl(self.vcpu_fd, KVM_SET_SREGS, sregs)
        _ioctl(self.vcpu_fd, KVM_SET_REGS, KvmRegs(rip=rip, rdi=rdi, rflags=0x3002))

    def run_counter(self) -> tuple[int, int]:
        """The ``KVM_RUN`` loop: counts OUTs to the device port until the exit port.
        Returns (exits, device writes)."""
        ioctl = fcntl.ioctl
        fd = self.vcpu_fd
        run = self.run
        io = run.io
        run_map = self.run_map
        exits = writes = 0
        last = 0
        while True:
            ioctl(fd, KVM_RUN, 0)
            exits += 1
            if run.exit_reason != KVM_EXIT_IO or io.direction != KVM_EXIT_IO_OUT:
                raise BenchError(f"unexpected exit {run.exit_reason} after {exits} exits")
            port = io.port
            if port == DEVICE_PORT:
                last = run_map[io.data_offset]  # the "device" reads the byte
                writes += 1
            elif port == EXIT_PORT:
                break
            else:
                raise BenchError(f"OUT to unexpected port {port:#x} ({last})")
        return exits, writes


class Exits:
    """counter64 on one plain-Python VM kept for many runs."""

    def __init__(self, code: bytes) -> None:
        self.vm = RawVm()
        self.vm.load(LOAD_ADDR, code)
        self.vm.setup_long_mode(LOAD_ADDR, 0)

    def __call__(self, n: int) -> float:
        """Seconds for one run with ``n`` device exits (n + 1 exits in all)."""
        _ioctl(self.vm.vcpu_fd, KVM_SET_REGS, KvmRegs(rip=LOAD_ADDR, rdi=n, rflags=0x3002))
        start = time.perf_counter()
        total, writes = self.vm.run_counter()
        elapsed = time.perf_counter() - start
        if total != n + 1 or writes != n:
            raise BenchError(f"plain Python: {total} exits, {writes} device writes for N={n}")
        return elapsed

    def close(self) -> None:
        """Closes the VM."""
        self.vm.close()


def create(k: int, mem_size: int = 64 << 20) -> float:
    """Seconds to create and close ``k`` VMs with one vCPU and ``mem_size`` bytes of RAM."""
    _Kvm.get()
    start = time.perf_counter()
    for _ in range(k):
        RawVm(mem_size).close()
    return time.perf_counter() - start


def regs(k: int) -> float:
    """Seconds for ``k`` KVM_GET_REGS + KVM_SET_REGS round trips from Python."""
    with RawVm() as vm:
        vm.setup_long_mode(LOAD_ADDR, 0)
        ioctl = fcntl.ioctl
        fd = vm.vcpu_fd
        r = KvmRegs()
        start = time.perf_counter()
        for i in range(k):
            ioctl(fd, KVM_GET_REGS, r, True)
            r.rax = i
            ioctl(fd, KVM_SET_REGS, r, True)
        return time.perf_counter() - start
