//! Guest memory: anonymous host mappings registered as KVM memory slots, and the
//! `MemoryRegion` objects that expose them to Python.
//!
//! A region's host mapping is reference counted: the VM's memory map, the
//! `MemoryRegion` object and every `memoryview` over it each keep it mapped. Removing the
//! region or closing the VM takes it out of the guest's address space, but never unmaps
//! memory that Python can still see.

use std::borrow::Cow;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MemoryRegionAddress,
    MmapRegion,
};

use crate::error::{Error, Result};

pub const PAGE_SIZE: u64 = 4096;

/// One guest memory region, shared by the VM's memory map and its Python object.
pub struct Region {
    pub mem: Arc<GuestRegionMmap>,
    pub guest_addr: u64,
    pub size: u64,
    pub slot: u32,
    pub readonly: bool,
    pub dirty_log: bool,
    /// Whether the region is still part of its VM's guest memory.
    attached: AtomicBool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Memory(format!(
                "offset {offset:#x} + {len:#x} bytes is outside the region (size {:#x})",
                self.size
            ))),
        }
    }
}

/// The guest memory of one VM.
#[derive(Default)]
pub struct MemoryMap {
    /// Sorted by guest address.
    regions: Vec<Arc<Region>>,
    guest: GuestMemoryMmap,
}

/// Checks an address range for the basic rules of a memory slot.
pub fn check_layout(guest_addr: u64, size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::Memory("memory region size must not be zero".into()));
    }
    if size % PAGE_SIZE != 0 || guest_addr % PAGE_SIZE != 0 {
        return Err(Error::Memory(format!(
            "memory region guest_addr {guest_addr:#x} and size {size:#x} must be multiples of the \
             page size ({PAGE_SIZE:#x})"
        )));
    }
    if guest_addr.checked_add(size).is_none() {
        return Err(Error::Memory(format!(
            "memory region {guest_addr:#x} + {size:#x} overflows the guest address space"
        )));
    }
    Ok(())
}

impl MemoryMap {
    /// The region overlapping `[start, end)`, if any.
    pub fn overlapping(&self, start: u64, end: u64) -> Option<&Arc<Region>> {
        self.regions
            .iter()
            .find(|r| r.guest_addr < end && start < r.end())
    }

    fn free_slot(&self, max: usize) -> Result<u32> {
        (0..max as u32)
            .find(|s| self.regions.iter().all(|r| r.slot != *s))
            .ok_or_else(|| Error::Memory(format!("all {max} KVM memory slots are in use")))
    }

    /// Maps a new region and registers it with KVM.
    pub fn add(
        &mut self,
        vm: &VmFd,
        max_slots: usize,
        guest_addr: u64,
        size: u64,
        readonly: bool,
        dirty_log: bool,
    ) -> Result<Arc<Region>> {
        check_layout(guest_addr, size)?;
        if let Some(r) = self.overlapping(guest_addr, guest_addr + size) {
            return Err(Error::Memory(format!(
                "memory region {guest_addr:#x}..{:#x} overlaps region {:#x}..{:#x} (slot {})",
                guest_addr + size,
                r.guest_addr,
                r.end(),
                r.slot
            )));
        }
        let slot = self.free_slot(max_slots)?;
        let len = usize::try_from(size)
            .map_err(|_| Error::Memory(format!("memory region size {size:#x} is too large")))?;
        let mmap = MmapRegion::new(len).map_err(|e| {
            Error::Memory(format!("cannot map {size:#x} bytes of guest memory: {e}"))
        })?;
        let mem = GuestRegionMmap::new(mmap, GuestAddress(guest_addr)).ok_or_else(|| {
            Error::Memory(format!(
                "memory region {guest_addr:#x} + {size:#x} is invalid"
            ))
        })?;
        let mem = Arc::new(mem);
        let mut flags = 0;
        if readonly {
            flags |= KVM_MEM_READONLY;
        }
        if dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the host range [userspace_addr, +size) is a live mapping owned by `mem`, and
        // this map keeps `mem` alive until the slot is deleted again (`remove`) or the VM fd
        // is closed (`clear`), so KVM never sees a dangling userspace address.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        let guest = self
            .guest
            .insert_region(Arc::clone(&mem))
            .map_err(|e| Error::Memory(format!("cannot add memory region: {e}")))?;
        self.guest = guest;
        let region = Arc::new(Region {
            mem,
            guest_addr,
            size,
            slot,
            readonly,
            dirty_log,
            attached: AtomicBool::new(true),
        });
        let at = self.regions.partition_point(|r| r.guest_addr < guest_addr);
        self.regions.insert(at, Arc::clone(&region));
        Ok(region)
    }

