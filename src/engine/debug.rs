//! Guest debugging: what this host's KVM intercepts (probed once per process), adding and
//! removing breakpoints, and how the run loop turns traps into `breakpoint` and `step`
//! exits.
//!
//! Two mechanisms give the same exits:
//! - **KVM intercepts** (bare-metal KVM): `KVM_SET_GUEST_DEBUG` with `USE_SW_BP` makes an
//!   `int3` a `KVM_EXIT_DEBUG`, `SINGLESTEP` a debug exit after each instruction.
//! - **Exception stubs** (hosts whose KVM does not intercept, like nested software KVMs):
//!   the guest takes #BP/#DB through the stubs of `setup_long_mode(exceptions=True)`,
//!   which report to the host. The run loop unwinds the stub's frame (registers, RIP,
//!   RSP, RFLAGS, CS and SS as they were at the trap) so the vCPU is left exactly where
//!   KVM's interception would leave it; single steps set RFLAGS.TF.
//!
//! Stepping over a breakpoint: a run that starts where the vCPU stopped at a breakpoint
//! (or after a step, or where a restore put it) takes the patch out, steps one
//! instruction, and puts it back (gdb's way). A run that starts on a breakpoint anywhere
//! else (RIP set by hand) hits it at once.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::gdt;
use crate::engine::breakpoints::{Hit, Owner, Write, PATCH, PIO_PATCH};
use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::lock;
use crate::engine::run::{Outcome, RunOptions};
use crate::engine::setup::LongMode;
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::{RegionOptions, VmCore};

/// RFLAGS.TF: trap after the next instruction.
const TF: u64 = 1 << 8;

/// What this host's KVM intercepts, as probed in a small test VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostDebug {
    /// `int3` with `KVM_GUESTDBG_USE_SW_BP` ends `KVM_RUN` with `KVM_EXIT_DEBUG`.
    pub sw_breakpoints: bool,
    /// `KVM_GUESTDBG_SINGLESTEP` ends `KVM_RUN` after one instruction.
    pub single_step: bool,
    /// A DR0 execute breakpoint with `KVM_GUESTDBG_USE_HW_BP` ends `KVM_RUN`.
    pub hw_breakpoints: bool,
    /// A DR0 write watchpoint with `KVM_GUESTDBG_USE_HW_BP` ends `KVM_RUN`.
    pub watchpoints: bool,
}

/// How breakpoints and steps reach kvmpy on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `KVM_EXIT_DEBUG`.
    Intercept,
    /// #BP/#DB through kvmpy's exception stubs.
    ExceptionStubs,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Intercept => "kvm",
            Mechanism::ExceptionStubs => "exception-stubs",
        }
    }

    /// The mechanism for a host: KVM's only where it intercepts both `int3` and single
    /// steps (a breakpoint cannot be stepped over otherwise).
    pub fn for_host(host: &HostDebug) -> Mechanism {
        if host.sw_breakpoints && host.single_step {
            Mechanism::Intercept
        } else {
            Mechanism::ExceptionStubs
        }
    }
}

static HOST: OnceLock<std::result::Result<HostDebug, String>> = OnceLock::new();

/// What this host's KVM intercepts (probed on the first call, then cached).
pub fn host() -> Result<HostDebug> {
    HOST.get_or_init(|| probe().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Refused(format!("probing guest debugging failed: {e}")))
}

/// The environment variable that picks a mechanism instead of the probe's choice
/// (`kvm` or `exception-stubs`), so that a host that intercepts can test both paths.
pub const MECHANISM_ENV: &str = "KVMPY_DEBUG_MECHANISM";

