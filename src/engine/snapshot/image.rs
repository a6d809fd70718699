//! The clean copy of a memory region a snapshot keeps: a memfd holding only the pages
//! that are not all zero (the others stay holes), mapped shared, and which pages those
//! are. Other VMs map the same memfd privately: copy-on-write views of the clean image.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};
use zerocopy::IntoBytes;

use crate::engine::error::{Error, Result};
use crate::engine::memory::{Region, PAGE_SIZE};
use crate::engine::snapshot::dirty::for_each_page;

const PAGE: usize = PAGE_SIZE as usize;

/// One region's memory as a snapshot saw it.
pub struct RegionImage {
    pub guest_addr: u64,
    pub size: u64,
    pub readonly: bool,
    data: MmapRegion,
    /// One bit per page: set for the pages that are not all zero.
    present: Vec<u64>,
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u8 has no invalid bit patterns for u64 to see; align_to only splits the
        // slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// A memfd of `size` bytes (all holes), mapped shared.
fn map(size: u64) -> Result<MmapRegion> {
    let len = usize::try_from(size)
        .map_err(|_| Error::Memory(format!("memory image of {size:#x} bytes is too large")))?;
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"kvmpy-snapshot".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::ioctl(
            "memfd_create",
            vmm_sys_util::errno::Error::last(),
        ));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns; the File closes it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Io(format!("cannot size a {size:#x}-byte snapshot memfd"), e))?;
    MmapRegion::from_file(FileOffset::new(file, 0), len)
        .map_err(|e| Error::Memory(format!("cannot map {size:#x} bytes for a snapshot: {e}")))
}

/// `/proc/self/pagemap`: a page is present in memory (bit 63) or swapped out (bit 62).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per `pread` (512 KiB).
const PAGEMAP_CHUNK: usize = 1 << 16;

/// The pages of the anonymous mapping of `pages` pages at `addr` that the process ever
/// touched (present or swapped out, from `/proc/self/pagemap`), one bit per page; the
/// others were never written and read as zero. `None` where pagemap cannot be read.
fn touched_pages(addr: usize, pages: u64) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let file = File::open("/proc/self/pagemap").ok()?;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let mut entries = vec![0u64; PAGEMAP_CHUNK.min(pages as usize)];
    let first = (addr / PAGE) as u64;
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(entries.len() as u64) as usize;
        let buf = entries[..n].as_mut_bytes();
        file.read_exact_at(buf, (first + done) * 8).ok()?;
        for (i, e) in entries[..n].iter().enumerate() {
            if e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                let page = done + i as u64;
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        done += n as u64;
    }
    Some(bits)
}

