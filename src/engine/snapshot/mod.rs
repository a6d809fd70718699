//! Snapshots: a whole VM captured at an exit boundary (every vCPU's state as KVM holds
//! it, guest memory, the in-kernel irqchip and PIT, kvmpy's devices) and put back.
//!
//! A VM with a snapshot has KVM's dirty log on for every region, so a restore copies back
//! only the pages written since the snapshot or the last restore (the guest's, from the
//! log; the host's, from each region's `WriteRecord`). General registers go back through
//! `kvm_run` (no ioctl) and the FPU/SSE/AVX state with one ioctl, or none where the guest
//! can load it itself when the next run starts (see `stub`); the rest of a vCPU's
//! state is written only when it may differ: `kvm_run` mirrors the special registers
//! and events (compared there), and state only ring-0 code or the host can change is
//! rewritten when the host changed some or the vCPU exited at ring 0 since.
//!
//! Time: a snapshot holds each vCPU's TSC (an MSR), its frequency and the VM's kvmclock.
//! A restore of the snapshot a VM's memory is based on (the one it took or last
//! restored: a fuzzing reset) leaves both clocks running, so a guest reading `rdtsc` or
//! kvmclock sees time go forward across resets and the two agree (KVM keeps kvmclock's
//! TSC-to-time mapping, and the restored pvclock page computes the same time from the
//! running TSC); writing them back would cost two ioctls per reset. An armed TSC
//! deadline moves with the TSC (see `cpu::put_all`). Any other restore
//! (another snapshot, one from a file, a new VM from a snapshot) sets both back to the
//! snapshot's values, as if no time had passed since it was taken (a host that runs
//! guests on its own TSC, like a nested PVM-style KVM, ignores the TSC write).

pub mod cpu;
pub mod dirty;
pub mod file;
pub mod image;
pub mod ring;
pub mod stub;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use kvm_ioctls::VmFd;

use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::memory::MemoryMap;
use crate::engine::vm::{Tracking, VmCore};
use cpu::VcpuState;
use image::RegionImage;

/// A whole VM's state.
pub struct Snapshot {
    /// Unique in the process: a VM knows which snapshot its memory was last based on.
    pub id: u64,
    pub regions: Vec<RegionImage>,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave and IOAPIC, with an in-kernel irqchip.
    pub irqchip: Option<Vec<kvm_irqchip>>,
    pub pit: Option<kvm_pit_state2>,
    /// `(name, state)` of each device that has state, in bus order.
    pub devices: Vec<(String, Vec<u8>)>,
    /// The VM's kvmclock in nanoseconds (KVM_GET_CLOCK); `None` in a file of format
    /// version 1 or where the host has none.
    pub clock: Option<u64>,
}

/// This host's CPU vendor, as KVM reports it to guests.
fn host_vendor() -> Result<[u8; 12]> {
    let kvm = crate::engine::kvm::shared()?;
    Ok(file::vendor(crate::engine::kvm::supported_cpuid(&kvm)?))
}

/// A fresh snapshot id.
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Whether a vCPU state was captured at ring 0 (or in real mode): ring-0 code changes
/// state that no exit reports, so each restore of it writes everything.
fn at_ring0(st: &VcpuState) -> bool {
    st.sregs.cr0 & 1 == 0 || st.sregs.ss.dpl == 0
}

impl Snapshot {
    /// Fails, naming the difference, unless `vm` has this snapshot's layout: the same
    /// memory regions, vCPU ids, irqchip and PIT, and devices with state.
    pub fn check_layout(&self, vm: &VmCore) -> Result<()> {
        self.check_layout_of(vm, true)
    }

