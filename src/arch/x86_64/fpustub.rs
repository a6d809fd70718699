//! The FPU restore stub: a few instructions a 64-bit CPL3 vCPU runs on its way back into
//! a snapshot, which load the snapshot's FPU/SSE/AVX state (`xrstor64`, or `fxrstor64`
//! where CR4.OSXSAVE is clear) and jump to the snapshot's RIP with RAX and RDX as they
//! were: on a host where each vCPU ioctl is costly this replaces a `KVM_SET_XSAVE`.
//!
//! The stub lives in a small memory slot of its own at [`STUB_GPA`] (read-only to the
//! guest, outside every region, so no snapshot holds it and no dirty log sees it). kvmpy's
//! long mode page tables map it at [`STUB_VA`] through one PDPT entry, [`STUB_PDPTE`];
//! the page directory and page table below it are the slot's first two pages. Each vCPU
//! (ids below [`VCPU_SLOTS`]) has a code page (the stub, and the saved RAX, RDX and RIP at
//! [`SAVED_AT`]) followed by an image page (the 4 KiB XSAVE region, standard format).

use super::paging::{PRESENT, USER};

/// The Accessed bit of a paging entry: preset so the CPU never writes the tables.
pub const ACCESSED: u64 = 1 << 5;
/// Guest physical address of the stub's slot (511 GiB + 1023 MiB: needs 39 physical
/// address bits, which every x86-64 CPU with long mode offers).
pub const STUB_GPA: u64 = 0x7f_fff0_0000;
/// The guest physical address width the slot needs.
pub const STUB_PHYS_BITS: u32 = 39;
/// Guest virtual address of the slot's first page (PML4 entry 0, PDPT entry 511).
pub const STUB_VA: u64 = 511 << 30;
/// The PDPT index that maps [`STUB_VA`].
pub const STUB_PDPT_INDEX: usize = 511;
/// vCPUs with ids below this get a stub.
pub const VCPU_SLOTS: u64 = 16;
/// Pages in the slot: page directory, page table, then a code and an image page per vCPU.
pub const SLOT_PAGES: u64 = 2 + 2 * VCPU_SLOTS;
/// Bytes in the slot.
pub const SLOT_BYTES: u64 = SLOT_PAGES * 0x1000;
/// Offset in a code page of the saved RAX, RDX and RIP (three u64).
pub const SAVED_AT: u64 = 0x800;
/// Offset in a code page of the `xrstor64` stub.
pub const XRSTOR_ENTRY: u64 = 0;
/// Offset in a code page of the `fxrstor64` stub.
pub const FXRSTOR_ENTRY: u64 = 0x40;
/// Offset in a code page of the `xrstor64` stub for a guest whose CR4.OSXSAVE is clear on
/// a host that lets its CPL3 code use AVX anyway (a nested PVM-style KVM runs it under
/// the host's CR4 and XCR0): RFBM = XCR0 & [`LEAKY_RFBM`].
pub const LEAKY_ENTRY: u64 = 0x80;
/// The components the [`LEAKY_ENTRY`] stub loads: x87, SSE, AVX, MPX and AVX-512 (not
/// PKRU, which such a guest cannot use, nor AMX, which XFD may guard).
pub const LEAKY_RFBM: u32 = 0xff;
/// Bytes from an entry to the end of its stub: a RIP in `[entry, entry + STUB_LEN)` is
/// inside it.
pub const STUB_LEN: u64 = 38;

const PAGE: u64 = 0x1000;

// The two stubs do not overlap each other or the saved registers, and the slot fits the
// physical address width it asks for.
const _: () = assert!(
    FXRSTOR_ENTRY >= XRSTOR_ENTRY + STUB_LEN
        && LEAKY_ENTRY >= FXRSTOR_ENTRY + STUB_LEN
        && LEAKY_ENTRY + STUB_LEN <= SAVED_AT
);
const _: () = assert!(STUB_GPA + SLOT_BYTES <= 1 << STUB_PHYS_BITS);
const TABLE_FLAGS: u64 = PRESENT | USER | ACCESSED;

