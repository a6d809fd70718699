//! Several vCPUs on native threads: `Vm.start()`, `join()`, `run()` and `stop()`.
//!
//! Each vCPU of a group runs the same run loop as `Vcpu.run()`, on a thread of its own.
//! Rust devices run truly in parallel; Python handlers run one at a time under the GIL.
//! The first handler exception stops every vCPU of the VM and is kept for `join()`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::PyErr;

use crate::error::{Error, Result};
use crate::vcpu::VcpuInner;
use crate::vm::VmInner;

/// One `Vm.start()`: its vCPUs, their threads and the first error.
pub struct RunGroup {
    pub vcpus: Vec<Arc<VcpuInner>>,
    until_any: bool,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Default)]
struct GroupState {
    running: usize,
    error: Option<PyErr>,
    handles: Vec<JoinHandle<()>>,
}

impl RunGroup {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a thread per vCPU. With `until_any`, the first vCPU to stop stops the others.
    pub fn start(
        vm: &Arc<VmInner>,
        vcpus: Vec<Arc<VcpuInner>>,
        deadline: Option<Instant>,
        until_any: bool,
    ) -> Result<Arc<Self>> {
        for v in &vcpus {
            v.prepare_background_run()?;
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
                .spawn(move || g.vcpu_thread(&vm_for_thread, &v, deadline));
            match spawned {
                Ok(handle) => group.state().handles.push(handle),
                Err(e) => {
                    // Account for the threads that will never run, stop the others.
                    group.state().running -= group.vcpus.len() - i;
                    vm.stop_all();
                    group.wait(None);
                    group.finish();
                    return Err(Error::Value(format!("cannot start a vCPU thread: {e}")));
                }
            }
        }
        Ok(group)
    }

    fn vcpu_thread(&self, vm: &VmInner, vcpu: &VcpuInner, deadline: Option<Instant>) {
        let result = vcpu.run_in_background(deadline);
        let failed = result.is_err();
        if failed || self.until_any {
            vm.stop_all();
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
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut state = self.state();
        while state.running > 0 {
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            state = self
                .changed
                .wait_timeout(state, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Joins the finished threads and returns the first error, if any. Call after `wait`
    /// returned true.
    pub fn finish(&self) -> Option<PyErr> {
        let (handles, error) = {
            let mut state = self.state();
            (std::mem::take(&mut state.handles), state.error.take())
        };
        for h in handles {
            // A panicking vCPU thread has already been accounted for; nothing to add.
            let _ = h.join();
        }
        error
    }
}
