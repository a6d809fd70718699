//! All-stop while a vCPU steps over a breakpoint: no other vCPU of the VM runs guest code
//! while the patch byte is out of memory, so none can run past an armed breakpoint.
//!
//! Stepping over a software breakpoint takes its byte out of guest memory for one
//! instruction. Memory is shared by every vCPU, so another vCPU that reached the address
//! in that moment would run the original instruction unseen. Two known cures:
//! - *displaced stepping* (gdb's on Linux targets): run a relocated copy of the original
//!   instruction from a scratch page, then fix RIP. It needs a page mapped executable, at
//!   the right privilege, by the guest's own page tables, within ±2 GiB of the code for
//!   RIP-relative operands, and fix-ups for calls, returns and faults. kvmpy does not own
//!   the guest's page tables in general (a loaded kernel has its own), so no such page
//!   can be promised.
//! - *all-stop* (gdb's default mode, and what QEMU's gdbstub does): the other vCPUs wait
//!   outside the guest for the duration of the step. It works for every guest, and costs
//!   a running vCPU one flag store and one load per entry; a lone vCPU's step over a
//!   breakpoint costs one compare-and-swap more.
//!
//! kvmpy does all-stop. The protocol is Dekker's: before each `KVM_RUN` a vCPU raises
//! its `in_guest` flag and then reads the gate's owner; the stepping vCPU takes the gate
//! and then reads every other vCPU's flag, kicking those in the guest out (the kick of
//! `kick`; their loop sees a spurious `EINTR` and comes back to the gate) and waiting
//! until each flag is down. Sequentially consistent order on both sides means that one
//! of the two always sees the other. A vCPU that finds the gate taken waits for it,
//! outside the guest, without holding any lock of the VM (a stop request or a closed VM
//! ends the wait). The gate is held from just before the patch goes out until just after
//! it is back (`debug`), and is not held across a return to the caller.
//!
//! A trap another vCPU took before the patch went out is still a hit: the breakpoint
//! table remembers which vCPU is stepping over an entry (`Entry::stepper`), and a trap
//! at a disarmed entry counts as that entry's hit for every other vCPU.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::engine::error::{Error, Result};
use crate::engine::exit::{self, RunExit};
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;
use crate::engine::{gettid, lock};

/// How long a waiting vCPU sleeps before it looks for a stop request again, and how
/// often the stepping vCPU kicks a vCPU that has not left the guest yet.
const SLICE: Duration = Duration::from_millis(2);

/// What [`StepGate::take`] did.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// The calling thread has the gate now.
    Taken,
    /// The calling thread had it already.
    Held,
    /// `give_up` said to stop waiting for it.
    GaveUp,
}

/// The gate of one VM: the thread stepping over a breakpoint, if any.
#[derive(Default)]
#[repr(C)]
pub struct StepGate {
    /// The thread id of the holder (0: none). First: the run loop reads it on every entry
    /// (see `VmCore`'s layout).
    owner: AtomicI32,
    lock: Mutex<()>,
    changed: Condvar,
}

impl StepGate {
    /// Whether a thread other than the caller holds the gate.
    fn closed_to_me(&self) -> bool {
        let owner = self.owner.load(Ordering::SeqCst);
        owner != 0 && owner != gettid()
    }

    /// Waits (a slice at most) while another thread holds the gate.
    fn wait_a_slice(&self) {
        let guard = lock(&self.lock);
        if self.closed_to_me() {
            let _ = self.changed.wait_timeout(guard, SLICE);
        }
    }

