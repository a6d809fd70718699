//! Ctrl-C while the main thread runs a vCPU.
//!
//! Python's SIGINT handler only records the signal; the interpreter raises
//! `KeyboardInterrupt` when it next runs Python code. A run loop learns of the signal when
//! it interrupts `KVM_RUN` (`EINTR`), and then asks the interpreter to act on it. A SIGINT
//! that lands between two entries, while the loop handles an exit in Rust, would be
//! recorded and then never looked at again: a signal already delivered does not interrupt
//! the next `KVM_RUN`, and a guest that exits only to Rust devices, or not at all, would
//! run on. So kvmpy puts a handler of its own in front of SIGINT's: on the main thread it
//! makes the next `KVM_RUN` of the run in progress return at once, as a kick does
//! ([`kick::exit_current_run`]), then it calls the handler SIGINT had (Python's, or the
//! program's own), exactly as the kernel would have. The chain is put in place when a run
//! starts on the main thread, if SIGINT has a handler then (with `SIG_DFL` or `SIG_IGN`
//! there is nothing to chain); a program that later installs another SIGINT handler gets
//! it chained at the next run. Nothing is blocked: a Ctrl-C while a Python handler runs
//! raises `KeyboardInterrupt` in that handler at once, which ends the run with it.

use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::engine::kick;

/// The handler SIGINT had before kvmpy's, and whether it takes `siginfo_t`.
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

type InfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
type PlainHandler = extern "C" fn(libc::c_int);

extern "C" fn on_sigint(num: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: getpid and the gettid system call are async-signal-safe and leave errno
    // alone when they succeed (they cannot fail).
    let main = unsafe { libc::syscall(libc::SYS_gettid) == libc::getpid() as libc::c_long };
    if main {
        // The main thread allocated its kick state before this handler was installed.
        kick::exit_current_run();
    }
    let previous = PREVIOUS.load(Ordering::SeqCst);
    if previous == 0 {
        return;
    }
    if PREVIOUS_SIGINFO.load(Ordering::SeqCst) {
        // SAFETY: `previous` is the SA_SIGINFO handler SIGINT had (see `watch_ctrl_c`),
        // called with the arguments the kernel gave this one.
        let f = unsafe { std::mem::transmute::<usize, InfoHandler>(previous) };
        f(num, info, ctx);
    } else {
        // SAFETY: `previous` is the plain handler SIGINT had (see `watch_ctrl_c`).
        let f = unsafe { std::mem::transmute::<usize, PlainHandler>(previous) };
        f(num);
    }
}

/// Puts kvmpy's SIGINT handler in front of SIGINT's own, if the calling thread is the
/// main thread and SIGINT has a handler (see the module). Call it before a run starts.
pub fn watch_ctrl_c() {
    // SAFETY: getpid has no preconditions.
    if crate::engine::gettid() != unsafe { libc::getpid() } {
        return;
    }
    kick::prepare_thread();
    // SAFETY: an all-zero sigaction is a valid out-parameter.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null `act` only queries the disposition into `current`.
    if unsafe { libc::sigaction(libc::SIGINT, null_mut(), &mut current) } != 0 {
        return;
    }
    let ours = on_sigint as *const () as usize;
    let handler = current.sa_sigaction;
    if handler == ours || handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return;
    }
    // Stored before kvmpy's handler can run with them.
    PREVIOUS_SIGINFO.store(current.sa_flags & libc::SA_SIGINFO != 0, Ordering::SeqCst);
    PREVIOUS.store(handler, Ordering::SeqCst);
    let mut act = current;
    act.sa_sigaction = ours;
    act.sa_flags |= libc::SA_SIGINFO;
    // SAFETY: `act` is SIGINT's own disposition with kvmpy's handler in it, which is
    // async-signal-safe and calls the previous one.
    unsafe { libc::sigaction(libc::SIGINT, &act, null_mut()) };
}
