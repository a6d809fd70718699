//! x86-64 CPU mode setup: GDT and TSS, an IDT whose stubs report exceptions to the host,
//! identity-mapped page tables, page-table walks, and the special register values that
//! put a vCPU straight into 32-bit protected mode or 64-bit long mode.
//!
//! Everything here is pure (bytes and register values); the callers write the bytes into
//! guest memory and the registers into the vCPU.

pub mod blocks;
pub mod disasm;
pub mod fpustub;
pub mod fuzzmap;
pub mod gdt;
pub mod idt;
pub mod modes;
pub mod paging;

use kvm_bindings::{kvm_segment, kvm_sregs};

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
/// CR4 bits.
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_LA57: u64 = 1 << 12;
/// EFER bits.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS: bit 1 is always set; IOPL=3 lets CPL3 code use `in`/`out`.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// How many vCPUs besides the first can share one set of tables with exceptions.
pub const EXTRA_EXCEPTION_SLOTS: usize = 15;

/// Where the mode helpers put their structures in guest memory, from `base`:
///
/// | offset | what |
/// |---|---|
/// | `0x0000` | GDT |
/// | `0x1000` | TSS with an I/O bitmap allowing every port (0x2069 bytes) |
/// | `0x4000` | IDT (256 gates) |
/// | `0x5000` | exception stubs (ring-0 code) |
/// | `0x6000` | exception stack (one page; its top is the TSS's IST1 and RSP0), with the |
/// |          | stubs' exception report (7 u64) at `0x6f00`, below the stubs' frame |
///
/// vCPUs after the first that use the same tables with exceptions each get a TSS in the
/// GDT's page and a stack (with its report) in the TSS's last page: see
/// [`Layout::exception_slot`].
/// | `0x7000` | PML4 |
/// | `0x8000` | PDPT |
/// | `0x9000` | page directories, one per mapped GiB (none with 1 GiB pages) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub gdt: u64,
    pub tss: u64,
    pub report: u64,
    pub idt: u64,
    pub stubs: u64,
    pub stack_top: u64,
    pub pml4: u64,
    pub pdpt: u64,
    pub pd: u64,
    /// GiB identity-mapped.
    pub gib: u64,
    /// Whether the map uses 1 GiB pages (else 2 MiB pages).
    pub huge: bool,
}

impl Layout {
    /// The layout at `base` (page aligned) identity-mapping `gib` GiB (1 to 512).
    pub fn at(base: u64, gib: u64, huge: bool) -> Result<Self, String> {
        if base % 0x1000 != 0 {
            return Err(format!("table address {base:#x} must be page aligned"));
        }
        if !(1..=512).contains(&gib) {
            return Err(format!(
                "the identity map must cover 1 to 512 GiB, not {gib}"
            ));
        }
        if base.checked_add(0x9000 + gib * 0x1000).is_none() {
            return Err(format!("table address {base:#x} is too high"));
        }
        Ok(Layout {
            gdt: base,
            tss: base + 0x1000,
            report: base + 0x7000 - idt::REPORT_BELOW_TOP,
            idt: base + 0x4000,
            stubs: base + 0x5000,
            stack_top: base + 0x7000,
            pml4: base + 0x7000,
            pdpt: base + 0x8000,
            pd: base + 0x9000,
            gib,
            huge,
        })
    }

    /// The TSS and exception stack top of the `k`-th vCPU (from 1) after the first that
    /// uses these tables with exceptions, or None past [`EXTRA_EXCEPTION_SLOTS`]. Both
    /// lie in pages the layout already has: the TSSs (0x68 bytes, sharing the first
    /// TSS's I/O bitmap) from `+0x100` in the GDT's page, the stacks (0x100 bytes: the
    /// stubs' 72-byte frame and the report) from `+0x3100`, after the bitmap.
    pub fn exception_slot(&self, k: usize) -> Option<(u64, u64)> {
        if !(1..=EXTRA_EXCEPTION_SLOTS).contains(&k) {
            return None;
        }
        let k = k as u64;
        Some((
            self.gdt + 0x100 + (k - 1) * 0x80,
            self.gdt + 0x3100 + k * 0x100,
        ))
    }

    /// One past the last byte the structures use.
    pub fn end(&self) -> u64 {
        if self.huge {
            self.pd
        } else {
            self.pd + self.gib * 0x1000
        }
    }
}

fn flat(selector: u16) -> kvm_segment {
    let table = gdt::table(0);
    gdt::segment(table[selector as usize >> 3], selector)
}

