//! Multiboot v1 (specification 0.6.96): finding the kernel's header, loading the
//! kernel, and building the `multiboot_info` structure handed to it.
//!
//! The boot loader starts the kernel at [`MultibootKernel::entry`] in 32-bit protected
//! mode with flat 4 GiB code and data segments, paging off, A20 on and IF=0, with
//! [`BOOTLOADER_MAGIC`] in EAX and [`BootInfo::info_addr`] in EBX.

use super::elf::parse_elf;
use super::{LoadError, Segment};

/// The magic number at the start of the kernel's multiboot header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The value the boot loader passes in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie within this many bytes from the start of the file.
pub const SEARCH_LIMIT: usize = 8192;

/// Header flag: align boot modules on 4 KiB pages (always done here).
pub const HEADER_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants memory information (always provided here).
pub const HEADER_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel wants a video mode (not supported).
pub const HEADER_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields of the header are valid ("a.out kludge").
pub const HEADER_AOUT_KLUDGE: u32 = 1 << 16;

/// `multiboot_info.flags`: `mem_lower` and `mem_upper` are valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// `multiboot_info.flags`: `cmdline` is valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// `multiboot_info.flags`: `mods_count` and `mods_addr` are valid.
pub const INFO_MODS: u32 = 1 << 3;
/// `multiboot_info.flags`: `mmap_length` and `mmap_addr` are valid.
pub const INFO_MEM_MAP: u32 = 1 << 6;
/// `multiboot_info.flags`: `boot_loader_name` is valid.
pub const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Size of `struct multiboot_info`.
pub const INFO_SIZE: usize = 88;
/// Size of `struct multiboot_mod_list`.
pub const MOD_ENTRY_SIZE: usize = 16;
/// Size of `struct multiboot_mmap_entry`, including its `size` field.
pub const MMAP_ENTRY_SIZE: usize = 24;
/// `multiboot_mmap_entry.type` of available RAM.
pub const MEMORY_AVAILABLE: u32 = 1;
/// The boot loader name written to `boot_loader_name`.
pub const BOOT_LOADER_NAME: &str = "kvmpy";

const PAGE_SIZE: u64 = 4096;
const FOUR_GIB: u64 = 1 << 32;

/// The fields of a kernel's multiboot header after magic, flags and checksum. The
/// address fields are zero when the file ends before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// Features the kernel requires (bits 0..=15) or offers (bits 16..=31).
    pub flags: u32,
    /// Physical address of the header itself (valid with flag bit 16).
    pub header_addr: u32,
    /// Physical address of the start of the text segment (valid with flag bit 16).
    pub load_addr: u32,
    /// One past the end of the data segment; 0 means the end of the file.
    pub load_end_addr: u32,
    /// One past the end of the bss segment; 0 means no bss.
    pub bss_end_addr: u32,
    /// Physical address to jump to (valid with flag bit 16).
    pub entry_addr: u32,
}

/// A kernel ready to be copied into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultibootKernel {
    /// What to write into guest memory.
    pub segments: Vec<Segment>,
    /// Physical address to start at (EIP), below 4 GiB.
    pub entry: u64,
}

/// A boot module: its contents and its command line.
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    /// The module's contents.
    pub data: &'a [u8],
    /// The module's command line (no NUL bytes).
    pub cmdline: &'a str,
}

/// The multiboot information to write into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// (guest-physical address, bytes) to write.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Address of `struct multiboot_info`: the value for EBX.
    pub info_addr: u64,
    /// One past the last byte used.
    pub end: u64,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Finds the multiboot header: magic 0x1BADB002 at a 4-byte aligned offset with the
