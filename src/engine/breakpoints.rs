//! The breakpoint table: software breakpoints patched into guest memory, one `int3`
//! byte each, with the original byte kept. The one mechanism for debugger breakpoints
//! and, later, one-shot coverage breakpoints (the snapchange / what-the-fuzz design).
//!
//! - An entry is keyed by guest-virtual address and remembers the guest-physical byte it
//!   patched. Its owners say who wants it: a vCPU id, or the whole VM. An entry patched
//!   by several owners is patched once and removed when its last owner removes it.
//! - `one_shot` entries are meant for coverage: the run loop disarms them on their first
//!   hit and reports nothing to the user (see [`Hit`]).
//! - Coverage entries (see `coverage`) count blocks into an AFL-style map. Their patch
//!   may be [`PIO_PATCH`] instead of `int3`, and it lives in a fuzzing executor's own
//!   clean image (`in_image`), so a restore brings it back with the page; when such an
//!   entry goes, the original byte for that image is queued in [`Breakpoints::image_writes`].
//! - Snapshots never hold a patch byte: [`Breakpoints::originals`] gives the bytes a
//!   captured image must hold instead, and [`Breakpoints::repatch`] re-applies the
//!   patches after a restore copied pages back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::coverage::CoverageMap;

/// The byte patched in: `int3`.
pub const PATCH: u8 = 0xcc;
/// The byte patched in where port I/O exits straight to the host (CPL3 with IOPL=3, or
/// ring 0): `out dx, al`, one byte, an exit from user mode with no ring-0 code run.
pub const PIO_PATCH: u8 = 0xee;

/// Who set a breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// Python's `vm.add_breakpoint`: every vCPU stops, Python's handler sees it.
    Vm,
    /// Python's `cpu.add_breakpoint`: that vCPU stops, Python's handler sees it.
    Vcpu(u64),
    /// A gdb client: every vCPU stops for gdb; Python's handler does not see it.
    Gdb,
}

/// Who a breakpoint hit is reported to (see [`Breakpoints::audience`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audience {
    /// Python set it (for the VM or the vCPU that hit it): its handler is called.
    pub python: bool,
    /// A gdb client set it: the run stops for gdb, after Python's handler if both set it.
    pub gdb: bool,
}

impl Audience {
    /// Everyone either audience reports to.
    pub fn or(self, other: Audience) -> Audience {
        Audience {
            python: self.python || other.python,
            gdb: self.gdb || other.gdb,
        }
    }
}

/// Who `owners`' breakpoint hit on vCPU `vcpu` is reported to.
fn audience_of(owners: &[Owner], vcpu: u64) -> Audience {
    Audience {
        python: owners
            .iter()
            .any(|o| *o == Owner::Vm || *o == Owner::Vcpu(vcpu)),
        gdb: owners.contains(&Owner::Gdb),
    }
}

/// One patched address.
#[derive(Clone, Debug)]
pub struct Entry {
    pub gpa: u64,
    /// The byte the guest had at `gpa` before the patch.
    pub original: u8,
    pub owners: Vec<Owner>,
    pub one_shot: bool,
    /// Whether the patch byte is in memory now (false while stepping over it).
    pub armed: bool,
    /// The vCPU stepping over it while it is out (see `allstop`): a trap at it on any
    /// other vCPU was taken before the patch went out, and is a hit.
    pub stepper: Option<u64>,
    /// Removed while vCPUs may still hold an exit from its patch: kept (unpatched, no
    /// owner) so that such an exit is known for what it was, until
    /// [`Breakpoints::purge_retired`].
    pub retired: bool,
    /// The byte patched in: [`PATCH`] or [`PIO_PATCH`].
    pub patch: u8,
    /// A coverage block: a hit counts into the coverage map.
    pub coverage: bool,
    /// The patch is also in a fuzzing executor's clean image (not re-patched after a
    /// restore: the restore brings it back).
    pub in_image: bool,
}

/// What a hit at an address means for a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// Not a breakpoint of kvmpy's: the guest's own `int3`.
    NotOurs,
    /// A breakpoint of this vCPU or of the VM: report it to its audience, as its owners
    /// were at the trap (a removal after the trap must not turn the hit into an exit
    /// nobody asked for).
    Report(Audience),
    /// Another vCPU's breakpoint: step over it silently.
    Pass,
    /// A one-shot (coverage) breakpoint: disarm it for good and go on.
    OneShot,
    /// A coverage block that stays in ("armed" mode): count the hit, step over it.
    Count,
    /// A breakpoint removed after the vCPU trapped at it: run the original instruction
    /// (never for an original that is the patch byte itself: that is [`Hit::NotOurs`]).
    Stale,
}

