//! The engine without Python: real guests through `kvmpy::engine` alone. Skips (passes
//! with a note) where `/dev/kvm` cannot be opened.

mod common;

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::kvm_usable;
use kvmpy::devices::console::ConsoleDev;
use kvmpy::devices::exit_port::ExitPortDev;
use kvmpy::engine::memory::Mappings;
use kvmpy::engine::setup::LongMode;
use kvmpy::engine::{
    Action, Device, Exit, Outcome, RegionOptions, RunOptions, VcpuCore, VcpuCtx, VmCore,
};

const LOAD: u64 = 0x10000;

/// 64-bit user mode with kvmpy's tables at 0x1000.
const USER_MODE: LongMode = LongMode::user_mode(false);

/// A VM with 2 MiB of RAM, `code` at 0x10000 and one vCPU in 64-bit user mode there.
fn user_vm(code: &[u8]) -> (Arc<VmCore>, Arc<VcpuCore>) {
    let vm = VmCore::new(false, false).unwrap();
    vm.add_memory(0, 2 << 20, RegionOptions::default()).unwrap();
    vm.write_memory(LOAD, code).unwrap();
    let cpu = vm.create_vcpu(None).unwrap();
    cpu.setup_long_mode(USER_MODE).unwrap();
    let mut regs = cpu.regs().unwrap();
    regs.rip = LOAD;
    cpu.set_regs(&regs).unwrap();
    (vm, cpu)
}

fn add_io(vm: &VmCore, port: u16, device: Arc<dyn Device>) {
    vm.update_bus(|bus| Ok((bus.with_io(port, u32::from(port) + 1, device)?, ())))
        .unwrap();
}

fn run(cpu: &VcpuCore, timeout: f64) -> Outcome {
    cpu.run(&RunOptions {
        deadline: Some(Instant::now() + Duration::from_secs_f64(timeout)),
        on_signal: None,
    })
}

fn exit_of(outcome: Outcome) -> Exit {
    match outcome {
        Outcome::Exit(e) => e,
        Outcome::Stopped(_) => panic!("stopped by a device"),
        Outcome::Error(e) => panic!("error: {e}"),
    }
}

/// Counts OUTs and answers INs with a running number.
#[derive(Default)]
struct Counter {
    outs: AtomicU64,
    ins: AtomicU64,
}

impl Device for Counter {
    fn name(&self) -> String {
        "a counter".into()
    }
    fn io_in(
        &self,
        _ctx: &mut VcpuCtx<'_, '_>,
        _port: u16,
        data: &mut [u8],
    ) -> kvmpy::engine::Result<Action> {
        let n = self.ins.fetch_add(1, Ordering::SeqCst) + 1;
        data.copy_from_slice(&n.to_le_bytes()[..data.len()]);
        Ok(Action::Continue)
    }
    fn io_out(
        &self,
        _ctx: &mut VcpuCtx<'_, '_>,
        _port: u16,
        _data: &[u8],
    ) -> kvmpy::engine::Result<Action> {
        self.outs.fetch_add(1, Ordering::SeqCst);
        Ok(Action::Continue)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn a_guest_runs_through_rust_devices_without_python() {
    if !kvm_usable() {
        return;
    }
    // l: in al, 0x10 ; out 0x11, al ; dec ecx ; jnz l ; mov al, 7 ; out 0xf4, al
    let code = [
        0xB9, 0xE8, 0x03, 0x00, 0x00, // mov ecx, 1000
        0xE4, 0x10, // in al, 0x10
        0xE6, 0x11, // out 0x11, al
        0xFF, 0xC9, // dec ecx
        0x75, 0xF8, // jnz -8
        0xB0, 0x07, // mov al, 7
        0xE6, 0xF4, // out 0xf4, al
    ];
    let (vm, cpu) = user_vm(&code);
    let counter = Arc::new(Counter::default());
    add_io(&vm, 0x10, counter.clone());
    add_io(&vm, 0x11, counter.clone());
    add_io(
        &vm,
        0xf4,
        Arc::new(ExitPortDev {
            port: 0xf4,
            debug_exit: false,
        }),
    );
    match exit_of(run(&cpu, 30.0)) {
        Exit::Guest { port, code } => assert_eq!((port, code), (0xf4, 7)),
        other => panic!("unexpected exit {:?}", other.reason()),
    }
    assert_eq!(counter.ins.load(Ordering::SeqCst), 1000);
    assert_eq!(counter.outs.load(Ordering::SeqCst), 1000);
    // The registers are consistent after the exit port's OUT: the loop ran to the end.
    assert_eq!(cpu.regs().unwrap().rcx & 0xffff_ffff, 0);
    vm.shutdown();
}

#[test]
fn a_stop_before_the_run_stops_it_and_a_timeout_ends_a_spinning_guest() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu) = user_vm(&[0xEB, 0xFE]); // jmp $
    cpu.kicker.request_stop();
    assert!(matches!(exit_of(run(&cpu, 10.0)), Exit::Stopped));
    assert!(matches!(exit_of(run(&cpu, 0.05)), Exit::Timeout));
    // A stop from another thread while the guest spins.
    let stopper = {
        let cpu = Arc::clone(&cpu);
        std::thread::spawn(move || {
            while !cpu.kicker.running() {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(50));
            cpu.kicker.request_stop();
        })
    };
    assert!(matches!(exit_of(run(&cpu, 30.0)), Exit::Stopped));
    stopper.join().unwrap();
    vm.shutdown();
}

