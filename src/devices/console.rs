//! A write-only console: collects the bytes a guest writes to one port.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The console's state, shared by the handler table and the Python object.
pub struct ConsoleDev {
    pub port: u16,
    limit: usize,
    buf: Mutex<Vec<u8>>,
}

impl ConsoleDev {
    pub fn new(port: u16, limit: usize) -> Self {
        ConsoleDev {
            port,
            limit,
            buf: Mutex::new(Vec::new()),
        }
    }

    /// Appends what the guest wrote, keeping at most the last `limit` bytes.
    pub fn write(&self, data: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend_from_slice(data);
        if buf.len() > self.limit {
            // Drop the oldest bytes in one go, leaving room so this happens rarely.
            let keep = self.limit / 2;
            let cut = buf.len() - keep;
            buf.drain(..cut);
        }
    }

    fn take(&self, clear: bool) -> Vec<u8> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if clear {
            std::mem::take(&mut *buf)
        } else {
            buf.clone()
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes_within_the_limit() {
        let dev = ConsoleDev::new(0x3f8, 8);
        dev.write(b"abcdef");
        assert_eq!(dev.take(false), b"abcdef");
        dev.write(b"ghij");
        let out = dev.take(true);
        assert!(out.len() <= 8);
        assert!(b"abcdefghij".ends_with(&out));
        assert!(dev.take(false).is_empty());
    }
}
