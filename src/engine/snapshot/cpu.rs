//! A vCPU's state as KVM holds it: captured and put back in the order Firecracker's
//! `KvmVcpu::save_state`/`restore_state` (`arch/x86_64/vcpu.rs`) found KVM needs.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::vcpu::{VcpuCore, VcpuFdHolder};

/// IA32_TSC_DEADLINE: written after IA32_TSC, or KVM may miss that a timer must fire.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_TSC: the guest's time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Everything KVM holds for one vCPU, and kvmpy's own queue of interrupts for it.
pub struct VcpuState {
    pub id: u64,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// With an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The MSRs of KVM_GET_MSR_INDEX_LIST that KVM lets the host read, TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Vectors queued by `queue_interrupt` and not injected yet.
    pub interrupts: Vec<u32>,
    /// The guest TSC's frequency (KVM_GET_TSC_KHZ); `None` in a file of format version 1
    /// or where the host cannot tell.
    pub tsc_khz: Option<u32>,
}

/// MSRs KVM reported but refused to read or write, found once per process, for VMs
/// without and with an in-kernel irqchip (KVM refuses the TSC deadline without a LAPIC).
static REFUSED_READ: Mutex<[BTreeSet<u32>; 2]> = Mutex::new([BTreeSet::new(), BTreeSet::new()]);
static REFUSED_WRITE: Mutex<[BTreeSet<u32>; 2]> = Mutex::new([BTreeSet::new(), BTreeSet::new()]);

/// KVM_GET_MSR_INDEX_LIST, asked once, TSC deadline last.
fn msr_index_list(kvm: &Kvm) -> Result<&'static [u32]> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::ioctl("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut list = list.as_slice().to_vec();
    list.sort_by_key(|&i| i == MSR_IA32_TSC_DEADLINE);
    Ok(LIST.get_or_init(|| list))
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|_| Error::Value("too many MSRs".into()))
}

/// Reads every listed MSR KVM lets the host read; one it refuses is dropped and
/// remembered, so later snapshots do not ask again.
fn read_msrs(kvm: &Kvm, fd: &VcpuFd, irqchip: bool) -> Result<Vec<kvm_msr_entry>> {
    let kind = usize::from(irqchip);
    let refused = lock(&REFUSED_READ)[kind].clone();
    let mut todo: Vec<kvm_msr_entry> = msr_index_list(kvm)?
        .iter()
        .filter(|i| !refused.contains(i))
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut done = Vec::with_capacity(todo.len());
    while !todo.is_empty() {
        let chunk = todo.len().min(KVM_MAX_MSR_ENTRIES);
        let mut msrs = msrs_of(&todo[..chunk])?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::ioctl("KVM_GET_MSRS", e))?;
        done.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = if n < chunk {
            lock(&REFUSED_READ)[kind].insert(todo[n].index);
            n + 1
        } else {
            n
        };
        todo.drain(..skip);
    }
    Ok(done)
}

/// Writes MSRs in order; one KVM refuses is skipped (and not offered again).
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry], irqchip: bool) -> Result<()> {
    let kind = usize::from(irqchip);
    let refused = lock(&REFUSED_WRITE)[kind].clone();
    let todo: Vec<kvm_msr_entry> = entries
        .iter()
        .filter(|e| !refused.contains(&e.index))
        .copied()
        .collect();
    let mut at = 0;
    while at < todo.len() {
        let chunk = (todo.len() - at).min(KVM_MAX_MSR_ENTRIES);
        let n = fd
            .set_msrs(&msrs_of(&todo[at..at + chunk])?)
            .map_err(|e| Error::ioctl("KVM_SET_MSRS", e))?;
        if n < chunk {
            lock(&REFUSED_WRITE)[kind].insert(todo[at + n].index);
            at += 1;
        }
        at += n;
    }
    Ok(())
}

/// The bytes of `kvm_xsave`'s region: the XSAVE state a snapshot holds.
const XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();

/// Fails, naming the host limit, when a VM's XSAVE state (`size` bytes, what
/// KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says on its fd; 0 where the host lacks the
/// capability) is larger than a snapshot holds: KVM_GET_XSAVE would drop the rest (the
/// AMX tile data of a process that asked for it with ARCH_REQ_XCOMP_GUEST_PERM).
pub fn check_xsave_size(size: i32) -> Result<()> {
    if usize::try_from(size).unwrap_or(0) <= XSAVE_BYTES {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "this VM's XSAVE state is {size} bytes (KVM_CAP_XSAVE2), larger than the \
         {XSAVE_BYTES} bytes of KVM_GET_XSAVE that kvmpy's snapshots hold (AMX tile state \
         this process enabled for guests): snapshots of such a VM are not supported"
    )))
}

