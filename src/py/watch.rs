//! The `watchpoint` exit's Python class.

use pyo3::prelude::*;

use crate::engine::watch::WatchHit;
use crate::py::exit::ExitInfo;

/// An access hit a watchpoint set with `add_watchpoint`: reason `"watchpoint"`. The
/// access is done (a write is in memory); RIP is after the instruction, or still at a
/// `rep` string instruction that has iterations left.
#[pyclass(module = "kvmpy._native", extends = ExitInfo, frozen, get_all)]
pub struct WatchpointExit {
    /// The guest-virtual address the watchpoint was set at.
    address: u64,
    /// The watchpoint's length in bytes.
    length: u64,
    /// The watchpoint's kind: `"write"` or `"rw"`.
    kind: &'static str,
    /// The guest-physical address of the access that hit it.
    access: u64,
    /// The size of that access in bytes.
    size: u8,
    /// Whether the access was a write.
    is_write: bool,
    /// RIP when the run ended.
    rip: u64,
    /// The watched bytes before the access, little-endian.
    old: u64,
    /// The watched bytes after the access, little-endian.
    new: u64,
}

#[pymethods]
impl WatchpointExit {
    fn __repr__(slf: PyRef<'_, Self>) -> String {
        format!(
            "WatchpointExit(address={:#x}, kind='{}', is_write={}, rip={:#x}, old={:#x}, \
             new={:#x}, vcpu_id={})",
            slf.address,
            slf.kind,
            if slf.is_write { "True" } else { "False" },
            slf.rip,
            slf.old,
            slf.new,
            slf.as_super().vcpu_id()
        )
    }
}

/// The Python object of a watchpoint exit.
pub fn to_python(
    py: Python<'_>,
    init: pyo3::PyClassInitializer<ExitInfo>,
    hit: &WatchHit,
    rip: u64,
) -> PyResult<Py<PyAny>> {
    Ok(Py::new(
        py,
        init.add_subclass(WatchpointExit {
            address: hit.watch.vaddr,
            length: hit.watch.len,
            kind: hit.watch.kind.as_str(),
            access: hit.access,
            size: hit.size,
            is_write: hit.is_write,
            rip,
            old: hit.old,
            new: hit.new,
        }),
    )?
    .into_any())
}
