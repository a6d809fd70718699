//! What a `KVM_EXIT_INTERNAL_ERROR` means, in words: the suberror's name, the instruction
//! KVM could not emulate (its bytes, when KVM reports them, decoded) and what to try.

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86_64::disasm::{disassemble, hex_bytes};
use crate::arch::x86_64::{CR0_PE, EFER_LMA};

/// `KVM_INTERNAL_ERROR_*`.
pub const EMULATION: u32 = 1;
pub const SIMUL_EX: u32 = 2;
pub const DELIVERY_EV: u32 = 3;
pub const UNEXPECTED_EXIT_REASON: u32 = 4;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: `data[1..3]` hold the size and
/// up to 15 bytes of the instruction.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The name of a `KVM_INTERNAL_ERROR_*` suberror.
pub fn suberror_name(suberror: u32) -> String {
    match suberror {
        EMULATION => "emulation failure".into(),
        SIMUL_EX => "simultaneous exceptions".into(),
        DELIVERY_EV => "event delivery failed".into(),
        UNEXPECTED_EXIT_REASON => "unexpected exit reason".into(),
        n => format!("suberror {n}"),
    }
}

/// The bytes of the instruction an emulation failure reports (empty when KVM gave none:
/// older kernels, or no instruction could be fetched at rip).
pub fn instruction_bytes(suberror: u32, data: &[u64]) -> Vec<u8> {
    if suberror != EMULATION || data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return Vec::new();
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = (raw[0] as usize).min(15);
    raw[1..1 + size].to_vec()
}

/// The code size (16, 32 or 64) of a vCPU in the state `sregs`.
pub fn code_bits(sregs: &kvm_sregs) -> u8 {
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cr0 & CR0_PE != 0 && sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// Where the vCPU was when the error happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Place {
    pub rip: u64,
    /// The code size: 16, 32 or 64; 0 when the registers could not be read.
    pub bits: u8,
    /// Whether the vCPU was still in the state it is created in (real mode, CS:IP =
    /// f000:fff0): nobody set up a mode before running it.
    pub reset: bool,
}

impl Place {
    pub fn of(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        Place {
            rip: regs.rip,
            bits: code_bits(sregs),
            reset: in_reset_state(sregs),
        }
    }
}

/// Whether `sregs` is still the state KVM creates a vCPU in: real mode, CS selector 0xf000
/// with base 0xffff0000 (the first fetch is at 0xfffffff0).
pub fn in_reset_state(sregs: &kvm_sregs) -> bool {
    sregs.cr0 & CR0_PE == 0 && sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000
}

const RESET_HINT: &str = "; the vCPU is still in the state it was created in (real mode, \
     fetching at 0xfffffff0): set up a mode first with setup_real_mode, \
     setup_protected_mode, setup_long_mode or load_multiboot";

/// The instruction in words: `"f0 48 0f c7 0c 25 00 00 30 00 (lock cmpxchg16b [0x300000])"`,
/// with only the bytes of the first instruction; None without bytes.
pub fn instruction_text(bytes: &[u8], place: Place) -> Option<String> {
    let insn = disassemble(bytes, u32::from(place.bits), place.rip, 1)
        .into_iter()
        .next()?;
    Some(format!("{} ({})", hex_bytes(&insn.bytes), insn.text))
}

/// One line that says what happened and what to try.
pub fn describe(suberror: u32, data: &[u64], place: Place) -> String {
    let mut line = describe_error(suberror, data, place);
    if place.reset {
        line.push_str(RESET_HINT);
    }
    line
}

fn describe_error(suberror: u32, data: &[u64], place: Place) -> String {
    let name = suberror_name(suberror);
    let at = if place.bits != 0 {
        format!(" at rip={:#x} ({}-bit code)", place.rip, place.bits)
    } else {
        String::new()
    };
    let bytes = instruction_bytes(suberror, data);
    match (suberror, instruction_text(&bytes, place)) {
        (EMULATION, Some(insn)) => format!(
            "{name}{at}: KVM's instruction emulator cannot run {insn}; on a nested or \
             software KVM ring-0 code is emulated, so run this code at CPL3 in 64-bit mode \
             or avoid the instruction"
        ),
        (EMULATION, None) => format!(
            "{name}{at}: KVM could not fetch or emulate the instruction; is there guest RAM \
             at rip (or does an MMIO access need an instruction KVM cannot emulate)?"
        ),
        (SIMUL_EX, _) => format!(
            "{name}{at}: an exception occurred while delivering another; check the IDT, \
             the stack and the page tables"
        ),
        (DELIVERY_EV, _) => format!(
            "{name}{at}: delivering an interrupt or exception touched memory with no RAM \
             (e.g. the IDT or the stack is outside guest RAM)"
        ),
        _ => format!("{name}{at}: data={}", hex_words(data)),
    }
}

fn hex_words(data: &[u64]) -> String {
    let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
    format!("[{}]", words.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nested KVM reported for `lock cmpxchg16b [0x300000]` at ring 0.
    const CMPXCHG16B: [u64; 4] = [1, 0x0025_0cc7_0f48_f00f, 0x00fe_eb00_3000, 0x1000];

    #[test]
    fn an_emulation_failure_shows_the_instruction() {
        let place = Place {
            rip: 0x10000,
            bits: 64,
            reset: false,
        };
        assert_eq!(
            instruction_bytes(EMULATION, &CMPXCHG16B),
            [0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x25, 0, 0, 0x30, 0, 0xeb, 0xfe, 0, 0, 0]
        );
        let text = describe(EMULATION, &CMPXCHG16B, place);
        assert!(text.starts_with("emulation failure at rip=0x10000 (64-bit code): "));
        assert!(text.contains("f0 48 0f c7 0c 25 00 00 30 00 (lock cmpxchg16b [0x300000])"));
    }

    #[test]
    fn without_bytes_it_asks_about_ram_at_rip() {
        assert!(instruction_bytes(EMULATION, &[0, 0x1000, 0]).is_empty());
        assert!(instruction_bytes(SIMUL_EX, &CMPXCHG16B).is_empty());
        assert!(instruction_bytes(EMULATION, &[1]).is_empty());
        let text = describe(EMULATION, &[0, 0x1000], Place::default());
        assert!(text.starts_with("emulation failure: "), "{text}");
        assert!(text.contains("guest RAM at rip"));
        assert!(describe(SIMUL_EX, &[], Place::default()).contains("IDT"));
        assert_eq!(
            describe(9, &[1, 2], Place::default()),
            "suberror 9: data=[0x1, 0x2]"
        );
    }

    #[test]
    fn a_vcpu_run_in_its_reset_state_is_told_to_set_up_a_mode() {
        let mut s = kvm_sregs::default();
        s.cs.selector = 0xf000;
        s.cs.base = 0xffff_0000;
        let place = Place::of(&kvm_regs::default(), &s);
        assert!(place.reset);
        assert!(describe(EMULATION, &[0], place).ends_with("setup_long_mode or load_multiboot"));
        s.cr0 = CR0_PE;
        assert!(!in_reset_state(&s));
        assert!(!describe(EMULATION, &[0], Place::default()).contains("setup_long_mode"));
    }

    #[test]
    fn code_size_follows_the_mode() {
        let mut s = kvm_sregs::default();
        assert_eq!(code_bits(&s), 16);
        s.cr0 = CR0_PE;
        s.cs.db = 1;
        assert_eq!(code_bits(&s), 32);
        s.efer = EFER_LMA;
        s.cs.l = 1;
        s.cs.db = 0;
        assert_eq!(code_bits(&s), 64);
    }
}
