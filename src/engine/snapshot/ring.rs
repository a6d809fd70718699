//! KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING): each vCPU pushes the guest pages it
//! writes into a ring shared with the host, mapped from its fd at
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. The host harvests the entries (marking each one for
//! reset) and KVM_RESET_DIRTY_RINGS write-protects those pages again. Reading what
//! changed then costs what the guest wrote, not one bit per page of guest memory as
//! KVM_GET_DIRTY_LOG does: the choice for guests of gigabytes. A ring that fills up
//! makes KVM exit with KVM_EXIT_DIRTY_RING_FULL; the run loop harvests it and goes on.
//!
//! Layout and protocol: Linux's `Documentation/virt/kvm/api.rst` (section 8.29) and
//! `tools/testing/selftests/kvm/dirty_log_test.c`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVMIO};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::engine::error::{Error, Result};

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
const ENTRY: usize = std::mem::size_of::<kvm_dirty_gfn>();
/// KVM wants a ring of at least one page.
pub const MIN_ENTRIES: u32 = 4096 / ENTRY as u32;

/// The host's ring capability: (capability to enable, the most bytes a ring may have),
/// preferring the one with acquire/release ordering. `None` if the host has neither.
fn host_ring(kvm: &Kvm) -> Option<(u32, u32)> {
    static RING: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *RING.get_or_init(|| {
        [
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        ]
        .into_iter()
        .map(|cap| (cap, kvm.check_extension_raw(cap.into())))
        .find(|(_, max)| *max > 0)
        .map(|(cap, max)| (cap, max as u32))
    })
}

/// Turns the dirty ring on for a VM that has no vCPU yet: `entries` per vCPU, a power of
/// two that fits the host's limit.
pub fn enable(kvm: &Kvm, vm: &VmFd, entries: u32) -> Result<()> {
    let Some((cap, max_bytes)) = host_ring(kvm) else {
        return Err(Error::Unsupported(
            "this host's KVM has no dirty ring (KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING) \
             is 0): leave dirty_ring unset to use the dirty bitmap"
                .into(),
        ));
    };
    let max = max_bytes / ENTRY as u32;
    if !entries.is_power_of_two() || entries < MIN_ENTRIES || entries > max {
        return Err(Error::Value(format!(
            "dirty_ring={entries}: a dirty ring holds a power of two of entries from \
             {MIN_ENTRIES} to {max} on this host (KVM_CAP_DIRTY_LOG_RING: {max_bytes} bytes \
             of 16-byte entries)"
        )));
    }
    let mut enable = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = u64::from(entries) * ENTRY as u64;
    vm.enable_cap(&enable)
        .map_err(|e| Error::ioctl("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)", e))
}

/// KVM_RESET_DIRTY_RINGS: the pages of the entries harvested are logged again.
pub fn reset(vm: &VmFd) -> Result<()> {
    // SAFETY: the ioctl takes no argument; the result is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(Error::ioctl(
            "KVM_RESET_DIRTY_RINGS",
            vmm_sys_util::errno::Error::last(),
        ));
    }
    Ok(())
}

/// One vCPU's ring, mapped, and the index of the next entry to harvest.
pub struct DirtyRing {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    next: u32,
}

// SAFETY: the mapping is owned by the ring and used only through `&mut self` (its
// vCPU's fd holder, behind a mutex); KVM's side of it is synchronised by the flags.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of the vCPU behind `fd` (the VM has the ring on, `entries` each).
    pub fn map(fd: &VcpuFd, entries: u32) -> Result<Self> {
        let len = entries as usize * ENTRY;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: a new shared mapping of the vCPU fd at the offset KVM documents for the
        // ring, of the ring's size; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                page * kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::ioctl(
                "mmap of the vCPU's dirty ring",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(DirtyRing {
            base: base.cast(),
            entries,
            next: 0,
        })
    }

    /// Calls `f(slot, page)` for every entry KVM pushed since the last harvest and marks
    /// it for reset; returns how many there were. KVM_RESET_DIRTY_RINGS must follow
    /// before the ring can take them again.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> usize {
        let mut n = 0;
        loop {
            let at = (self.next % self.entries) as usize;
            // SAFETY: `at < entries`: the entry lies in the mapping, which lives as long
            // as `self`; its flags word is 4-aligned and KVM and we only access it
            // atomically.
            let (flags, slot, offset) = unsafe {
                let entry = self.base.add(at);
                let flags = AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags));
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                (
                    flags,
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, of this length; nothing uses it after this.
        unsafe { libc::munmap(self.base.cast(), self.entries as usize * ENTRY) };
    }
}

