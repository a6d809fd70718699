//! Stopping a vCPU that runs in `KVM_RUN`, from any thread, with no lost kick.
//!
//! The design is Firecracker's, with no per-entry cost: the kick is a real-time signal
//! that stays unblocked, and `KVM_RUN` runs with the thread's own mask (no
//! `KVM_SET_SIGNAL_MASK`, whose mask swap KVM would otherwise pay on every entry and
//! exit). A kick that arrives while the thread is in `KVM_RUN`, or about to enter it
//! with the signal pending, makes `KVM_RUN` return `EINTR`. A kick that arrives anywhere
//! else (in a device, a handler, between two entries) runs the signal's handler, which
//! sets `immediate_exit` in the `kvm_run` of the run the thread is in ([`Entered`]): the
//! next `KVM_RUN` then returns `EINTR` at once instead of entering the guest. Either way
//! the run loop clears the flag and then looks at what the kick was for (a stop, a
//! deadline, a queued interrupt), so a kick is never lost and never acts twice.
//!
//! The innermost run is a stack, not one cell: a device of vCPU A that runs vCPU B on the
//! same thread makes B the target of kicks until B's run ends, then A again. A kick meant
//! for A that B takes is not lost either: A checks its own stop request, deadline and
//! interrupts before each entry, after B's run has returned.
//!
//! The handler is installed with `SA_RESTART`, so a kick that lands while a handler blocks
//! in a system call restarts that call (a `read`, a `write`, a `wait`); the calls the
//! kernel never restarts (`sleep`, `poll`, `select`) return `EINTR`, which Python retries
//! on its own (PEP 475). The kick is the first real-time signal from `SIGRTMIN+1` on that
//! has no handler when kvmpy first needs one; a handler the host program installed is
//! never replaced. Timeouts are a POSIX timer per vCPU, created once and re-armed only
//! when needed, that sends the kick to the running thread.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{SIGRTMAX, SIGRTMIN};

use crate::engine::error::{Error, Result};

static SIGNAL: OnceLock<std::result::Result<libc::c_int, String>> = OnceLock::new();

thread_local! {
    /// `immediate_exit` of the innermost run on this thread (null: none).
    static CURRENT: Cell<*mut u8> = const { Cell::new(null_mut()) };
    /// A kick (or a SIGINT, see [`exit_current_run`]) reached this thread since its run
    /// loop last looked: set by the signal handler, cleared by the loop.
    static KICKED: AtomicBool = const { AtomicBool::new(false) };
}

/// The part of a kick that may run in a signal handler: makes the next `KVM_RUN` of the
/// run the calling thread is in (if any) return at once. Async-signal-safe, but it reads
/// thread-local storage: call it only on a thread that has entered a run before (which
/// allocated that storage), as the kick's own targets and the main thread of a process
/// that ran a vCPU on it have.
pub fn exit_current_run() {
    let _ = KICKED.try_with(|k| k.store(true, Ordering::SeqCst));
    let _ = CURRENT.try_with(|c| {
        let flag = c.get();
        if !flag.is_null() {
            // SAFETY: `flag` is `immediate_exit` in the `kvm_run` mapping of the run this
            // thread is in: `Entered` sets it for exactly as long as that run holds its
            // vCPU fd (which keeps the mapping), and the handler runs on this same thread.
            // Every other access to the byte during the run is atomic too.
            unsafe { AtomicU8::from_ptr(flag) }.store(1, Ordering::SeqCst);
        }
    });
}

extern "C" fn on_kick(_num: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let code = unsafe { (*info).si_code };
    // Only kvmpy's own kicks: a thread kick (pthread_kill) or a vCPU timer, both aimed at
    // a thread that has entered a run. A stray `kill` of the whole process may land on
    // any thread and is ignored here (it still interrupts a KVM_RUN in progress).
    if code == libc::SI_TKILL || code == libc::SI_TIMER {
        exit_current_run();
    }
}

/// The run a thread is in, for the kick's handler, from [`Entered::new`] until drop;
/// the run it was nested in (if any) is the target again after that.
pub struct Entered {
    outer: *mut u8,
}

impl Entered {
    /// Makes `fd`'s `immediate_exit` the target of kicks on this thread.
    ///
    /// # Safety
    /// `fd` must stay open until the returned value is dropped, on this thread, and its
    /// `immediate_exit` must meanwhile be written only through this module.
    pub unsafe fn new(fd: &mut VcpuFd) -> Entered {
        prepare_thread();
        let outer = CURRENT.with(|c| c.replace(exit_flag(fd)));
        Entered { outer }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.outer));
    }
}

/// `immediate_exit` in `fd`'s `kvm_run` mapping, which stays where it is while `fd` is
/// open.
fn exit_flag(fd: &mut VcpuFd) -> *mut u8 {
    &mut fd.get_kvm_run().immediate_exit
}

/// Writes `fd`'s `immediate_exit` atomically, as the kick's handler may write it at any
/// moment on this thread.
pub fn set_immediate_exit(fd: &mut VcpuFd, value: u8) {
    // SAFETY: the byte is in `fd`'s live `kvm_run` mapping, borrowed for the call.
    unsafe { AtomicU8::from_ptr(exit_flag(fd)) }.store(value, Ordering::SeqCst);
}

/// Clears `fd`'s `immediate_exit` after `KVM_RUN` returned `EINTR`: the caller must look
/// at what kicks are for (stop, deadline, interrupts) after this, not before.
pub fn clear(fd: &mut VcpuFd) {
    let _ = KICKED.try_with(|k| k.store(false, Ordering::SeqCst));
    set_immediate_exit(fd, 0);
}

/// Whether a kick reached this thread since the last [`clear`].
pub fn kicked() -> bool {
    KICKED
        .try_with(|k| k.load(Ordering::SeqCst))
        .unwrap_or(false)
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
        // SAFETY: `act` is fully initialised and `on_kick` is async-signal-safe.
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

/// Allocates this thread's kick state (see [`exit_current_run`]) before any signal can
/// need it.
pub fn prepare_thread() {
    let _ = CURRENT.try_with(|c| c.get());
    let _ = KICKED.try_with(|k| k.load(Ordering::Relaxed));
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
#[repr(C)]
pub struct Kicker {
    /// First: the run loop reads it on every exit (see `VcpuCore`'s layout).
    stop: AtomicBool,
    /// Boxed: it is used only when a run begins or ends and when a kick is sent, and in
    /// place it would push the fd's lock past the start of the vCPU's second cache line.
    state: Box<Mutex<KickState>>,
}

impl Kicker {
    fn state(&self) -> MutexGuard<'_, KickState> {
        crate::engine::lock(&self.state)
    }

    fn signal_thread(&self, state: &KickState) {
        let (Some(t), Some(sig)) = (state.thread, chosen_signal()) else {
            return;
        };
        // SAFETY: `t` is the live thread that attached itself; it detaches under the
        // same lock before its run ends, so the pthread_t cannot be stale.
        unsafe { libc::pthread_kill(t, sig) };
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

    /// Attaches the calling thread, which is about to enter its run loop (inside an
    /// [`Entered`]).
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
    }

    /// Whether a stop was requested for this run.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_flag_comes_first() {
        // VcpuCore keeps the kicker on its first cache line for this field.
        assert_eq!(std::mem::offset_of!(Kicker, stop), 0);
    }
}
