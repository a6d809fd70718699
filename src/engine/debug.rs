//! Guest debugging: adding and removing breakpoints, and how the run loop turns traps
//! into `breakpoint` and `step` exits (what this host's KVM intercepts is probed in
//! `debug_host`, re-exported here).
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

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP,
};
use std::sync::atomic::Ordering;

use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::gdt;
use crate::engine::breakpoints::{Audience, Breakpoints, Hit, Owner, Write, PATCH, PIO_PATCH};
use crate::engine::debug_host::block_irq;
use crate::engine::debug_host::set_guest_debug_regs;
pub use crate::engine::debug_host::{host, mechanism, HostDebug, Mechanism, MECHANISM_ENV};
use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::hw_breakpoints;
use crate::engine::lock;
use crate::engine::vcpu::{VcpuCore, NO_STEP, STEP_ARMED};
use crate::engine::vm::VmCore;
use crate::engine::watch::Watch;
pub use crate::engine::watch_vcpu::watch_mechanism;

/// `outsb`: a one-byte port write like [`PIO_PATCH`], with another effect.
const OUTSB: u8 = 0x6e;

/// RFLAGS.TF: trap after the next instruction.
const TF: u64 = 1 << 8;

/// A vCPU's debugging state between and during runs.
#[derive(Default)]
pub struct DebugState {
    /// The next run is a single step: it ends with a `step` exit after one instruction.
    pub user_step: bool,
    /// kvmpy set TF (exception stubs) or `SINGLESTEP` (KVM) for this run.
    stepping: bool,
    /// The breakpoint taken out to step over it, put back at the step's trap.
    stepping_over: Option<u64>,
    /// This vCPU holds the VM's step gate: the other vCPUs wait outside the guest until
    /// the breakpoint stepped over is back (see `allstop`).
    holds_gate: bool,
    /// The guest debug flags KVM was last given.
    kvm_flags: u32,
    /// Where the vCPU stopped at a breakpoint or after a step (or was restored to): a
    /// run that starts there steps over a breakpoint at that address, as a debugger's
    /// "continue" does; a run that starts anywhere else hits it.
    pub resume_from: Option<u64>,
    /// The debug registers KVM was last given (DR7 at index 7; all zero: none).
    pub(crate) dr: [u64; 8],
    /// The watchpoints in DR0-DR3 for this run and their values at entry.
    pub(crate) armed: Vec<(Watch, u64)>,
    /// The hardware breakpoints in the debug registers after the watchpoints.
    pub(crate) execs: Vec<u64>,
}

/// What the run loop does with a trap.
pub enum Trap {
    /// Not kvmpy's: the exit goes on as it came.
    Pass(Exit),
    /// Handled: re-enter the guest.
    Continue,
    /// End the run with this exit.
    Done(Exit),
    /// A breakpoint hit, for whom it was set at the trap: Python's handler, gdb, or both
    /// (run.rs calls the handler, or ends the run with a `breakpoint` exit).
    Breakpoint { address: u64, seen: Audience },
}

impl VmCore {
    /// Adds `owner`'s breakpoint at guest-virtual `vaddr`, which `cpu`'s page tables
    /// translate. Fails with a clear error where this host cannot deliver breakpoints to
    /// `cpu` (no interception and no exception stubs).
    pub fn add_breakpoint(&self, cpu: &VcpuCore, vaddr: u64, owner: Owner) -> Result<()> {
        self.check_debuggable("breakpoints")?;
        let gpa = cpu.translate(vaddr)?;
        let patch = breakpoint_patch(cpu)?;
        let mut table = lock(&self.breakpoints);
        let mut current = [0u8];
        self.read_memory_raw(gpa, &mut current)?;
        if patch == PIO_PATCH && current[0] == OUTSB {
            return Err(Error::Unsupported(format!(
                "a breakpoint at {vaddr:#x}, on `outsb`: with this host's patch (port-io, an \
                 `out dx, al` byte) a port write there could be the breakpoint or the \
                 instruction itself once the breakpoint is removed; use the int3 patch \
                 ({}=exception-stubs, with setup_long_mode(exceptions=True))",
                crate::engine::coverage::PATCH_ENV
            )));
        }
        let write = table
            .insert_patch(vaddr, gpa, current[0], owner, false, patch)
            .map_err(|e| Error::Value(e.to_string()))?;
        self.apply(&table, write)
    }

