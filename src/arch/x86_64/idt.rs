//! An IDT whose handlers report CPU exceptions to the host.
//!
//! Each of the 32 exception vectors gets a small ring-0 stub (on the IST1 stack, so it
//! works from CPL3 and from CPL0 with a broken stack). The stub stores the vector, the
//! error code, the interrupted RIP, CS, RFLAGS, RSP and CR2 in the report area, then
//! writes the vector to the report port with `out dx, al`; the host ends the run with an
//! `"exception"` exit. If the guest is resumed, the stub returns with `iretq` to the
//! faulting instruction.
//!
//! The report area lies [`REPORT_BELOW_TOP`] bytes below the top of the IST1 stack and
//! the stubs address it from RSP, so vCPUs that share the IDT and stubs but each have a
//! TSS and stack of their own (see `Layout::exception_slot`) each get their own report: two vCPUs that
//! fault at once never write over each other's. At the `out`, RSP is always
//! [`STUB_RSP_BELOW_TOP`] below the stack's top (the IST switch starts from the top).

/// Gates in the IDT (the 32 architectural exception vectors are populated).
pub const VECTORS: usize = 256;
/// Exception vectors that get a stub.
pub const EXCEPTIONS: u8 = 32;
/// Bytes per vector stub.
const STUB_SIZE: u64 = 16;

/// The report the stubs write, in u64 slots from the report address.
pub mod report {
    pub const VECTOR: u64 = 0;
    pub const ERROR_CODE: u64 = 8;
    pub const RIP: u64 = 16;
    pub const CS: u64 = 24;
    pub const RFLAGS: u64 = 32;
    pub const RSP: u64 = 40;
    pub const CR2: u64 = 48;
    pub const SIZE: usize = 56;
}

/// How far below the IST1 stack's top the report area is (the stub's frame, 72 bytes,
/// stays above it).
pub const REPORT_BELOW_TOP: u64 = 0x100;
/// How far below the IST1 stack's top RSP is when the stub writes to the report port:
/// the CPU's frame (SS, RSP, RFLAGS, CS, RIP, error code), the vector, RAX and RDX.
pub const STUB_RSP_BELOW_TOP: u64 = 72;

/// The report area of the stub whose `out` found RSP at `rsp`.
pub fn report_at(rsp: u64) -> u64 {
    rsp.wrapping_add(STUB_RSP_BELOW_TOP)
        .wrapping_sub(REPORT_BELOW_TOP)
}

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// The usual mnemonic of an exception vector (`"#PF"`), or `"#<n>"`.
pub fn name(vector: u64) -> String {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
        "#26", "#27", "#HV", "#VC", "#SX", "#31",
    ];
    NAMES
        .get(vector as usize)
        .map_or_else(|| format!("#{vector}"), |n| (*n).to_string())
}

/// The IDT's bytes: 64-bit interrupt gates for the exception vectors pointing at the
/// stubs at `stubs`, with code selector `code` and IST1; other gates not present. `#BP`
/// and `#OF` gates have DPL 3 so `int3`/`into` from user mode reach them.
pub fn idt_bytes(stubs: u64, code: u16) -> Vec<u8> {
    let mut idt = vec![0u8; VECTORS * 16];
    for v in 0..EXCEPTIONS {
        let offset = stubs + u64::from(v) * STUB_SIZE;
        let dpl: u8 = if v == 3 || v == 4 { 3 } else { 0 };
        let gate = &mut idt[v as usize * 16..v as usize * 16 + 16];
        gate[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&code.to_le_bytes());
        gate[4] = 1; // IST1
        gate[5] = 0x8e | (dpl << 5); // present, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
    }
    idt
}

