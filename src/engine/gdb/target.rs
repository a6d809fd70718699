//! The VM as a `gdbstub` target: each vCPU a thread (thread id = vCPU id + 1), registers
//! through KVM, memory by guest-virtual address through the vCPU's page tables,
//! software breakpoints in the VM's breakpoint table. A `continue` runs the vCPUs as a run
//! group that stops as soon as one vCPU stops (gdb's all-stop mode); steps, and every
//! resume under a watchpoint, are single steps on the stub's own thread.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use crate::engine::breakpoints::Owner;
use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::gdb::conn::{Explain, GdbConn};
use crate::engine::gdb::regs;
use crate::engine::gdb::watch::{Watches, MAX_LEN};
use crate::engine::run::{Outcome, RunOptions};
use crate::engine::runner::RunGroup;
use crate::engine::vcpu::Last;
use crate::engine::{VcpuCore, VmCore};

/// How often a running target looks at the connection for gdb's Ctrl-C (it wakes at once
/// when a vCPU stops).
const POLL: Duration = Duration::from_millis(20);

/// EFAULT: what gdb hears when memory cannot be read or written.
const EFAULT: u8 = 14;

/// What gdb asked a vCPU to do at the next resume.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue,
    Step,
}

/// How long a single step on the stub's thread may take before the stub looks at the
/// connection (an instruction that waits: `hlt`, a handler that blocks) and tries again.
const STEP_SLICE: Duration = Duration::from_millis(100);

/// A resume by single steps on the stub's thread (gdb's steps, and every resume under
/// watchpoints): its vCPUs take turns.
struct Watching {
    vcpus: Vec<Arc<VcpuCore>>,
    /// gdb asked for one step (of each vCPU), not a continue.
    single: bool,
    /// Steps taken: the next vCPU is `vcpus[taken % len]`.
    taken: usize,
    /// The VM-wide breakpoints (gdb's among them): a step that lands on one stops there.
    stops: BTreeSet<u64>,
}

/// A VM under gdb's control.
pub struct VmTarget {
    vm: Arc<VmCore>,
    actions: BTreeMap<u64, Action>,
    /// gdb's scheduler locking: only the vCPUs with an action run.
    locked: bool,
    running: Option<Arc<RunGroup>>,
    /// The addresses of the breakpoints gdb added to the VM's table.
    breakpoints: BTreeSet<u64>,
    /// The addresses of gdb's hardware breakpoints (`hbreak`).
    hw_breakpoints: BTreeSet<u64>,
    /// gdb's write watchpoints that single steps check (those the engine cannot watch).
    watches: Watches,
    /// gdb's watchpoints set in the VM's table (`engine::watch`): address, length.
    page_watches: Vec<(u64, u64)>,
    /// A resume that steps instruction by instruction (see [`Watching`]).
    watching: Option<Watching>,
    /// A step ran out of its slice: look at the connection before the next.
    poll_now: bool,
    /// The first error a run ended with (a handler's exception), for whoever started the
    /// session.
    pub error: Option<Error>,
    /// Why a request was refused, for gdb to print (see `conn`).
    pub explain: Explain,
}

fn tid_of(id: u64) -> Tid {
    NonZeroUsize::new(id as usize + 1).unwrap_or(NonZeroUsize::MIN)
}

/// The signal gdb is told for an exit that is neither a breakpoint nor a step.
fn signal_for(exit: &Exit) -> Signal {
    match exit {
        Exit::Exception { vector: 0, .. } => Signal::SIGFPE,
        Exit::Exception { vector: 6, .. } => Signal::SIGILL,
        Exit::Exception {
            vector: 13 | 14, ..
        } => Signal::SIGSEGV,
        Exit::Exception { vector: 1 | 3, .. } => Signal::SIGTRAP,
        Exit::Exception { .. } => Signal::SIGBUS,
        Exit::Shutdown => Signal::SIGSEGV,
        Exit::InternalError { .. } | Exit::FailEntry { .. } => Signal::SIGILL,
        Exit::Timeout => Signal::SIGALRM,
        Exit::Stopped => Signal::SIGINT,
        _ => Signal::SIGTRAP,
    }
}

