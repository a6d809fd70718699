//! x86-64 CPU mode setup: GDT entries, identity-mapped page tables and the special
//! register values that put a vCPU straight into 64-bit long mode.

pub mod gdt;
pub mod paging;

use kvm_bindings::kvm_sregs;

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
/// CR4 bits.
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER bits.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS: bit 1 is always set; IOPL=3 lets CPL3 code use `in`/`out`.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// Where the long-mode helper puts its tables in guest memory, from `base`:
/// GDT at `base`, TSS (with its I/O bitmap) at `base + 0x1000`, PML4 at `base + 0x4000`,
/// PDPT at `base + 0x5000`, then one page directory per mapped GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeLayout {
    pub gdt: u64,
    pub tss: u64,
    pub pml4: u64,
    pub pdpt: u64,
    pub pd: u64,
    /// GiB identity-mapped with 2 MiB pages.
    pub gib: u64,
}

impl LongModeLayout {
    /// The layout at `base` (page aligned) mapping `gib` GiB (1 to 512).
    pub fn at(base: u64, gib: u64) -> Result<Self, String> {
        if base % 0x1000 != 0 {
            return Err(format!("table address {base:#x} must be page aligned"));
        }
        if !(1..=512).contains(&gib) {
            return Err(format!(
                "the identity map must cover 1 to 512 GiB, not {gib}"
            ));
        }
        Ok(LongModeLayout {
            gdt: base,
            tss: base + 0x1000,
            pml4: base + 0x4000,
            pdpt: base + 0x5000,
            pd: base + 0x6000,
            gib,
        })
    }

    /// One past the last byte the tables use.
    #[cfg(test)]
    pub fn end(&self) -> u64 {
        self.pd + self.gib * 0x1000
    }
}

/// The special registers for flat 64-bit long mode with paging at `layout`, at CPL3
/// (`user`) or CPL0. Fields not set here (APIC base, interrupt bitmap) keep `base`'s
/// values.
pub fn long_mode_sregs(base: &kvm_sregs, layout: &LongModeLayout, user: bool) -> kvm_sregs {
    let mut s = *base;
    let (code, data) = if user {
        (gdt::USER_CODE64, gdt::USER_DATA)
    } else {
        (gdt::KERNEL_CODE64, gdt::KERNEL_DATA)
    };
    let table = gdt::table(layout.tss);
    s.cs = gdt::segment(table[code as usize >> 3], code);
    let ds = gdt::segment(table[data as usize >> 3], data);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = gdt::segment(table[gdt::TSS as usize >> 3], gdt::TSS);
    s.ldt = kvm_bindings::kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = layout.gdt;
    s.gdt.limit = (table.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    s.cr3 = layout.pml4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
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
    fn layout_places_tables_in_consecutive_pages() {
        let l = LongModeLayout::at(0x1000, 2).unwrap();
        assert_eq!(
            (l.gdt, l.tss, l.pml4, l.pdpt, l.pd),
            (0x1000, 0x2000, 0x5000, 0x6000, 0x7000)
        );
        assert_eq!(l.end(), 0x9000);
        assert!(l.tss + gdt::TSS_SIZE <= l.pml4);
        assert!(LongModeLayout::at(0x1001, 1).is_err());
        assert!(LongModeLayout::at(0x1000, 0).is_err());
        assert!(LongModeLayout::at(0x1000, 513).is_err());
    }

    #[test]
    fn user_mode_runs_at_cpl3_with_paging() {
        let l = LongModeLayout::at(0x1000, 1).unwrap();
        let s = long_mode_sregs(&kvm_sregs::default(), &l, true);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.ss.selector & 3, 3);
        assert_eq!(s.cr3, 0x5000);
        assert_eq!(s.tr.base, 0x2000);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(long_mode_rflags(true) & RFLAGS_IOPL3, RFLAGS_IOPL3);
        let k = long_mode_sregs(&kvm_sregs::default(), &l, false);
        assert_eq!(k.cs.dpl, 0);
        assert_eq!(k.cs.selector, gdt::KERNEL_CODE64);
    }
}
