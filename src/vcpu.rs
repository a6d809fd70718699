//! vCPUs and the native run loop.
//!
//! `run()` releases the GIL and loops on `KVM_RUN` on the calling thread. Each exit is
//! converted once (`exit::run_once`), looked up in the VM's handler table, and either
//! handled by a Rust device without the GIL, handed to a Python handler (the GIL is taken
//! once for that call and the vCPU lock released so the handler may use the vCPU), or
//! returned to the caller.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use kvm_ioctls::{SyncReg, VcpuFd};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::arch::x86_64 as x86;
use crate::devices::hostcall::HostCallDev;
use crate::dispatch::Handler;
use crate::error::{Error, Result};
use crate::exit::{self, Data, Exit, IoRaw, RunExit};
use crate::kick::{self, Deadline, Kicker, Registration};
use crate::kvm::CpuidEntry;
use crate::regs::{Regs, Sregs};
use crate::vm::VmInner;

pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The state of one vCPU, shared by its Python object and its VM.
pub struct VcpuInner {
    pub id: u64,
    pub vm: Arc<VmInner>,
    fd: Mutex<Option<VcpuFd>>,
    /// The thread id running `run()`, if any.
    runner: Mutex<Option<libc::pid_t>>,
    run_ended: Condvar,
    pub kicker: Kicker,
    exits: AtomicU64,
    python_calls: AtomicU64,
    /// The IN or MMIO read that `run()` returned unanswered, until the next run.
    pending_read: Mutex<Option<PendingRead>>,
    /// Interrupt vectors queued by `interrupt()`, injected when the guest can take them.
    interrupts: Mutex<VecDeque<u32>>,
    /// Whether `interrupts` is non-empty, so the run loop need not lock it on every exit.
    interrupts_queued: AtomicBool,
    /// How the last run ended.
    last: Mutex<Option<Last>>,
    /// Whether the general registers are mirrored in `kvm_run` (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// Whether KVM has filled the mirror: from the first return of `KVM_RUN` on, registers
    /// are read and written there instead of with ioctls.
    regs_mirrored: AtomicBool,
}

/// How the last run of a vCPU ended: an owned exit, made into a Python object on demand.
enum Last {
    Exit(Exit),
    Object(Py<PyAny>),
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// A read exit returned to the caller, waiting for `respond()`.
#[derive(Clone, Copy)]
enum PendingRead {
    Io { io: IoRaw, index: u32 },
    Mmio { addr: u64, size: u8 },
}

/// How a run ended.
enum Outcome {
    /// An exit nobody handled (or a Rust device's stop): built into a Python object later.
    Exit(Exit),
    /// A handler called `stop()` on this exit object.
    Stopped(Py<PyAny>),
    Error(PyErr),
}

impl From<Error> for Outcome {
    fn from(e: Error) -> Self {
        Outcome::Error(e.into())
    }
}

/// What a Python handler answered.
struct Answer {
    data: Option<Data>,
    stopped: Option<Py<PyAny>>,
}

/// Clears the vCPU's runner when a run ends, however it ends.
struct RunGuard<'a>(&'a VcpuInner);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        *self.0.runner.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.run_ended.notify_all();
    }
}

impl VcpuInner {
    /// Wraps a new vCPU fd; with `sync_regs`, KVM is asked to mirror the general registers
    /// in `kvm_run` on every exit.
    pub fn new(id: u64, vm: Arc<VmInner>, mut fd: VcpuFd, sync_regs: bool) -> Self {
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        VcpuInner {
            id,
            vm,
            fd: Mutex::new(Some(fd)),
            runner: Mutex::new(None),
            run_ended: Condvar::new(),
            kicker: Kicker::default(),
            exits: AtomicU64::new(0),
            python_calls: AtomicU64::new(0),
            pending_read: Mutex::new(None),
            interrupts: Mutex::new(VecDeque::new()),
            interrupts_queued: AtomicBool::new(false),
            last: Mutex::new(None),
            sync_regs,
            regs_mirrored: AtomicBool::new(false),
        }
    }

    /// The thread running this vCPU, if any.
    pub fn runner(&self) -> Option<libc::pid_t> {
        *self.runner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The general registers: from `kvm_run`'s mirror once KVM has filled it (no ioctl),
    /// otherwise with `KVM_GET_REGS`. Changes made with `write_regs` are included.
    fn read_regs(&self, fd: &mut VcpuFd) -> Result<kvm_regs> {
        if self.regs_mirrored.load(Ordering::Relaxed) {
            return Ok(fd.sync_regs_mut().regs);
        }
        fd.get_regs().map_err(|e| Error::ioctl("KVM_GET_REGS", e))
    }

    /// Sets the general registers: in `kvm_run`'s mirror, marked dirty so KVM loads them
    /// when the guest is entered next (before it completes a pending I/O, as KVM_SET_REGS
    /// would), or with `KVM_SET_REGS` before the first run.
    fn write_regs(&self, fd: &mut VcpuFd, regs: &kvm_regs) -> Result<()> {
        if self.regs_mirrored.load(Ordering::Relaxed) {
            fd.sync_regs_mut().regs = *regs;
            fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        fd.set_regs(regs)
            .map_err(|e| Error::ioctl("KVM_SET_REGS", e))
    }

    /// Reads the registers, lets `f` change them, writes them back.
    fn update_regs(&self, fd: &mut VcpuFd, f: impl FnOnce(&mut kvm_regs)) -> Result<()> {
        let mut r = self.read_regs(fd)?;
        f(&mut r);
        self.write_regs(fd, &r)
    }

    /// Marks the vCPU as run by the current thread. `clear_stop` forgets a stop requested
    /// before the run (background runs clear it when they are started instead).
    fn begin_run(&self, clear_stop: bool) -> Result<RunGuard<'_>> {
        let mut runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tid) = *runner {
            return Err(Error::Busy(if tid == gettid() {
                format!("vCPU {} is already running on this thread (run() called from its own handler?)", self.id)
            } else {
                format!("vCPU {} is already running on another thread", self.id)
            }));
        }
        // A stop requested before this run began is stale; one requested from now on counts.
        if clear_stop {
            self.kicker.take_stop();
        }
        *runner = Some(gettid());
        Ok(RunGuard(self))
    }

