//! An exit port: a guest OUT to it ends `run()` with reason `"exit"`.

use std::sync::Arc;

use pyo3::prelude::*;

pub struct ExitPortDev {
    pub port: u16,
}

/// A port whose OUT ends the run: `run()` returns a `GuestExit` with `code` set to the value
/// written (1, 2 or 4 bytes, little endian). IN from the port reads 0.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct ExitPort {
    pub dev: Arc<ExitPortDev>,
}

#[pymethods]
impl ExitPort {
    /// The exit port.
    #[getter]
    fn port(&self) -> u16 {
        self.dev.port
    }

    fn __repr__(&self) -> String {
        format!("ExitPort(port={:#x})", self.dev.port)
    }
}
