//! Several vCPUs on native threads: a run group.
//!
//! Each vCPU of a group runs the same run loop as a single run, on a thread of its own.
//! Every member's run is marked as in progress before any thread starts, so a stop of
//! the group (the first error, `until_any`, a close) reaches members whose thread has not
//! begun yet. The first error stops every vCPU of the VM and is kept for `finish`.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::error::{Error, Result};
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;

/// Called at the very end of every vCPU thread, after its run is accounted for and its
/// references to the VM are gone: the face frees what it keeps per thread (a thread state
/// of the interpreter). Whoever waits for a group's threads must not block that work.
static THREAD_END: OnceLock<fn()> = OnceLock::new();

thread_local! {
    static VCPU_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Sets the hook run at the end of every vCPU thread (once; later calls are ignored).
pub fn on_thread_end(hook: fn()) {
    let _ = THREAD_END.set(hook);
}

/// Whether the calling thread is a vCPU thread of a run group.
pub fn in_vcpu_thread() -> bool {
    VCPU_THREAD.with(|v| v.get())
}

/// One `Vm.start()`: its vCPUs, their threads and the first error.
pub struct RunGroup {
    pub vcpus: Vec<Arc<VcpuCore>>,
    until_any: bool,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Default)]
struct GroupState {
    running: usize,
    error: Option<Error>,
    handles: Vec<JoinHandle<()>>,
}

impl RunGroup {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        crate::engine::lock(&self.state)
    }

    /// Starts a thread per vCPU. With `until_any`, the first vCPU to stop stops the others.
    pub fn start(
        vm: &Arc<VmCore>,
        vcpus: Vec<Arc<VcpuCore>>,
        deadline: Option<Instant>,
        until_any: bool,
    ) -> Result<Arc<Self>> {
        for (i, v) in vcpus.iter().enumerate() {
            if let Err(e) = v.reserve() {
                vcpus[..i].iter().for_each(|v| v.unreserve());
                return Err(e);
            }
        }
        let group = Arc::new(RunGroup {
            vcpus: vcpus.clone(),
            until_any,
            state: Mutex::new(GroupState {
                running: vcpus.len(),
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        for (i, v) in vcpus.into_iter().enumerate() {
            let g = Arc::clone(&group);
            let vm_for_thread = Arc::clone(vm);
            let spawned = std::thread::Builder::new()
                .name(format!("kvmpy-vcpu{}", v.id))
                .spawn(move || {
                    VCPU_THREAD.with(|t| t.set(true));
                    g.vcpu_thread(&vm_for_thread, &v, deadline);
                    drop((g, v, vm_for_thread));
                    if let Some(hook) = THREAD_END.get() {
                        hook();
                    }
                });
            match spawned {
                Ok(handle) => group.state().handles.push(handle),
                Err(e) => {
                    // Account for the threads that will never run, stop the others.
                    group.state().running -= group.vcpus.len() - i;
                    group.vcpus[i..].iter().for_each(|v| v.unreserve());
                    vm.stop_all_runs();
                    group.wait(None);
                    group.finish();
                    return Err(Error::Value(format!("cannot start a vCPU thread: {e}")));
                }
            }
        }
        Ok(group)
    }

    fn vcpu_thread(&self, vm: &VmCore, vcpu: &VcpuCore, deadline: Option<Instant>) {
        let result = vcpu.run_in_background(deadline);
        let failed = result.is_err();
        if failed || self.until_any {
            vm.stop_all_runs();
        }
        let mut state = self.state();
        if let Err(e) = result {
            state.error.get_or_insert(e);
        }
        state.running -= 1;
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until every vCPU thread has stopped, at most `timeout`; true when they have.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        crate::engine::wait_while(&self.changed, self.state(), timeout, |s| s.running > 0).1
    }

    /// Joins the finished threads, but the calling thread if it is one of them, and leaves
    /// the first error for [`RunGroup::finish`]. Call after `wait` returned true.
    pub fn join_threads(&self) {
        let me = std::thread::current().id();
        let handles = std::mem::take(&mut self.state().handles);
        for h in handles {
            if h.thread().id() != me {
                // A thread that panicked has already counted itself out.
                let _ = h.join();
            }
        }
    }

    /// Joins the finished threads and returns the first error, if any. Call after `wait`
    /// returned true.
    pub fn finish(&self) -> Option<Error> {
        self.join_threads();
        self.state().error.take()
    }
}
