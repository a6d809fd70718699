//! The `LoadedImage` class and the image arguments of the loaders.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::engine::load;
use crate::py::args::bytes_arg;

/// What a loader put in guest memory.
#[pyclass(module = "kvmpy._native", frozen, get_all)]
pub struct LoadedImage {
    /// The entry point.
    entry: u64,
    /// 32 or 64 (the ELF class; 32 for Multiboot kernels loaded with the a.out kludge).
    bits: u8,
    /// `(guest address, size in memory)` of each loaded segment.
    segments: Vec<(u64, u64)>,
    /// Symbol name -> address, from the ELF symbol table (empty for other images).
    symbols: BTreeMap<String, u64>,
    /// Guest physical address of the multiboot_info structure (Multiboot kernels only).
    boot_info: Option<u64>,
}

#[pymethods]
impl LoadedImage {
    fn __repr__(&self) -> String {
        format!(
            "LoadedImage(entry={:#x}, bits={}, segments={}, symbols={}{})",
            self.entry,
            self.bits,
            self.segments.len(),
            self.symbols.len(),
            self.boot_info
                .map(|a| format!(", boot_info={a:#x}"))
                .unwrap_or_default()
        )
    }
}

/// The bytes of an image argument: a path (str or os.PathLike), read from disk, or a
/// bytes-like object.
pub fn image_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let py = obj.py();
    let is_path = obj.is_instance_of::<PyString>()
        || obj.is_instance(&py.import("os")?.getattr("PathLike")?)?;
    if is_path {
        let path: std::path::PathBuf = obj.extract()?;
        return std::fs::read(&path).map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot read {}: {e}", path.display()))
        });
    }
    Ok(bytes_arg(obj)?.into_owned())
}

/// A module argument: bytes-like/path, or `(bytes-like/path, cmdline)`.
pub fn module_arg(item: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, String)> {
    if let Ok(t) = item.cast::<PyTuple>() {
        if t.len() != 2 {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "a module is bytes, a path, or a (data, cmdline) tuple",
            ));
        }
        return Ok((image_bytes(&t.get_item(0)?)?, t.get_item(1)?.extract()?));
    }
    Ok((image_bytes(item)?, String::new()))
}

impl From<load::LoadedImage> for LoadedImage {
    fn from(i: load::LoadedImage) -> Self {
        LoadedImage {
            entry: i.entry,
            bits: i.bits,
            segments: i.segments,
            symbols: i.symbols,
            boot_info: i.boot_info,
        }
    }
}
