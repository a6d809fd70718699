//! The engine: VMs, vCPUs and their run loop, guest memory, the device bus, kicks, exits
//! and run groups. It knows nothing of Python: the face (`py`) drives it, and so can Rust
//! code and tests.

pub mod afl;
pub mod allstop;
pub mod breakpoints;
pub mod bus;
pub mod campaign;
pub mod complete;
pub mod coverage;
pub mod debug;
pub mod debug_host;
pub mod debug_regs;
pub mod error;
pub mod exit;
pub mod fuzz;
pub mod gdb;
pub mod hw_breakpoints;
pub mod internal_error;
pub mod kick;
pub mod kvm;
pub mod load;
pub mod memory;
pub mod run;
pub mod runner;
pub mod setup;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod watch;
pub mod watch_vcpu;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

pub use bus::{Action, Bus, Device, Token};
pub use error::{Error, Result};
pub use exit::{Data, Exit, Reason};
pub use run::{Outcome, RunOptions, VcpuCtx};
pub use vcpu::VcpuCore;
pub use vm::{RegionOptions, VmCore};

/// Locks `m`, also when a thread panicked while holding it (the data it guards stays
/// consistent: every critical section in the crate leaves it whole).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `changed` while `waiting(&guard)` holds, at most `timeout`; returns the guard
/// and whether the wait ended because `waiting` stopped holding.
pub fn wait_while<'a, T>(
    changed: &std::sync::Condvar,
    mut guard: std::sync::MutexGuard<'a, T>,
    timeout: Option<std::time::Duration>,
    waiting: impl Fn(&T) -> bool,
) -> (std::sync::MutexGuard<'a, T>, bool) {
    let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
    while waiting(&guard) {
        let slice = match deadline {
            Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return (guard, false),
            },
            None => std::time::Duration::from_secs(3600),
        };
        guard = changed
            .wait_timeout(guard, slice)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    (guard, true)
}

/// How many times this process is a child of a `fork` (kept by a `pthread_atfork` handler):
/// a thread id cached before a fork is not the child's.
static FORKS: AtomicU64 = AtomicU64::new(0);
static WATCH_FORKS: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

thread_local! {
    /// The thread's id, and the fork count it was asked under.
    static TID: Cell<(u64, libc::pid_t)> = const { Cell::new((u64::MAX, 0)) };
}

/// The calling thread's id (asked of the kernel once per thread, and again in a child
/// after `fork`: a system call costs about a microsecond on a nested host, and the run
/// loop needs it on every run).
pub fn gettid() -> libc::pid_t {
    WATCH_FORKS.call_once(|| {
        // SAFETY: the handler only increments an atomic, which is async-signal-safe as
        // a child handler must be; the result (ENOMEM at worst) leaves the cache as it
        // was before this existed.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    let forks = FORKS.load(Ordering::Relaxed);
    TID.with(|t| match t.get() {
        (seen, tid) if seen == forks => tid,
        _ => {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            t.set((forks, tid));
            tid
        }
    })
}
