//! The Python objects that present exits to handlers and to `run()`'s caller: one class
//! per kind of [`Exit`] with fields, all made by [`to_python`].

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

use crate::engine::{internal_error, Data, Exit, Reason};

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

/// The guest wrote to an exit port (`vm.add_exit_port`): `code` is the value written.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct GuestExit {
    /// The value the guest wrote.
    code: u64,
    /// The exit port.
    port: u16,
}

#[pymethods]
impl GuestExit {
    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "GuestExit(code={}, port={:#x}, vcpu_id={})",
            slf.code,
            slf.port,
            slf.as_super().vcpu_id()
        )
    }
}

/// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest (invalid guest state).
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct FailEntryExit {
    /// The hardware's reason code (a VMX exit reason or an SVM error code).
    hardware_entry_failure_reason: u64,
    /// The host CPU the entry failed on.
    cpu: u32,
}

/// `KVM_EXIT_INTERNAL_ERROR`: KVM could not handle something, for example an instruction
/// its emulator does not know. `str(exit)` says what happened and what to try.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct InternalErrorExit {
    /// `KVM_INTERNAL_ERROR_*` (1 = emulation failure, 2 = simultaneous exceptions, 3 = event
    /// delivery failed, 4 = unexpected exit reason).
    suberror: u32,
    /// Extra words KVM reported.
    data: Vec<u64>,
    /// `rip` when the exit happened (the instruction that failed, for an emulation failure).
    rip: u64,
    /// The code size at `rip`: 16, 32 or 64 (0 if the registers could not be read).
    bits: u8,
    /// Whether the vCPU was still in the state it was created in (no mode set up).
    reset_state: bool,
}

impl InternalErrorExit {
    fn place(&self) -> internal_error::Place {
        internal_error::Place {
            rip: self.rip,
            bits: self.bits,
            reset: self.reset_state,
        }
    }
}

#[pymethods]
impl InternalErrorExit {
    /// The suberror in words: `"emulation failure"`, `"simultaneous exceptions"`, ...
    #[getter]
    fn suberror_name(&self) -> String {
        internal_error::suberror_name(self.suberror)
    }

    /// The bytes at `rip` KVM reported for an emulation failure (up to 15; `b""` when it
    /// reported none, e.g. because there is no RAM at `rip`).
    #[getter]
    fn instruction_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(
            py,
            &internal_error::instruction_bytes(self.suberror, &self.data),
        )
    }

    /// The failing instruction disassembled, with its bytes in hex:
    /// `"f0 48 0f c7 0c 25 00 00 30 00 (lock cmpxchg16b [0x300000])"`; None without bytes.
    #[getter]
    fn instruction(&self) -> Option<String> {
        let bytes = internal_error::instruction_bytes(self.suberror, &self.data);
        internal_error::instruction_text(&bytes, self.place())
    }

    fn __str__(&self) -> String {
        internal_error::describe(self.suberror, &self.data, self.place())
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "InternalErrorExit(suberror={}: {}, vcpu_id={})",
            slf.suberror,
            internal_error::describe(slf.suberror, &slf.data, slf.place()),
            slf.as_super().vcpu_id()
        )
    }
}

/// `KVM_EXIT_SYSTEM_EVENT`: the guest asked for a shutdown, reset or crash report.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct SystemEventExit {
    /// `KVM_SYSTEM_EVENT_*` (1 = shutdown, 2 = reset, 3 = crash, ...).
    event_type: u32,
    /// Extra words KVM reported.
    data: Vec<u64>,
}

/// `KVM_EXIT_DEBUG`: a breakpoint or single step (with guest debugging enabled).
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct DebugExit {
    exception: u32,
    pc: u64,
    dr6: u64,
    dr7: u64,
}

/// A breakpoint set with `add_breakpoint` was reached: reason `"breakpoint"`. The vCPU
/// is stopped before the instruction at `address` (its RIP); running on executes it.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct BreakpointExit {
    /// The guest-virtual address of the breakpoint.
    address: u64,
}

#[pymethods]
impl BreakpointExit {
    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "BreakpointExit(address={:#x}, vcpu_id={})",
            slf.address,
            slf.as_super().vcpu_id()
        )
    }
}

/// One instruction was executed by `cpu.step()`: reason `"step"`.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct StepExit {
    /// The RIP after the instruction.
    rip: u64,
}

/// A CPU exception in the guest, reported by the IDT stubs that
/// `setup_long_mode(exceptions=True)` installs: reason `"exception"`.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct ExceptionExit {
    /// The exception vector (0 = #DE, 6 = #UD, 13 = #GP, 14 = #PF, ...).
    vector: u64,
    /// The error code the CPU pushed (0 for exceptions without one).
    error_code: u64,
    /// The address of the faulting instruction.
    rip: u64,
    /// CS at the fault (its low 2 bits are the privilege level).
    cs: u64,
    rflags: u64,
    rsp: u64,
    /// CR2: the faulting address of a page fault.
    cr2: u64,
}

#[pymethods]
impl ExceptionExit {
    /// The exception's mnemonic: `"#DE"`, `"#UD"`, `"#GP"`, `"#PF"`, ...
    #[getter]
    fn name(&self) -> String {
        crate::arch::x86_64::idt::name(self.vector)
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "ExceptionExit({} vector={} error_code={:#x} rip={:#x} cr2={:#x}, vcpu_id={})",
            slf.name(),
            slf.vector,
            slf.error_code,
            slf.rip,
            slf.cr2,
            slf.as_super().vcpu_id()
        )
    }
}

