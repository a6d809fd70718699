//! Guest-image loaders: pure functions that turn a kernel file into the pieces of
//! guest memory to fill and the state to start it in.
//!
//! Nothing here touches KVM or guest memory: the caller writes the returned
//! [`Segment`]s and byte ranges into guest RAM itself.
//!
//! - [`elf`]: ELF32/ELF64 x86 executables ([`parse_elf`]).
//! - [`multiboot`]: Multiboot v1 kernels ([`load_kernel`]) and the
//!   `multiboot_info` structure handed to them ([`build_boot_info`]).
//! - [`check_placement`]: whether loaded segments fit in guest RAM.

pub mod elf;
pub mod multiboot;

#[cfg(test)]
mod test_elf;

// The entry points; the result and argument types live in `elf` and `multiboot`.
pub use elf::parse_elf;
pub use multiboot::{build_boot_info, load_kernel, Module};

/// A piece of guest memory to fill: `data` at `gpa`, then zeros up to `mem_size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Bytes to copy to `gpa`; never longer than `mem_size`.
    pub data: Vec<u8>,
    /// Total size in guest memory; bytes past `data.len()` are zero (bss).
    pub mem_size: u64,
}

impl Segment {
    /// One past the last guest-physical byte of the segment (saturating).
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.mem_size)
    }
}

/// Why a guest image cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file does not start with the ELF magic bytes.
    #[error("not an ELF file: the file does not start with the ELF magic bytes 7f 45 4c 46")]
    NotElf,
    /// goblin could not parse the file.
    #[error("truncated or malformed ELF file: {0}")]
    MalformedElf(String),
    /// The ELF file is for another processor.
    #[error(
        "unsupported ELF machine type {0}: only x86 (EM_386 = 3) and x86-64 (EM_X86_64 = 62) \
         executables can be loaded"
    )]
    WrongMachine(u16),
    /// The ELF file is a position-independent executable or shared object.
    #[error(
        "ELF file is position-independent (ET_DYN): position-independent executables are not \
         supported, link the guest with -no-pie"
    )]
    PositionIndependent,
    /// The ELF file is not an executable at all (relocatable object, core dump, ...).
    #[error("ELF file is not an executable (e_type {0}, expected ET_EXEC = 2)")]
    NotExecutable(u16),
    /// The ELF file has nothing to load.
    #[error("ELF file has no PT_LOAD segment with a nonzero memory size: nothing to load")]
    NoLoadSegment,
    /// A PT_LOAD segment's file bytes are not all inside the file.
    #[error(
        "ELF PT_LOAD segment {index}: file range offset {offset:#x} + size {file_size:#x} lies \
         outside the {file_len}-byte file (truncated file?)"
    )]
    SegmentOutsideFile {
        /// Program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        file_size: u64,
        /// Length of the file.
        file_len: usize,
    },
    /// A PT_LOAD segment has more file bytes than memory bytes.
    #[error(
        "ELF PT_LOAD segment {index}: p_filesz {file_size:#x} is larger than p_memsz {mem_size:#x}"
    )]
    FileSizeExceedsMemSize {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// A segment's end address does not fit in 64 bits.
    #[error(
        "ELF PT_LOAD segment {index}: address {gpa:#x} + size {mem_size:#x} overflows the 64-bit \
         address space"
    )]
    AddressOverflow {
        /// Program header index.
        index: usize,
        /// `p_paddr`.
        gpa: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// Two PT_LOAD segments claim the same guest-physical bytes.
    #[error(
        "ELF PT_LOAD segments {first} [{first_start:#x}, {first_end:#x}) and {second} \
         [{second_start:#x}, {second_end:#x}) overlap in guest-physical memory"
    )]
    OverlappingSegments {
        /// Program header index of the lower segment.
        first: usize,
        /// Its start address.
        first_start: u64,
        /// One past its end.
        first_end: u64,
        /// Program header index of the other segment.
        second: usize,
        /// Its start address.
        second_start: u64,
        /// One past its end.
        second_end: u64,
    },
    /// A segment is not entirely inside one guest RAM range.
    #[error(
        "segment {index} at guest-physical [{start:#x}, {end:#x}) does not lie inside guest RAM"
    )]
    SegmentOutsideRam {
        /// Index in the segment list.
        index: usize,
        /// Its start address.
        start: u64,
        /// One past its end.
        end: u64,
    },
    /// The entry point is not inside any loaded segment.
    #[error("entry point {0:#x} does not lie inside any loaded segment")]
    EntryOutsideSegments(u64),
    /// No multiboot header magic in the search window.
    #[error("not a multiboot kernel: no multiboot header in the first 8192 bytes")]
    NoMultibootHeader,
    /// A multiboot header magic was found but its checksum is wrong.
    #[error(
        "bad multiboot header checksum at file offset {offset:#x}: magic {magic:#x} + flags \
         {flags:#x} + checksum {checksum:#x} is not 0 modulo 2^32"
    )]
    BadChecksum {
        /// File offset of the header.
        offset: usize,
        /// The magic value (0x1BADB002).
        magic: u32,
        /// The header's flags.
        flags: u32,
        /// The header's checksum.
        checksum: u32,
    },
    /// The multiboot header requests a video mode (flag bit 2).
    #[error("the multiboot header requests a video mode (flag bit 2), which is not supported")]
    UnsupportedVideoMode,
    /// The multiboot header requires a feature (flag bit 3..=15) we do not know.
    #[error(
        "the multiboot header requires unsupported feature flag bit {0} (flags bits 0..=15 must \
         be understood by the boot loader; only bits 0 and 1 are supported)"
    )]
    UnsupportedFlag(u32),
    /// The multiboot header's address fields (flag bit 16) are inconsistent.
    #[error("bad multiboot header address fields (flag bit 16): {0}")]
    BadAddressFields(String),
    /// The kernel has no usable address fields and is not a loadable ELF file.
    #[error(
        "not a multiboot kernel: the multiboot header has no address fields (flag bit 16) and \
         the file is not a loadable ELF: {0}"
    )]
    NotMultibootElf(Box<LoadError>),
    /// Something a 32-bit multiboot kernel or boot info must address lies above 4 GiB.
    #[error("{what} at [{start:#x}, {end:#x}) does not lie below 4 GiB (32-bit addresses)")]
    Above4GiB {
        /// What it is.
        what: String,
        /// Its start address.
        start: u64,
        /// One past its end (saturating).
        end: u64,
    },
    /// The boot information address is not page aligned.
    #[error("boot information address {0:#x} is not page aligned (4096 bytes)")]
    UnalignedBootInfo(u64),
    /// A command line contains a NUL byte and cannot be a C string.
    #[error("{0} contains a NUL byte")]
    NulInCmdline(String),
}