    /// Checks that a background run can start, and forgets stale stop requests.
    pub fn prepare_background_run(&self) -> Result<()> {
        if self.runner().is_some() {
            return Err(Error::Busy(format!("vCPU {} is already running", self.id)));
        }
        self.kicker.take_stop();
        Ok(())
    }

    /// The body of a vCPU thread: runs until the loop ends and records how.
    pub fn run_in_background(&self, deadline: Option<Instant>) -> PyResult<()> {
        let _running = self.begin_run(false)?;
        let last = match self.run_loop(deadline) {
            Outcome::Exit(exit) => Last::Exit(exit),
            Outcome::Stopped(obj) => Last::Object(obj),
            Outcome::Error(e) => {
                self.set_last(None);
                return Err(e);
            }
        };
        self.set_last(Some(last));
        Ok(())
    }

    fn set_last(&self, last: Option<Last>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = last;
    }

    /// The exit that ended the last run, as a Python object.
    pub fn last_exit(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let obj = match last.as_ref() {
            None => return Ok(None),
            Some(Last::Object(obj)) => obj.clone_ref(py),
            Some(Last::Exit(exit)) => exit::to_python(py, exit, self.id)?,
        };
        *last = Some(Last::Object(obj.clone_ref(py)));
        Ok(Some(obj))
    }

    /// Stops a run in progress, waits for it to end, and closes the vCPU fd.
    /// Must be called with the GIL released.
    pub fn close(&self) {
        self.kicker.stop();
        let mut runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        while runner.is_some() {
            let (r, _) = self
                .run_ended
                .wait_timeout(runner, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner());
            runner = r;
            if runner.is_some() {
                // The first kick may have landed before the runner entered KVM_RUN's loop.
                self.kicker.stop();
            }
        }
        drop(runner);
        self.fd.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Locks the fd for a quick operation from Python. Fails (rather than blocking while
    /// holding the GIL) when another thread is running the vCPU.
    fn lock_fd(&self) -> Result<MutexGuard<'_, Option<VcpuFd>>> {
        if let Some(tid) = self.runner() {
            if tid != gettid() {
                return Err(Error::Busy(format!(
                    "vCPU {} is running on another thread; stop it first",
                    self.id
                )));
            }
        }
        match self.fd.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => {
                Err(Error::Busy(format!("vCPU {} is running", self.id)))
            }
        }
    }

    fn with_fd<T>(&self, f: impl FnOnce(&mut VcpuFd) -> Result<T>) -> Result<T> {
        let mut guard = self.lock_fd()?;
        let fd = guard.as_mut().ok_or(Error::Closed("vCPU"))?;
        f(fd)
    }