/// The mechanism this host uses: the probe's choice, or the one `KVMPY_DEBUG_MECHANISM`
/// names (`kvm` where the host does not intercept is refused).
pub fn mechanism() -> Result<Mechanism> {
    static CHOSEN: OnceLock<std::result::Result<Mechanism, Error>> = OnceLock::new();
    let host = host()?;
    match CHOSEN.get_or_init(|| chosen(&host, std::env::var(MECHANISM_ENV).ok().as_deref())) {
        Ok(m) => Ok(*m),
        Err(Error::Unsupported(m)) => Err(Error::Unsupported(m.clone())),
        Err(e) => Err(Error::Value(e.to_string())),
    }
}

fn chosen(host: &HostDebug, wanted: Option<&str>) -> Result<Mechanism> {
    match wanted {
        None | Some("") => Ok(Mechanism::for_host(host)),
        Some("exception-stubs") => Ok(Mechanism::ExceptionStubs),
        Some("kvm") if Mechanism::for_host(host) == Mechanism::Intercept => {
            Ok(Mechanism::Intercept)
        }
        Some("kvm") => Err(Error::Unsupported(format!(
            "{MECHANISM_ENV}=kvm, but this host's KVM does not intercept int3 and single \
             steps (see `python -m kvmpy info`)"
        ))),
        Some(other) => Err(Error::Value(format!(
            "{MECHANISM_ENV} must be \"kvm\" or \"exception-stubs\", not {other:?}"
        ))),
    }
}

const PROBE_CODE: u64 = 0x10000;
const PROBE_DATA: u64 = 0x20000;

/// Runs the probe guest: each test starts fresh in 64-bit user mode with exception
/// stubs and ends with `out 0xf4, al` unless KVM stops it first.
fn probe() -> Result<HostDebug> {
    let vm = VmCore::new(false, false)?;
    let result = probe_in(&vm);
    vm.shutdown();
    result
}

fn probe_in(vm: &std::sync::Arc<VmCore>) -> Result<HostDebug> {
    vm.add_memory(0, 2 << 20, RegionOptions::default())?;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xcc, 0xe6, 0xf4, 0x90,                               // 0x00: int3; out 0xf4, al
        0x90, 0x90, 0xe6, 0xf4,                               // 0x04: nop; nop; out
        0xc6, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00, 0x01,       // 0x08: mov byte [0x20000], 1
        0x90, 0xe6, 0xf4,                                     // 0x10: nop; out
    ];
    vm.write_memory(PROBE_CODE, code)?;
    let cpu = vm.create_vcpu(None)?;
    let mode = LongMode::user_mode(true);
    let trial = |rip: u64, flags: u32, dr0: u64, dr7: u64| -> Result<Option<u32>> {
        cpu.setup_long_mode(mode)?;
        cpu.with_fd(|fd| {
            cpu.update_regs(fd, |r| r.rip = rip)?;
            set_guest_debug(fd, flags, dr0, dr7)
        })?;
        let options = RunOptions {
            deadline: Some(Instant::now() + Duration::from_secs(2)),
            on_signal: None,
        };
        let outcome = cpu.run(&options);
        cpu.with_fd(|fd| set_guest_debug(fd, 0, 0, 0))?;
        match outcome {
            Outcome::Exit(Exit::Debug { exception, .. }) => Ok(Some(exception)),
            Outcome::Error(e) => Err(e),
            _ => Ok(None),
        }
    };
    let enable = KVM_GUESTDBG_ENABLE;
    let hw = enable | KVM_GUESTDBG_USE_HW_BP;
    Ok(HostDebug {
        sw_breakpoints: trial(PROBE_CODE, enable | KVM_GUESTDBG_USE_SW_BP, 0, 0)? == Some(3),
        single_step: trial(PROBE_CODE + 4, enable | KVM_GUESTDBG_SINGLESTEP, 0, 0)? == Some(1),
        // DR7: L0, and for the watchpoint R/W0 = 01 (write), LEN0 = 00 (1 byte).
        hw_breakpoints: trial(PROBE_CODE + 4, hw, PROBE_CODE + 5, 1)? == Some(1),
        watchpoints: trial(PROBE_CODE + 8, hw, PROBE_DATA, 1 | 1 << 16)? == Some(1),
    })
}