    /// Deletes a region's KVM slot and drops it from the map.
    pub fn remove(&mut self, vm: &VmFd, region: &Arc<Region>) -> Result<()> {
        let Some(at) = self.regions.iter().position(|r| Arc::ptr_eq(r, region)) else {
            return Err(Error::Memory(format!(
                "memory region at {:#x} is not part of this VM (already removed?)",
                region.guest_addr
            )));
        };
        let desc = kvm_userspace_memory_region {
            slot: region.slot,
            flags: 0,
            guest_phys_addr: region.guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero memory_size deletes the slot; KVM stops using the host mapping.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        let (guest, _) = self
            .guest
            .remove_region(GuestAddress(region.guest_addr), region.size)
            .map_err(|e| Error::Memory(format!("cannot remove memory region: {e}")))?;
        self.guest = guest;
        self.regions.remove(at);
        region.attached.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Forgets every region; used once the VM fd is closed.
    pub fn clear(&mut self) {
        for r in self.regions.drain(..) {
            r.attached.store(false, Ordering::SeqCst);
        }
        self.guest = GuestMemoryMmap::default();
    }

    /// Fails unless `[gpa, gpa + len)` lies entirely in guest memory.
    pub fn check(&self, gpa: u64, len: usize) -> Result<()> {
        if len == 0 || self.guest.check_range(GuestAddress(gpa), len) {
            Ok(())
        } else {
            Err(outside(gpa, len))
        }
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.guest
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| outside(gpa, buf.len()))
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.guest
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| outside(gpa, data.len()))
    }

    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }
}

fn outside(gpa: u64, len: usize) -> Error {
    Error::Memory(format!(
        "guest physical range {gpa:#x} + {len:#x} bytes is not entirely inside guest memory"
    ))
}

/// Borrows the bytes of a bytes-like Python object (bytes, bytearray, memoryview, ...).
pub fn bytes_arg<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "expected a bytes-like object, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(Cow::Owned(buf.to_vec(obj.py())?))
}

/// A region of guest physical memory backed by host memory.
///
/// Offsets given to `read`/`write` are relative to the region's start. The region also
/// supports the buffer protocol: `memoryview(region)` is a live, writable view of guest
/// memory that stays valid for as long as it exists, even after the region is removed
/// or the VM closed.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct MemoryRegion {
    pub region: Arc<Region>,
    pub vm: Arc<crate::vm::VmInner>,
    /// Keeps the VM open while this object (or a view of it) exists.
    pub owner: Py<crate::vm::Vm>,
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
        self.region.attached.load(Ordering::SeqCst)
    }

    /// Reads `n` bytes at region offset `offset`.
    fn read<'py>(&self, py: Python<'py>, offset: u64, n: u64) -> PyResult<Bound<'py, PyBytes>> {
        self.check_attached()?;
        self.region.check_range(offset, n)?;
        PyBytes::new_with(py, n as usize, |buf| {
            self.region
                .mem
                .read_slice(buf, MemoryRegionAddress(offset))
                .map_err(|e| Error::Memory(e.to_string()).into())
        })
    }

    /// Writes a bytes-like object at region offset `offset`.
    fn write(&self, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_attached()?;
        let data = bytes_arg(data)?;
        self.region.check_range(offset, data.len() as u64)?;
        self.region
            .mem
            .write_slice(&data, MemoryRegionAddress(offset))
            .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(())
    }

    /// The region-relative byte offsets of the pages the guest wrote since the last call
    /// (`KVM_GET_DIRTY_LOG`, which also resets the log). Needs `dirty_log=True`.
    fn dirty_pages(&self) -> PyResult<Vec<u64>> {
        self.check_attached()?;
        if !self.region.dirty_log {
            return Err(Error::Memory("the region was added without dirty_log=True".into()).into());
        }
        let bitmap = self
            .vm
            .dirty_log(self.region.slot, self.region.size as usize)?;
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
        if !this.region.attached.load(Ordering::SeqCst) {
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
        Ok(())
    }
}

impl MemoryRegion {
    fn check_attached(&self) -> Result<()> {
        if self.region.attached.load(Ordering::SeqCst) {
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
