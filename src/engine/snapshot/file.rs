//! The snapshot file format, version 2. Little-endian throughout:
//!
//! ```text
//! header   magic "KVMPYSNP", format version (u32), kvmpy version (str), CPU vendor
//!          (12 bytes, CPUID leaf 0), the sizes of the KVM structs stored (u32 each)
//! vCPUs    count (u32); per vCPU: id (u64), MP state, regs, sregs, XSAVE, XCRs, debug
//!          registers, vCPU events, LAPIC (flag + struct), MSRs (count + kvm_msr_entry),
//!          CPUID (count + kvm_cpuid_entry2), queued interrupts (count + u32),
//!          TSC frequency in kHz (u32; 0: not known)
//! chips    irqchip flag (+ 3 kvm_irqchip), PIT flag (+ kvm_pit_state2)
//! clock    kvmclock flag (+ nanoseconds, u64)
//! devices  count (u32); per device: name (str), state (bytes)
//! memory   count (u32); per region: guest_addr (u64), size (u64), readonly (u8),
//!          stored page count (u64), then per page: index (u64) + 4096 bytes;
//!          all-zero pages are not stored
//! trailer  a 64-bit checksum of everything before it
//! ```
//! `str` and `bytes` are a u32 length and the bytes. Everything is checked when a file
//! is read, before any VM sees the snapshot. Version 1 (kvmpy before the clock was
//! saved) lacks the TSC frequency and the clock: such a file still loads, and a restore
//! of it leaves the VM's kvmclock as it is and checks no TSC frequency.

use std::io::Write;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::engine::error::{Error, Result};
use crate::engine::snapshot::cpu::VcpuState;
use crate::engine::snapshot::dirty::for_each_page;
use crate::engine::snapshot::image::RegionImage;
use crate::engine::snapshot::{next_id, Snapshot};

const MAGIC: &[u8; 8] = b"KVMPYSNP";
pub const FORMAT_VERSION: u32 = 2;
const PAGE: usize = 4096;
/// The most guest memory a file may describe (4 TiB): what is mapped and tracked for it
/// is allocated before the pages are read.
const MAX_MEMORY: u64 = 1 << 42;

/// The sizes of the KVM structs a file stores, in the order the header lists them: a file
/// written against another KVM ABI is refused.
fn struct_sizes() -> [u32; 13] {
    use std::mem::size_of;
    [
        size_of::<kvm_mp_state>(),
        size_of::<kvm_regs>(),
        size_of::<kvm_sregs>(),
        size_of::<kvm_xsave>(),
        size_of::<kvm_xcrs>(),
        size_of::<kvm_debugregs>(),
        size_of::<kvm_vcpu_events>(),
        size_of::<kvm_lapic_state>(),
        size_of::<kvm_msr_entry>(),
        size_of::<kvm_cpuid_entry2>(),
        size_of::<kvm_irqchip>(),
        size_of::<kvm_pit_state2>(),
        PAGE,
    ]
    .map(|s| s as u32)
}

/// The CPU vendor string of a CPUID table (leaf 0: EBX, EDX, ECX).
pub fn vendor(cpuid: &[kvm_cpuid_entry2]) -> [u8; 12] {
    let mut v = [0; 12];
    if let Some(e) = cpuid.iter().find(|e| e.function == 0) {
        v[..4].copy_from_slice(&e.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&e.edx.to_le_bytes());
        v[8..].copy_from_slice(&e.ecx.to_le_bytes());
    }
    v
}

/// A checksum of `data`, eight bytes at a time (FNV-1a's constants, on words).
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or_default());
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for b in chunks.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct Writer(Vec<u8>);

impl Writer {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u32(&mut self, v: u32) {
        self.raw(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
    fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.raw(v.as_bytes());
    }
    fn list<T: IntoBytes + Immutable>(&mut self, items: &[T]) {
        self.u32(items.len() as u32);
        for i in items {
            self.pod(i);
        }
    }
}

/// Writes `snap` to `path` (through a temporary file renamed into place); `cpu_vendor`
/// is the vendor of the CPU the snapshot was taken on.
pub fn save(snap: &Snapshot, path: &std::path::Path, cpu_vendor: [u8; 12]) -> Result<()> {
    let w = encode(snap, cpu_vendor, FORMAT_VERSION);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&w)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io(format!("cannot write {}", path.display()), e)
    })
}

