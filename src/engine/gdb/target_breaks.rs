//! gdb's breakpoints and watchpoints on the VM target (`target.rs`): software ones in the
//! VM's breakpoint table, hardware ones through DR0-DR3 where the host delivers them, and
//! watchpoints (`watch.rs`).

use super::*;

impl Breakpoints for VmTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl HwBreakpoint for VmTarget {
    /// A debug-register breakpoint of gdb's in every vCPU (`hbreak`), where the host has
    /// them (see `hw_breakpoints`). A refusal (a host without them, a fifth user of
    /// DR0-DR3, an unmapped address) goes to gdb with its reason, which gdb prints
    /// ("Cannot insert hardware breakpoint 1:Remote failure reply: ...").
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw_breakpoints.contains(&addr) {
            return Ok(true);
        }
        let cpu = self.first_vcpu().map_err(TargetError::Fatal)?;
        match self.vm.add_hw_breakpoint(&cpu, addr, Owner::Gdb) {
            Ok(()) => {
                self.hw_breakpoints.insert(addr);
                Ok(true)
            }
            Err(e @ (Error::Memory(_) | Error::Value(_) | Error::Unsupported(_))) => {
                *crate::engine::lock(&self.explain) = Some(e.to_string());
                Ok(false)
            }
            Err(e) => Err(TargetError::Fatal(e)),
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw_breakpoints.remove(&addr) {
            self.vm.remove_hw_breakpoint(addr, Owner::Gdb);
        }
        Ok(true)
    }
}

impl HwWatchpoint for VmTarget {
    /// A watchpoint of 1, 2, 4 or 8 aligned bytes is the engine's (`engine::watch`: the
    /// guest runs at full speed, the watched page's accesses exit); a write watchpoint the
    /// engine cannot take (other lengths, up to 64 bytes, or a fifth) is checked by single
    /// steps (see `gdb::watch`). Other read and access watchpoints are refused, which gdb
    /// reports.
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let cpu = self.first_vcpu().map_err(TargetError::Fatal)?;
        let engine_kind = match kind {
            WatchKind::Write => crate::engine::watch::WatchKind::Write,
            WatchKind::Read => crate::engine::watch::WatchKind::Read,
            WatchKind::ReadWrite => crate::engine::watch::WatchKind::ReadWrite,
        };
        let by_page = crate::engine::watch::check_range(addr, len)
            .and_then(|()| crate::engine::debug::watch_mechanism(&self.vm.kvm))
            .and_then(|_| cpu.translate(addr))
            .and_then(|gpa| {
                self.vm.add_watch(crate::engine::watch::Watch {
                    vaddr: addr,
                    gpa,
                    len,
                    kind: engine_kind,
                    owner: None,
                })
            });
        match by_page {
            Ok(()) => {
                self.page_watches.push((addr, len));
                return Ok(true);
            }
            Err(Error::Closed(what)) => return Err(TargetError::Fatal(Error::Closed(what))),
            Err(_) => {}
        }
        if !matches!(kind, WatchKind::Write) || len == 0 || len > MAX_LEN {
            return Ok(false);
        }
        let mut now = vec![0; len as usize];
        if cpu.read_virtual(addr, &mut now).is_err() {
            return Ok(false);
        }
        self.watches.add(addr, now);
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        _kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        if let Some(at) = self.page_watches.iter().position(|w| *w == (addr, len)) {
            self.page_watches.remove(at);
            return match self.vm.remove_watch(addr, len, None) {
                Ok(()) | Err(Error::Value(_)) => Ok(true),
                Err(e) => Err(TargetError::Fatal(e)),
            };
        }
        Ok(self.watches.remove(addr, len))
    }
}

impl SwBreakpoint for VmTarget {
    /// Adds gdb's breakpoint to the VM's table: it stops every vCPU, for gdb only (not
    /// Python's `on_breakpoint` handler). One that Python set at the same address shares
    /// the patch, and stays when gdb removes its own.
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains(&addr) {
            return Ok(true);
        }
        let cpu = self.first_vcpu().map_err(TargetError::Fatal)?;
        match self.vm.add_breakpoint(&cpu, addr, Owner::Gdb) {
            Ok(()) => {
                self.breakpoints.insert(addr);
                Ok(true)
            }
            Err(Error::Memory(_) | Error::Value(_) | Error::Unsupported(_)) => Ok(false),
            Err(e) => Err(TargetError::Fatal(e)),
        }
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if !self.breakpoints.remove(&addr) {
            return Ok(true);
        }
        match self.vm.remove_breakpoint(addr, Owner::Gdb) {
            Ok(()) | Err(Error::Value(_)) => Ok(true),
            Err(e) => Err(TargetError::Fatal(e)),
        }
    }
}