/// `KVM_SET_GUEST_DEBUG` with DR0 and DR7 (the other debug registers zero).
fn set_guest_debug(fd: &VcpuFd, control: u32, dr0: u64, dr7: u64) -> Result<()> {
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    fd.set_guest_debug(&dbg)
        .map_err(|e| Error::ioctl("KVM_SET_GUEST_DEBUG", e))
}

/// A vCPU's debugging state between and during runs.
#[derive(Default)]
pub struct DebugState {
    /// The next run is a single step: it ends with a `step` exit after one instruction.
    pub user_step: bool,
    /// kvmpy set TF (exception stubs) or `SINGLESTEP` (KVM) for this run.
    stepping: bool,
    /// The breakpoint taken out to step over it, put back at the step's trap.
    stepping_over: Option<u64>,
    /// The guest debug flags KVM was last given.
    kvm_flags: u32,
    /// Where the vCPU stopped at a breakpoint or after a step (or was restored to): a
    /// run that starts there steps over a breakpoint at that address, as a debugger's
    /// "continue" does; a run that starts anywhere else hits it.
    pub resume_from: Option<u64>,
}

/// What the run loop does with a trap.
pub enum Trap {
    /// Not kvmpy's: the exit goes on as it came.
    Pass(Exit),
    /// Handled: re-enter the guest.
    Continue,
    /// End the run with this exit.
    Done(Exit),
}

impl VmCore {
    /// Adds `owner`'s breakpoint at guest-virtual `vaddr`, which `cpu`'s page tables
    /// translate. Fails with a clear error where this host cannot deliver breakpoints to
    /// `cpu` (no interception and no exception stubs).
    pub fn add_breakpoint(&self, cpu: &VcpuCore, vaddr: u64, owner: Owner) -> Result<()> {
        self.check_debuggable("breakpoints")?;
        let gpa = cpu.translate(vaddr)?;
        let mut table = lock(&self.breakpoints);
        let mut current = [0u8];
        self.read_memory_raw(gpa, &mut current)?;
        let write = table
            .insert(vaddr, gpa, current[0], owner, false)
            .map_err(|e| Error::Value(e.to_string()))?;
        self.apply(write)
    }

    /// Removes `owner`'s breakpoint at `vaddr`, putting the original byte back.
    pub fn remove_breakpoint(&self, vaddr: u64, owner: Owner) -> Result<()> {
        self.check_open()?;
        let mut table = lock(&self.breakpoints);
        let write = table
            .remove(vaddr, owner)
            .map_err(|e| Error::Value(e.to_string()))?;
        self.apply(write)
    }

    /// The guest-virtual addresses of `owner`'s breakpoints.
    pub fn breakpoints_of(&self, owner: Owner) -> Vec<u64> {
        lock(&self.breakpoints)
            .iter()
            .filter(|(_, e)| e.owners.contains(&owner))
            .map(|(v, _)| v)
            .collect()
    }

    /// Fails with a clear error where `what` (breakpoints, single steps) cannot reach
    /// kvmpy: the exception-stub mechanism and no exception stubs.
    pub fn check_debuggable(&self, what: &str) -> Result<()> {
        self.check_open()?;
        if mechanism()? == Mechanism::ExceptionStubs && !self.has_exception_stubs() {
            return Err(Error::Unsupported(format!(
                "{what} reach kvmpy through its exception stubs on this host (its KVM does \
                 not intercept int3 and single steps with KVM_SET_GUEST_DEBUG, or \
                 KVMPY_DEBUG_MECHANISM chose them: see `python -m kvmpy info`): set the vCPU \
                 up with setup_long_mode(exceptions=True) first"
            )));
        }
        Ok(())
    }

    fn has_exception_stubs(&self) -> bool {
        self.bus().devices().any(|d| {
            d.as_any()
                .downcast_ref::<crate::devices::exception::ExceptionDev>()
                .is_some()
        })
    }