    fn lock_run_fd(&self) -> MutexGuard<'_, Option<VcpuFd>> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run loop; called with the GIL released.
    fn run_loop(&self, deadline: Option<Instant>) -> Outcome {
        if let Err(e) = kick::ensure_handler() {
            return e.into();
        }
        let mut guard: FdGuard<'_> = Some(self.lock_run_fd());
        let fd = match fd_of(&mut guard) {
            Ok(fd) => fd,
            Err(e) => return e.into(),
        };
        fd.set_kvm_immediate_exit(0);
        let _registration = Registration::new(&self.kicker, fd.get_kvm_run());
        self.set_pending(None);
        let timer = match deadline.map(Deadline::arm).transpose() {
            Ok(t) => t,
            Err(e) => return e.into(),
        };
        // Whether the last exit was port I/O or MMIO handled here: KVM finishes such an
        // access (registers, RIP) only when the guest is entered again.
        let mut handled_access = false;
        let outcome = loop {
            if self.kicker.take_stop() || self.vm.is_closed() {
                if handled_access {
                    self.complete_pending(&mut guard);
                }
                break Outcome::Exit(Exit::Stopped);
            }
            let fd = match fd_of(&mut guard) {
                Ok(fd) => fd,
                Err(e) => break e.into(),
            };
            if let Err(e) = self.inject_interrupt(fd) {
                break e.into();
            }
            let result = exit::run_once(fd);
            self.exits.fetch_add(1, Ordering::Relaxed);
            if self.sync_regs {
                // KVM stores the registers in kvm_run on every return from KVM_RUN.
                self.regs_mirrored.store(true, Ordering::Relaxed);
            }
            handled_access = matches!(
                result,
                Ok(RunExit::Io(_)) | Ok(RunExit::Other(Exit::Mmio { .. }))
            );
            match result {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    fd.set_kvm_immediate_exit(0);
                    if self.kicker.stop_pending() {
                        continue;
                    }
                    if timer.as_ref().is_some_and(|t| t.passed()) {
                        break Outcome::Exit(Exit::Timeout);
                    }
                    // Maybe SIGINT: let Python's handler run (it raises KeyboardInterrupt).
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        break Outcome::Error(e);
                    }
                }
                Err(e) => break Error::ioctl("KVM_RUN", e).into(),
                Ok(RunExit::Io(io)) => match self.handle_io(&mut guard, io) {
                    Ok(None) => {}
                    Ok(Some(outcome)) => break outcome,
                    Err(e) => break Outcome::Error(e),
                },
                Ok(RunExit::Other(exit)) => match self.handle_other(&mut guard, exit) {
                    Ok(None) => {}
                    Ok(Some(outcome)) => break outcome,
                    Err(e) => break Outcome::Error(e),
                },
            }
        };
        drop(timer);
        if let Ok(fd) = fd_of(&mut guard) {
            fd.set_kvm_immediate_exit(0);
        }
        outcome
    }

    /// Injects the next queued interrupt if the guest can take it now, otherwise asks KVM
    /// to exit as soon as it can (`request_interrupt_window`).
    fn inject_interrupt(&self, fd: &mut VcpuFd) -> Result<()> {
        if !self.interrupts_queued.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut queue = self.interrupts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&vector) = queue.front() else {
            return Ok(());
        };
        let run = fd.get_kvm_run();
        if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
            let irq = kvm_bindings::kvm_interrupt { irq: vector };
            // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the given reference, which
            // lives across the call; the fd is a vCPU fd; the result is checked.
            let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_INTERRUPT(), &irq) };
            if ret != 0 {
                return Err(Error::ioctl(
                    "KVM_INTERRUPT",
                    vmm_sys_util::errno::Error::last(),
                ));
            }
            queue.pop_front();
            self.interrupts_queued
                .store(!queue.is_empty(), Ordering::Release);
        }
        fd.get_kvm_run().request_interrupt_window = u8::from(!queue.is_empty());
        Ok(())
    }

    /// Queues an interrupt and kicks the vCPU so a running guest gets it promptly.
    fn queue_interrupt(&self, vector: u32) {
        let mut queue = self.interrupts.lock().unwrap_or_else(|e| e.into_inner());
        queue.push_back(vector);
        self.interrupts_queued.store(true, Ordering::Release);
        drop(queue);
        self.kicker.kick();
    }

    fn has_queued_interrupts(&self) -> bool {
        self.interrupts_queued.load(Ordering::Acquire)
    }

    /// Handles a port I/O exit, element by element for string I/O.
    fn handle_io<'a>(&'a self, guard: &mut FdGuard<'a>, io: IoRaw) -> PyResult<Option<Outcome>> {
        let table = self.vm.handlers();
        let mut stopped = None;
        for i in 0..io.count.max(1) {
            let element = exit::io_element(fd_of(guard)?, io, i);
            let data = if io.is_write {
                Data::new(element)
            } else {
                Data::default()
            };
            let access = Exit::Io {
                port: io.port,
                size: io.size,
                count: io.count,
                is_write: io.is_write,
                data,
            };
            match table.io(io.port) {
                Some(Handler::Console(dev)) => {
                    if io.is_write {
                        dev.write(element);
                    } else {
                        element.fill(0);
                    }
                }
                Some(Handler::Uart(dev)) => {
                    for (k, b) in element.iter_mut().enumerate() {
                        let port = io.port.wrapping_add(k as u16);
                        if io.is_write {
                            dev.write(port, *b);
                        } else {
                            *b = dev.read(port);
                        }
                    }
                }
                Some(Handler::HostCall(dev)) => {
                    if io.is_write {
                        let dev = Arc::clone(dev);
                        self.host_call(guard, &dev, data.value() as u32)?;
                    } else {
                        element.fill(0);
                    }
                }
                Some(Handler::Exception(dev)) => {
                    if !io.is_write {
                        element.fill(0);
                        continue;
                    }
                    let mut report = [0u8; x86::idt::report::SIZE];
                    self.vm.read_memory(dev.report, &mut report)?;
                    self.complete_pending(guard);
                    return Ok(Some(Outcome::Exit(dev.exit(&report))));
                }
                Some(Handler::ExitPort(dev)) => {
                    if io.is_write {
                        let (port, code) = (dev.port, dev.code(data.value()));
                        // Finish the OUT so the vCPU's state is consistent when read.
                        self.complete_pending(guard);
                        return Ok(Some(Outcome::Exit(Exit::Guest { port, code })));
                    }
                    element.fill(0);
                }
                Some(Handler::Python(f)) => {
                    let answer = self.call_python(guard, f, &access, io.size)?;
                    if let Some(d) = answer.data {
                        exit::io_element(fd_of(guard)?, io, i).copy_from_slice(d.as_slice());
                    }
                    if answer.stopped.is_some() && stopped.is_none() {
                        stopped = answer.stopped;
                    }
                }
                None => {
                    if !io.is_write {
                        self.set_pending(Some(PendingRead::Io { io, index: i }));
                    }
                    return Ok(Some(Outcome::Exit(access)));
                }
            }
        }
        match stopped {
            Some(obj) => {
                self.complete_pending(guard);
                Ok(Some(Outcome::Stopped(obj)))
            }
            None => Ok(None),
        }
    }

    /// Handles every exit other than port I/O.
    fn handle_other<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        exit: Exit,
    ) -> PyResult<Option<Outcome>> {
        match exit {
            Exit::Mmio {
                addr,
                size,
                is_write,
                ..
            } => {
                let table = self.vm.handlers();
                let Some((Handler::Python(f), _start)) = table.mmio(addr) else {
                    if !is_write {
                        self.set_pending(Some(PendingRead::Mmio { addr, size }));
                    }
                    return Ok(Some(Outcome::Exit(exit)));
                };
                let answer = self.call_python(guard, f, &exit, size)?;
                if let (Some(d), false) = (answer.data, is_write) {
                    exit::mmio_data(fd_of(guard)?).copy_from_slice(d.as_slice());
                }
                if answer.stopped.is_some() {
                    self.complete_pending(guard);
                }
                Ok(answer.stopped.map(Outcome::Stopped))
            }
            Exit::Hlt => {
                if self.has_queued_interrupts() {
                    // The interrupt wakes the guest: inject it and go on.
                    return Ok(None);
                }
                let table = self.vm.handlers();
                let Some(f) = table.hlt() else {
                    return Ok(Some(Outcome::Exit(exit)));
                };
                let answer = self.call_python(guard, f, &exit, 0)?;
                Ok(answer.stopped.map(Outcome::Stopped))
            }
            Exit::IrqWindowOpen => Ok(None),
            other => Ok(Some(Outcome::Exit(other))),
        }
    }

    /// Calls host function `number` with the guest's argument registers and puts the
    /// result in RAX. The vCPU lock is released while Python runs, as for handlers.
    fn host_call<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        dev: &HostCallDev,
        number: u32,
    ) -> PyResult<()> {
        let r = self.read_regs(fd_of(guard)?)?;
        let args = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        guard.take();
        self.python_calls.fetch_add(1, Ordering::Relaxed);
        let result = Python::attach(|py| -> PyResult<u64> {
            let Some((f, nargs)) = dev.get(py, number) else {
                return Err(PyValueError::new_err(format!(
                    "the guest called host function {number} (port {:#x}), which is not registered",
                    dev.port
                )));
            };
            let args = pyo3::types::PyTuple::new(py, &args[..nargs])?;
            let ret = f.call1(py, args)?;
            let ret = ret.bind(py);
            if ret.is_none() {
                return Ok(0);
            }
            if ret.cast::<pyo3::types::PyInt>().is_err() {
                return Err(PyTypeError::new_err(format!(
                    "host function {number} ({}) returned {}; it must return an int or None",
                    describe(f.bind(py)),
                    type_name(ret)
                )));
            }
            ret.extract::<u64>()
                .or_else(|_| ret.extract::<i64>().map(|v| v as u64))
                .map_err(|_| {
                    PyValueError::new_err(format!(
                        "host function {number} ({}) returned {ret}, which does not fit in 64 bits",
                        describe(f.bind(py))
                    ))
                })
        });
        *guard = Some(self.lock_run_fd());
        let value = result?;
        self.update_regs(fd_of(guard)?, |r| r.rax = value)?;
        Ok(())
    }

    /// Re-enters the guest with `immediate_exit` set so KVM completes a pending IN or MMIO
    /// read (the KVM API requires this before the vCPU's state is read).
    fn complete_pending(&self, guard: &mut FdGuard<'_>) {
        if let Ok(fd) = fd_of(guard) {
            fd.set_kvm_immediate_exit(1);
            // Expected to fail with EINTR once the pending access is completed.
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
        }
    }

    /// Calls a Python handler with the GIL, releasing the vCPU lock for the duration so the
    /// handler can read and write this vCPU's registers.
    fn call_python<'a>(
        &'a self,
        guard: &mut FdGuard<'a>,
        f: &Py<PyAny>,
        exit: &Exit,
        size: u8,
    ) -> PyResult<Answer> {
        let reads = matches!(
            exit,
            Exit::Io {
                is_write: false,
                ..
            } | Exit::Mmio {
                is_write: false,
                ..
            }
        );
        // Release the vCPU lock while Python runs, so the handler can use this vCPU.
        guard.take();
        self.python_calls.fetch_add(1, Ordering::Relaxed);
        let result = Python::attach(|py| -> PyResult<Answer> {
            let obj = exit::to_python(py, exit, self.id)?;
            let ret = call_one(f.bind(py), obj.bind(py))?;
            let ret = &ret;
            let stopped = exit::stop_requested(obj.bind(py)).then_some(obj);
            let data = if reads {
                if ret.is_none() && stopped.is_some() {
                    None
                } else {
                    Some(answer_data(
                        ret,
                        size,
                        exit,
                        &format!("handler {}", describe(f.bind(py))),
                    )?)
                }
            } else {
                if !ret.is_none() {
                    return Err(PyTypeError::new_err(format!(
                        "handler {} returned {} for {}; handlers of writes and HLT must return None",
                        describe(f.bind(py)),
                        type_name(ret),
                        describe_exit(exit)
                    )));
                }
                None
            };
            Ok(Answer { data, stopped })
        });
        *guard = Some(self.lock_run_fd());
        result
    }

    /// Walks the guest's page tables for `vaddr`.
    fn translate(&self, vaddr: u64) -> Result<u64> {
        let s = self.with_fd(|fd| fd.get_sregs().map_err(|e| Error::ioctl("KVM_GET_SREGS", e)))?;
        x86::paging::translate(s.cr0, s.cr3, s.cr4, s.efer, vaddr, |gpa, size| {
            let mut buf = [0u8; 8];
            self.vm.read_memory(gpa, &mut buf[..size]).ok()?;
            Some(u64::from_le_bytes(buf))
        })
        .map_err(|e| match e {
            x86::paging::WalkError::NotMapped { level } => Error::Memory(format!(
                "virtual address {vaddr:#x} is not mapped (no present entry at page-table level {level})"
            )),
            x86::paging::WalkError::TableOutsideMemory { gpa } => Error::Memory(format!(
                "virtual address {vaddr:#x}: its page table at {gpa:#x} is outside guest memory"
            )),
            x86::paging::WalkError::NonCanonical => {
                Error::Memory(format!("virtual address {vaddr:#x} is not canonical"))
            }
        })
    }

    /// Writes a GDT at `tables_addr` and puts the vCPU in flat 32-bit protected mode.
    pub fn setup_protected_mode(&self, tables_addr: u64) -> Result<()> {
        let layout = x86::Layout::at(tables_addr, 1, true).map_err(Error::Value)?;
        self.vm.check_memory(layout.gdt, 0x40)?;
        self.vm
            .write_memory(layout.gdt, &x86::gdt::table_bytes(layout.tss))?;
        self.with_fd(|fd| {
            let s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            let s = x86::protected_mode_sregs(&s, &layout);
            fd.set_sregs(&s)
                .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))?;
            self.update_regs(fd, |r| r.rflags = x86::RFLAGS_RESERVED)
        })
    }

    /// Sets RIP, RAX and RBX, as boot protocols hand over.
    pub fn set_boot_registers(&self, rip: u64, rax: u64, rbx: u64) -> Result<()> {
        self.with_fd(|fd| {
            self.update_regs(fd, |r| {
                r.rip = rip;
                r.rax = rax;
                r.rbx = rbx;
            })
        })
    }

    fn set_pending(&self, pending: Option<PendingRead>) {
        *self.pending_read.lock().unwrap_or_else(|e| e.into_inner()) = pending;
    }

    pub fn stats(&self) -> (u64, u64) {
        (
            self.exits.load(Ordering::Relaxed),
            self.python_calls.load(Ordering::Relaxed),
        )
    }
}

