//! Watchpoints by guest-physical page, for hosts whose KVM does not deliver debug-register
//! watchpoints (and wherever `KVMPY_WATCH_MECHANISM=memslot` asks for them).
//!
//! The page that holds a watched range is moved to a KVM memory slot of its own over the
//! same host memory:
//! - a `"write"` watchpoint makes it a read-only slot (`KVM_MEM_READONLY`): reads and
//!   instruction fetches stay native, and a guest write becomes a `KVM_EXIT_MMIO` that
//!   KVM's emulator raises once it has decoded the instruction. kvmpy does the write into
//!   the region's memory itself and ends the run with a `watchpoint` exit if it touched the
//!   watched bytes; otherwise the run goes on;
//! - an `"rw"` watchpoint leaves a hole (no slot) over the page, so reads exit too and are
//!   served from the region's memory. Instructions cannot be fetched from a hole: a guest
//!   that executes code from such a page ends its run with a clear error.
//!
//! The region is otherwise unchanged (its `Region`, its host mapping, its snapshots): only
//! its KVM slots (`Region::pieces`) change, and dirty logging reads them slot by slot.
//! Writes kvmpy makes for the guest are host writes that a snapshot's next restore copies
//! back.

use std::sync::atomic::Ordering;

use crate::engine::allstop::EntriesHeld;
use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::memory::{delete_slot, set_slot, Piece, Region, PAGE_SIZE};
use crate::engine::vm::VmCore;

/// At most this many watchpoints (the count of the debug registers, so code written for
/// bare metal behaves the same).
pub const MAX_WATCHPOINTS: usize = 4;

/// What a watchpoint reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// Writes.
    Write,
    /// Reads only (gdb's `rwatch`; its page is a hole, as for `ReadWrite`).
    Read,
    /// Reads and writes.
    ReadWrite,
}

impl WatchKind {
    /// `"write"` or `"rw"`.
    pub fn parse(kind: &str) -> Result<Self> {
        match kind {
            "write" => Ok(WatchKind::Write),
            "rw" => Ok(WatchKind::ReadWrite),
            _ => Err(Error::Value(format!(
                "a watchpoint's kind is \"write\" or \"rw\", not {kind:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WatchKind::Write => "write",
            WatchKind::Read => "read",
            WatchKind::ReadWrite => "rw",
        }
    }
}

/// One watchpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The guest-virtual address it was set at.
    pub vaddr: u64,
    /// That address as translated when it was set.
    pub gpa: u64,
    pub len: u64,
    pub kind: WatchKind,
    /// The vCPU it reports to (`None`: any).
    pub owner: Option<u64>,
}

impl Watch {
    fn overlaps(&self, gpa: u64, len: u64) -> bool {
        gpa < self.gpa + self.len && self.gpa < gpa + len
    }

    fn page(&self) -> u64 {
        self.gpa & !(PAGE_SIZE - 1)
    }
}

/// A watched access that hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchHit {
    pub watch: Watch,
    /// The guest-physical address and size of the access.
    pub access: u64,
    pub size: u8,
    pub is_write: bool,
    /// The watched bytes before and after the access (little-endian).
    pub old: u64,
    pub new: u64,
}

/// Checks a watchpoint's length and alignment.
pub fn check_range(address: u64, len: u64) -> Result<()> {
    if !matches!(len, 1 | 2 | 4 | 8) {
        return Err(Error::Value(format!(
            "a watchpoint covers 1, 2, 4 or 8 bytes (the debug registers' lengths), not {len}"
        )));
    }
    if address % len != 0 {
        return Err(Error::Value(format!(
            "a {len}-byte watchpoint must be aligned to {len} bytes, not at {address:#x}"
        )));
    }
    Ok(())
}

/// The slots a region of `pages` pages needs for `watched` pages (region page index and
/// the strongest kind watching it): runs of ordinary pages, read-only runs for write
/// watchpoints, holes for read/write ones.
pub fn layout(pages: u64, readonly: bool, watched: &[(u64, WatchKind)]) -> Vec<(u64, u64, bool)> {
    let kind_of = |p: u64| {
        watched
            .iter()
            .filter(|(w, _)| *w == p)
            .map(|(_, k)| *k)
            .map(|k| k != WatchKind::Write)
            .max()
    };
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut p = 0;
    while p < pages {
        let kind = kind_of(p);
        let mut end = p + 1;
        // Ordinary pages run on until the next watched page; watched pages are one slot
        // each run of the same kind.
        while end < pages && kind_of(end) == kind {
            end += 1;
        }
        match kind {
            // Reads must exit too: no slot.
            Some(true) => {}
            Some(false) => out.push((p, end - p, true)),
            None => out.push((p, end - p, readonly)),
        }
        p = end;
    }
    out
}

/// Whether one of `watches` is in `region`.
pub fn watched(watches: &[Watch], region: &Region) -> bool {
    watches
        .iter()
        .any(|w| region.guest_addr <= w.gpa && w.gpa < region.end())
}

impl VmCore {
    /// Why `watch` cannot be added to `watches`, or the memory region it lies in.
    fn check_new_watch(&self, watches: &[Watch], watch: &Watch) -> Result<std::sync::Arc<Region>> {
        if watches
            .iter()
            .any(|w| w.vaddr == watch.vaddr && w.len == watch.len && w.owner == watch.owner)
        {
            return Err(Error::Value(format!(
                "a {}-byte watchpoint at {:#x} is already set",
                watch.len, watch.vaddr
            )));
        }
        if watches.len() >= MAX_WATCHPOINTS {
            return Err(Error::Value(format!(
                "at most {MAX_WATCHPOINTS} watchpoints can be set (the debug registers' \
                 count); remove one first"
            )));
        }
        let region = self.region_of(watch.gpa, watch.len)?;
        if region.readonly {
            return Err(Error::Value(format!(
                "{:#x} (guest-physical {:#x}) is in a read-only memory region: the guest \
                 cannot write it, and a read-only region cannot be split for watching",
                watch.vaddr, watch.gpa
            )));
        }
        Ok(region)
    }