/// Harvests `rings` and calls `f(region index, page)` for each entry of a region in
/// `regions` (by KVM slot; entries of address space 0 only, the one kvmpy uses).
pub fn harvest_regions<'a>(
    rings: impl IntoIterator<Item = &'a mut DirtyRing>,
    regions: &[std::sync::Arc<crate::engine::memory::Region>],
    mut f: impl FnMut(usize, u64),
) {
    for ring in rings {
        ring.harvest(|slot, page| {
            // A region split by watchpoints has several slots; `page` counts from the
            // start of its slot.
            for (i, region) in regions.iter().enumerate() {
                if let Some(p) = region.piece_of_slot(slot) {
                    if page < p.pages {
                        f(i, p.first + page);
                    }
                    return;
                }
            }
        });
    }
}

impl crate::engine::vcpu::VcpuCore {
    /// KVM_EXIT_DIRTY_RING_FULL: the vCPU's ring is harvested (see `keep_harvested`) and
    /// reset; the run goes on.
    pub(crate) fn ring_full(&self, holder: &mut crate::engine::vcpu::VcpuFdHolder) -> Result<()> {
        let Some(ring) = holder.ring.as_mut() else {
            return Err(Error::Refused(
                "KVM exited for a full dirty ring in a VM without one".into(),
            ));
        };
        self.vm.keep_harvested([ring], None);
        self.vm.with_fd(reset)
    }
}

impl crate::engine::vm::VmCore {
    /// Harvests `rings` outside a restore: each page goes into its region's write record
    /// (the next restore copies it back) and, unless it is of `report` (a region index,
    /// whose bitmap is returned), into the pages `dirty_log` has yet to report.
    pub(crate) fn keep_harvested<'a>(
        &self,
        rings: impl IntoIterator<Item = &'a mut DirtyRing>,
        report: Option<usize>,
    ) -> Option<Vec<u64>> {
        let memory = crate::engine::lock(self.memory_map());
        let regions = memory.regions();
        let mut unreported = crate::engine::lock(&self.ring_unreported);
        let mut reported = report.map(|i| vec![0u64; regions[i].pages().div_ceil(64) as usize]);
        harvest_regions(rings, regions, |i, page| {
            let region = &regions[i];
            region
                .record
                .note_write(page * crate::engine::memory::PAGE_SIZE, 1);
            let bits = match (report, reported.as_mut()) {
                (Some(r), Some(bits)) if r == i => bits,
                _ => {
                    let at = match unreported.iter().position(|(s, _)| *s == region.slot) {
                        Some(at) => at,
                        None => {
                            let words = region.pages().div_ceil(64) as usize;
                            unreported.push((region.slot, vec![0; words]));
                            unreported.len() - 1
                        }
                    };
                    &mut unreported[at].1
                }
            };
            if let Some(word) = bits.get_mut((page / 64) as usize) {
                *word |= 1 << (page % 64);
            }
        });
        reported
    }

    /// `dirty_log` with the dirty ring: the pages of `region` in every vCPU's ring (all
    /// stopped) and those harvested since the last call, which resets them.
    pub(crate) fn ring_dirty_log(
        &self,
        region: &crate::engine::memory::Region,
    ) -> Result<Vec<u64>> {
        let vcpus = self.vcpus();
        let mut guards = vcpus
            .iter()
            .map(|v| v.lock_idle())
            .collect::<Result<Vec<_>>>()?;
        let index = self.with_memory(|m| m.regions().iter().position(|r| r.slot == region.slot));
        let Some(index) = index else {
            return Err(Error::Value("the memory region was removed".into()));
        };
        let rings = guards
            .iter_mut()
            .filter_map(|g| g.as_mut().and_then(|h| h.ring.as_mut()));
        let mut bits = self.keep_harvested(rings, Some(index)).unwrap_or_default();
        self.with_fd(reset)?;
        let mut unreported = crate::engine::lock(&self.ring_unreported);
        if let Some(at) = unreported.iter().position(|(s, _)| *s == region.slot) {
            let (_, kept) = unreported.swap_remove(at);
            for (b, k) in bits.iter_mut().zip(kept) {
                *b |= k;
            }
        }
        Ok(bits)
    }
}