/// Why an insertion or removal was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TableError {
    /// Another virtual address already patches this physical byte.
    Alias { vaddr: u64, gpa: u64 },
    /// The owner has no breakpoint at this address.
    Missing { vaddr: u64 },
    /// A coverage block where a breakpoint already is.
    Taken { vaddr: u64 },
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Alias { vaddr, gpa } => write!(
                f,
                "guest-physical address {gpa:#x} already has a breakpoint, at virtual address \
                 {vaddr:#x}"
            ),
            TableError::Missing { vaddr } => write!(f, "no breakpoint at {vaddr:#x}"),
            TableError::Taken { vaddr } => write!(
                f,
                "a coverage block at {vaddr:#x}, where a breakpoint already is (each block \
                 address once, and no debugger breakpoint on it)"
            ),
        }
    }
}

/// The patched addresses of one VM.
#[derive(Default, Debug)]
pub struct Breakpoints {
    entries: BTreeMap<u64, Entry>,
    /// How many entries patch [`PIO_PATCH`], armed or stepped over (the run loop looks at
    /// port writes only while there are some). Shared with the VM (`pio_counter`) so the
    /// run loop can look without taking the table's lock on every port write.
    pio: Arc<AtomicUsize>,
    /// How many entries have their patch in an image: the others are re-patched after
    /// a restore.
    imaged: usize,
    /// How many entries are retired (see [`Entry::retired`]).
    retired: usize,
    /// `(gpa, original)` for each image patch that went (a one-shot hit, a removal): the
    /// executor that owns the image writes them there before its next restore.
    pub image_writes: Vec<(u64, u8)>,
    /// The coverage map the coverage entries count into.
    pub coverage: Option<CoverageMap>,
}

/// What the caller must write to memory after a table change.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    None,
    /// Write `byte` at `gpa`.
    Byte {
        gpa: u64,
        byte: u8,
    },
}

