//! What this host's KVM intercepts for guest debugging (probed once per process in a small
//! test VM), and the mechanism that follows: `KVM_EXIT_DEBUG`, or kvmpy's exception stubs.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};
use kvm_ioctls::VcpuFd;

use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::run::{Outcome, RunOptions};
use crate::engine::setup::LongMode;
use crate::engine::vm::{RegionOptions, VmCore};

/// What this host's KVM intercepts, as probed in a small test VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostDebug {
    /// `int3` with `KVM_GUESTDBG_USE_SW_BP` ends `KVM_RUN` with `KVM_EXIT_DEBUG`.
    pub sw_breakpoints: bool,
    /// `KVM_GUESTDBG_SINGLESTEP` ends `KVM_RUN` after one instruction.
    pub single_step: bool,
    /// A DR0 execute breakpoint with `KVM_GUESTDBG_USE_HW_BP` ends `KVM_RUN`.
    pub hw_breakpoints: bool,
    /// A DR0 write watchpoint with `KVM_GUESTDBG_USE_HW_BP` ends `KVM_RUN`.
    pub watchpoints: bool,
}

/// How breakpoints and steps reach kvmpy on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `KVM_EXIT_DEBUG`.
    Intercept,
    /// #BP/#DB through kvmpy's exception stubs.
    ExceptionStubs,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Intercept => "kvm",
            Mechanism::ExceptionStubs => "exception-stubs",
        }
    }

    /// The mechanism for a host: KVM's only where it intercepts both `int3` and single
    /// steps (a breakpoint cannot be stepped over otherwise).
    pub fn for_host(host: &HostDebug) -> Mechanism {
        if host.sw_breakpoints && host.single_step {
            Mechanism::Intercept
        } else {
            Mechanism::ExceptionStubs
        }
    }
}

static HOST: OnceLock<std::result::Result<HostDebug, String>> = OnceLock::new();

/// What this host's KVM intercepts (probed on the first call, then cached).
pub fn host() -> Result<HostDebug> {
    HOST.get_or_init(|| probe().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Refused(format!("probing guest debugging failed: {e}")))
}

/// The environment variable that picks a mechanism instead of the probe's choice
/// (`kvm` or `exception-stubs`), so that a host that intercepts can test both paths.
pub const MECHANISM_ENV: &str = "KVMPY_DEBUG_MECHANISM";

/// The mechanism this host uses: the probe's choice, or the one `KVMPY_DEBUG_MECHANISM`
/// names (`kvm` where the host does not intercept is refused).
pub fn mechanism() -> Result<Mechanism> {
    static CHOSEN: OnceLock<std::result::Result<Mechanism, Error>> = OnceLock::new();
    let host = host()?;
    match CHOSEN.get_or_init(|| chosen(&host, std::env::var(MECHANISM_ENV).ok().as_deref())) {
        Ok(m) => Ok(*m),
        Err(Error::Unsupported(m)) => Err(Error::Unsupported(m.clone())),
        Err(e) => Err(Error::Value(e.to_string())),
    }
}

fn chosen(host: &HostDebug, wanted: Option<&str>) -> Result<Mechanism> {
    match wanted {
        None | Some("") => Ok(Mechanism::for_host(host)),
        Some("exception-stubs") => Ok(Mechanism::ExceptionStubs),
        Some("kvm") if Mechanism::for_host(host) == Mechanism::Intercept => {
            Ok(Mechanism::Intercept)
        }
        Some("kvm") => Err(Error::Unsupported(format!(
            "{MECHANISM_ENV}=kvm, but this host's KVM does not intercept int3 and single \
             steps (see `python -m kvmpy info`)"
        ))),
        Some(other) => Err(Error::Value(format!(
            "{MECHANISM_ENV} must be \"kvm\" or \"exception-stubs\", not {other:?}"
        ))),
    }
}

const PROBE_CODE: u64 = 0x10000;
const PROBE_DATA: u64 = 0x20000;

/// Runs the probe guest: each test starts fresh in 64-bit user mode with exception
/// stubs and ends with `out 0xf4, al` unless KVM stops it first.
fn probe() -> Result<HostDebug> {
    let vm = VmCore::new(false, false)?;
    let result = probe_in(&vm);
    vm.shutdown();
    result
}

