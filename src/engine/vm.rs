//! The VM: its KVM fd, guest memory, bus and vCPUs.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::engine::bus::Bus;
use crate::engine::error::{Error, Result};
use crate::engine::gettid;
use crate::engine::kvm;
use crate::engine::lock;
use crate::engine::memory::{MemoryMap, Region};
use crate::engine::runner::RunGroup;
use crate::engine::vcpu::VcpuCore;

/// Where KVM puts the three-page TSS it needs for real mode on Intel hosts: just below the
/// 4 GiB boundary, where firmware would be, as QEMU and Firecracker do.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// How a memory region is made (see [`VmCore::add_memory`]).
#[derive(Clone, Copy, Default)]
pub struct RegionOptions {
    pub readonly: bool,
    pub dirty_log: bool,
    /// Accept a region larger than the host's memory.
    pub overcommit: bool,
}

/// What a VM with a snapshot keeps for restores (see `engine::snapshot`).
#[derive(Default)]
pub struct Tracking {
    /// The snapshot the VM's memory and state were last taken from or put back to.
    pub base: Option<u64>,
    /// Whether KVM re-protects dirty pages only when told (set on the first snapshot).
    pub manual: Option<bool>,
    /// A dirty bitmap reused by restores.
    pub bits: Vec<u64>,
    /// With the dirty ring: the `(region index, page)` entries a restore harvested.
    pub ring_pages: Vec<(usize, u64)>,
}

/// The state of one VM, shared by the face's objects, its vCPUs and their threads.
///
/// `repr(C)` keeps the declaration order: what a run loop reads on every exit comes
/// first, on one cache line (see `VcpuCore`'s layout).
#[repr(C, align(64))]
pub struct VmCore {
    /// Counts replacements of `bus`: a run loop that keeps the bus between exits takes it
    /// again when this changes.
    bus_generation: AtomicU64,
    closed: AtomicBool,
    /// `breakpoints`' count of port-I/O patches, read by the run loop without the lock.
    pub pio_patches: Arc<std::sync::atomic::AtomicUsize>,
    /// Held by a vCPU stepping over a breakpoint (see `allstop`).
    pub step_gate: crate::engine::allstop::StepGate,
    pub kvm: Arc<Kvm>,
    fd: Mutex<Option<VmFd>>,
    memory: Mutex<MemoryMap>,
    bus: RwLock<Arc<Bus>>,
    /// Serialises changes of `bus` (read-copy-update).
    bus_update: Mutex<()>,
    /// KVM keeps a vCPU until the VM is destroyed, and so does the VM.
    vcpus: Mutex<Vec<Arc<VcpuCore>>>,
    irqchip: bool,
    pit: bool,
    /// Snapshot bookkeeping.
    pub tracking: Mutex<Tracking>,
    /// Software breakpoints patched into guest memory (see `breakpoints`).
    pub breakpoints: Mutex<crate::engine::breakpoints::Breakpoints>,
    /// For each tables address set up with exceptions, the vCPUs that use it, in the order
    /// they were set up (see `setup.rs`: each after the first has its own stack).
    exception_slots: Mutex<std::collections::BTreeMap<u64, Vec<u64>>>,
    /// Watchpoints by guest-physical page (see `watch`).
    pub watches: Mutex<Vec<crate::engine::watch::Watch>>,
    /// How many watchpoints are set, read by the run loop without the lock.
    pub watch_count: std::sync::atomic::AtomicUsize,
    /// Hardware breakpoints (see `hw_breakpoints`), changed with `watches` locked.
    pub hw_breakpoints: Mutex<Vec<crate::engine::hw_breakpoints::HwBreakpoint>>,
    /// How many hardware breakpoints are set, read by the run loop without the lock.
    pub hw_count: std::sync::atomic::AtomicUsize,
    /// The vCPU threads of the last `start`, until they are joined.
    group: Mutex<Option<Arc<RunGroup>>>,
    /// Entries of each vCPU's dirty ring; 0: the VM uses the dirty bitmap.
    ring_entries: AtomicU32,
    /// With the dirty ring: pages harvested outside a restore and not reported by
    /// `dirty_log` yet, `(slot, bitmap)` (see `snapshot::ring`).
    pub ring_unreported: Mutex<Vec<(u32, Vec<u64>)>>,
    /// The FPU restore stub's mapping, once registered (see `snapshot::stub`).
    pub fpu_stub: std::sync::OnceLock<Arc<vm_memory::GuestRegionMmap>>,
}