/// The bytes of a file of format `version` (this one, or 1 for tests of old files).
fn encode(snap: &Snapshot, cpu_vendor: [u8; 12], version: u32) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.raw(MAGIC);
    w.u32(version);
    w.bytes(env!("CARGO_PKG_VERSION").as_bytes());
    w.raw(&cpu_vendor);
    for s in struct_sizes() {
        w.u32(s);
    }
    w.u32(snap.vcpus.len() as u32);
    for v in &snap.vcpus {
        w.u64(v.id);
        w.pod(&v.mp_state);
        w.pod(&v.regs);
        w.pod(&v.sregs);
        w.pod(&v.xsave);
        w.pod(&v.xcrs);
        w.pod(&v.debugregs);
        w.pod(&v.events);
        w.raw(&[u8::from(v.lapic.is_some())]);
        if let Some(l) = &v.lapic {
            w.pod(l);
        }
        w.list(&v.msrs);
        w.list(&v.cpuid);
        w.list(&v.interrupts);
        if version >= 2 {
            w.u32(v.tsc_khz.unwrap_or(0));
        }
    }
    w.raw(&[u8::from(snap.irqchip.is_some())]);
    for chip in snap.irqchip.iter().flatten() {
        w.pod(chip);
    }
    w.raw(&[u8::from(snap.pit.is_some())]);
    if let Some(pit) = &snap.pit {
        w.pod(pit);
    }
    if version >= 2 {
        w.raw(&[u8::from(snap.clock.is_some())]);
        if let Some(ns) = snap.clock {
            w.u64(ns);
        }
    }
    w.u32(snap.devices.len() as u32);
    for (name, state) in &snap.devices {
        w.bytes(name.as_bytes());
        w.bytes(state);
    }
    w.u32(snap.regions.len() as u32);
    for r in &snap.regions {
        w.u64(r.guest_addr);
        w.u64(r.size);
        w.raw(&[u8::from(r.readonly)]);
        let count: u32 = r.present().iter().map(|w| w.count_ones()).sum();
        w.u64(u64::from(count));
        for_each_page(r.present(), |page| {
            w.u64(page);
            w.raw(r.page(page));
        });
    }
    let sum = checksum(&w.0);
    w.u64(sum);
    w.0
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Value(format!("corrupt snapshot file: {what}"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len());
        let Some(end) = end else {
            return Err(Error::Value(format!(
                "truncated snapshot file: it ends inside {what} (at byte {} of {})",
                self.at,
                self.data.len()
            )));
        };
        let b = &self.data[self.at..end];
        self.at = end;
        Ok(b)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn flag(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(format_args!("{what} is {v}, not 0 or 1"))),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T> {
        let b = self.take(std::mem::size_of::<T>(), what)?;
        T::read_from_bytes(b).map_err(|_| bad(format_args!("{what} has the wrong size")))
    }
    fn list<T: FromBytes>(&mut self, what: &str, max: usize) -> Result<Vec<T>> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(bad(format_args!("{n} {what}, at most {max} expected")));
        }
        (0..n).map(|_| self.pod(what)).collect()
    }
}

/// Reads and checks a snapshot file; `host_vendor` is this host's CPU vendor.
pub fn load(path: &std::path::Path, host_vendor: [u8; 12]) -> Result<Snapshot> {
    let data =
        std::fs::read(path).map_err(|e| Error::Io(format!("cannot read {}", path.display()), e))?;
    parse(&data, host_vendor)
}

