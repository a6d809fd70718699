//! Watchpoints through the debug registers (DR0-DR3, DR7), on hosts whose KVM delivers
//! their traps as `KVM_EXIT_DEBUG` (the probe in `debug_host` says; bare-metal KVM does):
//! the run loop gives KVM the watchpoints of the vCPU with `KVM_GUESTDBG_USE_HW_BP` at
//! each entry and turns a data breakpoint's debug exit into the same `watchpoint` exit as
//! the page watchpoints of `watch`. `KVMPY_WATCH_MECHANISM=memslot` picks the page
//! watchpoints there instead (so both can be tested on one host).

use crate::engine::debug_host::{host, mechanism, Mechanism};
use crate::engine::error::{Error, Result};
use crate::engine::watch::{Watch, WatchHit, WatchKind};

/// The environment variable that picks the watchpoint mechanism: `memslot` or
/// `debug-registers`.
pub const WATCH_ENV: &str = "KVMPY_WATCH_MECHANISM";

/// How watchpoints work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchMechanism {
    /// By guest-physical page (see `watch`).
    Memslot,
    /// DR0-DR3 through `KVM_GUESTDBG_USE_HW_BP`.
    DebugRegisters,
}

impl WatchMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchMechanism::Memslot => "memslot",
            WatchMechanism::DebugRegisters => "debug-registers",
        }
    }
}

/// The mechanism for a host where KVM delivers debug-register watchpoints (`delivers`:
/// the probe found they fire and breakpoints and steps go through `KVM_EXIT_DEBUG`) and
/// `wanted` (the environment variable) asks for one.
pub fn pick(delivers: bool, wanted: Option<&str>) -> Result<WatchMechanism> {
    match wanted.unwrap_or("") {
        "" => Ok(if delivers {
            WatchMechanism::DebugRegisters
        } else {
            WatchMechanism::Memslot
        }),
        "memslot" => Ok(WatchMechanism::Memslot),
        "debug-registers" if delivers => Ok(WatchMechanism::DebugRegisters),
        "debug-registers" => Err(Error::Unsupported(format!(
            "{WATCH_ENV}=debug-registers: this host's KVM does not deliver debug-register \
             watchpoints (a DR7 write watchpoint did not fire in the probe guest, or \
             breakpoints and steps do not go through KVM_EXIT_DEBUG: see `python -m kvmpy \
             info`)"
        ))),
        other => Err(Error::Value(format!(
            "{WATCH_ENV}={other:?}: use \"memslot\" or \"debug-registers\""
        ))),
    }
}

/// This host's watchpoint mechanism (the probe's answer and `KVMPY_WATCH_MECHANISM`).
/// Chosen once per process, as the debug mechanism is.
pub fn watch_mechanism() -> Result<WatchMechanism> {
    static CHOSEN: std::sync::OnceLock<std::result::Result<WatchMechanism, Error>> =
        std::sync::OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        let delivers = host()?.watchpoints && mechanism()? == Mechanism::Intercept;
        pick(delivers, std::env::var(WATCH_ENV).ok().as_deref())
    });
    match chosen {
        Ok(m) => Ok(*m),
        Err(Error::Unsupported(m)) => Err(Error::Unsupported(m.clone())),
        Err(e) => Err(Error::Value(e.to_string())),
    }
}

/// DR0-DR3 and DR7 (index 7) for `watches` (at most 4): local enable, R/W (01 write, 11
/// read or write) and LEN (00 1 byte, 01 2, 11 4, 10 8) of each.
pub fn registers(watches: &[Watch]) -> [u64; 8] {
    registers_with(watches, &[])
}

/// [`registers`] for `watches` in the first slots, then the execute breakpoints `execs`
/// (R/W 00, LEN 00: an instruction fetch at the address), four slots in all.
pub fn registers_with(watches: &[Watch], execs: &[u64]) -> [u64; 8] {
    let mut regs = [0u64; 8];
    for (i, w) in watches.iter().take(4).enumerate() {
        regs[i] = w.vaddr;
        let rw: u64 = match w.kind {
            WatchKind::Write => 0b01,
            WatchKind::Read | WatchKind::ReadWrite => 0b11,
        };
        let len: u64 = match w.len {
            1 => 0b00,
            2 => 0b01,
            8 => 0b10,
            _ => 0b11,
        };
        regs[7] |= 1 << (2 * i) | rw << (16 + 4 * i) | len << (18 + 4 * i);
    }
    let first = watches.len().min(4);
    for (i, addr) in (first..4).zip(execs) {
        regs[i] = *addr;
        regs[7] |= 1 << (2 * i);
    }
    regs
}

