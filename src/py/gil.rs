//! The two places the face changes who holds the GIL: [`released`] runs engine code with
//! it released (polars' `enter_polars`), [`attached`] takes it on an engine thread to call
//! Python. Nothing else in the crate releases or takes the GIL, and nothing touches a
//! Python object while it is released.
//!
//! The fast path. A handler exit takes and drops the GIL once per exit, so [`attached`]
//! does it the way a C extension does: `PyEval_RestoreThread` with the thread state the
//! thread detached with, and `PyEval_SaveThread` after, instead of pyo3's
//! `PyGILState_Ensure`/`Release` (which look the thread state up, count, and check the
//! interpreter: about 140 more instructions per exit). [`DETACHED`] holds that thread
//! state while, and only while, the thread runs kvmpy code with the GIL released:
//! - [`released`] sets it for the time it releases the GIL (and puts the previous value
//!   back after, so nested runs nest);
//! - a vCPU thread of a run group sets it once it keeps a thread state of its own
//!   (its first call into Python), and clears it when the thread ends;
//! - [`attached`] clears it while it holds the GIL, so that a nested `attached` (Python
//!   code called from a handler calling back into a handler on this thread) takes the
//!   ordinary, re-entrant pyo3 path.
//!
//! Under the fast path pyo3's own attach count stays 0 (pyo3 has no public way to raise
//! it): pyo3 then treats a `Py<T>` dropped inside `f` as dropped while detached and
//! queues its decref for the next attach, which is correct, only later; a `Bound` drops
//! at once. Everything else pyo3 does with a `Python` token only needs the GIL held,
//! which it is.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::Ordering;

use pyo3::ffi;
use pyo3::marker::Ungil;
use pyo3::prelude::*;

use crate::engine::runner;
use crate::engine::VcpuCore;

thread_local! {
    /// The thread state this thread detached with, while it runs kvmpy code without the
    /// GIL; null otherwise (see the module's documentation).
    static DETACHED: Cell<*mut ffi::PyThreadState> = const { Cell::new(ptr::null_mut()) };
    /// The GILState a vCPU thread keeps for its life, once it has called Python.
    static KEPT: Cell<Option<ffi::PyGILState_STATE>> = const { Cell::new(None) };
}

/// Puts [`DETACHED`] back to what it was when dropped (also on unwinding).
struct RestoreDetached(*mut ffi::PyThreadState);

impl Drop for RestoreDetached {
    fn drop(&mut self) {
        DETACHED.with(|d| d.set(self.0));
    }
}

/// Runs `f` with the GIL released.
pub fn released<T: Ungil>(py: Python<'_>, f: impl Ungil + FnOnce() -> T) -> T {
    // SAFETY: the GIL is held (the `py` token), so the thread has a current thread state,
    // which `py.detach` saves and restores around `f` on this same thread.
    let tstate = unsafe { ffi::PyThreadState_Get() };
    let _restore = RestoreDetached(DETACHED.with(|d| d.replace(tstate)));
    py.detach(f)
}

/// Gives the GIL back when dropped (also on unwinding), and records the thread state it
/// detached with for the next [`attached`] on this thread.
struct Reattached {
    slot: *const Cell<*mut ffi::PyThreadState>,
}

impl Drop for Reattached {
    fn drop(&mut self) {
        // SAFETY: `attached` took the GIL with PyEval_RestoreThread on this thread and
        // nothing since has given it back (pyo3's `detach` inside `f` restores it before
        // returning), so this thread holds it and may save its state.
        let tstate = unsafe { ffi::PyEval_SaveThread() };
        // SAFETY: `slot` points at this thread's own `DETACHED`, which lives as long as
        // the thread; a `Reattached` never leaves the thread that made it (it is !Send
        // through its raw pointer).
        unsafe { (*self.slot).set(tstate) };
    }
}

/// Runs `f` with the GIL held, from a thread that may not hold it (a vCPU thread, or the
/// thread of a `cpu.run()` while its loop runs without the GIL).
pub fn attached<T>(f: impl for<'py> FnOnce(Python<'py>) -> T) -> T {
    attached_at(
        DETACHED.with(|d| d as *const Cell<*mut ffi::PyThreadState>),
        f,
    )
}

