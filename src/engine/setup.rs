//! Putting a vCPU in a CPU mode, its CPUID and MSRs, and guest-virtual memory access: the
//! glue between the pure helpers of `arch::x86_64` and a vCPU.

use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs};

use crate::arch::x86_64::fuzzmap::{self, UserRange};
use crate::arch::x86_64::{self as x86, gdt, modes, paging::WalkError, Layout};
use crate::devices::exception::ExceptionDev;
use crate::engine::error::{Error, Result};
use crate::engine::vcpu::VcpuCore;

/// How `setup_long_mode` lays out a guest.
#[derive(Clone, Copy)]
pub struct LongMode {
    pub user: bool,
    pub tables_addr: u64,
    pub map_gib: u64,
    pub huge_pages: bool,
    pub exceptions: bool,
    pub exception_port: u16,
}

impl LongMode {
    /// 64-bit user mode (CPL3) as the face's `setup_long_mode(user=True)` defaults lay it
    /// out: kvmpy's tables at 0x1000, the first GiB identity mapped in 4 KiB pages,
    /// exception stubs (reporting on port 0xf6) if `exceptions`.
    pub const fn user_mode(exceptions: bool) -> Self {
        LongMode {
            user: true,
            tables_addr: 0x1000,
            map_gib: 1,
            huge_pages: false,
            exceptions,
            exception_port: 0xf6,
        }
    }
}

impl VcpuCore {
    /// 16-bit real mode at `cs:ip`.
    pub fn setup_real_mode(&self, cs: u16, ip: u16) -> Result<()> {
        self.with_fd(|fd| {
            let s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            self.write_sregs(fd, &modes::real_mode_sregs(&s, cs))?;
            self.update_regs(fd, |r| {
                r.rip = u64::from(ip);
                r.rflags = x86::RFLAGS_RESERVED;
            })
        })
    }

    /// Flat 32-bit protected mode, paging off, CPL0, with a GDT at `tables_addr`.
    pub fn setup_protected_mode(&self, tables_addr: u64) -> Result<()> {
        let layout = Layout::at(tables_addr, 1, true).map_err(Error::Value)?;
        self.vm.check_memory(layout.gdt, 0x40)?;
        self.vm
            .write_memory(layout.gdt, &x86::gdt::table_bytes(layout.tss))?;
        self.with_fd(|fd| {
            let s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            self.write_sregs(fd, &x86::protected_mode_sregs(&s, &layout))?;
            self.update_regs(fd, |r| r.rflags = x86::RFLAGS_RESERVED)
        })
    }

    /// 64-bit long mode with paging; see the face's `setup_long_mode`.
    pub fn setup_long_mode(&self, mode: LongMode) -> Result<()> {
        self.setup_long_mode_mapping(mode, None)
    }