/// Runs another vCPU from inside a device of the first, on the same thread.
struct RunsOther {
    other: Mutex<Option<Arc<VcpuCore>>>,
    /// The nested run's timeout.
    timeout: f64,
}

impl Device for RunsOther {
    fn name(&self) -> String {
        "a device that runs another vCPU".into()
    }
    fn io_out(
        &self,
        _ctx: &mut VcpuCtx<'_, '_>,
        _port: u16,
        _data: &[u8],
    ) -> kvmpy::engine::Result<Action> {
        let other = self.other.lock().unwrap().clone().unwrap();
        // The nested run ends by its own timeout.
        assert!(matches!(
            run(&other, self.timeout),
            Outcome::Exit(Exit::Timeout)
        ));
        Ok(Action::Continue)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// vCPU A runs `out 0x20, al ; jmp $`; its device runs vCPU B (`jmp $`) on the same
/// thread until B's timeout, then A spins until its own.
fn nested_runs(a_timeout: f64, b_timeout: f64) -> Exit {
    let (vm, a) = user_vm(&[0xE6, 0x20, 0xEB, 0xFE]);
    let b = vm.create_vcpu(None).unwrap();
    b.setup_long_mode(USER_MODE).unwrap();
    let mut regs = b.regs().unwrap();
    regs.rip = LOAD + 2; // jmp $
    b.set_regs(&regs).unwrap();
    let device = Arc::new(RunsOther {
        other: Mutex::new(Some(Arc::clone(&b))),
        timeout: b_timeout,
    });
    add_io(&vm, 0x20, device);
    let (watchdog, cancel) = stop_after(&a, Duration::from_secs(20));
    let exit = exit_of(run(&a, a_timeout));
    cancel.send(()).unwrap();
    watchdog.join().unwrap();
    vm.shutdown();
    exit
}

#[test]
fn a_kick_after_a_nested_run_on_the_same_thread_is_not_lost() {
    if !kvm_usable() {
        return;
    }
    // A's own timeout still ends A after B's run on the same thread has ended (a
    // watchdog stops A otherwise).
    assert!(matches!(nested_runs(0.5, 0.05), Exit::Timeout));
}

#[test]
fn a_timeout_that_falls_in_a_nested_run_on_the_same_thread_is_not_lost() {
    if !kvm_usable() {
        return;
    }
    // A's deadline passes while B runs: B's loop takes the signal of A's timer; A's run
    // must still end by its timeout once B's has ended.
    assert!(matches!(nested_runs(0.05, 0.3), Exit::Timeout));
}

/// Closes its own VM from inside a run, as a `Vm` collected on a vCPU thread does, and
/// notes whether guest memory is still mapped right after.
struct ClosesTheVm {
    held: Weak<Mappings>,
    mapped_after_close: AtomicBool,
}

impl Device for ClosesTheVm {
    fn name(&self) -> String {
        "a device that closes its VM".into()
    }
    fn io_out(
        &self,
        ctx: &mut VcpuCtx<'_, '_>,
        _port: u16,
        _data: &[u8],
    ) -> kvmpy::engine::Result<Action> {
        ctx.vm().shutdown();
        // The region (and the FPU restore stub's slot, where the tables map it).
        let mapped = self.held.upgrade().is_some_and(|m| !m.is_empty());
        self.mapped_after_close.store(mapped, Ordering::SeqCst);
        Ok(Action::Continue)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn guest_memory_stays_mapped_while_a_vcpu_fd_is_open() {
    if !kvm_usable() {
        return;
    }
    // out 0x20, al ; jmp $
    let (vm, cpu) = user_vm(&[0xE6, 0x20, 0xEB, 0xFE]);
    let held = Arc::downgrade(&vm.with_memory(|m| m.mappings()));
    let device = Arc::new(ClosesTheVm {
        held: held.clone(),
        mapped_after_close: AtomicBool::new(false),
    });
    add_io(&vm, 0x20, device.clone());
    // The VM is closed under the running vCPU, whose fd stays open until its run ends
    // (KVM can still complete the OUT): the memory must stay mapped meanwhile.
    assert!(matches!(exit_of(run(&cpu, 30.0)), Exit::Stopped));
    assert!(device.mapped_after_close.load(Ordering::SeqCst));
    assert!(held.upgrade().is_some(), "the vCPU fd is still open");
    cpu.close();
    assert!(held.upgrade().is_none(), "released once every fd is closed");
}

#[test]
fn a_console_collects_bytes_and_an_unhandled_in_is_returned() {
    if !kvm_usable() {
        return;
    }
    // mov al, 'k' ; out 0x30, al ; in al, 0x31 ; jmp $
    let (vm, cpu) = user_vm(&[0xB0, b'k', 0xE6, 0x30, 0xE4, 0x31, 0xEB, 0xFE]);
    let console = Arc::new(ConsoleDev::new(0x30, 64));
    add_io(&vm, 0x30, console.clone());
    match exit_of(run(&cpu, 30.0)) {
        Exit::Io { port, is_write, .. } => assert_eq!((port, is_write), (0x31, false)),
        other => panic!("unexpected exit {:?}", other.reason()),
    }
    assert_eq!(console.take(false), b"k");
    vm.shutdown();
}

/// The signal mask of thread `tid` as /proc shows it (`SigBlk`).
fn blocked_signals_of(tid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).unwrap()
}

#[test]
fn a_run_leaves_the_threads_signal_mask_alone() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu) = user_vm(&[0xEB, 0xFE]); // jmp $
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = {
        let cpu = Arc::clone(&cpu);
        std::thread::spawn(move || {
            // A mask of the thread's own: SIGUSR1 blocked, SIGINT not.
            vmm_sys_util::signal::block_signal(libc::SIGUSR1).unwrap();
            tx.send(kvmpy::engine::gettid()).unwrap();
            let exit = exit_of(run(&cpu, 30.0));
            (exit, blocked_signals_of(kvmpy::engine::gettid()))
        })
    };
    let tid = rx.recv().unwrap();
    while !cpu.kicker.running() {
        std::thread::yield_now();
    }
    let own = 1u64 << (libc::SIGUSR1 - 1);
    // The guest spins in KVM_RUN, which runs with the thread's own mask (no
    // KVM_SET_SIGNAL_MASK), and the kick is never blocked around it.
    let during: Vec<u64> = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(1));
            blocked_signals_of(tid)
        })
        .collect();
    cpu.kicker.request_stop();
    let (exit, after) = runner.join().unwrap();
    assert!(matches!(exit, Exit::Stopped));
    assert!(
        during.iter().all(|&m| m == own),
        "masks during the run: {during:x?}"
    );
    assert_eq!(after, own);
    vm.shutdown();
}

