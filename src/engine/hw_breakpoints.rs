//! Hardware (execute) breakpoints through the debug registers: no byte patched, at most
//! four, sharing DR0-DR3 with debug-register watchpoints (`debug_regs`).
//!
//! They exist only where KVM delivers a debug-register trap as `KVM_EXIT_DEBUG` (the probe
//! of `debug_host`: a DR0 execute breakpoint with `KVM_GUESTDBG_USE_HW_BP` fired; bare-
//! metal KVM) and breakpoints go through KVM (mechanism "kvm"). The run loop puts a
//! vCPU's hardware breakpoints (its own, the VM's and gdb's) in the debug registers at
//! each entry (`watch_vcpu::arm_debug_registers`), and turns the #DB of an execute slot
//! into the same `breakpoint` exit as a patched breakpoint. An execute breakpoint is a
//! fault, taken before the instruction: a run that resumes from it sets RFLAGS.RF, which
//! makes the CPU skip instruction breakpoints for one instruction (Intel SDM vol. 3,
//! 17.3.1.1), as an operating system's #DB handler does before `iret`.

use kvm_ioctls::VcpuFd;

use crate::engine::breakpoints::{Audience, Owner};
use crate::engine::debug::DebugState;
use crate::engine::debug_host::{host, mechanism, Mechanism};
use crate::engine::debug_regs::WatchMechanism;
use crate::engine::error::{Error, Result};
use crate::engine::lock;
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;

/// RFLAGS.RF: no instruction breakpoint for the next instruction.
pub const RF: u64 = 1 << 16;

/// How many debug registers hold addresses: DR0-DR3.
pub const DEBUG_REGISTERS: usize = 4;

/// One hardware breakpoint: a guest-virtual (linear) address and who set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwBreakpoint {
    pub vaddr: u64,
    pub owner: Owner,
}

impl HwBreakpoint {
    /// Whether vCPU `vcpu` stops at it (its own, the VM's, gdb's).
    pub fn applies_to(&self, vcpu: u64) -> bool {
        matches!(self.owner, Owner::Vm | Owner::Gdb) || self.owner == Owner::Vcpu(vcpu)
    }
}

/// Why this host has no hardware breakpoints, from the probe's findings: `delivers`
/// (a DR0 execute breakpoint fired) and `intercepts` (breakpoints and steps go through
/// `KVM_EXIT_DEBUG`); `None` where it has them.
pub fn refusal(delivers: bool, intercepts: bool) -> Option<Error> {
    if delivers && intercepts {
        return None;
    }
    Some(Error::Unsupported(if delivers {
        "hardware breakpoints: breakpoints and steps go through kvmpy's exception stubs \
         here (KVMPY_DEBUG_MECHANISM=exception-stubs, or this host's KVM does not \
         intercept int3 and single steps: see `python -m kvmpy info`), and a debug \
         register's trap reaches kvmpy only as KVM_EXIT_DEBUG; use add_breakpoint(address), \
         a patched breakpoint, instead"
            .into()
    } else {
        "hardware breakpoints: this host's KVM does not deliver debug-register \
         breakpoints (a DR0 execute breakpoint with KVM_GUESTDBG_USE_HW_BP did not fire in \
         the probe guest: see `python -m kvmpy info`); use add_breakpoint(address), a \
         patched breakpoint, instead"
            .into()
    }))
}

