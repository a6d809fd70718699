//! The Python objects that present exits to handlers and to `run()`'s caller: one class
//! per kind of [`Exit`] with fields, all made by [`to_python`].

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

use crate::engine::{Data, Exit, Reason};

pub use crate::py::exit_kinds::*;

static EXIT_REASON: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The `kvmpy.ExitReason` member for `reason`.
pub fn reason_object(py: Python<'_>, reason: Reason) -> PyResult<Bound<'_, PyAny>> {
    let cls = EXIT_REASON.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("kvmpy._exits")?.getattr("ExitReason")?.unbind())
    })?;
    cls.bind(py).call1((reason.as_str(),))
}

/// What `run()` returns and what a handler receives: why the vCPU left the guest.
///
/// `reason` is a `kvmpy.ExitReason`, a str enum that compares equal to `"io"`, `"mmio"`,
/// `"hlt"`, ... Kinds with more to say are subclasses (`IoExit`, `MmioExit`, ...).
#[pyclass(module = "kvmpy._native", subclass, frozen)]
pub struct ExitInfo {
    pub reason: Reason,
    /// Atomic (as are the fields of `IoExit` and `MmioExit`) so that a handler's exit
    /// object nobody kept can be refilled for the next exit instead of made anew.
    vcpu_id: AtomicU64,
    pub stop: AtomicBool,
}

#[pymethods]
impl ExitInfo {
    /// Why the vCPU exited.
    #[getter]
    fn reason<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        reason_object(py, self.reason)
    }

    /// The id of the vCPU that exited.
    #[getter]
    pub fn vcpu_id(&self) -> u64 {
        self.vcpu_id.load(Ordering::Relaxed)
    }

    /// From a handler: stop the run after this exit; `run()` then returns this exit.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether `stop()` was called on this exit.
    #[getter]
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn __repr__(&self) -> String {
        format!(
            "Exit(reason={:?}, vcpu_id={})",
            self.reason.as_str(),
            self.vcpu_id()
        )
    }
}

impl ExitInfo {
    fn base(reason: Reason, vcpu_id: u64) -> Self {
        ExitInfo {
            reason,
            vcpu_id: AtomicU64::new(vcpu_id),
            stop: AtomicBool::new(false),
        }
    }

    /// Makes the object new again for another exit of `vcpu_id`.
    fn reset(&self, vcpu_id: u64) {
        self.vcpu_id.store(vcpu_id, Ordering::Relaxed);
        // Relaxed is enough: the object is only touched with the GIL held, and taking
        // the GIL orders this before any handler's `stop()`.
        self.stop.store(false, Ordering::Relaxed);
    }
}

/// The bytes of an access held in `value`: `size` of them for a write, none for a read.
fn written(value: &AtomicU64, size: u8, is_write: bool) -> Data {
    let len = if is_write { size as usize } else { 0 };
    Data::new(&value.load(Ordering::Relaxed).to_le_bytes()[..len])
}

/// A port I/O exit (`in`/`out`).
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen)]
pub struct IoExit {
    /// port | size << 16 | is_write << 24 | count << 32
    head: AtomicU64,
    /// The bytes written (OUT), little endian; their length is `size` for an OUT, 0 for IN.
    value: AtomicU64,
}

impl IoExit {
    fn new(port: u16, size: u8, count: u32, is_write: bool, data: Data) -> Self {
        let io = IoExit {
            head: AtomicU64::new(0),
            value: AtomicU64::new(0),
        };
        io.set(port, size, count, is_write, data);
        io
    }

    fn set(&self, port: u16, size: u8, count: u32, is_write: bool, data: Data) {
        let head = u64::from(port)
            | u64::from(size) << 16
            | u64::from(is_write) << 24
            | u64::from(count) << 32;
        self.head.store(head, Ordering::Relaxed);
        self.value.store(data.value(), Ordering::Relaxed);
    }

    fn head(&self) -> u64 {
        self.head.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> Data {
        written(&self.value, self.size(), self.is_write())
    }
}

#[pymethods]
impl IoExit {
    /// The I/O port.
    #[getter]
    fn port(&self) -> u16 {
        self.head() as u16
    }

    /// Access size in bytes: 1, 2 or 4.
    #[getter]
    fn size(&self) -> u8 {
        (self.head() >> 16) as u8
    }

    /// Number of elements of string I/O (`rep outsb`); handlers see one element at a time.
    #[getter]
    fn count(&self) -> u32 {
        (self.head() >> 32) as u32
    }

    /// True for OUT, False for IN.
    #[getter]
    fn is_write(&self) -> bool {
        (self.head() >> 24) & 1 != 0
    }

