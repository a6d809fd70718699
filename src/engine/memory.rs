//! Guest memory: anonymous host mappings registered as KVM memory slots.
//!
//! A region's host mapping is reference counted. Two rules keep every access sound:
//! - a mapping registered with KVM stays mapped until KVM can no longer touch it: the slot
//!   is deleted, or the VM fd and every vCPU fd are closed. [`Mappings`] holds them for
//!   that: the VM and every vCPU fd own a reference to it, and closing the VM does not
//!   release it while a vCPU fd is still open (KVM keeps its memory slots alive as long as
//!   any vCPU fd is);
//! - the face's region objects and the buffers they export hold their own reference, so a
//!   view outlives removal and close.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use crate::engine::error::{Error, Result};

pub const PAGE_SIZE: u64 = 4096;

/// One guest memory region, shared by the VM's memory map and its Python object.
pub struct Region {
    pub mem: Arc<GuestRegionMmap>,
    pub guest_addr: u64,
    pub size: u64,
    pub slot: u32,
    pub readonly: bool,
    pub dirty_log: bool,
    /// The snapshot whose memory this region maps copy-on-write (`Vm.from_snapshot`).
    pub backing: Option<u64>,
    /// Whether the region is still part of its VM's guest memory.
    attached: AtomicBool,
    /// What a snapshot needs to know of writes besides KVM's dirty log.
    pub record: WriteRecord,
    /// The KVM memory slots the region is registered as: one over the whole region,
    /// unless watchpoints split it (see `watch`), by first page.
    pub pieces: Mutex<Vec<Piece>>,
}

/// A KVM memory slot over part of a region: `pages` pages from page `first`. The pages
/// of a region that no piece covers are a hole: every guest access to them exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub slot: u32,
    pub first: u64,
    pub pages: u64,
    pub readonly: bool,
}

/// The writes to a region that KVM's dirty log does not see, for snapshots: the host's
/// own (`write`, loaders), page by page, and writable views, which cannot be tracked page
/// by page (a region that had one since the last snapshot or restore is wholly dirty).
#[derive(Default)]
pub struct WriteRecord {
    /// Pages the host wrote while the region is tracked (`None`: not tracked).
    host: Mutex<Option<Vec<u64>>>,
    /// Whether `host` has a page set (so a restore of a large region need not scan it).
    host_any: AtomicBool,
    /// Writable views exported and not released yet.
    views: AtomicUsize,
    /// A writable view existed since the record was last taken.
    viewed: AtomicBool,
    /// Whether KVM logs the slot's dirty pages now.
    logging: AtomicBool,
    /// Pages of the region kvmpy wrote for the guest (a store to a watched page), which
    /// KVM's dirty log does not see; reported by the next `dirty_log`.
    emulated: Mutex<Vec<u64>>,
}

impl WriteRecord {
    /// Notes a host write of `len` bytes at region offset `offset`.
    pub fn note_write(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut host = crate::engine::lock(&self.host);
        if let Some(bits) = host.as_mut() {
            self.host_any.store(true, Ordering::SeqCst);
            let (first, last) = (offset / PAGE_SIZE, (offset + len - 1) / PAGE_SIZE);
            for page in first..=last {
                if let Some(word) = bits.get_mut((page / 64) as usize) {
                    *word |= 1 << (page % 64);
                }
            }
        }
    }

    /// Adds pages (one bit per page) to the record, if the region is tracked.
    pub fn add_pages(&self, bits: &[u64]) {
        if let Some(host) = crate::engine::lock(&self.host).as_mut() {
            self.host_any.store(true, Ordering::SeqCst);
            for (h, b) in host.iter_mut().zip(bits) {
                *h |= b;
            }
        }
    }

    /// Notes that kvmpy wrote `len` bytes at region offset `offset` for the guest.
    pub fn note_emulated_write(&self, offset: u64, len: u64) {
        let mut pages = crate::engine::lock(&self.emulated);
        for page in offset / PAGE_SIZE..=(offset + len.max(1) - 1) / PAGE_SIZE {
            if !pages.contains(&page) {
                pages.push(page);
            }
        }
    }

