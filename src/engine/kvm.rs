//! The process-wide `/dev/kvm` handle and what it can tell about the host.

use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::engine::error::{Error, Result};

/// The only KVM API version there has ever been.
pub const KVM_API_VERSION: i32 = 12;

static SHARED: Mutex<Option<Arc<Kvm>>> = Mutex::new(None);
static SUPPORTED_CPUID: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();

/// Opens `/dev/kvm` once per process and shares the handle between VMs.
pub fn shared() -> Result<Arc<Kvm>> {
    let mut guard = crate::engine::lock(&SHARED);
    if let Some(kvm) = guard.as_ref() {
        return Ok(Arc::clone(kvm));
    }
    let kvm = Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::ENOENT => " (the kvm module is not loaded or this is not a KVM-capable host)",
            libc::EACCES | libc::EPERM => {
                " (add your user to the 'kvm' group or fix /dev/kvm's mode)"
            }
            _ => "",
        };
        Error::Unavailable(format!("cannot open /dev/kvm: {e}{hint}"))
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::Unavailable(format!(
            "/dev/kvm speaks API version {version}, kvmpy needs {KVM_API_VERSION}"
        )));
    }
    let kvm = Arc::new(kvm);
    *guard = Some(Arc::clone(&kvm));
    Ok(kvm)
}

/// The host's supported CPUID, read once.
pub fn supported_cpuid(kvm: &Kvm) -> Result<&'static [kvm_cpuid_entry2]> {
    if let Some(v) = SUPPORTED_CPUID.get() {
        return Ok(v);
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    Ok(SUPPORTED_CPUID.get_or_init(|| cpuid.as_slice().to_vec()))
}

/// The CPUID a new vCPU gets: the host's supported CPUID with the hypervisor bit set and
/// the vCPU's APIC id in leaf 1 (and leaf 0xB's x2APIC id), as VMMs do.
pub fn cpuid_for_vcpu(kvm: &Kvm, vcpu_id: u64) -> Result<CpuId> {
    let mut entries = supported_cpuid(kvm)?.to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (((vcpu_id as u32) & 0xff) << 24);
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb | 0x1f => e.edx = vcpu_id as u32,
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|_| Error::Value("too many CPUID entries".into()))
}

