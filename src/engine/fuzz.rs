//! One fuzzing execution: write an input into guest memory, point the argument
//! registers at it, run the vCPU to its end (an exit, a crash, a timeout), read what a
//! report needs, and put the VM back as the snapshot saw it. No Python here: the face
//! calls [`Executor::run`] once per input with the interpreter lock released.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;

use crate::engine::coverage::{self, Mechanism};
use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::lock;
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

/// Block coverage for an executor (see `coverage`).
#[derive(Clone, Debug)]
pub struct CoverageConfig {
    /// Guest-virtual block starts, translated by the snapshot's page tables.
    pub blocks: Vec<u64>,
    /// "armed" mode: the patches stay and every hit counts (edges, hit counts).
    pub armed: bool,
    /// The coverage map's size: a power of two.
    pub map_size: usize,
}

/// How one execution ended, with the registers a report needs (none for a clean end).
pub struct Execution {
    pub exit: Exit,
    pub regs: Option<kvm_regs>,
    /// The blocks this execution covered for the first time (with coverage).
    pub new_blocks: Vec<u64>,
}

/// What an executor with coverage keeps.
pub struct CoverageState {
    /// The snapshot restores use: a copy of the user's with the coverage patches in its
    /// memory image, whose bytes go back as blocks are covered.
    pub clean: Mutex<Snapshot>,
    pub mechanism: Mechanism,
    /// How many blocks were patched.
    pub blocks: usize,
    /// The block addresses, sorted, without repeats: a block's position here is its
    /// entry in a map of one byte per block (see `afl`).
    pub block_index: Vec<u64>,
}

/// Runs inputs on one vCPU of a VM, restoring `snapshot` after each.
pub struct Executor {
    pub vm: Arc<VmCore>,
    pub vcpu: Arc<VcpuCore>,
    pub snapshot: Arc<Snapshot>,
    pub config: Config,
    pub coverage: Option<CoverageState>,
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
            coverage: None,
        })
    }

    /// Adds block coverage: patches every block into a copy of the snapshot's memory and
    /// puts the VM back as that copy holds it. Fails, changing nothing, on a block that
    /// is not mapped or not in guest RAM, or where the VM has coverage already.
    pub fn with_coverage(mut self, cov: &CoverageConfig) -> Result<Self> {
        let index = self
            .vm
            .vcpus()
            .iter()
            .position(|v| Arc::ptr_eq(v, &self.vcpu))
            .ok_or_else(|| Error::Value("the vCPU belongs to another VM".into()))?;
        // A snapshot of the VM as the user's snapshot has it: the executor's own, whose
        // memory image takes the patches.
        self.vm.restore(&self.snapshot)?;
        let mut clean = Arc::try_unwrap(self.vm.snapshot()?)
            .map_err(|_| Error::Value("a fresh snapshot is shared".into()))?;
        let mechanism = coverage::install(&self.vm, &mut clean, index, cov)?;
        let blocks = lock(&self.vm.breakpoints).coverage_blocks();
        let clean = Mutex::new(clean);
        let mut block_index = cov.blocks.clone();
        block_index.sort_unstable();
        block_index.dedup();
        self.coverage = Some(CoverageState {
            clean,
            mechanism,
            blocks,
            block_index,
        });
        Ok(self)
    }

    /// The coverage map as it is now (None without coverage).
    pub fn coverage_map(&self) -> Option<Vec<u8>> {
        self.coverage.as_ref()?;
        lock(&self.vm.breakpoints)
            .coverage
            .as_ref()
            .map(|m| m.map.clone())
    }

    /// How many blocks have been covered (0 without coverage).
    pub fn blocks_covered(&self) -> usize {
        lock(&self.vm.breakpoints)
            .coverage
            .as_ref()
            .map_or(0, |m| m.covered())
    }

    /// Puts the VM back as the snapshot saw it (with coverage: the patched copy, after
    /// writing the original bytes of the blocks covered since into it).
    fn restore(&self) -> Result<()> {
        match &self.coverage {
            None => self.vm.restore(&self.snapshot),
            Some(cov) => {
                let mut clean = lock(&cov.clean);
                let writes = std::mem::take(&mut lock(&self.vm.breakpoints).image_writes);
                coverage::write_image(&mut clean, &writes);
                self.vm.restore(&clean)
            }
        }
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
        if let Some(cov) = &self.coverage {
            // The VM was put back to another snapshot since (the user's own, say): the
            // patched copy first, so that every block not covered yet has its patch.
            let clean_id = lock(&cov.clean).id;
            if lock(&self.vm.tracking).base != Some(clean_id) {
                self.restore()?;
            }
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
        if self.coverage.is_some() {
            if let Some(map) = lock(&self.vm.breakpoints).coverage.as_mut() {
                map.begin();
            }
        }
        let result = match self.vcpu.run(&options) {
            Outcome::Exit(exit) => self.finish(exit),
            Outcome::Stopped(_) => Ok(Execution {
                exit: Exit::Stopped,
                regs: None,
                new_blocks: Vec::new(),
            }),
            Outcome::Error(e) => Err(e),
        };
        let new_blocks = if self.coverage.is_some() {
            lock(&self.vm.breakpoints)
                .coverage
                .as_mut()
                .map(|m| m.take_new())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        // Restore even when the run failed, so the next input starts clean.
        let restored = self.restore();
        let mut execution = result?;
        restored?;
        execution.new_blocks = new_blocks;
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
        Ok(Execution {
            exit,
            regs,
            new_blocks: Vec::new(),
        })
    }
}

impl Drop for Executor {
    /// Takes the coverage patches out of the VM's memory.
    fn drop(&mut self) {
        if self.coverage.is_some() {
            coverage::uninstall(&self.vm);
        }
    }
}
