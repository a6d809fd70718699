//! Completing the access KVM holds after an I/O or MMIO exit. The KVM API wants a
//! `KVM_RUN` with `immediate_exit` set before a vCPU's state is read or replaced; on a
//! nested host that costs as much as an exit (about 7 µs here).
//!
//! One case is left to the next entry instead: a run that a device ended on a single
//! port write (the exit port of a fuzzing loop), in a VM with a snapshot. What KVM may
//! still hold for a port write is harmless to a restore that moves RIP: the fast path
//! (`complete_fast_pio_out`) skips the OUT only if the linear RIP is still the one of the
//! exit, and the instruction emulator finishes an OUT before it exits. So a restore to
//! another RIP needs no completion, and any other use of the vCPU's state completes it
//! first (`complete_deferred`).
//!
//! Linux's `arch/x86/kvm/x86.c`: `kvm_fast_pio_out` records `kvm_get_linear_rip()` when
//! it exits to userspace (in `cui_linear_rip`; `pio.linear_rip` in older kernels),
//! and `complete_fast_pio_out` returns without `kvm_skip_emulated_instruction` unless
//! `kvm_is_linear_rip()` still matches it; tests/test_snapshot.py checks it on the host
//! (a restore to the instructions before the OUT runs them all again).

use std::sync::atomic::Ordering;

use kvm_bindings::kvm_sregs;
use kvm_ioctls::VcpuFd;

use crate::engine::kick;
use crate::engine::vcpu::VcpuCore;

/// The linear RIP as KVM compares it: RIP in 64-bit mode, else CS base + EIP.
pub fn linear_rip(sregs: &kvm_sregs, rip: u64) -> u64 {
    let long_mode = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0;
    if long_mode {
        rip
    } else {
        u64::from(sregs.cs.base.wrapping_add(rip) as u32)
    }
}

impl VcpuCore {
    /// Re-enters the guest with `immediate_exit` set so KVM completes a pending I/O or MMIO
    /// access.
    pub(crate) fn complete_io(&self, fd: &mut VcpuFd) {
        kick::set_immediate_exit(fd, 1);
        // Expected to fail with EINTR once the pending access is completed.
        let _ = fd.run();
        // A kick that reached this thread meanwhile (its handler set the flag too) is
        // left for the run loop, which clears the flag only where it then looks at what
        // the kick was for. Cleared first: a kick that lands after the check sets it
        // again itself.
        kick::set_immediate_exit(fd, 0);
        if kick::kicked() {
            kick::set_immediate_exit(fd, 1);
        }
        self.note_exit(fd, false);
    }

    /// Completes an access KVM holds, if any (before a snapshot).
    pub(crate) fn complete_pending_io(&self, fd: &mut VcpuFd) {
        if self.io_pending.load(Ordering::Relaxed) {
            self.complete_io(fd);
        }
    }

    /// Completes an access a run left to the next entry, before the state is used.
    pub(crate) fn complete_deferred(&self, fd: &mut VcpuFd) {
        if self.deferred.load(Ordering::Relaxed) {
            self.complete_io(fd);
        }
    }

    /// Ends a run on an access a device handled: completes it, or, in a VM with a
    /// snapshot, leaves a single port write to the next entry (see the module).
    pub(crate) fn finish_handled(&self, fd: &mut VcpuFd, single_out: bool) {
        if single_out && self.state_sync.load(Ordering::Relaxed) {
            let s = fd.sync_regs_mut();
            let rip = linear_rip(&s.sregs, s.regs.rip);
            self.deferred_rip.store(rip, Ordering::Relaxed);
            self.deferred.store(true, Ordering::Relaxed);
            return;
        }
        self.complete_io(fd);
    }

    /// Before a restore to a state at `rip`: a port write left to the next entry can stay
    /// when the restore moves RIP; everything else is completed first.
    pub(crate) fn settle_for_restore(&self, fd: &mut VcpuFd, sregs: &kvm_sregs, rip: u64) {
        let moved = self.deferred.load(Ordering::Relaxed)
            && self.deferred_rip.load(Ordering::Relaxed) != linear_rip(sregs, rip);
        if moved {
            self.deferred.store(false, Ordering::Relaxed);
        } else {
            self.complete_pending_io(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_rip_adds_the_code_base_outside_64_bit_mode() {
        let mut s = kvm_sregs::default();
        s.cs.base = 0x1_0000;
        assert_eq!(linear_rip(&s, 0x20), 0x1_0020);
        s.efer = 1 << 10;
        s.cs.l = 1;
        assert_eq!(linear_rip(&s, 0x20), 0x20);
        s.cs.l = 0;
        s.cs.base = 0xffff_fff0;
        assert_eq!(linear_rip(&s, 0x20), 0x10);
    }
}
