//! Loading guest images into a VM: flat binaries, ELF executables and Multiboot v1
//! kernels. The parsing is in `loader` (pure); this is the glue to guest memory and vCPUs.

use std::collections::BTreeMap;

use crate::engine::error::{Error, Result};
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;
use crate::loader::{self, LoadError, Segment};

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        Error::Value(e.to_string())
    }
}

/// What a loader put in guest memory.
pub struct LoadedImage {
    /// The entry point.
    pub entry: u64,
    /// 32 or 64 (the ELF class; 32 for Multiboot kernels loaded with the a.out kludge).
    pub bits: u8,
    /// `(guest address, size in memory)` of each loaded segment.
    pub segments: Vec<(u64, u64)>,
    /// Symbol name -> address, from the ELF symbol table (empty for other images).
    pub symbols: BTreeMap<String, u64>,
    /// Guest physical address of the multiboot_info structure (Multiboot kernels only).
    pub boot_info: Option<u64>,
}

/// Guest RAM as `[start, end)` ranges, adjacent regions merged.
fn ram_ranges(vm: &VmCore) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (start, end) in vm.region_ranges() {
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

fn write_segments(vm: &VmCore, segments: &[Segment]) -> Result<()> {
    for s in segments {
        vm.write_memory(s.gpa, &s.data)?;
        let zeros = s.mem_size - s.data.len() as u64;
        if zeros > 0 {
            let zero = vec![0u8; zeros as usize];
            vm.write_memory(s.gpa + s.data.len() as u64, &zero)?;
        }
    }
    Ok(())
}

/// Writes a flat binary at `address`.
pub fn load_flat(vm: &VmCore, data: &[u8], address: u64) -> Result<()> {
    vm.check_memory(address, data.len())?;
    vm.write_memory(address, data)
}

/// Loads an ELF executable's PT_LOAD segments at their physical addresses.
pub fn load_elf(vm: &VmCore, data: &[u8]) -> Result<LoadedImage> {
    vm.check_open()?;
    let image = loader::parse_elf(data)?;
    loader::check_placement(&image.segments, image.entry, &ram_ranges(vm))
        .map_err(|e| Error::Memory(e.to_string()))?;
    write_segments(vm, &image.segments)?;
    Ok(LoadedImage {
        entry: image.entry,
        bits: image.class,
        segments: image.segments.iter().map(|s| (s.gpa, s.mem_size)).collect(),
        symbols: image
            .symbols
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect(),
        boot_info: None,
    })
}

/// Loads a Multiboot v1 kernel, its modules and the multiboot_info structure, and puts
/// `vcpu` in the state the specification prescribes: 32-bit protected mode, paging off,
/// EAX = 0x2BADB002, EBX = the info structure, EIP = the entry point.
pub fn load_multiboot(
    vm: &VmCore,
    vcpu: &VcpuCore,
    kernel: &[u8],
    cmdline: &str,
    modules: &[(Vec<u8>, String)],
    tables_addr: u64,
) -> Result<LoadedImage> {
    vm.check_open()?;
    let image = loader::load_kernel(kernel)?;
    let ram = ram_ranges(vm);
    loader::check_placement(&image.segments, image.entry, &ram)
        .map_err(|e| Error::Memory(e.to_string()))?;
    let gdt_end = tables_addr + 0x1000;
    if let Some(s) = image
        .segments
        .iter()
        .find(|s| s.gpa < gdt_end && tables_addr < s.end())
    {
        return Err(Error::Memory(format!(
            "the kernel segment at {:#x}..{:#x} overlaps the GDT page at {tables_addr:#x}; \
             pass another tables_addr",
            s.gpa,
            s.end()
        )));
    }
    let kernel_end = image.segments.iter().map(Segment::end).max().unwrap_or(0);
    let info_at = (kernel_end + 0xfff) & !0xfff;
    let mods: Vec<loader::Module<'_>> = modules
        .iter()
        .map(|(data, cmdline)| loader::Module { data, cmdline })
        .collect();
    let info = loader::build_boot_info(info_at, cmdline, &mods, &ram)?;
    for (gpa, bytes) in &info.writes {
        vm.check_memory(*gpa, bytes.len()).map_err(|_| {
            Error::Memory(format!(
                "the multiboot information and modules ({:#x}..{:#x}) do not fit in guest RAM \
                 after the kernel",
                info_at, info.end
            ))
        })?;
    }
    write_segments(vm, &image.segments)?;
    for (gpa, bytes) in &info.writes {
        vm.write_memory(*gpa, bytes)?;
    }
    vcpu.setup_protected_mode(tables_addr)?;
    vcpu.set_boot_registers(
        image.entry,
        u64::from(loader::multiboot::BOOTLOADER_MAGIC),
        info.info_addr,
    )?;
    Ok(LoadedImage {
        entry: image.entry,
        bits: 32,
        segments: image.segments.iter().map(|s| (s.gpa, s.mem_size)).collect(),
        symbols: BTreeMap::new(),
        boot_info: Some(info.info_addr),
    })
}