/// What gdb is told when vCPU `tid`'s run ended with `exit`.
pub fn stop_reason(tid: Tid, exit: &Exit) -> MultiThreadStopReason<u64> {
    match exit {
        Exit::Breakpoint { .. } => MultiThreadStopReason::SwBreak(tid),
        Exit::Watchpoint(hit, _) => MultiThreadStopReason::Watch {
            tid,
            kind: match hit.watch.kind {
                crate::engine::watch::WatchKind::Write => WatchKind::Write,
                crate::engine::watch::WatchKind::Read => WatchKind::Read,
                crate::engine::watch::WatchKind::ReadWrite => WatchKind::ReadWrite,
            },
            addr: hit.watch.vaddr,
        },
        Exit::Guest { code, .. } => MultiThreadStopReason::Exited(*code as u8),
        other => MultiThreadStopReason::SignalWithThread {
            tid,
            signal: signal_for(other),
        },
    }
}

impl VmTarget {
    pub fn new(vm: Arc<VmCore>) -> Self {
        VmTarget {
            vm,
            actions: BTreeMap::new(),
            locked: false,
            running: None,
            breakpoints: BTreeSet::new(),
            hw_breakpoints: BTreeSet::new(),
            watches: Watches::default(),
            page_watches: Vec::new(),
            watching: None,
            poll_now: false,
            error: None,
            explain: Explain::default(),
        }
    }

    fn vcpu(&self, tid: Tid) -> TargetResult<Arc<VcpuCore>, Self> {
        // A closed VM ends the session.
        self.vm.check_open().map_err(TargetError::Fatal)?;
        let id = tid.get() as u64 - 1;
        self.vm
            .vcpus()
            .into_iter()
            .find(|v| v.id == id)
            .ok_or(TargetError::NonFatal)
    }

    /// The vCPU whose page tables translate breakpoint addresses: the first one.
    fn first_vcpu(&self) -> Result<Arc<VcpuCore>> {
        self.vm
            .vcpus()
            .into_iter()
            .next()
            .ok_or_else(|| Error::Value("the VM has no vCPUs".into()))
    }

    /// Stops the vCPUs of a resume still running and waits for them.
    pub fn stop(&mut self) -> Option<MultiThreadStopReason<u64>> {
        if let Some(w) = self.watching.take() {
            return Some(MultiThreadStopReason::SignalWithThread {
                tid: w.vcpus.first().map_or(NonZeroUsize::MIN, |v| tid_of(v.id)),
                signal: Signal::SIGINT,
            });
        }
        let group = self.running.as_ref()?;
        for v in &group.vcpus {
            v.kicker.stop_run();
        }
        Some(self.finish_run())
    }

