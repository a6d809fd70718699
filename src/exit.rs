//! The ONE place where a `KVM_RUN` result becomes an owned [`Exit`], and the Python
//! objects that present exits to handlers and to `run()`'s caller.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{kvm_run, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::{VcpuExit, VcpuFd};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;
use vmm_sys_util::errno;

/// Data of one port or MMIO access, stored inline: no allocation per exit.
#[derive(Clone, Copy, Default)]
pub struct Data {
    buf: [u8; 8],
    len: u8,
}

impl Data {
    pub fn new(bytes: &[u8]) -> Self {
        let mut d = Data {
            buf: [0; 8],
            len: bytes.len().min(8) as u8,
        };
        d.buf[..d.len as usize].copy_from_slice(&bytes[..d.len as usize]);
        d
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// The bytes as a little-endian unsigned integer.
    pub fn value(&self) -> u64 {
        u64::from_le_bytes(self.buf)
    }
}

/// Why `run()` returned or a handler was called; compares equal to its str value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Io,
    Mmio,
    Hlt,
    Shutdown,
    Exit,
    Timeout,
    Stopped,
    FailEntry,
    InternalError,
    SystemEvent,
    Debug,
    Exception,
    Unknown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Io => "io",
            Reason::Mmio => "mmio",
            Reason::Hlt => "hlt",
            Reason::Shutdown => "shutdown",
            Reason::Exit => "exit",
            Reason::Timeout => "timeout",
            Reason::Stopped => "stopped",
            Reason::FailEntry => "fail_entry",
            Reason::InternalError => "internal_error",
            Reason::SystemEvent => "system_event",
            Reason::Debug => "debug",
            Reason::Exception => "exception",
            Reason::Unknown => "unknown",
        }
    }
}

/// An exit of `KVM_RUN`, owned (it no longer borrows the `kvm_run` area).
///
/// String port I/O (`rep outsb`/`rep insb`) is split into one `Io` per element before it
/// gets here, so `data` always holds a single access of at most 8 bytes.
#[derive(Clone)]
pub enum Exit {
    /// Port I/O; for an IN, `data` is empty until a handler answers. `count` is the
    /// element count of string I/O (`rep insb`/`outsb`), 1 otherwise.
    Io {
        port: u16,
        size: u8,
        count: u32,
        is_write: bool,
        data: Data,
    },
    /// An access to guest physical memory that no memory slot backs (or a write to a
    /// read-only slot).
    Mmio {
        addr: u64,
        size: u8,
        is_write: bool,
        data: Data,
    },
    Hlt,
    Shutdown,
    FailEntry {
        hardware_reason: u64,
        cpu: u32,
    },
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    SystemEvent {
        kind: u32,
        data: Vec<u64>,
    },
    Debug {
        exception: u32,
        pc: u64,
        dr6: u64,
        dr7: u64,
    },
    /// The guest wrote `code` to an exit port.
    Guest {
        port: u16,
        code: u64,
    },
    /// A CPU exception reported by the IDT stubs of `setup_long_mode(exceptions=True)`.
    Exception {
        vector: u64,
        error_code: u64,
        rip: u64,
        cs: u64,
        rflags: u64,
        rsp: u64,
        cr2: u64,
    },
    Timeout,
    Stopped,
    /// KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now. Handled by the run
    /// loop (it injects the queued interrupt), never shown to Python.
    IrqWindowOpen,
    /// An exit kvmpy has no special support for; `raw` is `KVM_EXIT_*`.
    Unknown {
        raw: u32,
    },
}

impl Exit {
    pub fn reason(&self) -> Reason {
        match self {
            Exit::Io { .. } => Reason::Io,
            Exit::Mmio { .. } => Reason::Mmio,
            Exit::Hlt => Reason::Hlt,
            Exit::Shutdown => Reason::Shutdown,
            Exit::FailEntry { .. } => Reason::FailEntry,
            Exit::InternalError { .. } => Reason::InternalError,
            Exit::SystemEvent { .. } => Reason::SystemEvent,
            Exit::Debug { .. } => Reason::Debug,
            Exit::Guest { .. } => Reason::Exit,
            Exit::Exception { .. } => Reason::Exception,
            Exit::Timeout => Reason::Timeout,
            Exit::Stopped => Reason::Stopped,
            Exit::IrqWindowOpen | Exit::Unknown { .. } => Reason::Unknown,
        }
    }
}

