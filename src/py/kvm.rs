//! The `Kvm` class (what the host's KVM can do) and `CpuidEntry`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;
use pyo3::prelude::*;

use crate::engine::kvm::{self, check_extension_raw, CAPABILITIES};
use crate::engine::Error;

/// Resolves a capability given by name (`"readonly_mem"`, `"KVM_CAP_READONLY_MEM"`) or number.
pub fn capability_number(cap: &Bound<'_, PyAny>) -> PyResult<u32> {
    if let Ok(n) = cap.extract::<u32>() {
        return Ok(n);
    }
    let name: String = cap.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err("capability must be a name (str) or a number (int)")
    })?;
    let key = name.to_ascii_lowercase();
    let key = key.strip_prefix("kvm_cap_").unwrap_or(&key);
    CAPABILITIES
        .iter()
        .find(|(n, _)| *n == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "unknown KVM capability {name:?}; pass its number instead"
            ))
        })
}

/// One entry of a CPUID table.
#[pyclass(module = "kvmpy._native", frozen, get_all, eq, from_py_object)]
#[derive(Clone, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[pymethods]
impl CpuidEntry {
    #[new]
    #[pyo3(signature = (function, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0))]
    fn new(function: u32, index: u32, flags: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        CpuidEntry {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "CpuidEntry(function={:#x}, index={:#x}, flags={:#x}, eax={:#010x}, ebx={:#010x}, ecx={:#010x}, edx={:#010x})",
            self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx
        )
    }
}

impl CpuidEntry {
    pub fn from_kvm(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    pub fn to_kvm(&self) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
            ..Default::default()
        }
    }
}

/// The host's KVM: API version, capabilities and supported CPUID.
///
/// All VMs share one open `/dev/kvm`; creating a `Kvm` raises `KvmUnavailable` when
/// it cannot be opened.
#[pyclass(module = "kvmpy._native", name = "Kvm", frozen)]
pub struct PyKvm {
    kvm: Arc<Kvm>,
}

#[pymethods]
impl PyKvm {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyKvm {
            kvm: kvm::shared()?,
        })
    }

    /// The KVM API version (always 12).
    #[getter]
    fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// Size in bytes of a vCPU's shared `kvm_run` area.
    #[getter]
    fn vcpu_mmap_size(&self) -> PyResult<usize> {
        Ok(self
            .kvm
            .get_vcpu_mmap_size()
            .map_err(|e| Error::ioctl("KVM_GET_VCPU_MMAP_SIZE", e))?)
    }

    /// Recommended number of vCPUs per VM.
    #[getter]
    fn recommended_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }

    /// Maximum number of vCPUs per VM.
    #[getter]
    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Maximum number of memory slots per VM.
    #[getter]
    fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// `KVM_CHECK_EXTENSION`: 0 when unsupported, otherwise a positive, capability-specific value.
    fn check_extension(&self, cap: &Bound<'_, PyAny>) -> PyResult<i32> {
        let n = capability_number(cap)?;
        // Go through the raw number so capabilities without a `Cap` variant still work.
        Ok(check_extension_raw(&self.kvm, n))
    }

    /// Every named capability and its `KVM_CHECK_EXTENSION` value.
    fn capabilities(&self) -> BTreeMap<&'static str, i32> {
        CAPABILITIES
            .iter()
            .map(|(name, n)| (*name, check_extension_raw(&self.kvm, *n)))
            .collect()
    }

    /// `KVM_GET_SUPPORTED_CPUID`: the CPUID entries this host's KVM can give a guest.
    fn supported_cpuid(&self) -> PyResult<Vec<CpuidEntry>> {
        Ok(kvm::supported_cpuid(&self.kvm)?
            .iter()
            .map(CpuidEntry::from_kvm)
            .collect())
    }

    fn __repr__(&self) -> String {
        format!("Kvm(api_version={})", self.kvm.get_api_version())
    }
}

/// The real-time signal kvmpy uses to stop running vCPUs (chosen, and its handler
/// installed, on first use: the first from SIGRTMIN+1 on that has no handler).
#[pyfunction]
#[pyo3(name = "_kick_signal")]
pub fn kick_signal() -> PyResult<i32> {
    Ok(crate::engine::kick::signal()?)
}

/// What this host's KVM intercepts for guest debugging (probed once per process in a
/// small test VM): `mechanism` (`"kvm"`: KVM_EXIT_DEBUG; `"exception-stubs"`: #BP/#DB
/// through kvmpy's exception stubs; `KVMPY_DEBUG_MECHANISM` picks one instead),
/// `sw_breakpoints`, `single_step`, `hw_breakpoints`, `watchpoints` (whether KVM
/// intercepts each), and `breakpoints`: how breakpoints (a debugger's and fuzzing
/// coverage's) reach kvmpy in its user mode (`"kvm"`: `int3` intercepted; `"port-io"`: a
/// one-byte `out dx, al` patch, an exit straight from CPL3; `KVMPY_BREAKPOINT_MECHANISM`
/// picks one instead); `guest_debug_flags` (what `KVM_CAP_SET_GUEST_DEBUG2` reports, 0
/// where KVM does not say), `block_irq` (whether single steps hold interrupts off with
/// `KVM_GUESTDBG_BLOCKIRQ`), and `watch_mechanism`: how watchpoints work (`"memslot"`:
/// by guest-physical page; `"debug-registers"`: DR0-DR3; `KVMPY_WATCH_MECHANISM` picks
/// one instead).
#[pyfunction]
#[pyo3(name = "_debug_support")]
pub fn debug_support(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let host = crate::engine::debug::host()?;
    let d = pyo3::types::PyDict::new(py);
    let mechanism = crate::engine::debug::mechanism()?;
    d.set_item("mechanism", mechanism.as_str())?;
    let wanted = std::env::var(crate::engine::coverage::PATCH_ENV).ok();
    let patch = crate::engine::coverage::Mechanism::pick(mechanism, 3, 3, wanted.as_deref())?;
    d.set_item("breakpoints", patch.as_str())?;
    d.set_item("sw_breakpoints", host.sw_breakpoints)?;
    d.set_item("single_step", host.single_step)?;
    d.set_item("hw_breakpoints", host.hw_breakpoints)?;
    d.set_item("watchpoints", host.watchpoints)?;
    d.set_item(
        "guest_debug_flags",
        crate::engine::debug_host::supported_flags(),
    )?;
    d.set_item("block_irq", crate::engine::debug_host::block_irq() != 0)?;
    let kvm = crate::engine::kvm::shared()?;
    d.set_item(
        "watch_mechanism",
        match crate::engine::debug::watch_mechanism(&kvm) {
            Ok(m) => m.to_string(),
            Err(e) => format!("unsupported: {e}"),
        },
    )?;
    Ok(d)
}