    /// After the vCPUs of a resume stopped: why, for gdb.
    fn finish_run(&mut self) -> MultiThreadStopReason<u64> {
        let Some(group) = self.running.take() else {
            return MultiThreadStopReason::Signal(Signal::SIGINT);
        };
        group.wait(None);
        if let Some(e) = group.finish() {
            self.error.get_or_insert(e);
        }
        let mut stopped = None;
        for v in &group.vcpus {
            v.request_step(false);
            let tid = tid_of(v.id);
            let reason = match &*v.last() {
                Some(Last::Exit(Exit::Stopped)) => None,
                Some(Last::Exit(e)) => Some(self.reason_for(tid, e)),
                // A handler stopped the run.
                Some(Last::Token(_)) => Some(MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGTRAP,
                }),
                // The run failed (a handler raised).
                None => Some(MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGABRT,
                }),
            };
            if let Some(r) = reason {
                return r;
            }
            stopped.get_or_insert(tid);
        }
        MultiThreadStopReason::SignalWithThread {
            tid: stopped.unwrap_or(NonZeroUsize::MIN),
            signal: Signal::SIGINT,
        }
    }

    /// What gdb is told for `exit`: a stop at one of its hardware breakpoints is a
    /// hardware breakpoint's stop.
    fn reason_for(&self, tid: Tid, exit: &Exit) -> MultiThreadStopReason<u64> {
        match exit {
            Exit::Breakpoint { address }
                if self.hw_breakpoints.contains(address) && !self.breakpoints.contains(address) =>
            {
                MultiThreadStopReason::HwBreak(tid)
            }
            other => stop_reason(tid, other),
        }
    }

    /// One single step of the next vCPU of a stepping resume, on this thread; the stop
    /// reason when the resume is over.
    fn watch_step(&mut self) -> Option<MultiThreadStopReason<u64>> {
        let w = self.watching.as_mut()?;
        let v = Arc::clone(&w.vcpus[w.taken % w.vcpus.len()]);
        let tid = tid_of(v.id);
        v.request_step(true);
        let outcome = v.run(&RunOptions {
            deadline: Some(Instant::now() + STEP_SLICE),
            on_signal: None,
        });
        v.request_step(false);
        if matches!(outcome, Outcome::Exit(Exit::Timeout)) {
            // The instruction has not completed: the same step again, after a look at
            // the connection.
            self.poll_now = true;
            return None;
        }
        w.taken += 1;
        let round_done = w.taken % w.vcpus.len() == 0;
        let reason = match outcome {
            Outcome::Exit(Exit::Step { rip }) => {
                let changed = self
                    .watches
                    .changed(|addr, buf| v.read_virtual(addr, buf).is_ok());
                match changed {
                    Some(addr) => Some(MultiThreadStopReason::Watch {
                        tid,
                        kind: WatchKind::Write,
                        addr,
                    }),
                    None if w.stops.contains(&rip) => Some(MultiThreadStopReason::SwBreak(tid)),
                    None if w.single && round_done => {
                        Some(MultiThreadStopReason::SignalWithThread {
                            tid,
                            signal: Signal::SIGTRAP,
                        })
                    }
                    None => None,
                }
            }
            Outcome::Exit(e) => Some(stop_reason(tid, &e)),
            Outcome::Stopped(_) => Some(MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            }),
            Outcome::Error(e) => {
                self.error.get_or_insert(e);
                Some(MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGABRT,
                })
            }
        };
        if reason.is_some() {
            self.watching = None;
        }
        reason
    }

    /// Takes gdb's breakpoints and watchpoints out of the VM's tables (when the session
    /// ends).
    pub fn remove_breakpoints(&mut self) {
        for addr in std::mem::take(&mut self.breakpoints) {
            let _ = self.vm.remove_breakpoint(addr, Owner::Gdb);
        }
        for addr in std::mem::take(&mut self.hw_breakpoints) {
            self.vm.remove_hw_breakpoint(addr, Owner::Gdb);
        }
        for (addr, len) in std::mem::take(&mut self.page_watches) {
            let _ = self.vm.remove_watch(addr, len, None);
        }
    }
}

/// A vCPU's general and special registers and its FPU/SSE state.
fn state_of(v: &VcpuCore) -> Result<(kvm_regs, kvm_sregs, kvm_fpu)> {
    let fpu = v.with_fpu_fd(|fd| fd.get_fpu().map_err(|e| Error::ioctl("KVM_GET_FPU", e)))?;
    Ok((v.regs()?, v.sregs()?, fpu))
}

/// Memory errors are gdb's "Cannot access memory"; other errors end the session.
fn memory_error(e: Error) -> TargetError<Error> {
    match e {
        Error::Memory(_) => TargetError::Errno(EFAULT),
        other => TargetError::Fatal(other),
    }
}

