//! Test helper: writes small little-endian ELF32/ELF64 files by hand.

/// One program header (PT_LOAD unless `p_type` is changed) and its file bytes.
pub struct Load {
    pub p_type: u32,
    pub paddr: u64,
    /// `p_vaddr`; `None` means the same as `paddr`.
    pub vaddr: Option<u64>,
    pub data: Vec<u8>,
    pub mem_size: u64,
    /// `p_offset` to write instead of the real one.
    pub offset: Option<u64>,
}

impl Load {
    pub fn new(paddr: u64, data: Vec<u8>, mem_size: u64) -> Self {
        Load {
            p_type: 1,
            paddr,
            vaddr: None,
            data,
            mem_size,
            offset: None,
        }
    }
}

/// A whole ELF file to write.
pub struct ElfBuilder {
    pub class64: bool,
    pub machine: u16,
    pub e_type: u16,
    pub entry: u64,
    pub loads: Vec<Load>,
    /// (name, value, size, STT_* type)
    pub syms: Vec<(&'static str, u64, u64, u8)>,
    /// Put the symbols in a dynamic symbol table (PT_DYNAMIC, DT_SYMTAB, ...) in an
    /// extra PT_LOAD segment at 0x800000 instead of a `.symtab` section.
    pub syms_as_dynsym: bool,
    /// Put the segment data last in the file, after the section headers.
    pub data_at_end: bool,
}

fn put(buf: &mut Vec<u8>, value: u64, size: usize) {
    buf.extend_from_slice(&value.to_le_bytes()[..size]);
}

fn put_at(buf: &mut [u8], at: usize, value: u64, size: usize) {
    buf[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
}

fn align(buf: &mut Vec<u8>, to: usize) {
    buf.resize(buf.len().next_multiple_of(to), 0);
}

const DYN_BASE: u64 = 0x800000;

impl ElfBuilder {
    pub fn new(class64: bool) -> Self {
        ElfBuilder {
            class64,
            machine: if class64 { 62 } else { 3 },
            e_type: 2,
            entry: 0,
            loads: vec![],
            syms: vec![],
            syms_as_dynsym: false,
            data_at_end: false,
        }
    }

    fn word(&self) -> usize {
        if self.class64 {
            8
        } else {
            4
        }
    }

    /// Symbol table (with the null symbol first) and its string table.
    fn symtab(&self) -> (Vec<u8>, Vec<u8>) {
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; if self.class64 { 24 } else { 16 }];
        for &(name, value, size, kind) in &self.syms {
            let st_name = strtab.len() as u64;
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            let info = (1 << 4) | kind; // STB_GLOBAL
            if self.class64 {
                put(&mut symtab, st_name, 4);
                symtab.push(info);
                symtab.push(0);
                put(&mut symtab, 1, 2);
                put(&mut symtab, value, 8);
                put(&mut symtab, size, 8);
            } else {
                put(&mut symtab, st_name, 4);
                put(&mut symtab, value, 4);
                put(&mut symtab, size, 4);
                symtab.push(info);
                symtab.push(0);
                put(&mut symtab, 1, 2);
            }
        }
        (symtab, strtab)
    }

    /// The dynamic-symbol segment's bytes (for `DYN_BASE`) and the offset and size of
    /// its `_DYNAMIC` array.
    fn dyn_blob(&self) -> (Vec<u8>, usize, usize) {
        let (symtab, strtab) = self.symtab();
        let w = self.word();
        let nsyms = symtab.len() / if self.class64 { 24 } else { 16 };
        let mut blob = symtab.clone();
        let str_off = blob.len();
        blob.extend_from_slice(&strtab);
        align(&mut blob, 8);
        let hash_off = blob.len();
        put(&mut blob, 1, 4); // nbucket
        put(&mut blob, nsyms as u64, 4); // nchain
        put(&mut blob, 0, 4); // bucket[0]
        for _ in 0..nsyms {
            put(&mut blob, 0, 4);
        }
        align(&mut blob, 8);
        let dyn_off = blob.len();
        let base = DYN_BASE;
        for (tag, val) in [
            (4, base + hash_off as u64),         // DT_HASH
            (5, base + str_off as u64),          // DT_STRTAB
            (6, base),                           // DT_SYMTAB
            (10, strtab.len() as u64),           // DT_STRSZ
            (11, (symtab.len() / nsyms) as u64), // DT_SYMENT
            (0, 0),                              // DT_NULL
        ] {
            put(&mut blob, tag, w);
            put(&mut blob, val, w);
        }
        let dyn_size = blob.len() - dyn_off;
        (blob, dyn_off, dyn_size)
    }

    pub fn build(&self) -> Vec<u8> {
        let w = self.word();
        let ehsize = if self.class64 { 64 } else { 52 };
        let phentsize = if self.class64 { 56 } else { 32 };
        let shentsize = if self.class64 { 64 } else { 40 };
        let extra = if self.syms_as_dynsym && !self.syms.is_empty() {
            Some(self.dyn_blob())
        } else {
            None
        };
        let phnum = self.loads.len() + if extra.is_some() { 2 } else { 0 };
        let mut buf = vec![0u8; ehsize + phnum * phentsize];

        let mut data_offsets = Vec::new();
        let mut write_data = |buf: &mut Vec<u8>| {
            for load in &self.loads {
                align(buf, 16);
                data_offsets.push(buf.len() as u64);
                buf.extend_from_slice(&load.data);
            }
        };
        let mut shoff = 0u64;
        let mut shnum = 0u64;
        let mut write_sections = |buf: &mut Vec<u8>| {
            if self.syms.is_empty() || self.syms_as_dynsym {
                return;
            }
            let (symtab, strtab) = self.symtab();
            let shstrtab = b"\0.symtab\0.strtab\0.shstrtab\0";
            align(buf, 8);
            let sym_off = buf.len() as u64;
            buf.extend_from_slice(&symtab);
            let str_off = buf.len() as u64;
            buf.extend_from_slice(&strtab);
            let shstr_off = buf.len() as u64;
            buf.extend_from_slice(shstrtab);
            align(buf, 8);
            shoff = buf.len() as u64;
            shnum = 4;
            let entsize = if self.class64 { 24 } else { 16 };
            let sections = [
                (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64),
                // name, type, offset, size, link, info, entsize
                (1, 2, sym_off, symtab.len() as u64, 2, 1, entsize),
                (9, 3, str_off, strtab.len() as u64, 0, 0, 0),
                (17, 3, shstr_off, shstrtab.len() as u64, 0, 0, 0),
            ];
            for (name, kind, offset, size, link, info, entsize) in sections {
                put(buf, name, 4);
                put(buf, kind, 4);
                put(buf, 0, w); // flags
                put(buf, 0, w); // addr
                put(buf, offset, w);
                put(buf, size, w);
                put(buf, link, 4);
                put(buf, info, 4);
                put(buf, 1, w); // addralign
                put(buf, entsize, w);
            }
        };
        if self.data_at_end {
            write_sections(&mut buf);
            write_data(&mut buf);
        } else {
            write_data(&mut buf);
            write_sections(&mut buf);
        }

        // Program headers: (type, offset, vaddr, paddr, filesz, memsz)
        let mut phdrs: Vec<(u64, u64, u64, u64, u64, u64)> = self
            .loads
            .iter()
            .zip(&data_offsets)
            .map(|(load, &real_offset)| {
                (
                    u64::from(load.p_type),
                    load.offset.unwrap_or(real_offset),
                    load.vaddr.unwrap_or(load.paddr),
                    load.paddr,
                    load.data.len() as u64,
                    load.mem_size,
                )
            })
            .collect();
        if let Some((blob, dyn_off, dyn_size)) = extra {
            align(&mut buf, 16);
            let off = buf.len() as u64;
            buf.extend_from_slice(&blob);
            let len = blob.len() as u64;
            phdrs.push((1, off, DYN_BASE, DYN_BASE, len, len));
            let d = dyn_off as u64;
            let ds = dyn_size as u64;
            phdrs.push((2, off + d, DYN_BASE + d, DYN_BASE + d, ds, ds));
        }

        let mut at = ehsize;
        for (kind, offset, vaddr, paddr, filesz, memsz) in phdrs {
            let mut ph = Vec::new();
            if self.class64 {
                put(&mut ph, kind, 4);
                put(&mut ph, 7, 4); // flags RWX
                for v in [offset, vaddr, paddr, filesz, memsz, 0x1000] {
                    put(&mut ph, v, 8);
                }
            } else {
                for v in [kind, offset, vaddr, paddr, filesz, memsz, 7, 0x1000] {
                    put(&mut ph, v, 4);
                }
            }
            buf[at..at + phentsize].copy_from_slice(&ph);
            at += phentsize;
        }

        // ELF header.
        buf[..4].copy_from_slice(b"\x7fELF");
        buf[4] = if self.class64 { 2 } else { 1 }; // EI_CLASS
        buf[5] = 1; // ELFDATA2LSB
        buf[6] = 1; // EV_CURRENT
        put_at(&mut buf, 16, u64::from(self.e_type), 2);
        put_at(&mut buf, 18, u64::from(self.machine), 2);
        put_at(&mut buf, 20, 1, 4); // e_version
        let mut at = 24;
        for v in [self.entry, ehsize as u64, shoff] {
            put_at(&mut buf, at, v, w);
            at += w;
        }
        put_at(&mut buf, at, 0, 4); // e_flags
        at += 4;
        let shstrndx = if shnum > 0 { 3 } else { 0 };
        for v in [
            ehsize as u64,
            phentsize as u64,
            phnum as u64,
            shentsize as u64,
            shnum,
            shstrndx,
        ] {
            put_at(&mut buf, at, v, 2);
            at += 2;
        }
        assert_eq!(at, ehsize);
        buf
    }
}