impl VmCore {
    /// Which vCPU, counting from 0, `vcpu_id` is among those that set up the tables at
    /// `tables` with exceptions (the same answer every time for one vCPU).
    pub fn exception_slot(&self, tables: u64, vcpu_id: u64) -> usize {
        let mut slots = lock(&self.exception_slots);
        let users = slots.entry(tables).or_default();
        match users.iter().position(|v| *v == vcpu_id) {
            Some(k) => k,
            None => {
                users.push(vcpu_id);
                users.len() - 1
            }
        }
    }

    /// Creates a VM; with `irqchip`, KVM's in-kernel PIC/IOAPIC/LAPICs, with `pit` its PIT.
    pub fn new(irqchip: bool, pit: bool) -> Result<Arc<Self>> {
        if pit && !irqchip {
            return Err(Error::Value("pit=True needs irqchip=True".into()));
        }
        let kvm = kvm::shared()?;
        let fd = kvm
            .create_vm()
            .map_err(|e| Error::ioctl("KVM_CREATE_VM", e))?;
        if kvm::has_cap(&kvm, Cap::SetTssAddr) {
            fd.set_tss_address(TSS_ADDRESS)
                .map_err(|e| Error::ioctl("KVM_SET_TSS_ADDR", e))?;
        }
        // KVM's order: the irqchip before the PIT, both before any vCPU.
        if irqchip {
            fd.create_irq_chip()
                .map_err(|e| Error::ioctl("KVM_CREATE_IRQCHIP", e))?;
        }
        if pit {
            let config = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(config)
                .map_err(|e| Error::ioctl("KVM_CREATE_PIT2", e))?;
        }
        let breakpoints = crate::engine::breakpoints::Breakpoints::default();
        Ok(Arc::new(VmCore {
            kvm,
            fd: Mutex::new(Some(fd)),
            memory: Mutex::new(MemoryMap::default()),
            bus: RwLock::new(Arc::new(Bus::default())),
            bus_generation: AtomicU64::new(0),
            bus_update: Mutex::new(()),
            vcpus: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            irqchip,
            pit,
            tracking: Mutex::new(Tracking::default()),
            exception_slots: Mutex::default(),
            watches: Mutex::default(),
            watch_count: Default::default(),
            pio_patches: breakpoints.pio_counter(),
            hw_breakpoints: Mutex::default(),
            hw_count: Default::default(),
            step_gate: Default::default(),
            breakpoints: Mutex::new(breakpoints),
            group: Mutex::new(None),
            ring_entries: AtomicU32::new(0),
            fpu_stub: std::sync::OnceLock::new(),
            ring_unreported: Mutex::new(Vec::new()),
        }))
    }

