//! How the `Vm` class registers handlers and devices on the bus, and parses their
//! arguments.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyRange, PyTuple};

use crate::devices::exit_port::ExitPortDev;
use crate::devices::hostcall::HostCallDev;
use crate::engine::runner::RunGroup;
use crate::engine::{Device, Error, VmCore};
use crate::py::devices::{Console, ExitPort, Uart};
use crate::py::gil;
use crate::py::handler::{PyHandler, PyHostFunction};
use crate::py::memory::MemoryRegion;
use crate::py::vcpu::Vcpu;
use crate::py::vm::Vm;

/// Parses a port argument: an int or a `range` with step 1. Returns `[start, end)`.
pub fn port_range(ports: &Bound<'_, PyAny>) -> PyResult<(u16, u32)> {
    if let Ok(r) = ports.cast::<PyRange>() {
        let (start, stop, step): (i64, i64, i64) = (
            r.getattr("start")?.extract()?,
            r.getattr("stop")?.extract()?,
            r.getattr("step")?.extract()?,
        );
        if step != 1 || start >= stop || start < 0 || stop > 0x10000 {
            return Err(PyValueError::new_err(format!(
                "port range must be a non-empty range(start, stop) with step 1 inside 0..0x10000, got {}",
                ports.repr()?
            )));
        }
        return Ok((start as u16, stop as u32));
    }
    match ports.extract::<i64>() {
        Ok(p) if (0..=0xffff).contains(&p) => Ok((p as u16, p as u32 + 1)),
        Ok(p) => Err(PyValueError::new_err(format!(
            "I/O port {p:#x} is outside 0..0xffff"
        ))),
        Err(_) => Err(PyTypeError::new_err(
            "ports must be an int or a range of ints",
        )),
    }
}

pub fn single_port(port: i64) -> PyResult<u16> {
    u16::try_from(port)
        .map_err(|_| PyValueError::new_err(format!("I/O port {port:#x} is outside 0..0xffff")))
}

pub fn check_callable(handler: &Bound<'_, PyAny>) -> PyResult<()> {
    if handler.is_callable() {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!(
            "handler must be callable, got {}",
            handler.get_type().name()?
        )))
    }
}

impl Vm {
    pub(crate) fn core(&self) -> &Arc<VmCore> {
        &self.inner.0
    }

    pub(crate) fn register_io(
        &self,
        (start, end): (u16, u32),
        device: Arc<dyn Device>,
    ) -> PyResult<()> {
        Ok(self
            .inner
            .update_bus(|bus| Ok((bus.with_io(start, end, device)?, ())))?)
    }

    pub(crate) fn register_mmio(
        &self,
        address: u64,
        size: u64,
        device: Arc<dyn Device>,
    ) -> PyResult<()> {
        self.inner.check_open()?;
        if size == 0 {
            return Err(Error::Memory("MMIO range size must not be zero".into()).into());
        }
        let end = address.checked_add(size).ok_or_else(|| {
            Error::Memory(format!("MMIO range {address:#x} + {size:#x} overflows"))
        })?;
        if let Some((s, e)) = self
            .inner
            .with_memory(|m| m.overlapping(address, end).map(|r| (r.guest_addr, r.end())))
        {
            return Err(Error::Memory(format!(
                "MMIO range {address:#x}..{end:#x} overlaps memory region {s:#x}..{e:#x}: accesses \
                 there go to RAM and never exit"
            ))
            .into());
        }
        Ok(self
            .inner
            .update_bus(|bus| Ok((bus.with_mmio(address, end, device)?, ())))?)
    }

    pub(crate) fn register_hlt(&self, f: &Bound<'_, PyAny>) -> PyResult<()> {
        let device: Arc<dyn Device> = Arc::new(PyHandler::new(f.clone().unbind()));
        Ok(self
            .inner
            .update_bus(|bus| Ok((bus.with_hlt(Some(device)), ())))?)
    }

    pub(crate) fn register_breakpoint(&self, f: &Bound<'_, PyAny>) -> PyResult<()> {
        let device: Arc<dyn Device> = Arc::new(PyHandler::new(f.clone().unbind()));
        Ok(self
            .inner
            .update_bus(|bus| Ok((bus.with_breakpoint(Some(device)), ())))?)
    }

    pub(crate) fn exit_port(&self, port: i64, debug_exit: bool) -> PyResult<ExitPort> {
        let port = single_port(port)?;
        let dev = Arc::new(ExitPortDev { port, debug_exit });
        self.register_io((port, u32::from(port) + 1), dev.clone())?;
        Ok(ExitPort { dev })
    }

    pub(crate) fn register_host_function(
        &self,
        number: u32,
        f: &Bound<'_, PyAny>,
        port: u16,
    ) -> PyResult<()> {
        check_callable(f)?;
        let nargs = arg_count(f)?;
        let function = Arc::new(PyHostFunction {
            f: f.clone().unbind(),
            number,
            nargs,
        });
        Ok(self.inner.update_bus(|bus| {
            let existing = bus
                .io(port)
                .and_then(|d| d.as_any().downcast_ref::<HostCallDev>());
            if let Some(dev) = existing {
                dev.register(number, function);
                return Ok((bus.clone(), ()));
            }
            let dev = Arc::new(HostCallDev::new(port));
            dev.register(number, function);
            Ok((bus.with_io(port, u32::from(port) + 1, dev)?, ()))
        })?)
    }

