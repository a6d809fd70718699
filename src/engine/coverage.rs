//! Block coverage for fuzzing, with breakpoints patched at block starts (the snapchange /
//! what-the-fuzz design): each block's patch lives in the fuzzing executor's clean image,
//! so a restore brings it back with its page; in "once" mode the first hit puts the
//! original byte back in memory and in that image, so a block costs one exit for the
//! whole campaign. In "armed" mode the patch stays and each hit is counted (an exit, and
//! a single step over the block's first instruction).
//!
//! The patch byte depends on the host (see [`Mechanism`]): where KVM intercepts `int3`
//! it is `int3`; elsewhere, where port I/O exits straight to the host (kvmpy's user mode
//! runs CPL3 with IOPL=3; ring 0 always may), it is the one-byte `out dx, al`: an I/O
//! exit from CPL3 costs a fraction of a #BP taken through ring-0 exception stubs on a
//! host that emulates ring 0. Otherwise `int3` through the exception stubs.
//!
//! The map is AFL's: `map[h(block) & (size - 1)]` in "once" mode, edge hit counts
//! `map[(h(block) ^ h(previous) >> 1) & (size - 1)]` in "armed" mode.

use std::collections::HashSet;

use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::paging;
use crate::engine::breakpoints::{Hit, Write, PATCH, PIO_PATCH};
use crate::engine::debug::{self, Trap};
use crate::engine::error::{Error, Result};
use crate::engine::fuzz::CoverageConfig;
use crate::engine::lock;
use crate::engine::snapshot::Snapshot;
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;

/// How coverage breakpoints reach kvmpy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `int3`, intercepted by KVM (`KVM_EXIT_DEBUG`).
    Kvm,
    /// `out dx, al` (0xEE): a port I/O exit straight from the guest.
    PortIo,
    /// `int3` delivered to kvmpy's exception stubs.
    ExceptionStubs,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Kvm => "kvm",
            Mechanism::PortIo => "port-io",
            Mechanism::ExceptionStubs => "exception-stubs",
        }
    }

    /// The patch byte.
    pub fn patch(self) -> u8 {
        match self {
            Mechanism::PortIo => PIO_PATCH,
            _ => PATCH,
        }
    }

    /// The mechanism for code run at `cpl` with `iopl`, given the debugging mechanism.
    pub fn choose(debug: debug::Mechanism, cpl: u8, iopl: u8) -> Mechanism {
        match debug {
            debug::Mechanism::Intercept => Mechanism::Kvm,
            _ if cpl <= iopl => Mechanism::PortIo,
            _ => Mechanism::ExceptionStubs,
        }
    }

    /// The mechanism `wanted` names (`KVMPY_BREAKPOINT_MECHANISM`), or the choice above;
    /// one that cannot work for this host or privilege is refused.
    pub fn pick(debug: debug::Mechanism, cpl: u8, iopl: u8, wanted: Option<&str>) -> Result<Self> {
        match wanted {
            None | Some("") => Ok(Self::choose(debug, cpl, iopl)),
            Some("exception-stubs") => Ok(Mechanism::ExceptionStubs),
            Some("kvm") if debug == debug::Mechanism::Intercept => Ok(Mechanism::Kvm),
            Some("kvm") => Err(Error::Unsupported(format!(
                "{PATCH_ENV}=kvm, but this host's KVM does not intercept int3 (see \
                 `python -m kvmpy info`)"
            ))),
            Some("port-io") if cpl <= iopl => Ok(Mechanism::PortIo),
            Some("port-io") => Err(Error::Unsupported(format!(
                "{PATCH_ENV}=port-io, but the code runs at CPL {cpl} with IOPL {iopl}: \
                 its port I/O faults instead of exiting"
            ))),
            Some(other) => Err(Error::Value(format!(
                "{PATCH_ENV} must be \"kvm\", \"port-io\" or \"exception-stubs\", not \
                 {other:?}"
            ))),
        }
    }
}

/// The environment variable that picks how breakpoints reach kvmpy, coverage's and
/// debuggers', instead of kvmpy's choice (to compare them, or test each on one host).
pub const PATCH_ENV: &str = "KVMPY_BREAKPOINT_MECHANISM";

/// AFL's coverage map and what a campaign has covered.
#[derive(Debug)]
pub struct CoverageMap {
    pub map: Vec<u8>,
    /// "armed" mode: entries stay and count edges.
    pub armed: bool,
    prev: u64,
    seen: HashSet<u64>,
    /// Blocks covered for the first time since the last `take_new`.
    new: Vec<u64>,
}

