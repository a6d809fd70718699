//! The ONE place where a `KVM_RUN` result becomes an owned [`Exit`]. Every exit kind is
//! defined here once: [`Reason::ALL`] lists them, and the face's exit classes and
//! `kvmpy.ExitReason` are checked against that list.

use kvm_bindings::{kvm_run, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_IO, KVM_EXIT_MMIO};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::errno;

/// Data of one port or MMIO access, stored inline: no allocation per exit.
#[derive(Clone, Copy, Default)]
pub struct Data {
    buf: [u8; 8],
    len: u8,
}

impl Data {
    pub fn new(bytes: &[u8]) -> Self {
        let mut buf = [0; 8];
        // The sizes accesses have get fixed-size copies (no call to memcpy on the exit path).
        match bytes.len() {
            1 => buf[0] = bytes[0],
            2 => buf[..2].copy_from_slice(&bytes[..2]),
            4 => buf[..4].copy_from_slice(&bytes[..4]),
            n => {
                let n = n.min(8);
                buf[..n].copy_from_slice(&bytes[..n]);
            }
        }
        Data {
            buf,
            len: bytes.len().min(8) as u8,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len as usize]
    }

    /// Sets the length (at most 8), keeping the bytes.
    pub fn set_len(&mut self, len: u8) {
        self.len = len.min(8);
    }

    /// The bytes as a little-endian unsigned integer.
    pub fn value(&self) -> u64 {
        u64::from_le_bytes(self.buf)
    }
}

/// Why `run()` returned or a handler was called; compares equal to its str value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Io,
    Mmio,
    Hlt,
    Shutdown,
    Exit,
    Timeout,
    Stopped,
    FailEntry,
    InternalError,
    SystemEvent,
    Debug,
    Exception,
    Breakpoint,
    Step,
    Watchpoint,
    Unknown,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 16] = [
        Reason::Io,
        Reason::Mmio,
        Reason::Hlt,
        Reason::Shutdown,
        Reason::Exit,
        Reason::Timeout,
        Reason::Stopped,
        Reason::FailEntry,
        Reason::InternalError,
        Reason::SystemEvent,
        Reason::Debug,
        Reason::Exception,
        Reason::Breakpoint,
        Reason::Step,
        Reason::Watchpoint,
        Reason::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Io => "io",
            Reason::Mmio => "mmio",
            Reason::Hlt => "hlt",
            Reason::Shutdown => "shutdown",
            Reason::Exit => "exit",
            Reason::Timeout => "timeout",
            Reason::Stopped => "stopped",
            Reason::FailEntry => "fail_entry",
            Reason::InternalError => "internal_error",
            Reason::SystemEvent => "system_event",
            Reason::Debug => "debug",
            Reason::Exception => "exception",
            Reason::Breakpoint => "breakpoint",
            Reason::Step => "step",
            Reason::Watchpoint => "watchpoint",
            Reason::Unknown => "unknown",
        }
    }
}

/// An exit of `KVM_RUN`, owned (it no longer borrows the `kvm_run` area).
///
/// String port I/O (`rep outsb`/`rep insb`) is split into one `Io` per element before it
/// gets here, so `data` always holds a single access of at most 8 bytes.
#[derive(Clone)]
pub enum Exit {
    /// Port I/O; for an IN, `data` is empty until a handler answers. `count` is the
    /// element count of string I/O (`rep insb`/`outsb`), 1 otherwise.
    Io {
        port: u16,
        size: u8,
        count: u32,
        is_write: bool,
        data: Data,
    },
    /// An access to guest physical memory that no memory slot backs (or a write to a
    /// read-only slot).
    Mmio {
        addr: u64,
        size: u8,
        is_write: bool,
        data: Data,
    },
    Hlt,
    Shutdown,
    FailEntry {
        hardware_reason: u64,
        cpu: u32,
    },
    /// KVM_EXIT_INTERNAL_ERROR; `place` is where the vCPU was (read when the exit
    /// happened: it is rare, and its message needs the instruction's mode).
    InternalError {
        suberror: u32,
        data: Vec<u64>,
        place: crate::engine::internal_error::Place,
    },
    SystemEvent {
        kind: u32,
        data: Vec<u64>,
    },
    Debug {
        exception: u32,
        pc: u64,
        dr6: u64,
        dr7: u64,
    },
    /// The guest wrote `code` to an exit port.
    Guest {
        port: u16,
        code: u64,
    },
    /// A CPU exception reported by the IDT stubs of `setup_long_mode(exceptions=True)`.
    Exception {
        vector: u64,
        error_code: u64,
        rip: u64,
        cs: u64,
        rflags: u64,
        rsp: u64,
        cr2: u64,
    },
    /// A breakpoint of kvmpy's at guest-virtual `address` (RIP is there).
    Breakpoint {
        address: u64,
    },
    /// A single step ended at `rip`.
    Step {
        rip: u64,
    },
    /// An access hit a watchpoint (see `watch`); RIP is past the instruction (or still
    /// at a `rep` string instruction that has iterations left).
    Watchpoint(Box<crate::engine::watch::WatchHit>, u64),
    Timeout,
    Stopped,
    /// KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now. Handled by the run
    /// loop (it injects the queued interrupt), never shown to Python.
    IrqWindowOpen,
    /// An exit kvmpy has no special support for; `raw` is `KVM_EXIT_*`.
    Unknown {
        raw: u32,
    },
}