    /// Removes `owner`'s breakpoint at `vaddr`, putting the original byte back (or its
    /// hardware breakpoint there).
    pub fn remove_breakpoint(&self, vaddr: u64, owner: Owner) -> Result<()> {
        self.check_open()?;
        let mut table = lock(&self.breakpoints);
        let write = match table.remove(vaddr, owner) {
            Err(_) if self.remove_hw_breakpoint(vaddr, owner) => return Ok(()),
            other => other.map_err(|e| Error::Value(e.to_string()))?,
        };
        self.apply(&table, write)
    }

    /// The guest-virtual addresses of `owner`'s breakpoints, patched and hardware.
    pub fn breakpoints_of(&self, owner: Owner) -> Vec<u64> {
        let mut out: Vec<u64> = lock(&self.breakpoints)
            .iter()
            .filter(|(_, e)| e.owners.contains(&owner))
            .map(|(v, _)| v)
            .chain(self.hw_breakpoints_of(owner))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
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
    /// breakpoint), that stays. `_table` is the table the write came from, still locked:
    /// a table change and its write are one step, so that two threads changing the same
    /// entry (a removal, a step over it) leave memory as the table says.
    pub(crate) fn apply(&self, _table: &Breakpoints, write: Write) -> Result<()> {
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
        for (gpa, patch) in writes {
            self.write_memory(gpa, &[patch])?;
        }
        Ok(())
    }

    /// `(gpa, original byte)` of every patch in memory now.
    pub(crate) fn breakpoint_originals(&self) -> Vec<(u64, u8)> {
        lock(&self.breakpoints).originals()
    }
}

/// The byte a debugger breakpoint for `cpu` patches in: `int3`, or where KVM does not
/// intercept it and `cpu` may do port I/O (CPL <= IOPL: kvmpy's user mode, ring 0), the
/// one-byte `out dx, al` (see `coverage`), whose exit skips the ring-0 stubs; if the code
/// later runs where port I/O faults, the #GP is taken as the breakpoint.
fn breakpoint_patch(cpu: &VcpuCore) -> Result<u8> {
    let debug = mechanism()?;
    let sregs = cpu.sregs()?;
    let cpl = if sregs.cr0 & 1 == 0 {
        0
    } else {
        (sregs.cs.selector & 3) as u8
    };
    let iopl = ((cpu.regs()?.rflags >> 12) & 3) as u8;
    let wanted = std::env::var(crate::engine::coverage::PATCH_ENV).ok();
    Ok(crate::engine::coverage::Mechanism::pick(debug, cpl, iopl, wanted.as_deref())?.patch())
}

/// Counts a coverage hit at `vaddr` (a one-shot entry also goes, from memory too).
fn count_hit(vm: &VmCore, vaddr: u64, one_shot: bool) -> Result<()> {
    let mut table = lock(&vm.breakpoints);
    if let Some(map) = table.coverage.as_mut() {
        map.record(vaddr);
    }
    if one_shot {
        let write = table.disarm(vaddr);
        vm.apply(&table, write)?;
    }
    Ok(())
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

    /// Before a run: steps over a breakpoint at RIP, sets up a single step, and gives KVM
    /// the guest debug flags the run needs.
    /// Whether this run neither steps nor has KVM guest debugging on (decided by
    /// `debug_enter`): nothing reports an instruction before the first one the guest runs.
    pub(crate) fn debug_quiet(&self) -> bool {
        let st = lock(&self.debug);
        !st.stepping && st.kvm_flags == 0
    }

    pub(crate) fn debug_enter(&self, fd: &mut VcpuFd) -> Result<()> {
        let mut st = lock(&self.debug);
        self.purge_removed_breakpoints();
        let table_empty = lock(&self.vm.breakpoints).is_empty();
        let dr_changed = self.arm_debug_registers(&mut st)?;
        self.resume_past_hw_breakpoint(fd, &st)?;
        if table_empty && !st.user_step && st.kvm_flags == 0 && !dr_changed {
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
            Hit::Report(_) | Hit::Pass
        );
        if !table_empty && resuming && ours {
            if self.take_out(&mut st, rip)? {
                step = true;
            } else if lock(&self.vm.breakpoints)
                .get(rip)
                .is_some_and(|e| !e.retired)
            {
                // A stop came first (see `take_out`): this run ends before the guest
                // runs, and the next one steps over it.
                st.resume_from = Some(rip);
            }
        }
        st.stepping = step;
        match mechanism {
            Mechanism::ExceptionStubs => {
                if step {
                    self.update_regs(fd, |r| r.rflags |= TF)?;
                    self.tf_step.store(STEP_ARMED, Ordering::Relaxed);
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
                        | if step {
                            KVM_GUESTDBG_SINGLESTEP | block_irq()
                        } else {
                            0
                        }
                };
                if flags != st.kvm_flags || dr_changed {
                    set_guest_debug_regs(fd, flags, &st.dr)?;
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
        if let Some(addr) = st.stepping_over {
            // The run ended before the step over the breakpoint ran (a stop before the
            // guest was entered): the vCPU is still at the breakpoint it reported.
            if self.read_regs(fd).is_ok_and(|r| r.rip == addr) {
                st.resume_from = Some(addr);
            }
        }
        let _ = self.put_back(&mut st);
        self.tf_step.store(NO_STEP, Ordering::Relaxed);
        if std::mem::take(&mut st.stepping) {
            if st.kvm_flags & KVM_GUESTDBG_SINGLESTEP != 0 {
                let flags = st.kvm_flags & !(KVM_GUESTDBG_SINGLESTEP | block_irq());
                if set_guest_debug_regs(fd, flags, &st.dr).is_ok() {
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
        if exception == 1 && st.dr[7] != 0 {
            let Exit::Debug { dr6, .. } = exit else {
                unreachable!("matched above")
            };
            if let Some(address) = hw_breakpoints::exec_hit(dr6, st.armed.len(), &st.execs) {
                st.resume_from = Some(address);
                let seen = self.vm.hw_audience(address, self.id);
                return Ok(Trap::Breakpoint { address, seen });
            }
            let found = crate::engine::debug_regs::hit(dr6, &st.armed, |w| {
                let mut b = [0u8; 8];
                self.vm.read_memory_raw(w.gpa, &mut b[..w.len as usize])?;
                Ok(u64::from_le_bytes(b))
            })?;
            if let Some(hit) = found {
                let rip = self.read_regs(fd)?.rip;
                return Ok(Trap::Done(Exit::Watchpoint(Box::new(hit), rip)));
            }
        }
        match exception {
            3 => {
                let hit = lock(&self.vm.breakpoints).hit(pc, self.id);
                match hit {
                    Hit::NotOurs => {
                        // The guest's own int3: KVM gives it back to the guest (as a
                        // software exception, RIP after the int3) on the next entry.
                        let flags = st.kvm_flags | KVM_GUESTDBG_INJECT_BP;
                        set_guest_debug_regs(fd, flags, &st.dr)?;
                        set_guest_debug_regs(fd, st.kvm_flags, &st.dr)?;
                        Ok(Trap::Continue)
                    }
                    Hit::Report(seen) => {
                        st.resume_from = Some(pc);
                        Ok(self.breakpoint_trap(pc, seen))
                    }
                    // Removed since: RIP is at it, the original is back.
                    Hit::Stale => Ok(Trap::Continue),
                    Hit::OneShot => {
                        count_hit(&self.vm, pc, true)?;
                        Ok(Trap::Continue)
                    }
                    Hit::Count => {
                        count_hit(&self.vm, pc, false)?;
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
                let flags = st.kvm_flags & !(KVM_GUESTDBG_SINGLESTEP | block_irq());
                set_guest_debug_regs(fd, flags, &st.dr)?;
                st.kvm_flags = flags;
                Ok(self.after_step(&mut st, rip))
            }
            _ => Ok(Trap::Pass(exit)),
        }
    }

    /// An `"exception"` exit of the stubs (KVM does not intercept): #BP at a breakpoint,
    /// #GP at a port-I/O patch, or the #DB of a step kvmpy asked for becomes a breakpoint
    /// or step.
    pub(crate) fn stub_trap(&self, fd: &mut VcpuFd, exit: Exit) -> Result<Trap> {
        let Exit::Exception { vector, rip, .. } = exit else {
            return Ok(Trap::Pass(exit));
        };
        let mut st = lock(&self.debug);
        // Where the breakpoint is: before the int3, or at an `out dx, al` patch that
        // faulted (#GP: code that may not do port I/O reached it).
        let addr = if vector == 3 {
            rip.wrapping_sub(1)
        } else {
            rip
        };
        let hit = match vector {
            3 => lock(&self.vm.breakpoints).hit(addr, self.id),
            1 if st.stepping => Hit::Report(Audience::default()),
            13 if lock(&self.vm.breakpoints).pio_at(addr) => {
                lock(&self.vm.breakpoints).hit(addr, self.id)
            }
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
        self.unwind_stub(fd, Some(addr))?;
        match hit {
            Hit::Report(seen) => {
                st.resume_from = Some(addr);
                Ok(self.breakpoint_trap(addr, seen))
            }
            Hit::OneShot => {
                count_hit(&self.vm, addr, true)?;
                Ok(Trap::Continue)
            }
            Hit::Stale => Ok(Trap::Continue),
            _ => {
                if hit == Hit::Count {
                    count_hit(&self.vm, addr, false)?;
                }
                self.step_over_locked(fd, &mut st, addr)?;
                Ok(Trap::Continue)
            }
        }
    }

    /// The trap of a patched breakpoint at `address` that `seen` set, reported to a
    /// hardware breakpoint's owners there too.
    pub(crate) fn breakpoint_trap(&self, address: u64, seen: Audience) -> Trap {
        let seen = seen.or(self.vm.hw_audience(address, self.id));
        Trap::Breakpoint { address, seen }
    }

    /// Runs on from a breakpoint at `addr` mid-run (a handler let the guest go on): if
    /// RIP is still there and the patch is in, takes it out for one single step.
    pub(crate) fn step_over(&self, fd: &mut VcpuFd, addr: u64) -> Result<()> {
        if self.read_regs(fd)?.rip != addr {
            return Ok(());
        }
        let mut st = lock(&self.debug);
        st.resume_from = None;
        if st.execs.contains(&addr) {
            // A hardware breakpoint there: RF lets the instruction run once.
            self.update_regs(fd, |r| r.rflags |= hw_breakpoints::RF)?;
        }
        if !self.step_over_locked(fd, &mut st, addr)?
            && lock(&self.vm.breakpoints)
                .get(addr)
                .is_some_and(|e| !e.retired)
        {
            // The breakpoint is still there, and a stop came while the step waited for
            // the other vCPUs: the vCPU is still at the breakpoint it reported, so the
            // next run steps over it instead of reporting it again.
            st.resume_from = Some(addr);
        }
        Ok(())
    }

    /// Starts a step over the breakpoint at `addr`; false where none started (no patch
    /// there to take out, or a stop came first).
    fn step_over_locked(&self, fd: &mut VcpuFd, st: &mut DebugState, addr: u64) -> Result<bool> {
        if !self.take_out(st, addr)? {
            return Ok(false);
        }
        st.stepping = true;
        match mechanism()? {
            Mechanism::ExceptionStubs => {
                self.tf_step.store(STEP_ARMED, Ordering::Relaxed);
                self.update_regs(fd, |r| r.rflags |= TF)?;
            }
            Mechanism::Intercept => {
                let flags =
                    st.kvm_flags | KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | block_irq();
                set_guest_debug_regs(fd, flags, &st.dr)?;
                st.kvm_flags = flags;
            }
        }
        Ok(true)
    }

    /// A device handled an access (port I/O, MMIO, HLT) while kvmpy single-steps with TF:
    /// completes it and, where the host did not queue the #DB the instruction's completion
    /// owes, ends the step there. KVM queues it when it completes the instruction; the
    /// nested software KVMs kvmpy runs on drop it for instructions whose access userspace
    /// completes, and the step would end one instruction late. `None`: the access is
    /// completed, the run goes on (the #DB is queued, or TF is not set: the vCPU is in an
    /// exception handler, which runs with TF clear).
    pub(crate) fn step_after_access(&self, fd: &mut VcpuFd) -> Result<Option<Trap>> {
        self.complete_io(fd);
        let regs = self.read_regs(fd)?;
        if regs.rflags & TF == 0 {
            return Ok(None);
        }
        let events = fd
            .get_vcpu_events()
            .map_err(|e| Error::ioctl("KVM_GET_VCPU_EVENTS", e))?;
        let e = events.exception;
        if e.nr == 1 && (e.injected != 0 || e.pending != 0) {
            return Ok(None);
        }
        let mut st = lock(&self.debug);
        if !st.stepping {
            return Ok(None);
        }
        self.end_step(fd, &mut st)?;
        Ok(Some(self.after_step(&mut st, regs.rip)))
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

    /// Takes the breakpoint at `addr` out of memory to step over it, the other vCPUs
    /// held outside the guest first (see `allstop`). False if there is no patch there, or
    /// a stop request or closed VM ended the wait for the others.
    fn take_out(&self, st: &mut DebugState, addr: u64) -> Result<bool> {
        if lock(&self.vm.breakpoints).get(addr).is_none() {
            return Ok(false);
        }
        if !st.holds_gate {
            match self.stop_others() {
                Some(took) => st.holds_gate = took,
                // A stop or a closed VM came first: no patch goes out while the others
                // may run past it (the run ends before any step).
                None => return Ok(false),
            }
        }
        let applied = {
            let mut table = lock(&self.vm.breakpoints);
            let write = table.step_out(addr, self.id);
            if write == Write::None {
                drop(table);
                self.open_gate(st);
                return Ok(false);
            }
            st.stepping_over = Some(addr);
            self.vm.apply(&table, write)
        };
        if let Err(e) = applied {
            self.put_back(st)?;
            return Err(e);
        }
        Ok(true)
    }

    /// Puts the breakpoint stepped over back, then lets the other vCPUs run again.
    fn put_back(&self, st: &mut DebugState) -> Result<()> {
        let result = match st.stepping_over.take() {
            Some(addr) => {
                let mut table = lock(&self.vm.breakpoints);
                let write = table.rearm(addr);
                self.vm.apply(&table, write)
            }
            None => Ok(()),
        };
        self.open_gate(st);
        result
    }

    fn open_gate(&self, st: &mut DebugState) {
        if std::mem::take(&mut st.holds_gate) {
            self.resume_others();
        }
    }

    /// The step is over: the breakpoint stepped over goes back, TF is cleared.
    fn end_step(&self, fd: &mut VcpuFd, st: &mut DebugState) -> Result<()> {
        st.stepping = false;
        self.tf_step.store(NO_STEP, Ordering::Relaxed);
        self.put_back(st)?;
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