impl Target for VmTarget {
    type Arch = X86_64_SSE;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for VmTarget {
    fn read_registers(&mut self, out: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu(tid)?;
        let (r, s, f) = state_of(&v).map_err(TargetError::Fatal)?;
        regs::to_gdb(&r, &s, &f, out);
        Ok(())
    }

    fn write_registers(&mut self, new: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu(tid)?;
        let (mut r, s, mut f) = state_of(&v).map_err(TargetError::Fatal)?;
        // A changed segment selector is refused (gdb says so), the rest goes in.
        regs::from_gdb(new, &mut r, &s, &mut f).map_err(|_| TargetError::NonFatal)?;
        v.set_regs(&r)
            .and_then(|()| {
                v.with_fpu_fd(|fd| fd.set_fpu(&f).map_err(|e| Error::ioctl("KVM_SET_FPU", e)))
            })
            .map_err(TargetError::Fatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let v = self.vcpu(tid)?;
        // Page by page, so that a read running into an unmapped page returns what it got.
        let mut done = 0;
        while done < data.len() {
            let addr = start.wrapping_add(done as u64);
            let chunk = ((0x1000 - (addr & 0xfff)) as usize).min(data.len() - done);
            match v.read_virtual(addr, &mut data[done..done + chunk]) {
                Ok(()) => done += chunk,
                Err(e) if done == 0 => return Err(memory_error(e)),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu(tid)?;
        v.write_virtual(start, data).map_err(memory_error)
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<()> {
        for v in self.vm.vcpus() {
            active(tid_of(v.id));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for VmTarget {
    /// Runs the vCPUs gdb resumed: only the stepping ones when any vCPU steps (the
    /// others stay where they are, like gdb's `scheduler-locking step`), those gdb named
    /// under scheduler locking, every vCPU otherwise. Signals gdb asks to deliver are not
    /// delivered (a VM has none).
    fn resume(&mut self) -> Result<()> {
        self.vm.check_open()?;
        let mut vcpus = self.vm.vcpus();
        if std::mem::take(&mut self.locked) {
            vcpus.retain(|v| self.actions.contains_key(&v.id));
        }
        let stepping: Vec<_> = vcpus
            .iter()
            .filter(|v| self.actions.get(&v.id) == Some(&Action::Step))
            .cloned()
            .collect();
        let single = !stepping.is_empty();
        let run = if single {
            self.vm.check_debuggable("single steps")?;
            stepping
        } else {
            vcpus
        };
        if (single || !self.watches.is_empty()) && !run.is_empty() {
            self.vm.check_debuggable("watchpoints (single steps)")?;
            self.watching = Some(Watching {
                vcpus: run,
                single,
                taken: 0,
                stops: self
                    .vm
                    .breakpoints_of(Owner::Gdb)
                    .into_iter()
                    .chain(self.vm.breakpoints_of(Owner::Vm))
                    .collect(),
            });
            return Ok(());
        }
        self.running = Some(RunGroup::start(&self.vm, run, None, true)?);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<()> {
        self.actions.clear();
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<()> {
        self.actions.insert(tid.get() as u64 - 1, Action::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for VmTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<()> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for VmTarget {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<()> {
        self.actions.insert(tid.get() as u64 - 1, Action::Step);
        Ok(())
    }
}

#[path = "target_breaks.rs"]
mod breaks;

/// A byte gdb sent while the target runs (Ctrl-C), if any.
fn incoming(
    conn: &mut GdbConn,
) -> std::result::Result<Option<u8>, WaitForStopReasonError<Error, std::io::Error>> {
    match conn.peek().map_err(WaitForStopReasonError::Connection)? {
        Some(_) => Ok(Some(
            conn.read().map_err(WaitForStopReasonError::Connection)?,
        )),
        None => Ok(None),
    }
}

/// `gdbstub`'s blocking event loop over a VM: waits for the vCPUs of a resume to stop,
/// looking at the connection for gdb's Ctrl-C meanwhile.
pub enum VmEventLoop {}

impl BlockingEventLoop for VmEventLoop {
    type Target = VmTarget;
    type Connection = GdbConn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut VmTarget,
        conn: &mut GdbConn,
    ) -> std::result::Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<Error, <GdbConn as Connection>::Error>,
    > {
        let mut steps = 0u32;
        while target.watching.is_some() {
            if let Some(reason) = target.watch_step() {
                return Ok(Event::TargetStopped(reason));
            }
            steps = steps.wrapping_add(1);
            if steps % 64 == 0 || std::mem::take(&mut target.poll_now) {
                if let Some(byte) = incoming(conn)? {
                    return Ok(Event::IncomingData(byte));
                }
            }
        }
        loop {
            let Some(group) = target.running.clone() else {
                return Ok(Event::TargetStopped(target.finish_run()));
            };
            if group.wait(Some(POLL)) {
                return Ok(Event::TargetStopped(target.finish_run()));
            }
            if let Some(byte) = incoming(conn)? {
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut VmTarget) -> Result<Option<Self::StopReason>> {
        Ok(target.stop())
    }
}