/// A block address's hash (a 64-bit finalizer: neighbouring addresses spread).
pub fn block_hash(vaddr: u64) -> u64 {
    let mut x = vaddr;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl CoverageMap {
    /// A map of `size` bytes (a power of two, at least 1).
    pub fn new(size: usize, armed: bool) -> Result<Self> {
        if !size.is_power_of_two() || size > 1 << 28 {
            return Err(Error::Value(format!(
                "map_size must be a power of two from 1 to 2**28, not {size}"
            )));
        }
        Ok(CoverageMap {
            map: vec![0; size],
            armed,
            prev: 0,
            seen: HashSet::new(),
            new: Vec::new(),
        })
    }

    /// Counts a hit of the block at `vaddr`.
    pub fn record(&mut self, vaddr: u64) {
        let mask = (self.map.len() - 1) as u64;
        let h = block_hash(vaddr);
        let at = if self.armed {
            let at = (h ^ self.prev) & mask;
            self.prev = h >> 1;
            at
        } else {
            h & mask
        } as usize;
        // AFL++'s NeverZero counters: a count that wraps stays visible.
        self.map[at] = self.map[at].checked_add(1).unwrap_or(1);
        if self.seen.insert(vaddr) {
            self.new.push(vaddr);
        }
    }

    /// Before an execution: in "armed" mode the map holds one execution's counts.
    pub fn begin(&mut self) {
        self.new.clear();
        if self.armed {
            self.map.fill(0);
            self.prev = 0;
        }
    }

    /// The blocks covered for the first time since the last call.
    pub fn take_new(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.new)
    }

    /// How many blocks have been covered.
    pub fn covered(&self) -> usize {
        self.seen.len()
    }
}

/// Puts coverage entries for `cov.blocks` in `vm`'s breakpoint table (translated by
/// the page tables of `clean`'s vCPU at `index`), and their patches in `clean`'s memory
/// image and in the VM's memory; returns the mechanism. Changes nothing on error.
pub fn install(
    vm: &VmCore,
    clean: &mut Snapshot,
    index: usize,
    cov: &CoverageConfig,
) -> Result<Mechanism> {
    vm.check_open()?;
    let map = CoverageMap::new(cov.map_size, cov.armed)?;
    let st = clean
        .vcpus
        .get(index)
        .ok_or_else(|| Error::Value(format!("the snapshot has no vCPU at index {index}")))?;
    let cpl = if st.sregs.cr0 & 1 == 0 {
        0
    } else {
        (st.sregs.cs.selector & 3) as u8
    };
    let iopl = ((st.regs.rflags >> 12) & 3) as u8;
    let debug = debug::mechanism()?;
    let wanted = std::env::var(PATCH_ENV).ok();
    let mechanism = Mechanism::pick(debug, cpl, iopl, wanted.as_deref())?;
    if mechanism == Mechanism::ExceptionStubs {
        vm.check_debuggable("coverage breakpoints")?;
    }
    if cov.armed && debug == debug::Mechanism::ExceptionStubs {
        vm.check_debuggable("\"armed\" coverage (a single step after each hit)")?;
    }
    let mut blocks = cov.blocks.clone();
    blocks.sort_unstable();
    blocks.dedup();
    if blocks.is_empty() {
        return Err(Error::Value(
            "coverage needs at least one block address".into(),
        ));
    }
    let s = st.sregs;
    let mut found = Vec::with_capacity(blocks.len());
    for &vaddr in &blocks {
        let gpa = paging::translate(s.cr0, s.cr3, s.cr4, s.efer, vaddr, |gpa, size| {
            let mut buf = [0u8; 8];
            clean.read(gpa, &mut buf[..size]).ok()?;
            Some(u64::from_le_bytes(buf))
        })
        .map_err(|e| {
            Error::Value(format!(
                "coverage block {vaddr:#x} is not mapped in the target's address space ({e:?})"
            ))
        })?;
        let mut byte = [0u8];
        clean.read(gpa, &mut byte).map_err(|_| {
            Error::Value(format!(
                "coverage block {vaddr:#x} (guest-physical {gpa:#x}) is not in guest RAM"
            ))
        })?;
        found.push((vaddr, gpa, byte[0]));
    }
    let patch = mechanism.patch();
    let mut table = lock(&vm.breakpoints);
    if table.coverage.is_some() {
        return Err(Error::Value(
            "this VM has block coverage already (one fuzzing executor with coverage per VM)".into(),
        ));
    }
    for &(vaddr, gpa, original) in &found {
        if let Err(e) = table.insert_coverage(vaddr, gpa, original, patch, !cov.armed) {
            table.clear_coverage();
            return Err(Error::Value(e.to_string()));
        }
    }
    table.coverage = Some(map);
    drop(table);
    let patches: Vec<(u64, u8)> = found.iter().map(|&(_, gpa, _)| (gpa, patch)).collect();
    write_image(clean, &patches);
    for &(gpa, byte) in &patches {
        if let Err(e) = vm.write_memory(gpa, &[byte]) {
            uninstall(vm);
            return Err(e);
        }
    }
    Ok(mechanism)
}

/// Takes every coverage entry out of `vm`'s table and its memory.
pub fn uninstall(vm: &VmCore) {
    let mut table = lock(&vm.breakpoints);
    table.image_writes.clear();
    for (gpa, byte) in table.clear_coverage() {
        let _ = vm.apply(&table, Write::Byte { gpa, byte });
    }
}