    /// Takes the gate for the calling thread, waiting while another holds it. False if
    /// the calling thread holds it already (it is then not taken again), or `give_up`
    /// said to stop waiting.
    fn take(&self, give_up: impl Fn() -> bool) -> Take {
        let me = gettid();
        let mut guard = lock(&self.lock);
        loop {
            match self
                .owner
                .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Take::Taken,
                Err(owner) if owner == me => return Take::Held,
                Err(_) if give_up() => return Take::GaveUp,
                Err(_) => {
                    guard = match self.changed.wait_timeout(guard, SLICE) {
                        Ok((g, _)) => g,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
            }
        }
    }

    /// Gives the gate back and wakes the vCPUs waiting for it.
    fn give_back(&self) {
        let _guard = lock(&self.lock);
        self.owner.store(0, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

impl VcpuCore {
    /// One `KVM_RUN`, entered only while no other vCPU steps over a breakpoint (see the
    /// module). A stop request or a closed VM while waiting returns `EINTR`, as a kick
    /// during `KVM_RUN` does, so the run loop handles it the same way.
    pub(crate) fn run_all_stop(
        &self,
        fd: &mut kvm_ioctls::VcpuFd,
    ) -> std::result::Result<RunExit, vmm_sys_util::errno::Error> {
        self.in_guest.store(true, Ordering::SeqCst);
        // Only the owner is read on the way in; the rest is out of the exit path's code.
        if self.vm.step_gate.owner.load(Ordering::SeqCst) != 0 {
            self.wait_for_gate()?;
        }
        let result = exit::run_once(fd);
        self.in_guest.store(false, Ordering::Release);
        result
    }

    /// `run_all_stop` found the gate held: waits, outside the guest, until it is not held
    /// by another thread (and returns with `in_guest` raised again), or until a stop
    /// request or a closed VM (`EINTR`).
    #[cold]
    #[inline(never)]
    fn wait_for_gate(&self) -> std::result::Result<(), vmm_sys_util::errno::Error> {
        let gate = &self.vm.step_gate;
        while gate.closed_to_me() {
            self.in_guest.store(false, Ordering::SeqCst);
            if self.kicker.stop_requested() || self.vm.is_closed() {
                return Err(vmm_sys_util::errno::Error::new(libc::EINTR));
            }
            gate.wait_a_slice();
            self.in_guest.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Before a breakpoint's patch goes out for a step over it: takes the VM's gate and
    /// waits until no other vCPU is in the guest. `Some(true)`: this call took the gate
    /// (then [`VcpuCore::resume_others`] must follow); `Some(false)`: the calling thread
    /// holds it already; `None`: a stop request or closed VM ended the wait for it, and
    /// the others may run (no patch may go out then).
    pub(crate) fn stop_others(&self) -> Option<bool> {
        let gate = &self.vm.step_gate;
        match gate.take(|| self.kicker.stop_requested() || self.vm.is_closed()) {
            Take::Taken => {}
            Take::Held => return Some(false),
            Take::GaveUp => return None,
        }
        for other in self.vm.vcpus().iter().filter(|v| v.id != self.id) {
            while other.in_guest.load(Ordering::SeqCst) {
                other.kicker.kick();
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Some(true)
    }

    /// Forgets removed breakpoints (see `Entry::retired`) once no other vCPU runs: a
    /// vCPU that does not run holds no exit, and this one has handled its own.
    pub(crate) fn purge_removed_breakpoints(&self) {
        if !lock(&self.vm.breakpoints).has_retired() {
            return;
        }
        let others = self.vm.vcpus();
        if others
            .iter()
            .all(|v| v.id == self.id || !v.kicker.running())
        {
            lock(&self.vm.breakpoints).purge_retired();
        }
    }

    /// The patch is back: the other vCPUs may enter the guest again.
    pub(crate) fn resume_others(&self) {
        self.vm.step_gate.give_back();
    }
}

/// Keeps a VM's vCPUs out of the guest while alive (see [`VmCore::hold_entries`]).
pub(crate) struct EntriesHeld<'a> {
    /// The gate this guard took and gives back (None: the thread held it already).
    gate: Option<&'a StepGate>,
}

impl Drop for EntriesHeld<'_> {
    fn drop(&mut self) {
        if let Some(gate) = self.gate {
            gate.give_back();
        }
    }
}

impl VmCore {
    /// Takes the VM's gate, as a step over a breakpoint does (waiting for one in
    /// progress): until the guard is dropped, a vCPU that enters its run waits outside
    /// the guest. vCPUs already in the guest stay there: the caller checks that none is.
    pub(crate) fn hold_entries(&self) -> Result<EntriesHeld<'_>> {
        match self.step_gate.take(|| self.is_closed()) {
            Take::Taken => Ok(EntriesHeld {
                gate: Some(&self.step_gate),
            }),
            Take::Held => Ok(EntriesHeld { gate: None }),
            Take::GaveUp => Err(Error::Closed("VM")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn the_owner_comes_first() {
        // VmCore keeps the gate on its first cache line for this field.
        assert_eq!(std::mem::offset_of!(StepGate, owner), 0);
    }

    #[test]
    fn the_gate_is_one_threads_at_a_time_and_open_to_its_holder() {
        let gate = Arc::new(StepGate::default());
        assert!(!gate.closed_to_me());
        assert_eq!(gate.take(|| false), Take::Taken);
        assert_eq!(
            gate.take(|| false),
            Take::Held,
            "the holder's second take takes nothing"
        );
        assert!(!gate.closed_to_me(), "open to its holder");
        let other = Arc::clone(&gate);
        let seen_closed = std::thread::spawn(move || other.closed_to_me())
            .join()
            .unwrap();
        assert!(seen_closed, "closed to every other thread");
        // Another thread's take waits until the gate is given back.
        let taken = Arc::new(AtomicBool::new(false));
        let (other, flag) = (Arc::clone(&gate), Arc::clone(&taken));
        let waiter = std::thread::spawn(move || {
            let took = other.take(|| false) == Take::Taken;
            flag.store(took, Ordering::SeqCst);
            other.give_back();
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!taken.load(Ordering::SeqCst), "still waiting");
        gate.give_back();
        waiter.join().unwrap();
        assert!(taken.load(Ordering::SeqCst));
        assert!(!gate.closed_to_me());
        // A take that gives up (a stop request) returns without the gate.
        assert_eq!(gate.take(|| false), Take::Taken);
        let other = Arc::clone(&gate);
        let gave_up = std::thread::spawn(move || other.take(|| true) == Take::GaveUp)
            .join()
            .unwrap();
        assert!(gave_up);
        gate.give_back();
    }
}
