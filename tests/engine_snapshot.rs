//! Snapshots through the engine alone: capture, run, restore, compare. Skips (passes with
//! a note) where `/dev/kvm` cannot be opened.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kvm_usable;
use kvmpy::devices::console::ConsoleDev;
use kvmpy::devices::exit_port::ExitPortDev;
use kvmpy::engine::setup::LongMode;
use kvmpy::engine::{Device, Exit, Outcome, RegionOptions, RunOptions, VcpuCore, VmCore};

const LOAD: u64 = 0x10000;
const DATA: u64 = 0x100000;

// mov [rdi], rsi ; mov [rdi + 0x1000], rsi ; inc rsi ; movq xmm3, rsi ;
// mov al, 'k' ; out 0x3f8 (dx), al ; out 0xf4, al
const CODE: &[u8] = &[
    0x48, 0x89, 0x37, // mov [rdi], rsi
    0x48, 0x89, 0xB7, 0x00, 0x10, 0x00, 0x00, // mov [rdi + 0x1000], rsi
    0x48, 0xFF, 0xC6, // inc rsi
    0x66, 0x48, 0x0F, 0x6E, 0xDE, // movq xmm3, rsi
    0xB0, b'k', // mov al, 'k'
    0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xEE, // out dx, al
    0xE6, 0xF4, // out 0xf4, al
];

fn vm_with_guest() -> (Arc<VmCore>, Arc<VcpuCore>, Arc<ConsoleDev>) {
    vm_with_guest_and_ring(0)
}

/// `vm_with_guest` with a dirty ring of `entries` per vCPU (0: the dirty bitmap).
fn vm_with_guest_and_ring(entries: u32) -> (Arc<VmCore>, Arc<VcpuCore>, Arc<ConsoleDev>) {
    let vm = VmCore::new(false, false).unwrap();
    if entries != 0 {
        vm.enable_dirty_ring(entries).unwrap();
    }
    vm.add_memory(0, 2 << 20, RegionOptions::default()).unwrap();
    vm.write_memory(LOAD, CODE).unwrap();
    let console = Arc::new(ConsoleDev::new(0x3f8, 1024));
    let exit: Arc<dyn Device> = Arc::new(ExitPortDev {
        port: 0xf4,
        debug_exit: false,
    });
    let dev: Arc<dyn Device> = console.clone();
    vm.update_bus(|bus| {
        Ok((
            bus.with_io(0x3f8, 0x3f9, dev)?.with_io(0xf4, 0xf5, exit)?,
            (),
        ))
    })
    .unwrap();
    let cpu = vm.create_vcpu(None).unwrap();
    cpu.setup_long_mode(LongMode::user_mode(false)).unwrap();
    let mut regs = cpu.regs().unwrap();
    regs.rip = LOAD;
    regs.rdi = DATA;
    regs.rsi = 0x1234;
    cpu.set_regs(&regs).unwrap();
    (vm, cpu, console)
}

fn run_to_exit(cpu: &VcpuCore) {
    let outcome = cpu.run(&RunOptions {
        deadline: Some(Instant::now() + Duration::from_secs(10)),
        on_signal: None,
    });
    match outcome {
        Outcome::Exit(Exit::Guest { .. }) => {}
        Outcome::Exit(e) => panic!("unexpected exit {:?}", e.reason()),
        Outcome::Stopped(_) => panic!("stopped by a device"),
        Outcome::Error(e) => panic!("error: {e}"),
    }
}

fn memory(vm: &VmCore) -> Vec<u8> {
    let mut buf = vec![0; 2 << 20];
    vm.read_memory(0, &mut buf).unwrap();
    buf
}

#[test]
fn a_restore_puts_memory_registers_and_devices_back() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu, console) = vm_with_guest();
    let before = memory(&vm);
    let snap = vm.snapshot().unwrap();
    let regs = cpu.regs().unwrap();
    let xsave = cpu.with_fd(|fd| Ok(fd.get_xsave().unwrap())).unwrap();
    for round in 0..3 {
        run_to_exit(&cpu);
        assert_eq!(console.take(false), b"k");
        assert_ne!(memory(&vm), before);
        vm.write_memory(0x150000 + round * 0x1000, b"host").unwrap();
        vm.restore(&snap).unwrap();
        assert_eq!(memory(&vm), before, "round {round}");
        assert_eq!(cpu.regs().unwrap(), regs);
        // A fast restore leaves the FPU state for the next run to load: `with_fpu_fd`
        // puts it back first.
        let now = cpu.with_fpu_fd(|fd| Ok(fd.get_xsave().unwrap())).unwrap();
        assert_eq!(now.region, xsave.region, "round {round}");
        assert!(console.take(false).is_empty());
    }
    // The first restore after the snapshot and the later ones took the cheap path.
    assert_eq!(cpu.full_restores(), 0);
}

