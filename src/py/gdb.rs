//! The `GdbServer` class: a gdb remote stub serving one VM (`vm.gdb_server()`,
//! `vm.serve_gdb()`).

use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::engine::gdb;
use crate::py::args::deadline_after;
use crate::py::gil;
use crate::py::vm::Vm;

/// A gdb remote stub for a VM, listening on TCP: made by `vm.gdb_server()`.
///
/// gdb connects with `target remote HOST:PORT` and sees each vCPU as a thread. The first
/// client gets the session; a client that connects while it lasts is refused (gdb prints
/// "Remote failure reply: E.kvmpy: another gdb is attached to this VM"). When the session
/// ends (gdb detaches, kills, disconnects or breaks the connection), the vCPUs are left
/// stopped where they are and gdb's breakpoints are removed: `wait()` returns and the VM
/// can be run from Python again. The server then stops listening.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct GdbServer {
    inner: gdb::GdbServer,
    /// Keeps the VM open while the server exists.
    owner: Py<Vm>,
}

impl GdbServer {
    pub fn start(vm: &Bound<'_, Vm>, host: &str, port: u16) -> PyResult<Self> {
        let core = std::sync::Arc::clone(&vm.get().inner.0);
        let inner = gil::released(vm.py(), || gdb::GdbServer::start(core, host, port))?;
        Ok(GdbServer {
            inner,
            owner: vm.clone().unbind(),
        })
    }

    /// How the session ended, in words (empty while it has not).
    pub fn ending_text(&self) -> String {
        self.inner
            .ending()
            .map(|e| e.describe())
            .unwrap_or_default()
    }

    /// Waits for the session to end, taking Ctrl-C (which closes the server and raises
    /// `KeyboardInterrupt`); raises the first exception a handler raised during it.
    pub fn wait_for(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = deadline_after(timeout)?;
        loop {
            let slice = Duration::from_millis(100);
            let slice = deadline.map_or(slice, |d| {
                slice.min(d.saturating_duration_since(Instant::now()))
            });
            if gil::released(py, || self.inner.wait(Some(slice))) {
                break;
            }
            if let Err(e) = py.check_signals() {
                gil::released(py, || self.inner.close());
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
        if let Some(e) = self.inner.take_error() {
            return Err(e.into());
        }
        Ok(true)
    }
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        // The session's vCPU threads may need the GIL to end (a handler): release it.
        gil::attached(|py| gil::released(py, || self.inner.close()));
    }
}

#[pymethods]
impl GdbServer {
    /// The TCP port the server listens on (the free port chosen for `port=0`).
    #[getter]
    fn port(&self) -> u16 {
        self.inner.addr().port()
    }

    /// The address the server listens on.
    #[getter]
    fn host(&self) -> String {
        self.inner.addr().ip().to_string()
    }

    /// `"HOST:PORT"` of the gdb client being served, or None.
    #[getter]
    fn client(&self) -> Option<String> {
        self.inner.client().map(|a| a.to_string())
    }

    /// How many clients were refused because another one was being served.
    #[getter]
    fn refused(&self) -> u64 {
        self.inner.refused()
    }

    /// How the session ended (`"gdb detached"`, `"gdb sent kill"`, `"the guest exited with
    /// code N"`, `"the gdb connection broke: ..."`, `"the session failed: ..."`, `"the
    /// server was closed"`), or None while it has not.
    #[getter]
    fn ending(&self) -> Option<String> {
        self.inner.ending().map(|e| e.describe())
    }

    /// Waits until the session has ended, at most `timeout` seconds; returns whether it
    /// has. Raises the first exception a handler raised while gdb ran the guest, and
    /// `KeyboardInterrupt` on Ctrl-C (after closing the server).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.wait_for(py, timeout)
    }

    /// Ends the session (the vCPUs are stopped and left as they are) or stops waiting for
    /// a client. Idempotent.
    fn close(&self, py: Python<'_>) {
        gil::released(py, || self.inner.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        let state = match (self.inner.ending(), self.inner.client()) {
            (Some(e), _) => format!("ended: {}", e.describe()),
            (None, Some(c)) => format!("serving {c}"),
            (None, None) => "waiting for gdb".into(),
        };
        format!("GdbServer({}, {state})", self.inner.addr())
    }

    /// The VM being debugged.
    #[getter]
    fn vm(&self, py: Python<'_>) -> Py<Vm> {
        self.owner.clone_ref(py)
    }
}