/// whole magic/flags/checksum triple in the first 8192 bytes.
///
/// Returns `None` when there is no magic; the first header whose checksum is right
/// otherwise. Fails when magic is found but no checksum is right, or when a header
/// with flag bit 16 (address fields valid) is cut off by the end of the file.
pub fn find_header(bytes: &[u8]) -> Result<Option<(usize, MultibootHeader)>, LoadError> {
    let window = &bytes[..bytes.len().min(SEARCH_LIMIT)];
    let mut bad = None;
    for offset in (0..window.len().saturating_sub(11)).step_by(4) {
        let word = |i: usize| read_u32(window, offset + 4 * i).unwrap_or(0);
        if word(0) != HEADER_MAGIC {
            continue;
        }
        let (flags, checksum) = (word(1), word(2));
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad.get_or_insert(LoadError::BadChecksum {
                offset,
                magic: HEADER_MAGIC,
                flags,
                checksum,
            });
            continue;
        }
        let field = |i: usize| read_u32(bytes, offset + 4 * i);
        if flags & HEADER_AOUT_KLUDGE != 0 && field(7).is_none() {
            return Err(LoadError::BadAddressFields(format!(
                "the header at file offset {offset:#x} sets flag bit 16 but the file ends \
                 before its address fields"
            )));
        }
        let header = MultibootHeader {
            flags,
            header_addr: field(3).unwrap_or(0),
            load_addr: field(4).unwrap_or(0),
            load_end_addr: field(5).unwrap_or(0),
            bss_end_addr: field(6).unwrap_or(0),
            entry_addr: field(7).unwrap_or(0),
        };
        return Ok(Some((offset, header)));
    }
    match bad {
        Some(err) => Err(err),
        None => Ok(None),
    }
}

/// Refuses required features (flag bits 0..=15) other than page-aligned modules (bit 0)
/// and memory information (bit 1).
fn check_required_flags(flags: u32) -> Result<(), LoadError> {
    let unsupported = flags & 0xffff & !(HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO);
    if unsupported & HEADER_VIDEO_MODE != 0 {
        return Err(LoadError::UnsupportedVideoMode);
    }
    if unsupported != 0 {
        return Err(LoadError::UnsupportedFlag(unsupported.trailing_zeros()));
    }
    Ok(())
}

fn below_4gib(
    what: impl FnOnce() -> String,
    start: u64,
    end: Option<u64>,
) -> Result<(), LoadError> {
    match end {
        Some(end) if end <= FOUR_GIB => Ok(()),
        _ => Err(LoadError::Above4GiB {
            what: what(),
            start,
            end: end.unwrap_or(u64::MAX),
        }),
    }
}

/// Loads the segments described by the header's address fields (flag bit 16).
fn load_aout(
    bytes: &[u8],
    offset: usize,
    h: &MultibootHeader,
) -> Result<MultibootKernel, LoadError> {
    let bad = |msg: String| Err(LoadError::BadAddressFields(msg));
    if h.load_addr > h.header_addr {
        return bad(format!(
            "load_addr {:#x} is above header_addr {:#x}",
            h.load_addr, h.header_addr
        ));
    }
    let before = u64::from(h.header_addr - h.load_addr);
    let Some(start) = (offset as u64).checked_sub(before) else {
        return bad(format!(
            "header_addr - load_addr = {before:#x} is larger than the header's file offset \
             {offset:#x}, so the image would start before the file"
        ));
    };
    let file_len = bytes.len() as u64;
    let load_size = if h.load_end_addr == 0 {
        file_len - start
    } else if h.load_end_addr < h.load_addr {
        return bad(format!(
            "load_end_addr {:#x} is below load_addr {:#x}",
            h.load_end_addr, h.load_addr
        ));
    } else {
        u64::from(h.load_end_addr - h.load_addr)
    };
    let file_end = start + load_size;
    if file_end > file_len {
        return bad(format!(
            "the image [{:#x}, {:#x}) needs file bytes [{start:#x}, {file_end:#x}), past the \
             end of the {file_len}-byte file",
            h.load_addr,
            u64::from(h.load_addr) + load_size
        ));
    }
    let load_addr = u64::from(h.load_addr);
    let load_end = load_addr + load_size;
    let mem_end = if h.bss_end_addr == 0 {
        load_end
    } else if u64::from(h.bss_end_addr) < load_end {
        return bad(format!(
            "bss_end_addr {:#x} is below the end of the loaded image {load_end:#x}",
            h.bss_end_addr
        ));
    } else {
        u64::from(h.bss_end_addr)
    };
    below_4gib(|| "the kernel image".into(), load_addr, Some(mem_end))?;
    // start..file_end lies inside the file (checked above), so these fit in usize.
    let data = bytes[start as usize..file_end as usize].to_vec();
    Ok(MultibootKernel {
        segments: vec![Segment {
            gpa: load_addr,
            data,
            mem_size: mem_end - load_addr,
        }],
        entry: u64::from(h.entry_addr),
    })
}