/// The PDPT entry kvmpy's page tables hold at [`STUB_PDPT_INDEX`]: the slot's page
/// directory, user-accessible, read-only, Accessed preset.
pub const STUB_PDPTE: u64 = STUB_GPA | TABLE_FLAGS;

/// Offset in the slot of vCPU slot `k`'s code page (its image page follows).
pub fn code_page(k: u64) -> u64 {
    (2 + 2 * k) * PAGE
}

/// The slot's page directory and page table: every code and image page mapped
/// user-readable (never writable), every entry with Accessed preset.
pub fn table_pages() -> (Vec<u8>, Vec<u8>) {
    let mut pd = vec![0u8; PAGE as usize];
    pd[..8].copy_from_slice(&((STUB_GPA + PAGE) | TABLE_FLAGS).to_le_bytes());
    let mut pt = vec![0u8; PAGE as usize];
    for i in 2..SLOT_PAGES {
        let at = (i * 8) as usize;
        pt[at..at + 8].copy_from_slice(&((STUB_GPA + i * PAGE) | TABLE_FLAGS).to_le_bytes());
    }
    (pd, pt)
}

/// `disp32` of a RIP-relative operand at `target`, for an instruction ending at `end`
/// (both offsets in the code page).
fn disp(end: u64, target: u64) -> [u8; 4] {
    ((target as i64 - end as i64) as i32).to_le_bytes()
}

/// One stub at `entry`: `mov eax,{eax}; mov edx,{edx}; (f)xrstor64 [rip+image];
/// mov rax,[rip+saved]; mov rdx,[rip+saved+8]; jmp [rip+saved+16]`.
fn stub(entry: u64, modrm: u8, eax: u32, edx: u32) -> Vec<u8> {
    let mut code = vec![0xb8];
    code.extend(eax.to_le_bytes());
    code.push(0xba);
    code.extend(edx.to_le_bytes());
    code.extend([0x48, 0x0f, 0xae, modrm]);
    code.extend(disp(entry + 18, PAGE));
    code.extend([0x48, 0x8b, 0x05]);
    code.extend(disp(entry + 25, SAVED_AT));
    code.extend([0x48, 0x8b, 0x15]);
    code.extend(disp(entry + 32, SAVED_AT + 8));
    code.extend([0xff, 0x25]);
    code.extend(disp(entry + STUB_LEN, SAVED_AT + 16));
    code
}

/// A code page's bytes up to [`SAVED_AT`]: the `xrstor64` stub at [`XRSTOR_ENTRY`], the
/// `fxrstor64` one at [`FXRSTOR_ENTRY`], the other `xrstor64` one at [`LEAKY_ENTRY`],
/// `int3` everywhere else.
pub fn code_bytes() -> Vec<u8> {
    let mut page = vec![0xccu8; SAVED_AT as usize];
    let all = u32::MAX;
    for (entry, modrm, eax, edx) in [
        (XRSTOR_ENTRY, 0x2d, all, all),
        (FXRSTOR_ENTRY, 0x0d, all, all),
        (LEAKY_ENTRY, 0x2d, LEAKY_RFBM, 0),
    ] {
        let code = stub(entry, modrm, eax, edx);
        page[entry as usize..entry as usize + code.len()].copy_from_slice(&code);
    }
    page
}

/// XCR0 state components kvmpy's image page can hold (x87, SSE, AVX, MPX, AVX-512 and
/// PKRU: everything standard format puts in the first 4 KiB; not AMX).
pub const IMAGE_COMPONENTS: u64 = 0x2ff;

/// PKRU's bit in XCR0 and in an image's XSTATE_BV.
pub const PKRU: u64 = 1 << 9;

/// Where XSTATE_BV lies in a standard-format XSAVE image.
pub const XSTATE_BV_AT: usize = 512;