    /// Adds a watchpoint of `len` bytes at guest-virtual `vaddr`, which is `gpa`
    /// (translated once, now), reporting to vCPU `owner` (any with `None`).
    pub fn add_watch(&self, watch: Watch) -> Result<()> {
        self.check_open()?;
        check_range(watch.vaddr, watch.len)?;
        check_range(watch.gpa, watch.len)?;
        self.check_new_watch(&lock(&self.watches), &watch)?;
        let _held = self.hold_still("set a watchpoint")?;
        let mut watches = lock(&self.watches);
        // Checked again: the list may have changed while the lock was not held.
        let region = self.check_new_watch(&watches, &watch)?;
        let by_page = crate::engine::debug_regs::watch_mechanism()?
            == crate::engine::debug_regs::WatchMechanism::Memslot;
        if !by_page {
            // The debug registers are shared with hardware breakpoints.
            crate::engine::hw_breakpoints::check_slots(
                self.hw_count.load(Ordering::SeqCst),
                watches.len(),
            )?;
        }
        if !by_page && watch.kind == WatchKind::Read {
            return Err(Error::Value(
                "the debug registers watch writes, or reads and writes, not reads alone".into(),
            ));
        }
        watches.push(watch);
        if !by_page {
            self.watch_count.store(watches.len(), Ordering::SeqCst);
            return Ok(());
        }
        if let Err(e) = self.reslot(&region, &watches) {
            watches.pop();
            return Err(e);
        }
        self.watch_count.store(watches.len(), Ordering::SeqCst);
        Ok(())
    }

    /// Removes the watchpoint at guest-virtual `vaddr` of `len` bytes of `owner`; its page
    /// goes back to an ordinary slot when nothing else watches it.
    pub fn remove_watch(&self, vaddr: u64, len: u64, owner: Option<u64>) -> Result<()> {
        self.check_open()?;
        let find = |watches: &[Watch]| {
            watches
                .iter()
                .position(|w| w.vaddr == vaddr && w.len == len && w.owner == owner)
                .ok_or_else(|| {
                    Error::Value(format!("no {len}-byte watchpoint is set at {vaddr:#x}"))
                })
        };
        find(&lock(&self.watches))?;
        let _held = self.hold_still("remove a watchpoint")?;
        let mut watches = lock(&self.watches);
        let at = find(&watches)?;
        let removed = watches.remove(at);
        let region = self.region_of(removed.gpa, removed.len);
        let by_page = crate::engine::debug_regs::watch_mechanism()
            .is_ok_and(|m| m == crate::engine::debug_regs::WatchMechanism::Memslot);
        if let (Ok(region), true) = (region, by_page) {
            if let Err(e) = self.reslot(&region, &watches) {
                watches.insert(at, removed);
                return Err(e);
            }
        }
        self.watch_count.store(watches.len(), Ordering::SeqCst);
        Ok(())
    }

    /// The watchpoints of `owner` (`None`: the VM-wide ones).
    pub fn watches_of(&self, owner: Option<u64>) -> Vec<Watch> {
        lock(&self.watches)
            .iter()
            .filter(|w| w.owner == owner)
            .copied()
            .collect()
    }

