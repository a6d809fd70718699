//! A fast restore's FPU state, loaded by the guest itself: instead of `KVM_SET_XSAVE` (a
//! vCPU ioctl, 5-8 µs on a nested host), the snapshot's XSAVE image goes into the vCPU's
//! page of the stub slot (`arch::x86_64::fpustub`) and the next run enters the guest at the
//! stub, which loads it and jumps to the RIP the run would have started at.
//!
//! The redirect is decided when the run starts, not at the restore, so the registers read
//! between the two are the snapshot's. It is made only where nothing can observe the stub:
//! a 64-bit CPL3 vCPU whose special registers are the snapshot's (so its CR3 is) and whose
//! live page tables map the stub as kvmpy wrote them; no single step, stepped-over
//! breakpoint, KVM guest debugging, trap flag, queued interrupt or I/O to complete.
//! Everywhere else the run starts with `KVM_SET_XSAVE` of the same image. A run that ends
//! with the vCPU still inside the stub (a stop or timeout before it finished) gets its
//! RIP, RAX and RDX put back and the image stays pending.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress};

use crate::arch::x86_64::fpustub::{
    code_bytes, code_page, fxrstor_loads, stub_xstate_bv, xrstor_loads, FXRSTOR_ENTRY,
    IMAGE_COMPONENTS, LEAKY_ENTRY, SAVED_AT, STUB_LEN, STUB_PDPTE, STUB_PDPT_INDEX, STUB_PHYS_BITS,
    STUB_VA, VCPU_SLOTS, XRSTOR_ENTRY, XSTATE_BV_AT,
};
use crate::arch::x86_64::paging::{PRESENT, USER};
use crate::arch::x86_64::{CR0_PG, CR4_LA57, CR4_OSFXSR, EFER_LMA};
use crate::engine::error::{Error, Result};
use crate::engine::run::{Outcome, RunOptions};
use crate::engine::setup::LongMode;
use crate::engine::snapshot::cpu::VcpuState;
use crate::engine::vcpu::{VcpuCore, VcpuFdHolder};
use crate::engine::vm::{RegionOptions, VmCore};

/// CR4.OSXSAVE: XSAVE and XCR0 enabled.
const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PKE: protection keys for user pages (PKRU readable and writable at CPL3).
const CR4_PKE: u64 = 1 << 22;
/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const IMAGE_BYTES: usize = std::mem::size_of::<kvm_xsave>();

/// A vCPU's FPU state still to be put back, and the stub's bookkeeping.
#[derive(Default)]
pub struct FpuRestore {
    /// The vCPU's image page holds state the next run must load.
    pending: bool,
    /// The snapshot whose XSAVE image the image page holds.
    image_of: Option<u64>,
    /// The stub entry (`xrstor64` or `fxrstor64`) that fits the snapshot's CR4.
    entry: u64,
    /// The special registers the pending restore was checked against.
    sregs: kvm_sregs,
    /// While a run was started in the stub: the RAX, RDX and RIP it jumps back with.
    redirected: Option<[u64; 3]>,
    /// XCR0 as kvmpy last set or read it with the vCPU's XCRs.
    xcr0: Option<u64>,
}

fn xcr0_of(st: &VcpuState) -> Option<u64> {
    let n = (st.xcrs.nr_xcrs as usize).min(st.xcrs.xcrs.len());
    st.xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map(|x| x.value)
}

fn region_bytes(xsave: &kvm_xsave) -> &[u8] {
    // SAFETY: `region` is a plain `[u32; 1024]`; viewing its 4096 bytes as `u8` is valid
    // for the borrow's lifetime (u8 has no alignment or validity requirement).
    unsafe { std::slice::from_raw_parts(xsave.region.as_ptr().cast::<u8>(), IMAGE_BYTES) }
}

