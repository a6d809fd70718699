//! `FuzzExecutor`: runs fuzz inputs on a vCPU, each with one call that releases the GIL
//! (write the input, set its registers, run, read the crash state, restore).

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::engine::fuzz::{ArgReg, Config, Executor};
use crate::engine::kick;
use crate::py::args::{bytes_arg, Int};
use crate::py::error::through_engine;
use crate::py::interrupt::CtrlC;
use crate::py::regs::Regs;
use crate::py::snapshot::Snapshot;
use crate::py::vcpu::Vcpu;
use crate::py::vm::Vm;
use crate::py::{exit, gil};

/// Runs inputs on `vcpu` of `vm`, restoring `snapshot` after each. The low-level loop
/// under `kvmpy.fuzz.Target`; most programs use that instead.
///
/// An input of `n` bytes is written at `input_end - n` (so it ends where the input area
/// ends); `addr_reg` and `len_reg` (`"rdi"`, `"rsi"`, `"rdx"`, `"rcx"`, `"r8"`, `"r9"`,
/// or None) get its address and length. Each run lasts at most `timeout` seconds.
/// `exception_stack_top` (`tables_addr + 0x7000` of `setup_long_mode(exceptions=True)`)
/// lets a crash's registers show the guest's RAX and RDX, which the exception stubs save
/// there.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct FuzzExecutor {
    inner: Arc<Executor>,
    vcpu_id: u64,
    /// Keeps the VM open while this object exists.
    _owner: Py<Vm>,
}

fn arg_reg(name: Option<&str>, what: &str) -> PyResult<Option<ArgReg>> {
    name.map(|n| {
        ArgReg::parse(n).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{what} must be one of \"rdi\", \"rsi\", \"rdx\", \"rcx\", \"r8\", \"r9\" or \
                 None, not {n:?}"
            ))
        })
    })
    .transpose()
}

#[pymethods]
impl FuzzExecutor {
    #[new]
    #[pyo3(signature = (vm, vcpu, snapshot, *, input_end, max_len, addr_reg=Some("rdi"), len_reg=Some("rsi"), timeout=1.0, exception_stack_top=None), text_signature = "(vm, vcpu, snapshot, *, input_end, max_len, addr_reg='rdi', len_reg='rsi', timeout=1.0, exception_stack_top=None)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vm: Py<Vm>,
        vcpu: PyRef<'_, Vcpu>,
        snapshot: PyRef<'_, Snapshot>,
        input_end: Int<u64>,
        max_len: Int<usize>,
        addr_reg: Option<&str>,
        len_reg: Option<&str>,
        timeout: f64,
        exception_stack_top: Option<Int<u64>>,
    ) -> PyResult<Self> {
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 1e9) {
            return Err(PyValueError::new_err(format!(
                "timeout must be a number of seconds above 0 and at most 1e9, got {timeout}"
            )));
        }
        let py = vcpu.py();
        let core = Arc::clone(&vm.borrow(py).inner.0);
        if !Arc::ptr_eq(&vcpu.inner.vm, &core) {
            return Err(PyValueError::new_err("the vCPU belongs to another VM"));
        }
        let config = Config {
            input_end: input_end.0,
            max_len: max_len.0,
            addr_reg: arg_reg(addr_reg, "addr_reg")?,
            len_reg: arg_reg(len_reg, "len_reg")?,
            timeout: Duration::from_secs_f64(timeout),
            exception_stack_top: exception_stack_top.map(|t| t.0),
        };
        let inner = Executor::new(
            core,
            Arc::clone(&vcpu.inner),
            Arc::clone(&snapshot.inner),
            config,
        )?;
        Ok(FuzzExecutor {
            inner: Arc::new(inner),
            vcpu_id: vcpu.inner.id,
            _owner: vm,
        })
    }

    /// Runs one input (bytes-like, at most `max_len` bytes) and restores the snapshot.
    /// Returns `(exit, regs)`: the exit that ended the run (`GuestExit` for the exit
    /// port, `ExceptionExit`, `MmioExit` for an access with no RAM behind it, reason
    /// `"timeout"`, ...) and, except after a clean exit, the registers when it ended (for
    /// an exception, the faulting context's). Ctrl-C stops the run and raises
    /// `KeyboardInterrupt`.
    fn run(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<(Py<PyAny>, Option<Regs>)> {
        let data = bytes_arg(data)?;
        kick::block_in_this_thread(kick::signal()?)?;
        let ctrl_c = CtrlC::hold();
        let on_signal = || {
            ctrl_c.deliver();
            gil::attached(|py| py.check_signals()).map_err(through_engine)
        };
        let inner = &self.inner;
        let data: &[u8] = &data;
        let execution = gil::released(py, || inner.run(data, Some(&on_signal)))?;
        let obj = exit::to_python(py, &execution.exit, self.vcpu_id)?;
        Ok((obj, execution.regs.as_ref().map(Regs::from_kvm)))
    }

    /// The longest input `run()` accepts.
    #[getter]
    fn max_len(&self) -> usize {
        self.inner.config.max_len
    }
}
