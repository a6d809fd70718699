//! The run loop: `KVM_RUN`, decode the exit once, hand it to the device the bus names,
//! write the device's answer back, re-enter. Called with no interpreter lock held.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;

use crate::engine::bus::{Action, Device, Token};
use crate::engine::debug::Trap;
use crate::engine::error::{Error, Result};
use crate::engine::exit::{self, Data, Exit, IoRaw, RunExit};
use crate::engine::kick::{self, Timer};
use crate::engine::vcpu::{
    fd_of, FdGuard, Last, PendingRead, VcpuCore, NO_STEP, STEP_ARMED, STEP_IN_FLIGHT,
};
use crate::engine::vm::VmCore;

/// How a run ended.
pub enum Outcome {
    /// An exit nobody handled, a device's exit, a stop or a timeout.
    Exit(Exit),
    /// A device stopped the run with its own token.
    Stopped(Token),
    Error(Error),
}

impl From<Error> for Outcome {
    fn from(e: Error) -> Self {
        Outcome::Error(e)
    }
}

/// What a run may be told.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// When the run ends with a `Timeout` exit.
    pub deadline: Option<Instant>,
    /// Called when `KVM_RUN` was interrupted by a signal that was not a kick (Ctrl-C):
    /// an error ends the run with that error.
    pub on_signal: Option<&'a dyn Fn() -> Result<()>>,
}

/// What a device may do to the vCPU whose exit it handles.
pub struct VcpuCtx<'a, 'g> {
    vcpu: &'a VcpuCore,
    guard: &'g mut FdGuard<'a>,
    /// The element count of the string I/O being handled (1 otherwise).
    pub io_count: u32,
}

impl<'a> VcpuCtx<'a, '_> {
    pub fn vcpu(&self) -> &'a VcpuCore {
        self.vcpu
    }

    pub fn vm(&self) -> &'a VmCore {
        &self.vcpu.vm
    }

    /// The vCPU's general registers.
    pub fn regs(&mut self) -> Result<kvm_regs> {
        let holder = fd_of(self.guard)?;
        self.vcpu.read_regs(&mut holder.fd)
    }

    /// Sets the vCPU's general registers (they take effect when the guest is entered).
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        let holder = fd_of(self.guard)?;
        self.vcpu.write_regs(&mut holder.fd, regs)
    }

    /// Runs `f` with the vCPU's lock released, so that code `f` calls may use the vCPU
    /// (read its registers, say) from this thread.
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.guard.take();
        let result = f();
        *self.guard = Some(self.vcpu.lock_run_fd());
        result
    }
}