    /// Returns a decorator that registers the function it decorates with `register`.
    pub(crate) fn decorator<'py>(
        py: Python<'py>,
        register: impl Fn(&Bound<'_, PyAny>) -> PyResult<()> + Send + Sync + 'static,
    ) -> PyResult<Bound<'py, PyAny>> {
        let f =
            PyCFunction::new_closure(py, None, None, move |args: &Bound<'_, PyTuple>, _kwargs| {
                let func = args.get_item(0)?;
                check_callable(&func)?;
                register(&func)?;
                Ok::<_, PyErr>(func.unbind())
            })?;
        Ok(f.into_any())
    }

    /// `register(vm, handler)` now, or a decorator that does it.
    pub(crate) fn handler_or_decorator<'py>(
        slf: &Bound<'py, Self>,
        handler: Option<&Bound<'py, PyAny>>,
        register: impl Fn(&Vm, &Bound<'_, PyAny>) -> PyResult<()> + Send + Sync + 'static,
    ) -> PyResult<Bound<'py, PyAny>> {
        match handler {
            Some(h) => {
                check_callable(h)?;
                register(slf.get(), h)?;
                Ok(h.clone())
            }
            None => {
                let vm = slf.clone().unbind();
                Self::decorator(slf.py(), move |f| register(vm.get(), f))
            }
        }
    }

    pub(crate) fn wrap_vcpu(slf: &Bound<'_, Self>, inner: Arc<crate::engine::VcpuCore>) -> Vcpu {
        Vcpu {
            inner,
            owner: slf.clone().unbind(),
        }
    }

    pub(crate) fn wrap_region(
        slf: &Bound<'_, Self>,
        region: Arc<crate::engine::memory::Region>,
    ) -> MemoryRegion {
        MemoryRegion {
            region,
            vm: Arc::clone(slf.get().core()),
            owner: slf.clone().unbind(),
        }
    }
}

impl Vm {
    /// The body of `Vm.remove_handler()`.
    pub(crate) fn remove_registrations(&self, handler: &Bound<'_, PyAny>) -> PyResult<usize> {
        let py = handler.py();
        let target: Option<*const ()> = if let Ok(c) = handler.cast::<Console>() {
            Some(Arc::as_ptr(&c.get().dev) as *const ())
        } else if let Ok(e) = handler.cast::<ExitPort>() {
            Some(Arc::as_ptr(&e.get().dev) as *const ())
        } else if let Ok(u) = handler.cast::<Uart>() {
            Some(Arc::as_ptr(&u.get().dev) as *const ())
        } else {
            None
        };
        let matches = |d: &Arc<dyn Device>| match target {
            Some(p) => Arc::as_ptr(d) as *const () == p,
            None => d
                .as_any()
                .downcast_ref::<PyHandler>()
                .is_some_and(|h| h.f.bind(py).is(handler)),
        };
        let removed = self.inner.update_bus(|bus| {
            let (bus, removed) = bus.without(matches);
            if removed == 0 {
                return Err(Error::Value(format!(
                    "{} is not registered with this VM",
                    handler.repr().map(|r| r.to_string()).unwrap_or_default()
                )));
            }
            Ok((bus, removed))
        })?;
        Ok(removed)
    }

    /// Joins a finished group's threads (with the GIL released: a thread takes it as it
    /// ends), forgets the group, and returns its first error.
    pub(crate) fn finish_group(&self, py: Python<'_>, group: &Arc<RunGroup>) -> Option<Error> {
        self.inner.forget_group(group);
        gil::released(py, || group.finish())
    }
}

/// How many of the six argument registers `f` takes: its positional parameters, or all six
/// if it takes `*args`.
fn arg_count(f: &Bound<'_, PyAny>) -> PyResult<usize> {
    use crate::devices::hostcall::ARG_REGS;
    let py = f.py();
    let inspect = py.import("inspect")?;
    let params = inspect
        .call_method1("signature", (f,))?
        .getattr("parameters")?
        .call_method0("values")?;
    let kind = inspect.getattr("Parameter")?;
    let positional = [
        kind.getattr("POSITIONAL_ONLY")?,
        kind.getattr("POSITIONAL_OR_KEYWORD")?,
    ];
    let var_positional = kind.getattr("VAR_POSITIONAL")?;
    let mut n = 0;
    for p in params.try_iter()? {
        let k = p?.getattr("kind")?;
        if k.eq(&var_positional)? {
            return Ok(ARG_REGS.len());
        }
        if positional.iter().any(|x| k.eq(x).unwrap_or(false)) {
            n += 1;
        }
    }
    if n > ARG_REGS.len() {
        return Err(PyValueError::new_err(format!(
            "a host function takes at most {} arguments (RDI, RSI, RDX, R10, R8, R9), this one takes {n}",
            ARG_REGS.len()
        )));
    }
    Ok(n)
}