/// Sleeps in a blocking call (long past the run's deadline), then lets the run go on.
struct Sleeps {
    /// Set once the device is about to block.
    inside: AtomicBool,
    /// The read end of a pipe the device blocks on, and what `read` returned.
    pipe: libc::c_int,
    read: std::sync::atomic::AtomicIsize,
}

impl Device for Sleeps {
    fn name(&self) -> String {
        "a device that blocks".into()
    }
    fn io_out(
        &self,
        _ctx: &mut VcpuCtx<'_, '_>,
        _port: u16,
        _data: &[u8],
    ) -> kvmpy::engine::Result<Action> {
        self.inside.store(true, Ordering::SeqCst);
        let mut byte = 0u8;
        // SAFETY: `byte` is valid for a one-byte read; the fd is the test's open pipe.
        let n = unsafe { libc::read(self.pipe, (&mut byte as *mut u8).cast(), 1) };
        self.read.store(n, Ordering::SeqCst);
        Ok(Action::Continue)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// vCPU running `out 0x20, al ; jmp $` with a device on 0x20 that blocks on a pipe until
/// `feed` writes to it; returns the exit and what the device's `read` returned.
fn block_in_a_device(
    timeout: f64,
    feed: impl FnOnce(&VcpuCore, &dyn Fn()) + Send,
) -> (Exit, isize) {
    let (vm, cpu) = user_vm(&[0xE6, 0x20, 0xEB, 0xFE]);
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid storage for two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let device = Arc::new(Sleeps {
        inside: AtomicBool::new(false),
        pipe: fds[0],
        read: std::sync::atomic::AtomicIsize::new(-2),
    });
    add_io(&vm, 0x20, device.clone());
    let (watchdog, cancel) = stop_after(&cpu, Duration::from_secs(20));
    let exit = std::thread::scope(|s| {
        let feeder = s.spawn(|| {
            while !device.inside.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let write = || {
                // SAFETY: writes one byte from valid storage to the pipe's write end.
                assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
            };
            feed(&cpu, &write);
        });
        let exit = exit_of(run(&cpu, timeout));
        feeder.join().unwrap();
        exit
    });
    cancel.send(()).unwrap();
    watchdog.join().unwrap();
    // SAFETY: both fds are the pipe's, closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    vm.shutdown();
    (exit, device.read.load(Ordering::SeqCst))
}

#[test]
fn a_kick_that_lands_in_a_devices_blocking_call_restarts_it() {
    if !kvm_usable() {
        return;
    }
    // Kicks while the device blocks in read(): the read is restarted (SA_RESTART), not
    // broken, and returns the byte written after them; the run then goes on until a stop.
    let (exit, read) = block_in_a_device(30.0, |cpu, write| {
        for _ in 0..5 {
            cpu.kicker.kick();
            std::thread::sleep(Duration::from_millis(5));
        }
        write();
        cpu.kicker.request_stop();
    });
    assert_eq!(read, 1, "the device's read() was broken by a kick");
    assert!(matches!(exit, Exit::Stopped), "{:?}", exit.reason());
}

#[test]
fn a_deadline_that_passes_while_a_device_blocks_ends_the_run() {
    if !kvm_usable() {
        return;
    }
    // The timer fires while the device blocks (outside KVM_RUN): the run must still end
    // by its timeout once the guest spins in `jmp $` (a watchdog stops it otherwise).
    let (exit, read) = block_in_a_device(0.05, |_, write| {
        std::thread::sleep(Duration::from_millis(200));
        write();
    });
    assert_eq!(read, 1);
    assert!(matches!(exit, Exit::Timeout), "{:?}", exit.reason());
}

/// Requests a stop of `cpu`'s run `after` it has started, from another thread, unless told
/// not to (through the sender) first.
fn stop_after(
    cpu: &Arc<VcpuCore>,
    after: Duration,
) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
    let cpu = Arc::clone(cpu);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        while !cpu.kicker.running() {
            std::thread::yield_now();
        }
        if rx.recv_timeout(after).is_err() {
            cpu.kicker.request_stop();
        }
    });
    (handle, tx)
}

