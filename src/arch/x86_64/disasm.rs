//! Decoding guest instructions into text (Intel syntax) with `iced-x86`: for messages that
//! show what the guest was executing, and for tracing.

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

/// One decoded instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// The address it was decoded at.
    pub ip: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Intel syntax (`"lock cmpxchg16b [0x300000]"`), or `"(bad)"` for bytes that are not an
    /// instruction (or are cut short).
    pub text: String,
}

/// Decodes up to `max` instructions from `code`, as `bits`-bit code (16, 32 or 64; any
/// other value decodes as 64-bit) located at `ip`. Stops at the end of `code` and after
/// the first invalid instruction, which is returned with the text `"(bad)"`.
pub fn disassemble(code: &[u8], bits: u32, ip: u64, max: usize) -> Vec<Instruction> {
    let bits = if matches!(bits, 16 | 32) { bits } else { 64 };
    let mut decoder = Decoder::with_ip(bits, code, ip, DecoderOptions::NONE);
    let mut formatter = IntelFormatter::new();
    let options = formatter.options_mut();
    options.set_hex_prefix("0x");
    options.set_hex_suffix("");
    options.set_uppercase_hex(false);
    options.set_branch_leading_zeros(false);
    options.set_show_branch_size(false);
    options.set_space_after_operand_separator(true);
    let mut out = Vec::new();
    let mut offset = 0usize;
    while out.len() < max && decoder.can_decode() {
        let insn = decoder.decode();
        let len = insn.len().max(1).min(code.len() - offset);
        let bytes = code[offset..offset + len].to_vec();
        offset += len;
        if insn.is_invalid() {
            out.push(Instruction {
                ip: insn.ip(),
                bytes,
                text: "(bad)".to_string(),
            });
            break;
        }
        let mut text = String::new();
        formatter.format(&insn, &mut text);
        out.push(Instruction {
            ip: insn.ip(),
            bytes,
            text,
        });
    }
    out
}

/// Bytes as lowercase hex pairs separated by spaces: `"f0 48 0f"`.
pub fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_in_each_mode() {
        // lock cmpxchg16b [0x300000] ; jmp $
        let code = [
            0xF0, 0x48, 0x0F, 0xC7, 0x0C, 0x25, 0x00, 0x00, 0x30, 0x00, 0xEB, 0xFE,
        ];
        let insns = disassemble(&code, 64, 0x10000, 8);
        assert_eq!(insns.len(), 2);
        assert_eq!(insns[0].text, "lock cmpxchg16b [0x300000]");
        assert_eq!(insns[0].bytes, &code[..10]);
        assert_eq!(
            (insns[1].ip, insns[1].text.as_str()),
            (0x1000a, "jmp 0x1000a")
        );
        // 0x48 is `dec eax` outside 64-bit mode.
        assert_eq!(disassemble(&[0x48], 32, 0, 1)[0].text, "dec eax");
        assert_eq!(disassemble(&[0x48], 16, 0, 1)[0].text, "dec ax");
        assert_eq!(disassemble(&code, 64, 0, 1).len(), 1);
    }

    #[test]
    fn bad_or_cut_short_bytes_are_bad_and_end_the_listing() {
        let bad = disassemble(&[0x0F, 0xFF, 0x90, 0x90], 64, 0, 8);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].text, "(bad)");
        let short = disassemble(&[0x48, 0x89], 64, 0, 8);
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].text, "(bad)");
        assert_eq!(short[0].bytes, [0x48, 0x89]);
        assert!(disassemble(&[], 64, 0, 8).is_empty());
        assert_eq!(hex_bytes(&[0xf0, 0x0a]), "f0 0a");
    }
}