    /// 64-bit long mode; with `user_map`, the page tables map only those ranges for user
    /// mode (see `arch::x86_64::fuzzmap`) instead of identity-mapping `map_gib` GiB.
    pub fn setup_long_mode_mapping(
        &self,
        mode: LongMode,
        user_map: Option<&[UserRange]>,
    ) -> Result<()> {
        let layout =
            Layout::at(mode.tables_addr, mode.map_gib, mode.huge_pages).map_err(Error::Value)?;
        let vm = &self.vm;
        let tables = match user_map {
            None => None,
            Some(_) if mode.huge_pages => {
                return Err(Error::Value(
                    "user_map builds its own 4 KiB page tables: huge_pages must be False".into(),
                ))
            }
            Some(ranges) => {
                let (pages, end) = fuzzmap::fuzz_map(&layout, ranges).map_err(Error::Value)?;
                vm.check_memory(layout.gdt, (end - layout.gdt) as usize)?;
                for r in ranges {
                    vm.check_memory(r.start, r.size as usize).map_err(|_| {
                        Error::Value(format!(
                            "user range {:#x}+{:#x} is not all in guest RAM",
                            r.start, r.size
                        ))
                    })?;
                }
                Some(pages)
            }
        };
        if mode.huge_pages && !vm.supports_1gib_pages()? {
            return Err(Error::Value(
                "this host's KVM does not offer 1 GiB pages (CPUID pdpe1gb) to guests; use \
                 huge_pages=False"
                    .into(),
            ));
        }
        if tables.is_none() {
            vm.check_memory(layout.gdt, (layout.end() - layout.gdt) as usize)?;
        }
        let own = if mode.exceptions {
            self.exception_tss(&layout)?
        } else {
            None
        };
        if mode.exceptions {
            let port = mode.exception_port;
            vm.update_bus(|bus| {
                let same = bus
                    .io(port)
                    .and_then(|d| d.as_any().downcast_ref::<ExceptionDev>())
                    .is_some();
                if same {
                    return Ok((bus.clone(), ()));
                }
                let dev = Arc::new(ExceptionDev { port });
                Ok((bus.with_io(port, u32::from(port) + 1, dev)?, ()))
            })?;
        }
        let mut image = modes::long_mode_image(&layout, mode.exceptions, mode.exception_port);
        if let Some(pages) = tables {
            image.retain(|(gpa, _)| *gpa < layout.pml4);
            image.extend(pages);
        }
        if let Some((tss, _, bytes)) = &own {
            image.push((*tss, bytes.clone()));
        }
        for (gpa, bytes) in &mut image {
            if *gpa == layout.pdpt {
                crate::engine::snapshot::stub::map_in(vm, bytes)?;
            } else if *gpa == layout.pml4 && bytes.len() >= 8 && bytes[0] & 1 != 0 {
                // Accessed preset: the CPU's walks never write the PML4 page.
                bytes[0] |= crate::arch::x86_64::fpustub::ACCESSED as u8;
            }
        }
        for (gpa, bytes) in image {
            vm.write_memory(gpa, &bytes)?;
        }
        self.with_fd(|fd| {
            let s = fd
                .get_sregs()
                .map_err(|e| Error::ioctl("KVM_GET_SREGS", e))?;
            let mut s = x86::long_mode_sregs(&s, &layout, mode.user, mode.exceptions);
            if let Some((tss, limit, _)) = &own {
                (s.tr.base, s.tr.limit) = (*tss, *limit);
            }
            self.write_sregs(fd, &s)?;
            self.update_regs(fd, |r| r.rflags = x86::long_mode_rflags(mode.user))
        })
    }

    /// The TSS (with its segment limit) of this vCPU when it is not the first to use the
    /// tables at `layout` with exceptions: the stubs and IDT are shared, but two vCPUs on
    /// one stack (and one report area, which is on it) would write over each other when
    /// they fault at once. The first vCPU uses the layout's own (None); the others get
    /// [`Layout::exception_slot`]s, inside the tables' own pages.
    fn exception_tss(&self, layout: &Layout) -> Result<Option<(u64, u32, Vec<u8>)>> {
        let k = self.vm.exception_slot(layout.gdt, self.id);
        if k == 0 {
            return Ok(None);
        }
        let Some((tss, stack_top)) = layout.exception_slot(k) else {
            return Err(Error::Value(format!(
                "vCPU {} would be vCPU number {} to use the tables at {:#x} with \
                 exceptions=True; at most {} can share them: give it its own tables_addr",
                self.id,
                k + 1,
                layout.gdt,
                x86::EXTRA_EXCEPTION_SLOTS + 1
            )));
        };
        let (bytes, limit) = gdt::extra_tss_bytes(tss, stack_top, layout.tss);
        Ok(Some((tss, limit, bytes)))
    }

    /// Sets RIP, RAX and RBX, as boot protocols hand over.
    pub fn set_boot_registers(&self, rip: u64, rax: u64, rbx: u64) -> Result<()> {
        self.with_fd(|fd| {
            self.update_regs(fd, |r| {
                r.rip = rip;
                r.rax = rax;
                r.rbx = rbx;
            })
        })
    }