    /// ORs the pages kvmpy wrote for the guest since the last call into `bits`.
    pub fn take_emulated(&self, bits: &mut [u64]) {
        for page in std::mem::take(&mut *crate::engine::lock(&self.emulated)) {
            if let Some(word) = bits.get_mut((page / 64) as usize) {
                *word |= 1 << (page % 64);
            }
        }
    }

    /// Notes that a writable view was exported.
    pub fn view_exported(&self) {
        self.views.fetch_add(1, Ordering::SeqCst);
        self.viewed.store(true, Ordering::SeqCst);
    }

    /// Notes that a view was released.
    pub fn view_released(&self) {
        self.views.fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts (or restarts) tracking a region of `pages` pages: the record is emptied.
    pub fn track(&self, pages: u64) {
        *crate::engine::lock(&self.host) = Some(vec![0; pages.div_ceil(64) as usize]);
        crate::engine::lock(&self.emulated).clear();
        self.host_any.store(false, Ordering::SeqCst);
        self.viewed
            .store(self.views.load(Ordering::SeqCst) > 0, Ordering::SeqCst);
    }

    /// ORs the pages written since the last call into `bits` and empties the record; true
    /// if a writable view existed meanwhile (then the whole region counts as written).
    pub fn take(&self, bits: &mut [u64]) -> bool {
        if self.host_any.swap(false, Ordering::SeqCst) {
            if let Some(host) = crate::engine::lock(&self.host).as_mut() {
                for (b, h) in bits.iter_mut().zip(host.iter_mut()) {
                    *b |= std::mem::take(h);
                }
            }
        }
        let live = self.views.load(Ordering::SeqCst) > 0;
        self.viewed.swap(live, Ordering::SeqCst)
    }

    /// Whether the host wrote pages since the record was last taken.
    pub fn has_host_writes(&self) -> bool {
        self.host_any.load(Ordering::SeqCst)
    }

    /// Whether KVM logs the slot's dirty pages.
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }
}

/// The host mappings KVM may access: every region whose slot is registered. Shared by the
/// VM (with its fd) and every vCPU fd; see the module's documentation.
#[derive(Default)]
pub struct Mappings(Mutex<Vec<Arc<GuestRegionMmap>>>);

impl Mappings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<GuestRegionMmap>>> {
        crate::engine::lock(&self.0)
    }

    fn add(&self, mem: &Arc<GuestRegionMmap>) {
        self.lock().push(Arc::clone(mem));
    }

    fn remove(&self, mem: &Arc<GuestRegionMmap>) {
        self.lock().retain(|m| !Arc::ptr_eq(m, mem));
    }

    /// How many mappings are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Region {
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }

    /// Whether the region is still part of its VM (not removed, VM not closed).
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// The KVM slots the region is registered as now.
    pub fn pieces(&self) -> Vec<Piece> {
        crate::engine::lock(&self.pieces).clone()
    }

    /// The piece of the region registered as KVM slot `slot`, if any.
    pub fn piece_of_slot(&self, slot: u32) -> Option<Piece> {
        crate::engine::lock(&self.pieces)
            .iter()
            .find(|p| p.slot == slot)
            .copied()
    }

    /// The number of pages of the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Memory(format!(
                "offset {offset:#x} + {len:#x} bytes is outside the region (size {:#x})",
                self.size
            ))),
        }
    }
}

/// The guest memory of one VM.
#[derive(Default)]
pub struct MemoryMap {
    /// Sorted by guest address.
    regions: Vec<Arc<Region>>,
    guest: GuestMemoryMmap,
    /// What KVM may touch; outlives this map while a vCPU fd is open.
    mappings: Arc<Mappings>,
    /// The FPU restore stub's slot (see `arch::x86_64::fpustub`): its KVM slot number and
    /// mapping, outside `regions` and `guest` (no read, write, dirty log or snapshot sees
    /// it).
    stub: Option<(u32, Arc<GuestRegionMmap>)>,
}

