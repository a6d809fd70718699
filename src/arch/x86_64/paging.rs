//! Identity-mapped 4-level page tables, and walking any guest's page tables.

use super::{Layout, CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA};

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const HUGE: u64 = 1 << 7;

const PAGE_2M: u64 = 2 << 20;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The pages of an identity map of the first `layout.gib` GiB, as `(guest address, page
/// bytes)`: PML4, PDPT and, with 2 MiB pages, one page directory per GiB. Every level is
/// present, writable and user-accessible.
pub fn identity_map(layout: &Layout) -> Vec<(u64, Vec<u8>)> {
    let flags = PRESENT | WRITABLE | USER;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = layout.pdpt | flags;
    let mut pdpt = vec![0u64; 512];
    let mut pages = vec![(layout.pml4, Vec::new()), (layout.pdpt, Vec::new())];
    for g in 0..layout.gib {
        if layout.huge {
            pdpt[g as usize] = (g << 30) | flags | HUGE;
            continue;
        }
        let pd_addr = layout.pd + g * 0x1000;
        pdpt[g as usize] = pd_addr | flags;
        let pd: Vec<u64> = (0..512u64)
            .map(|i| ((g << 30) + i * PAGE_2M) | flags | HUGE)
            .collect();
        pages.push((pd_addr, to_bytes(&pd)));
    }
    pages[0].1 = to_bytes(&pml4);
    pages[1].1 = to_bytes(&pdpt);
    pages
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Why a virtual address does not translate.
#[derive(Debug, PartialEq, Eq)]
pub enum WalkError {
    /// An entry on the walk is not present: the address is not mapped.
    NotMapped { level: u8 },
    /// A table on the walk is outside guest memory.
    TableOutsideMemory { gpa: u64 },
    /// The address is not canonical for the paging mode.
    NonCanonical,
}

/// Translates `vaddr` with the paging mode given by CR0, CR3, CR4 and EFER, reading
/// page-table entries with `read` (guest physical address, entry size in bytes -> entry).
/// Handles paging off, 32-bit paging (4 KiB and, with CR4.PSE, 4 MiB pages), PAE, and
/// 4- and 5-level long mode paging with large pages.
pub fn translate(
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    vaddr: u64,
    mut read: impl FnMut(u64, usize) -> Option<u64>,
) -> Result<u64, WalkError> {
    if cr0 & CR0_PG == 0 {
        return Ok(vaddr);
    }
    let mut entry =
        |gpa: u64, size: usize| read(gpa, size).ok_or(WalkError::TableOutsideMemory { gpa });
    if cr4 & CR4_PAE == 0 {
        // 32-bit paging: 10 + 10 + 12 bits.
        let vaddr = vaddr & 0xffff_ffff;
        let pde = entry((cr3 & 0xffff_f000) + ((vaddr >> 22) & 0x3ff) * 4, 4)?;
        if pde & PRESENT == 0 {
            return Err(WalkError::NotMapped { level: 2 });
        }
        if cr4 & CR4_PSE != 0 && pde & HUGE != 0 {
            let high = ((pde >> 13) & 0xff) << 32; // PSE-36 bits 32..40
            return Ok(high | (pde & 0xffc0_0000) | (vaddr & 0x3f_ffff));
        }
        let pte = entry((pde & 0xffff_f000) + ((vaddr >> 12) & 0x3ff) * 4, 4)?;
        if pte & PRESENT == 0 {
            return Err(WalkError::NotMapped { level: 1 });
        }
        return Ok((pte & 0xffff_f000) | (vaddr & 0xfff));
    }
    let (levels, table): (&[u32], u64) = if efer & EFER_LMA != 0 {
        let bits = if cr4 & CR4_LA57 != 0 { 57 } else { 48 };
        let top = (vaddr as i64) >> (bits - 1);
        if top != 0 && top != -1 {
            return Err(WalkError::NonCanonical);
        }
        let shifts: &[u32] = if bits == 57 {
            &[48, 39, 30, 21, 12]
        } else {
            &[39, 30, 21, 12]
        };
        (shifts, cr3 & ADDR_MASK)
    } else {
        // PAE: a 4-entry PDPT at CR3 (32-byte aligned), then 2 levels.
        let vaddr32 = vaddr & 0xffff_ffff;
        let pdpte = entry((cr3 & 0xffff_ffe0) + (vaddr32 >> 30) * 8, 8)?;
        if pdpte & PRESENT == 0 {
            return Err(WalkError::NotMapped { level: 3 });
        }
        return walk(&[21, 12], pdpte & ADDR_MASK, vaddr32, &mut entry);
    };
    walk(levels, table, vaddr, &mut entry)
}

/// Walks 9-bit-indexed levels of 8-byte entries from `table`.
fn walk(
    shifts: &[u32],
    mut table: u64,
    vaddr: u64,
    entry: &mut impl FnMut(u64, usize) -> Result<u64, WalkError>,
) -> Result<u64, WalkError> {
    for (i, &shift) in shifts.iter().enumerate() {
        let level = (shifts.len() - i) as u8;
        let e = entry(table + ((vaddr >> shift) & 0x1ff) * 8, 8)?;
        if e & PRESENT == 0 {
            return Err(WalkError::NotMapped { level });
        }
        let frame = e & ADDR_MASK;
        if shift == 12 {
            return Ok(frame | (vaddr & 0xfff));
        }
        if (shift == 21 || shift == 30) && e & HUGE != 0 {
            let mask = (1u64 << shift) - 1;
            return Ok((frame & !mask) | (vaddr & mask));
        }
        table = frame;
    }
    unreachable!("the last level has shift 12")
}

#[cfg(test)]
mod tests {
    use super::super::{CR0_PE, EFER_LME};
    use super::*;
    use std::collections::HashMap;

    fn memory(pages: &[(u64, Vec<u8>)]) -> HashMap<u64, u8> {
        let mut mem = HashMap::new();
        for (addr, bytes) in pages {
            for (i, b) in bytes.iter().enumerate() {
                mem.insert(addr + i as u64, *b);
            }
        }
        mem
    }

    fn reader(mem: &HashMap<u64, u8>) -> impl FnMut(u64, usize) -> Option<u64> + '_ {
        move |gpa, size| {
            let mut v = 0u64;
            for i in 0..size as u64 {
                v |= u64::from(*mem.get(&(gpa + i))?) << (8 * i);
            }
            Some(v)
        }
    }

    const LONG: (u64, u64, u64) = (CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA);

    #[test]
    fn identity_maps_translate_to_themselves() {
        for huge in [false, true] {
            let layout = Layout::at(0x1000, 2, huge).unwrap();
            let mem = memory(&identity_map(&layout));
            let (cr0, cr4, efer) = LONG;
            for v in [
                0u64,
                0x1234,
                0x20_0000,
                0x3fff_ffff,
                0x4000_0000,
                0x7fff_fff8,
            ] {
                assert_eq!(
                    translate(cr0, layout.pml4, cr4, efer, v, reader(&mem)),
                    Ok(v)
                );
            }
            assert_eq!(
                translate(cr0, layout.pml4, cr4, efer, 0x8000_0000, reader(&mem)),
                Err(WalkError::NotMapped { level: 3 })
            );
            assert_eq!(
                translate(
                    cr0,
                    layout.pml4,
                    cr4,
                    efer,
                    0x8000_0000_0000_0000,
                    reader(&mem)
                ),
                Err(WalkError::NonCanonical)
            );
        }
    }

    #[test]
    fn four_kib_pages_and_missing_tables() {
        // PML4 @0x1000 -> PDPT @0x2000 -> PD @0x3000 -> PT @0x4000; map 0x40_0000 -> 0x9000.
        let mut pages = vec![
            (0x1000, vec![0u8; 4096]),
            (0x2000, vec![0u8; 4096]),
            (0x3000, vec![0u8; 4096]),
            (0x4000, vec![0u8; 4096]),
        ];
        let set = |page: &mut Vec<u8>, index: usize, value: u64| {
            page[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
        };
        set(&mut pages[0].1, 0, 0x2000 | PRESENT);
        set(&mut pages[1].1, 0, 0x3000 | PRESENT);
        set(&mut pages[2].1, 2, 0x4000 | PRESENT);
        set(&mut pages[3].1, 0, 0x9000 | PRESENT);
        set(&mut pages[2].1, 3, 0x7777_7000 | PRESENT); // a PT outside "memory"
        let mem = memory(&pages);
        let (cr0, cr4, efer) = LONG;
        assert_eq!(
            translate(cr0, 0x1000, cr4, efer, 0x40_0123, reader(&mem)),
            Ok(0x9123)
        );
        assert_eq!(
            translate(cr0, 0x1000, cr4, efer, 0x40_1000, reader(&mem)),
            Err(WalkError::NotMapped { level: 1 })
        );
        assert_eq!(
            translate(cr0, 0x1000, cr4, efer, 0x60_0000, reader(&mem)),
            Err(WalkError::TableOutsideMemory { gpa: 0x7777_7000 })
        );
    }

    #[test]
    fn legacy_32_bit_and_pae_paging() {
        // 32-bit paging: PD @0x1000, 4 MiB page for 0x40_0000 -> 0x80_0000 (PSE), and a
        // 4 KiB page for 0x1000 -> 0x5000 through PT @0x2000.
        let mut pd = vec![0u8; 4096];
        pd[4..8].copy_from_slice(&(0x80_0000u32 | 0x81).to_le_bytes());
        pd[0..4].copy_from_slice(&(0x2000u32 | 1).to_le_bytes());
        let mut pt = vec![0u8; 4096];
        pt[4..8].copy_from_slice(&(0x5000u32 | 1).to_le_bytes());
        let mem = memory(&[(0x1000, pd), (0x2000, pt)]);
        let cr0 = CR0_PE | CR0_PG;
        assert_eq!(
            translate(cr0, 0x1000, CR4_PSE, 0, 0x40_0010, reader(&mem)),
            Ok(0x80_0010)
        );
        assert_eq!(
            translate(cr0, 0x1000, CR4_PSE, 0, 0x1abc, reader(&mem)),
            Ok(0x5abc)
        );
        assert_eq!(
            translate(cr0, 0x1000, CR4_PSE, 0, 0x80_0000, reader(&mem)),
            Err(WalkError::NotMapped { level: 2 })
        );
        // PAE: PDPT @0x3000 (entry 0 -> PD @0x4000), PD entry 1 = 2 MiB page at 0xa0_0000.
        let mut pdpt = vec![0u8; 32];
        pdpt[0..8].copy_from_slice(&(0x4000u64 | 1).to_le_bytes());
        let mut pd = vec![0u8; 4096];
        pd[8..16].copy_from_slice(&(0xa0_0000u64 | 0x81).to_le_bytes());
        let mem = memory(&[(0x3000, pdpt), (0x4000, pd)]);
        assert_eq!(
            translate(cr0, 0x3000, CR4_PAE, 0, 0x20_1234, reader(&mem)),
            Ok(0xa0_1234)
        );
        assert_eq!(
            translate(cr0, 0x3000, CR4_PAE, 0, 0x4000_0000, reader(&mem)),
            Err(WalkError::NotMapped { level: 3 })
        );
        // Paging off: identity.
        assert_eq!(
            translate(CR0_PE, 0, 0, 0, 0x1234_5678, reader(&mem)),
            Ok(0x1234_5678)
        );
    }
}