/// Writes `(gpa, byte)` pairs into a snapshot's memory image.
pub fn write_image(snap: &mut Snapshot, writes: &[(u64, u8)]) {
    for &(gpa, byte) in writes {
        if let Some(image) = snap
            .regions
            .iter_mut()
            .find(|i| i.guest_addr <= gpa && gpa < i.guest_addr + i.size)
        {
            image.set_byte(gpa - image.guest_addr, byte);
        }
    }
}

impl VcpuCore {
    /// A one-byte port write while [`PIO_PATCH`] entries exist: whether it was one of
    /// them. KVM completes a fast port write on the next entry by skipping the
    /// instruction if RIP did not move, and an emulated one has moved RIP already; so the
    /// write is completed first (RIP is then after the patch either way), and RIP goes
    /// back to the block, where the original instruction now runs. `None`: not ours (the
    /// write, completed or not, is dispatched as usual).
    pub(crate) fn pio_trap(&self, fd: &mut VcpuFd) -> Result<Option<Trap>> {
        let rip = self.read_regs(fd)?.rip;
        {
            let table = lock(&self.vm.breakpoints);
            if !(table.pio_at(rip) || table.pio_at(rip.wrapping_sub(1))) {
                return Ok(None);
            }
        }
        self.complete_io(fd);
        let addr = self.read_regs(fd)?.rip.wrapping_sub(1);
        let mut table = lock(&self.vm.breakpoints);
        if !table.pio_at(addr) {
            return Ok(None);
        }
        let hit = table.hit(addr, self.id);
        if hit == Hit::NotOurs {
            // The guest's own port write: the original instruction, run by this vCPU's
            // step over the patch, or by any vCPU where the original is `out dx, al`.
            return Ok(None);
        }
        self.update_regs(fd, |r| r.rip = addr)?;
        match hit {
            Hit::OneShot | Hit::Count => {
                if let Some(map) = table.coverage.as_mut() {
                    map.record(addr);
                }
                if hit == Hit::OneShot {
                    let write = table.disarm(addr);
                    self.vm.apply(&table, write)?;
                } else {
                    drop(table);
                    self.step_over(fd, addr)?;
                }
                Ok(Some(Trap::Continue))
            }
            Hit::Report(seen) => {
                drop(table);
                lock(&self.debug).resume_from = Some(addr);
                Ok(Some(self.breakpoint_trap(addr, seen)))
            }
            Hit::Pass => {
                drop(table);
                self.step_over(fd, addr)?;
                Ok(Some(Trap::Continue))
            }
            Hit::NotOurs => Ok(None),
            // Removed after this vCPU hit it: run the original.
            Hit::Stale => Ok(Some(Trap::Continue)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_is_afl_style() {
        assert!(CoverageMap::new(1000, false).is_err());
        assert!(CoverageMap::new(0, false).is_err());
        let mut once = CoverageMap::new(1 << 16, false).unwrap();
        once.record(0x401000);
        once.record(0x401000);
        let at = (block_hash(0x401000) & 0xffff) as usize;
        assert_eq!(once.map[at], 2);
        assert_eq!(once.take_new(), vec![0x401000]);
        assert_eq!(once.covered(), 1);
        once.begin();
        assert_eq!(once.map[at], 2, "once mode keeps the campaign's map");

        let mut armed = CoverageMap::new(1 << 16, true).unwrap();
        for _ in 0..300 {
            armed.record(0x10);
        }
        let first = (block_hash(0x10) & 0xffff) as usize;
        let self_edge = ((block_hash(0x10) ^ block_hash(0x10) >> 1) & 0xffff) as usize;
        assert_eq!(armed.map[first], 1);
        assert_eq!(
            armed.map[self_edge], 44,
            "299 hits: counts wrap, never to zero"
        );
        armed.begin();
        assert!(armed.map.iter().all(|b| *b == 0));
        assert_ne!(block_hash(0x1000), block_hash(0x1001));
    }

    #[test]
    fn the_patch_follows_the_host_and_the_privilege() {
        use debug::Mechanism as D;
        assert_eq!(Mechanism::choose(D::Intercept, 3, 0), Mechanism::Kvm);
        assert_eq!(
            Mechanism::choose(D::ExceptionStubs, 3, 3),
            Mechanism::PortIo
        );
        assert_eq!(
            Mechanism::choose(D::ExceptionStubs, 0, 0),
            Mechanism::PortIo
        );
        assert_eq!(
            Mechanism::choose(D::ExceptionStubs, 3, 0),
            Mechanism::ExceptionStubs
        );
        assert_eq!(Mechanism::PortIo.patch(), 0xee);
        let pick = |w| Mechanism::pick(D::ExceptionStubs, 3, 3, Some(w));
        assert_eq!(pick("exception-stubs").unwrap(), Mechanism::ExceptionStubs);
        assert_eq!(pick("port-io").unwrap(), Mechanism::PortIo);
        assert!(matches!(pick("kvm"), Err(Error::Unsupported(_))));
        assert!(matches!(pick("gdb"), Err(Error::Value(_))));
        assert!(matches!(
            Mechanism::pick(D::ExceptionStubs, 3, 0, Some("port-io")),
            Err(Error::Unsupported(_))
        ));
        assert_eq!(Mechanism::Kvm.patch(), 0xcc);
    }
}