/// Checks an address range for the basic rules of a memory slot.
pub fn check_layout(guest_addr: u64, size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::Memory("memory region size must not be zero".into()));
    }
    if size % PAGE_SIZE != 0 || guest_addr % PAGE_SIZE != 0 {
        return Err(Error::Memory(format!(
            "memory region guest_addr {guest_addr:#x} and size {size:#x} must be multiples of the \
             page size ({PAGE_SIZE:#x})"
        )));
    }
    if guest_addr.checked_add(size).is_none() {
        return Err(Error::Memory(format!(
            "memory region {guest_addr:#x} + {size:#x} overflows the guest address space"
        )));
    }
    Ok(())
}

impl MemoryMap {
    /// The mappings KVM may access, for a vCPU fd to hold.
    pub fn mappings(&self) -> Arc<Mappings> {
        Arc::clone(&self.mappings)
    }

    /// The region overlapping `[start, end)`, if any.
    pub fn overlapping(&self, start: u64, end: u64) -> Option<&Arc<Region>> {
        self.regions
            .iter()
            .find(|r| r.guest_addr < end && start < r.end())
    }

    /// The lowest KVM slot number that no region (nor a piece of one) nor the FPU
    /// restore stub uses.
    pub fn free_slot(&self, max: usize) -> Result<u32> {
        self.free_slots(max, 1)?
            .first()
            .copied()
            .ok_or_else(|| Error::Memory(format!("all {max} KVM memory slots are in use")))
    }

    /// The `count` lowest free KVM slot numbers (see `free_slot`).
    pub fn free_slots(&self, max: usize, count: usize) -> Result<Vec<u32>> {
        let used: Vec<u32> = self
            .regions
            .iter()
            .flat_map(|r| {
                let mut s: Vec<u32> = r.pieces().iter().map(|p| p.slot).collect();
                s.push(r.slot);
                s
            })
            .chain(self.stub.as_ref().map(|(slot, _)| *slot))
            .collect();
        let free: Vec<u32> = (0..max as u32)
            .filter(|s| !used.contains(s))
            .take(count)
            .collect();
        if free.len() < count {
            return Err(Error::Memory(format!(
                "all {max} KVM memory slots are in use"
            )));
        }
        Ok(free)
    }

    /// Maps a new region and registers it with KVM.
    pub fn add(
        &mut self,
        vm: &VmFd,
        max_slots: usize,
        guest_addr: u64,
        size: u64,
        readonly: bool,
        dirty_log: bool,
    ) -> Result<Arc<Region>> {
        check_layout(guest_addr, size)?;
        let len = usize::try_from(size)
            .map_err(|_| Error::Memory(format!("memory region size {size:#x} is too large")))?;
        let mmap = MmapRegion::new(len).map_err(|e| {
            Error::Memory(format!("cannot map {size:#x} bytes of guest memory: {e}"))
        })?;
        self.add_mapped(vm, max_slots, guest_addr, mmap, readonly, dirty_log, None)
    }