#[test]
fn a_timer_left_set_by_an_earlier_run_neither_ends_nor_outlasts_a_later_one() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu) = user_vm(&[0xE6, 0x11, 0xEB, 0xFE]); // out 0x11, al ; jmp $
    let to_the_out = |cpu: &VcpuCore| {
        let mut regs = cpu.regs().unwrap();
        regs.rip = LOAD;
        cpu.set_regs(&regs).unwrap();
    };
    // The OUT ends a run long before its 0.05 s: the timer stays set for then.
    assert!(matches!(exit_of(run(&cpu, 0.05)), Exit::Io { .. }));
    // A run with a later deadline keeps that expiry; when it fires, the run sets the timer
    // again for its own deadline, and times out then (a watchdog stops it otherwise).
    let (watchdog, cancel) = stop_after(&cpu, Duration::from_secs(20));
    let exit = exit_of(run(&cpu, 0.3));
    cancel.send(()).unwrap();
    watchdog.join().unwrap();
    assert!(matches!(exit, Exit::Timeout), "{:?}", exit.reason());
    // The early expiry is not the later run's timeout: a stop ends that run.
    to_the_out(&cpu);
    assert!(matches!(exit_of(run(&cpu, 0.05)), Exit::Io { .. }));
    let (stopper, _) = stop_after(&cpu, Duration::from_millis(300));
    assert!(matches!(exit_of(run(&cpu, 30.0)), Exit::Stopped));
    stopper.join().unwrap();
    vm.shutdown();
}