    /// Writes a byte the table asked for. An original byte goes back only over the
    /// patch: if something else was written there since (new code loaded over a
    /// breakpoint), that stays.
    pub(crate) fn apply(&self, write: Write) -> Result<()> {
        match write {
            Write::None => Ok(()),
            Write::Byte { gpa, byte } => {
                if byte != PATCH && byte != PIO_PATCH {
                    let mut now = [0u8];
                    self.read_memory_raw(gpa, &mut now)?;
                    if now[0] != PATCH && now[0] != PIO_PATCH {
                        return Ok(());
                    }
                }
                self.write_memory(gpa, &[byte])
            }
        }
    }

    /// After a restore copied pages back: puts the patches back where the restored memory
    /// has the original byte.
    pub(crate) fn repatch_breakpoints(&self) -> Result<()> {
        let mut table = lock(&self.breakpoints);
        if table.is_empty() {
            return Ok(());
        }
        let writes = table.repatch(|gpa| {
            let mut b = [0u8];
            self.read_memory_raw(gpa, &mut b).ok().map(|_| b[0])
        });
        for gpa in writes {
            self.write_memory(gpa, &[PATCH])?;
        }
        Ok(())
    }

    /// `(gpa, original byte)` of every patch in memory now.
    pub(crate) fn breakpoint_originals(&self) -> Vec<(u64, u8)> {
        lock(&self.breakpoints).originals()
    }
}

/// Counts a coverage hit at `vaddr` (a one-shot entry also goes: the write to make).
fn count_hit(vm: &VmCore, vaddr: u64, one_shot: bool) -> Write {
    let mut table = lock(&vm.breakpoints);
    if let Some(map) = table.coverage.as_mut() {
        map.record(vaddr);
    }
    if one_shot {
        table.disarm(vaddr)
    } else {
        Write::None
    }
}

impl VcpuCore {
    /// Notes that a restore put the vCPU at `rip`: a run from there steps over a
    /// breakpoint at `rip` (see the module).
    pub(crate) fn note_restored_at(&self, rip: u64) {
        lock(&self.debug).resume_from = Some(rip);
    }

    /// Makes the next run a single step (`on`), or undoes that for a run that never began.
    pub fn request_step(&self, on: bool) {
        lock(&self.debug).user_step = on;
    }

