//! Ctrl-C while the main thread runs a vCPU.
//!
//! Python's SIGINT handler only records the signal; the interpreter raises
//! `KeyboardInterrupt` when it next runs Python code. A run loop learns of the signal when
//! it interrupts `KVM_RUN` (`EINTR`). A SIGINT that lands between two entries, while the
//! loop handles an exit in Rust, would be recorded and then never looked at again: the next
//! `KVM_RUN` is not interrupted by a signal already delivered, and a guest that exits only
//! to Rust devices, or not at all, would run on. So, as for the kick, the main thread keeps
//! SIGINT blocked for the length of a run: `KVM_RUN` unblocks it (its signal mask is the
//! thread's mask from before the run), so a SIGINT sent at any moment interrupts the
//! current or the next entry; the loop then lets it through to Python's handler and asks
//! the interpreter to act on it.
//!
//! The price: while a Python handler of that run executes, SIGINT waits, so a handler that
//! blocks (a `sleep`, an `input()`) finishes before Ctrl-C takes effect.

use vmm_sys_util::signal::{block_signal, unblock_signal};

/// SIGINT held back on the main thread for one run; the previous mask comes back on drop.
pub struct CtrlC {
    held: bool,
}

impl CtrlC {
    /// Blocks SIGINT if the calling thread is the main thread and does not block it
    /// already (a program that blocks SIGINT itself keeps it blocked).
    pub fn hold() -> CtrlC {
        // SAFETY: getpid has no preconditions.
        let main = crate::engine::gettid() == unsafe { libc::getpid() };
        let held = main && block_signal(libc::SIGINT).is_ok();
        CtrlC { held }
    }

    /// Lets a pending SIGINT through to its handler (Python's, which records it).
    pub fn deliver(&self) {
        if self.held && unblock_signal(libc::SIGINT).is_ok() {
            // Delivered as the unblocking call returns; block it again for the run.
            let _ = block_signal(libc::SIGINT);
        }
    }
}

impl Drop for CtrlC {
    fn drop(&mut self) {
        if self.held {
            let _ = unblock_signal(libc::SIGINT);
        }
    }
}