/// Parses a snapshot file's bytes; see the module's documentation.
pub fn parse(data: &[u8], host_vendor: [u8; 12]) -> Result<Snapshot> {
    let mut r = Reader { data, at: 0 };
    if r.take(8, "the header")? != MAGIC {
        return Err(Error::Value(
            "not a kvmpy snapshot file (its first bytes are not \"KVMPYSNP\")".into(),
        ));
    }
    let version = r.u32("the header")?;
    if version > FORMAT_VERSION {
        return Err(Error::Value(format!(
            "the snapshot file has format version {version}, newer than this kvmpy ({}) \
             reads ({FORMAT_VERSION}): upgrade kvmpy",
            env!("CARGO_PKG_VERSION")
        )));
    }
    if version == 0 {
        return Err(bad("format version 0"));
    }
    let body = data
        .len()
        .checked_sub(8)
        .filter(|n| *n >= r.at)
        .ok_or_else(|| Error::Value("truncated snapshot file: it ends inside the header".into()))?;
    let stored = u64::from_le_bytes(data[body..].try_into().unwrap_or_default());
    if checksum(&data[..body]) != stored {
        return Err(Error::Value(
            "corrupt or truncated snapshot file: its checksum does not match its contents".into(),
        ));
    }
    let mut r = Reader {
        data: &data[..body],
        at: r.at,
    };
    let _kvmpy_version = r.bytes("the kvmpy version")?;
    let file_vendor: [u8; 12] = r.take(12, "the CPU vendor")?.try_into().unwrap_or_default();
    for (i, size) in struct_sizes().iter().enumerate() {
        let stored = r.u32("the struct sizes")?;
        if stored != *size {
            return Err(Error::Value(format!(
                "the snapshot file was written for another KVM structure layout (struct {i} \
                 has {stored} bytes there, {size} here)"
            )));
        }
    }
    if file_vendor != host_vendor {
        return Err(Error::Value(format!(
            "the snapshot was taken on a {} CPU; this host's is {}: vCPU state does not \
             carry over between CPU vendors",
            String::from_utf8_lossy(&file_vendor),
            String::from_utf8_lossy(&host_vendor)
        )));
    }
    let vcpus = (0..r.u32("the vCPU count")?)
        .map(|_| read_vcpu(&mut r, version))
        .collect::<Result<Vec<_>>>()?;
    let irqchip = if r.flag("the irqchip flag")? {
        Some(
            (0..3)
                .map(|_| r.pod("the irqchip"))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    let pit = if r.flag("the PIT flag")? {
        Some(r.pod("the PIT")?)
    } else {
        None
    };
    let clock = if version >= 2 && r.flag("the clock flag")? {
        Some(r.u64("the clock")?)
    } else {
        None
    };
    let devices = (0..r.u32("the device count")?)
        .map(|_| {
            let name = String::from_utf8(r.bytes("a device name")?.to_vec())
                .map_err(|_| bad("a device name is not UTF-8"))?;
            Ok((name, r.bytes("a device state")?.to_vec()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total = 0u64;
    let regions = (0..r.u32("the region count")?)
        .map(|_| {
            let region = read_region(&mut r, MAX_MEMORY - total)?;
            total += region.size;
            Ok(region)
        })
        .collect::<Result<Vec<_>>>()?;
    if r.at != r.data.len() {
        return Err(bad("data after the last memory region"));
    }
    Ok(Snapshot {
        id: next_id(),
        regions,
        vcpus,
        irqchip,
        pit,
        devices,
        clock,
    })
}

fn read_vcpu(r: &mut Reader<'_>, version: u32) -> Result<VcpuState> {
    Ok(VcpuState {
        id: r.u64("a vCPU id")?,
        mp_state: r.pod("an MP state")?,
        regs: r.pod("registers")?,
        sregs: r.pod("special registers")?,
        xsave: r.pod("XSAVE state")?,
        xcrs: r.pod("XCRs")?,
        debugregs: r.pod("debug registers")?,
        events: r.pod("vCPU events")?,
        lapic: if r.flag("the LAPIC flag")? {
            Some(r.pod("a LAPIC")?)
        } else {
            None
        },
        msrs: r.list("MSRs", 4096)?,
        cpuid: r.list("CPUID entries", kvm_bindings::KVM_MAX_CPUID_ENTRIES)?,
        interrupts: r.list("queued interrupts", 1 << 16)?,
        tsc_khz: if version >= 2 {
            Some(r.u32("a TSC frequency")?).filter(|khz| *khz != 0)
        } else {
            None
        },
    })
}

fn read_region(r: &mut Reader<'_>, room: u64) -> Result<RegionImage> {
    let guest_addr = r.u64("a region's address")?;
    let size = r.u64("a region's size")?;
    let readonly = r.flag("a region's read-only flag")?;
    crate::engine::memory::check_layout(guest_addr, size)
        .map_err(|e| bad(format_args!("a memory region: {e}")))?;
    if size > room {
        return Err(Error::Value(format!(
            "the snapshot file describes more than {MAX_MEMORY:#x} bytes of guest memory, \
             more than kvmpy loads"
        )));
    }
    let count = r.u64("a region's page count")?;
    let pages = size / PAGE as u64;
    // Every stored page takes 8 + 4096 bytes: a count larger than what is left is corrupt
    // (and must not make us map the region first).
    let left = (r.data.len() - r.at) as u64;
    if count > pages || count.saturating_mul(8 + PAGE as u64) > left {
        return Err(bad(format_args!(
            "region {guest_addr:#x} claims {count} stored pages"
        )));
    }
    let mut image = RegionImage::empty(guest_addr, size, readonly)?;
    for _ in 0..count {
        let page = r.u64("a page index")?;
        if page >= pages {
            return Err(bad(format_args!(
                "page {page} is outside region {guest_addr:#x} of {pages} pages"
            )));
        }
        image
            .page_mut(page)
            .copy_from_slice(r.take(PAGE, "a page")?);
        image.set_present(page);
    }
    Ok(image)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