thread_local! {
    /// How many runs have ended on this thread: a run whose device ran another vCPU on the
    /// thread sees it change.
    static RUNS_ENDED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// What one `KVM_RUN` returned.
pub(crate) type RunResult = std::result::Result<RunExit, vmm_sys_util::errno::Error>;

/// Where the loop goes after one exit.
enum Flow {
    /// Re-enter; `true` if KVM must complete an access before the state can be read.
    Continue(bool),
    /// Handle this exit next: the guest was entered again already (see `out_lane`).
    Next(RunResult),
    Done(Outcome),
}

/// How long after a deadline a run looks again, when a single step was in flight then.
const STEP_GRACE: Duration = Duration::from_millis(1);

impl VcpuCore {
    /// Runs the vCPU on the calling thread until an exit ends the run.
    pub fn run(&self, options: &RunOptions<'_>) -> Outcome {
        match self.begin_run(false) {
            Ok(_running) => self.run_loop(options),
            Err(e) => Outcome::Error(e),
        }
    }

    /// The body of a thread of a run group: runs a reserved run and records how it ended.
    pub fn run_in_background(&self, deadline: Option<Instant>) -> Result<()> {
        let _running = self.begin_run(true)?;
        let options = RunOptions {
            deadline,
            on_signal: None,
        };
        match self.run_loop(&options) {
            Outcome::Exit(exit) => self.set_last(Some(Last::Exit(exit))),
            Outcome::Stopped(token) => self.set_last(Some(Last::Token(token))),
            Outcome::Error(e) => {
                self.set_last(None);
                return Err(e);
            }
        }
        Ok(())
    }

    fn run_loop(&self, options: &RunOptions<'_>) -> Outcome {
        if self.vm.is_closed() {
            return Outcome::Exit(Exit::Stopped);
        }
        // What the face kept about the last run's thread does not hold for this one.
        self.run_thread_word().store(0, Ordering::Relaxed);
        let signal = match kick::signal() {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        let mut guard: FdGuard<'_> = Some(self.lock_run_fd());
        let entered = match fd_of(&mut guard) {
            Ok(holder) => {
                kick::set_immediate_exit(&mut holder.fd, 0);
                // SAFETY: the fd stays open while `guard` holds it, and `guard` outlives
                // `entered` (dropped explicitly below, before the guard); the engine
                // writes `immediate_exit` only through `kick`.
                unsafe { kick::Entered::new(&mut holder.fd) }
            }
            Err(e) => return e.into(),
        };
        self.kicker.attach_thread();
        if let Err(e) = self.prepare(&mut guard, signal, options.deadline) {
            drop(entered);
            return e.into();
        }
        self.set_pending(None);
        if let Err(e) = fd_of(&mut guard).and_then(|h| {
            self.debug_enter(&mut h.fd)?;
            self.fpu_enter(h)
        }) {
            return e.into();
        }
        let outcome = self.exits_until_done(&mut guard, options);
        drop(entered);
        if let Ok(holder) = fd_of(&mut guard) {
            self.fpu_leave(holder);
            kick::set_immediate_exit(&mut holder.fd, 0);
            self.debug_leave(&mut holder.fd);
        }
        RUNS_ENDED.with(|n| n.set(n.get().wrapping_add(1)));
        outcome
    }

    /// Sets the vCPU up for this run, which kicks already reach (`Entered`): a timer that
    /// kicks the thread at the deadline, armed only now so that it cannot fire unseen.
    fn prepare<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        signal: libc::c_int,
        deadline: Option<Instant>,
    ) -> Result<()> {
        match deadline {
            Some(at) => Timer::arm(&mut fd_of(guard)?.timer, signal, at),
            None => Ok(()),
        }
    }

    fn exits_until_done<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
    ) -> Outcome {
        let mut handled_access = false;
        let mut runs_ended = RUNS_ENDED.with(|n| n.get());
        let mut next = None;
        loop {
            let result = match next.take() {
                // The lane entered the guest already, after these same checks.
                Some(result) => result,
                None => {
                    if self.stop_asked() {
                        if handled_access {
                            self.complete_pending(guard);
                        }
                        return Outcome::Exit(Exit::Stopped);
                    }
                    let entered = self.enter(guard);
                    if self.tf_step.load(Ordering::Relaxed) == STEP_ARMED {
                        self.tf_step.store(STEP_IN_FLIGHT, Ordering::Relaxed);
                    }
                    match entered {
                        Ok(result) => result,
                        Err(e) => return e.into(),
                    }
                }
            };
            match self.handle(guard, options, result, &mut runs_ended) {
                Ok(Flow::Continue(handled)) => handled_access = handled,
                Ok(Flow::Next(result)) => {
                    next = Some(result);
                    continue;
                }
                Ok(Flow::Done(outcome)) => return outcome,
                Err(e) => return e.into(),
            }
            if let Err(e) = self.between_exits(guard, options, &mut runs_ended) {
                return e.into();
            }
        }
    }

    /// Whether the run must end before the next entry: a stop, or the VM closed. A stop
    /// waits for a single step kvmpy makes with TF (see `step_in_flight`).
    fn stop_asked(&self) -> bool {
        (self.kicker.stop_requested() && !self.step_in_flight()) || self.vm.is_closed()
    }

    /// kvmpy single-steps with TF and the guest was entered since: the vCPU may be inside
    /// an exception stub with the step's #DB, where a run cannot end without losing it
    /// (the stub would report it to a later run as the guest's own). A stop or a
    /// deadline waits for the step, a few exits at most. Before that first entry a stop
    /// wins at once, as it does for any run.
    fn step_in_flight(&self) -> bool {
        self.tf_step.load(Ordering::Relaxed) == STEP_IN_FLIGHT
    }

    /// After an exit was handled, before the next entry: a device that ran another vCPU
    /// on this thread may have taken this run's timer signal, so the timer is set again.
    fn between_exits<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
        runs_ended: &mut u64,
    ) -> Result<()> {
        let Some(at) = options.deadline else {
            return Ok(());
        };
        let now_ended = RUNS_ENDED.with(|n| n.get());
        if now_ended != *runs_ended {
            *runs_ended = now_ended;
            self.rearm(guard, at)?;
        }
        Ok(())
    }

    fn rearm<'a>(&'a self, guard: &mut FdGuard<'a>, at: Instant) -> Result<()> {
        let Some(signal) = kick::chosen_signal() else {
            return Ok(());
        };
        let holder = fd_of(guard)?;
        Timer::forget(&mut holder.timer);
        Timer::arm(&mut holder.timer, signal, at)
    }

    /// One `KVM_RUN`, with the bookkeeping every exit needs.
    fn enter<'a>(&'a self, guard: &mut FdGuard<'a>) -> Result<RunResult> {
        let holder = fd_of(guard)?;
        self.inject_interrupt(&mut holder.fd)?;
        let result = self.run_all_stop(&mut holder.fd);
        self.count_exit();
        self.note_result(&mut holder.fd, &result);
        Ok(result)
    }

    /// `note_exit` for what `KVM_RUN` returned: port I/O and MMIO leave an access for
    /// KVM to complete.
    fn note_result(&self, fd: &mut kvm_ioctls::VcpuFd, result: &RunResult) {
        let io = matches!(
            result,
            Ok(RunExit::Io(_)) | Ok(RunExit::Other(Exit::Mmio { .. }))
        );
        self.note_exit(fd, io);
    }

    /// The handling of what one `KVM_RUN` returned.
    fn handle<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
        result: RunResult,
        runs_ended: &mut u64,
    ) -> Result<Flow> {
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.interrupted(guard, options)
            }
            Err(e) => Err(Error::ioctl("KVM_RUN", e)),
            Ok(RunExit::Other(Exit::Unknown { raw }))
                if raw == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL =>
            {
                self.ring_full(fd_of(guard)?)?;
                Ok(Flow::Continue(false))
            }
            Ok(RunExit::Io(io)) => {
                let maybe_patch = io.is_write && io.size == 1 && io.count == 1;
                if maybe_patch && self.vm.pio_patches.load(Ordering::Acquire) > 0 {
                    if let Some(trap) = self.pio_trap(&mut fd_of(guard)?.fd)? {
                        return self.trap(guard, trap);
                    }
                }
                if self.tf_step.load(Ordering::Relaxed) != NO_STEP {
                    let flow = self.dispatch_io(guard, io)?;
                    return self.after_stepped_access(guard, flow);
                }
                if io.is_write && io.count == 1 {
                    return self.out_lane(guard, options, io, runs_ended);
                }
                self.dispatch_io(guard, io)
            }
            Ok(RunExit::Other(exit)) => {
                let flow = self.dispatch(guard, exit)?;
                self.after_stepped_access(guard, flow)
            }
        }
    }

    /// While kvmpy single-steps with TF, an access a device handled (`Continue(true)`)
    /// may be where the step ends (see `step_after_access`).
    fn after_stepped_access<'a>(&'a self, guard: &mut FdGuard<'a>, flow: Flow) -> Result<Flow> {
        if !matches!(flow, Flow::Continue(true)) || self.tf_step.load(Ordering::Relaxed) == NO_STEP
        {
            return Ok(flow);
        }
        match self.step_after_access(&mut fd_of(guard)?.fd)? {
            None => Ok(Flow::Continue(false)),
            Some(trap) => self.trap(guard, trap),
        }
    }

    /// `KVM_RUN` returned `EINTR`: a kick, the deadline, or another signal.
    fn interrupted<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
    ) -> Result<Flow> {
        kick::clear(&mut fd_of(guard)?.fd);
        if self.kicker.stop_requested() {
            return Ok(Flow::Continue(false));
        }
        if let Some(at) = options.deadline {
            let now = Instant::now();
            if now >= at && self.step_in_flight() {
                // Once the step is over: the timer kicks again.
                self.rearm(guard, now + STEP_GRACE)?;
                return Ok(Flow::Continue(false));
            }
            if now >= at {
                return Ok(Flow::Done(Outcome::Exit(Exit::Timeout)));
            }
            // The timer may have fired early, for an earlier run's deadline.
            Timer::rearm_if_fired(&mut fd_of(guard)?.timer, at, now)?;
        }
        if let Some(check) = options.on_signal {
            check()?;
        }
        Ok(Flow::Continue(false))
    }

    /// Port I/O, element by element for string I/O.
    fn dispatch_io<'a>(&'a self, guard: &mut FdGuard<'a>, io: IoRaw) -> Result<Flow> {
        let bus = self.vm.bus();
        let Some(device) = bus.io(io.port) else {
            let element = exit::io_element(&mut fd_of(guard)?.fd, io, 0);
            let data = if io.is_write {
                Data::new(element)
            } else {
                self.set_pending(Some(PendingRead::Io { io, index: 0 }));
                Data::default()
            };
            return Ok(Flow::Done(Outcome::Exit(Exit::Io {
                port: io.port,
                size: io.size,
                count: io.count,
                is_write: io.is_write,
                data,
            })));
        };
        let mut stopped = None;
        for i in 0..io.count {
            let mut data = Data::new(exit::io_element(&mut fd_of(guard)?.fd, io, i));
            let mut ctx = VcpuCtx {
                vcpu: self,
                guard,
                io_count: io.count,
            };
            let action = if io.is_write {
                device.io_out(&mut ctx, io.port, data.as_slice())?
            } else {
                let action = device.io_in(&mut ctx, io.port, data.as_mut_slice())?;
                exit::io_element(&mut fd_of(guard)?.fd, io, i).copy_from_slice(data.as_slice());
                action
            };
            match action {
                Action::Continue => {}
                Action::Stop(token) => {
                    stopped.get_or_insert(token);
                }
                exit => {
                    let single_out = io.is_write && io.count == 1;
                    if let Some(flow) = self.element_done(guard, exit, single_out)? {
                        return Ok(flow);
                    }
                }
            }
        }
        Ok(match stopped {
            Some(token) => {
                let single_out = io.is_write && io.count == 1;
                self.finish_access(guard, Outcome::Stopped(token), single_out)
            }
            None => Flow::Continue(true),
        })
    }

    /// What a device's answer to one element of port I/O means for the run: `None` to go
    /// on (the element is handled).
    fn element_done<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        action: Action,
        single_out: bool,
    ) -> Result<Option<Flow>> {
        Ok(match action {
            Action::Continue => None,
            Action::Exit(
                exit @ Exit::Exception {
                    vector: 1 | 3 | 13, ..
                },
            ) => {
                let trap = self.stub_trap(&mut fd_of(guard)?.fd, exit)?;
                Some(self.trap(guard, trap)?)
            }
            Action::Exit(exit) => Some(self.finish_access(guard, Outcome::Exit(exit), single_out)),
            Action::Stop(token) => {
                Some(self.finish_access(guard, Outcome::Stopped(token), single_out))
            }
        })
    }

    /// Every exit but port I/O.
    fn dispatch<'a>(&'a self, guard: &mut FdGuard<'a>, exit: Exit) -> Result<Flow> {
        let bus = self.vm.bus();
        let action = match exit {
            Exit::Mmio {
                addr,
                size,
                is_write,
                data,
            } => {
                if self.vm.watch_count.load(Ordering::Acquire) > 0 {
                    if let Some(flow) = self.watched(guard, addr, size, is_write, data)? {
                        return Ok(flow);
                    }
                }
                let Some(device) = bus.mmio(addr) else {
                    if !is_write {
                        self.set_pending(Some(PendingRead::Mmio { addr, size }));
                    }
                    return Ok(Flow::Done(Outcome::Exit(exit)));
                };
                self.mmio(guard, device.as_ref(), addr, size, is_write, data)?
            }
            Exit::Hlt if self.has_queued_interrupts() => return Ok(Flow::Continue(false)),
            Exit::Hlt => match bus.hlt() {
                Some(device) => device.hlt(&mut self.ctx(guard))?,
                None => return Ok(Flow::Done(Outcome::Exit(exit))),
            },
            Exit::IrqWindowOpen => return Ok(Flow::Continue(false)),
            Exit::InternalError { .. } if self.vm.watch_count.load(Ordering::Acquire) > 0 => {
                let fd = &mut fd_of(guard)?.fd;
                let rip = self.read_regs(fd)?.rip;
                let gpa = fd.translate_gva(rip).ok().filter(|t| t.valid != 0);
                if gpa.is_some_and(|t| self.vm.in_watch_hole(t.physical_address)) {
                    return Err(Error::Unsupported(format!(
                        "the guest executed code at {rip:#x}, in a page a read/write \
                         watchpoint watches: such a page has no memory slot (every access \
                         to it exits to kvmpy), and KVM cannot fetch instructions from it; \
                         watch this address for writes only, or another address"
                    )));
                }
                return Ok(Flow::Done(Outcome::Exit(exit)));
            }
            Exit::Debug { .. } => {
                let trap = self.debug_exit(&mut fd_of(guard)?.fd, exit)?;
                return self.trap(guard, trap);
            }
            other => return Ok(Flow::Done(Outcome::Exit(other))),
        };
        Ok(match action {
            Action::Continue => Flow::Continue(true),
            Action::Exit(exit) => self.finish_access(guard, Outcome::Exit(exit), false),
            Action::Stop(token) => self.finish_access(guard, Outcome::Stopped(token), false),
        })
    }

    fn mmio<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        device: &dyn Device,
        addr: u64,
        size: u8,
        is_write: bool,
        mut data: Data,
    ) -> Result<Action> {
        if is_write {
            return device.mmio_write(&mut self.ctx(guard), addr, data.as_slice());
        }
        data.set_len(size);
        let action = device.mmio_read(&mut self.ctx(guard), addr, data.as_mut_slice())?;
        exit::mmio_data(&mut fd_of(guard)?.fd).copy_from_slice(data.as_slice());
        Ok(action)
    }

    /// An MMIO exit in a watched page (see `watch`): the access is done on guest memory;
    /// a watchpoint it hits ends the run once KVM has completed the instruction. `None`:
    /// not a watched page.
    fn watched<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        addr: u64,
        size: u8,
        is_write: bool,
        mut data: Data,
    ) -> Result<Option<Flow>> {
        data.set_len(size);
        let Some(hit) = self
            .vm
            .watched_access(self.id, addr, data.as_mut_slice(), is_write)?
        else {
            return Ok(None);
        };
        let holder = fd_of(guard)?;
        if !is_write {
            exit::mmio_data(&mut holder.fd).copy_from_slice(data.as_slice());
        }
        let Some(hit) = hit else {
            return Ok(Some(Flow::Continue(true)));
        };
        self.finish_handled(&mut holder.fd, false);
        let rip = self.read_regs(&mut holder.fd)?.rip;
        Ok(Some(Flow::Done(Outcome::Exit(Exit::Watchpoint(
            Box::new(hit),
            rip,
        )))))
    }

    /// Where the loop goes after a trap kvmpy's debugging looked at.
    fn trap<'a>(&'a self, guard: &mut FdGuard<'a>, trap: Trap) -> Result<Flow> {
        Ok(match trap {
            Trap::Continue => Flow::Continue(false),
            Trap::Breakpoint { address, seen } => {
                // Python's handler sees Python's breakpoints only; one gdb set stops the
                // run for gdb, after that handler if Python set it too.
                let bus = self.vm.bus();
                let Some(device) = bus.breakpoint().filter(|_| seen.python) else {
                    return Ok(Flow::Done(Outcome::Exit(Exit::Breakpoint { address })));
                };
                match device.breakpoint(&mut self.ctx(guard), address)? {
                    Action::Continue if seen.gdb => {
                        Flow::Done(Outcome::Exit(Exit::Breakpoint { address }))
                    }
                    Action::Continue => {
                        self.step_over(&mut fd_of(guard)?.fd, address)?;
                        Flow::Continue(false)
                    }
                    Action::Exit(exit) => Flow::Done(Outcome::Exit(exit)),
                    Action::Stop(token) => Flow::Done(Outcome::Stopped(token)),
                }
            }
            Trap::Done(exit) => Flow::Done(Outcome::Exit(exit)),
            Trap::Pass(exit @ Exit::Exception { .. }) => {
                self.finish_access(guard, Outcome::Exit(exit), true)
            }
            Trap::Pass(exit) => Flow::Done(Outcome::Exit(exit)),
        })
    }

    fn ctx<'a, 'g>(&'a self, guard: &'g mut FdGuard<'a>) -> VcpuCtx<'a, 'g> {
        VcpuCtx {
            vcpu: self,
            guard,
            io_count: 1,
        }
    }

    /// Ends the run after a handled access, completing the access first (or, for a
    /// single OUT, leaving it to the next entry where that is safe: see `complete.rs`).
    fn finish_access<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        outcome: Outcome,
        single_out: bool,
    ) -> Flow {
        if let Ok(holder) = fd_of(guard) {
            self.finish_handled(&mut holder.fd, single_out);
        }
        Flow::Done(outcome)
    }

    /// Re-enters the guest with `immediate_exit` set so KVM completes a pending IN or MMIO
    /// read (the KVM API requires this before the vCPU's state is read).
    fn complete_pending<'a>(&'a self, guard: &mut FdGuard<'a>) {
        if let Ok(holder) = fd_of(guard) {
            self.complete_io(&mut holder.fd);
        }
    }
}

#[path = "run_lane.rs"]
mod lane;