/// Sets in `bits` the pages of `file` from byte `start` on (`pages` of them) that hold
/// data (`lseek` SEEK_DATA/SEEK_HOLE; the holes of a snapshot's memfd read as zero).
/// `None` where the file cannot say.
fn add_data_pages(file: &File, start: u64, pages: u64, bits: &mut [u64]) -> Option<()> {
    use std::os::fd::AsRawFd;
    let end = start.checked_add(pages * PAGE as u64)?;
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an fd the File owns; the results are checked.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from `at` to the end of the file.
            return (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
                .then_some(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (data, hole) = (data as u64, (hole as u64).min(end));
        if data >= end {
            break;
        }
        for page in (data - start) / PAGE as u64..(hole - start).div_ceil(PAGE as u64) {
            bits[(page / 64) as usize] |= 1 << (page % 64);
        }
        at = hole;
    }
    Some(())
}

impl RegionImage {
    /// An empty (all-zero) image of `size` bytes.
    pub fn empty(guest_addr: u64, size: u64, readonly: bool) -> Result<Self> {
        Ok(RegionImage {
            guest_addr,
            size,
            readonly,
            data: map(size)?,
            present: vec![0; (size / PAGE_SIZE).div_ceil(64) as usize],
        })
    }

    /// Copies a region's pages that are not all zero. Of an anonymous region only the
    /// pages the process ever touched are looked at (see `touched_pages`): the others
    /// read as zero.
    pub fn capture(region: &Region) -> Result<Self> {
        let mut image = Self::empty(region.guest_addr, region.size, region.readonly)?;
        let src = region.mem.as_ptr();
        let touched = match region.backing {
            None => touched_pages(src as usize, region.pages()),
            // A view of a snapshot's memfd reads the file where it was not touched: its
            // data pages count too.
            Some(_) => region.mem.file_offset().and_then(|f| {
                let mut bits = touched_pages(src as usize, region.pages())?;
                add_data_pages(f.file(), f.start(), region.pages(), &mut bits)?;
                Some(bits)
            }),
        };
        let check = |page: u64| {
            let at = page as usize * PAGE;
            // SAFETY: `at + PAGE <= size`: the page lies inside the region's live mapping,
            // which `region` keeps mapped; no vCPU runs while a snapshot is taken.
            let bytes = unsafe { std::slice::from_raw_parts(src.add(at), PAGE) };
            if !is_zero(bytes) {
                image.page_mut(page).copy_from_slice(bytes);
                image.present[(page / 64) as usize] |= 1 << (page % 64);
            }
        };
        match touched {
            Some(bits) => for_each_page(&bits, check),
            None => (0..region.pages()).for_each(check),
        }
        Ok(image)
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The pages that are not all zero, one bit per page.
    pub fn present(&self) -> &[u64] {
        &self.present
    }

    /// A private (copy-on-write) mapping of the image, for a VM's guest memory: it reads
    /// as the image and pays only for the pages it writes.
    pub fn private_view(&self) -> Result<MmapRegion> {
        let file: &Arc<File> = self
            .data
            .file_offset()
            .map(|f| f.arc())
            .ok_or_else(|| Error::Memory("snapshot memory has no file".into()))?;
        MmapRegion::build(
            Some(FileOffset::from_arc(Arc::clone(file), 0)),
            self.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("cannot map a view of snapshot memory: {e}")))
    }

    /// One page of the image.
    pub fn page(&self, page: u64) -> &[u8] {
        assert!(page < self.pages(), "page {page} outside the image");
        // SAFETY: the page lies inside `data`'s mapping (checked), which lives as long as
        // `self`; the image is only written through `page_mut`, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().add(page as usize * PAGE), PAGE) }
    }

    /// One page of the image, to fill.
    pub fn page_mut(&mut self, page: u64) -> &mut [u8] {
        assert!(page < self.pages(), "page {page} outside the image");
        let at = page as usize * PAGE;
        // SAFETY: as in `page`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr().add(at), PAGE) }
    }

    /// Sets the byte at `offset` (inside the image), marking its page present.
    pub fn set_byte(&mut self, offset: u64, byte: u8) {
        let page = offset / PAGE_SIZE;
        self.page_mut(page)[(offset % PAGE_SIZE) as usize] = byte;
        self.set_present(page);
    }

    /// Marks a page as holding data (a snapshot file filled it).
    pub fn set_present(&mut self, page: u64) {
        self.present[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Copies the pages set in `bits` back into `region` (same size).
    pub fn restore_pages(&self, region: &Region, bits: &[u64]) {
        for_each_page(bits, |page| self.restore_page(region, page));
    }

    /// Copies one page back into `region` (same size); a page outside it is ignored.
    pub fn restore_page(&self, region: &Region, page: u64) {
        if page < self.pages() {
            // SAFETY: the page lies inside the region's live mapping (same size as the
            // image, checked by the caller), and no vCPU runs during a restore.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.page(page).as_ptr(),
                    region.mem.as_ptr().add(page as usize * PAGE),
                    PAGE,
                )
            };
        }
    }

    /// Makes `region` (same size) equal to the image: its memory is dropped, and the pages
    /// that are not all zero are copied in; a region that is a view of this image reads as
    /// the image again once its own pages are dropped.
    pub fn restore_all(&self, region: &Region, view_of_this: bool) -> Result<()> {
        if region.backing.is_some() && !view_of_this {
            // A view of another image: dropping pages would bring that image back.
            let all = vec![u64::MAX; self.present.len()];
            self.restore_pages(region, &all);
            return Ok(());
        }
        // SAFETY: the range is exactly the region's private mapping (anonymous, or of a
        // snapshot memfd); dropping its pages makes them read as zero or as the file
        // again, and KVM follows through its MMU notifier.
        let ret = unsafe {
            libc::madvise(
                region.mem.as_ptr().cast(),
                region.size as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(Error::ioctl(
                "madvise(MADV_DONTNEED)",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        if !view_of_this {
            self.restore_pages(region, &self.present);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_found() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        page[PAGE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE - 1] = 0;
        page[3] = 7;
        assert!(!is_zero(&page[1..]));
    }

    #[test]
    fn touched_pages_of_an_anonymous_mapping_are_found() {
        let pages = 200u64;
        let map = MmapRegion::<()>::new(pages as usize * PAGE).unwrap();
        let base = map.as_ptr();
        let bits = touched_pages(base as usize, pages).unwrap();
        assert!(bits.iter().all(|w| *w == 0), "nothing touched yet");
        for page in [0u64, 3, 64, 199] {
            // SAFETY: inside the mapping, which lives until the end of the test.
            unsafe { base.add(page as usize * PAGE + 5).write(1) };
        }
        let bits = touched_pages(base as usize, pages).unwrap();
        let mut found = Vec::new();
        for_each_page(&bits, |p| found.push(p));
        assert_eq!(found, vec![0, 3, 64, 199]);
    }

    #[test]
    fn data_pages_of_a_sparse_memfd_are_found() {
        let mut image = RegionImage::empty(0, 300 * PAGE_SIZE, false).unwrap();
        for page in [1u64, 2, 130, 299] {
            image.page_mut(page)[9] = 1;
        }
        let file = image.data.file_offset().unwrap().file();
        let mut bits = vec![0u64; 5];
        add_data_pages(file, 0, 300, &mut bits).unwrap();
        let mut found = Vec::new();
        for_each_page(&bits, |p| found.push(p));
        assert_eq!(found, vec![1, 2, 130, 299]);
        // From an offset: page 0 of the range is the file's page 130.
        let mut bits = vec![0u64; 3];
        add_data_pages(file, 130 * PAGE_SIZE, 100, &mut bits).unwrap();
        assert_eq!(bits, vec![1, 0, 0]);
    }

    #[test]
    fn pages_are_written_and_marked() {
        let mut image = RegionImage::empty(0, 4 * PAGE_SIZE, false).unwrap();
        assert!(image.page(3).iter().all(|b| *b == 0));
        image.page_mut(2)[5] = 9;
        image.set_present(2);
        assert_eq!(image.page(2)[5], 9);
        assert_eq!(image.present(), &[0b100]);
    }
}
