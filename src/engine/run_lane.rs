//! The run loop's lane for one-element OUTs (see [`VcpuCore::out_lane`]).

use std::sync::atomic::Ordering;

use super::VcpuCtx;
use super::{Flow, RunOptions};
use crate::engine::bus::{Action, Device};
use crate::engine::error::Result;
use crate::engine::exit::{self, Data, IoRaw, RunExit};
use crate::engine::run::RunResult;
use crate::engine::vcpu::{fd_of, FdGuard, VcpuCore, NO_STEP};

impl VcpuCore {
    /// One-element OUTs, the exits of a guest that talks to a handler or a console,
    /// handled one after another without going back through the general loop: the bus
    /// is taken once (and again only when it changes). Between two exits the lane makes
    /// the deadline check `exits_until_done` makes; anything else that loop does before
    /// an entry (a stop, an interrupt, a step) sends the handled OUT back to it
    /// (`lane_must_leave`). Any other exit goes back to the general loop as `Flow::Next`.
    ///
    /// Not inlined into `handle`: on its own the lane's code and stack frame stay small,
    /// and each exit, which leaves the host's caches cold, touches fewer lines of both.
    #[inline(never)]
    pub(super) fn out_lane<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
        io: IoRaw,
        runs_ended: &mut u64,
    ) -> Result<Flow> {
        // The guard moves into the lane's frame while the lane runs: every exit reads it,
        // and in the run loop's frame it would be a line of its own to touch.
        let mut held = guard.take();
        let flow = self.lane(&mut held, options, io, runs_ended);
        *guard = held;
        flow
    }

    /// The body of `out_lane`.
    #[inline(always)]
    fn lane<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        options: &RunOptions<'_>,
        mut io: IoRaw,
        runs_ended: &mut u64,
    ) -> Result<Flow> {
        let mut generation = self.vm.bus_generation();
        let mut bus = self.vm.bus();
        // The device of the last port, kept while the bus stays (one port is the norm).
        // Kept as the device itself (its data and vtable pointers, in this frame), not as
        // a reference to the bus's `Arc`: an exit then reads nothing of the bus, whose
        // memory is a page of its own to walk to on a host that flushes the TLB per exit.
        let mut last: Option<(u16, &dyn Device)> = None;
        loop {
            let device = match last {
                Some((port, device)) if port == io.port => device,
                _ => {
                    let Some(device) = bus.io(io.port) else {
                        return self.dispatch_io(guard, io);
                    };
                    let device: &dyn Device = &**device;
                    last = Some((io.port, device));
                    device
                }
            };
            let data = Data::new(exit::io_element(&mut fd_of(guard)?.fd, io, 0));
            let mut ctx = VcpuCtx {
                vcpu: self,
                guard,
                io_count: 1,
            };
            let action = device.io_out(&mut ctx, io.port, data.as_slice());
            if !matches!(action, Ok(Action::Continue)) {
                return self.lane_end(guard, action);
            }
            std::mem::forget(action); // `Continue`: nothing to drop
            self.between_exits(guard, options, runs_ended)?;
            if self.lane_must_leave() {
                // The OUT is handled: the general loop goes on as after any handled
                // access (a stop, an interrupt to inject, a step are its to handle).
                return Ok(Flow::Continue(true));
            }
            // `enter` without what `lane_must_leave` ruled out, and with the result
            // matched where it lands: this loop touches as few lines as it can.
            let fd = &mut fd_of(guard)?.fd;
            let result = self.run_all_stop(fd);
            self.count_exit();
            match result {
                Ok(RunExit::Io(next))
                    if next.is_write
                        && next.count == 1
                        && (next.size != 1 || self.vm.pio_patches.load(Ordering::Acquire) == 0) =>
                {
                    self.note_exit(fd, true);
                    io = next;
                }
                other => return Ok(self.lane_next(fd, other)),
            }
            let now = self.vm.bus_generation();
            if now != generation {
                generation = now;
                last = None;
                bus = self.vm.bus();
            }
        }
    }

    /// `out_lane` ends on a device's answer other than `Continue` (kept out of the lane's
    /// code, which is hot).
    #[cold]
    #[inline(never)]
    fn lane_end<'a>(&'a self, guard: &mut FdGuard<'a>, action: Result<Action>) -> Result<Flow> {
        Ok(self
            .element_done(guard, action?, true)?
            .unwrap_or(Flow::Continue(true)))
    }

    /// Whether the general loop must make the next entry: a stop, a closed VM, an
    /// interrupt queued, or a single step with TF (one line of the vCPU, one of the VM).
    fn lane_must_leave(&self) -> bool {
        self.kicker.stop_requested()
            || self.vm.is_closed()
            || self.has_queued_interrupts()
            || self.tf_step.load(Ordering::Relaxed) != NO_STEP
    }

    /// `out_lane` entered the guest and got an exit other than a one-element OUT: the
    /// general loop handles it next.
    #[cold]
    #[inline(never)]
    fn lane_next(&self, fd: &mut kvm_ioctls::VcpuFd, result: RunResult) -> Flow {
        self.note_result(fd, &result);
        Flow::Next(result)
    }
}
