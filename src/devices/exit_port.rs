//! An exit port: a guest OUT to it ends `run()` with reason `"exit"`.

use std::sync::Arc;

use pyo3::prelude::*;

pub struct ExitPortDev {
    pub port: u16,
    /// QEMU's isa-debug-exit convention: a write of v ends the run with code (v << 1) | 1.
    pub debug_exit: bool,
}

impl ExitPortDev {
    /// The exit code for a guest write of `value`.
    pub fn code(&self, value: u64) -> u64 {
        if self.debug_exit {
            (value << 1) | 1
        } else {
            value
        }
    }
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

    /// Whether codes follow the isa-debug-exit convention ((value << 1) | 1).
    #[getter]
    fn debug_exit(&self) -> bool {
        self.dev.debug_exit
    }

    fn __repr__(&self) -> String {
        format!(
            "ExitPort(port={:#x}{})",
            self.dev.port,
            if self.dev.debug_exit {
                ", debug_exit"
            } else {
                ""
            }
        )
    }
}