    /// The bytes the guest wrote (OUT), or `b""` for IN.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.bytes().as_slice())
    }

    /// The bytes the guest wrote as a little-endian integer (0 for IN).
    #[getter]
    fn value(&self) -> u64 {
        self.bytes().value()
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        let vcpu_id = slf.as_super().vcpu_id();
        if slf.is_write() {
            format!(
                "IoExit(OUT port={:#x} size={} value={:#x}, vcpu_id={vcpu_id})",
                slf.port(),
                slf.size(),
                slf.value(),
            )
        } else {
            format!(
                "IoExit(IN port={:#x} size={}, vcpu_id={vcpu_id})",
                slf.port(),
                slf.size()
            )
        }
    }
}

/// An MMIO exit: an access to guest physical memory with no RAM behind it.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen)]
pub struct MmioExit {
    address: AtomicU64,
    /// size | is_write << 8
    meta: AtomicU16,
    /// The bytes written, little endian; their length is `size` for a write, 0 for a read.
    value: AtomicU64,
}

impl MmioExit {
    fn new(addr: u64, size: u8, is_write: bool, data: Data) -> Self {
        let mmio = MmioExit {
            address: AtomicU64::new(0),
            meta: AtomicU16::new(0),
            value: AtomicU64::new(0),
        };
        mmio.set(addr, size, is_write, data);
        mmio
    }

    fn set(&self, addr: u64, size: u8, is_write: bool, data: Data) {
        self.address.store(addr, Ordering::Relaxed);
        self.meta.store(
            u16::from(size) | u16::from(is_write) << 8,
            Ordering::Relaxed,
        );
        self.value.store(data.value(), Ordering::Relaxed);
    }

    fn bytes(&self) -> Data {
        written(&self.value, self.size(), self.is_write())
    }
}

#[pymethods]
impl MmioExit {
    /// Guest physical address of the access.
    #[getter]
    fn address(&self) -> u64 {
        self.address.load(Ordering::Relaxed)
    }

    /// Access size in bytes (1 to 8).
    #[getter]
    fn size(&self) -> u8 {
        self.meta.load(Ordering::Relaxed) as u8
    }

    /// True for a write, False for a read.
    #[getter]
    fn is_write(&self) -> bool {
        self.meta.load(Ordering::Relaxed) >> 8 != 0
    }

    /// The bytes the guest wrote, or `b""` for a read.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.bytes().as_slice())
    }

    /// The bytes the guest wrote as a little-endian integer (0 for a read).
    #[getter]
    fn value(&self) -> u64 {
        self.bytes().value()
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        let dir = if slf.is_write() { "write" } else { "read" };
        format!(
            "MmioExit({dir} address={:#x} size={}{}, vcpu_id={})",
            slf.address(),
            slf.size(),
            if slf.is_write() {
                format!(" value={:#x}", slf.value())
            } else {
                String::new()
            },
            slf.as_super().vcpu_id()
        )
    }
}

