//! The `Snapshot` class: a whole VM captured by `Vm.snapshot()`, put back by
//! `Vm.restore()`.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::snapshot::Snapshot as Core;
use crate::engine::VmCore;
use crate::py::args::Int;
use crate::py::gil;
use crate::py::regs::{Regs, Sregs};

/// A whole VM at an exit boundary: every vCPU's state as KVM holds it (general, special,
/// FPU/SSE/AVX and debug registers, XCRs, the MSRs KVM lists, vCPU events, MP state, and
/// with an irqchip the LAPIC, PIC, IOAPIC and PIT), guest memory and the state of
/// kvmpy's devices (console and UART buffers, UART registers, queued interrupts).
///
/// Made by `Vm.snapshot()`; put back with `Vm.restore(snapshot)`, into the same VM or
/// another with the same memory layout, vCPUs and devices. Immutable.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct Snapshot {
    pub inner: Arc<Core>,
}

#[pymethods]
impl Snapshot {
    /// The ids of the snapshot's vCPUs, in the VM's order.
    #[getter]
    fn vcpu_ids(&self) -> Vec<u64> {
        self.inner.vcpus.iter().map(|v| v.id).collect()
    }

    /// `(guest_addr, size)` of each memory region, by address.
    #[getter]
    fn memory_regions(&self) -> Vec<(u64, u64)> {
        self.inner
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect()
    }

    /// Reads `n` bytes of the snapshot's guest physical memory at `gpa`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        gpa: Int<u64>,
        n: Int<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.inner.check_range(gpa.0, n.0 as u64)?;
        PyBytes::new_with(py, n.0, |buf| Ok(self.inner.read(gpa.0, buf)?))
    }

    /// The general registers of the vCPU at `index` (in `vcpu_ids` order).
    fn regs(&self, index: Int<usize>) -> PyResult<Regs> {
        Ok(Regs::from_kvm(&self.vcpu(index.0)?.regs))
    }

    /// The special registers of the vCPU at `index` (in `vcpu_ids` order).
    fn sregs(&self, index: Int<usize>) -> PyResult<Sregs> {
        Ok(Sregs::from_kvm(&self.vcpu(index.0)?.sregs))
    }

    /// The MSRs saved for the vCPU at `index`: `{index: value}`.
    fn msrs(&self, index: Int<usize>) -> PyResult<std::collections::BTreeMap<u32, u64>> {
        Ok(self
            .vcpu(index.0)?
            .msrs
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    /// The VM's kvmclock when the snapshot was taken, in nanoseconds (`None` for a file written
    /// before kvmpy saved it, or a host without KVM_CAP_ADJUST_CLOCK). A restore into the VM
    /// whose memory is based on this snapshot (a reset) leaves the guest's clocks running; any
    /// other restore sets kvmclock and each vCPU's TSC back to the snapshot's values.
    #[getter]
    fn clock(&self) -> Option<u64> {
        self.inner.clock
    }

    /// The TSC frequency in kHz of the vCPU at `index` (in `vcpu_ids` order), or `None` for a
    /// file written before kvmpy saved it, or a host that cannot tell. Restoring into a vCPU
    /// whose TSC runs at another frequency sets it where the host can (KVM_CAP_TSC_CONTROL) and
    /// raises `KvmUnsupported` where it cannot.
    fn tsc_khz(&self, index: Int<usize>) -> PyResult<Option<u32>> {
        Ok(self.vcpu(index.0)?.tsc_khz)
    }

    /// Writes the snapshot to a file: a versioned format (kvmpy and CPU vendor in the
    /// header) holding every vCPU's state, device state and the memory pages that are
    /// not all zero, with a checksum.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let core = Arc::clone(&self.inner);
        Ok(gil::released(py, || core.save(&path))?)
    }

    /// Reads a snapshot file written by `save`. A file that is truncated, corrupt, of a
    /// newer format version, written for another KVM structure layout or taken on
    /// another CPU vendor raises `ValueError` naming the problem (`OSError` when it cannot
    /// be read). Whether it fits a VM is checked by `Vm.restore`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Snapshot> {
        let inner = gil::released(py, || Core::load(&path))?;
        Ok(Snapshot {
            inner: Arc::new(inner),
        })
    }

    fn __repr__(&self) -> String {
        let bytes: u64 = self.inner.regions.iter().map(|r| r.size).sum();
        format!(
            "Snapshot(vcpus={}, memory={:#x} bytes in {} regions)",
            self.inner.vcpus.len(),
            bytes,
            self.inner.regions.len()
        )
    }
}

impl Snapshot {
    fn vcpu(&self, index: usize) -> PyResult<&crate::engine::snapshot::cpu::VcpuState> {
        self.inner.vcpus.get(index).ok_or_else(|| {
            pyo3::exceptions::PyIndexError::new_err(format!(
                "vCPU index {index} out of range: the snapshot has {} vCPUs",
                self.inner.vcpus.len()
            ))
        })
    }
}

/// `Vm.snapshot()`, with the GIL released while memory is copied.
pub fn take(py: Python<'_>, vm: &Arc<VmCore>) -> PyResult<Snapshot> {
    let inner = gil::released(py, || vm.snapshot())?;
    Ok(Snapshot { inner })
}

/// `Vm.restore(snapshot)`.
pub fn restore(py: Python<'_>, vm: &Arc<VmCore>, snap: &Snapshot) -> PyResult<()> {
    let core = Arc::clone(&snap.inner);
    Ok(gil::released(py, || vm.restore(&core))?)
}
