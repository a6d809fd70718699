//! The bus: the one trait every device implements, and the table that says which device
//! handles an exit, by port range or guest-physical address range (Firecracker's bus).
//!
//! A table is immutable once built; changes build a new one and swap it in, so a vCPU
//! thread only clones an `Arc` per exit and never holds a lock while a device runs.

use std::any::Any;
use std::sync::Arc;

use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::run::VcpuCtx;

/// Something a run returns that only the device that made it understands (the face's
/// Python exit object a handler stopped on).
pub type Token = Box<dyn Any + Send + Sync>;

/// What the run loop does after a device handled an access.
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// End the run with this exit (the access is completed first).
    Exit(Exit),
    /// End the run with the device's own token (the access is completed first; the other
    /// elements of a string I/O are still handled).
    Stop(Token),
}

/// A device on the bus. Accesses arrive one element at a time (string I/O is split) with
/// the element's bytes: an IN or MMIO read fills `data`, which the guest then reads.
/// Every method has a default: reads see zeros, writes and HLT are ignored.
pub trait Device: Send + Sync + 'static {
    /// What the device is, for error messages ("a console", "handler f").
    fn name(&self) -> String;

    fn io_in(&self, _ctx: &mut VcpuCtx<'_, '_>, _port: u16, data: &mut [u8]) -> Result<Action> {
        data.fill(0);
        Ok(Action::Continue)
    }

    fn io_out(&self, _ctx: &mut VcpuCtx<'_, '_>, _port: u16, _data: &[u8]) -> Result<Action> {
        Ok(Action::Continue)
    }

    fn mmio_read(&self, _ctx: &mut VcpuCtx<'_, '_>, _addr: u64, data: &mut [u8]) -> Result<Action> {
        data.fill(0);
        Ok(Action::Continue)
    }

    fn mmio_write(&self, _ctx: &mut VcpuCtx<'_, '_>, _addr: u64, _data: &[u8]) -> Result<Action> {
        Ok(Action::Continue)
    }

    /// The guest executed HLT (only for the device registered for HLT).
    fn hlt(&self, _ctx: &mut VcpuCtx<'_, '_>) -> Result<Action> {
        Ok(Action::Continue)
    }

    /// A breakpoint at guest-virtual `address` was reached (only for the device
    /// registered for breakpoints); `Continue` runs on from it.
    fn breakpoint(&self, _ctx: &mut VcpuCtx<'_, '_>, _address: u64) -> Result<Action> {
        Ok(Action::Continue)
    }

    /// Whether the device has state for snapshots (`save_state` returns some).
    fn has_state(&self) -> bool {
        false
    }

    /// The device's state, for a snapshot; `None` (the default): it has none.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Puts back a state `save_state` returned (a snapshot file's bytes: check them).
    fn restore_state(&self, _state: &[u8]) -> Result<()> {
        Ok(())
    }

    /// For the face: to find the device again by type (removal, garbage collection).
    fn as_any(&self) -> &dyn Any;
}

/// A device on a range of ports or addresses, `[start, end)`.
#[derive(Clone)]
pub struct Range<T> {
    pub start: T,
    pub end: T,
    pub device: Arc<dyn Device>,
}

/// Every device of one VM.
#[derive(Clone, Default)]
pub struct Bus {
    /// Sorted by start, never overlapping. Port ends are `u32` so 0xffff can be included.
    io: Vec<Range<u32>>,
    /// Sorted by start, never overlapping.
    mmio: Vec<Range<u64>>,
    hlt: Option<Arc<dyn Device>>,
    breakpoint: Option<Arc<dyn Device>>,
}

fn lookup<T: Copy + Ord>(ranges: &[Range<T>], at: T) -> Option<&Range<T>> {
    let i = ranges.partition_point(|r| r.start <= at);
    let r = ranges.get(i.checked_sub(1)?)?;
    (at < r.end).then_some(r)
}

fn insert<T: Copy + Ord>(ranges: &mut Vec<Range<T>>, range: Range<T>) {
    let at = ranges.partition_point(|r| r.start < range.start);
    ranges.insert(at, range);
}

impl Bus {
    /// The device on `port`.
    pub fn io(&self, port: u16) -> Option<&Arc<dyn Device>> {
        lookup(&self.io, u32::from(port)).map(|r| &r.device)
    }

    /// The device at guest physical address `addr`.
    pub fn mmio(&self, addr: u64) -> Option<&Arc<dyn Device>> {
        lookup(&self.mmio, addr).map(|r| &r.device)
    }

    /// The device that handles HLT.
    pub fn hlt(&self) -> Option<&Arc<dyn Device>> {
        self.hlt.as_ref()
    }