    fn check_layout_of(&self, vm: &VmCore, devices: bool) -> Result<()> {
        let mismatch = |what: String| {
            Err(Error::Value(format!(
                "the snapshot does not fit this VM: {what}"
            )))
        };
        let ours: Vec<(u64, u64, bool)> = self
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size, r.readonly))
            .collect();
        let theirs: Vec<(u64, u64, bool)> = vm.with_memory(|m| {
            m.regions()
                .iter()
                .map(|r| (r.guest_addr, r.size, r.readonly))
                .collect()
        });
        if ours != theirs {
            return mismatch(format!(
                "memory regions (guest_addr, size, readonly) {} in the snapshot, {} in the VM",
                describe_regions(&ours),
                describe_regions(&theirs)
            ));
        }
        let ids: Vec<u64> = self.vcpus.iter().map(|v| v.id).collect();
        let vm_ids: Vec<u64> = vm.vcpus().iter().map(|v| v.id).collect();
        if ids != vm_ids {
            return mismatch(format!(
                "vCPU ids {ids:?} in the snapshot, {vm_ids:?} in the VM"
            ));
        }
        if self.irqchip.is_some() != vm.has_irqchip() || self.pit.is_some() != vm.has_pit() {
            return mismatch(format!(
                "irqchip={}, pit={} in the snapshot, irqchip={}, pit={} in the VM",
                self.irqchip.is_some(),
                self.pit.is_some(),
                vm.has_irqchip(),
                vm.has_pit()
            ));
        }
        if !devices {
            return Ok(());
        }
        let names: Vec<&str> = self.devices.iter().map(|(n, _)| n.as_str()).collect();
        let vm_devices = device_names(vm);
        if names != vm_devices.iter().map(String::as_str).collect::<Vec<_>>() {
            return mismatch(format!(
                "devices with state {names:?} in the snapshot, {vm_devices:?} in the VM"
            ));
        }
        Ok(())
    }

    /// Writes the snapshot to a file (see `file` for the format).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let vendor = match self.vcpus.first() {
            Some(v) => file::vendor(&v.cpuid),
            None => host_vendor()?,
        };
        file::save(self, path, vendor)
    }

    /// Reads a snapshot file, checking all of it; a file from another CPU vendor is
    /// refused.
    pub fn load(path: &std::path::Path) -> Result<Snapshot> {
        file::load(path, host_vendor()?)
    }

    /// Fails unless `[gpa, gpa + len)` lies in the snapshot's memory.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<()> {
        let mut at = gpa;
        let end = gpa.checked_add(len);
        while Some(at) < end {
            match self
                .regions
                .iter()
                .find(|r| r.guest_addr <= at && at < r.guest_addr + r.size)
            {
                Some(r) => at = r.guest_addr + r.size,
                None => {
                    return Err(Error::Memory(format!(
                        "guest physical range {gpa:#x} + {len:#x} bytes is not entirely inside \
                         the snapshot's memory"
                    )))
                }
            }
        }
        if end.is_none() {
            return Err(Error::Memory(format!(
                "guest physical range {gpa:#x} + {len:#x} bytes overflows"
            )));
        }
        Ok(())
    }

    /// The bytes at guest physical `gpa` as the snapshot saw them.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = gpa + done as u64;
            let Some(r) = self
                .regions
                .iter()
                .find(|r| r.guest_addr <= at && at < r.guest_addr + r.size)
            else {
                return Err(Error::Memory(format!(
                    "guest physical range {gpa:#x} + {:#x} bytes is not entirely inside the \
                     snapshot's memory",
                    buf.len()
                )));
            };
            let offset = at - r.guest_addr;
            let (page, in_page) = (offset / 4096, (offset % 4096) as usize);
            let n = (4096 - in_page).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&r.page(page)[in_page..in_page + n]);
            done += n;
        }
        Ok(())
    }
}

fn describe_regions(regions: &[(u64, u64, bool)]) -> String {
    let items: Vec<String> = regions
        .iter()
        .map(|(a, s, ro)| format!("({a:#x}, {s:#x}, {ro})"))
        .collect();
    format!("[{}]", items.join(", "))
}

fn device_names(vm: &VmCore) -> Vec<String> {
    vm.bus()
        .devices()
        .filter(|d| d.has_state())
        .map(|d| d.name())
        .collect()
}

/// The dirty rings of the vCPUs whose fd holders are `guards` (a VM with the ring on).
fn rings<'a, 'b: 'a>(
    guards: &'a mut [Guard<'b>],
) -> impl Iterator<Item = &'a mut ring::DirtyRing> + use<'a, 'b> {
    guards
        .iter_mut()
        .filter_map(|g| g.as_mut().and_then(|h| h.ring.as_mut()))
}

type Guard<'a> = crate::engine::vcpu::FdLock<'a>;