/// The special registers for flat 64-bit long mode with paging at `layout`, at CPL3
/// (`user`) or CPL0. With `idt`, the IDT at `layout.idt` is loaded; otherwise the IDT is
/// empty (any exception triple-faults). Fields not set here (APIC base, interrupt
/// bitmap) keep `base`'s values.
pub fn long_mode_sregs(base: &kvm_sregs, layout: &Layout, user: bool, idt: bool) -> kvm_sregs {
    let mut s = *base;
    let (code, data) = if user {
        (gdt::USER_CODE64, gdt::USER_DATA)
    } else {
        (gdt::KERNEL_CODE64, gdt::KERNEL_DATA)
    };
    s.cs = flat(code);
    let ds = flat(data);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    let table = gdt::table(layout.tss);
    s.tr = gdt::segment(table[gdt::TSS as usize >> 3], gdt::TSS);
    s.tr.base |= table[(gdt::TSS as usize >> 3) + 1] << 32;
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = layout.gdt;
    s.gdt.limit = (table.len() * 8 - 1) as u16;
    s.idt.base = if idt { layout.idt } else { 0 };
    s.idt.limit = if idt {
        (idt::VECTORS * 16 - 1) as u16
    } else {
        0
    };
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    s.cr3 = layout.pml4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    s
}

/// The special registers for flat 32-bit protected mode with paging off, at CPL0: code
/// selector 0x38, data selectors 0x10, base 0, limit 4 GiB. Keeps `base`'s TR (the reset
/// state's busy 32-bit TSS), IDT, APIC base and interrupt bitmap.
pub fn protected_mode_sregs(base: &kvm_sregs, layout: &Layout) -> kvm_sregs {
    let mut s = *base;
    s.cs = flat(gdt::KERNEL_CODE32);
    let ds = flat(gdt::KERNEL_DATA);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.gdt.base = layout.gdt;
    s.gdt.limit = (gdt::table(layout.tss).len() * 8 - 1) as u16;
    s.cr0 = CR0_PE | CR0_ET | CR0_NE;
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 0;
    s
}

/// RFLAGS for the mode: IOPL=3 in user mode so port I/O exits straight to the host.
pub fn long_mode_rflags(user: bool) -> u64 {
    if user {
        RFLAGS_RESERVED | RFLAGS_IOPL3
    } else {
        RFLAGS_RESERVED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_structures_in_their_pages() {
        let l = Layout::at(0x1000, 2, false).unwrap();
        assert_eq!(
            (l.gdt, l.tss, l.idt, l.stubs),
            (0x1000, 0x2000, 0x5000, 0x6000)
        );
        assert_eq!((l.pml4, l.pdpt, l.pd), (0x8000, 0x9000, 0xa000));
        assert!(l.stubs + 0x1000 <= l.report);
        assert!(l.report + 56 <= l.stack_top - idt::STUB_RSP_BELOW_TOP);
        assert_eq!(
            idt::report_at(l.stack_top - idt::STUB_RSP_BELOW_TOP),
            l.report
        );
        // Extra vCPUs' TSSs sit between the GDT and the first TSS; their stacks between
        // the first TSS's bitmap and the IDT, each with room for its report and frame.
        assert_eq!(l.exception_slot(0), None);
        assert_eq!(l.exception_slot(EXTRA_EXCEPTION_SLOTS + 1), None);
        let mut prev_top = l.tss + gdt::TSS_SIZE;
        for k in 1..=EXTRA_EXCEPTION_SLOTS {
            let (tss, top) = l.exception_slot(k).unwrap();
            assert!(tss >= l.gdt + 0x100 && tss + 0x68 <= l.tss);
            assert!(top - idt::REPORT_BELOW_TOP >= prev_top && top <= l.idt);
            prev_top = top;
        }
        assert_eq!(l.stack_top, l.pml4);
        assert_eq!(l.end(), 0xc000);
        assert_eq!(Layout::at(0x1000, 2, true).unwrap().end(), 0xa000);
        assert!(Layout::at(0x1001, 1, false).is_err());
        assert!(Layout::at(0x1000, 0, false).is_err());
        assert!(Layout::at(0x1000, 513, false).is_err());
        assert!(Layout::at(u64::MAX - 0xfff, 1, false).is_err());
    }

    #[test]
    fn user_mode_runs_at_cpl3_with_paging() {
        let l = Layout::at(0x1000, 1, false).unwrap();
        let s = long_mode_sregs(&kvm_sregs::default(), &l, true, true);
        assert_eq!((s.cs.dpl, s.cs.selector & 3, s.cs.l), (3, 3, 1));
        assert_eq!((s.ss.dpl, s.ss.selector & 3), (3, 3));
        assert_eq!(s.cr3, l.pml4);
        assert_eq!(s.tr.base, l.tss);
        assert_eq!((s.idt.base, s.idt.limit), (l.idt, 4095));
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(long_mode_rflags(true) & RFLAGS_IOPL3, RFLAGS_IOPL3);
        let k = long_mode_sregs(&kvm_sregs::default(), &l, false, false);
        assert_eq!((k.cs.dpl, k.cs.selector), (0, gdt::KERNEL_CODE64));
        assert_eq!(k.idt.limit, 0);
    }

    #[test]
    fn protected_mode_is_flat_32_bit_without_paging() {
        let l = Layout::at(0x1000, 1, false).unwrap();
        let s = protected_mode_sregs(&kvm_sregs::default(), &l);
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.limit),
            (0x38, 1, 0, 0xffff_ffff)
        );
        assert_eq!((s.ds.selector, s.ds.db), (0x10, 1));
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(s.efer, 0);
    }
}
