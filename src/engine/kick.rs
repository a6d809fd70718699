//! Stopping a vCPU that runs in `KVM_RUN`, from any thread, with no lost kick.
//!
//! The design is QEMU's: one real-time signal (the *kick*) is blocked in a thread that runs
//! a vCPU, except inside `KVM_RUN`, where KVM unblocks it (`KVM_SET_SIGNAL_MASK`). A kick
//! sent at any moment of a run therefore either interrupts `KVM_RUN` or stays pending until
//! the next `KVM_RUN`, which then returns `EINTR` before entering the guest. The signal's
//! handler is empty: nothing in it touches vCPU state, and no thread-local pointer is
//! needed. Outside `KVM_RUN` the signal is blocked, so whatever a handler does between two
//! entries (a blocking read, a sleep) is never interrupted by a kick.
//!
//! The kick is the first real-time signal from `SIGRTMIN+1` on that has no handler when
//! kvmpy first needs one; a handler the host program installed is never replaced. Timeouts
//! are a POSIX timer per vCPU, created once and re-armed only when needed, that sends the
//! kick to the running thread.

use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use vmm_sys_util::signal::{SIGRTMAX, SIGRTMIN};

use crate::engine::error::{Error, Result};

static SIGNAL: OnceLock<std::result::Result<libc::c_int, String>> = OnceLock::new();

extern "C" fn on_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return EINTR.
}

fn sigset_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid, writable storage for the calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Installs the kick handler on the first free real-time signal.
fn install() -> std::result::Result<libc::c_int, String> {
    for sig in SIGRTMIN() + 1..=SIGRTMAX() {
        // SAFETY: an all-zero sigaction is a valid out-parameter.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null `act` only queries the current disposition into `old`.
        if unsafe { libc::sigaction(sig, null_mut(), &mut old) } != 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            continue; // the host program (or a library) uses this signal
        }
        // SAFETY: an all-zero sigaction is a valid value; the fields that matter are set.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_kick as *const () as usize;
        // SA_RESTART: a kick that lands in a system call restarts it where it can.
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `act.sa_mask` is valid storage.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is fully initialised and `on_kick` is async-signal-safe (empty).
        if unsafe { libc::sigaction(sig, &act, null_mut()) } == 0 {
            return Ok(sig);
        }
    }
    Err(format!(
        "every real-time signal from SIGRTMIN+1 ({}) to SIGRTMAX ({}) already has a handler; \
         kvmpy needs one free real-time signal to stop running vCPUs",
        SIGRTMIN() + 1,
        SIGRTMAX()
    ))
}

/// The kick signal, installing its handler on first use.
pub fn signal() -> Result<libc::c_int> {
    SIGNAL.get_or_init(install).clone().map_err(Error::Refused)
}

/// The kick signal if it has been chosen already.
pub fn chosen_signal() -> Option<libc::c_int> {
    SIGNAL.get().and_then(|r| r.as_ref().ok().copied())
}

/// Takes the pending kicks of the calling thread off its queue. `KVM_RUN` returns `EINTR`
/// when a kick is pending but leaves it pending (KVM blocks it again on the way out), so
/// the run loop consumes it before re-entering, as QEMU does (`kvm_eat_signals`).
pub fn consume(signal: libc::c_int) {
    let set = sigset_of(&[signal]);
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are valid for the call; a null info pointer is allowed. The
    // signal is blocked in this thread, so sigtimedwait only dequeues it.
    while unsafe { libc::sigtimedwait(&set, null_mut(), &zero) } == signal {}
}

thread_local! {
    /// The mask `KVM_RUN` runs with on this thread, once the kick is blocked here.
    static RUN_MASK: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Blocks the kick signal in the calling thread, for good: a thread that has run a vCPU
/// keeps it blocked (it is kvmpy's own signal), which spares two system calls per run. A
/// kick left pending is consumed by the next `KVM_RUN` (a spurious `EINTR`). Returns the
/// thread's mask without the kick, which is what `KVM_RUN` runs with.
pub fn block_in_this_thread(signal: libc::c_int) -> Result<u64> {
    if let Some(mask) = RUN_MASK.with(|m| m.get()) {
        return Ok(mask);
    }
    let set = sigset_of(&[signal]);
    // SAFETY: an all-zero sigset_t is valid storage for the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid for the call; the result is checked.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if ret != 0 {
        return Err(Error::ioctl(
            "pthread_sigmask",
            vmm_sys_util::errno::Error::new(ret),
        ));
    }
    // The kernel's sigset for the first 64 signals is the first 8 bytes of sigset_t.
    // SAFETY: sigset_t is at least 8 bytes long and any bit pattern is a valid u64.
    let raw = unsafe { std::ptr::read_unaligned(&old as *const libc::sigset_t as *const u64) };
    let mask = raw & !(1u64 << (signal - 1));
    RUN_MASK.with(|m| m.set(Some(mask)));
    Ok(mask)
}

#[derive(Default)]
struct KickState {
    /// A run is in progress (from `begin` to `end`), whether or not its thread has
    /// started yet.
    running: bool,
    /// The thread running the vCPU, once its run loop has started.
    thread: Option<libc::pthread_t>,
}

/// Where a vCPU's run can be stopped or kicked from.
#[derive(Default)]
pub struct Kicker {
    state: Mutex<KickState>,
    stop: AtomicBool,
    /// A kick was sent and its signal not yet seen by the run loop: no need for another
    /// (real-time signals queue, one entry per kick, while they are blocked).
    kick_pending: AtomicBool,
}