    /// Registers a host mapping made by the caller as a new region; `backing` names the
    /// snapshot it is a copy-on-write view of.
    #[allow(clippy::too_many_arguments)]
    pub fn add_mapped(
        &mut self,
        vm: &VmFd,
        max_slots: usize,
        guest_addr: u64,
        mmap: MmapRegion,
        readonly: bool,
        dirty_log: bool,
        backing: Option<u64>,
    ) -> Result<Arc<Region>> {
        let size = mmap.size() as u64;
        check_layout(guest_addr, size)?;
        if let Some(r) = self.overlapping(guest_addr, guest_addr + size) {
            return Err(Error::Memory(format!(
                "memory region {guest_addr:#x}..{:#x} overlaps region {:#x}..{:#x} (slot {})",
                guest_addr + size,
                r.guest_addr,
                r.end(),
                r.slot
            )));
        }
        let stub = crate::arch::x86_64::fpustub::STUB_GPA;
        let stub_end = stub + crate::arch::x86_64::fpustub::SLOT_BYTES;
        if self.stub.is_some() && guest_addr < stub_end && stub < guest_addr + size {
            return Err(Error::Memory(format!(
                "memory region {guest_addr:#x}..{:#x} overlaps {stub:#x}..{stub_end:#x}, where \
                 kvmpy keeps this VM's FPU restore stub (guest memory cannot go there)",
                guest_addr + size
            )));
        }
        let slot = self.free_slot(max_slots)?;
        let mem = GuestRegionMmap::new(mmap, GuestAddress(guest_addr)).ok_or_else(|| {
            Error::Memory(format!(
                "memory region {guest_addr:#x} + {size:#x} is invalid"
            ))
        })?;
        let mem = Arc::new(mem);
        let mut flags = 0;
        if readonly {
            flags |= KVM_MEM_READONLY;
        }
        if dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the host range [userspace_addr, +size) is a live mapping owned by `mem`, and
        // `self.mappings` keeps `mem` mapped until the slot is deleted again (`remove`) or
        // the VM fd and every vCPU fd are closed, so KVM never sees a dangling address.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        self.mappings.add(&mem);
        let guest = self
            .guest
            .insert_region(Arc::clone(&mem))
            .map_err(|e| Error::Memory(format!("cannot add memory region: {e}")))?;
        self.guest = guest;
        let region = Arc::new(Region {
            mem,
            guest_addr,
            size,
            slot,
            readonly,
            dirty_log,
            backing,
            attached: AtomicBool::new(true),
            record: WriteRecord {
                logging: AtomicBool::new(dirty_log),
                ..Default::default()
            },
            pieces: Mutex::new(vec![Piece {
                slot,
                first: 0,
                pages: size / PAGE_SIZE,
                readonly,
            }]),
        });
        let at = self.regions.partition_point(|r| r.guest_addr < guest_addr);
        self.regions.insert(at, Arc::clone(&region));
        Ok(region)
    }

    /// The FPU restore stub's mapping, registered with KVM as a read-only slot of
    /// `fpustub::SLOT_BYTES` at `fpustub::STUB_GPA` on first use with its page tables
    /// written; `None` where guest memory is there already.
    pub fn stub(&mut self, vm: &VmFd, max_slots: usize) -> Result<Option<Arc<GuestRegionMmap>>> {
        use crate::arch::x86_64::fpustub::{table_pages, SLOT_BYTES, STUB_GPA};
        if let Some((_, mem)) = &self.stub {
            return Ok(Some(Arc::clone(mem)));
        }
        if self.overlapping(STUB_GPA, STUB_GPA + SLOT_BYTES).is_some() {
            return Ok(None);
        }
        let mmap = MmapRegion::new(SLOT_BYTES as usize).map_err(|e| {
            Error::Memory(format!(
                "cannot map the FPU restore stub's {SLOT_BYTES:#x} bytes: {e}"
            ))
        })?;
        let mem = GuestRegionMmap::new(mmap, GuestAddress(STUB_GPA))
            .ok_or_else(|| Error::Memory("the FPU restore stub's mapping is invalid".into()))?;
        let (pd, pt) = table_pages();
        mem.write_slice(&pd, vm_memory::MemoryRegionAddress(0))
            .and_then(|()| mem.write_slice(&pt, vm_memory::MemoryRegionAddress(PAGE_SIZE)))
            .map_err(|e| Error::Memory(format!("cannot write the FPU restore stub: {e}")))?;
        let slot = self.free_slot(max_slots)?;
        let mem = Arc::new(mem);
        let desc = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: STUB_GPA,
            memory_size: SLOT_BYTES,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the host range [userspace_addr, +SLOT_BYTES) is a live mapping owned by
        // `mem`, and `self.mappings` keeps it mapped until the VM fd and every vCPU fd are
        // closed (the slot is never deleted), so KVM never sees a dangling address.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        self.mappings.add(&mem);
        self.stub = Some((slot, Arc::clone(&mem)));
        Ok(Some(mem))
    }

