//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the
//! running vCPU's `immediate_exit`, the pattern Firecracker and cloud-hypervisor use.
//!
//! Setting `immediate_exit` from the handler closes the race where the signal lands
//! between two `KVM_RUN` calls: the next `KVM_RUN` then returns `EINTR` at once.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::error::{Error, Result};

thread_local! {
    /// The `kvm_run` area of the vCPU this thread is running, or null.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: one TLS read and one volatile store. The TLS slot is
    // always touched in normal context (`Registration::new`) before this thread can be
    // signalled, so reading it does not allocate.
    let run = RUNNING.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is set only while `Registration` lives, and `Registration` is dropped
        // before the vCPU fd (and so its `kvm_run` mapping) can be closed: the vCPU's run
        // state keeps `close()` waiting until the run has ended.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal's handler once per process.
pub fn ensure_handler() -> Result<()> {
    REGISTERED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Value(format!("cannot install the vCPU kick signal handler: {e}")))
}

/// Where a running vCPU can be kicked: the thread running it, while it runs.
#[derive(Default)]
pub struct Kicker {
    thread: Mutex<Option<libc::pthread_t>>,
    stop: AtomicBool,
}

impl Kicker {
    /// Asks the vCPU to stop and kicks its thread out of `KVM_RUN` if it is running.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is the live thread that registered itself; it removes itself under
            // this same lock before it can exit, so the pthread_t cannot be stale.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Kicks the running vCPU's thread out of `KVM_RUN` without asking it to stop, so its
    /// run loop looks at new work (a queued interrupt) before re-entering the guest.
    pub fn kick(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: as in `stop`: the registered thread is alive while registered.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Whether a stop was requested, clearing the request.
    pub fn take_stop(&self) -> bool {
        // Load first: the run loop asks on every exit, and a plain load is cheaper than a swap.
        self.stop.load(Ordering::SeqCst) && self.stop.swap(false, Ordering::SeqCst)
    }

    /// Whether a stop is pending (without clearing it).
    pub fn stop_pending(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Marks the current thread as running a vCPU for as long as it lives.
pub struct Registration<'a> {
    kicker: &'a Kicker,
}

impl<'a> Registration<'a> {
    /// Registers the current thread, whose `KVM_RUN` uses `run`.
    pub fn new(kicker: &'a Kicker, run: *mut kvm_run) -> Self {
        RUNNING.with(|r| r.set(run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *kicker.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        Registration { kicker }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        *self.kicker.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        RUNNING.with(|r| r.set(null_mut()));
    }
}

/// A one-shot POSIX timer that sends the kick signal to the current thread at a deadline.
pub struct Deadline {
    timer: libc::timer_t,
    pub at: Instant,
}

impl Deadline {
    /// Arms a timer for `at` that kicks the calling thread.
    pub fn arm(at: Instant) -> Result<Self> {
        // SAFETY: an all-zero sigevent is a valid value; the fields that matter are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = null_mut();
        // SAFETY: `sev` and `timer` are valid for the call; the result is checked.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(Error::ioctl(
                "timer_create",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        let left = at.saturating_duration_since(Instant::now());
        // A zero it_value disarms the timer, so wait at least one nanosecond.
        let nanos = left.as_nanos().max(1);
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
        // SAFETY: `timer` was created above; `spec` is valid for the call.
        if unsafe { libc::timer_settime(timer, 0, &spec, null_mut()) } != 0 {
            let err = vmm_sys_util::errno::Error::last();
            // SAFETY: `timer` was created above and is deleted once.
            unsafe { libc::timer_delete(timer) };
            return Err(Error::ioctl("timer_settime", err));
        }
        Ok(Deadline { timer, at })
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // SAFETY: `timer` was created by `arm` and is deleted exactly once, here.
        unsafe { libc::timer_delete(self.timer) };
    }
}