    /// Fails with a clear error: watchpoints through the debug registers.
    pub fn add_watchpoint(&self, address: u64, len: u64, kind: &str) -> Result<()> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(Error::Value(format!(
                "a watchpoint covers 1, 2, 4 or 8 bytes (the debug registers' lengths), not {len}"
            )));
        }
        if address % len != 0 {
            return Err(Error::Value(format!(
                "a {len}-byte watchpoint must be aligned to {len} bytes, not at {address:#x}"
            )));
        }
        if !matches!(kind, "write" | "rw") {
            return Err(Error::Value(format!(
                "a watchpoint's kind is \"write\" or \"rw\", not {kind:?}"
            )));
        }
        let host = host()?;
        Err(Error::Unsupported(if host.watchpoints {
            "watchpoints are not implemented yet".into()
        } else {
            "this host's KVM does not deliver debug-register watchpoints (a DR7 write \
             watchpoint did not fire in the probe guest: see `python -m kvmpy info`), and \
             kvmpy has no other way to watch memory"
                .into()
        }))
    }

    /// Before a run: steps over a breakpoint at RIP, sets up a single step, and gives KVM
    /// the guest debug flags the run needs.
    pub(crate) fn debug_enter(&self, fd: &mut VcpuFd) -> Result<()> {
        let mut st = lock(&self.debug);
        let table_empty = lock(&self.vm.breakpoints).is_empty();
        if table_empty && !st.user_step && st.kvm_flags == 0 {
            st.resume_from = None;
            return Ok(());
        }
        let mechanism = mechanism()?;
        let rip = self.read_regs(fd)?.rip;
        let mut step = st.user_step;
        let resuming = st.resume_from.take() == Some(rip);
        // A coverage block at RIP is hit, not stepped over: its hit counts.
        let ours = matches!(
            lock(&self.vm.breakpoints).hit(rip, self.id),
            Hit::Report | Hit::Pass
        );
        if !table_empty && resuming && ours {
            let write = lock(&self.vm.breakpoints).disarm(rip);
            if write != Write::None {
                self.vm.apply(write)?;
                st.stepping_over = Some(rip);
                step = true;
            }
        }
        st.stepping = step;
        match mechanism {
            Mechanism::ExceptionStubs => {
                if step {
                    self.update_regs(fd, |r| r.rflags |= TF)?;
                }
            }
            Mechanism::Intercept => {
                let flags = if table_empty && !step {
                    0
                } else {
                    KVM_GUESTDBG_ENABLE
                        | if table_empty {
                            0
                        } else {
                            KVM_GUESTDBG_USE_SW_BP
                        }
                        | if step { KVM_GUESTDBG_SINGLESTEP } else { 0 }
                };
                if flags != st.kvm_flags {
                    set_guest_debug(fd, flags, 0, 0)?;
                    st.kvm_flags = flags;
                }
            }
        }
        Ok(())
    }

    /// After a run, however it ended: the breakpoint being stepped over goes back, and TF
    /// (or KVM's single step) is cleared.
    pub(crate) fn debug_leave(&self, fd: &mut VcpuFd) {
        let mut st = lock(&self.debug);
        st.user_step = false;
        if let Some(addr) = st.stepping_over.take() {
            let write = lock(&self.vm.breakpoints).rearm(addr);
            let _ = self.vm.apply(write);
        }
        if std::mem::take(&mut st.stepping) {
            if st.kvm_flags & KVM_GUESTDBG_SINGLESTEP != 0 {
                let flags = st.kvm_flags & !KVM_GUESTDBG_SINGLESTEP;
                if set_guest_debug(fd, flags, 0, 0).is_ok() {
                    st.kvm_flags = flags;
                }
            } else {
                let _ = self.update_regs(fd, |r| r.rflags &= !TF);
            }
        }
    }

    /// A `KVM_EXIT_DEBUG` (KVM intercepts): `exception` 3 at `pc` or a single step (1).
    pub(crate) fn debug_exit(&self, fd: &mut VcpuFd, exit: Exit) -> Result<Trap> {
        let Exit::Debug { exception, pc, .. } = exit else {
            return Ok(Trap::Pass(exit));
        };
        let mut st = lock(&self.debug);
        match exception {
            3 => {
                let hit = lock(&self.vm.breakpoints).hit(pc, self.id);
                match hit {
                    Hit::NotOurs => {
                        // The guest's own int3: KVM gives it back to the guest (as a
                        // software exception, RIP after the int3) on the next entry.
                        let flags = st.kvm_flags | KVM_GUESTDBG_INJECT_BP;
                        set_guest_debug(fd, flags, 0, 0)?;
                        set_guest_debug(fd, st.kvm_flags, 0, 0)?;
                        Ok(Trap::Continue)
                    }
                    Hit::Report => {
                        st.resume_from = Some(pc);
                        Ok(Trap::Done(Exit::Breakpoint { address: pc }))
                    }
                    Hit::OneShot => {
                        let write = count_hit(&self.vm, pc, true);
                        self.vm.apply(write)?;
                        Ok(Trap::Continue)
                    }
                    Hit::Count => {
                        count_hit(&self.vm, pc, false);
                        self.step_over_locked(fd, &mut st, pc)?;
                        Ok(Trap::Continue)
                    }
                    Hit::Pass => {
                        self.step_over_locked(fd, &mut st, pc)?;
                        Ok(Trap::Continue)
                    }
                }
            }
            1 if st.stepping => {
                let rip = self.read_regs(fd)?.rip;
                self.end_step(fd, &mut st)?;
                let flags = st.kvm_flags & !KVM_GUESTDBG_SINGLESTEP;
                set_guest_debug(fd, flags, 0, 0)?;
                st.kvm_flags = flags;
                Ok(self.after_step(&mut st, rip))
            }
            _ => Ok(Trap::Pass(exit)),
        }
    }

    /// An `"exception"` exit of the stubs (KVM does not intercept): #BP at a breakpoint
    /// or the #DB of a step kvmpy asked for becomes a breakpoint or step.
    pub(crate) fn stub_trap(&self, fd: &mut VcpuFd, exit: Exit) -> Result<Trap> {
        let Exit::Exception { vector, rip, .. } = exit else {
            return Ok(Trap::Pass(exit));
        };
        let mut st = lock(&self.debug);
        let hit = match vector {
            3 => lock(&self.vm.breakpoints).hit(rip.wrapping_sub(1), self.id),
            1 if st.stepping => Hit::Report,
            _ => Hit::NotOurs,
        };
        if hit == Hit::NotOurs {
            if st.stepping && vector != 1 {
                // Another exception during a step: its stub returns to the guest with the
                // RFLAGS the CPU saved, TF included; take kvmpy's TF out of that frame.
                self.clear_frame_tf(fd)?;
            }
            return Ok(Trap::Pass(exit));
        }
        // The stub's report port write is done with: complete it, then leave the stub.
        self.complete_io(fd);
        if vector == 1 {
            let rip = self.unwind_stub(fd, None)?;
            self.end_step(fd, &mut st)?;
            return Ok(self.after_step(&mut st, rip));
        }
        let addr = rip.wrapping_sub(1);
        self.unwind_stub(fd, Some(addr))?;
        match hit {
            Hit::Report => {
                st.resume_from = Some(addr);
                Ok(Trap::Done(Exit::Breakpoint { address: addr }))
            }
            Hit::OneShot => {
                let write = count_hit(&self.vm, addr, true);
                self.vm.apply(write)?;
                Ok(Trap::Continue)
            }
            _ => {
                if hit == Hit::Count {
                    count_hit(&self.vm, addr, false);
                }
                self.step_over_locked(fd, &mut st, addr)?;
                Ok(Trap::Continue)
            }
        }
    }

    /// Runs on from a breakpoint at `addr` mid-run (a handler let the guest go on): if
    /// RIP is still there and the patch is in, takes it out for one single step.
    pub(crate) fn step_over(&self, fd: &mut VcpuFd, addr: u64) -> Result<()> {
        if self.read_regs(fd)?.rip != addr {
            return Ok(());
        }
        let mut st = lock(&self.debug);
        st.resume_from = None;
        self.step_over_locked(fd, &mut st, addr)
    }

    fn step_over_locked(&self, fd: &mut VcpuFd, st: &mut DebugState, addr: u64) -> Result<()> {
        let write = lock(&self.vm.breakpoints).disarm(addr);
        if write == Write::None {
            return Ok(());
        }
        self.vm.apply(write)?;
        st.stepping_over = Some(addr);
        st.stepping = true;
        match mechanism()? {
            Mechanism::ExceptionStubs => self.update_regs(fd, |r| r.rflags |= TF),
            Mechanism::Intercept => {
                let flags = st.kvm_flags | KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
                set_guest_debug(fd, flags, 0, 0)?;
                st.kvm_flags = flags;
                Ok(())
            }
        }
    }

    /// Clears TF in the interrupt frame of the exception stub the vCPU is in.
    fn clear_frame_tf(&self, fd: &mut VcpuFd) -> Result<()> {
        // rdx, rax, vector, error code, rip, cs, then rflags (see `unwind_stub`).
        let at = self.read_regs(fd)?.rsp + 6 * 8;
        let mut rflags = [0u8; 8];
        self.vm.read_memory_raw(at, &mut rflags)?;
        let value = u64::from_le_bytes(rflags) & !TF;
        self.vm.write_memory(at, &value.to_le_bytes())
    }

    /// The step is over: the breakpoint stepped over goes back, TF is cleared.
    fn end_step(&self, fd: &mut VcpuFd, st: &mut DebugState) -> Result<()> {
        st.stepping = false;
        if let Some(addr) = st.stepping_over.take() {
            let write = lock(&self.vm.breakpoints).rearm(addr);
            self.vm.apply(write)?;
        }
        if st.kvm_flags == 0 {
            self.update_regs(fd, |r| r.rflags &= !TF)?;
        }
        Ok(())
    }

    fn after_step(&self, st: &mut DebugState, rip: u64) -> Trap {
        if std::mem::take(&mut st.user_step) {
            st.resume_from = Some(rip);
            Trap::Done(Exit::Step { rip })
        } else {
            Trap::Continue
        }
    }

    /// Leaves the exception stub the vCPU is in, as if the trap had not been taken: the
    /// registers the stub saved, RIP (`rip`, or the interrupted one), RSP, RFLAGS (TF
    /// cleared), CS and SS from its interrupt frame. Returns the new RIP.
    fn unwind_stub(&self, fd: &mut VcpuFd, rip: Option<u64>) -> Result<u64> {
        let mut regs = self.read_regs(fd)?;
        // The stub's stack (identity-mapped): rdx, rax, vector, error code, then the
        // interrupt frame: rip, cs, rflags, rsp, ss.
        let mut frame = [0u8; 72];
        self.vm.read_memory_raw(regs.rsp, &mut frame)?;
        let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap());
        regs.rdx = word(0);
        regs.rax = word(1);
        regs.rip = rip.unwrap_or(word(4));
        regs.rflags = word(6) & !TF;
        regs.rsp = word(7);
        let (cs, ss) = (word(5) as u16, word(8) as u16);
        let table = gdt::table(0);
        let descriptor = |sel: u16| table.get(usize::from(sel >> 3)).copied();
        let (Some(cs_entry), Some(ss_entry)) = (descriptor(cs), descriptor(ss)) else {
            return Err(Error::Value(format!(
                "the exception stub's frame has selectors cs={cs:#x} ss={ss:#x} outside \
                 kvmpy's GDT"
            )));
        };
        let mut sregs = fd
            .get_sregs()
            .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
        sregs.cs = gdt::segment(cs_entry, cs);
        sregs.ss = gdt::segment(ss_entry, ss);
        self.write_sregs(fd, &sregs)?;
        self.write_regs(fd, &regs)?;
        Ok(regs.rip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_used_only_where_it_intercepts_both_int3_and_steps() {
        let all = HostDebug {
            sw_breakpoints: true,
            single_step: true,
            hw_breakpoints: true,
            watchpoints: true,
        };
        assert_eq!(Mechanism::for_host(&all), Mechanism::Intercept);
        let no_step = HostDebug {
            single_step: false,
            ..all
        };
        assert_eq!(Mechanism::for_host(&no_step), Mechanism::ExceptionStubs);
        assert_eq!(
            Mechanism::for_host(&HostDebug::default()),
            Mechanism::ExceptionStubs
        );
        assert_eq!(Mechanism::ExceptionStubs.as_str(), "exception-stubs");
        let none = HostDebug::default();
        assert_eq!(chosen(&all, None).unwrap(), Mechanism::Intercept);
        assert_eq!(
            chosen(&all, Some("exception-stubs")).unwrap(),
            Mechanism::ExceptionStubs
        );
        assert_eq!(chosen(&all, Some("kvm")).unwrap(), Mechanism::Intercept);
        assert!(matches!(
            chosen(&none, Some("kvm")),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(chosen(&none, Some("gdb")), Err(Error::Value(_))));
    }
}