/// Captures a vCPU's state. KVM_GET_MP_STATE comes first (it may change LAPIC state) and
/// the vCPU events last (the other reads may change them), as Firecracker does.
pub fn capture(vcpu: &VcpuCore, fd: &mut VcpuFd, kvm: &Kvm, irqchip: bool) -> Result<VcpuState> {
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| Error::ioctl("KVM_GET_MP_STATE", e))?;
    let regs = vcpu.read_regs(fd)?;
    let sregs = fd
        .get_sregs()
        .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
    let xsave = fd
        .get_xsave()
        .map_err(|e| Error::ioctl("KVM_GET_XSAVE", e))?;
    let xcrs = fd.get_xcrs().map_err(|e| Error::ioctl("KVM_GET_XCRS", e))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(|e| Error::ioctl("KVM_GET_DEBUGREGS", e))?;
    let lapic = if irqchip {
        Some(
            fd.get_lapic()
                .map_err(|e| Error::ioctl("KVM_GET_LAPIC", e))?,
        )
    } else {
        None
    };
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::ioctl("KVM_GET_CPUID2", e))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(kvm, fd, irqchip)?;
    // A host without KVM_CAP_GET_TSC_KHZ (or an unstable TSC) has none to give.
    let tsc_khz = fd.get_tsc_khz().ok().filter(|khz| *khz != 0);
    let events = fd
        .get_vcpu_events()
        .map_err(|e| Error::ioctl("KVM_GET_VCPU_EVENTS", e))?;
    Ok(VcpuState {
        id: vcpu.id,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        cpuid,
        interrupts: vcpu.queued_interrupts(),
        tsc_khz,
    })
}

/// Puts everything back, in Firecracker's order: MP state; general registers before the
/// vCPU events (setting registers drops a pending exception the events restore); special
/// registers before the LAPIC (they hold the APIC base); the LAPIC before the MSRs (the
/// TSC deadline needs it); the events last. With `keep_tsc` the guest's TSC is left
/// running (see `Snapshot`'s clock rule) instead of set back.
pub fn put_all(vcpu: &VcpuCore, fd: &mut VcpuFd, st: &VcpuState, keep_tsc: bool) -> Result<()> {
    fd.set_mp_state(st.mp_state)
        .map_err(|e| Error::ioctl("KVM_SET_MP_STATE", e))?;
    vcpu.put_regs_now(fd, &st.regs)?;
    vcpu.write_sregs(fd, &st.sregs)?;
    put_xsave(fd, st)?;
    fd.set_xcrs(&st.xcrs)
        .map_err(|e| Error::ioctl("KVM_SET_XCRS", e))?;
    fd.set_debug_regs(&st.debugregs)
        .map_err(|e| Error::ioctl("KVM_SET_DEBUGREGS", e))?;
    if let Some(lapic) = &st.lapic {
        fd.set_lapic(lapic)
            .map_err(|e| Error::ioctl("KVM_SET_LAPIC", e))?;
    }
    if keep_tsc {
        let mut msrs: Vec<kvm_msr_entry> = st
            .msrs
            .iter()
            .filter(|e| e.index != MSR_IA32_TSC)
            .copied()
            .collect();
        shift_tsc_deadline(fd, st, &mut msrs)?;
        write_msrs(fd, &msrs, st.lapic.is_some())?;
    } else {
        write_msrs(fd, &st.msrs, st.lapic.is_some())?;
    }
    fd.set_vcpu_events(&st.events)
        .map_err(|e| Error::ioctl("KVM_SET_VCPU_EVENTS", e))?;
    vcpu.set_queued_interrupts(&st.interrupts);
    Ok(())
}

/// With the TSC left running: an armed TSC deadline timer (an absolute TSC value) moves
/// by as much as the TSC did since the snapshot, so it fires as long after the restore
/// as it would have after the snapshot.
fn shift_tsc_deadline(fd: &VcpuFd, st: &VcpuState, msrs: &mut [kvm_msr_entry]) -> Result<()> {
    let Some(deadline) = msrs
        .iter_mut()
        .find(|e| e.index == MSR_IA32_TSC_DEADLINE && e.data != 0)
    else {
        return Ok(());
    };
    let Some(then) = st.msrs.iter().find(|e| e.index == MSR_IA32_TSC) else {
        return Ok(());
    };
    let mut now = msrs_of(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])?;
    let n = fd
        .get_msrs(&mut now)
        .map_err(|e| Error::ioctl("KVM_GET_MSRS", e))?;
    if n == 1 {
        let ran = now.as_slice()[0].data.wrapping_sub(then.data);
        deadline.data = deadline.data.wrapping_add(ran);
    }
    Ok(())
}

/// Puts back what user-mode code can change between two exits without KVM telling: the
/// general registers (through `kvm_run`, no ioctl) and the FPU/SSE/AVX state: loaded by
/// the guest itself when the next run starts where it can be (see `stub`), else now with
/// `KVM_SET_XSAVE`.
pub fn put_user(
    vcpu: &VcpuCore,
    holder: &mut VcpuFdHolder,
    st: &VcpuState,
    snap_id: u64,
) -> Result<()> {
    vcpu.write_regs(&mut holder.fd, &st.regs)?;
    if !vcpu.arm_fpu(holder, st, snap_id)? {
        put_xsave(&holder.fd, st)?;
    }
    vcpu.set_queued_interrupts(&st.interrupts);
    Ok(())
}

