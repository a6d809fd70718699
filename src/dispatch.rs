//! The handler table: who handles an exit, looked up by port range or MMIO address range.
//!
//! The table is immutable once built; changes build a new table and swap it in, so the
//! vCPU thread only clones an `Arc` per exit and never holds a lock while a handler runs.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::devices::console::ConsoleDev;
use crate::devices::exception::ExceptionDev;
use crate::devices::exit_port::ExitPortDev;
use crate::devices::hostcall::HostCallDev;
use crate::devices::uart::UartDev;
use crate::error::{Error, Result};

/// Who handles an exit.
pub enum Handler {
    /// A Python callable, called with the exit object under the GIL.
    Python(Py<PyAny>),
    /// Rust devices: handled on the vCPU thread without the GIL.
    Console(Arc<ConsoleDev>),
    ExitPort(Arc<ExitPortDev>),
    Exception(Arc<ExceptionDev>),
    Uart(Arc<UartDev>),
    HostCall(Arc<HostCallDev>),
}

impl Handler {
    fn clone_ref(&self, py: Python<'_>) -> Self {
        match self {
            Handler::Python(f) => Handler::Python(f.clone_ref(py)),
            Handler::Console(d) => Handler::Console(Arc::clone(d)),
            Handler::ExitPort(d) => Handler::ExitPort(Arc::clone(d)),
            Handler::Exception(d) => Handler::Exception(Arc::clone(d)),
            Handler::Uart(d) => Handler::Uart(Arc::clone(d)),
            Handler::HostCall(d) => Handler::HostCall(Arc::clone(d)),
        }
    }

    /// Whether this entry was registered with `obj` (a callable or a device object).
    fn registered_with(&self, obj: &Bound<'_, PyAny>) -> bool {
        match self {
            Handler::Python(f) => f.bind(obj.py()).is(obj),
            Handler::Console(d) => obj
                .cast::<crate::devices::console::Console>()
                .is_ok_and(|c| Arc::ptr_eq(&c.get().dev, d)),
            Handler::ExitPort(d) => obj
                .cast::<crate::devices::exit_port::ExitPort>()
                .is_ok_and(|c| Arc::ptr_eq(&c.get().dev, d)),
            Handler::Uart(d) => obj
                .cast::<crate::devices::uart::Uart>()
                .is_ok_and(|c| Arc::ptr_eq(&c.get().dev, d)),
            Handler::Exception(_) | Handler::HostCall(_) => false,
        }
    }

    fn describe(&self, py: Python<'_>) -> String {
        match self {
            Handler::Python(f) => f
                .bind(py)
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "a Python handler".into()),
            Handler::Console(_) => "a console".into(),
            Handler::ExitPort(_) => "an exit port".into(),
            Handler::Exception(_) => "the exception report port".into(),
            Handler::Uart(_) => "a UART".into(),
            Handler::HostCall(_) => "the host-call port".into(),
        }
    }
}

pub struct PortRange {
    pub start: u16,
    /// Exclusive.
    pub end: u32,
    pub handler: Handler,
}

pub struct MmioRange {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub handler: Handler,
}

/// Every registered handler of one VM.
#[derive(Default)]
pub struct HandlerTable {
    /// Sorted by start, never overlapping.
    io: Vec<PortRange>,
    /// Sorted by start, never overlapping.
    mmio: Vec<MmioRange>,
    hlt: Option<Py<PyAny>>,
}

impl HandlerTable {
    /// The handler of `port`.
    pub fn io(&self, port: u16) -> Option<&Handler> {
        let i = self.io.partition_point(|r| r.start <= port);
        let r = self.io.get(i.checked_sub(1)?)?;
        (u32::from(port) < r.end).then_some(&r.handler)
    }

    /// The handler of guest physical address `addr`, with its range's start.
    pub fn mmio(&self, addr: u64) -> Option<(&Handler, u64)> {
        let i = self.mmio.partition_point(|r| r.start <= addr);
        let r = self.mmio.get(i.checked_sub(1)?)?;
        (addr < r.end).then_some((&r.handler, r.start))
    }

    pub fn hlt(&self) -> Option<&Py<PyAny>> {
        self.hlt.as_ref()
    }

    /// The MMIO range overlapping `[start, end)`, if any.
    pub fn mmio_overlapping(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.mmio
            .iter()
            .find(|r| r.start < end && start < r.end)
            .map(|r| (r.start, r.end))
    }

    fn copy(&self, py: Python<'_>) -> Self {
        HandlerTable {
            io: self
                .io
                .iter()
                .map(|r| PortRange {
                    start: r.start,
                    end: r.end,
                    handler: r.handler.clone_ref(py),
                })
                .collect(),
            mmio: self
                .mmio
                .iter()
                .map(|r| MmioRange {
                    start: r.start,
                    end: r.end,
                    handler: r.handler.clone_ref(py),
                })
                .collect(),
            hlt: self.hlt.as_ref().map(|h| h.clone_ref(py)),
        }
    }

