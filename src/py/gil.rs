//! The two places the face changes who holds the GIL: [`released`] runs engine code with
//! it released (polars' `enter_polars`), [`attached`] takes it on an engine thread to call
//! Python. Nothing else in the crate releases or takes the GIL, and nothing touches a
//! Python object while it is released.

use pyo3::marker::Ungil;
use pyo3::prelude::*;

/// Runs `f` with the GIL released.
pub fn released<T: Ungil>(py: Python<'_>, f: impl Ungil + FnOnce() -> T) -> T {
    py.detach(f)
}

/// Runs `f` with the GIL held, from a thread that may not hold it (a vCPU thread).
pub fn attached<T>(f: impl for<'py> FnOnce(Python<'py>) -> T) -> T {
    Python::attach(f)
}
