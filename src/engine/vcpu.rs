//! A vCPU: its fd, who runs it, and everything the face or a device may do to it between
//! two entries into the guest. The run loop itself is in `run.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuFd};

use crate::engine::bus::Token;
use crate::engine::error::{Error, Result};
use crate::engine::exit::{self, Data, Exit, IoRaw};
use crate::engine::gettid;
use crate::engine::kick::{Kicker, Timer};
use crate::engine::lock;
use crate::engine::memory::Mappings;
use crate::engine::vm::VmCore;

/// A vCPU fd and what lives exactly as long as it. Fields drop in order: the fd is closed
/// before the guest memory it could touch is released.
///
/// `repr(C)` keeps the fd first, on the cache line of the lock that guards it (see
/// `VcpuCore`'s layout): every exit reads both. The ring follows: `Option<VcpuFdHolder>`
/// keeps its `None` in the ring's `Option` tag (the holder's largest niche), which the run
/// loop reads with the fd on every exit.
#[repr(C)]
pub struct VcpuFdHolder {
    pub fd: VcpuFd,
    /// The vCPU's dirty ring, in a VM that has the ring on.
    pub ring: Option<crate::engine::snapshot::ring::DirtyRing>,
    /// The timeout timer, created on the first run with a deadline.
    pub timer: Option<Timer>,
    /// A fast restore's FPU state still to load (see `snapshot::stub`).
    pub fpu: crate::engine::snapshot::stub::FpuRestore,
    _memory: Arc<Mappings>,
}

/// How the last run of a vCPU ended.
pub enum Last {
    Exit(Exit),
    /// A device's token (the face caches its Python exit object here too).
    Token(Token),
}

/// A read exit returned to the caller, waiting for `respond()`.
#[derive(Clone, Copy)]
pub enum PendingRead {
    Io { io: IoRaw, index: u32 },
    Mmio { addr: u64, size: u8 },
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// `VcpuCore::tf_step`: no step with TF.
pub(crate) const NO_STEP: u8 = 0;
/// TF is set for a step; the guest has not been entered since.
pub(crate) const STEP_ARMED: u8 = 1;
/// The guest was entered with TF set: the step's #DB may be on its way.
pub(crate) const STEP_IN_FLIGHT: u8 = 2;

/// The state of one vCPU, shared by the face's object, its VM and its run threads.
///
/// `repr(C)` keeps the declaration order: what the run loop reads or writes on every exit
/// lies on the first two cache lines (the fields up to `kicker`, then the fd's lock with
/// the fd), because each exit leaves the host's caches cold and every further line the
/// loop touches costs a miss.
#[repr(C, align(64))]
pub struct VcpuCore {
    pub vm: Arc<VmCore>,
    exits: AtomicU64,
    handler_calls: AtomicU64,
    pub id: u64,
    /// A word the face may keep about the thread that runs the vCPU, for one run: zero
    /// when a run starts, and read or written only by the run's thread until it ends
    /// (see [`VcpuCore::run_thread_word`]).
    run_thread_word: AtomicUsize,
    /// Whether the general registers are mirrored in `kvm_run` (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// Whether KVM has filled the mirror: from the first return of `KVM_RUN` on, registers
    /// are read and written there instead of with ioctls.
    regs_mirrored: AtomicBool,
    /// KVM holds an I/O or MMIO access to complete when the guest is entered next.
    pub(crate) io_pending: AtomicBool,
    /// Whether kvmpy single-steps this vCPU with RFLAGS.TF (exception stubs): `NO_STEP`,
    /// `STEP_ARMED` (TF set, the guest not entered since) or `STEP_IN_FLIGHT`. An access a
    /// device handles may be where the step ends (see `debug::step_after_access`), and a
    /// step in flight delays a stop (see `run::step_in_flight`).
    pub(crate) tf_step: AtomicU8,
    /// A run ended on a plain OUT a device handled without completing it (see
    /// `complete.rs`), at `deferred_rip`.
    pub(crate) deferred: AtomicBool,
    /// Whether `kvm_run` also mirrors the special registers and vCPU events (once the VM
    /// has a snapshot: a restore compares them there instead of asking KVM).
    pub(crate) state_sync: AtomicBool,
    /// Whether `interrupts` is non-empty, so the run loop need not lock it on every exit.
    interrupts_queued: AtomicBool,
    /// Raised around `KVM_RUN` (see `allstop`).
    pub(crate) in_guest: AtomicBool,
    pub kicker: Kicker,
    /// On the second line, with what every exit reads of the fd (see `VcpuFdHolder`).
    fd: parking_lot::Mutex<Option<VcpuFdHolder>>,
    /// The thread id running the vCPU, if any.
    runner: Mutex<Option<libc::pid_t>>,
    run_ended: Condvar,
    /// Threads waiting on `run_ended` (changed and read with `runner` locked): a run that
    /// ends with none skips the notify, a futex system call per run otherwise.
    run_waiters: AtomicU32,
    /// Restores that rewrote every part of the state (for `stats`).
    full_restores: AtomicU64,
    /// Runs that started in the FPU restore stub (for `stats`).
    stub_loads: AtomicU64,
    /// The IN or MMIO read that a run returned unanswered, until the next run.
    pending_read: Mutex<Option<PendingRead>>,
    /// Interrupt vectors queued by `queue_interrupt`, injected when the guest can take them.
    interrupts: Mutex<VecDeque<u32>>,
    last: Mutex<Option<Last>>,
    /// The linear RIP of the OUT `deferred` stands for.
    pub(crate) deferred_rip: AtomicU64,
    /// Whether the mirror `state_sync` turns on holds KVM's state: an exit happened since
    /// the host last set special registers or events with an ioctl.
    state_fresh: AtomicBool,
    /// Whether state that only ring-0 code or the host can change (MSRs, control and debug
    /// registers, ...) may differ from the last snapshot or restore: the host set some, or
    /// the vCPU exited at ring 0.
    hidden_dirty: AtomicBool,
    /// Whether the host ever wrote the special registers (a mode setup, `set_sregs`, a
    /// restore): if not, the vCPU runs from the reset state, at 0xfffffff0.
    sregs_written: AtomicBool,
    /// Whether the face has warned about a run from the reset state.
    pub warned_reset_state: AtomicBool,
    /// Single steps and stepping over breakpoints (see `debug`).
    pub(crate) debug: Mutex<crate::engine::debug::DebugState>,
}

/// Clears the vCPU's runner when a run ends, however it ends.
pub struct RunGuard<'a>(&'a VcpuCore);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut runner = lock(&self.0.runner);
        *runner = None;
        self.0.kicker.end();
        let waiters = self.0.run_waiters.load(Ordering::Relaxed);
        drop(runner);
        if waiters > 0 {
            self.0.run_ended.notify_all();
        }
    }
}