/// Whether the guest's physical addresses reach the stub slot (CPUID 0x80000008).
fn phys_bits_suffice(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> bool {
    cpuid
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .is_some_and(|e| e.eax & 0xff >= STUB_PHYS_BITS)
}

impl VcpuState {
    /// Notes what a snapshot or full restore told about the vCPU's XCR0.
    pub fn note_xcr0(&self, fpu: &mut FpuRestore) {
        fpu.xcr0 = xcr0_of(self);
        fpu.pending = false;
        fpu.redirected = None;
    }
}

/// The PDPT entry kvmpy's long mode tables give the stub, where the guest can address it:
/// set in `pdpt` (the PDPT page's bytes) at [`STUB_PDPT_INDEX`] if that entry is free.
pub fn map_in(vm: &VmCore, pdpt: &mut [u8]) -> Result<()> {
    let at = STUB_PDPT_INDEX * 8;
    if pdpt.len() < at + 8 || pdpt[at..at + 8] != [0; 8] {
        return Ok(());
    }
    if !phys_bits_suffice(crate::engine::kvm::supported_cpuid(&vm.kvm)?) {
        return Ok(());
    }
    if vm.stub_memory()?.is_some() {
        pdpt[at..at + 8].copy_from_slice(&STUB_PDPTE.to_le_bytes());
    }
    Ok(())
}

impl VcpuCore {
    /// For a fast restore to `st` (snapshot `snap_id`): puts the snapshot's XSAVE image in
    /// this vCPU's stub page for the next run to load. Returns false where the stub cannot
    /// be used for this snapshot (the caller puts the state back with `KVM_SET_XSAVE`).
    pub(crate) fn arm_fpu(
        &self,
        holder: &mut VcpuFdHolder,
        st: &VcpuState,
        snap_id: u64,
    ) -> Result<bool> {
        let fpu = &mut holder.fpu;
        fpu.pending = false;
        let s = &st.sregs;
        let user64 = s.cr0 & CR0_PG != 0
            && s.efer & EFER_LMA != 0
            && s.cr4 & CR4_LA57 == 0
            && s.cs.l == 1
            && s.cs.dpl == 3
            && st.regs.rflags & RFLAGS_TF == 0;
        // A PDPT entry restored from a file may point past the guest's address width.
        if !user64 || self.id >= VCPU_SLOTS || !phys_bits_suffice(&st.cpuid) {
            return Ok(false);
        }
        let image = region_bytes(&st.xsave);
        // For `xrstor64`, also the XSTATE_BV the stub's copy of the image gets.
        let (entry, xstate_bv) = if s.cr4 & CR4_OSXSAVE != 0 {
            // XRSTOR's RFBM is XCR0: the snapshot's must be the vCPU's.
            let bv = match (xcr0_of(st), fpu.xcr0) {
                (Some(want), Some(have)) if want == have => {
                    stub_xstate_bv(image, want, s.cr4 & CR4_PKE != 0)
                }
                _ => None,
            };
            match bv {
                Some(bv) => (XRSTOR_ENTRY, Some(bv)),
                None => return Ok(false),
            }
        } else if s.cr4 & CR4_OSFXSR == 0 {
            return Ok(false);
        } else if avx_without_osxsave() {
            // AVX state the guest could change anyway: `fxrstor64` would leave it.
            if !xrstor_loads(image, IMAGE_COMPONENTS) {
                return Ok(false);
            }
            (LEAKY_ENTRY, None)
        } else if fxrstor_loads(image) {
            (FXRSTOR_ENTRY, None)
        } else {
            return Ok(false);
        };
        let Some(mem) = self.vm.stub_memory()? else {
            return Ok(false);
        };
        let mem = &*mem;
        let page = code_page(self.id);
        if fpu.image_of != Some(snap_id) {
            // Written once per snapshot: a reset of the same snapshot writes nothing.
            write(mem, page, &code_bytes())?;
            write(mem, page + 0x1000, image)?;
            if let Some(bv) = xstate_bv {
                write(mem, page + 0x1000 + XSTATE_BV_AT as u64, &bv.to_le_bytes())?;
            }
            fpu.image_of = Some(snap_id);
        }
        fpu.entry = entry;
        fpu.sregs = st.sregs;
        fpu.pending = true;
        Ok(true)
    }

    /// At the start of a run: a pending FPU image is loaded by the stub (the run starts
    /// there) where nothing can see it, else with `KVM_SET_XSAVE`.
    pub(crate) fn fpu_enter(&self, holder: &mut VcpuFdHolder) -> Result<()> {
        if !holder.fpu.pending {
            return Ok(());
        }
        holder.fpu.pending = false;
        let Some(mem) = self.vm.fpu_stub.get() else {
            return Err(Error::Value(
                "an FPU image is pending without a stub".into(),
            ));
        };
        let page = code_page(self.id);
        if !self.stub_unobserved(holder)? {
            return put_image(&holder.fd, mem, page);
        }
        let mut regs = self.read_regs(&mut holder.fd)?;
        let saved = [regs.rax, regs.rdx, regs.rip];
        let bytes: Vec<u8> = saved.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(mem, page + SAVED_AT, &bytes)?;
        regs.rip = STUB_VA + page + holder.fpu.entry;
        self.write_regs(&mut holder.fd, &regs)?;
        holder.fpu.redirected = Some(saved);
        self.count_stub_load();
        Ok(())
    }

    /// At the end of a run: a vCPU stopped inside the stub gets the registers it was
    /// redirected from back, and its FPU image stays pending.
    pub(crate) fn fpu_leave(&self, holder: &mut VcpuFdHolder) {
        let Some([rax, rdx, rip]) = holder.fpu.redirected.take() else {
            return;
        };
        let Ok(mut regs) = self.read_regs(&mut holder.fd) else {
            return;
        };
        let entry = STUB_VA + code_page(self.id) + holder.fpu.entry;
        if (entry..entry + STUB_LEN).contains(&regs.rip) {
            (regs.rax, regs.rdx, regs.rip) = (rax, rdx, rip);
            if self.write_regs(&mut holder.fd, &regs).is_ok() {
                holder.fpu.pending = true;
            }
        }
    }

    /// Puts a pending FPU image back now with `KVM_SET_XSAVE` (before the host reads or
    /// writes the FPU state, or captures a snapshot).
    pub(crate) fn settle_fpu(&self, holder: &mut VcpuFdHolder) -> Result<()> {
        if !holder.fpu.pending {
            return Ok(());
        }
        holder.fpu.pending = false;
        match self.vm.fpu_stub.get() {
            Some(mem) => put_image(&holder.fd, mem, code_page(self.id)),
            None => Ok(()),
        }
    }

    /// Whether a run can start in the stub without anyone seeing it.
    fn stub_unobserved(&self, holder: &mut VcpuFdHolder) -> Result<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.debug_quiet() || self.has_queued_interrupts() || self.deferred.load(Relaxed) {
            return Ok(false);
        }
        match self.mirrored_state(&mut holder.fd) {
            Some((sregs, _)) if sregs == holder.fpu.sregs => {}
            _ => return Ok(false),
        }
        let regs = self.read_regs(&mut holder.fd)?;
        if regs.rflags & RFLAGS_TF != 0 {
            return Ok(false);
        }
        // A port write KVM still holds (left by a restore that moved RIP) is dropped at
        // entry unless RIP is back at it, when KVM skips it: the stub must not change that.
        if self.io_pending.load(Relaxed) && regs.rip == self.deferred_rip.load(Relaxed) {
            return Ok(false);
        }
        // The live tables: PML4 entry 0 user-accessible, PDPT entry 511 the stub's.
        let entry = |gpa: u64| -> Option<u64> {
            let mut b = [0u8; 8];
            self.vm.read_memory_raw(gpa, &mut b).ok()?;
            Some(u64::from_le_bytes(b))
        };
        let Some(pml4e) = entry(holder.fpu.sregs.cr3 & ADDR_MASK) else {
            return Ok(false);
        };
        if pml4e & (PRESENT | USER) != PRESENT | USER {
            return Ok(false);
        }
        Ok(entry((pml4e & ADDR_MASK) + STUB_PDPT_INDEX as u64 * 8) == Some(STUB_PDPTE))
    }
}