    /// A copy with `handler` on ports `[start, end)`.
    pub fn with_io(&self, py: Python<'_>, start: u16, end: u32, handler: Handler) -> Result<Self> {
        if let Some(r) = self
            .io
            .iter()
            .find(|r| u32::from(r.start) < end && u32::from(start) < r.end)
        {
            return Err(Error::Value(format!(
                "ports {start:#x}..{end:#x} overlap ports {:#x}..{:#x}, already handled by {}; \
                 remove that handler first",
                r.start,
                r.end,
                r.handler.describe(py)
            )));
        }
        let mut t = self.copy(py);
        let at = t.io.partition_point(|r| r.start < start);
        t.io.insert(
            at,
            PortRange {
                start,
                end,
                handler,
            },
        );
        Ok(t)
    }

    /// A copy with `handler` on guest physical addresses `[start, end)`.
    pub fn with_mmio(
        &self,
        py: Python<'_>,
        start: u64,
        end: u64,
        handler: Handler,
    ) -> Result<Self> {
        if let Some((s, e)) = self.mmio_overlapping(start, end) {
            return Err(Error::Memory(format!(
                "MMIO range {start:#x}..{end:#x} overlaps the MMIO range {s:#x}..{e:#x}; remove \
                 that handler first"
            )));
        }
        let mut t = self.copy(py);
        let at = t.mmio.partition_point(|r| r.start < start);
        t.mmio.insert(
            at,
            MmioRange {
                start,
                end,
                handler,
            },
        );
        Ok(t)
    }

    /// A copy with `handler` for HLT (or none).
    pub fn with_hlt(&self, py: Python<'_>, handler: Option<Py<PyAny>>) -> Self {
        let mut t = self.copy(py);
        t.hlt = handler;
        t
    }

    /// Calls `f` on every Python handler (for the garbage collector).
    pub fn visit<E>(
        &self,
        mut f: impl FnMut(&Py<PyAny>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let io = self.io.iter().map(|r| &r.handler);
        let mmio = self.mmio.iter().map(|r| &r.handler);
        for h in io.chain(mmio) {
            match h {
                Handler::Python(p) => f(p)?,
                Handler::HostCall(dev) => {
                    if let Ok(functions) = dev.functions.try_lock() {
                        for h in functions.values() {
                            f(&h.f)?;
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(h) = &self.hlt {
            f(h)?;
        }
        Ok(())
    }

    /// A copy without any registration of `obj`, and how many were removed.
    pub fn without(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> (Self, usize) {
        let mut t = self.copy(py);
        let before = t.io.len() + t.mmio.len() + usize::from(t.hlt.is_some());
        t.io.retain(|r| !r.handler.registered_with(obj));
        t.mmio.retain(|r| !r.handler.registered_with(obj));
        if t.hlt.as_ref().is_some_and(|h| h.bind(py).is(obj)) {
            t.hlt = None;
        }
        let after = t.io.len() + t.mmio.len() + usize::from(t.hlt.is_some());
        (t, before - after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_port(port: u16) -> Handler {
        Handler::ExitPort(Arc::new(ExitPortDev {
            port,
            debug_exit: false,
        }))
    }

    #[test]
    fn port_lookup_respects_range_ends() {
        Python::initialize();
        Python::attach(|py| {
            let t = HandlerTable::default()
                .with_io(py, 0x10, 0x18, exit_port(0x10))
                .unwrap()
                .with_io(py, 0xfff0, 0x10000, exit_port(0xfff0))
                .unwrap();
            assert!(t.io(0x0f).is_none());
            assert!(t.io(0x10).is_some());
            assert!(t.io(0x17).is_some());
            assert!(t.io(0x18).is_none());
            assert!(t.io(0xffff).is_some());
            assert!(t.with_io(py, 0x17, 0x19, exit_port(0x17)).is_err());
            assert!(t.with_io(py, 0x18, 0x19, exit_port(0x18)).is_ok());
        });
    }

    #[test]
    fn mmio_lookup_returns_range_start() {
        Python::initialize();
        Python::attach(|py| {
            let t = HandlerTable::default()
                .with_mmio(py, 0xa0000, 0xa1000, exit_port(0))
                .unwrap();
            assert_eq!(t.mmio(0xa0fff).map(|(_, s)| s), Some(0xa0000));
            assert!(t.mmio(0xa1000).is_none());
            assert!(t.mmio(0x9ffff).is_none());
            assert!(t.with_mmio(py, 0xa0800, 0xa2000, exit_port(0)).is_err());
        });
    }
}