/// The run loop's hold on the vCPU fd: `None` while a device has released it.
pub type FdGuard<'a> = Option<FdLock<'a>>;

/// A lock on a vCPU's fd. `parking_lot`'s: the run loop gives the lock up and takes it
/// again around every call into a handler that may use the vCPU, and this lock does that
/// with one atomic operation each way. `std`'s lock also reads the process's panic count
/// on each lock and unlock, for poisoning, which the engine ignored (it took a poisoned
/// fd lock as it was): this lock has none.
pub type FdLock<'a> = parking_lot::MutexGuard<'a, Option<VcpuFdHolder>>;

/// The fd behind a run loop's guard.
pub fn fd_of<'a>(guard: &'a mut FdGuard<'_>) -> Result<&'a mut VcpuFdHolder> {
    guard
        .as_mut()
        .and_then(|g| g.as_mut())
        .ok_or_else(|| Error::Closed("vCPU"))
}

impl VcpuCore {
    /// Wraps a new vCPU fd, which keeps `memory` mapped for as long as it is open. With
    /// `sync_regs`, KVM mirrors the general registers in `kvm_run` on every exit.
    pub fn new(
        id: u64,
        vm: Arc<VmCore>,
        mut fd: VcpuFd,
        sync_regs: bool,
        memory: Arc<Mappings>,
        ring: Option<crate::engine::snapshot::ring::DirtyRing>,
    ) -> Self {
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        VcpuCore {
            id,
            vm,
            run_thread_word: AtomicUsize::new(0),
            fd: parking_lot::Mutex::new(Some(VcpuFdHolder {
                fd,
                timer: None,
                ring,
                fpu: Default::default(),
                _memory: memory,
            })),
            runner: Mutex::new(None),
            run_ended: Condvar::new(),
            run_waiters: AtomicU32::new(0),
            kicker: Kicker::default(),
            exits: AtomicU64::new(0),
            handler_calls: AtomicU64::new(0),
            full_restores: AtomicU64::new(0),
            stub_loads: AtomicU64::new(0),
            pending_read: Mutex::new(None),
            interrupts: Mutex::new(VecDeque::new()),
            interrupts_queued: AtomicBool::new(false),
            last: Mutex::new(None),
            sync_regs,
            regs_mirrored: AtomicBool::new(false),
            io_pending: AtomicBool::new(false),
            tf_step: AtomicU8::new(NO_STEP),
            deferred: AtomicBool::new(false),
            deferred_rip: AtomicU64::new(0),
            state_sync: AtomicBool::new(false),
            state_fresh: AtomicBool::new(false),
            hidden_dirty: AtomicBool::new(true),
            sregs_written: AtomicBool::new(false),
            warned_reset_state: AtomicBool::new(false),
            debug: Mutex::default(),
            in_guest: AtomicBool::new(false),
        }
    }

