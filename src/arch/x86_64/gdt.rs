//! A flat GDT for long mode and the hidden segment state that matches each entry.

use kvm_bindings::kvm_segment;

/// Selectors of [`table`]'s entries (user selectors carry RPL 3).
pub const KERNEL_CODE64: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_CODE64: u16 = 0x18 | 3;
pub const USER_DATA: u16 = 0x20 | 3;
pub const TSS: u16 = 0x28;
pub const KERNEL_CODE32: u16 = 0x38;

/// Builds a descriptor from access/flags bits (`0xAFAA` style: flags in bits 12..16 of the
/// upper byte, access byte low), base and limit, as the Intel SDM lays it out.
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Size of the TSS: the 0x68-byte 64-bit TSS, an I/O permission bitmap allowing all
/// 65536 ports, and the bitmap's terminating 0xff byte.
pub const TSS_SIZE: u64 = 0x68 + 8192 + 1;

/// The GDT: null, kernel code/data, user code/data, a 16-byte 64-bit TSS descriptor for a
/// TSS at `tss_base`, and 32-bit kernel code.
pub fn table(tss_base: u64) -> [u64; 8] {
    [
        0,
        entry(0xa09b, 0, 0xfffff), // 64-bit code, DPL0, present, accessed
        entry(0xc093, 0, 0xfffff), // data, DPL0, read/write, accessed
        entry(0xa0fb, 0, 0xfffff), // 64-bit code, DPL3
        entry(0xc0f3, 0, 0xfffff), // data, DPL3
        entry(0x008b, tss_base as u32, (TSS_SIZE - 1) as u32), // busy 64-bit TSS
        tss_base >> 32,            // TSS base bits 32..64
        entry(0xc09b, 0, 0xfffff), // 32-bit code, DPL0
    ]
}

/// The table's bytes, little endian, as the guest sees them.
pub fn table_bytes(tss_base: u64) -> Vec<u8> {
    table(tss_base)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect()
}

/// The TSS's bytes: RSP0 and IST1 point at `stack_top` (the exception stack), and the
/// I/O map base points at an all-zero bitmap that allows every port, so CPL3 `in`/`out`
/// exit to the host even where the CPU checks the bitmap regardless of IOPL (as some
/// nested KVMs do).
pub fn tss_bytes(stack_top: u64) -> Vec<u8> {
    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[0x04..0x0c].copy_from_slice(&stack_top.to_le_bytes()); // RSP0
    tss[0x24..0x2c].copy_from_slice(&stack_top.to_le_bytes()); // IST1
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    tss[TSS_SIZE as usize - 1] = 0xff;
    tss
}

/// A TSS of 0x68 bytes at `tss_base` for another vCPU's exceptions: RSP0 and IST1 at
/// `stack_top`, and the I/O map base pointing at the bitmap of the TSS at `shared_tss`
/// (which must lie above: the base is an unsigned offset). Returns its bytes and the
/// segment limit that covers that bitmap.
pub fn extra_tss_bytes(tss_base: u64, stack_top: u64, shared_tss: u64) -> (Vec<u8>, u32) {
    let iomap = shared_tss + 0x68 - tss_base;
    assert!(iomap <= 0xffff, "the shared I/O bitmap is out of reach");
    let mut tss = vec![0u8; 0x68];
    tss[0x04..0x0c].copy_from_slice(&stack_top.to_le_bytes()); // RSP0
    tss[0x24..0x2c].copy_from_slice(&stack_top.to_le_bytes()); // IST1
    tss[0x66..0x68].copy_from_slice(&(iomap as u16).to_le_bytes());
    (tss, (iomap + 8192) as u32)
}

/// The hidden segment state KVM needs for descriptor `e` loaded with `selector`.
pub fn segment(e: u64, selector: u16) -> kvm_segment {
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_to_their_fields() {
        let t = table(0x5000);
        let code = segment(t[1], KERNEL_CODE64);
        assert_eq!(
            (
                code.type_,
                code.s,
                code.dpl,
                code.present,
                code.l,
                code.db,
                code.g
            ),
            (0xb, 1, 0, 1, 1, 0, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let user = segment(t[3], USER_CODE64);
        assert_eq!((user.dpl, user.l), (3, 1));
        let data = segment(t[4], USER_DATA);
        assert_eq!((data.type_, data.dpl, data.db), (3, 3, 1));
        let tss = segment(t[5], TSS);
        assert_eq!(
            (tss.type_, tss.s, tss.base, tss.limit),
            (0xb, 0, 0x5000, 0x2068)
        );
        let bytes = tss_bytes(0x7000);
        assert_eq!(
            u64::from_le_bytes(bytes[0x24..0x2c].try_into().unwrap()),
            0x7000
        );
        let code32 = segment(t[7], KERNEL_CODE32);
        assert_eq!((code32.db, code32.l, code32.type_), (1, 0, 0xb));
        assert_eq!(u16::from_le_bytes([bytes[0x66], bytes[0x67]]), 0x68);
        assert_eq!(bytes.len(), 0x2069);
        assert_eq!(bytes[0x2068], 0xff);
    }

    #[test]
    fn entry_matches_known_encoding() {
        // The classic flat 64-bit kernel code descriptor.
        assert_eq!(entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(table_bytes(0x5000).len(), 64);
    }
}