/// The run loop's hold on the vCPU fd: `None` while a Python handler runs.
type FdGuard<'a> = Option<MutexGuard<'a, Option<VcpuFd>>>;

/// The fd behind a run loop's guard.
fn fd_of<'a>(guard: &'a mut FdGuard<'_>) -> Result<&'a mut VcpuFd> {
    guard
        .as_mut()
        .and_then(|g| g.as_mut())
        .ok_or(Error::Closed("vCPU"))
}

/// Calls `f(arg)` without building an argument tuple (with the limited API of Python
/// 3.11, `PyObject_CallFunctionObjArgs` passes the arguments on the C stack).
fn call_one<'py>(f: &Bound<'py, PyAny>, arg: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = f.py();
    // SAFETY: both pointers are live objects borrowed for the call and the GIL is held; the
    // argument list is NULL-terminated as the function requires; the result is a new
    // reference or NULL with a Python error set, which `from_owned_ptr_or_err` handles.
    unsafe {
        let ret = pyo3::ffi::PyObject_CallFunctionObjArgs(
            f.as_ptr(),
            arg.as_ptr(),
            std::ptr::null_mut::<pyo3::ffi::PyObject>(),
        );
        Bound::from_owned_ptr_or_err(py, ret)
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn describe(f: &Bound<'_, PyAny>) -> String {
    f.getattr("__qualname__")
        .and_then(|n| n.extract::<String>())
        .unwrap_or_else(|_| f.repr().map(|r| r.to_string()).unwrap_or_default())
}

fn describe_exit(exit: &Exit) -> String {
    match exit {
        Exit::Io {
            port,
            size,
            is_write,
            ..
        } => {
            format!(
                "{} of {size} byte(s) on port {port:#x}",
                if *is_write { "OUT" } else { "IN" }
            )
        }
        Exit::Mmio {
            addr,
            size,
            is_write,
            ..
        } => format!(
            "MMIO {} of {size} byte(s) at {addr:#x}",
            if *is_write { "write" } else { "read" }
        ),
        Exit::Hlt => "HLT".into(),
        other => other.reason().as_str().into(),
    }
}

/// Converts a read handler's return value into `size` bytes of data.
fn answer_data(ret: &Bound<'_, PyAny>, size: u8, exit: &Exit, who: &str) -> PyResult<Data> {
    let size = size as usize;
    if let Ok(b) = ret.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        if bytes.len() != size {
            return Err(PyValueError::new_err(format!(
                "{who} returned {} bytes for {}; it must return exactly {size}",
                bytes.len(),
                describe_exit(exit)
            )));
        }
        return Ok(Data::new(bytes));
    }
    if ret.cast::<pyo3::types::PyInt>().is_ok() {
        let bits = 8 * size as u32;
        let fits = if let Ok(v) = ret.extract::<u64>() {
            bits == 64 || v >> bits == 0
        } else if let Ok(v) = ret.extract::<i64>() {
            bits == 64 || v >= -(1i64 << (bits - 1))
        } else {
            false
        };
        if !fits {
            return Err(PyValueError::new_err(format!(
                "{who} returned {} for {}, which does not fit in {size} byte(s)",
                ret,
                describe_exit(exit)
            )));
        }
        let v = ret
            .extract::<u64>()
            .or_else(|_| ret.extract::<i64>().map(|v| v as u64))?;
        return Ok(Data::new(&v.to_le_bytes()[..size]));
    }
    Err(PyTypeError::new_err(format!(
        "{who} returned {} for {}; it must return an int or {size} bytes",
        type_name(ret),
        describe_exit(exit)
    )))
}