    /// The vCPU's CPUID table.
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        self.with_fd(|fd| {
            let cpuid = fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| Error::ioctl("KVM_GET_CPUID2", e))?;
            Ok(cpuid.as_slice().to_vec())
        })
    }

    /// Replaces the vCPU's CPUID table.
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| {
            Error::Value(format!(
                "too many CPUID entries ({}, at most {})",
                entries.len(),
                kvm_bindings::KVM_MAX_CPUID_ENTRIES
            ))
        })?;
        self.with_fd(|fd| {
            self.note_state_write();
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::ioctl("KVM_SET_CPUID2", e))
        })
    }

    /// Reads MSRs: `(index, value)` for each index; fails naming the first one KVM refused.
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::Value(format!("too many MSRs ({})", entries.len())))?;
        let n = self.with_fd(|fd| {
            fd.get_msrs(&mut msrs)
                .map_err(|e| Error::ioctl("KVM_GET_MSRS", e))
        })?;
        if n < indices.len() {
            return Err(Error::Refused(format!(
                "KVM refused to read MSR {:#x}",
                indices[n]
            )));
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes MSRs; fails naming the first one KVM refused (the ones before it are written).
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> = values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::Value(format!("too many MSRs ({})", entries.len())))?;
        let n = self.with_fd(|fd| {
            self.note_state_write();
            fd.set_msrs(&msrs)
                .map_err(|e| Error::ioctl("KVM_SET_MSRS", e))
        })?;
        if n < entries.len() {
            return Err(Error::Refused(format!(
                "KVM refused to write {:#x} to MSR {:#x}",
                entries[n].data, entries[n].index
            )));
        }
        Ok(())
    }

    /// Walks the guest's page tables for `vaddr`, as the CPU would.
    pub fn translate(&self, vaddr: u64) -> Result<u64> {
        let s = self.sregs()?;
        x86::paging::translate(s.cr0, s.cr3, s.cr4, s.efer, vaddr, |gpa, size| {
            let mut buf = [0u8; 8];
            self.vm.read_memory(gpa, &mut buf[..size]).ok()?;
            Some(u64::from_le_bytes(buf))
        })
        .map_err(|e| match e {
            WalkError::NotMapped { level } => Error::Memory(format!(
                "virtual address {vaddr:#x} is not mapped (no present entry at page-table level \
                 {level})"
            )),
            WalkError::TableOutsideMemory { gpa } => Error::Memory(format!(
                "virtual address {vaddr:#x}: its page table at {gpa:#x} is outside guest memory"
            )),
            WalkError::NonCanonical => {
                Error::Memory(format!("virtual address {vaddr:#x} is not canonical"))
            }
        })
    }

    /// KVM's own translation (`KVM_TRANSLATE`), or None where it says unmapped.
    pub fn kvm_translate(&self, vaddr: u64) -> Result<Option<u64>> {
        self.with_fd(|fd| {
            let t = fd
                .translate_gva(vaddr)
                .map_err(|e| Error::ioctl("KVM_TRANSLATE", e))?;
            Ok((t.valid != 0).then_some(t.physical_address))
        })
    }

    /// The guest-physical pieces of `[vaddr, vaddr + len)`: `(gpa, offset, length)` per
    /// page, all translated before anything is accessed.
    fn virtual_pieces(&self, vaddr: u64, len: usize) -> Result<Vec<(u64, usize, usize)>> {
        let mut pieces = Vec::new();
        let (mut addr, mut done) = (vaddr, 0usize);
        while done < len {
            let chunk = ((0x1000 - (addr & 0xfff)) as usize).min(len - done);
            pieces.push((self.translate(addr)?, done, chunk));
            addr = addr.wrapping_add(chunk as u64);
            done += chunk;
        }
        Ok(pieces)
    }

    /// Reads guest virtual memory through the vCPU's page tables.
    pub fn read_virtual(&self, vaddr: u64, buf: &mut [u8]) -> Result<()> {
        for (gpa, at, len) in self.virtual_pieces(vaddr, buf.len())? {
            self.vm.read_memory(gpa, &mut buf[at..at + len])?;
        }
        Ok(())
    }

    /// Writes guest virtual memory through the vCPU's page tables (ignoring their
    /// write protection, as a debugger does); nothing is written if a page is unmapped.
    pub fn write_virtual(&self, vaddr: u64, data: &[u8]) -> Result<()> {
        for (gpa, at, len) in self.virtual_pieces(vaddr, data.len())? {
            self.vm.write_memory(gpa, &data[at..at + len])?;
        }
        Ok(())
    }
}