/// Fails unless every segment lies inside one of `ram` (list of [start, end) guest RAM
/// ranges) and `entry` lies inside some segment; the message names the segment/entry and
/// the address.
///
/// A segment must fit inside a single range, even if two ranges are adjacent.
pub fn check_placement(
    segments: &[Segment],
    entry: u64,
    ram: &[(u64, u64)],
) -> Result<(), LoadError> {
    for (index, seg) in segments.iter().enumerate() {
        let end = seg.gpa.checked_add(seg.mem_size);
        let inside = end.is_some_and(|end| {
            ram.iter()
                .any(|&(start, stop)| start <= seg.gpa && end <= stop)
        });
        if !inside {
            return Err(LoadError::SegmentOutsideRam {
                index,
                start: seg.gpa,
                end: seg.end(),
            });
        }
    }
    if !segments
        .iter()
        .any(|seg| seg.gpa <= entry && entry < seg.end())
    {
        return Err(LoadError::EntryOutsideSegments(entry));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(gpa: u64, mem_size: u64) -> Segment {
        Segment {
            gpa,
            data: vec![],
            mem_size,
        }
    }

    const RAM: &[(u64, u64)] = &[(0, 0xa0000), (0x100000, 0x800000)];

    #[test]
    fn placement_ok() {
        let segs = [
            seg(0x100000, 0x1000),
            seg(0x200000, 0x600000),
            seg(0x1000, 0x10),
        ];
        check_placement(&segs, 0x100000, RAM).unwrap();
        check_placement(&segs, 0x7fffff, RAM).unwrap();
        check_placement(&segs, 0x100f, RAM).unwrap();
    }

    #[test]
    fn placement_segment_outside_ram() {
        // Straddles the end of low RAM.
        let segs = [seg(0x100000, 0x10), seg(0x9f000, 0x2000)];
        let err = check_placement(&segs, 0x100000, RAM).unwrap_err();
        assert!(matches!(
            err,
            LoadError::SegmentOutsideRam {
                index: 1,
                start: 0x9f000,
                end: 0xa1000
            }
        ));
        assert_eq!(
            err.to_string(),
            "segment 1 at guest-physical [0x9f000, 0xa1000) does not lie inside guest RAM"
        );
        // Past the end of RAM.
        let err = check_placement(&[seg(0x7ff000, 0x1001)], 0x7ff000, RAM).unwrap_err();
        assert!(matches!(err, LoadError::SegmentOutsideRam { index: 0, .. }));
        // In the hole.
        let err = check_placement(&[seg(0xb0000, 1)], 0xb0000, RAM).unwrap_err();
        assert!(matches!(err, LoadError::SegmentOutsideRam { index: 0, .. }));
        // Overflowing end.
        let err = check_placement(&[seg(u64::MAX, 2)], 0, &[(0, u64::MAX)]).unwrap_err();
        assert!(matches!(err, LoadError::SegmentOutsideRam { index: 0, .. }));
        // Across two adjacent ranges: must fit inside one.
        let err = check_placement(
            &[seg(0xf00, 0x200)],
            0xf00,
            &[(0, 0x1000), (0x1000, 0x2000)],
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::SegmentOutsideRam { index: 0, .. }));
    }

    #[test]
    fn placement_entry_outside_segments() {
        let segs = [seg(0x100000, 0x1000)];
        let err = check_placement(&segs, 0x101000, RAM).unwrap_err();
        assert!(matches!(err, LoadError::EntryOutsideSegments(0x101000)));
        assert_eq!(
            err.to_string(),
            "entry point 0x101000 does not lie inside any loaded segment"
        );
        let err = check_placement(&[], 0, RAM).unwrap_err();
        assert!(matches!(err, LoadError::EntryOutsideSegments(0)));
    }
}