/// The instant `timeout` seconds from now (None: no deadline).
pub fn deadline_after(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Ok(Instant::now().checked_add(Duration::from_secs_f64(t)))
        }
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a finite number >= 0, got {t}"
        ))),
    }
}

/// A virtual CPU of a `Vm`, created with `vm.create_vcpu()`.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct Vcpu {
    pub inner: Arc<VcpuInner>,
    /// Keeps the VM open while this object exists.
    pub owner: Py<crate::vm::Vm>,
}

#[pymethods]
impl Vcpu {
    /// The vCPU id (its APIC id).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }

    /// A snapshot of the general purpose registers, `rip` and `rflags`.
    #[getter]
    fn regs(&self) -> PyResult<Regs> {
        let inner = &self.inner;
        Ok(inner.with_fd(|fd| inner.read_regs(fd).map(|r| Regs::from_kvm(&r)))?)
    }

    #[setter(regs)]
    fn set_regs_obj(&self, regs: Regs) -> PyResult<()> {
        let inner = &self.inner;
        Ok(inner.with_fd(|fd| inner.write_regs(fd, &regs.to_kvm()))?)
    }

    /// Sets the named registers, leaving the others as they are:
    /// `cpu.set_regs(rip=0x1000, rsp=0x8000, rflags=2)`.
    #[pyo3(signature = (**fields))]
    fn set_regs(&self, fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut guard = self.inner.lock_fd()?;
        let fd = guard.as_mut().ok_or(Error::Closed("vCPU"))?;
        let mut regs = self.inner.read_regs(fd)?;
        if let Some(f) = fields {
            Regs::apply(&mut regs, f)?;
        }
        self.inner.write_regs(fd, &regs)?;
        Ok(())
    }

