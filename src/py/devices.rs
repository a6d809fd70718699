//! The Python objects of the built-in devices: what a script keeps to read a console's
//! output, feed a UART or remove a device.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::devices::console::ConsoleDev;
use crate::devices::exit_port::ExitPortDev;
use crate::devices::uart::UartDev;
use crate::py::args::bytes_arg;

/// A console device on one I/O port, handled natively (no Python call per byte).
///
/// Every byte the guest writes with OUT to the port is collected; IN from the port reads 0.
/// At most `limit` bytes are kept: past that the oldest output is dropped.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct Console {
    pub dev: Arc<ConsoleDev>,
}

#[pymethods]
impl Console {
    /// The console's I/O port.
    #[getter]
    fn port(&self) -> u16 {
        self.dev.port
    }

    /// What the guest has written so far.
    fn output<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.dev.take(false))
    }

    /// Returns what the guest has written and empties the buffer.
    fn take<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.dev.take(true))
    }

    /// Empties the buffer.
    fn clear(&self) {
        self.dev.take(true);
    }

    fn __repr__(&self) -> String {
        format!("Console(port={:#x})", self.dev.port)
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
/// A 16550-style UART on 8 ports from `port`, handled natively: what the guest transmits
/// is collected (`output()`), what you `feed()` it the guest can receive. LSR always says
/// the transmitter is ready, so guests that poll it before writing work.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct Uart {
    pub dev: Arc<UartDev>,
}

#[pymethods]
impl Uart {
    /// The UART's base port.
    #[getter]
    fn port(&self) -> u16 {
        self.dev.base
    }

    /// What the guest has transmitted so far.
    fn output<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.dev.output(false))
    }

    /// Returns what the guest has transmitted and empties the buffer.
    fn take<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.dev.output(true))
    }

    /// Queues bytes for the guest to receive.
    fn feed(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.dev.feed(&bytes_arg(data)?);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("Uart(port={:#x})", self.dev.base)
    }
}