fn put_xsave(fd: &VcpuFd, st: &VcpuState) -> Result<()> {
    // SAFETY: `st.xsave` is a whole kvm_xsave that KVM_GET_XSAVE filled (or a snapshot file
    // whose size was checked); KVM reads exactly that struct.
    unsafe { fd.set_xsave(&st.xsave) }.map_err(|e| Error::ioctl("KVM_SET_XSAVE", e))
}

/// Whether the host's KVM can run a guest TSC at another frequency than the host's
/// (KVM_CAP_TSC_CONTROL).
fn host_has_tsc_control(kvm: &Kvm) -> bool {
    static CONTROL: OnceLock<bool> = OnceLock::new();
    *CONTROL.get_or_init(|| kvm.check_extension_raw(kvm_bindings::KVM_CAP_TSC_CONTROL.into()) > 0)
}

/// Frequencies KVM treats as the same (its `tsc_tolerance_ppm`, 250 ppm): it neither
/// scales nor catches up within them.
fn same_khz(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 1_000_000 <= u64::from(a) * 250
}

/// Fails, naming the host limit, unless the vCPU behind `fd` runs its TSC at the
/// snapshot's frequency or this host can make it (KVM_CAP_TSC_CONTROL). Returns the
/// frequency to set, if one must be.
pub fn check_tsc_khz(kvm: &Kvm, fd: &VcpuFd, st: &VcpuState) -> Result<Option<u32>> {
    let Some(want) = st.tsc_khz else {
        return Ok(None);
    };
    let have = fd
        .get_tsc_khz()
        .map_err(|e| Error::ioctl("KVM_GET_TSC_KHZ", e))?;
    if same_khz(want, have) {
        return Ok(None);
    }
    if want == 0 || !host_has_tsc_control(kvm) {
        return Err(Error::Unsupported(format!(
            "vCPU {}'s TSC ran at {want} kHz in the snapshot and runs at {have} kHz here, and \
             this host's KVM cannot change a guest's TSC frequency (no KVM_CAP_TSC_CONTROL): \
             restore the snapshot on a host with the same TSC frequency",
            st.id
        )));
    }
    Ok(Some(want))
}

/// Sets the vCPU's TSC frequency (after `check_tsc_khz` said so).
pub fn set_tsc_khz(fd: &VcpuFd, khz: u32) -> Result<()> {
    fd.set_tsc_khz(khz)
        .map_err(|e| Error::ioctl("KVM_SET_TSC_KHZ", e))
}

/// Fails, naming the first difference, unless the vCPU behind `fd` has the CPUID `st` was
/// taken with: state saved under one CPUID (XSAVE features, MSRs) may not load under
/// another, and a restore must not fail halfway.
pub fn check_cpuid(fd: &VcpuFd, st: &VcpuState) -> Result<()> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let mut theirs = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::ioctl("KVM_GET_CPUID2", e))?
        .as_slice()
        .to_vec();
    let mut ours = st.cpuid.clone();
    theirs.sort_by_key(key);
    ours.sort_by_key(key);
    let same = |a: &kvm_cpuid_entry2, b: &kvm_cpuid_entry2| {
        (a.function, a.index, a.flags, a.eax, a.ebx, a.ecx, a.edx)
            == (b.function, b.index, b.flags, b.eax, b.ebx, b.ecx, b.edx)
    };
    if ours.len() == theirs.len() && ours.iter().zip(&theirs).all(|(a, b)| same(a, b)) {
        return Ok(());
    }
    let first = ours
        .iter()
        .zip(&theirs)
        .find(|(a, b)| !same(a, b))
        .map_or_else(
            || {
                format!(
                    "{} entries in the snapshot, {} in the VM",
                    ours.len(),
                    theirs.len()
                )
            },
            |(a, _)| format!("leaf {:#x} subleaf {:#x} differs", a.function, a.index),
        );
    Err(Error::Value(format!(
        "the snapshot does not fit this VM: vCPU {}'s CPUID is not the one the snapshot was \
         taken with ({first}); restore into a VM made with Vm.from_snapshot, or give the vCPU \
         the snapshot's CPUID with set_cpuid first",
        st.id
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_state_larger_than_a_snapshot_holds_is_refused() {
        for size in [0, 576, 4096] {
            check_xsave_size(size).unwrap();
        }
        let err = check_xsave_size(11_008).unwrap_err().to_string();
        assert!(err.contains("11008 bytes (KVM_CAP_XSAVE2)"), "{err}");
    }

    #[test]
    fn tsc_frequencies_within_250_ppm_are_the_same() {
        assert!(same_khz(2_596_098, 2_596_098));
        assert!(same_khz(2_596_098, 2_596_098 + 600));
        assert!(!same_khz(2_596_098, 2_596_098 + 700));
        assert!(!same_khz(2_596_098, 1_298_049));
    }
}