/// Whether this host lets CPL3 guest code use AVX and `xrstor64` while the guest's
/// CR4.OSXSAVE is clear (a nested PVM-style KVM runs user code under the host's CR4 and
/// XCR0; on hardware both raise #UD), so that `fxrstor64` would not put back all the
/// state such a guest can change. Probed once per process in a small VM of its own.
fn avx_without_osxsave() -> bool {
    static LEAKS: OnceLock<bool> = OnceLock::new();
    *LEAKS.get_or_init(|| {
        let Ok(vm) = VmCore::new(false, false) else {
            return true; // unknown: the `xrstor64` stub is right either way, if it loads
        };
        let leaks = probe_in(&vm).unwrap_or(false);
        vm.shutdown();
        leaks
    })
}

/// `mov eax, 0xff; xor edx, edx; xrstor64 [0x20000]; vextractf128 xmm1, ymm0, 1;
/// movq rax, xmm1; out 0xf4, al`, in user mode with exception stubs (a #UD ends the run
/// with RAX = 0xff).
const PROBE_CODE: [u8; 29] = [
    0xb8, 0xff, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x48, 0x0f, 0xae, 0x2c, 0x25, 0x00, 0x00, 0x02, 0x00,
    0xc4, 0xe3, 0x7d, 0x19, 0xc1, 0x01, 0x66, 0x48, 0x0f, 0x7e, 0xc8, 0xe6, 0xf4,
];
const PROBE_MARK: u64 = 0x5a5a_5a5a_5a5a_5a5a;

