//! The two places the face changes who holds the GIL: [`released`] runs engine code with
//! it released (polars' `enter_polars`), [`attached`] takes it on an engine thread to call
//! Python. Nothing else in the crate releases or takes the GIL, and nothing touches a
//! Python object while it is released.

use std::cell::Cell;

use pyo3::ffi;
use pyo3::marker::Ungil;
use pyo3::prelude::*;

use crate::engine::runner;

/// Runs `f` with the GIL released.
pub fn released<T: Ungil>(py: Python<'_>, f: impl Ungil + FnOnce() -> T) -> T {
    py.detach(f)
}

/// Runs `f` with the GIL held, from a thread that may not hold it (a vCPU thread).
///
/// A vCPU thread of a run group has no thread state of the interpreter's; taking the GIL
/// there would create one and destroy it again on every call (about 950 more instructions
/// per handler call than on a Python thread). So the first call on such a thread keeps
/// the thread state for the thread's life: one more `PyGILState_Ensure`, released by
/// [`release_thread_state`] when the thread ends.
pub fn attached<T>(f: impl for<'py> FnOnce(Python<'py>) -> T) -> T {
    Python::attach(|py| {
        if runner::in_vcpu_thread() && KEPT.with(|k| k.get().is_none()) {
            // SAFETY: the GIL is held (inside `attach`); this nests one more GILState on
            // the thread's state, which `release_thread_state` releases on this thread.
            let state = unsafe { ffi::PyGILState_Ensure() };
            KEPT.with(|k| k.set(Some(state)));
        }
        f(py)
    })
}

thread_local! {
    /// The GILState a vCPU thread keeps for its life, once it has called Python.
    static KEPT: Cell<Option<ffi::PyGILState_STATE>> = const { Cell::new(None) };
}

/// Ends what [`attached`] kept on the calling vCPU thread: the engine calls it as the
/// thread ends. Takes the GIL, so nobody may wait for a vCPU thread while holding it.
pub fn release_thread_state() {
    let Some(state) = KEPT.with(|k| k.take()) else {
        return;
    };
    // SAFETY: Py_IsInitialized may be called at any time.
    if unsafe { ffi::Py_IsInitialized() } == 0 {
        return; // the interpreter is gone, and the thread state with it
    }
    Python::attach(|_py| {
        // SAFETY: the GIL is held and `state` is what this thread's own PyGILState_Ensure
        // returned; releasing it inside `attach` leaves pyo3's own GILState to end the
        // thread state when `attach` returns.
        unsafe { ffi::PyGILState_Release(state) };
    });
}