impl Kicker {
    fn state(&self) -> MutexGuard<'_, KickState> {
        crate::engine::lock(&self.state)
    }

    fn signal_thread(&self, state: &KickState) {
        let (Some(t), Some(sig)) = (state.thread, chosen_signal()) else {
            return;
        };
        if !self.kick_pending.swap(true, Ordering::SeqCst) {
            // SAFETY: `t` is the live thread that attached itself; it detaches under the
            // same lock before its run ends, so the pthread_t cannot be stale.
            unsafe { libc::pthread_kill(t, sig) };
        }
    }

    /// Stops the current run, or, if none is in progress, the next one (which then ends at
    /// once with reason "stopped"): a stop is never lost to a run that is just starting.
    pub fn request_stop(&self) {
        let state = self.state();
        self.stop.store(true, Ordering::SeqCst);
        self.signal_thread(&state);
    }

    /// Stops the run in progress, if any; no effect on a later run.
    pub fn stop_run(&self) {
        let state = self.state();
        if state.running {
            self.stop.store(true, Ordering::SeqCst);
            self.signal_thread(&state);
        }
    }

    /// Kicks a running vCPU out of `KVM_RUN` so its loop looks at new work (a queued
    /// interrupt) before re-entering the guest.
    pub fn kick(&self) {
        let state = self.state();
        self.signal_thread(&state);
    }

    /// Marks a run as in progress. Fails if one already is.
    pub fn begin(&self) -> bool {
        let mut state = self.state();
        !std::mem::replace(&mut state.running, true)
    }

    /// Attaches the calling thread, which is about to enter its run loop.
    pub fn attach_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        self.state().thread = Some(unsafe { libc::pthread_self() });
    }

    /// Ends the run: a stop requested during it is spent.
    pub fn end(&self) {
        let mut state = self.state();
        state.running = false;
        state.thread = None;
        self.stop.store(false, Ordering::SeqCst);
        self.kick_pending.store(false, Ordering::SeqCst);
    }

    /// Whether a stop was requested for this run.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The run loop saw `KVM_RUN` interrupted: later kicks must be sent again.
    pub fn kick_seen(&self) {
        self.kick_pending.store(false, Ordering::SeqCst);
    }

    /// Whether a run is in progress.
    pub fn running(&self) -> bool {
        self.state().running
    }
}

/// A POSIX timer that sends the kick signal to one thread: created once per vCPU (and again
/// only when another thread runs it). It is not disarmed when a run ends early, and a run
/// whose deadline is no earlier than the expiry still pending keeps that expiry instead of
/// paying a system call to move it: the timer then fires early, the run sees a spurious
/// `EINTR` and re-arms it for its own deadline ([`Timer::rearm_if_fired`]). Back-to-back
/// runs with the same timeout thus cost one `timer_settime` per timeout period, not one
/// per run.
pub struct Timer {
    timer: libc::timer_t,
    tid: libc::pid_t,
    /// When the timer is set to fire, as far as this thread knows (`None`: disarmed).
    expiry: Option<Instant>,
}

// SAFETY: a timer_t is a process-wide handle; it may be used and deleted from any thread.
unsafe impl Send for Timer {}

impl Timer {
    fn create(signal: libc::c_int, tid: libc::pid_t) -> Result<Self> {
        // SAFETY: an all-zero sigevent is a valid value; the fields that matter are set.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = signal;
        sev.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = null_mut();
        // SAFETY: `sev` and `timer` are valid for the call; the result is checked.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(Error::ioctl(
                "timer_create",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(Timer {
            timer,
            tid,
            expiry: None,
        })
    }

    /// Sets the timer to fire at `at` (one system call).
    fn set_at(&mut self, at: Instant, now: Instant) -> Result<()> {
        // A zero it_value disarms the timer, so wait at least one nanosecond.
        let nanos = at.saturating_duration_since(now).as_nanos().max(1);
        self.set(nanos)?;
        self.expiry = Some(at);
        Ok(())
    }

    fn set(&mut self, nanos: u128) -> Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (nanos / 1_000_000_000) as libc::time_t,
                tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `self.timer` is a live timer; `spec` is valid for the call.
        if unsafe { libc::timer_settime(self.timer, 0, &spec, null_mut()) } != 0 {
            return Err(Error::ioctl(
                "timer_settime",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(())
    }

    /// Makes sure `slot`'s timer (created for the calling thread if needed) kicks the
    /// calling thread at `at` or earlier.
    pub fn arm(slot: &mut Option<Timer>, signal: libc::c_int, at: Instant) -> Result<()> {
        let tid = crate::engine::gettid();
        if slot.as_ref().is_some_and(|t| t.tid != tid) {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(Timer::create(signal, tid)?);
        }
        let timer = slot.as_mut().expect("created above");
        let now = Instant::now();
        match timer.expiry {
            // An expiry still to come, no later than `at`: it kicks this run early, and
            // the run re-arms then.
            Some(e) if e > now && e <= at => Ok(()),
            _ => timer.set_at(at, now),
        }
    }

    /// After an `EINTR` before the deadline `at`: if the timer has fired (early, for an
    /// earlier run), sets it again for `at`.
    pub fn rearm_if_fired(slot: &mut Option<Timer>, at: Instant, now: Instant) -> Result<()> {
        match slot.as_mut() {
            Some(timer) if timer.expiry.is_none_or(|e| e <= now) => timer.set_at(at, now),
            _ => Ok(()),
        }
    }

    /// Forgets what the timer is set to, so that the next [`Timer::arm`] sets it: used
    /// when its signal may have been taken by another run on the same thread.
    pub fn forget(slot: &mut Option<Timer>) {
        if let Some(timer) = slot.as_mut() {
            timer.expiry = None;
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: `timer` was created by `create` and is deleted exactly once, here.
        unsafe { libc::timer_delete(self.timer) };
    }
}