    /// Turns KVM's dirty ring on, `entries` per vCPU (see `snapshot::ring`): only before
    /// the first vCPU.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<()> {
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_empty() || self.dirty_ring() != 0 {
            return Err(Error::Value(
                "the dirty ring must be turned on before the VM has vCPUs, once".into(),
            ));
        }
        self.with_fd(|fd| crate::engine::snapshot::ring::enable(&self.kvm, fd, entries))?;
        self.ring_entries.store(entries, Ordering::SeqCst);
        Ok(())
    }

    /// The entries of each vCPU's dirty ring; 0 without the ring.
    pub fn dirty_ring(&self) -> u32 {
        self.ring_entries.load(Ordering::SeqCst)
    }

    /// Whether the VM has an in-kernel irqchip (PIC, IOAPIC and local APICs).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Whether the VM has KVM's PIT.
    pub fn has_pit(&self) -> bool {
        self.pit
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed("VM"))
        } else {
            Ok(())
        }
    }

    pub fn with_fd<T>(&self, f: impl FnOnce(&VmFd) -> Result<T>) -> Result<T> {
        let guard = lock(&self.fd);
        f(guard.as_ref().ok_or_else(|| Error::Closed("VM"))?)
    }

    /// The current bus.
    pub fn bus(&self) -> Arc<Bus> {
        Arc::clone(&self.bus.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the bus with what `f` makes of the current one.
    pub fn update_bus<T>(&self, f: impl FnOnce(&Bus) -> Result<(Bus, T)>) -> Result<T> {
        self.check_open()?;
        let _serial = lock(&self.bus_update);
        let (bus, value) = f(&self.bus())?;
        self.replace_bus(bus);
        Ok(value)
    }

    fn replace_bus(&self, bus: Bus) {
        *self.bus.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(bus);
        self.bus_generation.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever the bus is replaced (after the new one is in place).
    pub fn bus_generation(&self) -> u64 {
        self.bus_generation.load(Ordering::Acquire)
    }

    /// Adds `size` bytes of RAM at `guest_addr`. A region larger than the host's memory
    /// needs `overcommit`: KVM allocates metadata for every page of a slot up front.
    pub fn add_memory(
        &self,
        guest_addr: u64,
        size: u64,
        opts: RegionOptions,
    ) -> Result<Arc<Region>> {
        self.check_open()?;
        if opts.readonly && !kvm::has_cap(&self.kvm, Cap::ReadonlyMem) {
            return Err(Error::Memory(
                "this host's KVM does not support read-only memory".into(),
            ));
        }
        let host = kvm::host_memory();
        if !opts.overcommit && host > 0 && size > host {
            return Err(Error::Memory(format!(
                "a memory region of {size:#x} bytes is larger than this host's memory ({host:#x} \
                 bytes): KVM allocates metadata for every page of a memory slot when it is \
                 added (about 2 GiB per TiB), which can exhaust the host; pass overcommit=True \
                 to add it anyway"
            )));
        }
        if let Some(end) = guest_addr.checked_add(size) {
            if let Some((s, e)) = self.bus().mmio_overlapping(guest_addr, end) {
                return Err(Error::Memory(format!(
                    "memory region {guest_addr:#x}..{end:#x} overlaps the MMIO range {s:#x}..{e:#x}"
                )));
            }
        }
        let max_slots = self.kvm.get_nr_memslots();
        self.forget_snapshot_base();
        self.with_fd(|fd| {
            lock(&self.memory).add(
                fd,
                max_slots,
                guest_addr,
                size,
                opts.readonly,
                opts.dirty_log,
            )
        })
    }

    /// Adds a region over a host mapping the caller made (a copy-on-write view of the
    /// snapshot `backing`).
    pub fn add_mapped_memory(
        &self,
        guest_addr: u64,
        mmap: vm_memory::MmapRegion,
        readonly: bool,
        backing: Option<u64>,
    ) -> Result<Arc<Region>> {
        self.check_open()?;
        let max_slots = self.kvm.get_nr_memslots();
        self.forget_snapshot_base();
        self.with_fd(|fd| {
            lock(&self.memory).add_mapped(fd, max_slots, guest_addr, mmap, readonly, false, backing)
        })
    }

    /// The memory layout changes: the next restore copies everything and tracks anew.
    fn forget_snapshot_base(&self) {
        lock(&self.tracking).base = None;
    }

    /// Takes a region out of the guest's address space.
    pub fn remove_memory(&self, region: &Arc<Region>) -> Result<()> {
        self.check_open()?;
        // Held until the region is gone, so that no watchpoint can re-slot it in between
        // (`add_watch` holds it from its last check until its slots are in place).
        let watches = lock(&self.watches);
        if crate::engine::watch::watched(&watches, region) {
            return Err(Error::Value(format!(
                "memory region {:#x}..{:#x} has a watchpoint: remove it first",
                region.guest_addr,
                region.end()
            )));
        }
        self.forget_snapshot_base();
        self.with_fd(|fd| lock(&self.memory).remove(fd, region))
    }

    /// The memory map's lock (snapshots hold it while they copy memory).
    pub fn memory_map(&self) -> &Mutex<MemoryMap> {
        &self.memory
    }

    /// Runs `f` on the memory map.
    pub fn with_memory<T>(&self, f: impl FnOnce(&MemoryMap) -> T) -> T {
        f(&lock(&self.memory))
    }

    /// The pages of `region` the guest wrote since the last call (`KVM_GET_DIRTY_LOG`,
    /// which resets the log), one bit per page. While a snapshot tracks the region, the
    /// pages are also kept for its next restore.
    pub fn dirty_log(&self, region: &Region) -> Result<Vec<u64>> {
        if self.dirty_ring() != 0 {
            let mut bits = self.ring_dirty_log(region)?;
            region.record.take_emulated(&mut bits);
            return Ok(bits);
        }
        let manual = lock(&self.tracking).manual.unwrap_or(false);
        let mut bits = vec![0; crate::engine::snapshot::dirty::bitmap_words(region)];
        self.with_fd(|fd| crate::engine::snapshot::dirty::read(fd, region, manual, &mut bits))?;
        region.record.add_pages(&bits);
        region.record.take_emulated(&mut bits);
        Ok(bits)
    }

    /// Whether guests may use 1 GiB pages (CPUID 0x80000001 EDX bit 26).
    pub fn supports_1gib_pages(&self) -> Result<bool> {
        Ok(kvm::supported_cpuid(&self.kvm)?
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0))
    }

    /// The `[start, end)` guest-physical ranges of the memory regions, by address.
    pub fn region_ranges(&self) -> Vec<(u64, u64)> {
        self.with_memory(|m| {
            m.regions()
                .iter()
                .map(|r| (r.guest_addr, r.end()))
                .collect()
        })
    }

    /// Reads guest physical memory, showing the original bytes where breakpoints are
    /// patched in.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let table = lock(&self.breakpoints);
        lock(&self.memory).read(gpa, buf)?;
        if !table.is_empty() {
            table.hide(gpa, buf);
        }
        Ok(())
    }

    /// The FPU restore stub's mapping, registered with KVM on first use; `None` where
    /// guest memory already covers its guest physical range.
    pub fn stub_memory(&self) -> Result<Option<Arc<vm_memory::GuestRegionMmap>>> {
        if let Some(mem) = self.fpu_stub.get() {
            return Ok(Some(Arc::clone(mem)));
        }
        let max_slots = self.kvm.get_nr_memslots();
        let mem = self.with_fd(|fd| lock(&self.memory).stub(fd, max_slots))?;
        Ok(mem.map(|m| Arc::clone(self.fpu_stub.get_or_init(|| m))))
    }

    /// Reads guest physical memory as it is (breakpoint bytes included).
    pub fn read_memory_raw(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        lock(&self.memory).read(gpa, buf)
    }

    /// Fails unless `[gpa, gpa + len)` is guest RAM.
    pub fn check_memory(&self, gpa: u64, len: usize) -> Result<()> {
        self.check_open()?;
        lock(&self.memory).check(gpa, len)
    }

    /// Writes guest physical memory.
    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.check_open()?;
        lock(&self.memory).write(gpa, data)
    }

    /// Sets the level of an interrupt line of the in-kernel irqchip.
    pub fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        self.check_open()?;
        if !self.irqchip {
            return Err(Error::Value(
                "this VM has no in-kernel irqchip: create it with Vm(irqchip=True), or queue \
                 interrupts with vcpu.interrupt()"
                    .into(),
            ));
        }
        self.with_fd(|fd| {
            fd.set_irq_line(irq, level)
                .map_err(|e| Error::ioctl("KVM_IRQ_LINE", e))
        })
    }

    /// Creates a vCPU; `id` defaults to the lowest id not in use. It gets the host's
    /// supported CPUID with the hypervisor bit and its APIC id.
    pub fn create_vcpu(self: &Arc<Self>, id: Option<u64>) -> Result<Arc<VcpuCore>> {
        self.check_open()?;
        let mut vcpus = lock(&self.vcpus);
        let used: Vec<u64> = vcpus.iter().map(|v| v.id).collect();
        let id = match id {
            Some(id) if used.contains(&id) => {
                return Err(Error::Value(format!("a vCPU with id {id} already exists")))
            }
            Some(id) => id,
            None => (0..).find(|i| !used.contains(i)).unwrap_or(0),
        };
        let max_id = self.kvm.get_max_vcpu_id() as u64;
        if id >= max_id {
            return Err(Error::Value(format!(
                "vCPU id {id} is out of range (max {})",
                max_id.saturating_sub(1)
            )));
        }
        let max = self.kvm.get_max_vcpus();
        if used.len() >= max {
            return Err(Error::Value(format!(
                "this VM already has the maximum of {max} vCPUs"
            )));
        }
        let fd = self.with_fd(|fd| {
            fd.create_vcpu(id)
                .map_err(|e| Error::ioctl("KVM_CREATE_VCPU", e))
        })?;
        let cpuid = kvm::cpuid_for_vcpu(&self.kvm, id)?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::ioctl("KVM_SET_CPUID2", e))?;
        let sync_regs = self
            .kvm
            .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into())
            & kvm_bindings::KVM_SYNC_X86_REGS as i32
            != 0;
        let ring = match self.dirty_ring() {
            0 => None,
            n => Some(crate::engine::snapshot::ring::DirtyRing::map(&fd, n)?),
        };
        let mappings = lock(&self.memory).mappings();
        let vcpu = Arc::new(VcpuCore::new(
            id,
            Arc::clone(self),
            fd,
            sync_regs,
            mappings,
            ring,
        ));
        vcpus.push(Arc::clone(&vcpu));
        Ok(vcpu)
    }

    /// The VM's vCPUs, by creation order.
    pub fn vcpus(&self) -> Vec<Arc<VcpuCore>> {
        lock(&self.vcpus).clone()
    }

    /// The vCPU of this VM the calling thread is running, if any (we are in its handler).
    pub fn vcpu_of_this_thread(&self) -> Option<Arc<VcpuCore>> {
        let me = gettid();
        self.vcpus().into_iter().find(|v| v.runner() == Some(me))
    }

    /// Asks every vCPU to stop: the runs in progress, and the next run of an idle vCPU.
    pub fn request_stop_all(&self) {
        for v in self.vcpus() {
            v.kicker.request_stop();
        }
    }

    /// Stops the runs in progress, if any.
    pub fn stop_all_runs(&self) {
        for v in self.vcpus() {
            v.kicker.stop_run();
        }
    }

    /// Starts a thread per vCPU; see [`RunGroup::start`].
    pub fn start(
        self: &Arc<Self>,
        deadline: Option<Instant>,
        until_any: bool,
    ) -> Result<Arc<RunGroup>> {
        self.check_open()?;
        let mut group = lock(&self.group);
        if group.is_some() {
            return Err(Error::Busy(
                "the VM's vCPUs were started and not joined yet: call join()".into(),
            ));
        }
        let vcpus = self.vcpus();
        if vcpus.is_empty() {
            return Err(Error::Value(
                "the VM has no vCPUs: create_vcpu() first".into(),
            ));
        }
        let started = RunGroup::start(self, vcpus, deadline, until_any)?;
        *group = Some(Arc::clone(&started));
        Ok(started)
    }

    /// The run group of the last `start`, until it is joined.
    pub fn group(&self) -> Option<Arc<RunGroup>> {
        lock(&self.group).clone()
    }

    /// Forgets `group` (it was joined).
    pub fn forget_group(&self, group: &Arc<RunGroup>) {
        let mut current = lock(&self.group);
        if current.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
            *current = None;
        }
    }

    /// Stops running vCPUs and waits for them (except one run by the calling thread, which
    /// stops at its next exit), then closes the VM's fds. Guest memory stays mapped until
    /// the last vCPU fd is closed too.
    pub fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = gettid();
        let vcpus = self.vcpus();
        for v in &vcpus {
            if v.runner() == Some(me) {
                v.kicker.stop_run();
            } else {
                v.close();
            }
        }
        if let Some(group) = self.group() {
            if group.vcpus.iter().all(|v| v.runner() != Some(me)) {
                // Its result stays for join(); its threads are gone when close returns.
                group.wait(None);
                group.join_threads();
            }
        }
        lock(&self.vcpus).clear();
        lock(&self.fd).take();
        lock(&self.memory).clear();
        self.replace_bus(Bus::default());
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn what_every_exit_reads_is_on_the_vms_first_cache_line() {
        assert_eq!(std::mem::align_of::<VmCore>(), 64);
        // The step gate's owner is its first field (see allstop.rs).
        for offset in [
            offset_of!(VmCore, bus_generation),
            offset_of!(VmCore, closed),
            offset_of!(VmCore, pio_patches),
            offset_of!(VmCore, step_gate),
        ] {
            assert!(offset < 64, "a hot field at offset {offset}");
        }
    }
}