    /// A word the face may keep about the thread that runs the vCPU (the Python face keeps
    /// where that thread's interpreter state lies, to skip a thread-local lookup on every
    /// handler call). The engine sets it to zero before each run; during a run only the
    /// run's thread reads or writes it (a device called for this vCPU runs on that thread),
    /// so what the face keeps there holds for that thread until the run ends.
    pub fn run_thread_word(&self) -> &AtomicUsize {
        &self.run_thread_word
    }

    /// The thread running this vCPU, if any.
    pub fn runner(&self) -> Option<libc::pid_t> {
        *lock(&self.runner)
    }

    /// Marks the vCPU as run by the calling thread. `reserved`: a run group already marked
    /// the run as in progress (`reserve`). A stop requested before this is kept: it ends
    /// this run at once.
    pub fn begin_run(&self, reserved: bool) -> Result<RunGuard<'_>> {
        let mut runner = lock(&self.runner);
        if let Some(tid) = *runner {
            return Err(Error::Busy(if tid == gettid() {
                format!(
                    "vCPU {} is already running on this thread (run() called from its own \
                     handler?)",
                    self.id
                )
            } else {
                format!("vCPU {} is already running on another thread", self.id)
            }));
        }
        if !reserved && !self.kicker.begin() {
            return Err(Error::Busy(format!(
                "vCPU {} is about to run on another thread",
                self.id
            )));
        }
        *runner = Some(gettid());
        Ok(RunGuard(self))
    }

    /// Marks a background run as in progress before its thread starts, so a stop of the
    /// group reaches it even then.
    pub fn reserve(&self) -> Result<()> {
        let runner = lock(&self.runner);
        if runner.is_some() || !self.kicker.begin() {
            return Err(Error::Busy(format!("vCPU {} is already running", self.id)));
        }
        Ok(())
    }

    /// Undoes `reserve` for a run that never started.
    pub fn unreserve(&self) {
        self.kicker.end();
    }

    pub fn set_last(&self, last: Option<Last>) {
        *lock(&self.last) = last;
    }

    /// How the last run ended (None before the first, or after a run that failed).
    pub fn last(&self) -> MutexGuard<'_, Option<Last>> {
        lock(&self.last)
    }

    /// Stops a run in progress, waits for it to end, and closes the vCPU fd.
    pub fn close(&self) {
        self.kicker.stop_run();
        let mut runner = lock(&self.runner);
        while runner.is_some() {
            self.run_waiters.fetch_add(1, Ordering::Relaxed);
            runner = self
                .run_ended
                .wait_timeout(runner, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.run_waiters.fetch_sub(1, Ordering::Relaxed);
        }
        drop(runner);
        self.fd.lock().take();
    }

    /// Locks the fd for a quick operation. Fails (rather than blocking) when another thread
    /// is running the vCPU.
    fn lock_fd(&self) -> Result<FdLock<'_>> {
        if let Some(tid) = self.runner() {
            if tid != gettid() {
                return Err(Error::Busy(format!(
                    "vCPU {} is running on another thread; stop it first",
                    self.id
                )));
            }
        }
        self.fd
            .try_lock()
            .ok_or_else(|| Error::Busy(format!("vCPU {} is running", self.id)))
    }

    /// Runs `f` on the vCPU fd (not while another thread runs the vCPU).
    pub fn with_fd<T>(&self, f: impl FnOnce(&mut VcpuFd) -> Result<T>) -> Result<T> {
        let mut guard = self.lock_fd()?;
        let holder = guard.as_mut().ok_or_else(|| Error::Closed("vCPU"))?;
        self.complete_deferred(&mut holder.fd);
        f(&mut holder.fd)
    }

    /// `with_fd` for reading or writing the FPU state: a fast restore's pending FPU
    /// state is put back first.
    pub fn with_fpu_fd<T>(&self, f: impl FnOnce(&mut VcpuFd) -> Result<T>) -> Result<T> {
        let mut guard = self.lock_fd()?;
        let holder = guard.as_mut().ok_or_else(|| Error::Closed("vCPU"))?;
        self.complete_deferred(&mut holder.fd);
        self.settle_fpu(holder)?;
        f(&mut holder.fd)
    }

    /// The run loop's lock on the fd (blocking).
    pub fn lock_run_fd(&self) -> FdLock<'_> {
        self.fd.lock()
    }

    /// The general registers: from `kvm_run`'s mirror once KVM has filled it (no ioctl),
    /// otherwise with `KVM_GET_REGS`.
    pub fn read_regs(&self, fd: &mut VcpuFd) -> Result<kvm_regs> {
        if self.regs_mirrored.load(Ordering::Relaxed) {
            return Ok(fd.sync_regs_mut().regs);
        }
        fd.get_regs().map_err(|e| Error::ioctl("KVM_GET_REGS", e))
    }

    /// Sets the general registers: in `kvm_run`'s mirror, marked dirty so KVM loads them
    /// when the guest is entered next (before it completes a pending I/O, as KVM_SET_REGS
    /// would), or with `KVM_SET_REGS` before the first run.
    pub fn write_regs(&self, fd: &mut VcpuFd, regs: &kvm_regs) -> Result<()> {
        if self.regs_mirrored.load(Ordering::Relaxed) {
            fd.sync_regs_mut().regs = *regs;
            fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        fd.set_regs(regs)
            .map_err(|e| Error::ioctl("KVM_SET_REGS", e))
    }

    /// Reads the registers, lets `f` change them, writes them back.
    pub fn update_regs(&self, fd: &mut VcpuFd, f: impl FnOnce(&mut kvm_regs)) -> Result<()> {
        let mut r = self.read_regs(fd)?;
        f(&mut r);
        self.write_regs(fd, &r)
    }

    /// The general registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.with_fd(|fd| self.read_regs(fd))
    }

    /// Sets the general registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.with_fd(|fd| self.write_regs(fd, regs))
    }

    /// The special registers (`KVM_GET_SREGS`).
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.with_fd(|fd| fd.get_sregs().map_err(|e| Error::ioctl("KVM_GET_SREGS", e)))
    }

    /// Sets the special registers (`KVM_SET_SREGS`).
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.with_fd(|fd| self.write_sregs(fd, sregs))
    }

    /// `KVM_SET_SREGS`, noting that the host changed the vCPU's state.
    pub fn write_sregs(&self, fd: &VcpuFd, sregs: &kvm_sregs) -> Result<()> {
        self.note_state_write();
        self.sregs_written.store(true, Ordering::Relaxed);
        fd.set_sregs(sregs)
            .map_err(|e| Error::ioctl("KVM_SET_SREGS", e))
    }

    /// Notes that the host set state other than the general registers (for snapshots).
    pub fn note_state_write(&self) {
        self.hidden_dirty.store(true, Ordering::Relaxed);
        self.state_fresh.store(false, Ordering::Relaxed);
    }

    /// Notes what an exit tells snapshots: whether KVM holds an access to complete, and
    /// (once the state is mirrored) whether the vCPU is at ring 0.
    pub(crate) fn note_exit(&self, fd: &mut VcpuFd, io: bool) {
        self.io_pending.store(io, Ordering::Relaxed);
        self.deferred.store(false, Ordering::Relaxed);
        if self.state_sync.load(Ordering::Relaxed) {
            self.note_mirrored_state(fd);
        }
    }

    /// `note_exit` where `kvm_run` mirrors the special registers (kept out of the exit
    /// path's code: only VMs with a snapshot do).
    #[cold]
    #[inline(never)]
    fn note_mirrored_state(&self, fd: &mut VcpuFd) {
        let s = &fd.sync_regs_mut().sregs;
        if s.cr0 & 1 == 0 || s.ss.dpl == 0 {
            self.hidden_dirty.store(true, Ordering::Relaxed);
        }
        self.state_fresh.store(true, Ordering::Relaxed);
    }

    /// Whether a run returned an IN or MMIO read that `respond()` has not answered.
    pub(crate) fn awaits_response(&self) -> bool {
        lock(&self.pending_read).is_some()
    }

    /// For snapshots: mirror the special registers and events in `kvm_run` from the next
    /// exit on.
    pub(crate) fn mirror_state(&self, fd: &mut VcpuFd) {
        if self.sync_regs && !self.state_sync.swap(true, Ordering::Relaxed) {
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
            fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
    }

    /// The mirrored special registers and events, if they hold KVM's current state.
    pub(crate) fn mirrored_state(
        &self,
        fd: &mut VcpuFd,
    ) -> Option<(kvm_sregs, kvm_bindings::kvm_vcpu_events)> {
        if !self.state_sync.load(Ordering::Relaxed) || !self.state_fresh.load(Ordering::Relaxed) {
            return None;
        }
        let s = fd.sync_regs_mut();
        Some((s.sregs, s.events))
    }

    /// Counts a restore that rewrote every part of the state.
    pub(crate) fn count_full_restore(&self) {
        self.full_restores.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a run that started in the FPU restore stub.
    pub(crate) fn count_stub_load(&self) {
        self.stub_loads.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs that started in the FPU restore stub: fast restores whose FPU state the
    /// guest loaded itself instead of `KVM_SET_XSAVE`.
    pub fn stub_loads(&self) -> u64 {
        self.stub_loads.load(Ordering::Relaxed)
    }

    /// Restores that rewrote every part of the state, rather than the general registers
    /// and FPU state only.
    pub fn full_restores(&self) -> u64 {
        self.full_restores.load(Ordering::Relaxed)
    }

    /// Whether hidden state may have changed since the last call (which resets it).
    /// Whether the vCPU still has the special registers it was created with (no mode was
    /// set up): it runs from the reset state.
    pub fn in_reset_state(&self) -> bool {
        !self.sregs_written.load(Ordering::Relaxed)
    }

    pub(crate) fn take_hidden_dirty(&self) -> bool {
        self.hidden_dirty.swap(false, Ordering::Relaxed)
    }

    /// Sets the general registers with `KVM_SET_REGS` and keeps the mirror equal, so the
    /// ioctls that follow (vCPU events) are not undone when the guest is entered.
    pub(crate) fn put_regs_now(&self, fd: &mut VcpuFd, regs: &kvm_regs) -> Result<()> {
        fd.set_regs(regs)
            .map_err(|e| Error::ioctl("KVM_SET_REGS", e))?;
        if self.regs_mirrored.load(Ordering::Relaxed) {
            fd.sync_regs_mut().regs = *regs;
            fd.get_kvm_run().kvm_dirty_regs &= !u64::from(kvm_bindings::KVM_SYNC_X86_REGS);
        }
        Ok(())
    }

    /// Locks the fd of a vCPU that nobody runs (for snapshots and restores).
    pub(crate) fn lock_idle(&self) -> Result<FdLock<'_>> {
        if self.runner().is_some() {
            return Err(Error::Busy(format!(
                "vCPU {} is running: stop it (or let its handler call exit.stop()) and wait \
                 for run() to return first",
                self.id
            )));
        }
        self.lock_fd()
    }

    /// The interrupt vectors queued by `queue_interrupt` and not injected yet.
    pub(crate) fn queued_interrupts(&self) -> Vec<u32> {
        lock(&self.interrupts).iter().copied().collect()
    }

    /// Replaces the queue of interrupt vectors.
    pub(crate) fn set_queued_interrupts(&self, vectors: &[u32]) {
        let mut queue = lock(&self.interrupts);
        queue.clear();
        queue.extend(vectors.iter().copied());
        self.interrupts_queued
            .store(!queue.is_empty(), Ordering::Release);
    }

    /// Forgets an unanswered read (a restore replaced the state it belonged to).
    pub(crate) fn forget_pending_read(&self) {
        self.set_pending(None);
    }

    /// Notes that KVM has returned from `KVM_RUN` once more.
    pub(crate) fn count_exit(&self) {
        // Only the thread that holds the vCPU's fd counts, so a load and a store (no
        // locked read-modify-write on every exit) lose nothing.
        let n = self.exits.load(Ordering::Relaxed);
        self.exits.store(n.wrapping_add(1), Ordering::Relaxed);
        if self.sync_regs {
            // KVM stores the registers in kvm_run on every return from KVM_RUN.
            self.regs_mirrored.store(true, Ordering::Relaxed);
        }
    }

    /// Counts a call into a handler that needed the face's interpreter (for `stats`).
    pub fn count_handler_call(&self) {
        // Only the thread that runs the vCPU counts (see `count_exit`).
        let n = self.handler_calls.load(Ordering::Relaxed);
        self.handler_calls
            .store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// `(exits, handler_calls)` since the vCPU was created.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.exits.load(Ordering::Relaxed),
            self.handler_calls.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_pending(&self, pending: Option<PendingRead>) {
        *lock(&self.pending_read) = pending;
    }

    /// Answers the IN or MMIO read the last run returned unanswered: `answer` gets the
    /// access's size and the unanswered exit and returns the bytes the guest reads.
    pub fn respond(&self, answer: impl FnOnce(u8, &Exit) -> Result<Data>) -> Result<()> {
        let mut guard = self.lock_fd()?;
        let fd = &mut guard.as_mut().ok_or_else(|| Error::Closed("vCPU"))?.fd;
        let mut pending = lock(&self.pending_read);
        let Some(read) = *pending else {
            return Err(Error::Value(
                "no IN or MMIO read is waiting for data (respond() answers the exit the last \
                 run() returned)"
                    .into(),
            ));
        };
        let (size, unanswered) = match read {
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
        let data = answer(size, &unanswered)?;
        match read {
            PendingRead::Io { io, index } => {
                exit::io_element(fd, io, index).copy_from_slice(data.as_slice())
            }
            PendingRead::Mmio { .. } => exit::mmio_data(fd).copy_from_slice(data.as_slice()),
        }
        *pending = None;
        Ok(())
    }

    /// Queues an interrupt and kicks the vCPU so a running guest gets it promptly.
    pub fn queue_interrupt(&self, vector: u32) {
        let mut queue = lock(&self.interrupts);
        queue.push_back(vector);
        self.interrupts_queued.store(true, Ordering::Release);
        drop(queue);
        self.kicker.kick();
    }

    pub(crate) fn has_queued_interrupts(&self) -> bool {
        self.interrupts_queued.load(Ordering::Acquire)
    }

    /// Injects the next queued interrupt if the guest can take it now, otherwise asks KVM
    /// to exit as soon as it can (`request_interrupt_window`).
    pub(crate) fn inject_interrupt(&self, fd: &mut VcpuFd) -> Result<()> {
        if !self.has_queued_interrupts() {
            return Ok(());
        }
        self.inject_queued(fd)
    }

    /// `inject_interrupt` with an interrupt queued (kept out of the exit path's code).
    #[cold]
    #[inline(never)]
    fn inject_queued(&self, fd: &mut VcpuFd) -> Result<()> {
        let mut queue = lock(&self.interrupts);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn what_every_exit_touches_is_on_the_vcpus_first_two_cache_lines() {
        assert_eq!(std::mem::align_of::<VcpuCore>(), 64);
        macro_rules! on_first_line {
            ($($field:ident),*) => {
                $(assert!(offset_of!(VcpuCore, $field) < 64, stringify!($field));)*
            };
        }
        // `kicker`: its stop flag is its first field (see kick.rs).
        on_first_line!(
            vm,
            exits,
            handler_calls,
            id,
            run_thread_word,
            sync_regs,
            regs_mirrored,
            io_pending,
            tf_step,
            deferred,
            state_sync,
            interrupts_queued,
            in_guest,
            kicker
        );
        // They end where the fd's lock leads the second line (`repr(C)` keeps the order),
        // and the fd follows it there (see below).
        assert_eq!(offset_of!(VcpuCore, fd), 64);
    }

    #[test]
    fn the_fd_and_its_none_lie_on_the_line_of_their_lock() {
        // The lock's state is one byte and the holder is 8-aligned: the holder begins at 8.
        let holder = std::mem::size_of::<parking_lot::Mutex<Option<VcpuFdHolder>>>()
            - std::mem::size_of::<Option<VcpuFdHolder>>();
        assert_eq!(holder, 8);
        assert_eq!(offset_of!(VcpuFdHolder, fd), 0);
        assert!(holder + std::mem::size_of::<VcpuFd>() <= 64);
        // `Option<VcpuFdHolder>`'s `None` lives in the tag of `ring`, right after the fd:
        // the run loop's check that the fd is still there reads that line too.
        assert_eq!(
            offset_of!(VcpuFdHolder, ring),
            std::mem::size_of::<VcpuFd>()
        );
        assert!(holder + offset_of!(VcpuFdHolder, ring) + 4 <= 64);
    }
}