    /// A snapshot of the special registers: segments, GDT/IDT, control registers, EFER.
    #[getter]
    fn sregs(&self) -> PyResult<Sregs> {
        Ok(self.inner.with_fd(|fd| {
            fd.get_sregs()
                .map(|s| Sregs::from_kvm(&s))
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))
        })?)
    }

    #[setter(sregs)]
    fn set_sregs_obj(&self, sregs: Sregs) -> PyResult<()> {
        Ok(self.inner.with_fd(|fd| {
            fd.set_sregs(&sregs.to_kvm())
                .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))
        })?)
    }

    /// Sets the named special registers, leaving the others as they are:
    /// `cpu.set_sregs(cr0=0x11, cs=kvmpy.Segment(selector=0, base=0))`.
    #[pyo3(signature = (**fields))]
    fn set_sregs(&self, fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut guard = self.inner.lock_fd()?;
        let fd = guard.as_mut().ok_or(Error::Closed("vCPU"))?;
        let mut sregs = Sregs::from_kvm(
            &fd.get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?,
        );
        if let Some(f) = fields {
            sregs.apply(f)?;
        }
        fd.set_sregs(&sregs.to_kvm())
            .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))?;
        Ok(())
    }

    /// Puts the vCPU in 16-bit real mode with `CS = cs` (base `cs * 16`) and `IP = ip`;
    /// the data and stack segments are set to 0.
    #[pyo3(signature = (*, cs=0, ip=0))]
    fn setup_real_mode(&self, cs: u16, ip: u16) -> PyResult<()> {
        Ok(self.inner.with_fd(|fd| {
            let mut s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
                base: u64::from(selector) << 4,
                limit: 0xffff,
                selector,
                type_,
                present: 1,
                s: 1,
                ..Default::default()
            };
            s.cs = seg(cs, 0xb);
            for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
                *d = seg(0, 0x3);
            }
            s.cr0 &= !(x86::CR0_PE | x86::CR0_PG);
            s.efer &= !(x86::EFER_LME | x86::EFER_LMA);
            fd.set_sregs(&s)
                .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))?;
            self.inner.update_regs(fd, |r| {
                r.rip = u64::from(ip);
                r.rflags = x86::RFLAGS_RESERVED;
            })
        })?)
    }

    /// Puts the vCPU in 64-bit long mode with paging, at CPL3 (`user=True`, with IOPL=3
    /// so `in`/`out` exit to the host) or CPL0.
    ///
    /// Writes its structures into guest memory (RAM) from `tables_addr` (page aligned):
    /// GDT at `+0x0000`, TSS (with an I/O bitmap allowing every port) at `+0x1000`, IDT at
    /// `+0x4000`, exception stubs at `+0x5000`, their stack at `+0x6000`, PML4 at
    /// `+0x7000`, PDPT at `+0x8000` and, with 2 MiB pages, one page directory per GiB from
    /// `+0x9000`: `0x9000 + map_gib * 0x1000` bytes in all (`0x9000` with
    /// `huge_pages=True`, which maps 1 GiB pages). The first `map_gib` GiB are identity
    /// mapped, writable and user-accessible.
    ///
    /// With `exceptions=True` the IDT's stubs report CPU exceptions: `run()` then returns an
    /// `ExceptionExit` (reason `"exception"`) with the vector, error code, RIP and CR2,
    /// instead of the guest triple-faulting (reason `"shutdown"`). They report through
    /// `exception_port`, which this registers with the VM.
    ///
    /// Sets the segments, CR0/CR3/CR4/EFER, GDTR/IDTR, TR and RFLAGS; the caller sets
    /// `rip` (and `rsp` if the guest uses a stack).
    #[pyo3(signature = (*, user=true, tables_addr=0x1000, map_gib=1, huge_pages=false, exceptions=false, exception_port=0xf6))]
    #[allow(clippy::too_many_arguments)]
    fn setup_long_mode(
        &self,
        py: Python<'_>,
        user: bool,
        tables_addr: u64,
        map_gib: u64,
        huge_pages: bool,
        exceptions: bool,
        exception_port: u16,
    ) -> PyResult<()> {
        let layout = x86::Layout::at(tables_addr, map_gib, huge_pages).map_err(Error::Value)?;
        let vm = &self.inner.vm;
        if huge_pages && !vm.supports_1gib_pages()? {
            return Err(Error::Value(
                "this host's KVM does not offer 1 GiB pages (CPUID pdpe1gb) to guests; use \
                 huge_pages=False"
                    .into(),
            )
            .into());
        }
        vm.check_memory(layout.gdt, (layout.end() - layout.gdt) as usize)?;
        if exceptions {
            vm.register_exception_port(py, exception_port, layout.report)?;
        }
        vm.write_memory(layout.gdt, &x86::gdt::table_bytes(layout.tss))?;
        vm.write_memory(layout.tss, &x86::gdt::tss_bytes(layout.stack_top))?;
        vm.write_memory(layout.report, &[0; x86::idt::report::SIZE])?;
        if exceptions {
            vm.write_memory(
                layout.idt,
                &x86::idt::idt_bytes(layout.stubs, x86::gdt::KERNEL_CODE64),
            )?;
            vm.write_memory(
                layout.stubs,
                &x86::idt::stub_code(layout.stubs, layout.report, exception_port),
            )?;
        }
        for (gpa, page) in x86::paging::identity_map(&layout) {
            vm.write_memory(gpa, &page)?;
        }
        Ok(self.inner.with_fd(|fd| {
            let s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            let s = x86::long_mode_sregs(&s, &layout, user, exceptions);
            fd.set_sregs(&s)
                .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))?;
            self.inner
                .update_regs(fd, |r| r.rflags = x86::long_mode_rflags(user))
        })?)
    }

    /// Puts the vCPU in flat 32-bit protected mode with paging off, at CPL0: CS selector
    /// 0x38 (32-bit code), data selectors 0x10, base 0, limit 4 GiB. Writes the GDT at
    /// `tables_addr` (page aligned, in RAM; 0x40 bytes). The caller sets `rip` (and
    /// `rsp`). Interrupts are off (IF=0).
    #[pyo3(signature = (*, tables_addr=0x1000))]
    fn setup_protected_mode(&self, tables_addr: u64) -> PyResult<()> {
        Ok(self.inner.setup_protected_mode(tables_addr)?)
    }

    /// The vCPU's CPUID table (`KVM_GET_CPUID2`). New vCPUs get the host's supported
    /// CPUID with the hypervisor bit and their APIC id set.
    fn get_cpuid(&self) -> PyResult<Vec<CpuidEntry>> {
        Ok(self.inner.with_fd(|fd| {
            let cpuid = fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| Error::ioctl("KVM_GET_CPUID2", e))?;
            Ok(cpuid.as_slice().iter().map(CpuidEntry::from_kvm).collect())
        })?)
    }

    /// Replaces the vCPU's CPUID table (`KVM_SET_CPUID2`). Do it before the first run: KVM
    /// refuses changes once the vCPU has run.
    fn set_cpuid(&self, entries: Vec<CpuidEntry>) -> PyResult<()> {
        let raw: Vec<_> = entries.iter().map(CpuidEntry::to_kvm).collect();
        let cpuid = kvm_bindings::CpuId::from_entries(&raw).map_err(|_| {
            Error::Value(format!(
                "too many CPUID entries ({}, at most {})",
                raw.len(),
                kvm_bindings::KVM_MAX_CPUID_ENTRIES
            ))
        })?;
        Ok(self.inner.with_fd(|fd| {
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::ioctl("KVM_SET_CPUID2", e))
        })?)
    }

    /// Reads model-specific registers: `{index: value}` for each index. Raises
    /// `KvmError` naming the first MSR KVM refused.
    fn get_msrs(&self, indices: Vec<u32>) -> PyResult<std::collections::BTreeMap<u32, u64>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|_| Error::Value(format!("too many MSRs ({})", entries.len())))?;
        let n = self.inner.with_fd(|fd| {
            fd.get_msrs(&mut msrs)
                .map_err(|e| Error::ioctl("KVM_GET_MSRS", e))
        })?;
        if n < indices.len() {
            return Err(
                Error::Refused(format!("KVM refused to read MSR {:#x}", indices[n])).into(),
            );
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes model-specific registers from `{index: value}`. Raises `KvmError` naming the
    /// first MSR KVM refused (the ones before it were written).
    fn set_msrs(&self, values: std::collections::BTreeMap<u32, u64>) -> PyResult<()> {
        let entries: Vec<_> = values
            .iter()
            .map(|(&index, &data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|_| Error::Value(format!("too many MSRs ({})", entries.len())))?;
        let n = self.inner.with_fd(|fd| {
            fd.set_msrs(&msrs)
                .map_err(|e| Error::ioctl("KVM_SET_MSRS", e))
        })?;
        if n < entries.len() {
            return Err(Error::Refused(format!(
                "KVM refused to write {:#x} to MSR {:#x}",
                entries[n].data, entries[n].index
            ))
            .into());
        }
        Ok(())
    }

    /// Translates guest virtual address `vaddr` to a guest physical address by walking the
    /// vCPU's page tables (per its current CR0/CR3/CR4/EFER), as the CPU would. Raises
    /// `GuestMemoryError` when the address is not mapped.
    fn translate(&self, vaddr: u64) -> PyResult<u64> {
        Ok(self.inner.translate(vaddr)?)
    }

    /// `KVM_TRANSLATE`: KVM's own translation of `vaddr`, or None if KVM says it is not
    /// mapped. (Not every KVM implements it for every mode; `translate` does not need it.)
    fn kvm_translate(&self, vaddr: u64) -> PyResult<Option<u64>> {
        Ok(self.inner.with_fd(|fd| {
            let t = fd
                .translate_gva(vaddr)
                .map_err(|e| Error::ioctl("KVM_TRANSLATE", e))?;
            Ok((t.valid != 0).then_some(t.physical_address))
        })?)
    }

    /// Reads `n` bytes of guest virtual memory at `vaddr` through the vCPU's page tables
    /// (the range may cross pages).
    fn read_virtual<'py>(
        &self,
        py: Python<'py>,
        vaddr: u64,
        n: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = vec![0u8; 0];
        out.try_reserve_exact(n)
            .map_err(|_| Error::Memory(format!("cannot read {n} bytes")))?;
        let mut addr = vaddr;
        while out.len() < n {
            let gpa = self.inner.translate(addr)?;
            let chunk = ((0x1000 - (addr & 0xfff)) as usize).min(n - out.len());
            let start = out.len();
            out.resize(start + chunk, 0);
            self.inner.vm.read_memory(gpa, &mut out[start..])?;
            addr = addr.wrapping_add(chunk as u64);
        }
        Ok(PyBytes::new(py, &out))
    }

    /// Writes a bytes-like object to guest virtual memory at `vaddr` through the vCPU's
    /// page tables (ignoring their write-protection, as a debugger does).
    fn write_virtual(&self, vaddr: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = crate::memory::bytes_arg(data)?;
        // Translate every page first so a failure writes nothing.
        let mut pieces = Vec::new();
        let (mut addr, mut done) = (vaddr, 0usize);
        while done < data.len() {
            let chunk = ((0x1000 - (addr & 0xfff)) as usize).min(data.len() - done);
            pieces.push((self.inner.translate(addr)?, done, chunk));
            addr = addr.wrapping_add(chunk as u64);
            done += chunk;
        }
        for (gpa, at, len) in pieces {
            self.inner.vm.write_memory(gpa, &data[at..at + len])?;
        }
        Ok(())
    }

    /// Runs the vCPU until an exit no handler takes, a handler stops it, the guest writes
    /// to an exit port, or `timeout` seconds pass; returns that exit.
    ///
    /// The GIL is released while the guest runs. The first exception a handler raises
    /// stops the vCPU and is re-raised here. Ctrl-C stops the guest and raises
    /// `KeyboardInterrupt` (when `run()` is called from the main thread).
    #[pyo3(signature = (timeout=None))]
    fn run(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = deadline_after(timeout)?;
        let inner = &self.inner;
        inner.vm.check_open()?;
        // The run begins and ends (its runner cleared) with the GIL released, so whoever
        // waits for the run to end, e.g. a VM shutting down while the interpreter exits,
        // never waits on this thread getting the GIL back.
        let outcome = py.detach(|| -> Result<Outcome> {
            let _running = inner.begin_run(true)?;
            Ok(inner.run_loop(deadline))
        })?;
        let obj = match outcome {
            Outcome::Exit(exit) => exit::to_python(py, &exit, inner.id)?,
            Outcome::Stopped(obj) => obj,
            Outcome::Error(e) => {
                inner.set_last(None);
                return Err(e);
            }
        };
        inner.set_last(Some(Last::Object(obj.clone_ref(py))));
        Ok(obj)
    }

    /// Answers the IN or MMIO read that the last `run()` returned because no handler took
    /// it: `value` (an int, or bytes of the access size) is what the guest reads when it
    /// runs again. Without an answer the guest reads zeros.
    fn respond(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut guard = self.inner.lock_fd()?;
        let fd = guard.as_mut().ok_or(Error::Closed("vCPU"))?;
        let mut pending = self
            .inner
            .pending_read
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(read) = *pending else {
            return Err(Error::Value(
                "no IN or MMIO read is waiting for data (respond() answers the exit the last run() returned)"
                    .into(),
            )
            .into());
        };
        let (size, exit) = match read {
            PendingRead::Io { io, .. } => (
                io.size,
                Exit::Io {
                    port: io.port,
                    size: io.size,
                    count: io.count,
                    is_write: false,
                    data: Data::default(),
                },
            ),
            PendingRead::Mmio { addr, size } => (
                size,
                Exit::Mmio {
                    addr,
                    size,
                    is_write: false,
                    data: Data::default(),
                },
            ),
        };
        let data = answer_data(value, size, &exit, "respond()")?;
        match read {
            PendingRead::Io { io, index } => {
                exit::io_element(fd, io, index).copy_from_slice(data.as_slice())
            }
            PendingRead::Mmio { .. } => exit::mmio_data(fd).copy_from_slice(data.as_slice()),
        }
        *pending = None;
        Ok(())
    }

    /// Queues interrupt `vector` (0-255) for the guest (`KVM_INTERRUPT`, for VMs without
    /// an in-kernel irqchip; with one, use `vm.set_irq_line`). It is injected as soon as
    /// the guest accepts interrupts (IF=1): at once if the vCPU is running, otherwise at
    /// the next `run()`. A vCPU halted in `hlt` wakes up to take it.
    fn interrupt(&self, vector: u32) -> PyResult<()> {
        if vector > 255 {
            return Err(PyValueError::new_err(format!(
                "interrupt vector {vector} is outside 0..255"
            )));
        }
        if self.inner.vm.has_irqchip() {
            return Err(Error::Value(
                "this VM has an in-kernel irqchip: raise interrupts with vm.set_irq_line()".into(),
            )
            .into());
        }
        self.inner.vm.check_open()?;
        self.inner.queue_interrupt(vector);
        Ok(())
    }

    /// Asks a running vCPU to stop: its `run()` returns an exit with reason `"stopped"`.
    /// Callable from any thread and from handlers; a vCPU that is not running is not
    /// affected (its next `run()` starts normally).
    fn stop(&self) {
        self.inner.kicker.stop();
    }

    /// The exit that ended this vCPU's last run (by `run()` or `vm.start()`), or None
    /// before the first run or when the run ended with an exception.
    #[getter]
    fn last_exit(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.inner.last_exit(py)
    }

    /// Counters since the vCPU was created: `exits` (returns from `KVM_RUN`) and
    /// `handler_calls` (Python handler calls, the only times the run loop takes the GIL).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (exits, calls) = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("exits", exits)?;
        d.set_item("handler_calls", calls)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Vcpu(id={})", self.inner.id)
    }

    /// The VM this vCPU belongs to.
    #[getter]
    fn vm(&self, py: Python<'_>) -> Py<crate::vm::Vm> {
        self.owner.clone_ref(py)
    }

    fn __traverse__(
        &self,
        visit: pyo3::PyVisit<'_>,
    ) -> std::result::Result<(), pyo3::PyTraverseError> {
        visit.call(&self.owner)
    }
}