    fn region_of(&self, gpa: u64, len: u64) -> Result<std::sync::Arc<Region>> {
        self.with_memory(|m| {
            m.regions()
                .iter()
                .find(|r| r.guest_addr <= gpa && gpa + len <= r.end())
                .cloned()
        })
        .ok_or_else(|| {
            Error::Memory(format!(
                "guest-physical {gpa:#x} + {len} bytes is not inside a memory region"
            ))
        })
    }

    /// Fails if a vCPU runs on another thread: its slots cannot change under it. Else
    /// keeps every vCPU out of the guest until the guard returned is dropped: one that
    /// starts a run meanwhile waits at the VM's gate (see `allstop`) instead of entering
    /// while its memory is being re-slotted (a vCPU in the guest then finds no memory).
    fn hold_still(&self, what: &str) -> Result<EntriesHeld<'_>> {
        self.check_not_running(what)?;
        let held = self.hold_entries()?;
        self.check_not_running(what)?;
        Ok(held)
    }

    fn check_not_running(&self, what: &str) -> Result<()> {
        if self.group().is_some() {
            return Err(Error::Busy(format!(
                "cannot {what} while the VM's vCPUs are started (and not joined yet): \
                 stop and join them first"
            )));
        }
        let me = crate::engine::gettid();
        match self
            .vcpus()
            .iter()
            .find(|v| v.runner().is_some_and(|t| t != me))
        {
            Some(v) => Err(Error::Busy(format!(
                "cannot {what} while vCPU {} is running: stop it first",
                v.id
            ))),
            None => Ok(()),
        }
    }

    /// Registers `region` with KVM as the slots `watches` need. Pages the guest dirtied in
    /// the old slots are kept for the next restore; with the dirty ring (whose entries
    /// name slots), the next restore copies the whole memory and tracks anew.
    fn reslot(&self, region: &Region, watches: &[Watch]) -> Result<()> {
        let watched: Vec<(u64, WatchKind)> = watches
            .iter()
            .filter(|w| region.guest_addr <= w.gpa && w.gpa < region.end())
            .map(|w| ((w.page() - region.guest_addr) / PAGE_SIZE, w.kind))
            .collect();
        let wanted = layout(region.pages(), region.readonly, &watched);
        let old = region.pieces();
        let same = old.len() == wanted.len()
            && old
                .iter()
                .zip(&wanted)
                .all(|(p, w)| (p.first, p.pages, p.readonly) == *w);
        if same {
            return Ok(());
        }
        let ring = self.dirty_ring() != 0;
        let manual = lock(&self.tracking).manual.unwrap_or(false);
        if ring {
            lock(&self.tracking).base = None;
        }
        let max_slots = self.kvm.get_nr_memslots();
        let logging = region.record.logging();
        self.with_fd(|fd| {
            let memory = lock(self.memory_map());
            if !region.attached() {
                // Removed since the caller found it (`remove` runs under this lock): its
                // slot numbers may be another region's by now, and its mapping may go
                // once the caller lets go of it, so no slot may point there again.
                return Err(Error::Memory(format!(
                    "memory region {:#x}..{:#x} was removed",
                    region.guest_addr,
                    region.end()
                )));
            }
            if logging && !ring {
                let mut bits = vec![0; crate::engine::snapshot::dirty::bitmap_words(region)];
                crate::engine::snapshot::dirty::read(fd, region, manual, &mut bits)?;
                region.record.add_pages(&bits);
                // Still reported by the next `dirty_log`, as if the slots had kept them.
                crate::engine::snapshot::dirty::for_each_page(&bits, |page| {
                    region
                        .record
                        .note_emulated_write(page * PAGE_SIZE, PAGE_SIZE);
                });
            }
            // The region's own slot number first (the one it is known by), then its old
            // pieces', then free ones.
            let mut slots: Vec<u32> = vec![region.slot];
            slots.extend(old.iter().map(|p| p.slot).filter(|s| *s != region.slot));
            if slots.len() < wanted.len() {
                slots.extend(memory.free_slots(max_slots, wanted.len() - slots.len())?);
            }
            let pieces: Vec<Piece> = wanted
                .iter()
                .zip(slots)
                .map(|(&(first, pages, readonly), slot)| Piece {
                    slot,
                    first,
                    pages,
                    readonly,
                })
                .collect();
            for p in &old {
                delete_slot(fd, p.slot)?;
            }
            for (i, p) in pieces.iter().enumerate() {
                if let Err(e) = set_slot(fd, region, p, logging) {
                    // Put the old slots back rather than leave a hole.
                    for q in &pieces[..i] {
                        let _ = delete_slot(fd, q.slot);
                    }
                    for q in &old {
                        let _ = set_slot(fd, region, q, logging);
                    }
                    return Err(e);
                }
            }
            *lock(&region.pieces) = pieces;
            Ok(())
        })
    }