/// Whether `xrstor64` with RFBM = `xcr0` loads the standard-format XSAVE `image` (KVM's
/// 4 KiB region) without faulting: XCR0 holds only components the image can hold,
/// XSTATE_BV is within XCR0, XCOMP_BV is 0 (standard format) and the header's reserved
/// bytes are 0, MXCSR has no reserved bit set (`mxcsr_mask` from the image).
pub fn xrstor_loads(image: &[u8], xcr0: u64) -> bool {
    image.len() >= 4096 && xrstor_loads_with(image, image_u64(image, XSTATE_BV_AT), xcr0)
}

/// The XSTATE_BV the `xrstor64` stub loads the snapshot's `image` with, for a CPL3 guest
/// whose XCR0 is `xcr0` and whose CR4.PKE is `pke`; `None` where that would fault.
///
/// It is the image's own, except for PKRU: on a host with protection keys, KVM's
/// `KVM_GET_XSAVE` reports the vCPU's PKRU (set in XSTATE_BV) whatever the guest's XCR0
/// and CR4, and `xrstor64` faults on a component outside XCR0. While CR4.PKE is clear and
/// XCR0 lacks PKRU, a CPL3 guest can neither read nor write PKRU, so what the stub must
/// put back does not include it and its bit is cleared.
pub fn stub_xstate_bv(image: &[u8], xcr0: u64, pke: bool) -> Option<u64> {
    if image.len() < 4096 {
        return None;
    }
    let mut bv = image_u64(image, XSTATE_BV_AT);
    if !pke && xcr0 & PKRU == 0 {
        bv &= !PKRU;
    }
    xrstor_loads_with(image, bv, xcr0).then_some(bv)
}

/// [`xrstor_loads`] with `bv` for the image's XSTATE_BV.
fn xrstor_loads_with(image: &[u8], bv: u64, xcr0: u64) -> bool {
    if xcr0 & !IMAGE_COMPONENTS != 0 || xcr0 & 3 != 3 {
        return false;
    }
    let header_ok = bv & !xcr0 == 0
        && (XSTATE_BV_AT + 8..XSTATE_BV_AT + 64)
            .step_by(8)
            .all(|at| image_u64(image, at) == 0);
    header_ok && fxrstor_loads(image)
}

/// The little-endian `u64` at `at` in `image` (all ones past its end).
fn image_u64(image: &[u8], at: usize) -> u64 {
    image
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_le_bytes)
}

