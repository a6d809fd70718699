//! One fuzzing execution: write an input into guest memory, point the argument
//! registers at it, run the vCPU to its end (an exit, a crash, a timeout), read what a
//! report needs, and put the VM back as the snapshot saw it. No Python here: the face
//! calls [`Executor::run`] once per input with the interpreter lock released.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;

use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::run::{Outcome, RunOptions};
use crate::engine::snapshot::Snapshot;
use crate::engine::vcpu::VcpuCore;
use crate::engine::vm::VmCore;

/// A general register an input's address or length is passed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgReg {
    Rdi,
    Rsi,
    Rdx,
    Rcx,
    R8,
    R9,
}

impl ArgReg {
    /// The register called `name` (`"rdi"`, `"rsi"`, `"rdx"`, `"rcx"`, `"r8"`, `"r9"`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "rdi" => ArgReg::Rdi,
            "rsi" => ArgReg::Rsi,
            "rdx" => ArgReg::Rdx,
            "rcx" => ArgReg::Rcx,
            "r8" => ArgReg::R8,
            "r9" => ArgReg::R9,
            _ => return None,
        })
    }

    fn set(self, r: &mut kvm_regs, value: u64) {
        match self {
            ArgReg::Rdi => r.rdi = value,
            ArgReg::Rsi => r.rsi = value,
            ArgReg::Rdx => r.rdx = value,
            ArgReg::Rcx => r.rcx = value,
            ArgReg::R8 => r.r8 = value,
            ArgReg::R9 => r.r9 = value,
        }
    }
}

/// Where inputs go and how a run is bounded.
#[derive(Clone, Debug)]
pub struct Config {
    /// An input of `n` bytes is written at `input_end - n`: it ends where the mapped
    /// input area ends, so reading one byte past it faults in a fuzzing address space.
    pub input_end: u64,
    pub max_len: usize,
    pub addr_reg: Option<ArgReg>,
    pub len_reg: Option<ArgReg>,
    pub timeout: Duration,
    /// The top of the exception stubs' stack (`tables_addr + 0x7000`), where the stubs
    /// saved the guest's RAX and RDX: read back into a crash's registers.
    pub exception_stack_top: Option<u64>,
}

/// How one execution ended, with the registers a report needs (none for a clean end).
pub struct Execution {
    pub exit: Exit,
    pub regs: Option<kvm_regs>,
}

/// Runs inputs on one vCPU of a VM, restoring `snapshot` after each.
pub struct Executor {
    pub vm: Arc<VmCore>,
    pub vcpu: Arc<VcpuCore>,
    pub snapshot: Arc<Snapshot>,
    pub config: Config,
}

impl Executor {
    /// Checks the configuration against the VM: the input area must be in guest RAM.
    pub fn new(
        vm: Arc<VmCore>,
        vcpu: Arc<VcpuCore>,
        snapshot: Arc<Snapshot>,
        config: Config,
    ) -> Result<Self> {
        let start = config
            .input_end
            .checked_sub(config.max_len as u64)
            .ok_or_else(|| Error::Value("the input area starts below address 0".into()))?;
        vm.check_memory(start, config.max_len).map_err(|_| {
            Error::Value(format!(
                "the input area {start:#x}..{:#x} is not all in guest RAM",
                config.input_end
            ))
        })?;
        snapshot.check_layout(&vm)?;
        Ok(Executor {
            vm,
            vcpu,
            snapshot,
            config,
        })
    }

    /// Runs one input and restores the snapshot. `on_signal` is called when `KVM_RUN`
    /// was interrupted by a signal that was not a kick (Ctrl-C).
    pub fn run(
        &self,
        data: &[u8],
        on_signal: Option<&dyn Fn() -> Result<()>>,
    ) -> Result<Execution> {
        let c = &self.config;
        if data.len() > c.max_len {
            return Err(Error::Value(format!(
                "the input is {} bytes, longer than max_len ({})",
                data.len(),
                c.max_len
            )));
        }
        let addr = c.input_end - data.len() as u64;
        self.vm.write_memory(addr, data)?;
        let (addr_reg, len_reg) = (c.addr_reg, c.len_reg);
        if addr_reg.is_some() || len_reg.is_some() {
            self.vcpu.with_fd(|fd| {
                self.vcpu.update_regs(fd, |r| {
                    if let Some(reg) = addr_reg {
                        reg.set(r, addr);
                    }
                    if let Some(reg) = len_reg {
                        reg.set(r, data.len() as u64);
                    }
                })
            })?;
        }
        let options = RunOptions {
            deadline: Instant::now().checked_add(c.timeout),
            on_signal,
        };
        let result = match self.vcpu.run(&options) {
            Outcome::Exit(exit) => self.finish(exit),
            Outcome::Stopped(_) => Ok(Execution {
                exit: Exit::Stopped,
                regs: None,
            }),
            Outcome::Error(e) => Err(e),
        };
        // Restore even when the run failed, so the next input starts clean.
        let restored = self.vm.restore(&self.snapshot);
        let execution = result?;
        restored?;
        Ok(execution)
    }

    /// The registers a report needs for `exit`.
    fn finish(&self, exit: Exit) -> Result<Execution> {
        let regs = match &exit {
            Exit::Guest { .. } | Exit::Stopped => None,
            Exit::Exception {
                rip, rsp, rflags, ..
            } => {
                let mut r = self.vcpu.regs()?;
                (r.rip, r.rsp, r.rflags) = (*rip, *rsp, *rflags);
                if let Some(top) = self.config.exception_stack_top {
                    // The stubs pushed RAX, then RDX, below the CPU's frame and the
                    // vector: at top - 64 and top - 72.
                    let at = top.checked_sub(72).ok_or_else(|| {
                        Error::Value(format!("exception_stack_top {top:#x} is too low"))
                    })?;
                    let mut saved = [0u8; 16];
                    self.vm.read_memory(at, &mut saved)?;
                    r.rdx = u64::from_le_bytes(saved[..8].try_into().expect("8 bytes"));
                    r.rax = u64::from_le_bytes(saved[8..].try_into().expect("8 bytes"));
                }
                Some(r)
            }
            _ => Some(self.vcpu.regs()?),
        };
        Ok(Execution { exit, regs })
    }
}