/// Fails with `KvmUnsupported` naming the probe's result where this host has no
/// hardware breakpoints.
pub fn check_host() -> Result<()> {
    let delivers = host()?.hw_breakpoints;
    match refusal(delivers, mechanism()? == Mechanism::Intercept) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Fails where a new user of the debug registers would be a fifth: `breakpoints`
/// hardware breakpoints and `watches` debug-register watchpoints are set.
pub fn check_slots(breakpoints: usize, watches: usize) -> Result<()> {
    if breakpoints + watches < DEBUG_REGISTERS {
        return Ok(());
    }
    Err(Error::Value(format!(
        "at most {DEBUG_REGISTERS} hardware breakpoints and debug-register watchpoints in \
         all: they share DR0-DR3 ({breakpoints} hardware breakpoint(s) and {watches} \
         watchpoint(s) are set); remove one first, or use add_breakpoint(address), a \
         patched breakpoint (any number)"
    )))
}

/// The DR slot a debug exit's DR6 `dr6` names, if it is one of `execs` (the execute
/// breakpoints, in the slots after `watches` watchpoints): its address.
pub fn exec_hit(dr6: u64, watches: usize, execs: &[u64]) -> Option<u64> {
    (0..DEBUG_REGISTERS)
        .filter(|i| dr6 & (1 << i) != 0)
        .find_map(|i| i.checked_sub(watches).and_then(|j| execs.get(j)).copied())
}

/// How many watchpoints use the debug registers (none where they are watched by page).
fn dr_watches(watches: usize) -> Result<usize> {
    Ok(
        match crate::engine::debug_regs::watch_mechanism()? == WatchMechanism::DebugRegisters {
            true => watches,
            false => 0,
        },
    )
}

impl VmCore {
    /// Adds `owner`'s hardware breakpoint at guest-virtual `vaddr` (which `cpu`'s page
    /// tables must map). Adding one that is set already does nothing.
    pub fn add_hw_breakpoint(&self, cpu: &VcpuCore, vaddr: u64, owner: Owner) -> Result<()> {
        self.check_open()?;
        check_host()?;
        cpu.translate(vaddr)?;
        // The watchpoints' lock first, as `add_watch` holds it while it counts these.
        let watches = lock(&self.watches);
        let mut list = lock(&self.hw_breakpoints);
        let new = HwBreakpoint { vaddr, owner };
        if list.contains(&new) {
            return Ok(());
        }
        check_slots(list.len(), dr_watches(watches.len())?)?;
        list.push(new);
        self.hw_count
            .store(list.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Removes `owner`'s hardware breakpoint at `vaddr`; false if there is none.
    pub fn remove_hw_breakpoint(&self, vaddr: u64, owner: Owner) -> bool {
        let mut list = lock(&self.hw_breakpoints);
        let before = list.len();
        list.retain(|b| *b != HwBreakpoint { vaddr, owner });
        self.hw_count
            .store(list.len(), std::sync::atomic::Ordering::SeqCst);
        list.len() != before
    }

    /// The addresses of `owner`'s hardware breakpoints.
    pub fn hw_breakpoints_of(&self, owner: Owner) -> Vec<u64> {
        lock(&self.hw_breakpoints)
            .iter()
            .filter(|b| b.owner == owner)
            .map(|b| b.vaddr)
            .collect()
    }

    /// The addresses vCPU `vcpu` has hardware breakpoints at (for its debug registers).
    pub(crate) fn hw_breakpoints_for(&self, vcpu: u64) -> Vec<u64> {
        let mut out: Vec<u64> = lock(&self.hw_breakpoints)
            .iter()
            .filter(|b| b.applies_to(vcpu))
            .map(|b| b.vaddr)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Who vCPU `vcpu`'s hit of a hardware breakpoint at `vaddr` is reported to.
    pub(crate) fn hw_audience(&self, vaddr: u64, vcpu: u64) -> Audience {
        let list = lock(&self.hw_breakpoints);
        let at = |o: &dyn Fn(Owner) -> bool| {
            list.iter()
                .any(|b| b.vaddr == vaddr && b.applies_to(vcpu) && o(b.owner))
        };
        Audience {
            python: at(&|o| o != Owner::Gdb),
            gdb: at(&|o| o == Owner::Gdb),
        }
    }
}

impl VcpuCore {
    /// A run that resumes where a hardware breakpoint stopped the vCPU sets RFLAGS.RF:
    /// the CPU then skips instruction breakpoints for one instruction (see
    /// `hw_breakpoints`).
    pub(crate) fn resume_past_hw_breakpoint(&self, fd: &mut VcpuFd, st: &DebugState) -> Result<()> {
        let Some(at) = st.resume_from.filter(|a| st.execs.contains(a)) else {
            return Ok(());
        };
        if self.read_regs(fd)?.rip == at {
            self.update_regs(fd, |r| r.rflags |= RF)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hosts_that_deliver_and_intercept_have_them() {
        assert!(refusal(true, true).is_none());
        let Some(Error::Unsupported(m)) = refusal(false, true) else {
            panic!("refused")
        };
        assert!(m.contains("did not fire in the probe guest"), "{m}");
        let Some(Error::Unsupported(m)) = refusal(true, false) else {
            panic!("refused")
        };
        assert!(m.contains("exception stubs"), "{m}");
    }

    #[test]
    fn breakpoints_and_watchpoints_share_four_slots() {
        assert!(check_slots(0, 0).is_ok());
        assert!(check_slots(3, 0).is_ok());
        assert!(check_slots(1, 2).is_ok());
        for (b, w) in [(4, 0), (2, 2), (0, 4), (1, 3)] {
            let Err(Error::Value(m)) = check_slots(b, w) else {
                panic!("a fifth user of DR0-DR3 with {b} + {w}")
            };
            assert!(m.contains("share DR0-DR3"), "{m}");
        }
    }

    #[test]
    fn dr6_names_the_execute_slot_after_the_watchpoints() {
        // Two watchpoints in DR0-DR1, execute breakpoints in DR2-DR3.
        let execs = [0x1000, 0x2000];
        assert_eq!(exec_hit(0b0100, 2, &execs), Some(0x1000));
        assert_eq!(exec_hit(0b1000, 2, &execs), Some(0x2000));
        assert_eq!(exec_hit(0b0001, 2, &execs), None, "a watchpoint's slot");
        assert_eq!(exec_hit(1 << 14, 2, &execs), None, "a single step (BS)");
        assert_eq!(exec_hit(0b0001, 0, &execs), Some(0x1000));
    }

    #[test]
    fn a_breakpoint_applies_to_its_vcpu_the_vm_and_gdb() {
        let own = HwBreakpoint {
            vaddr: 1,
            owner: Owner::Vcpu(2),
        };
        assert!(own.applies_to(2) && !own.applies_to(0));
        for owner in [Owner::Vm, Owner::Gdb] {
            assert!(HwBreakpoint { vaddr: 1, owner }.applies_to(7));
        }
    }
}