/// An exit kvmpy does not interpret; `kvm_exit_reason` is the raw `KVM_EXIT_*` number.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct UnknownExit {
    kvm_exit_reason: u32,
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
mod tests {
    use super::*;

    /// Exits that a test guest cannot provoke on every host (FAIL_ENTRY, SYSTEM_EVENT,
    /// DEBUG without guest debugging, unknown reasons) still become the right objects.
    #[test]
    fn every_exit_kind_becomes_its_python_class() {
        Python::initialize();
        Python::attach(|py| {
            type Case = (Exit, &'static str, Vec<(&'static str, u64)>);
            let cases: Vec<Case> = vec![
                (
                    Exit::FailEntry {
                        hardware_reason: 0x21,
                        cpu: 1,
                    },
                    "FailEntryExit",
                    vec![("hardware_entry_failure_reason", 0x21), ("cpu", 1)],
                ),
                (
                    Exit::SystemEvent {
                        kind: 2,
                        data: vec![9],
                    },
                    "SystemEventExit",
                    vec![("event_type", 2)],
                ),
                (
                    Exit::Debug {
                        exception: 1,
                        pc: 0x1000,
                        dr6: 0xff0,
                        dr7: 0x400,
                    },
                    "DebugExit",
                    vec![("exception", 1), ("pc", 0x1000), ("dr6", 0xff0)],
                ),
                (
                    Exit::Unknown { raw: 99 },
                    "UnknownExit",
                    vec![("kvm_exit_reason", 99)],
                ),
                (
                    Exit::InternalError {
                        suberror: 1,
                        data: vec![],
                        place: internal_error::Place {
                            rip: 0x1000,
                            bits: 64,
                            reset: false,
                        },
                    },
                    "InternalErrorExit",
                    vec![("suberror", 1), ("rip", 0x1000), ("bits", 64)],
                ),
                (
                    Exit::Guest {
                        port: 0xf4,
                        code: 3,
                    },
                    "GuestExit",
                    vec![("code", 3), ("port", 0xf4)],
                ),
                (
                    Exit::Breakpoint { address: 0x1234 },
                    "BreakpointExit",
                    vec![("address", 0x1234)],
                ),
                (Exit::Step { rip: 0x99 }, "StepExit", vec![("rip", 0x99)]),
                (
                    Exit::Watchpoint(
                        Box::new(crate::engine::watch::WatchHit {
                            watch: crate::engine::watch::Watch {
                                vaddr: 0x2008,
                                gpa: 0x3008,
                                len: 8,
                                kind: crate::engine::watch::WatchKind::Write,
                                owner: None,
                            },
                            access: 0x3009,
                            size: 1,
                            is_write: true,
                            old: 0,
                            new: 0x100,
                        }),
                        0x77,
                    ),
                    "WatchpointExit",
                    vec![
                        ("address", 0x2008),
                        ("access", 0x3009),
                        ("length", 8),
                        ("rip", 0x77),
                        ("new", 0x100),
                    ],
                ),
                (Exit::Shutdown, "ExitInfo", vec![]),
                (Exit::Hlt, "ExitInfo", vec![]),
                (Exit::Timeout, "ExitInfo", vec![]),
                (Exit::Stopped, "ExitInfo", vec![]),
                (
                    Exit::Io {
                        port: 0x10,
                        size: 1,
                        count: 1,
                        is_write: true,
                        data: Data::new(&[7]),
                    },
                    "IoExit",
                    vec![("port", 0x10), ("value", 7)],
                ),
                (
                    Exit::Mmio {
                        addr: 0xd000,
                        size: 4,
                        is_write: false,
                        data: Data::default(),
                    },
                    "MmioExit",
                    vec![("address", 0xd000), ("size", 4)],
                ),
                (
                    Exit::Exception {
                        vector: 14,
                        error_code: 2,
                        rip: 0x1000,
                        cs: 0x1b,
                        rflags: 2,
                        rsp: 0,
                        cr2: 8,
                    },
                    "ExceptionExit",
                    vec![("vector", 14), ("cr2", 8)],
                ),
            ];
            let mut seen = std::collections::BTreeSet::new();
            for (exit, class, fields) in cases {
                let obj = to_python(py, &exit, 5).unwrap();
                let obj = obj.bind(py);
                assert_eq!(obj.cast::<ExitInfo>().unwrap().get().reason, exit.reason());
                seen.insert(exit.reason());
                assert_eq!(obj.get_type().name().unwrap().to_string(), class);
                assert_eq!(obj.getattr("vcpu_id").unwrap().extract::<u64>().unwrap(), 5);
                for (field, value) in fields {
                    let got: u64 = obj.getattr(field).unwrap().extract().unwrap();
                    assert_eq!(got, value, "{class}.{field}");
                }
                assert!(!stop_requested(obj));
                obj.call_method0("stop").unwrap();
                assert!(stop_requested(obj));
            }
            // Every reason a run can end with has been turned into an object above.
            for r in Reason::ALL {
                assert!(seen.contains(&r), "{r:?}");
            }
        });
    }
}

/// Every exit reason's name, for checking `kvmpy.ExitReason` against the engine's list.
#[pyfunction]
#[pyo3(name = "_exit_reasons")]
pub fn exit_reasons() -> Vec<&'static str> {
    Reason::ALL.iter().map(|r| r.as_str()).collect()
}