    /// The guest accessed `size` bytes at guest-physical `addr` with an MMIO exit: if that
    /// is a watched page, does the access on the region's memory (`data` holds a write's
    /// bytes; a read's are returned) and says whether a watchpoint of `vcpu` was hit.
    /// `None`: not a watched page.
    pub fn watched_access(
        &self,
        vcpu: u64,
        addr: u64,
        data: &mut [u8],
        is_write: bool,
    ) -> Result<Option<Option<WatchHit>>> {
        let watches = lock(&self.watches);
        let page = addr & !(PAGE_SIZE - 1);
        if !watches.iter().any(|w| w.page() == page) {
            return Ok(None);
        }
        let len = data.len() as u64;
        let hit = watches.iter().find(|w| {
            w.owner.is_none_or(|o| o == vcpu)
                && w.overlaps(addr, len)
                && match w.kind {
                    WatchKind::Write => is_write,
                    WatchKind::Read => !is_write,
                    WatchKind::ReadWrite => true,
                }
        });
        let value = |w: &Watch| -> Result<u64> {
            let mut b = [0u8; 8];
            self.read_memory_raw(w.gpa, &mut b[..w.len as usize])?;
            Ok(u64::from_le_bytes(b))
        };
        let old = match hit {
            Some(w) => value(w)?,
            None => 0,
        };
        if is_write {
            self.write_memory(addr, data)?;
            self.with_memory(|m| {
                if let Some(r) = m
                    .regions()
                    .iter()
                    .find(|r| r.guest_addr <= addr && addr < r.end())
                {
                    r.record
                        .note_emulated_write(addr - r.guest_addr, len.min(r.end() - addr));
                }
            });
        } else {
            self.read_memory_raw(addr, data)?;
        }
        let Some(w) = hit else {
            return Ok(Some(None));
        };
        Ok(Some(Some(WatchHit {
            watch: *w,
            access: addr,
            size: data.len() as u8,
            is_write,
            old,
            new: value(w)?,
        })))
    }

    /// Whether guest-physical `gpa` is in a page a read/write watchpoint made a hole.
    pub fn in_watch_hole(&self, gpa: u64) -> bool {
        lock(&self.watches)
            .iter()
            .any(|w| w.kind != WatchKind::Write && w.page() == gpa & !(PAGE_SIZE - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_split_around_watched_pages() {
        assert_eq!(layout(4, false, &[]), vec![(0, 4, false)]);
        assert_eq!(
            layout(4, false, &[(1, WatchKind::Write)]),
            vec![(0, 1, false), (1, 1, true), (2, 2, false)]
        );
        assert_eq!(
            layout(
                4,
                false,
                &[(0, WatchKind::ReadWrite), (3, WatchKind::Write)]
            ),
            vec![(1, 2, false), (3, 1, true)]
        );
        // A read/write watchpoint wins over a write one on the same page.
        assert_eq!(
            layout(
                2,
                false,
                &[(1, WatchKind::Write), (1, WatchKind::ReadWrite)]
            ),
            vec![(0, 1, false)]
        );
        assert_eq!(
            layout(3, false, &[(1, WatchKind::Write), (2, WatchKind::Write)]),
            vec![(0, 1, false), (1, 2, true)]
        );
    }

    #[test]
    fn a_removed_region_gets_no_slot_back() {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("/dev/kvm cannot be opened: skipped");
            return;
        }
        let vm = VmCore::new(false, false).unwrap();
        let options = crate::engine::RegionOptions::default;
        let size = 4 * PAGE_SIZE;
        let removed = vm.add_memory(0, size, options()).unwrap();
        vm.remove_memory(&removed).unwrap();
        // Another region takes the removed one's slot number.
        let other = vm.add_memory(0x10_0000, size, options()).unwrap();
        assert_eq!(other.slot, removed.slot);
        // What a watchpoint set on the removed region would do, had the removal (and the
        // new region) come after its checks: nothing.
        let watch = Watch {
            vaddr: 0x1000,
            gpa: 0x1000,
            len: 8,
            kind: WatchKind::Write,
            owner: None,
        };
        let err = vm.reslot(&removed, &[watch]).unwrap_err().to_string();
        assert!(err.contains("was removed"), "{err}");
        // KVM has no slot over the removed region's addresses: a new region fits there.
        vm.add_memory(0, size, options()).unwrap();
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(0x1000, 3).is_err());
        assert!(check_range(0x1002, 4).is_err());
        assert!(check_range(0x1008, 8).is_ok());
        assert!(WatchKind::parse("read").is_err());
    }
}
