//! `FuzzExecutor`: runs fuzz inputs on a vCPU, each with one call that releases the GIL
//! (write the input, set its registers, run, read the crash state, restore).

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::afl;
use crate::engine::fuzz::{ArgReg, Config, CoverageConfig, Executor};
use crate::engine::kick;
use crate::py::args::{bytes_arg, Int};
use crate::py::error::through_engine;
use crate::py::interrupt::watch_ctrl_c;
use crate::py::regs::Regs;
use crate::py::snapshot::Snapshot;
use crate::py::vcpu::Vcpu;
use crate::py::vm::Vm;
use crate::py::{campaign, exit, gil};

/// Runs inputs on `vcpu` of `vm`, restoring `snapshot` after each. The low-level loop
/// under `kvmpy.fuzz.Target`; most programs use that instead.
///
/// An input of `n` bytes is written at `input_end - n` (so it ends where the input area
/// ends); `addr_reg` and `len_reg` (`"rdi"`, `"rsi"`, `"rdx"`, `"rcx"`, `"r8"`, `"r9"`,
/// or None) get its address and length. Each run lasts at most `timeout` seconds.
/// `exception_stack_top` (`tables_addr + 0x7000` of `setup_long_mode(exceptions=True)`)
/// lets a crash's registers show the guest's RAX and RDX, which the exception stubs save
/// there.
///
/// `coverage` (guest-virtual block addresses, or None) turns on block coverage: a
/// breakpoint patched at each block in the executor's own copy of `snapshot` (which
/// itself never shows one); `coverage_mode` `"once"` takes a block's patch out on its
/// first hit, for good (one exit per block per campaign), `"armed"` keeps it and counts
/// every hit as an AFL edge; `map_size` (a power of two) is the AFL-style map's size.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct FuzzExecutor {
    inner: Arc<Executor>,
    vcpu_id: u64,
    /// Keeps the VM open while this object exists.
    _owner: Py<Vm>,
}

fn arg_reg(name: Option<&str>, what: &str) -> PyResult<Option<ArgReg>> {
    name.map(|n| {
        ArgReg::parse(n).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{what} must be one of \"rdi\", \"rsi\", \"rdx\", \"rcx\", \"r8\", \"r9\" or \
                 None, not {n:?}"
            ))
        })
    })
    .transpose()
}

