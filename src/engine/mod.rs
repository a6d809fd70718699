//! The engine: VMs, vCPUs and their run loop, guest memory, the device bus, kicks, exits
//! and run groups. It knows nothing of Python: the face (`py`) drives it, and so can Rust
//! code and tests.

pub mod breakpoints;
pub mod bus;
pub mod complete;
pub mod debug;
pub mod error;
pub mod exit;
pub mod fuzz;
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

thread_local! {
    static TID: libc::pid_t = {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    };
}

/// The calling thread's id (asked of the kernel once per thread: a system call costs
/// about a microsecond on a nested host, and the run loop needs it on every run).
pub fn gettid() -> libc::pid_t {
    TID.with(|t| *t)
}
