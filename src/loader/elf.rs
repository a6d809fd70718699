//! ELF executables for x86 guests, parsed with goblin.

use goblin::elf::header::{EM_386, EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::PT_LOAD;
use goblin::elf::sym::{STT_FUNC, STT_NOTYPE, STT_OBJECT};
use goblin::elf::Elf;

use super::{LoadError, Segment};

/// A named symbol of the ELF file (from `.symtab`, or `.dynsym` without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The symbol's name.
    pub name: String,
    /// Its value (usually a virtual address).
    pub value: u64,
    /// Its size in bytes (0 when unknown).
    pub size: u64,
}

/// A parsed ELF executable: where its bytes go in guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    /// 32 (ELFCLASS32) or 64 (ELFCLASS64).
    pub class: u8,
    /// `e_entry`.
    pub entry: u64,
    /// One per PT_LOAD with `p_memsz > 0`, loaded at `p_paddr`, in program header order.
    pub segments: Vec<Segment>,
    /// Named FUNC/OBJECT/NOTYPE symbols with a nonzero value, in table order.
    pub symbols: Vec<Symbol>,
}

/// Parses an x86 or x86-64 ELF executable (`ET_EXEC`).
///
/// Each PT_LOAD segment with a nonzero memory size becomes a [`Segment`] at its
/// physical address `p_paddr`. Fails on a non-ELF or malformed file, another machine,
/// a non-executable or position-independent file, no PT_LOAD segment, a segment whose
/// bytes lie outside the file, `p_filesz > p_memsz`, an address overflow, or two
/// segments overlapping in guest-physical memory.
pub fn parse_elf(bytes: &[u8]) -> Result<ElfImage, LoadError> {
    if !bytes.starts_with(goblin::elf::header::ELFMAG) {
        return Err(LoadError::NotElf);
    }
    let elf = Elf::parse(bytes).map_err(|e| LoadError::MalformedElf(e.to_string()))?;
    let header = &elf.header;
    if header.e_machine != EM_386 && header.e_machine != EM_X86_64 {
        return Err(LoadError::WrongMachine(header.e_machine));
    }
    match header.e_type {
        ET_EXEC => {}
        ET_DYN => return Err(LoadError::PositionIndependent),
        other => return Err(LoadError::NotExecutable(other)),
    }

    // (program header index, segment)
    let mut loads: Vec<(usize, Segment)> = Vec::new();
    for (index, ph) in elf.program_headers.iter().enumerate() {
        if ph.p_type != PT_LOAD {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(LoadError::FileSizeExceedsMemSize {
                index,
                file_size: ph.p_filesz,
                mem_size: ph.p_memsz,
            });
        }
        if ph.p_memsz == 0 {
            continue;
        }
        let outside = || LoadError::SegmentOutsideFile {
            index,
            offset: ph.p_offset,
            file_size: ph.p_filesz,
            file_len: bytes.len(),
        };
        let start = usize::try_from(ph.p_offset).map_err(|_| outside())?;
        let len = usize::try_from(ph.p_filesz).map_err(|_| outside())?;
        let data = start
            .checked_add(len)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(outside)?;
        if ph.p_paddr.checked_add(ph.p_memsz).is_none() {
            return Err(LoadError::AddressOverflow {
                index,
                gpa: ph.p_paddr,
                mem_size: ph.p_memsz,
            });
        }
        loads.push((
            index,
            Segment {
                gpa: ph.p_paddr,
                data: data.to_vec(),
                mem_size: ph.p_memsz,
            },
        ));
    }
    if loads.is_empty() {
        return Err(LoadError::NoLoadSegment);
    }

    let mut by_addr: Vec<&(usize, Segment)> = loads.iter().collect();
    by_addr.sort_by_key(|(_, seg)| seg.gpa);
    for pair in by_addr.windows(2) {
        let (a_idx, a) = pair[0];
        let (b_idx, b) = pair[1];
        if b.gpa < a.end() {
            return Err(LoadError::OverlappingSegments {
                first: *a_idx,
                first_start: a.gpa,
                first_end: a.end(),
                second: *b_idx,
                second_start: b.gpa,
                second_end: b.end(),
            });
        }
    }

    let (syms, strtab) = if elf.syms.is_empty() {
        (&elf.dynsyms, &elf.dynstrtab)
    } else {
        (&elf.syms, &elf.strtab)
    };
    let symbols = syms
        .iter()
        .filter(|sym| {
            sym.st_value != 0 && matches!(sym.st_type(), STT_FUNC | STT_OBJECT | STT_NOTYPE)
        })
        .filter_map(|sym| {
            let name = strtab.get_at(sym.st_name)?;
            (!name.is_empty()).then(|| Symbol {
                name: name.to_owned(),
                value: sym.st_value,
                size: sym.st_size,
            })
        })
        .collect();

    Ok(ElfImage {
        class: if elf.is_64 { 64 } else { 32 },
        entry: header.e_entry,
        segments: loads.into_iter().map(|(_, seg)| seg).collect(),
        symbols,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_elf::{ElfBuilder, Load};
    use super::*;

    fn sample(class64: bool) -> ElfBuilder {
        let mut b = ElfBuilder::new(class64);
        b.entry = 0x100010;
        b.loads = vec![
            Load::new(0x100000, b"\xf4\xeb\xfd text".to_vec(), 0x20),
            Load::new(0x200000, vec![1, 2, 3, 4], 0x1000),
        ];
        b.syms = vec![
            ("_start", 0x100010, 4, STT_FUNC),
            ("counter", 0x200000, 4, STT_OBJECT),
            ("label", 0x100018, 0, STT_NOTYPE),
            ("zero", 0, 0, STT_NOTYPE),
            ("section", 0x100000, 0, 3), // STT_SECTION: skipped
            ("", 0x100000, 0, STT_FUNC), // unnamed: skipped
        ];
        b
    }

    fn check_sample(img: &ElfImage, class: u8) {
        assert_eq!(img.class, class);
        assert_eq!(img.entry, 0x100010);
        assert_eq!(
            img.segments,
            vec![
                Segment {
                    gpa: 0x100000,
                    data: b"\xf4\xeb\xfd text".to_vec(),
                    mem_size: 0x20
                },
                Segment {
                    gpa: 0x200000,
                    data: vec![1, 2, 3, 4],
                    mem_size: 0x1000
                },
            ]
        );
        let sym = |name: &str, value, size| Symbol {
            name: name.into(),
            value,
            size,
        };
        assert_eq!(
            img.symbols,
            vec![
                sym("_start", 0x100010, 4),
                sym("counter", 0x200000, 4),
                sym("label", 0x100018, 0),
            ]
        );
    }

    #[test]
    fn elf32() {
        check_sample(&parse_elf(&sample(false).build()).unwrap(), 32);
    }

    #[test]
    fn elf64() {
        check_sample(&parse_elf(&sample(true).build()).unwrap(), 64);
    }

    #[test]
    fn loads_at_paddr_not_vaddr() {
        let mut b = ElfBuilder::new(true);
        b.entry = 0xffffffff81000000;
        let mut load = Load::new(0x1000000, vec![0x90], 1);
        load.vaddr = Some(0xffffffff81000000);
        b.loads = vec![load];
        let img = parse_elf(&b.build()).unwrap();
        assert_eq!(img.segments[0].gpa, 0x1000000);
        assert_eq!(img.entry, 0xffffffff81000000);
    }

    #[test]
    fn skips_empty_and_non_load_segments() {
        let mut b = sample(false);
        b.loads.insert(0, Load::new(0x300000, vec![], 0));
        let mut note = Load::new(0x400000, vec![9; 8], 8);
        note.p_type = 4; // PT_NOTE
        b.loads.push(note);
        check_sample(&parse_elf(&b.build()).unwrap(), 32);
    }

    #[test]
    fn dynsym_used_without_symtab() {
        let mut b = sample(true);
        b.syms_as_dynsym = true;
        let img = parse_elf(&b.build()).unwrap();
        assert_eq!(img.symbols.len(), 3);
        assert_eq!(img.symbols[0].name, "_start");
    }

    #[test]
    fn no_symbols() {
        let mut b = sample(true);
        b.syms.clear();
        assert!(parse_elf(&b.build()).unwrap().symbols.is_empty());
    }

    #[test]
    fn not_elf() {
        for bytes in [
            &b""[..],
            b"\x7fEL",
            b"MZ\x90\x00 not an elf at all, just some bytes",
        ] {
            let err = parse_elf(bytes).unwrap_err();
            assert!(matches!(err, LoadError::NotElf), "{err}");
        }
        assert!(parse_elf(b"#!/bin/sh\n")
            .unwrap_err()
            .to_string()
            .starts_with("not an ELF file"));
    }

    #[test]
    fn truncated() {
        let bytes = sample(false).build();
        // Inside the ELF header, and inside the program headers.
        for len in [4, 20, 40, 60] {
            let err = parse_elf(&bytes[..len]).unwrap_err();
            assert!(matches!(err, LoadError::MalformedElf(_)), "{len}: {err}");
            assert!(
                err.to_string()
                    .starts_with("truncated or malformed ELF file: "),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_class_is_malformed() {
        let mut bytes = sample(false).build();
        bytes[4] = 7; // EI_CLASS
        assert!(matches!(
            parse_elf(&bytes).unwrap_err(),
            LoadError::MalformedElf(_)
        ));
    }

    #[test]
    fn wrong_machine() {
        let mut b = sample(true);
        b.machine = 183; // EM_AARCH64
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(matches!(err, LoadError::WrongMachine(183)));
        assert!(err.to_string().contains("EM_X86_64"), "{err}");
    }

    #[test]
    fn position_independent() {
        let mut b = sample(true);
        b.e_type = ET_DYN;
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(matches!(err, LoadError::PositionIndependent));
        assert!(err.to_string().contains("-no-pie"), "{err}");
    }

    #[test]
    fn relocatable_object() {
        let mut b = sample(false);
        b.e_type = 1; // ET_REL
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(matches!(err, LoadError::NotExecutable(1)), "{err}");
    }

    #[test]
    fn no_load_segment() {
        let mut b = sample(false);
        b.loads = vec![Load::new(0x1000, vec![], 0)];
        assert!(matches!(
            parse_elf(&b.build()).unwrap_err(),
            LoadError::NoLoadSegment
        ));
        b.loads.clear();
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(matches!(err, LoadError::NoLoadSegment));
        assert!(err.to_string().contains("no PT_LOAD"), "{err}");
    }

    #[test]
    fn segment_outside_file() {
        let mut b = sample(true);
        b.loads[1].offset = Some(0x10_0000);
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::SegmentOutsideFile {
                    index: 1,
                    offset: 0x10_0000,
                    file_size: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("outside the"), "{err}");

        // Offset + size overflowing.
        let mut b = sample(true);
        b.loads[0].offset = Some(u64::MAX - 2);
        assert!(matches!(
            parse_elf(&b.build()).unwrap_err(),
            LoadError::SegmentOutsideFile { index: 0, .. }
        ));

        // The file cut inside segment data.
        let mut b = sample(false);
        b.data_at_end = true;
        let bytes = b.build();
        assert!(parse_elf(&bytes).is_ok());
        assert!(matches!(
            parse_elf(&bytes[..bytes.len() - 1]).unwrap_err(),
            LoadError::SegmentOutsideFile { index: 1, .. }
        ));
    }

    #[test]
    fn filesz_greater_than_memsz() {
        let mut b = sample(false);
        b.loads[0].mem_size = 2;
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::FileSizeExceedsMemSize {
                    index: 0,
                    file_size: 8,
                    mem_size: 2
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("p_filesz"), "{err}");
    }

    #[test]
    fn address_overflow() {
        let mut b = sample(true);
        b.loads[1].paddr = u64::MAX - 0x10;
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(
            matches!(err, LoadError::AddressOverflow { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    #[test]
    fn overlapping_segments() {
        let mut b = sample(true);
        b.loads.push(Load::new(0x100000 + 0x1f, vec![7], 1));
        let err = parse_elf(&b.build()).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::OverlappingSegments {
                    first: 0,
                    first_start: 0x100000,
                    first_end: 0x100020,
                    second: 2,
                    second_start: 0x10001f,
                    second_end: 0x100020,
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("overlap"), "{err}");

        // Touching is fine.
        let mut b = sample(true);
        b.loads.push(Load::new(0x100020, vec![7], 1));
        assert_eq!(parse_elf(&b.build()).unwrap().segments.len(), 3);
    }
}
