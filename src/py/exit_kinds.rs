//! The exit classes with fixed fields (every kind but port I/O and MMIO, whose objects are
//! refilled and live in `exit.rs`).

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::internal_error;
use crate::py::exit::ExitInfo;

/// The guest wrote to an exit port (`vm.add_exit_port`): `code` is the value written.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct GuestExit {
    /// The value the guest wrote.
    pub(crate) code: u64,
    /// The exit port.
    pub(crate) port: u16,
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
    pub(crate) hardware_entry_failure_reason: u64,
    /// The host CPU the entry failed on.
    pub(crate) cpu: u32,
}

/// `KVM_EXIT_INTERNAL_ERROR`: KVM could not handle something, for example an instruction
/// its emulator does not know. `str(exit)` says what happened and what to try.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct InternalErrorExit {
    /// `KVM_INTERNAL_ERROR_*` (1 = emulation failure, 2 = simultaneous exceptions, 3 = event
    /// delivery failed, 4 = unexpected exit reason).
    pub(crate) suberror: u32,
    /// Extra words KVM reported.
    pub(crate) data: Vec<u64>,
    /// `rip` when the exit happened (the instruction that failed, for an emulation failure).
    pub(crate) rip: u64,
    /// The code size at `rip`: 16, 32 or 64 (0 if the registers could not be read).
    pub(crate) bits: u8,
    /// Whether the vCPU was still in the state it was created in (no mode set up).
    pub(crate) reset_state: bool,
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
    pub(crate) event_type: u32,
    /// Extra words KVM reported.
    pub(crate) data: Vec<u64>,
}

/// `KVM_EXIT_DEBUG`: a breakpoint or single step (with guest debugging enabled).
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct DebugExit {
    pub(crate) exception: u32,
    pub(crate) pc: u64,
    pub(crate) dr6: u64,
    pub(crate) dr7: u64,
}

/// A breakpoint set with `add_breakpoint` was reached: reason `"breakpoint"`. The vCPU
/// is stopped before the instruction at `address` (its RIP); running on executes it.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct BreakpointExit {
    /// The guest-virtual address of the breakpoint.
    pub(crate) address: u64,
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
    pub(crate) rip: u64,
}

/// A CPU exception in the guest, reported by the IDT stubs that
/// `setup_long_mode(exceptions=True)` installs: reason `"exception"`.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct ExceptionExit {
    /// The exception vector (0 = #DE, 6 = #UD, 13 = #GP, 14 = #PF, ...).
    pub(crate) vector: u64,
    /// The error code the CPU pushed (0 for exceptions without one).
    pub(crate) error_code: u64,
    /// The address of the faulting instruction.
    pub(crate) rip: u64,
    /// CS at the fault (its low 2 bits are the privilege level).
    pub(crate) cs: u64,
    pub(crate) rflags: u64,
    pub(crate) rsp: u64,
    /// CR2: the faulting address of a page fault.
    pub(crate) cr2: u64,
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
    pub(crate) kvm_exit_reason: u32,
}