fn probe_in(vm: &std::sync::Arc<VmCore>) -> Result<bool> {
    vm.add_memory(0, 2 << 20, RegionOptions::default())?;
    vm.write_memory(0x10000, &PROBE_CODE)?;
    // An XSAVE image: x87 and MXCSR at reset, XSTATE_BV = x87|SSE|AVX, YMM0's upper half
    // the mark.
    let mut image = [0u8; 832];
    image[..2].copy_from_slice(&0x37fu16.to_le_bytes());
    image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    image[512] = 7;
    image[576..592].fill(0x5a);
    vm.write_memory(0x20000, &image)?;
    let cpu = vm.create_vcpu(None)?;
    cpu.setup_long_mode(LongMode::user_mode(true))?;
    cpu.with_fd(|fd| cpu.update_regs(fd, |r| r.rip = 0x10000))?;
    let options = RunOptions {
        deadline: Some(Instant::now() + Duration::from_secs(2)),
        on_signal: None,
    };
    if let Outcome::Error(e) = cpu.run(&options) {
        return Err(e);
    }
    Ok(cpu.regs()?.rax == PROBE_MARK)
}

fn write(mem: &GuestRegionMmap, offset: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, MemoryRegionAddress(offset))
        .map_err(|e| Error::Memory(format!("cannot write the FPU restore stub: {e}")))
}

/// `KVM_SET_XSAVE` of the image in the vCPU's stub page (code page `page`).
fn put_image(fd: &VcpuFd, mem: &GuestRegionMmap, page: u64) -> Result<()> {
    let mut xsave = kvm_xsave::default();
    let mut bytes = vec![0u8; IMAGE_BYTES];
    mem.read_slice(&mut bytes, MemoryRegionAddress(page + 0x1000))
        .map_err(|e| Error::Memory(format!("cannot read the FPU restore stub: {e}")))?;
    for (word, chunk) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    // SAFETY: `xsave` is a whole kvm_xsave whose region is a KVM_GET_XSAVE image a
    // snapshot held; KVM reads exactly that struct.
    unsafe { fd.set_xsave(&xsave) }.map_err(|e| Error::ioctl("KVM_SET_XSAVE", e))
}