impl Exit {
    pub fn reason(&self) -> Reason {
        match self {
            Exit::Io { .. } => Reason::Io,
            Exit::Mmio { .. } => Reason::Mmio,
            Exit::Hlt => Reason::Hlt,
            Exit::Shutdown => Reason::Shutdown,
            Exit::FailEntry { .. } => Reason::FailEntry,
            Exit::InternalError { .. } => Reason::InternalError,
            Exit::SystemEvent { .. } => Reason::SystemEvent,
            Exit::Debug { .. } => Reason::Debug,
            Exit::Guest { .. } => Reason::Exit,
            Exit::Exception { .. } => Reason::Exception,
            Exit::Breakpoint { .. } => Reason::Breakpoint,
            Exit::Step { .. } => Reason::Step,
            Exit::Watchpoint(..) => Reason::Watchpoint,
            Exit::Timeout => Reason::Timeout,
            Exit::Stopped => Reason::Stopped,
            Exit::IrqWindowOpen | Exit::Unknown { .. } => Reason::Unknown,
        }
    }
}

/// Where the data of a port I/O exit lives in `kvm_run`, to walk string I/O element by
/// element. Made only by [`run_once`], which checks that the data lies inside the
/// `kvm_run` area, so [`io_element`] never reads outside it.
#[derive(Clone, Copy, Debug)]
pub struct IoRaw {
    pub port: u16,
    pub size: u8,
    pub count: u32,
    pub is_write: bool,
    data_offset: usize,
}

/// The I/O data of an exit lies in the page after `kvm_run` itself
/// (`KVM_PIO_PAGE_OFFSET`), at most one page of it.
const IO_DATA_END: usize = 2 * 4096;

/// What one `KVM_RUN` produced.
pub enum RunExit {
    /// Port I/O: handled per element by the caller (see [`IoRaw`]).
    Io(IoRaw),
    Other(Exit),
}

/// What [`run_once`] finishes after the exit's borrow of the vCPU has ended.
enum Later {
    Io,
    Internal,
    Raw,
}

/// Runs `KVM_RUN` once and converts its result into an owned value: the only `match`
/// over [`VcpuExit`] in the crate. Port I/O, the hot case, is tested first; the other
/// kinds are converted out of line.
pub fn run_once(vcpu: &mut VcpuFd) -> Result<RunExit, errno::Error> {
    // Matched in place (no `?`): the result is not copied on the hot path.
    let later = match vcpu.run() {
        Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => Later::Io,
        Ok(other) => match convert(other) {
            Ok(exit) => return Ok(RunExit::Other(exit)),
            Err(later) => later,
        },
        Err(e) => return Err(e),
    };
    // The arms above cannot touch `vcpu` while the exit borrows it; finish those here.
    Ok(match later {
        Later::Io => match io_raw(vcpu.get_kvm_run()) {
            Some(io) => RunExit::Io(io),
            None => RunExit::Other(Exit::Unknown { raw: KVM_EXIT_IO }),
        },
        Later::Internal => RunExit::Other(internal_error(vcpu)),
        Later::Raw => RunExit::Other(Exit::Unknown {
            raw: vcpu.get_kvm_run().exit_reason,
        }),
    })
}

/// Every exit but port I/O, or what `run_once` must finish with the vCPU in hand.
#[cold]
#[inline(never)]
fn convert(exit: VcpuExit<'_>) -> Result<Exit, Later> {
    match exit {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => Err(Later::Io),
        VcpuExit::MmioRead(addr, data) => Ok(Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: false,
            data: Data::default(),
        }),
        VcpuExit::MmioWrite(addr, data) => Ok(Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: true,
            data: Data::new(data),
        }),
        VcpuExit::Hlt => Ok(Exit::Hlt),
        VcpuExit::IrqWindowOpen => Ok(Exit::IrqWindowOpen),
        VcpuExit::Shutdown => Ok(Exit::Shutdown),
        VcpuExit::FailEntry(hardware_reason, cpu) => Ok(Exit::FailEntry {
            hardware_reason,
            cpu,
        }),
        VcpuExit::InternalError => Err(Later::Internal),
        VcpuExit::SystemEvent(kind, data) => Ok(Exit::SystemEvent {
            kind,
            data: data.to_vec(),
        }),
        VcpuExit::Debug(arch) => Ok(Exit::Debug {
            exception: arch.exception,
            pc: arch.pc,
            dr6: arch.dr6,
            dr7: arch.dr7,
        }),
        VcpuExit::Unsupported(raw) => Ok(Exit::Unknown { raw }),
        _ => Err(Later::Raw),
    }
}