/// Where the data of a port I/O exit lives in `kvm_run`, to walk string I/O element by
/// element.
#[derive(Clone, Copy)]
pub struct IoRaw {
    pub port: u16,
    pub size: u8,
    pub count: u32,
    pub is_write: bool,
}

/// What one `KVM_RUN` produced.
pub enum RunExit {
    /// Port I/O: handled per element by the caller (see [`IoRaw`]).
    Io(IoRaw),
    Other(Exit),
}

/// Runs `KVM_RUN` once and converts its result into an owned value: the only `match`
/// over [`VcpuExit`] in the crate.
pub fn run_once(vcpu: &mut VcpuFd) -> Result<RunExit, errno::Error> {
    enum Later {
        Io,
        Internal,
        Raw,
    }
    let exit = match vcpu.run()? {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => Err(Later::Io),
        VcpuExit::MmioRead(addr, data) => Ok(Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: false,
            data: Data::default(),
        }),
        VcpuExit::MmioWrite(addr, data) => Ok(Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: true,
            data: Data::new(data),
        }),
        VcpuExit::Hlt => Ok(Exit::Hlt),
        VcpuExit::IrqWindowOpen => Ok(Exit::IrqWindowOpen),
        VcpuExit::Shutdown => Ok(Exit::Shutdown),
        VcpuExit::FailEntry(hardware_reason, cpu) => Ok(Exit::FailEntry {
            hardware_reason,
            cpu,
        }),
        VcpuExit::InternalError => Err(Later::Internal),
        VcpuExit::SystemEvent(kind, data) => Ok(Exit::SystemEvent {
            kind,
            data: data.to_vec(),
        }),
        VcpuExit::Debug(arch) => Ok(Exit::Debug {
            exception: arch.exception,
            pc: arch.pc,
            dr6: arch.dr6,
            dr7: arch.dr7,
        }),
        VcpuExit::Unsupported(raw) => Ok(Exit::Unknown { raw }),
        _ => Err(Later::Raw),
    };
    // The arms above cannot touch `vcpu` while the exit borrows it; finish those here.
    Ok(match exit {
        Ok(exit) => RunExit::Other(exit),
        Err(Later::Io) => RunExit::Io(io_raw(vcpu)),
        Err(Later::Internal) => RunExit::Other(internal_error(vcpu.get_kvm_run())),
        Err(Later::Raw) => RunExit::Other(Exit::Unknown {
            raw: vcpu.get_kvm_run().exit_reason,
        }),
    })
}

fn io_raw(vcpu: &mut VcpuFd) -> IoRaw {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_IO (the caller matched an I/O exit), so `io` is the
    // active member of the union.
    let io = unsafe { run.__bindgen_anon_1.io };
    IoRaw {
        port: io.port,
        size: io.size,
        count: io.count,
        is_write: u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT,
    }
}

fn internal_error(run: &mut kvm_run) -> Exit {
    debug_assert_eq!(run.exit_reason, KVM_EXIT_INTERNAL_ERROR);
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    Exit::InternalError {
        suberror: internal.suberror,
        data: internal.data[..n].to_vec(),
    }
}

/// The bytes of element `index` of the current port I/O exit.
pub fn io_element(vcpu: &mut VcpuFd, io: IoRaw, index: u32) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the active member.
    let offset = unsafe { run.__bindgen_anon_1.io.data_offset } as usize;
    let start = offset + index as usize * io.size as usize;
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: the kernel places the `count * size` data bytes at `data_offset` inside the
    // mmap'd kvm_run area, which lives as long as `vcpu`; index < count, so the element is
    // inside that range, and the returned borrow is tied to `vcpu`.
    unsafe { std::slice::from_raw_parts_mut(base.add(start), io.size as usize) }
}

/// The data buffer of the current MMIO exit.
pub fn mmio_data(vcpu: &mut VcpuFd) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_MMIO (the caller got an MMIO exit and has not
    // re-entered the guest), so `mmio` is the active member.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    &mut mmio.data[..len]
}

// ---------------------------------------------------------------------------------------
// Python objects

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
            ];
            for (exit, class, fields) in cases {
                let obj = to_python(py, &exit, 5).unwrap();
                let obj = obj.bind(py);
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
        });
    }

    #[test]
    fn data_is_little_endian_and_bounded() {
        let d = Data::new(&[0x34, 0x12]);
        assert_eq!((d.as_slice(), d.value()), (&[0x34u8, 0x12][..], 0x1234));
        assert_eq!(Data::new(&[1; 12]).as_slice().len(), 8);
        assert_eq!(Exit::Timeout.reason().as_str(), "timeout");
    }
}