/// Capability names (without the `KVM_CAP_` prefix, lower case) and their numbers.
pub const CAPABILITIES: &[(&str, u32)] = &[
    ("irqchip", kvm_bindings::KVM_CAP_IRQCHIP),
    ("hlt", kvm_bindings::KVM_CAP_HLT),
    (
        "mmu_shadow_cache_control",
        kvm_bindings::KVM_CAP_MMU_SHADOW_CACHE_CONTROL,
    ),
    ("user_memory", kvm_bindings::KVM_CAP_USER_MEMORY),
    ("set_tss_addr", kvm_bindings::KVM_CAP_SET_TSS_ADDR),
    ("vapic", kvm_bindings::KVM_CAP_VAPIC),
    ("ext_cpuid", kvm_bindings::KVM_CAP_EXT_CPUID),
    ("clocksource", kvm_bindings::KVM_CAP_CLOCKSOURCE),
    ("nr_vcpus", kvm_bindings::KVM_CAP_NR_VCPUS),
    ("nr_memslots", kvm_bindings::KVM_CAP_NR_MEMSLOTS),
    ("pit", kvm_bindings::KVM_CAP_PIT),
    ("nop_io_delay", kvm_bindings::KVM_CAP_NOP_IO_DELAY),
    ("pv_mmu", kvm_bindings::KVM_CAP_PV_MMU),
    ("mp_state", kvm_bindings::KVM_CAP_MP_STATE),
    ("coalesced_mmio", kvm_bindings::KVM_CAP_COALESCED_MMIO),
    ("sync_mmu", kvm_bindings::KVM_CAP_SYNC_MMU),
    ("iommu", kvm_bindings::KVM_CAP_IOMMU),
    (
        "destroy_memory_region_works",
        kvm_bindings::KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
    ),
    ("user_nmi", kvm_bindings::KVM_CAP_USER_NMI),
    ("set_guest_debug", kvm_bindings::KVM_CAP_SET_GUEST_DEBUG),
    ("reinject_control", kvm_bindings::KVM_CAP_REINJECT_CONTROL),
    ("irq_routing", kvm_bindings::KVM_CAP_IRQ_ROUTING),
    ("irq_inject_status", kvm_bindings::KVM_CAP_IRQ_INJECT_STATUS),
    ("assign_dev_irq", kvm_bindings::KVM_CAP_ASSIGN_DEV_IRQ),
    (
        "join_memory_regions_works",
        kvm_bindings::KVM_CAP_JOIN_MEMORY_REGIONS_WORKS,
    ),
    ("mce", kvm_bindings::KVM_CAP_MCE),
    ("irqfd", kvm_bindings::KVM_CAP_IRQFD),
    ("pit2", kvm_bindings::KVM_CAP_PIT2),
    ("set_boot_cpu_id", kvm_bindings::KVM_CAP_SET_BOOT_CPU_ID),
    ("pit_state2", kvm_bindings::KVM_CAP_PIT_STATE2),
    ("ioeventfd", kvm_bindings::KVM_CAP_IOEVENTFD),
    (
        "set_identity_map_addr",
        kvm_bindings::KVM_CAP_SET_IDENTITY_MAP_ADDR,
    ),
    ("xen_hvm", kvm_bindings::KVM_CAP_XEN_HVM),
    ("adjust_clock", kvm_bindings::KVM_CAP_ADJUST_CLOCK),
    (
        "internal_error_data",
        kvm_bindings::KVM_CAP_INTERNAL_ERROR_DATA,
    ),
    ("vcpu_events", kvm_bindings::KVM_CAP_VCPU_EVENTS),
    ("pci_segment", kvm_bindings::KVM_CAP_PCI_SEGMENT),
    ("intr_shadow", kvm_bindings::KVM_CAP_INTR_SHADOW),
    ("debugregs", kvm_bindings::KVM_CAP_DEBUGREGS),
    (
        "x86_robust_singlestep",
        kvm_bindings::KVM_CAP_X86_ROBUST_SINGLESTEP,
    ),
    ("enable_cap", kvm_bindings::KVM_CAP_ENABLE_CAP),
    ("xsave", kvm_bindings::KVM_CAP_XSAVE),
    ("xcrs", kvm_bindings::KVM_CAP_XCRS),
    ("async_pf", kvm_bindings::KVM_CAP_ASYNC_PF),
    ("tsc_control", kvm_bindings::KVM_CAP_TSC_CONTROL),
    ("get_tsc_khz", kvm_bindings::KVM_CAP_GET_TSC_KHZ),
    ("one_reg", kvm_bindings::KVM_CAP_ONE_REG),
    ("signal_msi", kvm_bindings::KVM_CAP_SIGNAL_MSI),
    (
        "tsc_deadline_timer",
        kvm_bindings::KVM_CAP_TSC_DEADLINE_TIMER,
    ),
    ("readonly_mem", kvm_bindings::KVM_CAP_READONLY_MEM),
    ("irqfd_resample", kvm_bindings::KVM_CAP_IRQFD_RESAMPLE),
    (
        "ioapic_polarity_ignored",
        kvm_bindings::KVM_CAP_IOAPIC_POLARITY_IGNORED,
    ),
    ("max_vcpus", kvm_bindings::KVM_CAP_MAX_VCPUS),
    (
        "check_extension_vm",
        kvm_bindings::KVM_CAP_CHECK_EXTENSION_VM,
    ),
    ("immediate_exit", kvm_bindings::KVM_CAP_IMMEDIATE_EXIT),
    ("max_vcpu_id", kvm_bindings::KVM_CAP_MAX_VCPU_ID),
    ("sync_regs", kvm_bindings::KVM_CAP_SYNC_REGS),
    ("split_irqchip", kvm_bindings::KVM_CAP_SPLIT_IRQCHIP),
    ("x2apic_api", kvm_bindings::KVM_CAP_X2APIC_API),
    ("hyperv_synic", kvm_bindings::KVM_CAP_HYPERV_SYNIC),
    ("x86_disable_exits", kvm_bindings::KVM_CAP_X86_DISABLE_EXITS),
    (
        "manual_dirty_log_protect2",
        kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    ),
    ("exception_payload", kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD),
    (
        "x86_user_space_msr",
        kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
    ),
    ("x86_msr_filter", kvm_bindings::KVM_CAP_X86_MSR_FILTER),
    ("dirty_log_ring", kvm_bindings::KVM_CAP_DIRTY_LOG_RING),
    ("x86_bus_lock_exit", kvm_bindings::KVM_CAP_X86_BUS_LOCK_EXIT),
    ("sgx_attribute", kvm_bindings::KVM_CAP_SGX_ATTRIBUTE),
    ("binary_stats_fd", kvm_bindings::KVM_CAP_BINARY_STATS_FD),
    ("xsave2", kvm_bindings::KVM_CAP_XSAVE2),
    ("pmu_capability", kvm_bindings::KVM_CAP_PMU_CAPABILITY),
    ("vm_tsc_control", kvm_bindings::KVM_CAP_VM_TSC_CONTROL),
    ("user_memory2", kvm_bindings::KVM_CAP_USER_MEMORY2),
    ("memory_attributes", kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES),
    ("guest_memfd", kvm_bindings::KVM_CAP_GUEST_MEMFD),
    ("vm_types", kvm_bindings::KVM_CAP_VM_TYPES),
];

/// `KVM_CHECK_EXTENSION` for a capability number (negative answers read as 0).
pub fn check_extension_raw(kvm: &Kvm, cap: u32) -> i32 {
    kvm.check_extension_raw(cap.into()).max(0)
}

/// Whether this host's KVM supports `cap`.
pub fn has_cap(kvm: &Kvm, cap: Cap) -> bool {
    kvm.check_extension(cap)
}

/// The host's physical memory in bytes (0 if unknown).
pub fn host_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        0
    } else {
        (pages as u64).saturating_mul(size as u64)
    }
}
