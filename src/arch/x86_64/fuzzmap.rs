//! Page tables for a fuzzing address space, where a target's mistakes fault: only the
//! ranges a target declares are mapped for user mode (4 KiB pages, each with its own
//! write and execute permission), kvmpy's own structures are supervisor-only, and the
//! first 64 KiB (the NULL area) are never user-accessible. Everything else is not
//! present, so a wild access from CPL3 is a #PF instead of a silent write.

use std::collections::BTreeMap;

use super::paging::{PRESENT, USER, WRITABLE};
use super::Layout;

/// Execute-disable (needs EFER.NXE, which long mode setup turns on).
pub const NO_EXECUTE: u64 = 1 << 63;
/// Addresses below this are never mapped for user mode.
pub const NULL_AREA: u64 = 0x10000;
const PAGE: u64 = 0x1000;

/// A guest range mapped for user mode, identity (virtual = physical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRange {
    pub start: u64,
    pub size: u64,
    pub writable: bool,
    pub executable: bool,
}

/// Page-table pages to write, `(guest address, bytes)`.
pub type Pages = Vec<(u64, Vec<u8>)>;

/// The page-table pages for `user` ranges at `layout` (`(guest address, page bytes)`),
/// and one past the last byte they use. PML4 and PDPT go where `layout` says; page
/// directories and page tables follow from `layout.pd`, as many as needed. kvmpy's
/// structures (`layout.gdt` up to `layout.pd`) are mapped supervisor-only; the page-table
/// pages themselves are not mapped at all. Ranges are rounded out to whole pages; where
/// two share a page it gets the union of their permissions.
pub fn fuzz_map(layout: &Layout, user: &[UserRange]) -> Result<(Pages, u64), String> {
    let mut pages: BTreeMap<u64, u64> = BTreeMap::new();
    let kvmpy = (layout.gdt, layout.pd);
    for page in (kvmpy.0..kvmpy.1).step_by(PAGE as usize) {
        pages.insert(page, PRESENT | WRITABLE);
    }
    for r in user {
        let end = r
            .start
            .checked_add(r.size)
            .filter(|e| *e <= 1 << 39 && r.size > 0)
            .ok_or_else(|| {
                format!(
                    "user range {:#x}+{:#x} must be non-empty and below 512 GiB",
                    r.start, r.size
                )
            })?;
        let (first, last) = (r.start & !(PAGE - 1), (end + PAGE - 1) & !(PAGE - 1));
        if first < NULL_AREA {
            return Err(format!(
                "user range {:#x}+{:#x} overlaps the NULL area (the first {:#x} bytes stay \
                 unmapped)",
                r.start, r.size, NULL_AREA
            ));
        }
        if first < kvmpy.1 && last > kvmpy.0 {
            return Err(format!(
                "user range {:#x}+{:#x} overlaps kvmpy's tables at {:#x}..{:#x}",
                r.start, r.size, kvmpy.0, kvmpy.1
            ));
        }
        let mut flags = PRESENT | USER;
        if r.writable {
            flags |= WRITABLE;
        }
        for page in (first..last).step_by(PAGE as usize) {
            let old = pages
                .get(&page)
                .copied()
                .unwrap_or(PRESENT | USER | NO_EXECUTE);
            let mut f = (old | flags) & !NO_EXECUTE;
            if !r.executable && old & NO_EXECUTE != 0 {
                f |= NO_EXECUTE;
            }
            pages.insert(page, f);
        }
    }
    // Allocate one page directory per GiB and one page table per 2 MiB touched.
    let mut next = layout.pd;
    let mut alloc = || {
        let at = next;
        next += PAGE;
        at
    };
    let mut pds: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
    let mut pts: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
    for (&page, &flags) in &pages {
        let (gib, mib2) = (page >> 30, page >> 21);
        pds.entry(gib).or_insert_with(|| (alloc(), vec![0; 512]));
        let pt = pts.entry(mib2).or_insert_with(|| (alloc(), vec![0; 512]));
        pt.1[((page >> 12) & 0x1ff) as usize] = page | flags;
    }
    if let Some(r) = user
        .iter()
        .find(|r| r.start < next && r.start + r.size > layout.pd)
    {
        return Err(format!(
            "user range {:#x}+{:#x} overlaps kvmpy's page tables at {:#x}..{:#x}",
            r.start, r.size, layout.pd, next
        ));
    }
    let table = PRESENT | WRITABLE | USER;
    for (&mib2, (addr, _)) in &pts {
        let pd = pds.get_mut(&(mib2 >> 9)).expect("one per GiB touched");
        pd.1[(mib2 & 0x1ff) as usize] = addr | table;
    }
    let mut pdpt = vec![0u64; 512];
    for (&gib, (addr, _)) in &pds {
        pdpt[gib as usize] = addr | table;
    }
    let mut pml4 = vec![0u64; 512];
    pml4[0] = layout.pdpt | table;
    let mut out = vec![
        (layout.pml4, to_bytes(&pml4)),
        (layout.pdpt, to_bytes(&pdpt)),
    ];
    out.extend(pds.into_values().map(|(a, e)| (a, to_bytes(&e))));
    out.extend(pts.into_values().map(|(a, e)| (a, to_bytes(&e))));
    Ok((out, next))
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::paging::{translate, WalkError};
    use super::super::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
    use super::*;
    use std::collections::HashMap;

    fn leaf(pages: &[(u64, Vec<u8>)], vaddr: u64) -> Result<(u64, u64), WalkError> {
        let mut mem = HashMap::new();
        for (a, b) in pages {
            mem.insert(*a, b.clone());
        }
        let read = |gpa: u64, _| {
            let page = mem.get(&(gpa & !0xfff))?;
            let at = (gpa & 0xfff) as usize;
            Some(u64::from_le_bytes(page[at..at + 8].try_into().unwrap()))
        };
        let pa = translate(
            CR0_PE | CR0_PG,
            0x8000,
            CR4_PAE,
            EFER_LME | EFER_LMA,
            vaddr,
            read,
        )?;
        // The leaf entry: walk by hand to the page table.
        let e = |t: u64, shift: u32| read(t + ((vaddr >> shift) & 0x1ff) * 8, 8).unwrap();
        let pt = e(e(e(0x8000, 39) & !0xfff, 30) & !0xfff, 21) & !0xfff;
        Ok((pa, e(pt, 12) & !0x000f_ffff_ffff_f000))
    }

    #[test]
    fn only_declared_pages_are_user_mapped_with_their_permissions() {
        let layout = Layout::at(0x1000, 1, false).unwrap();
        let user = [
            UserRange {
                start: 0x100000,
                size: 0x1800,
                writable: false,
                executable: true,
            },
            UserRange {
                start: 0x101800,
                size: 0x1000,
                writable: true,
                executable: false,
            },
            UserRange {
                start: 0x4000_0000,
                size: 0x1000,
                writable: true,
                executable: false,
            },
        ];
        let (pages, end) = fuzz_map(&layout, &user).unwrap();
        // PD for GiB 0 and 1, PT for 2 MiB blocks 0 and 0x200.
        assert_eq!(end, layout.pd + 4 * 0x1000);
        assert!(pages.iter().all(|(a, _)| *a >= layout.pml4 && *a < end));
        assert_eq!(leaf(&pages, 0x100010).unwrap(), (0x100010, PRESENT | USER));
        // Shared page: union of permissions.
        assert_eq!(leaf(&pages, 0x101000).unwrap().1, PRESENT | USER | WRITABLE);
        assert_eq!(
            leaf(&pages, 0x102000).unwrap().1,
            PRESENT | USER | WRITABLE | NO_EXECUTE
        );
        assert_eq!(leaf(&pages, 0x4000_0000).unwrap().0, 0x4000_0000);
        // kvmpy's tables: supervisor only. NULL page and undeclared pages: absent.
        assert_eq!(leaf(&pages, layout.gdt).unwrap().1, PRESENT | WRITABLE);
        assert_eq!(leaf(&pages, layout.stubs).unwrap().1, PRESENT | WRITABLE);
        assert_eq!(
            leaf(&pages, 0).unwrap_err(),
            WalkError::NotMapped { level: 1 }
        );
        assert_eq!(
            leaf(&pages, 0x103000).unwrap_err(),
            WalkError::NotMapped { level: 1 }
        );
        assert_eq!(
            leaf(&pages, 0x8000_0000).unwrap_err(),
            WalkError::NotMapped { level: 3 }
        );
    }

    #[test]
    fn ranges_in_the_null_area_or_over_kvmpys_tables_are_refused() {
        let layout = Layout::at(0x1000, 1, false).unwrap();
        let r = |start, size| UserRange {
            start,
            size,
            writable: true,
            executable: false,
        };
        assert!(fuzz_map(&layout, &[r(0x0, 0x1000)])
            .unwrap_err()
            .contains("NULL"));
        assert!(fuzz_map(&layout, &[r(0xf000, 0x2000)])
            .unwrap_err()
            .contains("NULL"));
        let high = Layout::at(0x20000, 1, false).unwrap();
        assert!(fuzz_map(&high, &[r(0x21000, 0x10)])
            .unwrap_err()
            .contains("tables"));
        assert!(fuzz_map(&high, &[r(0x29000, 0x10)])
            .unwrap_err()
            .contains("page tables"));
        assert!(fuzz_map(&layout, &[r(0x100000, 0)]).is_err());
        assert!(fuzz_map(&layout, &[r(u64::MAX - 10, 0x100)]).is_err());
    }
}