/// Breakpoints from Rust alone: the table patches memory, the run loop reports hits with
/// RIP at the breakpoint whichever mechanism the host uses, snapshots hold the originals.
#[test]
fn breakpoints_and_steps_without_python() {
    use kvmpy::engine::breakpoints::Owner;
    if !kvm_usable() {
        return;
    }
    // 0x10000: mov ecx, 3; 0x10005: dec ecx; jnz 0x10005; out 0xf4, al
    let code = [0xb9, 3, 0, 0, 0, 0xff, 0xc9, 0x75, 0xfc, 0xe6, 0xf4];
    let (vm, cpu) = user_vm(&code);
    cpu.setup_long_mode(LongMode::user_mode(true)).unwrap();
    let mut regs = cpu.regs().unwrap();
    regs.rip = LOAD;
    cpu.set_regs(&regs).unwrap();
    vm.add_breakpoint(&cpu, LOAD + 5, Owner::Vcpu(cpu.id))
        .unwrap();
    let mut raw = [0u8; 2];
    vm.read_memory_raw(LOAD + 5, &mut raw).unwrap();
    // int3, or where KVM does not intercept it, out dx, al (user mode has IOPL=3).
    let debug = kvmpy::engine::debug::mechanism().unwrap();
    let wanted = std::env::var(kvmpy::engine::coverage::PATCH_ENV).ok();
    let patch = kvmpy::engine::coverage::Mechanism::pick(debug, 3, 3, wanted.as_deref())
        .unwrap()
        .patch();
    assert_eq!(raw, [patch, 0xc9]);
    let mut shown = [0u8; 2];
    vm.read_memory(LOAD + 5, &mut shown).unwrap();
    assert_eq!(shown, [0xff, 0xc9]);
    let snap = vm.snapshot().unwrap();
    let mut in_snap = [0u8; 1];
    snap.read(LOAD + 5, &mut in_snap).unwrap();
    assert_eq!(in_snap, [0xff]);
    let mut counts = Vec::new();
    loop {
        match exit_of(run(&cpu, 10.0)) {
            Exit::Breakpoint { address } => {
                let r = cpu.regs().unwrap();
                assert_eq!((address, r.rip), (LOAD + 5, LOAD + 5));
                counts.push(r.rcx);
            }
            Exit::Io { port: 0xf4, .. } => break,
            _ => panic!("unexpected exit"),
        }
    }
    assert_eq!(counts, [3, 2, 1]);
    vm.remove_breakpoint(LOAD + 5, Owner::Vcpu(cpu.id)).unwrap();
    assert!(vm.remove_breakpoint(LOAD + 5, Owner::Vcpu(cpu.id)).is_err());
    vm.read_memory_raw(LOAD + 5, &mut raw).unwrap();
    assert_eq!(raw, [0xff, 0xc9]);
    vm.shutdown();
}

#[test]
fn a_watchpoint_splits_the_slot_and_reports_the_store_that_hits_it() {
    if !kvm_usable() {
        return;
    }
    // mov [rdi], rsi ; out 0xf4, al
    let (vm, cpu) = user_vm(&[0x48, 0x89, 0x37, 0xE6, 0xF4]);
    add_io(
        &vm,
        0xf4,
        Arc::new(ExitPortDev {
            port: 0xf4,
            debug_exit: false,
        }),
    );
    let region = vm.with_memory(|m| Arc::clone(&m.regions()[0]));
    cpu.add_watchpoint(0x30008, 8, "write").unwrap();
    // Three slots: before the watched page, the page (read-only), after it.
    let pieces = region.pieces();
    let spans: Vec<_> = pieces
        .iter()
        .map(|p| (p.first, p.pages, p.readonly))
        .collect();
    assert_eq!(
        spans,
        vec![(0, 0x30, false), (0x30, 1, true), (0x31, 512 - 0x31, false)]
    );
    assert_eq!(
        pieces[0].slot, region.slot,
        "the region keeps its slot number"
    );
    let store = |at: u64, value: u64| {
        let mut regs = cpu.regs().unwrap();
        (regs.rip, regs.rdi, regs.rsi) = (LOAD, at, value);
        cpu.set_regs(&regs).unwrap();
        exit_of(run(&cpu, 30.0))
    };
    assert!(
        matches!(store(0x30010, 5), Exit::Guest { .. }),
        "next to it: runs on"
    );
    match store(0x30008, 6) {
        Exit::Watchpoint(hit, rip) => {
            assert_eq!((hit.access, hit.size, hit.old, hit.new), (0x30008, 8, 0, 6));
            assert_eq!(rip, LOAD + 3, "after the store");
        }
        other => panic!("unexpected exit {:?}", other.reason()),
    }
    let mut b = [0u8; 16];
    vm.read_memory(0x30008, &mut b).unwrap();
    assert_eq!(b, [6, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    cpu.remove_watchpoint(0x30008, 8).unwrap();
    assert_eq!(region.pieces().len(), 1, "one slot again");
    assert!(matches!(store(0x30008, 7), Exit::Guest { .. }));
    vm.shutdown();
}
