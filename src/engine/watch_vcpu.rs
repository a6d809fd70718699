//! The watchpoint calls of a vCPU (see `watch` for watchpoints by page and `debug_regs`
//! for those through the debug registers), and the debug registers of a run.

use crate::engine::debug::DebugState;
use crate::engine::debug_regs::WatchMechanism;
use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;
use crate::engine::watch::{Watch, WatchKind};

/// How watchpoints work on this host: `"memslot"` (by guest-physical page, see `watch`)
/// or `"debug-registers"` (see `debug_regs`), or an error naming what the host lacks.
pub fn watch_mechanism(kvm: &kvm_ioctls::Kvm) -> Result<&'static str> {
    let chosen = crate::engine::debug_regs::watch_mechanism()?;
    if chosen == WatchMechanism::Memslot
        && !crate::engine::kvm::has_cap(kvm, kvm_ioctls::Cap::ReadonlyMem)
    {
        return Err(Error::Unsupported(
            "this host's KVM has no read-only memory slots (KVM_CAP_READONLY_MEM), which \
             kvmpy's page watchpoints need (its KVM does not deliver debug-register \
             watchpoints either: see `python -m kvmpy info`)"
                .into(),
        ));
    }
    Ok(chosen.as_str())
}

fn watch_supported(vm: &VmCore) -> Result<()> {
    watch_mechanism(&vm.kvm).map(|_| ())
}

impl VcpuCore {
    /// Adds this vCPU's watchpoint of `len` bytes (1, 2, 4 or 8, aligned) at guest-virtual
    /// `address`, translated once, now, by the vCPU's page tables; `kind` is `"write"` or
    /// `"rw"` (see `watch` for how it works and what it cannot watch).
    pub fn add_watchpoint(&self, address: u64, len: u64, kind: &str) -> Result<()> {
        self.vm.check_open()?;
        crate::engine::watch::check_range(address, len)?;
        let kind = WatchKind::parse(kind)?;
        watch_supported(&self.vm)?;
        let gpa = self.translate(address)?;
        let by_page = crate::engine::debug_regs::watch_mechanism()? == WatchMechanism::Memslot;
        if by_page && kind != WatchKind::Write {
            self.check_rw_page(gpa & !(crate::engine::memory::PAGE_SIZE - 1))?;
        }
        self.vm.add_watch(Watch {
            vaddr: address,
            gpa,
            len,
            kind,
            owner: Some(self.id),
        })
    }

    /// Fails if the page at guest-physical `page` holds what the vCPU needs to read
    /// without an exit: the code at RIP, the page tables that translate RIP and the
    /// GDT/IDT (a read/write watchpoint leaves its page with no memory slot, and KVM can
    /// neither fetch code nor walk tables there).
    fn check_rw_page(&self, page: u64) -> Result<()> {
        let sregs = self.sregs()?;
        let rip = self.regs()?.rip;
        let mut tables = Vec::new();
        let mut walk = |vaddr: u64| {
            crate::arch::x86_64::paging::translate(
                sregs.cr0,
                sregs.cr3,
                sregs.cr4,
                sregs.efer,
                vaddr,
                |gpa, size| {
                    tables.push(gpa);
                    let mut buf = [0u8; 8];
                    self.vm.read_memory(gpa, &mut buf[..size]).ok()?;
                    Some(u64::from_le_bytes(buf))
                },
            )
            .ok()
        };
        let mut needed = vec![("the code at RIP", walk(rip))];
        needed.push(("the GDT", walk(sregs.gdt.base)));
        needed.push(("the IDT", walk(sregs.idt.base)));
        let in_page = |gpa: u64| gpa & !(crate::engine::memory::PAGE_SIZE - 1) == page;
        if let Some((what, _)) = needed.iter().find(|(_, gpa)| gpa.is_some_and(in_page)) {
            return Err(Error::Value(format!(
                "guest-physical page {page:#x} holds {what}: a read/write watchpoint leaves \
                 its page with no memory slot, where KVM cannot fetch code or read tables; \
                 watch it for writes only"
            )));
        }
        if tables.iter().any(|g| in_page(*g)) {
            return Err(Error::Value(format!(
                "guest-physical page {page:#x} holds the vCPU's page tables: a read/write \
                 watchpoint leaves its page with no memory slot, where KVM cannot walk \
                 them; watch it for writes only"
            )));
        }
        Ok(())
    }

    /// Removes this vCPU's watchpoint at `address` of `len` bytes.
    pub fn remove_watchpoint(&self, address: u64, len: u64) -> Result<()> {
        self.vm.remove_watch(address, len, Some(self.id))
    }

    /// Puts this vCPU's debug-register watchpoints (noting their values) and then its
    /// hardware breakpoints in DR0-DR3 for the run; true if the registers KVM has must
    /// change.
    pub(crate) fn arm_debug_registers(&self, st: &mut DebugState) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let watching = self.vm.watch_count.load(Ordering::Acquire) > 0;
        let breaking = self.vm.hw_count.load(Ordering::Acquire) > 0;
        if !watching && !breaking && st.dr[7] == 0 {
            return Ok(false);
        }
        let by_dr = crate::engine::debug_regs::watch_mechanism()? == WatchMechanism::DebugRegisters;
        if !by_dr && !breaking && st.dr[7] == 0 {
            return Ok(false);
        }
        let mine: Vec<Watch> = match by_dr {
            true => lock(&self.vm.watches)
                .iter()
                .filter(|w| w.owner.is_none_or(|o| o == self.id))
                .copied()
                .collect(),
            false => Vec::new(),
        };
        st.armed.clear();
        for w in &mine {
            let mut b = [0u8; 8];
            self.vm.read_memory_raw(w.gpa, &mut b[..w.len as usize])?;
            st.armed.push((*w, u64::from_le_bytes(b)));
        }
        st.execs = self.vm.hw_breakpoints_for(self.id);
        let regs = crate::engine::debug_regs::registers_with(&mine, &st.execs);
        let changed = regs != st.dr;
        st.dr = regs;
        Ok(changed)
    }
}