/// Builds the Python object for `exit`.
pub fn to_python(py: Python<'_>, exit: &Exit, vcpu_id: u64) -> PyResult<Py<PyAny>> {
    let base = ExitInfo::base(exit.reason(), vcpu_id);
    let init = pyo3::PyClassInitializer::from(base);
    let obj: Py<PyAny> = match exit {
        Exit::Io {
            port,
            size,
            count,
            is_write,
            data,
        } => Py::new(
            py,
            init.add_subclass(IoExit::new(*port, *size, *count, *is_write, *data)),
        )?
        .into_any(),
        Exit::Mmio {
            addr,
            size,
            is_write,
            data,
        } => Py::new(
            py,
            init.add_subclass(MmioExit::new(*addr, *size, *is_write, *data)),
        )?
        .into_any(),
        Exit::Guest { port, code } => Py::new(
            py,
            init.add_subclass(GuestExit {
                code: *code,
                port: *port,
            }),
        )?
        .into_any(),
        Exit::FailEntry {
            hardware_reason,
            cpu,
        } => Py::new(
            py,
            init.add_subclass(FailEntryExit {
                hardware_entry_failure_reason: *hardware_reason,
                cpu: *cpu,
            }),
        )?
        .into_any(),
        Exit::InternalError {
            suberror,
            data,
            place,
        } => Py::new(
            py,
            init.add_subclass(InternalErrorExit {
                suberror: *suberror,
                data: data.clone(),
                rip: place.rip,
                bits: place.bits,
                reset_state: place.reset,
            }),
        )?
        .into_any(),
        Exit::SystemEvent { kind, data } => Py::new(
            py,
            init.add_subclass(SystemEventExit {
                event_type: *kind,
                data: data.clone(),
            }),
        )?
        .into_any(),
        Exit::Debug {
            exception,
            pc,
            dr6,
            dr7,
        } => Py::new(
            py,
            init.add_subclass(DebugExit {
                exception: *exception,
                pc: *pc,
                dr6: *dr6,
                dr7: *dr7,
            }),
        )?
        .into_any(),
        Exit::Exception {
            vector,
            error_code,
            rip,
            cs,
            rflags,
            rsp,
            cr2,
        } => Py::new(
            py,
            init.add_subclass(ExceptionExit {
                vector: *vector,
                error_code: *error_code,
                rip: *rip,
                cs: *cs,
                rflags: *rflags,
                rsp: *rsp,
                cr2: *cr2,
            }),
        )?
        .into_any(),
        Exit::Breakpoint { address } => {
            Py::new(py, init.add_subclass(BreakpointExit { address: *address }))?.into_any()
        }
        Exit::Step { rip } => Py::new(py, init.add_subclass(StepExit { rip: *rip }))?.into_any(),
        Exit::Watchpoint(hit, rip) => crate::py::watch::to_python(py, init, hit, *rip)?,
        Exit::IrqWindowOpen => Py::new(
            py,
            init.add_subclass(UnknownExit {
                kvm_exit_reason: kvm_bindings::KVM_EXIT_IRQ_WINDOW_OPEN,
            }),
        )?
        .into_any(),
        Exit::Unknown { raw } => Py::new(
            py,
            init.add_subclass(UnknownExit {
                kvm_exit_reason: *raw,
            }),
        )?
        .into_any(),
        Exit::Hlt | Exit::Shutdown | Exit::Timeout | Exit::Stopped => Py::new(py, init)?.into_any(),
    };
    Ok(obj)
}

/// A new `IoExit` for a one-element OUT of `data` to `port`.
pub fn new_out(py: Python<'_>, port: u16, data: Data, vcpu_id: u64) -> PyResult<Py<IoExit>> {
    let base = ExitInfo::base(Reason::Io, vcpu_id);
    Py::new(
        py,
        pyo3::PyClassInitializer::from(base).add_subclass(IoExit::new(
            port,
            data.as_slice().len() as u8,
            1,
            true,
            data,
        )),
    )
}

impl IoExit {
    /// Makes this object, which only the caller holds, present a one-element OUT of
    /// `data` to `port` by `vcpu_id`.
    pub fn refill_out(slf: &Bound<'_, IoExit>, port: u16, data: Data, vcpu_id: u64) {
        slf.as_super().get().reset(vcpu_id);
        slf.get()
            .set(port, data.as_slice().len() as u8, 1, true, data);
    }

    /// Whether a handler called `stop()` on this exit.
    pub fn stop_requested(slf: &Bound<'_, IoExit>) -> bool {
        slf.as_super().get().stop.load(Ordering::SeqCst)
    }
}

/// Makes `obj`, an exit object only the caller holds, present `exit` instead; false if
/// it is not of `exit`'s class (only port I/O and MMIO objects are refilled).
pub fn refill(obj: &Bound<'_, PyAny>, exit: &Exit, vcpu_id: u64) -> bool {
    match exit {
        Exit::Io {
            port,
            size,
            count,
            is_write,
            data,
        } => {
            let Ok(io) = obj.cast_exact::<IoExit>() else {
                return false;
            };
            io.as_super().get().reset(vcpu_id);
            io.get().set(*port, *size, *count, *is_write, *data);
            true
        }
        Exit::Mmio {
            addr,
            size,
            is_write,
            data,
        } => {
            let Ok(mmio) = obj.cast_exact::<MmioExit>() else {
                return false;
            };
            mmio.as_super().get().reset(vcpu_id);
            mmio.get().set(*addr, *size, *is_write, *data);
            true
        }
        _ => false,
    }
}

/// Whether a handler called `stop()` on the exit object `obj`.
pub fn stop_requested(obj: &Bound<'_, PyAny>) -> bool {
    obj.cast::<ExitInfo>()
        .map(|e| e.get().stopped())
        .unwrap_or(false)
}

#[cfg(test)]
#[path = "exit_tests.rs"]
mod tests;

/// Every exit reason's name, for checking `kvmpy.ExitReason` against the engine's list.
#[pyfunction]
#[pyo3(name = "_exit_reasons")]
pub fn exit_reasons() -> Vec<&'static str> {
    Reason::ALL.iter().map(|r| r.as_str()).collect()
}