impl Breakpoints {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, vaddr: u64) -> Option<&Entry> {
        self.entries.get(&vaddr)
    }

    /// `(vaddr, entry)` for every breakpoint.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(v, e)| (*v, e))
    }

    /// Adds `owner`'s breakpoint at `vaddr` (physical `gpa`, whose byte is `current`).
    pub fn insert(
        &mut self,
        vaddr: u64,
        gpa: u64,
        current: u8,
        owner: Owner,
        one_shot: bool,
    ) -> Result<Write, TableError> {
        self.insert_patch(vaddr, gpa, current, owner, one_shot, PATCH)
    }

    /// [`Breakpoints::insert`] with the byte to patch in ([`PATCH`] or [`PIO_PATCH`]),
    /// for a new entry (an existing one keeps its own).
    pub fn insert_patch(
        &mut self,
        vaddr: u64,
        gpa: u64,
        current: u8,
        owner: Owner,
        one_shot: bool,
        patch: u8,
    ) -> Result<Write, TableError> {
        if self.entries.get(&vaddr).is_some_and(|e| e.retired) {
            let e = self.entries.get_mut(&vaddr).expect("found above");
            if e.gpa == gpa {
                // Set again: the same entry, patched again.
                (e.retired, e.armed, e.original) = (false, true, current);
                self.retired -= 1;
                (e.owners, e.one_shot) = (vec![owner], one_shot);
                return Ok(Write::Byte { gpa, byte: e.patch });
            }
            self.drop_retired(vaddr);
        }
        if let Some(e) = self.entries.get_mut(&vaddr) {
            if e.gpa == gpa {
                if !e.owners.contains(&owner) {
                    e.owners.push(owner);
                }
                e.one_shot &= one_shot;
                // A debugger breakpoint on a coverage block: a breakpoint from now on.
                e.coverage = false;
                return Ok(Write::None);
            }
        }
        self.add_entry(
            vaddr,
            Entry {
                gpa,
                original: current,
                owners: vec![owner],
                one_shot,
                armed: true,
                stepper: None,
                retired: false,
                patch,
                coverage: false,
                in_image: false,
            },
        )?;
        Ok(Write::Byte { gpa, byte: patch })
    }

    /// Adds a coverage block at `vaddr` (physical `gpa`, original byte `original`) whose
    /// `patch` the caller writes into its clean image and memory; `one_shot` for "once"
    /// mode (gone on the first hit), else it stays and counts every hit.
    pub fn insert_coverage(
        &mut self,
        vaddr: u64,
        gpa: u64,
        original: u8,
        patch: u8,
        one_shot: bool,
    ) -> Result<(), TableError> {
        if self.entries.contains_key(&vaddr) {
            return Err(TableError::Taken { vaddr });
        }
        self.add_entry(
            vaddr,
            Entry {
                gpa,
                original,
                owners: Vec::new(),
                one_shot,
                armed: true,
                stepper: None,
                retired: false,
                patch,
                coverage: true,
                in_image: true,
            },
        )
    }

    /// Adds a new entry, refused where another address already patches its byte.
    fn add_entry(&mut self, vaddr: u64, entry: Entry) -> Result<(), TableError> {
        let gpa = entry.gpa;
        self.drop_retired_where(|e| e.gpa == gpa);
        if let Some((&other, _)) = self.entries.iter().find(|(_, e)| e.gpa == gpa) {
            return Err(TableError::Alias { vaddr: other, gpa });
        }
        let (patch, in_image) = (entry.patch, entry.in_image);
        self.entries.insert(vaddr, entry);
        self.count(patch, in_image, 1);
        Ok(())
    }

    fn count(&mut self, patch: u8, in_image: bool, add: isize) {
        if patch == PIO_PATCH {
            // Changed only with the table locked; the count is published before the
            // caller writes the patch byte that a guest could hit.
            let now = self.pio.load(Ordering::Relaxed).saturating_add_signed(add);
            self.pio.store(now, Ordering::Release);
        }
        if in_image {
            self.imaged = self.imaged.saturating_add_signed(add);
        }
    }

    /// Takes every coverage entry out: returns `(gpa, original)` of those still patched
    /// (for memory and the image) and drops the map.
    pub fn clear_coverage(&mut self) -> Vec<(u64, u8)> {
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.in_image && e.owners.is_empty())
            .map(|(v, _)| *v)
            .collect();
        let mut out = Vec::new();
        for vaddr in gone {
            let e = self.entries.remove(&vaddr).expect("listed above");
            self.count(e.patch, true, -1);
            out.push((e.gpa, e.original));
        }
        self.coverage = None;
        out
    }

    /// How many coverage entries have their patch in an image.
    pub fn coverage_blocks(&self) -> usize {
        self.imaged
    }

    /// Whether a port write may be a [`PIO_PATCH`] hit.
    pub fn has_pio(&self) -> bool {
        self.pio.load(Ordering::Relaxed) > 0
    }

    /// The count behind [`Breakpoints::has_pio`], for reading without the table's lock.
    pub fn pio_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.pio)
    }

    /// Whether a [`PIO_PATCH`] entry is at `vaddr`: armed, or taken out for a step over it
    /// (a port write from it is then one another vCPU made just before).
    pub fn pio_at(&self, vaddr: u64) -> bool {
        self.has_pio()
            && self
                .entries
                .get(&vaddr)
                .is_some_and(|e| e.patch == PIO_PATCH)
    }

    /// Removes `owner`'s breakpoint at `vaddr`; the original byte goes back when it was
    /// the last owner.
    pub fn remove(&mut self, vaddr: u64, owner: Owner) -> Result<Write, TableError> {
        let e = self
            .entries
            .get_mut(&vaddr)
            .filter(|e| e.owners.contains(&owner))
            .ok_or(TableError::Missing { vaddr })?;
        e.owners.retain(|o| *o != owner);
        if !e.owners.is_empty() {
            return Ok(Write::None);
        }
        if !e.in_image {
            // A vCPU may have trapped at the patch and not yet looked: keep the entry.
            let was_armed = std::mem::replace(&mut e.armed, false);
            (e.retired, e.stepper) = (true, None);
            self.retired += 1;
            return Ok(if was_armed {
                Write::Byte {
                    gpa: e.gpa,
                    byte: e.original,
                }
            } else {
                Write::None
            });
        }
        let e = self.entries.remove(&vaddr).expect("entry found above");
        self.count(e.patch, e.in_image, -1);
        if e.in_image {
            self.image_writes.push((e.gpa, e.original));
        }
        Ok(if e.armed {
            Write::Byte {
                gpa: e.gpa,
                byte: e.original,
            }
        } else {
            Write::None
        })
    }

    /// What a trap at `vaddr` on vCPU `vcpu` means.
    pub fn hit(&self, vaddr: u64, vcpu: u64) -> Hit {
        match self.entries.get(&vaddr) {
            None => Hit::NotOurs,
            // Removed, and its original is the patch's own instruction (the guest's `int3`
            // or `out dx, al`): whether the vCPU ran the patch or the original, the guest
            // did what its own instruction does, once.
            Some(e) if e.retired && e.original == e.patch => Hit::NotOurs,
            Some(e) if e.retired => Hit::Stale,
            // Out for a step: this vCPU's own step runs the original instruction there.
            Some(e) if !e.armed && e.stepper.is_none_or(|s| s == vcpu) => Hit::NotOurs,
            Some(e) if e.one_shot => Hit::OneShot,
            Some(e) if e.coverage => Hit::Count,
            Some(e)
                if e.owners
                    .iter()
                    .any(|o| matches!(o, Owner::Vm | Owner::Gdb) || *o == Owner::Vcpu(vcpu)) =>
            {
                Hit::Report(audience_of(&e.owners, vcpu))
            }
            Some(_) => Hit::Pass,
        }
    }

    /// Who vCPU `vcpu`'s hit at `vaddr` is reported to.
    pub fn audience(&self, vaddr: u64, vcpu: u64) -> Audience {
        audience_of(
            self.entries.get(&vaddr).map_or(&[][..], |e| &e.owners[..]),
            vcpu,
        )
    }

    /// Takes the patch out at `vaddr` (to step over it, or for good with `one_shot`).
    pub fn disarm(&mut self, vaddr: u64) -> Write {
        match self.entries.get_mut(&vaddr) {
            Some(e) if e.armed => {
                e.armed = false;
                let w = Write::Byte {
                    gpa: e.gpa,
                    byte: e.original,
                };
                if e.one_shot {
                    let e = self.entries.remove(&vaddr).expect("found above");
                    self.count(e.patch, e.in_image, -1);
                    if e.in_image {
                        self.image_writes.push((e.gpa, e.original));
                    }
                }
                w
            }
            _ => Write::None,
        }
    }

    /// Takes the patch out at `vaddr` for vCPU `vcpu` to step over it (see
    /// [`Entry::stepper`]).
    pub fn step_out(&mut self, vaddr: u64, vcpu: u64) -> Write {
        let write = self.disarm(vaddr);
        if write != Write::None {
            if let Some(e) = self.entries.get_mut(&vaddr) {
                e.stepper = Some(vcpu);
            }
        }
        write
    }

    /// Puts the patch back at `vaddr` after a step over it.
    pub fn rearm(&mut self, vaddr: u64) -> Write {
        match self.entries.get_mut(&vaddr) {
            Some(e) if !e.armed && !e.retired => {
                e.armed = true;
                e.stepper = None;
                Write::Byte {
                    gpa: e.gpa,
                    byte: e.patch,
                }
            }
            _ => Write::None,
        }
    }

    /// Whether removed entries are kept (see [`Entry::retired`]).
    pub fn has_retired(&self) -> bool {
        self.retired > 0
    }

    fn drop_retired(&mut self, vaddr: u64) {
        if let Some(e) = self.entries.remove(&vaddr) {
            self.count(e.patch, e.in_image, -1);
            self.retired -= 1;
        }
    }

    /// Forgets the removed entries: to be called only when no vCPU can hold an exit
    /// from a patch taken out (none runs but the caller, at the start of its run).
    pub fn purge_retired(&mut self) {
        self.drop_retired_where(|_| true);
    }

    /// Forgets the removed entries `which` picks.
    fn drop_retired_where(&mut self, which: impl Fn(&Entry) -> bool) {
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.retired && which(e))
            .map(|(v, _)| *v)
            .collect();
        for vaddr in gone {
            self.drop_retired(vaddr);
        }
    }

    /// `(gpa, original)` of every armed patch: what a snapshot image holds instead.
    pub fn originals(&self) -> Vec<(u64, u8)> {
        self.entries
            .values()
            .filter(|e| e.armed)
            .map(|e| (e.gpa, e.original))
            .collect()
    }

    /// After memory was replaced (a restore): `read(gpa)` gives the byte now in memory.
    /// A byte that is not the patch is the new original; returns the patches to write.
    /// Entries whose patch is in an image are left alone (the restore brought it back).
    /// Returns `(gpa, patch)` for each write.
    pub fn repatch(&mut self, mut read: impl FnMut(u64) -> Option<u8>) -> Vec<(u64, u8)> {
        let mut writes = Vec::new();
        if self.imaged == self.entries.len() {
            return writes;
        }
        for e in self.entries.values_mut().filter(|e| e.armed && !e.in_image) {
            match read(e.gpa) {
                None => {}
                Some(byte) if byte == e.patch => {}
                Some(byte) => {
                    e.original = byte;
                    writes.push((e.gpa, e.patch));
                }
            }
        }
        writes
    }

    /// Replaces patch bytes in `buf`, a copy of guest-physical memory from `gpa`, by the
    /// original bytes (what a debugger shows when it reads memory).
    pub fn hide(&self, gpa: u64, buf: &mut [u8]) {
        let end = gpa.saturating_add(buf.len() as u64);
        for e in self.entries.values().filter(|e| e.armed) {
            if e.gpa >= gpa && e.gpa < end {
                buf[(e.gpa - gpa) as usize] = e.original;
            }
        }
    }
}

#[cfg(test)]
#[path = "breakpoints_tests.rs"]
mod tests;