    /// The device that handles breakpoints.
    pub fn breakpoint(&self) -> Option<&Arc<dyn Device>> {
        self.breakpoint.as_ref()
    }

    /// The MMIO range overlapping `[start, end)`, if any.
    pub fn mmio_overlapping(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.mmio
            .iter()
            .find(|r| r.start < end && start < r.end)
            .map(|r| (r.start, r.end))
    }

    /// A copy with `device` on ports `[start, end)`.
    pub fn with_io(&self, start: u16, end: u32, device: Arc<dyn Device>) -> Result<Self> {
        let start = u32::from(start);
        if let Some(r) = self.io.iter().find(|r| r.start < end && start < r.end) {
            return Err(Error::Value(format!(
                "ports {start:#x}..{end:#x} overlap ports {:#x}..{:#x}, already handled by {}; \
                 remove that handler first",
                r.start,
                r.end,
                r.device.name()
            )));
        }
        let mut bus = self.clone();
        insert(&mut bus.io, Range { start, end, device });
        Ok(bus)
    }

    /// A copy with `device` on guest physical addresses `[start, end)`.
    pub fn with_mmio(&self, start: u64, end: u64, device: Arc<dyn Device>) -> Result<Self> {
        if let Some((s, e)) = self.mmio_overlapping(start, end) {
            return Err(Error::Memory(format!(
                "MMIO range {start:#x}..{end:#x} overlaps the MMIO range {s:#x}..{e:#x}; remove \
                 that handler first"
            )));
        }
        let mut bus = self.clone();
        insert(&mut bus.mmio, Range { start, end, device });
        Ok(bus)
    }

    /// A copy with `device` for HLT (or none).
    pub fn with_hlt(&self, device: Option<Arc<dyn Device>>) -> Self {
        let mut bus = self.clone();
        bus.hlt = device;
        bus
    }

    /// A copy with `device` for breakpoints (or none).
    pub fn with_breakpoint(&self, device: Option<Arc<dyn Device>>) -> Self {
        let mut bus = self.clone();
        bus.breakpoint = device;
        bus
    }

    /// Every device, once per registration.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<dyn Device>> {
        let io = self.io.iter().map(|r| &r.device);
        let mmio = self.mmio.iter().map(|r| &r.device);
        io.chain(mmio)
            .chain(self.hlt.iter())
            .chain(self.breakpoint.iter())
    }

    /// A copy without the registrations `matches` selects, and how many were removed.
    pub fn without(&self, matches: impl Fn(&Arc<dyn Device>) -> bool) -> (Self, usize) {
        let mut bus = self.clone();
        let before = bus.devices().count();
        bus.io.retain(|r| !matches(&r.device));
        bus.mmio.retain(|r| !matches(&r.device));
        if bus.hlt.as_ref().is_some_and(&matches) {
            bus.hlt = None;
        }
        if bus.breakpoint.as_ref().is_some_and(&matches) {
            bus.breakpoint = None;
        }
        let after = bus.devices().count();
        (bus, before - after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy;
    impl Device for Dummy {
        fn name(&self) -> String {
            "a dummy".into()
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    fn dev() -> Arc<dyn Device> {
        Arc::new(Dummy)
    }

    #[test]
    fn port_lookup_respects_range_ends() {
        let t = Bus::default()
            .with_io(0x10, 0x18, dev())
            .unwrap()
            .with_io(0xfff0, 0x10000, dev())
            .unwrap();
        assert!(t.io(0x0f).is_none());
        assert!(t.io(0x10).is_some());
        assert!(t.io(0x17).is_some());
        assert!(t.io(0x18).is_none());
        assert!(t.io(0xffff).is_some());
        let err = t.with_io(0x17, 0x19, dev()).err().unwrap().to_string();
        assert!(err.contains("a dummy"), "{err}");
        assert!(t.with_io(0x18, 0x19, dev()).is_ok());
    }

    #[test]
    fn mmio_lookup_and_removal() {
        let d = dev();
        let t = Bus::default()
            .with_mmio(0xa0000, 0xa1000, Arc::clone(&d))
            .unwrap()
            .with_hlt(Some(Arc::clone(&d)));
        assert!(t.mmio(0xa0fff).is_some());
        assert!(t.mmio(0xa1000).is_none());
        assert!(t.mmio(0x9ffff).is_none());
        assert!(t.with_mmio(0xa0800, 0xa2000, dev()).is_err());
        let (t, removed) = t.without(|x| Arc::ptr_eq(x, &d));
        assert_eq!(removed, 2);
        assert!(t.mmio(0xa0000).is_none() && t.hlt().is_none());
    }
}
