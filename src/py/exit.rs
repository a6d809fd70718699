//! The Python objects that present exits to handlers and to `run()`'s caller: one class
//! per kind of [`Exit`] with fields, all made by [`to_python`].

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

use crate::engine::{Data, Exit, Reason};

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
    pub vcpu_id: u64,
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
    fn vcpu_id(&self) -> u64 {
        self.vcpu_id
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
            self.vcpu_id
        )
    }
}

impl ExitInfo {
    fn base(reason: Reason, vcpu_id: u64) -> Self {
        ExitInfo {
            reason,
            vcpu_id,
            stop: AtomicBool::new(false),
        }
    }
}

/// A port I/O exit (`in`/`out`).
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen)]
pub struct IoExit {
    /// The I/O port.
    #[pyo3(get)]
    port: u16,
    /// Access size in bytes: 1, 2 or 4.
    #[pyo3(get)]
    size: u8,
    /// Number of elements of string I/O (`rep outsb`); handlers see one element at a time.
    #[pyo3(get)]
    count: u32,
    /// True for OUT, False for IN.
    #[pyo3(get)]
    is_write: bool,
    data: Data,
}

#[pymethods]
impl IoExit {
    /// The bytes the guest wrote (OUT), or `b""` for IN.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.data.as_slice())
    }

    /// The bytes the guest wrote as a little-endian integer (0 for IN).
    #[getter]
    fn value(&self) -> u64 {
        self.data.value()
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        let base = slf.as_super();
        if slf.is_write {
            format!(
                "IoExit(OUT port={:#x} size={} value={:#x}, vcpu_id={})",
                slf.port,
                slf.size,
                slf.data.value(),
                base.vcpu_id
            )
        } else {
            format!(
                "IoExit(IN port={:#x} size={}, vcpu_id={})",
                slf.port, slf.size, base.vcpu_id
            )
        }
    }
}

/// An MMIO exit: an access to guest physical memory with no RAM behind it.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen)]
pub struct MmioExit {
    /// Guest physical address of the access.
    #[pyo3(get)]
    address: u64,
    /// Access size in bytes (1 to 8).
    #[pyo3(get)]
    size: u8,
    /// True for a write, False for a read.
    #[pyo3(get)]
    is_write: bool,
    data: Data,
}

#[pymethods]
impl MmioExit {
    /// The bytes the guest wrote, or `b""` for a read.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.data.as_slice())
    }

    /// The bytes the guest wrote as a little-endian integer (0 for a read).
    #[getter]
    fn value(&self) -> u64 {
        self.data.value()
    }

    fn __repr__(slf: PyRef<'_, Self>) -> String {
        let base = slf.as_super();
        let dir = if slf.is_write { "write" } else { "read" };
        format!(
            "MmioExit({dir} address={:#x} size={}{}, vcpu_id={})",
            slf.address,
            slf.size,
            if slf.is_write {
                format!(" value={:#x}", slf.data.value())
            } else {
                String::new()
            },
            base.vcpu_id
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
            slf.as_super().vcpu_id
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
/// its emulator does not know.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct InternalErrorExit {
    /// `KVM_INTERNAL_ERROR_*` (1 = emulation failure, 2 = simultaneous exception, ...).
    suberror: u32,
    /// Extra words KVM reported.
    data: Vec<u64>,
}

#[pymethods]
impl InternalErrorExit {
    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "InternalErrorExit(suberror={}, data={:x?}, vcpu_id={})",
            slf.suberror,
            slf.data,
            slf.as_super().vcpu_id
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
            slf.as_super().vcpu_id
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
            init.add_subclass(IoExit {
                port: *port,
                size: *size,
                count: *count,
                is_write: *is_write,
                data: *data,
            }),
        )?
        .into_any(),
        Exit::Mmio {
            addr,
            size,
            is_write,
            data,
        } => Py::new(
            py,
            init.add_subclass(MmioExit {
                address: *addr,
                size: *size,
                is_write: *is_write,
                data: *data,
            }),
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
        Exit::InternalError { suberror, data } => Py::new(
            py,
            init.add_subclass(InternalErrorExit {
                suberror: *suberror,
                data: data.clone(),
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
                    },
                    "InternalErrorExit",
                    vec![("suberror", 1)],
                ),
                (
                    Exit::Guest {
                        port: 0xf4,
                        code: 3,
                    },
                    "GuestExit",
                    vec![("code", 3), ("port", 0xf4)],
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