/// The watchpoint hit that DR6 `dr6` reports among `armed` (the watchpoints and their
/// values when the guest was entered), with the value it has now (`value`).
pub fn hit(
    dr6: u64,
    armed: &[(Watch, u64)],
    value: impl Fn(&Watch) -> Result<u64>,
) -> Result<Option<WatchHit>> {
    let Some((w, old)) = (0..4)
        .find(|i| dr6 & (1 << i) != 0)
        .and_then(|i| armed.get(i))
    else {
        return Ok(None);
    };
    let new = value(w)?;
    Ok(Some(WatchHit {
        watch: *w,
        // The debug registers say which watchpoint, not the access itself.
        access: w.gpa,
        size: w.len as u8,
        is_write: w.kind == WatchKind::Write || new != *old,
        old: *old,
        new,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(vaddr: u64, len: u64, kind: WatchKind) -> Watch {
        Watch {
            vaddr,
            gpa: vaddr,
            len,
            kind,
            owner: None,
        }
    }

    #[test]
    fn dr7_encodes_each_watchpoint() {
        let regs = registers(&[
            watch(0x1000, 1, WatchKind::Write),
            watch(0x2008, 8, WatchKind::ReadWrite),
        ]);
        assert_eq!((regs[0], regs[1], regs[2]), (0x1000, 0x2008, 0));
        // L0, R/W0 = 01, LEN0 = 00; L1, R/W1 = 11, LEN1 = 10.
        assert_eq!(regs[7], 1 | 1 << 16 | 1 << 2 | 0b11 << 20 | 0b10 << 22);
        assert_eq!(registers(&[])[7], 0);
        assert_eq!(
            registers(&[watch(0x10, 4, WatchKind::Write)])[7],
            1 | 1 << 16 | 0b11 << 18
        );
    }

    #[test]
    fn dr7_encodes_execute_breakpoints_after_the_watchpoints() {
        let regs = registers_with(&[watch(0x3000, 2, WatchKind::Write)], &[0x401000, 0x402000]);
        assert_eq!(&regs[..4], &[0x3000, 0x401000, 0x402000, 0]);
        // L0 with R/W0 = 01, LEN0 = 01; L1 and L2 with R/W and LEN 00 (execute, 1 byte).
        assert_eq!(regs[7], 1 | 1 << 16 | 0b01 << 18 | 1 << 2 | 1 << 4);
        let only = registers_with(&[], &[0x10]);
        assert_eq!((only[0], only[7]), (0x10, 1));
        // No slot beyond DR3.
        let full = registers_with(&[], &[1, 2, 3, 4, 5]);
        assert_eq!((&full[..4], full[7]), (&[1, 2, 3, 4][..], 0b0101_0101));
        assert_eq!(registers_with(&[], &[]), [0; 8]);
    }

    #[test]
    fn dr6_names_the_watchpoint_hit() {
        let armed = [
            (watch(0x1000, 1, WatchKind::Write), 5),
            (watch(0x2000, 4, WatchKind::ReadWrite), 7),
        ];
        let h = hit(0b10, &armed, |_| Ok(7)).unwrap().unwrap();
        assert_eq!(
            (h.watch.vaddr, h.old, h.new, h.is_write),
            (0x2000, 7, 7, false)
        );
        let h = hit(0b01, &armed, |_| Ok(6)).unwrap().unwrap();
        assert_eq!(
            (h.watch.vaddr, h.old, h.new, h.is_write),
            (0x1000, 5, 6, true)
        );
        assert!(
            hit(1 << 14, &armed, |_| Ok(0)).unwrap().is_none(),
            "a single step"
        );
    }

    #[test]
    fn the_mechanism_follows_the_probe_and_the_variable() {
        assert_eq!(pick(false, None).unwrap(), WatchMechanism::Memslot);
        assert_eq!(pick(true, None).unwrap(), WatchMechanism::DebugRegisters);
        assert_eq!(
            pick(true, Some("memslot")).unwrap(),
            WatchMechanism::Memslot
        );
        assert!(matches!(
            pick(false, Some("debug-registers")),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(pick(true, Some("dr")), Err(Error::Value(_))));
    }
}
