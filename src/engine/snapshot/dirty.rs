//! Which guest pages changed since a snapshot: KVM's dirty log, read with one ioctl per
//! region into a buffer kept between restores, and re-protected only where pages were
//! written when the host has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (what-the-fuzz's
//! `KvmBackend_t::Restore` does the same).

use std::sync::OnceLock;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVMIO};
use kvm_ioctls::{Kvm, VmFd};

use crate::engine::error::{Error, Result};
use crate::engine::memory::Region;

vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Whether the host's KVM offers manual re-protection of dirty pages (probed once).
fn host_has_manual_protect(kvm: &Kvm) -> bool {
    static MANUAL: OnceLock<bool> = OnceLock::new();
    *MANUAL.get_or_init(|| {
        let caps = kvm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        caps > 0 && caps as u32 & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    })
}

/// Turns manual re-protection on for a VM where the host has it; returns whether it is on.
/// Reading the log then leaves pages unprotected until `read` clears the ones it found.
pub fn enable_manual_protect(kvm: &Kvm, vm: &VmFd) -> bool {
    if !host_has_manual_protect(kvm) {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    vm.enable_cap(&cap).is_ok()
}

/// The number of 64-bit words of a region's dirty bitmap.
pub fn bitmap_words(region: &Region) -> usize {
    region.pages().div_ceil(64) as usize
}

/// Reads KVM's dirty log of `region` into `bits` (one bit per page, `bitmap_words` long)
/// and resets it: pages written from now on are logged again. A region split into
/// several slots (see `watch`) is read slot by slot.
pub fn read(vm: &VmFd, region: &Region, manual: bool, bits: &mut [u64]) -> Result<()> {
    assert_eq!(
        bits.len(),
        bitmap_words(region),
        "dirty bitmap of the wrong size"
    );
    let pieces = region.pieces();
    if let [whole] = pieces.as_slice() {
        if whole.first == 0 && whole.pages == region.pages() {
            return read_slot(vm, whole.slot, whole.pages, manual, bits);
        }
    }
    bits.fill(0);
    for piece in pieces {
        let mut part = vec![0u64; piece.pages.div_ceil(64) as usize];
        read_slot(vm, piece.slot, piece.pages, manual, &mut part)?;
        for_each_page(&part, |page| {
            let at = piece.first + page;
            bits[(at / 64) as usize] |= 1 << (at % 64);
        });
    }
    Ok(())
}

/// Reads (and resets) the dirty log of KVM slot `slot` of `pages` pages into `bits`.
fn read_slot(vm: &VmFd, slot: u32, pages: u64, manual: bool, bits: &mut [u64]) -> Result<()> {
    assert_eq!(
        bits.len() as u64,
        pages.div_ceil(64),
        "dirty bitmap of the wrong size"
    );
    let mut log = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
    // SAFETY: KVM writes one bit per page of the slot, `pages.div_ceil(64)` u64 words,
    // into `bits`, which has exactly that length (checked above) and lives across the
    // call; the result is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret != 0 {
        return Err(Error::ioctl(
            "KVM_GET_DIRTY_LOG",
            vmm_sys_util::errno::Error::last(),
        ));
    }
    if !manual {
        return Ok(());
    }
    // Re-protect the span of words that have pages set (KVM wants it 64-page aligned).
    let Some((first, last)) = nonzero_span(bits) else {
        return Ok(());
    };
    let first_page = first as u64 * 64;
    let num_pages = ((last as u64 + 1) * 64).min(pages) - first_page;
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages: num_pages as u32,
        first_page,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bits[first..].as_mut_ptr().cast();
    // SAFETY: KVM reads `num_pages` bits from the bitmap, which starts at word `first` of
    // `bits` and holds at least that many bits (the span ends within the slot); the
    // bitmap lives across the call; the result is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret != 0 {
        return Err(Error::ioctl(
            "KVM_CLEAR_DIRTY_LOG",
            vmm_sys_util::errno::Error::last(),
        ));
    }
    Ok(())
}

/// Words are scanned this many at a time (the OR of a block vectorises): a 4 GiB region's
/// bitmap has 16,384 words, mostly zero.
const BLOCK: usize = 16;

fn block_is_zero(block: &[u64]) -> bool {
    block.iter().fold(0, |a, w| a | w) == 0
}

/// The first and last index of the words of `bits` that are not zero.
pub fn nonzero_span(bits: &[u64]) -> Option<(usize, usize)> {
    let first_block = bits.chunks(BLOCK).position(|b| !block_is_zero(b))?;
    let first = first_block * BLOCK + bits[first_block * BLOCK..].iter().position(|w| *w != 0)?;
    let tail = bits.len() % BLOCK;
    let last = match bits[bits.len() - tail..].iter().rposition(|w| *w != 0) {
        Some(i) => bits.len() - tail + i,
        None => {
            let whole = &bits[..bits.len() - tail];
            let block = whole.chunks_exact(BLOCK).rposition(|b| !block_is_zero(b))?;
            block * BLOCK
                + whole[block * BLOCK..][..BLOCK]
                    .iter()
                    .rposition(|w| *w != 0)?
        }
    };
    Some((first, last))
}

/// Calls `f` with the index of every page set in `bits`.
pub fn for_each_page(bits: &[u64], mut f: impl FnMut(u64)) {
    let Some((first, last)) = nonzero_span(bits) else {
        return;
    };
    for (i, word) in bits.iter().enumerate().take(last + 1).skip(first) {
        let mut w = *word;
        while w != 0 {
            f(i as u64 * 64 + u64::from(w.trailing_zeros()));
            w &= w - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_listed_in_order() {
        let mut pages = Vec::new();
        for_each_page(&[0b1001, 0, 1 << 63], |p| pages.push(p));
        assert_eq!(pages, vec![0, 3, 191]);
    }

    #[test]
    fn spans_are_found_in_long_bitmaps() {
        for len in [1, 15, 16, 17, 40, 16_384] {
            let mut bits = vec![0u64; len];
            assert_eq!(nonzero_span(&bits), None);
            for (a, b) in [(0, 0), (len - 1, len - 1), (len / 3, len / 2), (0, len - 1)] {
                bits.fill(0);
                bits[a] = 1;
                bits[b] |= 1 << 63;
                assert_eq!(nonzero_span(&bits), Some((a, b)), "len {len}");
                let mut pages = Vec::new();
                for_each_page(&bits, |p| pages.push(p));
                assert_eq!(pages.first(), Some(&(a as u64 * 64)));
                assert_eq!(pages.last(), Some(&(b as u64 * 64 + 63)));
            }
        }
    }
}