#[test]
fn a_mismatched_vm_is_refused_untouched() {
    if !kvm_usable() {
        return;
    }
    let (vm, _cpu, _console) = vm_with_guest();
    let snap = vm.snapshot().unwrap();
    let other = VmCore::new(false, false).unwrap();
    other
        .add_memory(0, 1 << 20, RegionOptions::default())
        .unwrap();
    other.write_memory(0x5000, b"mine").unwrap();
    let err = other.restore(&snap).unwrap_err().to_string();
    assert!(err.contains("memory regions"), "{err}");
    let mut buf = [0; 4];
    other.read_memory(0x5000, &mut buf).unwrap();
    assert_eq!(&buf, b"mine");
}

#[test]
fn another_vm_with_the_same_layout_takes_the_snapshot() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu, _console) = vm_with_guest();
    run_to_exit(&cpu);
    let snap = vm.snapshot().unwrap();
    let (other, other_cpu, _) = vm_with_guest();
    other.restore(&snap).unwrap();
    assert_eq!(memory(&other), memory(&vm));
    assert_eq!(other_cpu.regs().unwrap(), cpu.regs().unwrap());
    assert_eq!(other_cpu.sregs().unwrap(), cpu.sregs().unwrap());
    assert_eq!(other_cpu.full_restores(), 1);
}

#[test]
fn a_snapshot_from_a_tsc_of_another_frequency_is_set_or_refused_untouched() {
    if !kvm_usable() {
        return;
    }
    let (vm, _cpu, _console) = vm_with_guest();
    let mut snap = Arc::try_unwrap(vm.snapshot().unwrap())
        .ok()
        .expect("the VM keeps no reference to its snapshot");
    let khz = snap.vcpus[0]
        .tsc_khz
        .expect("a snapshot records the TSC frequency");
    assert!(khz > 0);
    assert!(snap.clock.is_some());
    let other_khz = khz / 2;
    snap.vcpus[0].tsc_khz = Some(other_khz);
    let (other, other_cpu, _) = vm_with_guest();
    other.write_memory(0x5000, b"mine").unwrap();
    let control = kvm_ioctls::Kvm::new()
        .unwrap()
        .check_extension_raw(kvm_bindings::KVM_CAP_TSC_CONTROL.into())
        > 0;
    let result = other.restore(&snap);
    let now = other_cpu
        .with_fd(|fd| Ok(fd.get_tsc_khz().unwrap()))
        .unwrap();
    if control {
        result.unwrap();
        assert_eq!(now, other_khz);
    } else {
        let err = result.unwrap_err().to_string();
        assert!(err.contains("KVM_CAP_TSC_CONTROL"), "{err}");
        assert!(err.contains(&format!("{other_khz} kHz")), "{err}");
        assert_eq!(now, khz);
        let mut buf = [0; 4];
        other.read_memory(0x5000, &mut buf).unwrap();
        assert_eq!(&buf, b"mine");
    }
}

#[test]
fn the_dirty_ring_tracks_guest_writes_for_restores() {
    if !kvm_usable() {
        return;
    }
    let has_ring = kvm_ioctls::Kvm::new()
        .unwrap()
        .check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into())
        > 0;
    if !has_ring {
        let vm = VmCore::new(false, false).unwrap();
        let err = vm.enable_dirty_ring(256).unwrap_err().to_string();
        assert!(err.contains("KVM_CAP_DIRTY_LOG_RING"), "{err}");
        return;
    }
    let (vm, cpu, console) = vm_with_guest_and_ring(256);
    assert_eq!(vm.dirty_ring(), 256);
    assert!(
        vm.enable_dirty_ring(256).is_err(),
        "only once, before vCPUs"
    );
    let before = memory(&vm);
    let snap = vm.snapshot().unwrap();
    for round in 0..3 {
        run_to_exit(&cpu);
        assert_eq!(console.take(false), b"k");
        assert_ne!(memory(&vm), before);
        vm.restore(&snap).unwrap();
        assert_eq!(memory(&vm), before, "round {round}");
    }
    assert_eq!(cpu.full_restores(), 0);
}