/// The stubs' machine code, to be placed at `stubs`: 32 stubs of 16 bytes, then the common
/// part that fills the report (below the stack's top: [`report_at`]) and writes the
/// vector to `port`.
pub fn stub_code(stubs: u64, port: u16) -> Vec<u8> {
    let common = stubs + u64::from(EXCEPTIONS) * STUB_SIZE;
    let mut code = Vec::new();
    for v in 0..EXCEPTIONS {
        let start = code.len();
        if !has_error_code(v) {
            code.extend_from_slice(&[0x6a, 0x00]); // push 0
        }
        code.extend_from_slice(&[0x6a, v]); // push vector
        let next = stubs + code.len() as u64 + 5;
        code.push(0xe9); // jmp rel32 common
        code.extend_from_slice(&((common as i64 - next as i64) as i32).to_le_bytes());
        code.resize(start + STUB_SIZE as usize, 0xcc);
    }
    // Stack now: vector, error code, RIP, CS, RFLAGS, RSP, SS.
    code.push(0x50); // push rax            -> everything above moves up by 8
    code.push(0x52); // push rdx            -> and by 8 more
                     // mov [rsp + disp32], rax: the report field `field`, RSP being the stack's top less
                     // STUB_RSP_BELOW_TOP here.
    let to_report = |code: &mut Vec<u8>, field: u64| {
        let disp = STUB_RSP_BELOW_TOP as i64 - REPORT_BELOW_TOP as i64 + field as i64;
        code.extend_from_slice(&[0x48, 0x89, 0x84, 0x24]);
        code.extend_from_slice(&(disp as i32).to_le_bytes());
    };
    let store = |code: &mut Vec<u8>, stack_slot: u8, field: u64| {
        code.extend_from_slice(&[0x48, 0x8b, 0x44, 0x24, 16 + stack_slot * 8]); // mov rax, [rsp+..]
        to_report(code, field);
    };
    store(&mut code, 0, report::VECTOR);
    store(&mut code, 1, report::ERROR_CODE);
    store(&mut code, 2, report::RIP);
    store(&mut code, 3, report::CS);
    store(&mut code, 4, report::RFLAGS);
    store(&mut code, 5, report::RSP);
    code.extend_from_slice(&[0x0f, 0x20, 0xd0]); // mov rax, cr2
    to_report(&mut code, report::CR2);
    code.extend_from_slice(&[0x48, 0x8b, 0x44, 0x24, 16]); // mov rax, [rsp+16] (vector)
    code.extend_from_slice(&[0x66, 0xba]); // mov dx, port
    code.extend_from_slice(&port.to_le_bytes());
    code.push(0xee); // out dx, al
    code.push(0x5a); // pop rdx
    code.push(0x58); // pop rax
    code.extend_from_slice(&[0x48, 0x83, 0xc4, 0x10]); // add rsp, 16 (vector, error code)
    code.extend_from_slice(&[0x48, 0xcf]); // iretq
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_point_at_their_stubs() {
        let idt = idt_bytes(0x1_2345_6000, 0x08);
        for v in [0usize, 13, 14, 31] {
            let g = &idt[v * 16..v * 16 + 16];
            let offset = u64::from(u16::from_le_bytes([g[0], g[1]]))
                | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
                | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32;
            assert_eq!(offset, 0x1_2345_6000 + v as u64 * 16);
            assert_eq!((u16::from_le_bytes([g[2], g[3]]), g[4]), (0x08, 1));
            assert_eq!(g[5], 0x8e);
        }
        assert_eq!(idt[3 * 16 + 5], 0xee);
        assert!(idt[32 * 16..].iter().all(|b| *b == 0));
    }

    #[test]
    fn stubs_push_a_dummy_error_code_only_when_the_cpu_does_not() {
        let code = stub_code(0x5000, 0xf6);
        // #DE (no error code): push 0; push 0; jmp
        assert_eq!(&code[0..4], &[0x6a, 0x00, 0x6a, 0x00]);
        // #GP (error code): push 13; jmp
        assert_eq!(&code[13 * 16..13 * 16 + 3], &[0x6a, 13, 0xe9]);
        // Every jmp lands on the common part.
        for v in 0..32usize {
            let s = &code[v * 16..];
            let at = if has_error_code(v as u8) { 2 } else { 4 };
            let rel = i32::from_le_bytes(s[at + 1..at + 5].try_into().unwrap()) as i64;
            let target = 0x5000 + (v * 16 + at + 5) as i64 + rel;
            assert_eq!(target, 0x5000 + 32 * 16);
        }
        assert_eq!(&code[code.len() - 2..], &[0x48, 0xcf]);
        assert_eq!(name(14), "#PF");
        assert_eq!(name(99), "#99");
    }

    #[test]
    fn the_report_is_written_below_the_stack_top_through_rsp() {
        let code = stub_code(0x5000, 0xf6);
        let common = &code[32 * 16..];
        let texts: Vec<String> = crate::arch::x86_64::disasm::disassemble(common, 64, 0, 40)
            .into_iter()
            .map(|i| i.text)
            .collect();
        let stores: Vec<&String> = texts.iter().filter(|t| t.starts_with("mov [rsp")).collect();
        // VECTOR, ERROR_CODE, RIP, CS, RFLAGS, RSP, CR2: report_at(rsp) + field.
        let want: Vec<String> = [0u64, 8, 16, 24, 32, 40, 48]
            .iter()
            .map(|f| {
                let below = REPORT_BELOW_TOP - STUB_RSP_BELOW_TOP - f;
                format!("mov [rsp-{below:#x}], rax")
            })
            .collect();
        assert_eq!(stores, want.iter().collect::<Vec<_>>(), "{texts:?}");
        // No store to a fixed address: vCPUs with their own stacks have their own reports.
        assert!(texts.iter().all(|t| !t.starts_with("mov [0x")));
        assert!(texts.contains(&"out dx, al".to_string()));
        assert_eq!(
            report_at(0x7000 - STUB_RSP_BELOW_TOP),
            0x7000 - REPORT_BELOW_TOP
        );
    }
}