/// Loads a multiboot kernel.
///
/// With flag bit 16 ("a.out kludge") the header's address fields say what to load;
/// otherwise the file must be an ELF executable (ELF32, or ELF64 whose segments and
/// entry lie below 4 GiB), loaded at its segments' physical addresses. Fails when
/// there is no header in the first 8192 bytes, the checksum is wrong, the header
/// requires a feature other than page-aligned modules and memory information, or the
/// image is inconsistent.
pub fn load_kernel(bytes: &[u8]) -> Result<MultibootKernel, LoadError> {
    let (offset, header) = find_header(bytes)?.ok_or(LoadError::NoMultibootHeader)?;
    check_required_flags(header.flags)?;
    if header.flags & HEADER_AOUT_KLUDGE != 0 {
        return load_aout(bytes, offset, &header);
    }
    let image = parse_elf(bytes).map_err(|e| LoadError::NotMultibootElf(Box::new(e)))?;
    for (index, seg) in image.segments.iter().enumerate() {
        below_4gib(
            || format!("ELF segment {index}"),
            seg.gpa,
            seg.gpa.checked_add(seg.mem_size),
        )?;
    }
    below_4gib(
        || "the ELF entry point".into(),
        image.entry,
        image.entry.checked_add(1),
    )?;
    Ok(MultibootKernel {
        segments: image.segments,
        entry: image.entry,
    })
}

fn align_up(value: u64, to: u64) -> Option<u64> {
    Some(value.checked_add(to - 1)? & !(to - 1))
}

