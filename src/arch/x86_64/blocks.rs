//! Basic-block starts of 64-bit code by recursive-descent disassembly (with `iced-x86`):
//! from each entry point, decode instruction by instruction; a branch's target and the
//! instruction after a conditional branch start blocks and are followed; `ret`, an
//! indirect jump and instructions that never fall through (`ud2`, `hlt`, `int3`) end a
//! path. Calls are followed into their targets and fall through (a call does not end a
//! block, as in most disassemblers' control-flow graphs).

use std::collections::BTreeSet;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic};

/// What the disassembly found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Blocks {
    /// The address of each block's first instruction.
    pub starts: BTreeSet<u64>,
    /// The address of every instruction decoded.
    pub instructions: BTreeSet<u64>,
}

impl Blocks {
    /// Whether `addr` lies inside a decoded instruction without being its start (a
    /// breakpoint there would corrupt that instruction).
    pub fn inside_instruction(&self, addr: u64, code_len_at: impl Fn(u64) -> usize) -> bool {
        if self.instructions.contains(&addr) {
            return false;
        }
        match self.instructions.range(..addr).next_back() {
            Some(&start) => addr < start + code_len_at(start) as u64,
            None => false,
        }
    }
}

/// Decodes the 64-bit code `code`, which lies at virtual address `base`, from each of
/// `entries` (those outside the code are ignored), and returns the blocks found.
pub fn find_blocks(code: &[u8], base: u64, entries: &[u64]) -> Blocks {
    let end = base.saturating_add(code.len() as u64);
    let inside = |a: u64| a >= base && a < end;
    let mut out = Blocks::default();
    let mut work: Vec<u64> = entries.iter().copied().filter(|a| inside(*a)).collect();
    out.starts.extend(work.iter().copied());
    while let Some(start) = work.pop() {
        let mut ip = start;
        loop {
            if !inside(ip) || (ip != start && out.instructions.contains(&ip)) {
                break;
            }
            if ip == start && out.instructions.contains(&ip) {
                // A block found again: its path was decoded already.
                break;
            }
            let offset = (ip - base) as usize;
            let mut decoder = Decoder::with_ip(64, &code[offset..], ip, DecoderOptions::NONE);
            let insn = decoder.decode();
            if insn.is_invalid() {
                break;
            }
            out.instructions.insert(ip);
            let next = insn.next_ip();
            let branch_to = |target: u64, out: &mut Blocks, work: &mut Vec<u64>| {
                if inside(target) && out.starts.insert(target) {
                    work.push(target);
                }
            };
            match insn.flow_control() {
                FlowControl::Next => {
                    if matches!(insn.mnemonic(), Mnemonic::Hlt | Mnemonic::Ud2) {
                        break;
                    }
                }
                FlowControl::UnconditionalBranch => {
                    branch_to(insn.near_branch_target(), &mut out, &mut work);
                    break;
                }
                FlowControl::ConditionalBranch => {
                    branch_to(insn.near_branch_target(), &mut out, &mut work);
                    branch_to(next, &mut out, &mut work);
                    break;
                }
                FlowControl::Call => branch_to(insn.near_branch_target(), &mut out, &mut work),
                FlowControl::IndirectCall => {}
                FlowControl::Return
                | FlowControl::IndirectBranch
                | FlowControl::Exception
                | FlowControl::Interrupt
                | FlowControl::XbeginXabortXend => break,
            }
            ip = next;
        }
    }
    out
}

/// The length of the instruction at `ip` of `code` (at `base`), 1 where it is invalid.
pub fn instruction_len(code: &[u8], base: u64, ip: u64) -> usize {
    let Some(offset) = ip.checked_sub(base).map(|o| o as usize) else {
        return 1;
    };
    if offset >= code.len() {
        return 1;
    }
    let mut decoder = Decoder::with_ip(64, &code[offset..], ip, DecoderOptions::NONE);
    decoder.decode().len().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_split_blocks_and_are_followed() {
        // 0x1000: test edi, edi        85 ff
        // 0x1002: je 0x100a            74 06
        // 0x1004: mov eax, 1           b8 01 00 00 00
        // 0x1009: ret                  c3
        // 0x100a: call 0x1010          e8 01 00 00 00
        // 0x100f: ret                  c3
        // 0x1010: xor eax, eax         31 c0
        // 0x1012: jmp rax              ff e0
        // 0x1014: nop (never reached)  90
        let code = [
            0x85, 0xff, 0x74, 0x06, 0xb8, 0x01, 0, 0, 0, 0xc3, 0xe8, 0x01, 0, 0, 0, 0xc3, 0x31,
            0xc0, 0xff, 0xe0, 0x90,
        ];
        let b = find_blocks(&code, 0x1000, &[0x1000]);
        assert_eq!(
            b.starts.iter().copied().collect::<Vec<_>>(),
            vec![0x1000, 0x1004, 0x100a, 0x1010]
        );
        assert!(b.instructions.contains(&0x100f), "a call falls through");
        assert!(
            !b.instructions.contains(&0x1014),
            "nothing after an indirect jump"
        );
        assert!(b.inside_instruction(0x1005, |ip| instruction_len(&code, 0x1000, ip)));
        assert!(!b.inside_instruction(0x1004, |ip| instruction_len(&code, 0x1000, ip)));
        assert!(!b.inside_instruction(0x1014, |ip| instruction_len(&code, 0x1000, ip)));
        assert_eq!(instruction_len(&code, 0x1000, 0x1004), 5);
    }

    #[test]
    fn entries_outside_the_code_and_bad_bytes_end_paths() {
        let code = [0x90, 0x0f, 0xff];
        let b = find_blocks(&code, 0x10, &[0x10, 0x5000]);
        assert_eq!(b.starts.iter().copied().collect::<Vec<_>>(), vec![0x10]);
        assert_eq!(
            b.instructions.iter().copied().collect::<Vec<_>>(),
            vec![0x10]
        );
        // A loop onto itself ends.
        let b = find_blocks(&[0xeb, 0xfe], 0, &[0]);
        assert_eq!(b.starts.len(), 1);
    }
}
