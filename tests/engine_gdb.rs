//! The gdb stub from Rust alone: a guest under `kvmpy::engine::gdb`, driven with the
//! remote protocol by hand. Skips (passes with a note) where `/dev/kvm` cannot be opened.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::kvm_usable;
use kvmpy::engine::gdb::{Ending, GdbServer};
use kvmpy::engine::setup::LongMode;
use kvmpy::engine::{RegionOptions, VcpuCore, VmCore};

const LOAD: u64 = 0x10000;

/// `mov rax, 0x1234; inc rbx; jmp $-3` at 0x10000, with exception stubs (breakpoints and
/// steps need them where KVM does not intercept).
fn looping_vm() -> (Arc<VmCore>, Arc<VcpuCore>) {
    let vm = VmCore::new(false, false).unwrap();
    vm.add_memory(0, 4 << 20, RegionOptions::default()).unwrap();
    #[rustfmt::skip]
    let code = [
        0x48, 0xc7, 0xc0, 0x34, 0x12, 0x00, 0x00,   // mov rax, 0x1234
        0x48, 0xff, 0xc3,                           // inc rbx
        0xeb, 0xfb,                                 // jmp to the inc
    ];
    vm.write_memory(LOAD, &code).unwrap();
    let cpu = vm.create_vcpu(None).unwrap();
    cpu.setup_long_mode(LongMode {
        tables_addr: 0x200000,
        ..LongMode::user_mode(true)
    })
    .unwrap();
    let mut regs = cpu.regs().unwrap();
    regs.rip = LOAD;
    cpu.set_regs(&regs).unwrap();
    (vm, cpu)
}

struct Client(TcpStream);

impl Client {
    fn ask(&mut self, data: &str) -> String {
        let sum = data.bytes().fold(0u8, |s, b| s.wrapping_add(b));
        write!(self.0, "${data}#{sum:02x}").unwrap();
        self.reply()
    }

    fn reply(&mut self) -> String {
        let mut byte = [0u8];
        loop {
            self.0.read_exact(&mut byte).unwrap();
            if byte[0] == b'$' {
                break;
            }
        }
        let mut data = Vec::new();
        loop {
            self.0.read_exact(&mut byte).unwrap();
            if byte[0] == b'#' {
                break;
            }
            data.push(byte[0]);
        }
        let mut sum = [0u8; 2];
        self.0.read_exact(&mut sum).unwrap();
        self.0.write_all(b"+").unwrap();
        String::from_utf8(data).unwrap()
    }
}

/// Undoes the protocol's run-length encoding: `c*N` is `c` and `N - 29` more of it.
fn expand(data: &str) -> String {
    let bytes = data.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'*' && i + 1 < bytes.len() {
            let last = out.chars().last().unwrap_or('0');
            (0..bytes[i + 1] - 29).for_each(|_| out.push(last));
            i += 2;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

#[test]
fn a_session_breaks_steps_reads_and_leaves_the_guest_stopped() {
    if !kvm_usable() {
        return;
    }
    let (vm, cpu) = looping_vm();
    let server = GdbServer::start(Arc::clone(&vm), "127.0.0.1", 0).unwrap();
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut gdb = Client(stream);
    assert!(gdb.ask("?").starts_with("T05"));
    // A breakpoint on the inc: hit after the mov.
    assert_eq!(gdb.ask("Z0,10007,1"), "OK");
    assert!(gdb.ask("vCont;c").starts_with("T05thread:01;"));
    assert_eq!(cpu.regs().unwrap().rip, LOAD + 7);
    assert_eq!(cpu.regs().unwrap().rax, 0x1234);
    // A step executes the inc; memory shows no patch.
    assert!(gdb.ask("vCont;s:1").starts_with("T05"));
    assert_eq!(cpu.regs().unwrap().rip, LOAD + 10);
    assert_eq!(cpu.regs().unwrap().rbx, 1);
    assert_eq!(gdb.ask("m10007,3"), "48ffc3");
    // rax and rbx, gdb's registers 0 and 1 (the reply is run-length encoded).
    let g = expand(&gdb.ask("g"));
    assert!(g.starts_with("34120000000000000100000000000000"), "{g}");
    assert_eq!(gdb.ask("D"), "OK");
    assert!(server.wait(Some(Duration::from_secs(10))));
    assert_eq!(server.ending(), Some(Ending::Detached));
    assert!(vm
        .breakpoints_of(kvmpy::engine::breakpoints::Owner::Vm)
        .is_empty());
    assert_eq!(cpu.regs().unwrap().rip, LOAD + 10, "left where gdb left it");
    vm.shutdown();
}