/// The I/O exit in `run`, or None if KVM reported one whose data is not where the API
/// says (never seen; checked so that no later access can leave the `kvm_run` area).
fn io_raw(run: &kvm_run) -> Option<IoRaw> {
    if run.exit_reason != KVM_EXIT_IO {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_IO (checked above), so `io` is the active member of
    // the union.
    let io = unsafe { run.__bindgen_anon_1.io };
    let data_offset = usize::try_from(io.data_offset).ok()?;
    let len = (io.count as usize).checked_mul(io.size as usize)?;
    let valid = matches!(io.size, 1 | 2 | 4)
        && io.count >= 1
        && data_offset >= std::mem::size_of::<kvm_run>()
        && data_offset.checked_add(len)? <= IO_DATA_END;
    valid.then_some(IoRaw {
        port: io.port,
        size: io.size,
        count: io.count,
        is_write: u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT,
        data_offset,
    })
}

#[cold]
#[inline(never)]
fn internal_error(vcpu: &mut VcpuFd) -> Exit {
    let run = vcpu.get_kvm_run();
    debug_assert_eq!(run.exit_reason, KVM_EXIT_INTERNAL_ERROR);
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let place = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => crate::engine::internal_error::Place::of(&regs, &sregs),
        _ => Default::default(),
    };
    Exit::InternalError {
        suberror: internal.suberror,
        data: internal.data[..n].to_vec(),
        place,
    }
}

/// The bytes of element `index` (< `io.count`, else the last one) of the port I/O exit `io`,
/// which must be the vCPU's current exit (not re-entered since).
pub fn io_element(vcpu: &mut VcpuFd, io: IoRaw, index: u32) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    debug_assert_eq!(run.exit_reason, KVM_EXIT_IO, "io_element on a non-I/O exit");
    let index = index.min(io.count - 1) as usize;
    let start = io.data_offset + index * io.size as usize;
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: `io` was made by `io_raw`, which checked that its `count * size` data bytes
    // at `data_offset` lie inside the first two pages of the kvm_run mapping (the kvm_run
    // page and KVM's I/O data page, both always mapped); index < count, so the element is
    // inside that range; the returned borrow is tied to `vcpu`, which owns the mapping.
    unsafe { std::slice::from_raw_parts_mut(base.add(start), io.size as usize) }
}

/// The data buffer of the current MMIO exit.
pub fn mmio_data(vcpu: &mut VcpuFd) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    debug_assert_eq!(
        run.exit_reason, KVM_EXIT_MMIO,
        "mmio_data on a non-MMIO exit"
    );
    // SAFETY: exit_reason is KVM_EXIT_MMIO (the caller got an MMIO exit and has not
    // re-entered the guest), so `mmio` is the active member.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    &mut mmio.data[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_little_endian_and_bounded() {
        let d = Data::new(&[0x34, 0x12]);
        assert_eq!((d.as_slice(), d.value()), (&[0x34u8, 0x12][..], 0x1234));
        assert_eq!(Data::new(&[1; 12]).as_slice().len(), 8);
        assert_eq!(Exit::Timeout.reason().as_str(), "timeout");
    }

    #[test]
    fn reasons_are_listed_once() {
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    fn io_run(size: u8, count: u32, data_offset: u64) -> kvm_run {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_IO,
            ..Default::default()
        };
        run.__bindgen_anon_1.io = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_4 {
            direction: kvm_bindings::KVM_EXIT_IO_OUT as u8,
            size,
            port: 0x10,
            count,
            data_offset,
        };
        run
    }

    #[test]
    fn io_exits_with_data_outside_kvm_run_are_refused() {
        assert!(io_raw(&io_run(1, 1, 4096)).is_some());
        assert!(io_raw(&io_run(4, 1024, 4096)).is_some());
        assert!(
            io_raw(&io_run(4, 1025, 4096)).is_none(),
            "past the data page"
        );
        assert!(io_raw(&io_run(3, 1, 4096)).is_none(), "bad size");
        assert!(io_raw(&io_run(1, 0, 4096)).is_none(), "no element");
        assert!(
            io_raw(&io_run(1, 1, 8)).is_none(),
            "inside kvm_run's own fields"
        );
        assert!(io_raw(&io_run(1, u32::MAX, 4096)).is_none());
        let mut other = io_run(1, 1, 4096);
        other.exit_reason = KVM_EXIT_MMIO;
        assert!(io_raw(&other).is_none());
    }
}
