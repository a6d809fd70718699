//! `vm.start()`, `vm.join()` (and so `vm.run()`): every vCPU on its own thread, and the
//! VMs with such threads, stopped when the interpreter exits.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::engine::{lock, Error, VmCore};
use crate::py::args::deadline_after;
use crate::py::gil;
use crate::py::vcpu::last_exit;
use crate::py::vm::Vm;

/// VMs with background runs, stopped by `shutdown_all` when the interpreter exits.
static BACKGROUND: Mutex<Vec<Weak<VmCore>>> = Mutex::new(Vec::new());

/// Stops every VM that has vCPU threads, before the interpreter goes away (atexit).
#[pyfunction]
#[pyo3(name = "_shutdown_all")]
pub fn shutdown_all(py: Python<'_>) {
    let vms: Vec<Arc<VmCore>> = lock(&BACKGROUND)
        .drain(..)
        .filter_map(|w| w.upgrade())
        .collect();
    gil::released(py, || vms.iter().for_each(|vm| vm.shutdown()));
}

/// The body of `Vm.start()`.
pub fn start(vm: &Vm, timeout: Option<f64>, until: &str) -> PyResult<()> {
    let until_any = match until {
        "all" => false,
        "any" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "until must be \"all\" or \"any\", not {other:?}"
            )))
        }
    };
    let deadline = deadline_after(timeout)?;
    vm.core().start(deadline, until_any)?;
    let mut background = lock(&BACKGROUND);
    background.retain(|w| w.strong_count() > 0);
    if !background
        .iter()
        .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(vm.core())))
    {
        background.push(Arc::downgrade(vm.core()));
    }
    Ok(())
}

/// The body of `Vm.join()`.
pub fn join(vm: &Vm, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Vec<Py<PyAny>>>> {
    let inner = &vm.inner;
    if let Some(v) = inner.vcpu_of_this_thread() {
        return Err(Error::Busy(format!(
            "cannot join the VM from a handler of its own vCPU {}",
            v.id
        ))
        .into());
    }
    let deadline = deadline_after(timeout)?;
    let Some(group) = inner.group() else {
        return Err(PyValueError::new_err("nothing to join: call start() first"));
    };
    loop {
        let step = Duration::from_millis(50);
        let step = deadline.map_or(step, |d| {
            step.min(d.saturating_duration_since(Instant::now()))
        });
        if gil::released(py, || group.wait(Some(step))) {
            break;
        }
        if let Err(e) = py.check_signals() {
            inner.stop_all_runs();
            gil::released(py, || group.wait(None));
            vm.finish_group(py, &group);
            return Err(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
    if let Some(e) = vm.finish_group(py, &group) {
        return Err(e.into());
    }
    let mut exits = Vec::with_capacity(group.vcpus.len());
    for v in &group.vcpus {
        match last_exit(py, v)? {
            Some(exit) => exits.push(exit),
            // A run that never began because the VM was closed under it.
            None => return Err(Error::Closed("VM").into()),
        }
    }
    Ok(Some(exits))
}