fn probe_in(vm: &std::sync::Arc<VmCore>) -> Result<HostDebug> {
    vm.add_memory(0, 2 << 20, RegionOptions::default())?;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xcc, 0xe6, 0xf4, 0x90,                               // 0x00: int3; out 0xf4, al
        0x90, 0x90, 0xe6, 0xf4,                               // 0x04: nop; nop; out
        0xc6, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00, 0x01,       // 0x08: mov byte [0x20000], 1
        0x90, 0xe6, 0xf4,                                     // 0x10: nop; out
    ];
    vm.write_memory(PROBE_CODE, code)?;
    let cpu = vm.create_vcpu(None)?;
    let mode = LongMode::user_mode(true);
    let trial = |rip: u64, flags: u32, dr0: u64, dr7: u64| -> Result<Option<u32>> {
        cpu.setup_long_mode(mode)?;
        cpu.with_fd(|fd| {
            cpu.update_regs(fd, |r| r.rip = rip)?;
            set_guest_debug(fd, flags, dr0, dr7)
        })?;
        let options = RunOptions {
            deadline: Some(Instant::now() + Duration::from_secs(2)),
            on_signal: None,
        };
        let outcome = cpu.run(&options);
        cpu.with_fd(|fd| set_guest_debug(fd, 0, 0, 0))?;
        match outcome {
            Outcome::Exit(Exit::Debug { exception, .. }) => Ok(Some(exception)),
            Outcome::Error(e) => Err(e),
            _ => Ok(None),
        }
    };
    let enable = KVM_GUESTDBG_ENABLE;
    let hw = enable | KVM_GUESTDBG_USE_HW_BP;
    Ok(HostDebug {
        sw_breakpoints: trial(PROBE_CODE, enable | KVM_GUESTDBG_USE_SW_BP, 0, 0)? == Some(3),
        single_step: trial(PROBE_CODE + 4, enable | KVM_GUESTDBG_SINGLESTEP, 0, 0)? == Some(1),
        // DR7: L0, and for the watchpoint R/W0 = 01 (write), LEN0 = 00 (1 byte).
        hw_breakpoints: trial(PROBE_CODE + 4, hw, PROBE_CODE + 5, 1)? == Some(1),
        watchpoints: trial(PROBE_CODE + 8, hw, PROBE_DATA, 1 | 1 << 16)? == Some(1),
    })
}

/// The guest debug flags this host's KVM supports (`KVM_CAP_SET_GUEST_DEBUG2`; 0 where
/// it does not say), asked once.
pub fn supported_flags() -> u32 {
    static FLAGS: OnceLock<u32> = OnceLock::new();
    *FLAGS.get_or_init(|| {
        crate::engine::kvm::shared().map_or(0, |kvm| {
            kvm.check_extension_raw(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2.into())
                .max(0) as u32
        })
    })
}

/// `KVM_GUESTDBG_BLOCKIRQ` where KVM offers it (interrupts held off during a single
/// step, so a step does not land in an interrupt handler), else 0.
pub fn block_irq() -> u32 {
    supported_flags() & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ
}

/// `KVM_SET_GUEST_DEBUG` with DR0 and DR7 (the other debug registers zero).
pub(crate) fn set_guest_debug(fd: &VcpuFd, control: u32, dr0: u64, dr7: u64) -> Result<()> {
    let mut regs = [0u64; 8];
    regs[0] = dr0;
    regs[7] = dr7;
    set_guest_debug_regs(fd, control, &regs)
}

/// `KVM_SET_GUEST_DEBUG` with the debug registers `regs` (DR0-DR3, DR7 at index 7); with
/// DR7 set, the debug registers are used (`KVM_GUESTDBG_USE_HW_BP`).
pub(crate) fn set_guest_debug_regs(fd: &VcpuFd, control: u32, regs: &[u64; 8]) -> Result<()> {
    let control = if regs[7] != 0 {
        control | KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP
    } else {
        control
    };
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg = *regs;
    fd.set_guest_debug(&dbg)
        .map_err(|e| Error::ioctl("KVM_SET_GUEST_DEBUG", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_used_only_where_it_intercepts_both_int3_and_steps() {
        let all = HostDebug {
            sw_breakpoints: true,
            single_step: true,
            hw_breakpoints: true,
            watchpoints: true,
        };
        assert_eq!(Mechanism::for_host(&all), Mechanism::Intercept);
        let no_step = HostDebug {
            single_step: false,
            ..all
        };
        assert_eq!(Mechanism::for_host(&no_step), Mechanism::ExceptionStubs);
        assert_eq!(
            Mechanism::for_host(&HostDebug::default()),
            Mechanism::ExceptionStubs
        );
        assert_eq!(Mechanism::ExceptionStubs.as_str(), "exception-stubs");
        let none = HostDebug::default();
        assert_eq!(chosen(&all, None).unwrap(), Mechanism::Intercept);
        assert_eq!(
            chosen(&all, Some("exception-stubs")).unwrap(),
            Mechanism::ExceptionStubs
        );
        assert_eq!(chosen(&all, Some("kvm")).unwrap(), Mechanism::Intercept);
        assert!(matches!(
            chosen(&none, Some("kvm")),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(chosen(&none, Some("gdb")), Err(Error::Value(_))));
    }
}
