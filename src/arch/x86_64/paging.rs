//! Identity-mapped 4-level page tables with 2 MiB pages.

use super::LongModeLayout;

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const HUGE: u64 = 1 << 7;

const PAGE_2M: u64 = 2 << 20;

/// The pages of an identity map of the first `layout.gib` GiB, as `(guest address, page
/// bytes)`: PML4, PDPT and one page directory per GiB. Every level is present, writable
/// and user-accessible.
pub fn identity_map(layout: &LongModeLayout) -> Vec<(u64, Vec<u8>)> {
    let flags = PRESENT | WRITABLE | USER;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = layout.pdpt | flags;
    let mut pdpt = vec![0u64; 512];
    let mut pages = Vec::new();
    for g in 0..layout.gib {
        let pd_addr = layout.pd + g * 0x1000;
        pdpt[g as usize] = pd_addr | flags;
        let pd: Vec<u64> = (0..512u64)
            .map(|i| ((g << 30) + i * PAGE_2M) | flags | HUGE)
            .collect();
        pages.push((pd_addr, to_bytes(&pd)));
    }
    pages.insert(0, (layout.pdpt, to_bytes(&pdpt)));
    pages.insert(0, (layout.pml4, to_bytes(&pml4)));
    pages
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn identity_map_points_every_2m_page_at_itself() {
        let layout = LongModeLayout::at(0x1000, 2).unwrap();
        let pages = identity_map(&layout);
        assert_eq!(pages.len(), 4);
        let mut mem = HashMap::new();
        for (addr, bytes) in &pages {
            for (i, chunk) in bytes.chunks(8).enumerate() {
                mem.insert(
                    addr + i as u64 * 8,
                    u64::from_le_bytes(chunk.try_into().unwrap()),
                );
            }
        }
        let frame = |e: u64| e & 0x000f_ffff_ffff_f000;
        for v in [
            0u64,
            0x1234,
            0x20_0000,
            0x3fff_ffff,
            0x4000_0000,
            0x7fff_fff8,
        ] {
            let pml4e = mem[&(layout.pml4 + ((v >> 39) & 0x1ff) * 8)];
            let pdpte = mem[&(frame(pml4e) + ((v >> 30) & 0x1ff) * 8)];
            let pde = mem[&(frame(pdpte) + ((v >> 21) & 0x1ff) * 8)];
            assert_eq!(
                pde & (PRESENT | WRITABLE | USER | HUGE),
                PRESENT | WRITABLE | USER | HUGE
            );
            assert_eq!(frame(pde) | (v & 0x1f_ffff), v, "{v:#x}");
        }
        // Past the mapped GiBs the PDPT has no entry.
        assert_eq!(mem[&(layout.pdpt + 2 * 8)], 0);
    }
}