/// Makes the VM track writes for snapshots from now on: manual re-protection where the
/// host has it, KVM's dirty log on for every region, every log (or ring) and record
/// emptied.
fn start_tracking(
    vm: &VmCore,
    fd: &VmFd,
    memory: &MemoryMap,
    tracking: &mut Tracking,
    guards: &mut [Guard<'_>],
) -> Result<()> {
    let with_ring = vm.dirty_ring() != 0;
    if tracking.manual.is_none() {
        tracking.manual = Some(!with_ring && dirty::enable_manual_protect(&vm.kvm, fd));
    }
    let manual = tracking.manual.unwrap_or(false);
    for region in memory.regions() {
        memory.log_dirty_pages(fd, region)?;
        if !with_ring {
            let mut bits = vec![0; dirty::bitmap_words(region)];
            dirty::read(fd, region, manual, &mut bits)?;
        }
        region.record.track(region.pages());
    }
    if with_ring {
        ring::harvest_regions(rings(guards), memory.regions(), |_, _| {});
        ring::reset(fd)?;
        lock(&vm.ring_unreported).clear();
    }
    Ok(())
}

impl VmCore {
    fn check_idle(&self) -> Result<()> {
        self.check_open()?;
        if self.group().is_some() {
            return Err(Error::Busy(
                "the VM's vCPUs were started and not joined yet: join() them first".into(),
            ));
        }
        Ok(())
    }

    /// Captures the whole VM. No vCPU may be running; an access a handler answered is
    /// completed first; a read waiting for `respond()` must be answered first.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>> {
        self.check_idle()?;
        let vcpus = self.vcpus();
        let mut guards = vcpus
            .iter()
            .map(|v| v.lock_idle())
            .collect::<Result<Vec<_>>>()?;
        if let Some(v) = vcpus.iter().find(|v| v.awaits_response()) {
            return Err(Error::Busy(format!(
                "vCPU {} waits for respond() to answer the IN or MMIO read its last run \
                 returned: answer it before taking a snapshot",
                v.id
            )));
        }
        cpu::check_xsave_size(
            self.with_fd(|fd| Ok(fd.check_extension_raw(kvm_bindings::KVM_CAP_XSAVE2.into())))?,
        )?;
        let mut states = Vec::with_capacity(vcpus.len());
        for (v, g) in vcpus.iter().zip(guards.iter_mut()) {
            let holder = g.as_mut().ok_or(Error::Closed("vCPU"))?;
            v.complete_pending_io(&mut holder.fd);
            v.settle_fpu(holder)?;
            let state = cpu::capture(v, &mut holder.fd, &self.kvm, self.has_irqchip())?;
            state.note_xcr0(&mut holder.fpu);
            states.push(state);
        }
        let (irqchip, pit) = self.capture_chips()?;
        // A host without KVM_CAP_ADJUST_CLOCK has no kvmclock to save.
        let clock = self.with_fd(|fd| Ok(fd.get_clock().ok().map(|c| c.clock)))?;
        let devices = self
            .bus()
            .devices()
            .filter(|d| d.has_state())
            .filter_map(|d| d.save_state().map(|s| (d.name(), s)))
            .collect();
        let originals = self.breakpoint_originals();
        // The VM fd's lock before the memory map's, as adding and removing memory take them.
        let (regions, id) = self.with_fd(|fd| {
            let memory = lock(self.memory_map());
            let mut tracking = lock(&self.tracking);
            start_tracking(self, fd, &memory, &mut tracking, &mut guards)?;
            let mut regions = memory
                .regions()
                .iter()
                .map(|r| RegionImage::capture(r))
                .collect::<Result<Vec<_>>>()?;
            // A snapshot never holds a breakpoint byte.
            for (gpa, byte) in originals {
                if let Some(image) = regions
                    .iter_mut()
                    .find(|i| i.guest_addr <= gpa && gpa < i.guest_addr + i.size)
                {
                    image.set_byte(gpa - image.guest_addr, byte);
                }
            }
            let id = next_id();
            tracking.base = Some(id);
            Ok((regions, id))
        })?;
        for (v, g) in vcpus.iter().zip(guards.iter_mut()) {
            if let Some(holder) = g.as_mut() {
                v.mirror_state(&mut holder.fd);
            }
            v.take_hidden_dirty();
        }
        Ok(Arc::new(Snapshot {
            id,
            regions,
            vcpus: states,
            irqchip,
            pit,
            devices,
            clock,
        }))
    }

    fn capture_chips(&self) -> Result<(Option<Vec<kvm_irqchip>>, Option<kvm_pit_state2>)> {
        self.with_fd(|fd| {
            let irqchip = if self.has_irqchip() {
                let mut chips = Vec::new();
                for chip_id in 0..3 {
                    let mut chip = kvm_irqchip {
                        chip_id,
                        ..Default::default()
                    };
                    fd.get_irqchip(&mut chip)
                        .map_err(|e| Error::ioctl("KVM_GET_IRQCHIP", e))?;
                    chips.push(chip);
                }
                Some(chips)
            } else {
                None
            };
            let pit = if self.has_pit() {
                Some(fd.get_pit2().map_err(|e| Error::ioctl("KVM_GET_PIT2", e))?)
            } else {
                None
            };
            Ok((irqchip, pit))
        })
    }

    /// Puts the VM back as `snap` saw it. Everything is checked before anything changes:
    /// the layout must match and no vCPU may be running.
    pub fn restore(&self, snap: &Snapshot) -> Result<()> {
        self.restore_with(snap, true)
    }

    /// A new VM from a snapshot: its memory regions are copy-on-write views of the
    /// snapshot's (several VMs share the clean image and pay only for the pages they
    /// write), its vCPUs (CPUID included) and in-kernel chips are as the snapshot saw them. Devices are
    /// not created: add them, then `restore` puts their state back too.
    pub fn from_snapshot(snap: &Snapshot) -> Result<Arc<VmCore>> {
        Self::from_snapshot_with_ring(snap, 0)
    }

    /// `from_snapshot`, with a dirty ring of `entries` per vCPU (0: the dirty bitmap).
    pub fn from_snapshot_with_ring(snap: &Snapshot, entries: u32) -> Result<Arc<VmCore>> {
        let vm = VmCore::new(snap.irqchip.is_some(), snap.pit.is_some())?;
        if entries != 0 {
            vm.enable_dirty_ring(entries)?;
        }
        for image in &snap.regions {
            vm.add_mapped_memory(
                image.guest_addr,
                image.private_view()?,
                image.readonly,
                Some(snap.id),
            )?;
        }
        for st in &snap.vcpus {
            // The CPUID the snapshot was taken with (a file's may come from another host).
            vm.create_vcpu(Some(st.id))?.set_cpuid(&st.cpuid)?;
        }
        vm.restore_with(snap, false)?;
        Ok(vm)
    }

    fn restore_with(&self, snap: &Snapshot, devices: bool) -> Result<()> {
        self.check_idle()?;
        snap.check_layout_of(self, devices)?;
        let vcpus = self.vcpus();
        let mut guards = vcpus
            .iter()
            .map(|v| v.lock_idle())
            .collect::<Result<Vec<_>>>()?;
        let mut khz = vec![None; snap.vcpus.len()];
        if lock(&self.tracking).base != Some(snap.id) {
            // Another VM's snapshot, or one loaded from a file: its vCPU state must fit.
            for ((g, st), khz) in guards.iter_mut().zip(&snap.vcpus).zip(&mut khz) {
                let holder = g.as_mut().ok_or(Error::Closed("vCPU"))?;
                cpu::check_cpuid(&holder.fd, st)?;
                *khz = cpu::check_tsc_khz(&self.kvm, &holder.fd, st)?;
            }
        }
        for ((v, g), st) in vcpus.iter().zip(guards.iter_mut()).zip(&snap.vcpus) {
            let holder = g.as_mut().ok_or(Error::Closed("vCPU"))?;
            v.settle_for_restore(&mut holder.fd, &st.sregs, st.regs.rip);
            v.forget_pending_read();
            v.note_restored_at(st.regs.rip);
        }
        // The VM fd's lock before the memory map's, as adding and removing memory take them.
        let tracked = self.with_fd(|fd| {
            let memory = lock(self.memory_map());
            let mut tracking = lock(&self.tracking);
            let tracked = tracking.base == Some(snap.id);
            if tracked {
                self.restore_dirty(fd, snap, &memory, &mut tracking, &mut guards)?;
            } else {
                start_tracking(self, fd, &memory, &mut tracking, &mut guards)?;
                for (image, region) in snap.regions.iter().zip(memory.regions()) {
                    image.restore_all(region, region.backing == Some(snap.id))?;
                }
                tracking.base = Some(snap.id);
            }
            Ok(tracked)
        })?;
        self.restore_chips(snap)?;
        self.repatch_breakpoints()?;
        for ((v, g), (st, khz)) in vcpus
            .iter()
            .zip(guards.iter_mut())
            .zip(snap.vcpus.iter().zip(khz))
        {
            let holder = g.as_mut().ok_or(Error::Closed("vCPU"))?;
            if let Some(khz) = khz {
                cpu::set_tsc_khz(&holder.fd, khz)?;
            }
            let hidden = v.take_hidden_dirty();
            let fast = tracked
                && !hidden
                && st.lapic.is_none()
                && !at_ring0(st)
                && v.mirrored_state(&mut holder.fd) == Some((st.sregs, st.events));
            if fast {
                cpu::put_user(v, holder, st, snap.id)?;
            } else {
                st.note_xcr0(&mut holder.fpu);
                cpu::put_all(v, &mut holder.fd, st, tracked)?;
                v.mirror_state(&mut holder.fd);
                v.take_hidden_dirty();
                v.count_full_restore();
            }
        }
        if let (false, Some(ns)) = (tracked, snap.clock) {
            // Flags 0: the clock is set to exactly this value, not advanced by the
            // real time that passed since.
            let data = kvm_clock_data {
                clock: ns,
                ..Default::default()
            };
            self.with_fd(|fd| {
                fd.set_clock(&data)
                    .map_err(|e| Error::ioctl("KVM_SET_CLOCK", e))
            })?;
        }
        if !devices {
            return Ok(());
        }
        let bus = self.bus();
        let mut states = snap.devices.iter();
        for device in bus.devices() {
            if device.has_state() {
                if let Some((_, state)) = states.next() {
                    device.restore_state(state)?;
                }
            }
        }
        Ok(())
    }

    /// Copies back the pages written since the snapshot or the last restore.
    fn restore_dirty(
        &self,
        fd: &VmFd,
        snap: &Snapshot,
        memory: &MemoryMap,
        tracking: &mut Tracking,
        guards: &mut [Guard<'_>],
    ) -> Result<()> {
        if self.dirty_ring() != 0 {
            return self.restore_ring(fd, snap, memory, tracking, guards);
        }
        let manual = tracking.manual.unwrap_or(false);
        for (image, region) in snap.regions.iter().zip(memory.regions()) {
            let words = dirty::bitmap_words(region);
            tracking.bits.resize(words, 0);
            let bits = &mut tracking.bits[..words];
            dirty::read(fd, region, manual, bits)?;
            if region.record.take(bits) {
                image.restore_all(region, region.backing == Some(snap.id))?;
            } else {
                image.restore_pages(region, bits);
            }
        }
        Ok(())
    }

    /// `restore_dirty` with the dirty ring: the pages every vCPU's ring holds, then the
    /// rings reset. The pages are copied from the list the rings give, so a restore costs
    /// what the guest wrote; a bitmap of the region is used only where the host wrote
    /// pages too.
    fn restore_ring(
        &self,
        fd: &VmFd,
        snap: &Snapshot,
        memory: &MemoryMap,
        tracking: &mut Tracking,
        guards: &mut [Guard<'_>],
    ) -> Result<()> {
        let regions = memory.regions();
        let pages = &mut tracking.ring_pages;
        pages.clear();
        ring::harvest_regions(rings(guards), regions, |i, page| pages.push((i, page)));
        ring::reset(fd)?;
        // As a restore's read of the dirty bitmap does, this consumes the log.
        lock(&self.ring_unreported).clear();
        for (i, (image, region)) in snap.regions.iter().zip(regions).enumerate() {
            let listed = pages.iter().filter(|(r, _)| *r == i).map(|(_, p)| *p);
            if !region.record.has_host_writes() {
                // Nothing to merge: `take` only says whether a writable view existed.
                if region.record.take(&mut []) {
                    image.restore_all(region, region.backing == Some(snap.id))?;
                } else {
                    listed.for_each(|page| image.restore_page(region, page));
                }
                continue;
            }
            let mut bits = vec![0; dirty::bitmap_words(region)];
            for page in listed {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
            if region.record.take(&mut bits) {
                image.restore_all(region, region.backing == Some(snap.id))?;
            } else {
                image.restore_pages(region, &bits);
            }
        }
        Ok(())
    }

    fn restore_chips(&self, snap: &Snapshot) -> Result<()> {
        self.with_fd(|fd| {
            for chip in snap.irqchip.iter().flatten() {
                fd.set_irqchip(chip)
                    .map_err(|e| Error::ioctl("KVM_SET_IRQCHIP", e))?;
            }
            if let Some(pit) = &snap.pit {
                fd.set_pit2(pit)
                    .map_err(|e| Error::ioctl("KVM_SET_PIT2", e))?;
            }
            Ok(())
        })
    }
}