#[pymethods]
impl FuzzExecutor {
    #[new]
    #[pyo3(signature = (vm, vcpu, snapshot, *, input_end, max_len, addr_reg=Some("rdi"), len_reg=Some("rsi"), timeout=1.0, exception_stack_top=None, coverage=None, coverage_mode="once", map_size=Int(65536)), text_signature = "(vm, vcpu, snapshot, *, input_end, max_len, addr_reg='rdi', len_reg='rsi', timeout=1.0, exception_stack_top=None, coverage=None, coverage_mode='once', map_size=65536)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vm: Py<Vm>,
        vcpu: PyRef<'_, Vcpu>,
        snapshot: PyRef<'_, Snapshot>,
        input_end: Int<u64>,
        max_len: Int<usize>,
        addr_reg: Option<&str>,
        len_reg: Option<&str>,
        timeout: f64,
        exception_stack_top: Option<Int<u64>>,
        coverage: Option<Vec<Int<u64>>>,
        coverage_mode: &str,
        map_size: Int<usize>,
    ) -> PyResult<Self> {
        let armed = match coverage_mode {
            "once" => false,
            "armed" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "coverage_mode must be \"once\" or \"armed\", not {other:?}"
                )))
            }
        };
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 1e9) {
            return Err(PyValueError::new_err(format!(
                "timeout must be a number of seconds above 0 and at most 1e9, got {timeout}"
            )));
        }
        let py = vcpu.py();
        let core = Arc::clone(&vm.borrow(py).inner.0);
        if !Arc::ptr_eq(&vcpu.inner.vm, &core) {
            return Err(PyValueError::new_err("the vCPU belongs to another VM"));
        }
        let config = Config {
            input_end: input_end.0,
            max_len: max_len.0,
            addr_reg: arg_reg(addr_reg, "addr_reg")?,
            len_reg: arg_reg(len_reg, "len_reg")?,
            timeout: Duration::from_secs_f64(timeout),
            exception_stack_top: exception_stack_top.map(|t| t.0),
        };
        let mut inner = Executor::new(
            core,
            Arc::clone(&vcpu.inner),
            Arc::clone(&snapshot.inner),
            config,
        )?;
        if let Some(blocks) = coverage {
            let cov = CoverageConfig {
                blocks: blocks.into_iter().map(|b| b.0).collect(),
                armed,
                map_size: map_size.0,
            };
            inner = gil::released(py, || inner.with_coverage(&cov))?;
        }
        Ok(FuzzExecutor {
            inner: Arc::new(inner),
            vcpu_id: vcpu.inner.id,
            _owner: vm,
        })
    }

    /// Runs one input (bytes-like, at most `max_len` bytes) and restores the snapshot.
    /// Returns `(exit, regs, new_blocks)`: the exit that ended the run (`GuestExit` for
    /// the exit port, `ExceptionExit`, `MmioExit` for an access with no RAM behind it,
    /// reason `"timeout"`, ...), except after a clean exit the registers when it ended
    /// (for an exception, the faulting context's), and the blocks this run covered for
    /// the first time (empty without coverage). Ctrl-C stops the run and raises
    /// `KeyboardInterrupt`.
    fn run(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<(Py<PyAny>, Option<Regs>, Vec<u64>)> {
        let data = bytes_arg(data)?;
        kick::signal()?;
        watch_ctrl_c();
        let on_signal = || gil::attached(|py| py.check_signals()).map_err(through_engine);
        let inner = &self.inner;
        let data: &[u8] = &data;
        let execution = gil::released(py, || inner.run(data, Some(&on_signal)))?;
        let obj = exit::to_python(py, &execution.exit, self.vcpu_id)?;
        Ok((
            obj,
            execution.regs.as_ref().map(Regs::from_kvm),
            execution.new_blocks,
        ))
    }

    /// The AFL-style coverage map (`map_size` bytes; None without coverage): in "once"
    /// mode, 1 at `hash(block) & (map_size - 1)` for each block covered so far; in
    /// "armed" mode, the last run's edge hit counts.
    #[getter]
    fn coverage_map<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.coverage_map().map(|m| PyBytes::new(py, &m))
    }

    /// How many blocks have been covered (hit at least once) since coverage began.
    #[getter]
    fn blocks_covered(&self) -> usize {
        self.inner.blocks_covered()
    }

    /// How many blocks are patched for coverage (0 without coverage).
    #[getter]
    fn coverage_blocks(&self) -> usize {
        self.inner.coverage.as_ref().map_or(0, |c| c.blocks)
    }

    /// How coverage breakpoints reach kvmpy on this host and target (None without
    /// coverage): `"kvm"` (`int3`, intercepted by KVM), `"port-io"` (`out dx, al`: an
    /// exit straight from user mode with IOPL=3 or ring 0) or `"exception-stubs"`
    /// (`int3` through kvmpy's exception stubs).
    #[getter]
    fn coverage_mechanism(&self) -> Option<&'static str> {
        self.inner.coverage.as_ref().map(|c| c.mechanism.as_str())
    }

    /// The size of the coverage map afl-fuzz should scan for this executor (None without
    /// coverage): in "once" mode one byte per coverage block, rounded up to 64; in
    /// "armed" mode `map_size`.
    #[getter]
    fn afl_map_size(&self) -> Option<usize> {
        afl::map_size(&self.inner)
    }

    /// Runs afl-fuzz's rounds in this process until afl-fuzz closes `ctl_fd` (the
    /// persistent loop of a child of `kvmpy.fuzz`'s fork server; the GIL is released):
    /// per round, read a control word from `ctl_fd`, write this process's pid to
    /// `status_fd`, read the input (from the System V segment `input_shm`, else the file
    /// `input_file`, else stdin), run it, write the coverage into the segment
    /// `trace_shm` (`afl_map_size` bytes), write the status (0, or 11 for a crash). On a
    /// timeout it waits to be killed. `state` (writable, 24 bytes at least, aligned to
    /// 8, shared with the fork server): its first u32 is set to 1 from just before the
    /// pid is written until just after the status is, and 0 between rounds; the u64 at
    /// offset 8 counts the inputs run and the u64 at offset 16 the nanoseconds spent
    /// running them. With `round_pending`, the first round's
    /// control word was read by the fork server.
    #[pyo3(signature = (ctl_fd, status_fd, state, *, trace_shm, input_shm=None, input_file=None, round_pending=false), text_signature = "($self, ctl_fd, status_fd, state, *, trace_shm, input_shm=None, input_file=None, round_pending=False)")]
    #[allow(clippy::too_many_arguments)]
    fn afl_serve(
        &self,
        py: Python<'_>,
        ctl_fd: i32,
        status_fd: i32,
        state: &Bound<'_, PyAny>,
        trace_shm: i32,
        input_shm: Option<i32>,
        input_file: Option<std::path::PathBuf>,
        round_pending: bool,
    ) -> PyResult<()> {
        let buf = PyBuffer::<u8>::get(state).map_err(|_| {
            PyTypeError::new_err("state must be a writable buffer (an mmap.mmap, say)")
        })?;
        let ptr = buf.buf_ptr() as usize;
        if buf.readonly()
            || !buf.is_c_contiguous()
            || buf.len_bytes() < 24
            || ptr % std::mem::align_of::<AtomicU64>() != 0
        {
            return Err(PyValueError::new_err(
                "state must be a writable, contiguous buffer of 24 bytes at least, aligned to 8",
            ));
        }
        for (fd, what) in [(ctl_fd, "ctl_fd"), (status_fd, "status_fd")] {
            // SAFETY: F_GETFD only asks whether `fd` is open.
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(PyValueError::new_err(format!(
                    "{what} {fd} is not an open file descriptor"
                )));
            }
        }
        let input = match (input_shm, input_file) {
            (Some(id), _) => afl::InputSource::Shm(id),
            (None, Some(path)) => afl::InputSource::File(path),
            (None, None) => afl::InputSource::Stdin,
        };
        let channel = afl::Channel {
            ctl: ctl_fd,
            status: status_fd,
            trace_shm,
            input,
            round_pending,
        };
        let inner = &self.inner;
        let result = gil::released(py, || {
            // SAFETY: `ptr` is 24 bytes of `buf`, aligned to 8 (checked above), kept alive
            // by `buf` until this call returns; other processes use it only atomically.
            let (phase, counters) = unsafe {
                (
                    AtomicU32::from_ptr(ptr as *mut u32),
                    afl::RunCounters {
                        runs: AtomicU64::from_ptr((ptr + 8) as *mut u64),
                        nanos: AtomicU64::from_ptr((ptr + 16) as *mut u64),
                    },
                )
            };
            afl::serve(inner, &channel, phase, &counters)
        });
        drop(buf);
        Ok(result?)
    }

    /// The longest input `run()` accepts.
    #[getter]
    fn max_len(&self) -> usize {
        self.inner.config.max_len
    }

    /// Fuzzes with LibAFL's mutations and this executor's coverage map as feedback (the
    /// loop runs with the GIL released), starting from `seeds` (bytes-like; none: one
    /// empty input), until `executions` inputs ran, `duration` seconds passed, or
    /// `on_status` returned False. `seed` makes the campaign reproducible.
    ///
    /// `on_crash(input)` is called for an input in a new crash bucket (its exception
    /// vector and rip, or its other kind of end) or a shorter one for a known bucket;
    /// `on_timeout(input)` for a timeout shorter than those before. `on_status(stats)`
    /// is called about every `status_every` seconds. With `sync_dir`, the inputs that
    /// grew the corpus are written there as `<worker>-<n>` and other workers' files in
    /// it are read, so that several processes share one corpus. Returns the final stats:
    /// a dict with `executions`, `corpus`, `blocks_covered`, `crash_buckets`, `crashes`,
    /// `timeouts`, `last_new_coverage`, `imported` and `seconds`. Ctrl-C stops it with
    /// `KeyboardInterrupt`.
    #[pyo3(signature = (seeds=Vec::new(), *, seed=Int(0), executions=None, duration=None, sync_dir=None, worker="w0".to_string(), on_crash=None, on_timeout=None, on_status=None, status_every=0.5), text_signature = "($self, seeds=(), *, seed=0, executions=None, duration=None, sync_dir=None, worker='w0', on_crash=None, on_timeout=None, on_status=None, status_every=0.5)")]
    #[allow(clippy::too_many_arguments)]
    fn fuzz<'py>(
        &self,
        py: Python<'py>,
        seeds: Vec<Bound<'py, PyAny>>,
        seed: Int<u64>,
        executions: Option<Int<u64>>,
        duration: Option<f64>,
        sync_dir: Option<std::path::PathBuf>,
        worker: String,
        on_crash: Option<Py<PyAny>>,
        on_timeout: Option<Py<PyAny>>,
        on_status: Option<Py<PyAny>>,
        status_every: f64,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let seeds = seeds
            .iter()
            .map(|s| bytes_arg(s).map(|b| b.to_vec()))
            .collect::<PyResult<Vec<_>>>()?;
        kick::signal()?;
        watch_ctrl_c();
        campaign::fuzz(
            py,
            &self.inner,
            campaign::Request {
                seeds,
                seed: seed.0,
                executions: executions.map(|e| e.0),
                duration,
                sync_dir,
                worker,
                status_every,
                on_crash,
                on_timeout,
                on_status,
            },
        )
    }
}
