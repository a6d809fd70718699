//! The `MemoryRegion` class: a region of guest memory, with the buffer protocol.

use std::os::raw::c_int;
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vm_memory::{Bytes, MemoryRegionAddress};

use crate::engine::memory::{Region, PAGE_SIZE};
use crate::engine::{Error, VmCore};
use crate::py::args::{bytes_arg, Int};

/// A region of guest physical memory backed by host memory.
///
/// Offsets given to `read`/`write` are relative to the region's start. The region also
/// supports the buffer protocol: `memoryview(region)` is a live, writable view of guest
/// memory that stays valid for as long as it exists, even after the region is removed
/// or the VM closed. Writes through a view cannot be tracked page by page: a snapshot
/// restore copies a region back whole when a view of it existed since the last snapshot
/// or restore.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct MemoryRegion {
    pub region: Arc<Region>,
    pub vm: Arc<VmCore>,
    /// Keeps the VM open while this object (or a view of it) exists.
    pub owner: Py<crate::py::vm::Vm>,
}

#[pymethods]
impl MemoryRegion {
    /// Guest physical address of the region's first byte.
    #[getter]
    fn guest_addr(&self) -> u64 {
        self.region.guest_addr
    }

    /// Size of the region in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.region.size
    }

    /// The KVM memory slot number.
    #[getter]
    fn slot(&self) -> u32 {
        self.region.slot
    }

    /// Whether guest writes to the region exit as MMIO writes instead of landing.
    #[getter]
    fn readonly(&self) -> bool {
        self.region.readonly
    }

    /// Whether KVM logs the pages the guest writes.
    #[getter]
    fn dirty_log(&self) -> bool {
        self.region.dirty_log
    }

    /// Whether the region is still part of its VM (not removed, VM not closed).
    #[getter]
    fn attached(&self) -> bool {
        self.region.attached()
    }

    /// Reads `n` bytes at region offset `offset`, as `Vm.read` does: the original bytes
    /// where breakpoints or coverage patches are (a `memoryview` of the region shows the
    /// memory as it is, patches included).
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: Int<u64>,
        n: Int<u64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (offset, n) = (offset.0, n.0);
        self.check_attached()?;
        self.region.check_range(offset, n)?;
        let vm = Arc::clone(&self.owner.bind(py).borrow().inner);
        PyBytes::new_with(py, n as usize, |buf| {
            let table = crate::engine::lock(&vm.0.breakpoints);
            self.region
                .mem
                .read_slice(buf, MemoryRegionAddress(offset))
                .map_err(|e| PyErr::from(Error::Memory(e.to_string())))?;
            table.hide(self.region.guest_addr + offset, buf);
            Ok(())
        })
    }

    /// Writes a bytes-like object at region offset `offset`.
    fn write(&self, offset: Int<u64>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let offset = offset.0;
        self.check_attached()?;
        let data = bytes_arg(data)?;
        self.region.check_range(offset, data.len() as u64)?;
        self.region
            .mem
            .write_slice(&data, MemoryRegionAddress(offset))
            .map_err(|e| Error::Memory(e.to_string()))?;
        self.region.record.note_write(offset, data.len() as u64);
        Ok(())
    }

    /// The region-relative byte offsets of the pages the guest wrote since the last call
    /// (`KVM_GET_DIRTY_LOG`, which also resets the log). Needs `dirty_log=True`. In a VM
    /// with `dirty_ring=N` the pages come from the vCPUs' rings, which needs them stopped.
    fn dirty_pages(&self) -> PyResult<Vec<u64>> {
        self.check_attached()?;
        if !self.region.dirty_log {
            return Err(Error::Memory("the region was added without dirty_log=True".into()).into());
        }
        let bitmap = self.vm.dirty_log(&self.region)?;
        let mut pages = Vec::new();
        for (i, word) in bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                pages.push((i as u64 * 64 + bit) * PAGE_SIZE);
                w &= w - 1;
            }
        }
        Ok(pages)
    }

    fn __traverse__(
        &self,
        visit: pyo3::PyVisit<'_>,
    ) -> std::result::Result<(), pyo3::PyTraverseError> {
        visit.call(&self.owner)
    }

    fn __len__(&self) -> usize {
        self.region.size as usize
    }

    fn __repr__(&self) -> String {
        format!(
            "MemoryRegion(guest_addr={:#x}, size={:#x}, slot={}, readonly={}{})",
            self.region.guest_addr,
            self.region.size,
            self.region.slot,
            if self.region.readonly {
                "True"
            } else {
                "False"
            },
            if self.attached() { "" } else { ", detached" }
        )
    }

    /// Exports the region's host memory as a writable, contiguous byte buffer.
    ///
    /// # Safety
    /// Called by Python with a valid `Py_buffer` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if !this.region.attached() {
            return Err(PyBufferError::new_err(
                "memory region is no longer part of a VM (removed or VM closed)",
            ));
        }
        let ptr = this.region.mem.as_ptr() as *mut std::ffi::c_void;
        let len = this.region.size as ffi::Py_ssize_t;
        // SAFETY: `view` is the caller's Py_buffer; `ptr` points to `len` bytes mapped for as
        // long as this object lives, and PyBuffer_FillInfo stores a new reference to `slf`
        // in the view, so the mapping outlives every view. It sets a Python error and returns
        // -1 on failure.
        let ret = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, len, 0, flags) };
        if ret == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        // Writes through a view cannot be tracked page by page: a snapshot restore copies
        // the whole region back while a view is exported.
        this.region.record.view_exported();
        Ok(())
    }

    /// Notes that a view of the region was released.
    ///
    /// # Safety
    /// Called by Python with a buffer `__getbuffer__` filled.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.region.record.view_released();
    }
}

impl MemoryRegion {
    fn check_attached(&self) -> crate::engine::Result<()> {
        if self.region.attached() {
            Ok(())
        } else if self.vm.is_closed() {
            Err(Error::Closed("the VM of this memory region"))
        } else {
            Err(Error::Memory(format!(
                "memory region at {:#x} was removed from its VM",
                self.region.guest_addr
            )))
        }
    }
}