fn pad_to(buf: &mut Vec<u8>, to: usize) {
    buf.resize(buf.len().next_multiple_of(to), 0);
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Bytes of RAM contiguous from `from` upward (0 when `from` is not RAM).
fn contiguous_from(ram: &[(u64, u64)], from: u64) -> u64 {
    let mut end = from;
    while let Some(&(_, stop)) = ram
        .iter()
        .find(|&&(start, stop)| start <= end && end < stop)
    {
        end = stop;
    }
    end - from
}

fn c_string(s: &str, what: impl FnOnce() -> String) -> Result<&[u8], LoadError> {
    if s.as_bytes().contains(&0) {
        return Err(LoadError::NulInCmdline(what()));
    }
    Ok(s.as_bytes())
}

/// Builds the multiboot_info structure and everything it points to, placed from `at`
/// (page aligned) upward: the info struct, the boot-loader name "kvmpy", the command line,
/// the module list (struct multiboot_mod_list entries) with their command lines, the
/// memory map (struct multiboot_mmap_entry, size field = 20, type 1 = available RAM) built
/// from `ram` ranges, and the module contents, each module page aligned. Flags set:
/// MEMORY (mem_lower = KiB of RAM below 640 KiB starting at 0, mem_upper = KiB of RAM
/// starting at 1 MiB contiguous), CMDLINE, MODS (even if zero modules), MMAP,
/// BOOT_LOADER_NAME. `end` is one past the last byte used.
///
/// The memory map lists the nonempty `ram` ranges sorted by address; `mod_end` is one
/// past the module's last byte. Fails when `at` is not page aligned, a command line
/// contains a NUL byte, or anything would lie at or above 4 GiB.
pub fn build_boot_info(
    at: u64,
    cmdline: &str,
    modules: &[Module],
    ram: &[(u64, u64)],
) -> Result<BootInfo, LoadError> {
    if at & (PAGE_SIZE - 1) != 0 {
        return Err(LoadError::UnalignedBootInfo(at));
    }
    let cmdline = c_string(cmdline, || "the kernel command line".into())?;
    let mod_cmdlines = modules
        .iter()
        .enumerate()
        .map(|(i, m)| c_string(m.cmdline, || format!("the command line of module {i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ranges: Vec<(u64, u64)> = ram.iter().copied().filter(|(s, e)| s < e).collect();
    ranges.sort_unstable();

    // Lay out the metadata block; pointers are offsets from `at` until the end.
    let mut blob = vec![0u8; INFO_SIZE];
    let name_off = blob.len();
    blob.extend_from_slice(BOOT_LOADER_NAME.as_bytes());
    blob.push(0);
    let cmdline_off = blob.len();
    blob.extend_from_slice(cmdline);
    blob.push(0);
    pad_to(&mut blob, 4);
    let mods_off = blob.len();
    blob.resize(mods_off + MOD_ENTRY_SIZE * modules.len(), 0);
    let mut mod_cmdline_offs = Vec::with_capacity(modules.len());
    for line in &mod_cmdlines {
        mod_cmdline_offs.push(blob.len());
        blob.extend_from_slice(line);
        blob.push(0);
    }
    pad_to(&mut blob, 8);
    let mmap_off = blob.len();
    for &(start, end) in &ranges {
        blob.extend_from_slice(&((MMAP_ENTRY_SIZE - 4) as u32).to_le_bytes());
        blob.extend_from_slice(&start.to_le_bytes());
        blob.extend_from_slice(&(end - start).to_le_bytes());
        blob.extend_from_slice(&MEMORY_AVAILABLE.to_le_bytes());
    }
    let mmap_len = blob.len() - mmap_off;

    let blob_end = at.checked_add(blob.len() as u64);
    below_4gib(|| "the multiboot information".into(), at, blob_end)?;
    let blob_end = blob_end.unwrap_or(u64::MAX);
    // Everything in the blob is below 4 GiB from here on.
    let addr = |off: usize| (at + off as u64) as u32;

    // Place the modules after the metadata, each on its own page.
    let mut end = blob_end;
    let mut cursor = blob_end;
    let mut writes = Vec::with_capacity(1 + modules.len());
    for (i, module) in modules.iter().enumerate() {
        let start = align_up(cursor, PAGE_SIZE);
        let mod_end = start.and_then(|s| s.checked_add(module.data.len() as u64));
        let start = start.unwrap_or(u64::MAX);
        // mod_end is stored as a 32-bit value, so it must stay below 4 GiB itself.
        below_4gib(
            || format!("module {i}"),
            start,
            mod_end.filter(|&end| end < FOUR_GIB),
        )?;
        let mod_end = mod_end.unwrap_or(u64::MAX);
        let entry = mods_off + MOD_ENTRY_SIZE * i;
        put_u32(&mut blob, entry, start as u32);
        put_u32(&mut blob, entry + 4, mod_end as u32);
        put_u32(&mut blob, entry + 8, addr(mod_cmdline_offs[i]));
        if !module.data.is_empty() {
            writes.push((start, module.data.to_vec()));
        }
        cursor = mod_end;
        end = end.max(mod_end);
    }

    let mem_lower = contiguous_from(&ranges, 0).min(640 * 1024) / 1024;
    let mem_upper = contiguous_from(&ranges, 1 << 20) / 1024;
    let fields: [(usize, u32); 10] = [
        (
            0,
            INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME,
        ),
        (4, mem_lower as u32),
        (8, u32::try_from(mem_upper).unwrap_or(u32::MAX)),
        (16, addr(cmdline_off)),
        (20, modules.len() as u32),
        (24, addr(mods_off)),
        (44, mmap_len as u32),
        (48, addr(mmap_off)),
        (64, addr(name_off)),
        (12, 0), // boot_device: not provided
    ];
    for (offset, value) in fields {
        put_u32(&mut blob, offset, value);
    }
    writes.insert(0, (at, blob));
    Ok(BootInfo {
        writes,
        info_addr: at,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_elf::{ElfBuilder, Load};
    use super::*;

    /// A header with the given flags (and address fields) at `offset` in a zeroed file.
    fn with_header(len: usize, offset: usize, flags: u32, addrs: [u32; 5]) -> Vec<u8> {
        let mut file = vec![0u8; len];
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        for (i, v) in [HEADER_MAGIC, flags, checksum]
            .into_iter()
            .chain(addrs)
            .enumerate()
        {
            let at = offset + 4 * i;
            if at + 4 <= len {
                put_u32(&mut file, at, v);
            }
        }
        file
    }

    #[test]
    fn header_found() {
        let file = with_header(0x1000, 0x40, 0x10003, [1, 2, 3, 4, 5]);
        let (off, h) = find_header(&file).unwrap().unwrap();
        assert_eq!(off, 0x40);
        assert_eq!(
            h,
            MultibootHeader {
                flags: 0x10003,
                header_addr: 1,
                load_addr: 2,
                load_end_addr: 3,
                bss_end_addr: 4,
                entry_addr: 5,
            }
        );
        // Last possible place: the triple ends at byte 8192.
        let file = with_header(0x3000, 8192 - 12, 0, [0; 5]);
        assert_eq!(find_header(&file).unwrap().unwrap().0, 8192 - 12);
        // A file that ends right after the triple, without address fields.
        let file = with_header(12, 0, 3, [0; 5]);
        let (_, h) = find_header(&file).unwrap().unwrap();
        assert_eq!((h.flags, h.load_addr, h.entry_addr), (3, 0, 0));
    }

    #[test]
    fn header_not_found() {
        assert_eq!(find_header(&[]).unwrap(), None);
        assert_eq!(find_header(&[0u8; 100_000]).unwrap(), None);
        // Past the search window.
        let file = with_header(0x3000, 8192 - 8, 0, [0; 5]);
        assert_eq!(find_header(&file).unwrap(), None);
        let file = with_header(0x3000, 8192, 0, [0; 5]);
        assert_eq!(find_header(&file).unwrap(), None);
        // Not 4-byte aligned.
        let file = with_header(0x1000, 0x42, 0, [0; 5]);
        assert_eq!(find_header(&file).unwrap(), None);
        let err = load_kernel(&[0u8; 0x1000]).unwrap_err();
        assert!(matches!(err, LoadError::NoMultibootHeader));
        assert_eq!(
            err.to_string(),
            "not a multiboot kernel: no multiboot header in the first 8192 bytes"
        );
    }

    #[test]
    fn header_bad_checksum() {
        let mut file = with_header(0x1000, 0x20, 3, [0; 5]);
        file[0x28] ^= 1;
        let err = find_header(&file).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::BadChecksum {
                    offset: 0x20,
                    flags: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(matches!(
            load_kernel(&file).unwrap_err(),
            LoadError::BadChecksum { .. }
        ));
        // A stray magic before a good header is skipped.
        let mut file = with_header(0x1000, 0x40, 3, [0; 5]);
        put_u32(&mut file, 0x10, HEADER_MAGIC);
        assert_eq!(find_header(&file).unwrap().unwrap().0, 0x40);
    }

    #[test]
    fn header_address_fields_cut_off() {
        let file = with_header(0x20, 0x4, HEADER_AOUT_KLUDGE, [0; 5]);
        let err = find_header(&file).unwrap_err();
        assert!(matches!(err, LoadError::BadAddressFields(_)), "{err}");
    }

    /// A kernel whose header at file offset 8 says: load the file at 0x100000.
    fn aout(len: usize, load_end: u32, bss_end: u32) -> Vec<u8> {
        let mut file = with_header(
            len,
            8,
            HEADER_AOUT_KLUDGE | HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO,
            [0x100008, 0x100000, load_end, bss_end, 0x100020],
        );
        for (i, b) in file.iter_mut().enumerate().skip(0x28) {
            *b = i as u8;
        }
        file
    }

    #[test]
    fn aout_kludge() {
        let file = aout(0x100, 0x100080, 0x102000);
        let k = load_kernel(&file).unwrap();
        assert_eq!(k.entry, 0x100020);
        assert_eq!(
            k.segments,
            vec![Segment {
                gpa: 0x100000,
                data: file[..0x80].to_vec(),
                mem_size: 0x2000,
            }]
        );
        // load_end_addr 0 = whole file, bss_end_addr 0 = no bss.
        let file = aout(0x100, 0, 0);
        let k = load_kernel(&file).unwrap();
        assert_eq!(k.segments[0].data, file);
        assert_eq!(k.segments[0].mem_size, 0x100);
    }

    #[test]
    fn aout_kludge_header_not_at_image_start() {
        // Image starts 4 bytes before the header (file offset 4).
        let file = with_header(
            0x40,
            8,
            HEADER_AOUT_KLUDGE,
            [0x200004, 0x200000, 0x200010, 0, 0x200000],
        );
        let k = load_kernel(&file).unwrap();
        assert_eq!(k.segments[0].gpa, 0x200000);
        assert_eq!(k.segments[0].data, file[4..0x14].to_vec());
        assert_eq!(k.segments[0].mem_size, 0x10);
    }

    #[test]
    fn aout_kludge_errors() {
        let cases = [
            // load_addr above header_addr
            [0x100000, 0x100010, 0, 0, 0x100000],
            // image would start before the file
            [0x100010, 0x100000, 0, 0, 0x100000],
            // load_end_addr below load_addr
            [0x100008, 0x100000, 0xfff00, 0, 0x100000],
            // past the end of the file
            [0x100008, 0x100000, 0x100101, 0, 0x100000],
            // bss_end_addr below load_end_addr
            [0x100008, 0x100000, 0x100080, 0x100040, 0x100000],
            // bss_end_addr below the end of the file (load_end_addr 0)
            [0x100008, 0x100000, 0, 0x1000ff, 0x100000],
        ];
        for addrs in cases {
            let file = with_header(0x100, 8, HEADER_AOUT_KLUDGE, addrs);
            let err = load_kernel(&file).unwrap_err();
            assert!(
                matches!(err, LoadError::BadAddressFields(_)),
                "{addrs:x?}: {err}"
            );
        }
        // Image reaching past 4 GiB.
        let file = with_header(
            0x101,
            8,
            HEADER_AOUT_KLUDGE,
            [0xffff_ff08, 0xffff_ff00, 0, 0, 0xffff_ff00],
        );
        let err = load_kernel(&file).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
    }

    #[test]
    fn unsupported_flags() {
        let err = load_kernel(&aout_flags(HEADER_VIDEO_MODE)).unwrap_err();
        assert!(matches!(err, LoadError::UnsupportedVideoMode));
        assert_eq!(
            err.to_string(),
            "the multiboot header requests a video mode (flag bit 2), which is not supported"
        );
        for bit in 3..=15 {
            let err = load_kernel(&aout_flags(1 << bit)).unwrap_err();
            assert!(
                matches!(err, LoadError::UnsupportedFlag(b) if b == bit),
                "{err}"
            );
            assert!(err.to_string().contains(&format!("bit {bit} ")), "{err}");
        }
        // Bits 0, 1 and optional bits 17..=31 are fine.
        load_kernel(&aout_flags(0xfffe_0003)).unwrap();
    }

    fn aout_flags(extra: u32) -> Vec<u8> {
        with_header(
            0x100,
            8,
            HEADER_AOUT_KLUDGE | extra,
            [0x100008, 0x100000, 0, 0, 0x100000],
        )
    }

    /// An ELF kernel with a multiboot header (flags 3) at the start of its text.
    fn elf_kernel(class64: bool, text_at: u64) -> ElfBuilder {
        let mut text = with_header(0x20, 0, 3, [0; 5]);
        text.truncate(12);
        text.extend_from_slice(&[0xfa, 0xf4]); // cli; hlt
        let mut b = ElfBuilder::new(class64);
        b.entry = text_at + 12;
        b.loads = vec![
            Load::new(text_at, text, 14),
            Load::new(text_at + 0x1000, vec![1, 2], 0x800),
        ];
        b.syms = vec![("_start", text_at + 12, 2, 2)];
        b
    }

    #[test]
    fn elf_kernel_32_and_64() {
        for class64 in [false, true] {
            let file = elf_kernel(class64, 0x100000).build();
            let k = load_kernel(&file).unwrap();
            let img = parse_elf(&file).unwrap();
            assert_eq!(k.entry, 0x10000c);
            assert_eq!(k.segments, img.segments);
            assert_eq!(k.segments[0].gpa, 0x100000);
            assert_eq!(k.segments[0].data[12..], [0xfa, 0xf4]);
            assert_eq!(k.segments[1].mem_size, 0x800);
        }
    }

    #[test]
    fn elf64_kernel_above_4gib() {
        let err = load_kernel(&elf_kernel(true, 0x1_0000_0000).build()).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
        assert!(err.to_string().contains("below 4 GiB"), "{err}");
        // Last segment crossing 4 GiB.
        let err = load_kernel(&elf_kernel(true, 0xffff_f000).build()).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Above4GiB {
                    start: 0x1_0000_0000,
                    ..
                }
            ),
            "{err}"
        );
        // Entry above 4 GiB.
        let mut b = elf_kernel(true, 0x100000);
        b.entry = 0xffff_ffff_8010_000c;
        let err = load_kernel(&b.build()).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
    }

    #[test]
    fn header_without_address_fields_needs_elf() {
        let file = with_header(0x100, 8, 3, [0; 5]);
        let err = load_kernel(&file).unwrap_err();
        assert!(
            matches!(&err, LoadError::NotMultibootElf(inner) if matches!(**inner, LoadError::NotElf)),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("not a multiboot kernel"),
            "{err}"
        );
        // An ELF that fails to load says why.
        let mut b = elf_kernel(false, 0x100000);
        b.e_type = 3;
        let err = load_kernel(&b.build()).unwrap_err();
        assert!(err.to_string().contains("-no-pie"), "{err}");
    }

    /// Guest memory [base, base + len) with the boot info's writes applied.
    struct Mem {
        base: u64,
        bytes: Vec<u8>,
    }

    impl Mem {
        fn new(info: &BootInfo) -> Mem {
            let base = info.info_addr;
            let mut bytes = vec![0xccu8; (info.end - base) as usize];
            for (gpa, data) in &info.writes {
                let at = (gpa - base) as usize;
                bytes[at..at + data.len()].copy_from_slice(data);
            }
            Mem { base, bytes }
        }
        fn slice(&self, gpa: u64, len: usize) -> &[u8] {
            let at = (gpa - self.base) as usize;
            &self.bytes[at..at + len]
        }
        fn u32(&self, gpa: u64) -> u32 {
            u32::from_le_bytes(self.slice(gpa, 4).try_into().unwrap())
        }
        fn u64(&self, gpa: u64) -> u64 {
            u64::from_le_bytes(self.slice(gpa, 8).try_into().unwrap())
        }
        fn cstr(&self, gpa: u64) -> &str {
            let at = (gpa - self.base) as usize;
            let len = self.bytes[at..].iter().position(|&b| b == 0).unwrap();
            std::str::from_utf8(&self.bytes[at..at + len]).unwrap()
        }
    }

    const RAM: &[(u64, u64)] = &[(0x100000, 0x8000000), (0, 0x9fc00)];

    #[test]
    fn boot_info_fields() {
        let big: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let modules = [
            Module {
                data: &big,
                cmdline: "initrd",
            },
            Module {
                data: b"abc",
                cmdline: "mod2 x=1",
            },
        ];
        let at = 0x10000;
        let info = build_boot_info(at, "console=ttyS0 quiet", &modules, RAM).unwrap();
        assert_eq!(info.info_addr, at);
        assert_eq!(info.writes[0].0, at);
        assert_eq!(info.writes.len(), 3);
        let mem = Mem::new(&info);
        let field = |off: u64| mem.u32(at + off);

        assert_eq!(field(0), 0x24d); // MEMORY | CMDLINE | MODS | MMAP | BOOT_LOADER_NAME
        assert_eq!(field(4), 639); // mem_lower
        assert_eq!(field(8), (0x8000000 - 0x100000) / 1024); // mem_upper
        assert_eq!(field(12), 0); // boot_device
        assert_eq!(mem.cstr(u64::from(field(16))), "console=ttyS0 quiet");
        assert_eq!(field(20), 2); // mods_count
        for off in (28..44)
            .step_by(4)
            .chain((52..64).step_by(4))
            .chain((68..88).step_by(4))
        {
            assert_eq!(field(off), 0, "offset {off}");
        }
        assert_eq!(mem.cstr(u64::from(field(64))), "kvmpy");
        // The info struct's own bytes are exactly 88; everything it points to is after.
        for off in [16, 24, 48, 64] {
            assert!(u64::from(field(off)) >= at + 88, "offset {off}");
        }

        // Modules: page aligned, after the metadata, contents and command lines.
        let mods = u64::from(field(24));
        assert_eq!(mods % 4, 0);
        let mut prev_end = info.writes[0].0 + info.writes[0].1.len() as u64;
        for (i, (module, cmdline)) in modules.iter().zip(["initrd", "mod2 x=1"]).enumerate() {
            let entry = mods + 16 * i as u64;
            let start = u64::from(mem.u32(entry));
            let end = u64::from(mem.u32(entry + 4));
            assert_eq!(start % 4096, 0);
            assert!(start >= prev_end);
            assert_eq!(end - start, module.data.len() as u64);
            assert_eq!(mem.slice(start, module.data.len()), module.data);
            assert_eq!(mem.cstr(u64::from(mem.u32(entry + 8))), cmdline);
            assert_eq!(mem.u32(entry + 12), 0);
            assert!(info.writes.contains(&(start, module.data.to_vec())));
            prev_end = end;
        }
        assert_eq!(info.end, prev_end);
        assert_eq!(info.end, 0x10000 + 0x1000 + 0x2000 + 3);

        // Memory map, sorted.
        assert_eq!(field(44), 48);
        let mmap = u64::from(field(48));
        let expect = [(0u64, 0x9fc00u64), (0x100000, 0x7f00000)];
        for (i, (addr, len)) in expect.into_iter().enumerate() {
            let e = mmap + 24 * i as u64;
            assert_eq!(mem.u32(e), 20);
            assert_eq!(mem.u64(e + 4), addr);
            assert_eq!(mem.u64(e + 12), len);
            assert_eq!(mem.u32(e + 20), 1);
        }
    }

    #[test]
    fn boot_info_without_modules() {
        let info = build_boot_info(0x9000, "", &[], &[]).unwrap();
        assert_eq!(info.writes.len(), 1);
        let blob_end = 0x9000 + info.writes[0].1.len() as u64;
        assert_eq!(info.end, blob_end);
        let mem = Mem::new(&info);
        assert_eq!(mem.u32(0x9000) & INFO_MODS, INFO_MODS);
        assert_eq!(mem.u32(0x9000 + 20), 0);
        assert_eq!(mem.cstr(u64::from(mem.u32(0x9000 + 16))), "");
        assert_eq!((mem.u32(0x9000 + 4), mem.u32(0x9000 + 8)), (0, 0));
        assert_eq!(mem.u32(0x9000 + 44), 0);
    }

    #[test]
    fn boot_info_memory_sizes() {
        let mem_sizes = |ram: &[(u64, u64)]| {
            let info = build_boot_info(0, "", &[], ram).unwrap();
            let mem = Mem::new(&info);
            (mem.u32(4), mem.u32(8), mem.u32(44) / 24)
        };
        // Adjacent ranges are contiguous; low memory is capped at 640 KiB.
        let split = [
            (0, 0x50000),
            (0x50000, 0x100000),
            (0x100000, 0x200000),
            (0x200000, 0x300000),
            (0x400000, 0x500000),
        ];
        assert_eq!(mem_sizes(&split), (640, 2048, 5));
        // No RAM at 0 or at 1 MiB; empty ranges are left out of the map.
        assert_eq!(
            mem_sizes(&[(0x1000, 0x9000), (0x200000, 0x200000)]),
            (0, 0, 1)
        );
        // mem_upper saturates.
        assert_eq!(mem_sizes(&[(0x100000, 1 << 44)]), (0, u32::MAX, 1));
    }

    #[test]
    fn boot_info_errors() {
        let err = build_boot_info(0x9001, "", &[], RAM).unwrap_err();
        assert!(matches!(err, LoadError::UnalignedBootInfo(0x9001)));
        assert!(err.to_string().contains("page aligned"), "{err}");

        let err = build_boot_info(0x9000, "a\0b", &[], RAM).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel command line contains a NUL byte"
        );
        let modules = [
            Module {
                data: b"x",
                cmdline: "ok",
            },
            Module {
                data: b"y",
                cmdline: "bad\0",
            },
        ];
        let err = build_boot_info(0x9000, "", &modules, RAM).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the command line of module 1 contains a NUL byte"
        );

        // Metadata crossing 4 GiB.
        let long = "x".repeat(5000);
        let err = build_boot_info(0xffff_f000, &long, &[], RAM).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
        let err = build_boot_info(1 << 40, "", &[], RAM).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
        let err = build_boot_info(!0xfff, "", &[], RAM).unwrap_err();
        assert!(matches!(err, LoadError::Above4GiB { .. }), "{err}");
        // A module crossing 4 GiB.
        let data = vec![0u8; 0x2000];
        let modules = [Module {
            data: &data,
            cmdline: "",
        }];
        let err = build_boot_info(0xffff_d000, "", &modules, RAM).unwrap_err();
        assert!(
            matches!(&err, LoadError::Above4GiB { what, start: 0xffff_e000, .. } if what == "module 0"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("module 0 at [0xffffe000, "),
            "{err}"
        );
        // A module ending exactly at 4 GiB: mod_end would not fit in 32 bits.
        let err = build_boot_info(0xffff_e000, "", &modules[..1], RAM);
        assert!(err.is_err());
        let data = vec![0u8; 0x1000];
        let modules = [Module {
            data: &data,
            cmdline: "",
        }];
        assert!(build_boot_info(0xffff_e000, "", &modules, RAM).is_err());
        // Up to the last byte below 4 GiB is fine.
        let data = vec![0u8; 0xfff];
        let modules = [Module {
            data: &data,
            cmdline: "",
        }];
        let info = build_boot_info(0xffff_e000, "", &modules, RAM).unwrap();
        assert_eq!(info.end, 0xffff_ffff);
        let mem = Mem::new(&info);
        assert_eq!(
            mem.u32(u64::from(mem.u32(0xffff_e000 + 24)) + 4),
            0xffff_ffff
        );
    }
}