/// Whether `fxrstor64` loads the legacy region of `image` without faulting: MXCSR has
/// no bit outside the image's MXCSR_MASK (0xffbf where it says 0).
pub fn fxrstor_loads(image: &[u8]) -> bool {
    if image.len() < 512 {
        return false;
    }
    let word =
        |at: usize| u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]);
    let mask = match word(28) {
        0 => 0xffbf,
        m => m,
    };
    word(24) & !mask == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disassemble(code: &[u8], ip: u64) -> Vec<String> {
        let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        fmt.options_mut().set_rip_relative_addresses(false);
        let mut out = Vec::new();
        for insn in &mut decoder {
            let mut s = String::new();
            fmt.format(&insn, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn stubs_load_the_image_and_jump_to_the_saved_rip() {
        let page = code_bytes();
        let va = STUB_VA + code_page(3);
        for (entry, op, eax, edx) in [
            (XRSTOR_ENTRY, "xrstor64", "0FFFFFFFFh", "0FFFFFFFFh"),
            (FXRSTOR_ENTRY, "fxrstor64", "0FFFFFFFFh", "0FFFFFFFFh"),
            (LEAKY_ENTRY, "xrstor64", "0FFh", "0"),
        ] {
            let at = entry as usize;
            let text = disassemble(&page[at..at + STUB_LEN as usize], va + entry);
            let image = va + PAGE;
            let saved = va + SAVED_AT;
            assert_eq!(
                text,
                vec![
                    format!("mov eax,{eax}"),
                    format!("mov edx,{edx}"),
                    format!("{op} [{image:X}h]"),
                    format!("mov rax,[{saved:X}h]"),
                    format!("mov rdx,[{:X}h]", saved + 8),
                    format!("jmp qword ptr [{:X}h]", saved + 16),
                ],
                "{op}"
            );
        }
        let gaps = [
            (STUB_LEN, FXRSTOR_ENTRY),
            (FXRSTOR_ENTRY + STUB_LEN, LEAKY_ENTRY),
        ];
        for (from, to) in gaps {
            assert!(page[from as usize..to as usize].iter().all(|b| *b == 0xcc));
        }
    }

    #[test]
    fn tables_map_each_page_read_only_with_accessed_preset() {
        let (pd, pt) = table_pages();
        let entry =
            |page: &[u8], i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(&pd, 0), (STUB_GPA + PAGE) | PRESENT | USER | ACCESSED);
        assert!((1..512).all(|i| entry(&pd, i) == 0));
        assert_eq!((entry(&pt, 0), entry(&pt, 1)), (0, 0));
        for i in 2..SLOT_PAGES as usize {
            assert_eq!(entry(&pt, i), (STUB_GPA + i as u64 * PAGE) | 0x25);
        }
        assert_eq!(entry(&pt, SLOT_PAGES as usize), 0);
        assert_eq!(STUB_PDPTE & 2, 0, "never writable");
        assert_eq!(STUB_VA >> 30, STUB_PDPT_INDEX as u64);
    }

    #[test]
    fn images_that_would_fault_are_refused() {
        let mut image = vec![0u8; 4096];
        image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        image[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        image[512] = 0x7;
        assert!(xrstor_loads(&image, 0x7));
        assert!(fxrstor_loads(&image));
        assert!(!xrstor_loads(&image, 0x3), "XSTATE_BV outside XCR0");
        assert!(!xrstor_loads(&image, 0x60007), "AMX is not in the image");
        let mut compact = image.clone();
        compact[527] = 0x80;
        assert!(!xrstor_loads(&compact, 0x7), "compacted format");
        let mut reserved = image.clone();
        reserved[540] = 1;
        assert!(!xrstor_loads(&reserved, 0x7), "reserved header bytes");
        let mut mxcsr = image.clone();
        mxcsr[26] = 1;
        assert!(!fxrstor_loads(&mxcsr) && !xrstor_loads(&mxcsr, 0x7));
        assert!(!xrstor_loads(&image[..600], 0x7));
    }

    #[test]
    fn pkru_outside_xcr0_is_left_out_only_while_cr4_pke_is_clear() {
        let mut image = vec![0u8; 4096];
        image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        image[512..520].copy_from_slice(&(0x7 | PKRU).to_le_bytes());
        // What KVM_GET_XSAVE gives on a host with protection keys: PKRU reported.
        assert!(!xrstor_loads(&image, 0x7));
        assert_eq!(stub_xstate_bv(&image, 0x7, false), Some(0x7));
        // CR4.PKE set: the guest can read PKRU, which the stub cannot load at XCR0 7.
        assert_eq!(stub_xstate_bv(&image, 0x7, true), None);
        // XCR0 with PKRU: loaded with the rest.
        assert_eq!(stub_xstate_bv(&image, 0x7 | PKRU, false), Some(0x7 | PKRU));
        // Other components outside XCR0 still refuse the image.
        image[512..520].copy_from_slice(&(0x7 | PKRU | 0xe0).to_le_bytes());
        assert_eq!(stub_xstate_bv(&image, 0x7, false), None);
        // Checks other than XSTATE_BV's are the same as `xrstor_loads`'.
        image[512..520].copy_from_slice(&0x7u64.to_le_bytes());
        assert_eq!(stub_xstate_bv(&image, 0x7, false), Some(0x7));
        image[540] = 1;
        assert_eq!(stub_xstate_bv(&image, 0x7, false), None);
        assert_eq!(stub_xstate_bv(&image[..600], 0x7, false), None);
    }
}
