//! The fuzzing executor without Python: one input per run, a crash's state, restore.
//! Skips (passes with a note) where `/dev/kvm` cannot be opened.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::kvm_usable;
use kvmpy::arch::x86_64::fuzzmap::UserRange;
use kvmpy::devices::exit_port::ExitPortDev;
use kvmpy::engine::fuzz::{ArgReg, Config, Executor};
use kvmpy::engine::setup::LongMode;
use kvmpy::engine::{Exit, RegionOptions, VmCore};

const CODE: u64 = 0x100000;
const INPUT_END: u64 = 0x110000;

/// A target in a fuzzing address space: code at 0x100000 (read-only), the input area
/// 0x10f000..0x110000. The code reads a qword address from the input and stores 1 there:
///   mov rax, [rdi]      48 8b 07
///   mov qword [rax], 1  48 c7 00 01 00 00 00
///   mov eax, esi        89 f0
///   out 0xf4, eax       e7 f4
fn executor() -> Executor {
    let vm = VmCore::new(false, false).unwrap();
    vm.add_memory(0, 2 << 20, RegionOptions::default()).unwrap();
    let code = [
        0x48, 0x8b, 0x07, 0x48, 0xc7, 0x00, 0x01, 0, 0, 0, 0x89, 0xf0, 0xe7, 0xf4,
    ];
    vm.write_memory(CODE, &code).unwrap();
    vm.update_bus(|bus| {
        let dev = Arc::new(ExitPortDev {
            port: 0xf4,
            debug_exit: false,
        });
        Ok((bus.with_io(0xf4, 0xf5, dev)?, ()))
    })
    .unwrap();
    let cpu = vm.create_vcpu(None).unwrap();
    let mode = LongMode::user_mode(true);
    let ranges = [
        UserRange {
            start: CODE,
            size: 0x1000,
            writable: false,
            executable: true,
        },
        UserRange {
            start: INPUT_END - 0x1000,
            size: 0x1000,
            writable: true,
            executable: false,
        },
    ];
    cpu.setup_long_mode_mapping(mode, Some(&ranges)).unwrap();
    let mut regs = cpu.regs().unwrap();
    regs.rip = CODE;
    cpu.set_regs(&regs).unwrap();
    let snapshot = vm.snapshot().unwrap();
    let config = Config {
        input_end: INPUT_END,
        max_len: 0x1000,
        addr_reg: Some(ArgReg::Rdi),
        len_reg: Some(ArgReg::Rsi),
        timeout: Duration::from_secs(5),
        exception_stack_top: Some(0x8000),
    };
    Executor::new(Arc::clone(&vm), cpu, snapshot, config).unwrap()
}

#[test]
fn inputs_run_from_the_snapshot_and_faults_carry_the_guests_registers() {
    if !kvm_usable() {
        return;
    }
    let ex = executor();
    let ok = (INPUT_END - 0x800).to_le_bytes();
    for _ in 0..3 {
        let run = ex.run(&ok, None).unwrap();
        assert!(matches!(run.exit, Exit::Guest { code: 8, .. }));
        assert!(run.regs.is_none());
    }
    // A store to the code page (read-only for the guest), then to the NULL page.
    for (target, error_code) in [(CODE, 0b111), (0x10, 0b110)] {
        let run = ex.run(&target.to_le_bytes(), None).unwrap();
        match run.exit {
            Exit::Exception {
                vector,
                rip,
                cr2,
                error_code: ec,
                ..
            } => assert_eq!((vector, rip, cr2, ec), (14, CODE + 3, target, error_code)),
            _ => panic!("expected a page fault"),
        }
        let regs = run.regs.unwrap();
        assert_eq!(
            (regs.rax, regs.rdi, regs.rip),
            (target, INPUT_END - 8, CODE + 3)
        );
    }
    // The restore undid the run: the input area is clean and the next input runs.
    let mut input = [0u8; 8];
    ex.vm.read_memory(INPUT_END - 8, &mut input).unwrap();
    assert_eq!(input, [0; 8]);
    assert!(matches!(
        ex.run(&ok, None).unwrap().exit,
        Exit::Guest { .. }
    ));
    assert!(ex.run(&[0; 0x1001], None).is_err(), "longer than max_len");
}

/// Block coverage from Rust: blocks from the disassembly, one exit each for the whole
/// campaign, the original instructions run, the map AFL-style.
#[test]
fn coverage_costs_one_exit_per_block_and_changes_no_result() {
    use kvmpy::arch::x86_64::blocks::find_blocks;
    use kvmpy::engine::coverage::block_hash;
    use kvmpy::engine::fuzz::CoverageConfig;
    if !kvm_usable() {
        return;
    }
    let plain = executor();
    let mut code = [0u8; 14];
    plain.vm.read_memory(CODE, &mut code).unwrap();
    // One block, and a second where the store starts (a block by the caller's choice).
    let mut blocks: Vec<u64> = find_blocks(&code, CODE, &[CODE])
        .starts
        .into_iter()
        .collect();
    assert_eq!(blocks, [CODE]);
    blocks.push(CODE + 3);
    let cov = CoverageConfig {
        blocks: blocks.clone(),
        armed: false,
        map_size: 1 << 16,
    };
    let ex = executor().with_coverage(&cov).unwrap();
    assert!(
        executor()
            .with_coverage(&CoverageConfig {
                map_size: 3,
                ..cov.clone()
            })
            .is_err(),
        "map_size must be a power of two"
    );
    let ok = (INPUT_END - 0x800).to_le_bytes();
    let exits = || ex.vcpu.stats().0;
    let before = exits();
    let first = ex.run(&ok, None).unwrap();
    assert!(matches!(first.exit, Exit::Guest { code: 8, .. }));
    assert_eq!(first.new_blocks, blocks);
    assert_eq!(exits() - before, 1 + 2, "the exit port and each block once");
    let before = exits();
    for _ in 0..3 {
        let run = ex.run(&ok, None).unwrap();
        assert!(matches!(run.exit, Exit::Guest { code: 8, .. }) && run.new_blocks.is_empty());
    }
    assert_eq!(exits() - before, 3, "no block exits any more");
    let map = ex.coverage_map().unwrap();
    assert_eq!(map.iter().map(|b| u32::from(*b)).sum::<u32>(), 2);
    assert_eq!(map[(block_hash(CODE) & 0xffff) as usize], 1);
    assert_eq!(ex.blocks_covered(), 2);
    assert!(plain.coverage_map().is_none());
}