    /// Turns KVM's dirty logging of a region's slots on (it stays on).
    pub fn log_dirty_pages(&self, vm: &VmFd, region: &Region) -> Result<()> {
        if region.record.logging() {
            return Ok(());
        }
        for piece in region.pieces() {
            set_slot(vm, region, &piece, true)?;
        }
        region.record.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Deletes a region's KVM slot and drops it from the map.
    pub fn remove(&mut self, vm: &VmFd, region: &Arc<Region>) -> Result<()> {
        let Some(at) = self.regions.iter().position(|r| Arc::ptr_eq(r, region)) else {
            return Err(Error::Memory(format!(
                "memory region at {:#x} is not part of this VM (already removed?)",
                region.guest_addr
            )));
        };
        for piece in region.pieces() {
            delete_slot(vm, piece.slot)?;
        }
        self.mappings.remove(&region.mem);
        let (guest, _) = self
            .guest
            .remove_region(GuestAddress(region.guest_addr), region.size)
            .map_err(|e| Error::Memory(format!("cannot remove memory region: {e}")))?;
        self.guest = guest;
        self.regions.remove(at);
        region.attached.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Forgets every region; used when the VM is closed. The mappings stay mapped for as
    /// long as a vCPU fd that KVM could still run holds them.
    pub fn clear(&mut self) {
        for r in self.regions.drain(..) {
            r.attached.store(false, Ordering::SeqCst);
        }
        self.guest = GuestMemoryMmap::default();
        // The VM fd is closed: only the vCPU fds still open keep the mappings now.
        self.mappings = Arc::default();
    }

    /// Fails unless `[gpa, gpa + len)` lies entirely in guest memory.
    pub fn check(&self, gpa: u64, len: usize) -> Result<()> {
        if len == 0 || self.guest.check_range(GuestAddress(gpa), len) {
            Ok(())
        } else {
            Err(outside(gpa, len))
        }
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.guest
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| outside(gpa, buf.len()))
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.guest
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| outside(gpa, data.len()))?;
        let end = gpa + data.len() as u64;
        for r in self
            .regions
            .iter()
            .filter(|r| r.guest_addr < end && gpa < r.end())
        {
            let start = gpa.max(r.guest_addr);
            r.record
                .note_write(start - r.guest_addr, end.min(r.end()) - start);
        }
        Ok(())
    }

    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }
}

/// Registers `piece` of `region` with KVM (or changes its flags): read-only where the
/// piece is, logging dirty pages with `log`.
pub fn set_slot(vm: &VmFd, region: &Region, piece: &Piece, log: bool) -> Result<()> {
    let mut flags = 0;
    if piece.readonly {
        flags |= KVM_MEM_READONLY;
    }
    if log {
        flags |= KVM_MEM_LOG_DIRTY_PAGES;
    }
    let desc = kvm_userspace_memory_region {
        slot: piece.slot,
        flags,
        guest_phys_addr: region.guest_addr + piece.first * PAGE_SIZE,
        memory_size: piece.pages * PAGE_SIZE,
        userspace_addr: region.mem.as_ptr() as u64 + piece.first * PAGE_SIZE,
    };
    if piece.first + piece.pages > region.pages() {
        return Err(Error::Memory(format!(
            "a memory slot of pages {}..{} is outside its region",
            piece.first,
            piece.first + piece.pages
        )));
    }
    // SAFETY: the host range is a live part of the region's mapping (checked above to lie
    // inside it), which the VM's `Mappings` keep mapped while any slot over it is
    // registered (slots are deleted before a region's mapping is released).
    unsafe { vm.set_user_memory_region(desc) }
        .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))
}

/// Deletes KVM slot `slot`.
pub fn delete_slot(vm: &VmFd, slot: u32) -> Result<()> {
    let desc = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero memory_size deletes the slot; KVM stops using the host mapping.
    unsafe { vm.set_user_memory_region(desc) }
        .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))
}

fn outside(gpa: u64, len: usize) -> Error {
    Error::Memory(format!(
        "guest physical range {gpa:#x} + {len:#x} bytes is not entirely inside guest memory"
    ))
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