/// [`attached`] for a device of `vcpu`, called by the run loop on the thread that runs it:
/// where this thread's [`DETACHED`] lies is kept in the vCPU's run-thread word, so the
/// exits after the run's first skip the thread-local lookup (a call into the dynamic
/// linker, and lines of its data, on every exit otherwise).
pub fn attached_for<T>(vcpu: &VcpuCore, f: impl for<'py> FnOnce(Python<'py>) -> T) -> T {
    let word = vcpu.run_thread_word();
    let mut slot = word.load(Ordering::Relaxed) as *const Cell<*mut ffi::PyThreadState>;
    if slot.is_null() {
        slot = DETACHED.with(|d| d as *const Cell<*mut ffi::PyThreadState>);
        word.store(slot as usize, Ordering::Relaxed);
    }
    attached_at(slot, f)
}

/// [`attached`] with `slot`, this thread's own [`DETACHED`].
#[inline(always)]
fn attached_at<T>(
    slot: *const Cell<*mut ffi::PyThreadState>,
    f: impl for<'py> FnOnce(Python<'py>) -> T,
) -> T {
    // SAFETY: `slot` is this thread's own `DETACHED` (the callers' contract; for
    // `attached_for`, the engine zeroes the word before each run and only the run's thread
    // uses it during the run), alive for the thread's life.
    let tstate = unsafe { (*slot).get() };
    // SAFETY: Py_IsInitialized may be called at any time.
    if tstate.is_null() || unsafe { ffi::Py_IsInitialized() } == 0 {
        return attached_slow(f);
    }
    // SAFETY: `slot` as above. Clearing it first makes a nested `attached` (while this
    // one holds the GIL) take the re-entrant pyo3 path.
    unsafe { (*slot).set(ptr::null_mut()) };
    // SAFETY: a non-null DETACHED is the state this thread detached with, and the thread
    // does not hold the GIL now (see the module's documentation), which is exactly
    // PyEval_RestoreThread's contract.
    unsafe { ffi::PyEval_RestoreThread(tstate) };
    let _give_back = Reattached { slot };
    // SAFETY: the thread holds the GIL from here until `_give_back` is dropped, after `f`.
    f(unsafe { Python::assume_attached() })
}

/// [`attached`] through pyo3, on a thread that did not detach through kvmpy. A vCPU
/// thread of a run group has no thread state of the interpreter's; taking the GIL there
/// would create one and destroy it again on every call (about 950 more instructions per
/// handler call than on a Python thread). So the first call on such a thread keeps the
/// thread state for the thread's life (one more `PyGILState_Ensure`, released by
/// [`release_thread_state`] when the thread ends), and records it in [`DETACHED`] so the
/// thread's next calls take the fast path.
///
/// Once the interpreter has exited (a handler exit met by a daemon thread's run, or by a
/// run nobody stopped, while the process ends) there is no Python to call: the call
/// unwinds, as pyo3's own refusal would, but without printing a panic report into the
/// ending process's output.
#[cold]
fn attached_slow<T>(f: impl for<'py> FnOnce(Python<'py>) -> T) -> T {
    // SAFETY: Py_IsInitialized may be called at any time.
    if unsafe { ffi::Py_IsInitialized() } == 0 {
        std::panic::resume_unwind(Box::new("the Python interpreter has exited"));
    }
    let mut kept = ptr::null_mut();
    let result = Python::attach(|py| {
        if runner::in_vcpu_thread() && KEPT.with(|k| k.get().is_none()) {
            // SAFETY: the GIL is held (inside `attach`); this nests one more GILState on
            // the thread's state, which `release_thread_state` releases on this thread.
            let state = unsafe { ffi::PyGILState_Ensure() };
            KEPT.with(|k| k.set(Some(state)));
            // SAFETY: the GIL is held, so the thread has a current thread state: the one
            // the GILState just kept alive.
            kept = unsafe { ffi::PyThreadState_Get() };
        }
        f(py)
    });
    if !kept.is_null() {
        // pyo3 has given the GIL back; the kept thread state stays (its GILState count
        // is still 1), detached.
        DETACHED.with(|d| d.set(kept));
    }
    result
}

/// Ends what [`attached`] kept on the calling vCPU thread: the engine calls it as the
/// thread ends. Takes the GIL, so nobody may wait for a vCPU thread while holding it.
pub fn release_thread_state() {
    DETACHED.with(|d| d.set(ptr::null_mut()));
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
