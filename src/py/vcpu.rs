//! The `Vcpu` class: registers, modes, running, answering reads, interrupts.

use std::collections::BTreeMap;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::arch::x86_64::fuzzmap::UserRange;
use crate::engine::breakpoints::Owner;
use crate::engine::kick;
use crate::engine::setup::LongMode;
use crate::engine::vcpu::Last;
use crate::engine::{Error, Exit, Outcome, Reason, RunOptions, VcpuCore};
use crate::py::args::{bytes_arg, deadline_after, Int};
use crate::py::error::through_engine;
use crate::py::handler::answer_data;
use crate::py::interrupt::watch_ctrl_c;
use crate::py::kvm::CpuidEntry;
use crate::py::regs::{Regs, Sregs};
use crate::py::{exit, gil};

/// `(address, size, permissions)`, an entry of `setup_long_mode(user_map=...)`.
type UserMapEntry = (Int<u64>, Int<u64>, String);

/// One entry of `setup_long_mode(user_map=...)`.
fn user_range(start: u64, size: u64, perms: &str) -> PyResult<UserRange> {
    if perms.is_empty() || !perms.chars().all(|c| "rwx".contains(c)) {
        return Err(PyValueError::new_err(format!(
            "user_map permissions must be made of \"r\", \"w\" and \"x\", not {perms:?}"
        )));
    }
    Ok(UserRange {
        start,
        size,
        writable: perms.contains('w'),
        executable: perms.contains('x'),
    })
}

/// A virtual CPU of a `Vm`, created with `vm.create_vcpu()`.
#[pyclass(module = "kvmpy._native", frozen)]
pub struct Vcpu {
    pub inner: Arc<VcpuCore>,
    /// Keeps the VM open while this object exists.
    pub owner: Py<crate::py::vm::Vm>,
}

#[pymethods]
impl Vcpu {
    /// The vCPU id (its APIC id).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }

    /// A snapshot of the general purpose registers, `rip` and `rflags`.
    #[getter]
    fn regs(&self) -> PyResult<Regs> {
        Ok(Regs::from_kvm(&self.inner.regs()?))
    }

    #[setter(regs)]
    fn set_regs_obj(&self, regs: Regs) -> PyResult<()> {
        Ok(self.inner.set_regs(&regs.to_kvm())?)
    }

    /// Sets the named registers, leaving the others as they are:
    /// `cpu.set_regs(rip=0x1000, rsp=0x8000, rflags=2)`.
    #[pyo3(signature = (**fields))]
    fn set_regs(&self, fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut regs = self.inner.regs()?;
        if let Some(f) = fields {
            Regs::apply(&mut regs, f)?;
        }
        Ok(self.inner.set_regs(&regs)?)
    }

    /// A snapshot of the special registers: segments, GDT/IDT, control registers, EFER.
    #[getter]
    fn sregs(&self) -> PyResult<Sregs> {
        Ok(Sregs::from_kvm(&self.inner.sregs()?))
    }

    #[setter(sregs)]
    fn set_sregs_obj(&self, sregs: Sregs) -> PyResult<()> {
        Ok(self.inner.set_sregs(&sregs.to_kvm())?)
    }

    /// Sets the named special registers, leaving the others as they are:
    /// `cpu.set_sregs(cr0=0x11, cs=kvmpy.Segment(selector=0, base=0))`.
    #[pyo3(signature = (**fields))]
    fn set_sregs(&self, fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut sregs = Sregs::from_kvm(&self.inner.sregs()?);
        if let Some(f) = fields {
            sregs.apply(f)?;
        }
        Ok(self.inner.set_sregs(&sregs.to_kvm())?)
    }

    /// Puts the vCPU in 16-bit real mode with `CS = cs` (base `cs * 16`) and `IP = ip`;
    /// the data and stack segments are set to 0.
    #[pyo3(signature = (*, cs=Int(0), ip=Int(0)), text_signature = "(self, /, *, cs=0, ip=0)")]
    fn setup_real_mode(&self, cs: Int<u16>, ip: Int<u16>) -> PyResult<()> {
        Ok(self.inner.setup_real_mode(cs.0, ip.0)?)
    }

    /// Puts the vCPU in 64-bit long mode with paging, at CPL3 (`user=True`, with IOPL=3
    /// so `in`/`out` exit to the host) or CPL0.
    ///
    /// Writes its structures into guest memory (RAM) from `tables_addr` (page aligned):
    /// GDT at `+0x0000`, TSS (with an I/O bitmap allowing every port) at `+0x1000`, IDT at
    /// `+0x4000`, exception stubs at `+0x5000`, their stack at `+0x6000`, PML4 at
    /// `+0x7000`, PDPT at `+0x8000` and, with 2 MiB pages, one page directory per GiB from
    /// `+0x9000`: `0x9000 + map_gib * 0x1000` bytes in all (`0x9000` with
    /// `huge_pages=True`, which maps 1 GiB pages). The first `map_gib` GiB are identity
    /// mapped, writable and user-accessible. PDPT entry 511 (guest virtual `0x7fc0000000`),
    /// when free, maps kvmpy's FPU restore stub read-only (see the README's snapshots).
    ///
    /// With `exceptions=True` the IDT's stubs report CPU exceptions: `run()` then returns an
    /// `ExceptionExit` (reason `"exception"`) with the vector, error code, RIP and CR2,
    /// instead of the guest triple-faulting (reason `"shutdown"`). They report through
    /// `exception_port`, which this registers with the VM. vCPUs may share `tables_addr`:
    /// each one after the first to set them up with exceptions gets its own TSS and
    /// exception stack, `0x4000` bytes each right after the page tables (which must be
    /// RAM inside the identity map), so that vCPUs faulting at once get their own reports.
    ///
    /// With `user_map`, a list of `(address, size, permissions)` (permissions: a string
    /// of `"r"`, `"w"`, `"x"`), the page tables instead map only those ranges (identity,
    /// 4 KiB pages, each with its permissions), kvmpy's structures supervisor-only and
    /// nothing in the first 64 KiB: a NULL access, a write to code or to kvmpy's tables,
    /// or any access outside the ranges faults (a `#PF` with `exceptions=True`). The page
    /// tables then take as many pages from `+0x9000` as the ranges need.
    ///
    /// Sets the segments, CR0/CR3/CR4/EFER, GDTR/IDTR, TR and RFLAGS; the caller sets
    /// `rip` (and `rsp` if the guest uses a stack).
    #[pyo3(signature = (*, user=true, tables_addr=Int(0x1000), map_gib=Int(1), huge_pages=false, exceptions=false, exception_port=Int(0xf6), user_map=None), text_signature = "(self, /, *, user=True, tables_addr=4096, map_gib=1, huge_pages=False, exceptions=False, exception_port=246, user_map=None)")]
    #[allow(clippy::too_many_arguments)]
    fn setup_long_mode(
        &self,
        user: bool,
        tables_addr: Int<u64>,
        map_gib: Int<u64>,
        huge_pages: bool,
        exceptions: bool,
        exception_port: Int<u16>,
        user_map: Option<Vec<UserMapEntry>>,
    ) -> PyResult<()> {
        let ranges = match user_map {
            None => None,
            Some(list) => Some(
                list.into_iter()
                    .map(|(start, size, perms)| user_range(start.0, size.0, &perms))
                    .collect::<PyResult<Vec<_>>>()?,
            ),
        };
        let mode = LongMode {
            user,
            tables_addr: tables_addr.0,
            map_gib: map_gib.0,
            huge_pages,
            exceptions,
            exception_port: exception_port.0,
        };
        Ok(self
            .inner
            .setup_long_mode_mapping(mode, ranges.as_deref())?)
    }

    /// Puts the vCPU in flat 32-bit protected mode with paging off, at CPL0: CS selector
    /// 0x38 (32-bit code), data selectors 0x10, base 0, limit 4 GiB. Writes the GDT at
    /// `tables_addr` (page aligned, in RAM; 0x40 bytes). The caller sets `rip` (and
    /// `rsp`). Interrupts are off (IF=0).
    #[pyo3(signature = (*, tables_addr=Int(0x1000)), text_signature = "(self, /, *, tables_addr=4096)")]
    fn setup_protected_mode(&self, tables_addr: Int<u64>) -> PyResult<()> {
        Ok(self.inner.setup_protected_mode(tables_addr.0)?)
    }

    /// The vCPU's CPUID table (`KVM_GET_CPUID2`). New vCPUs get the host's supported
    /// CPUID with the hypervisor bit and their APIC id set.
    fn get_cpuid(&self) -> PyResult<Vec<CpuidEntry>> {
        Ok(self
            .inner
            .cpuid()?
            .iter()
            .map(CpuidEntry::from_kvm)
            .collect())
    }

    /// Replaces the vCPU's CPUID table (`KVM_SET_CPUID2`). Do it before the first run: KVM
    /// refuses changes once the vCPU has run.
    fn set_cpuid(&self, entries: Vec<CpuidEntry>) -> PyResult<()> {
        let raw: Vec<_> = entries.iter().map(CpuidEntry::to_kvm).collect();
        Ok(self.inner.set_cpuid(&raw)?)
    }

    /// Reads model-specific registers: `{index: value}` for each index. Raises
    /// `KvmError` naming the first MSR KVM refused.
    fn get_msrs(&self, indices: Vec<Int<u32>>) -> PyResult<BTreeMap<u32, u64>> {
        let indices: Vec<u32> = indices.iter().map(|i| i.0).collect();
        Ok(self.inner.msrs(&indices)?.into_iter().collect())
    }

    /// Writes model-specific registers from `{index: value}`. Raises `KvmError` naming the
    /// first MSR KVM refused (the ones before it were written).
    fn set_msrs(&self, values: BTreeMap<u32, Int<u64>>) -> PyResult<()> {
        let values: Vec<(u32, u64)> = values.iter().map(|(&k, v)| (k, v.0)).collect();
        Ok(self.inner.set_msrs(&values)?)
    }

    /// Translates guest virtual address `vaddr` to a guest physical address by walking the
    /// vCPU's page tables (per its current CR0/CR3/CR4/EFER), as the CPU would. Raises
    /// `GuestMemoryError` when the address is not mapped.
    fn translate(&self, vaddr: Int<u64>) -> PyResult<u64> {
        Ok(self.inner.translate(vaddr.0)?)
    }

    /// `KVM_TRANSLATE`: KVM's own translation of `vaddr`, or None if KVM says it is not
    /// mapped. (Not every KVM implements it for every mode; `translate` does not need it.)
    fn kvm_translate(&self, vaddr: Int<u64>) -> PyResult<Option<u64>> {
        Ok(self.inner.kvm_translate(vaddr.0)?)
    }

    /// Reads `n` bytes of guest virtual memory at `vaddr` through the vCPU's page tables
    /// (the range may cross pages).
    fn read_virtual<'py>(
        &self,
        py: Python<'py>,
        vaddr: Int<u64>,
        n: Int<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        out.try_reserve_exact(n.0)
            .map_err(|_| Error::Memory(format!("cannot read {} bytes", n.0)))?;
        out.resize(n.0, 0);
        self.inner.read_virtual(vaddr.0, &mut out)?;
        Ok(PyBytes::new(py, &out))
    }

    /// Writes a bytes-like object to guest virtual memory at `vaddr` through the vCPU's
    /// page tables (ignoring their write-protection, as a debugger does).
    fn write_virtual(&self, vaddr: Int<u64>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = bytes_arg(data)?;
        Ok(self.inner.write_virtual(vaddr.0, &data)?)
    }

    /// Runs the vCPU until an exit no handler takes, a handler stops it, the guest writes
    /// to an exit port, or `timeout` seconds pass; returns that exit.
    ///
    /// The GIL is released while the guest runs. The first exception a handler raises
    /// stops the vCPU and is re-raised here. Ctrl-C stops the guest and raises
    /// `KeyboardInterrupt` (when `run()` is called from the main thread); one that arrives
    /// while a handler of this run executes raises it in the handler, which ends the run.
    ///
    /// A vCPU that no mode was set up for runs from its reset state (at 0xfffffff0); when
    /// such a run ends with an MMIO, shutdown, failed-entry or internal-error exit, `run()`
    /// warns once per vCPU (`RuntimeWarning`).
    #[pyo3(signature = (timeout=None))]
    fn run(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        self.run_for(py, timeout)
    }

    /// Sets a software breakpoint at guest-virtual `address` (translated by this vCPU's
    /// page tables) for this vCPU: when it gets there, `run()` returns a `BreakpointExit`
    /// (reason `"breakpoint"`) with RIP at `address`, before the instruction runs; the
    /// next run or step from there executes it (a run that starts at a breakpoint's
    /// address any other way, RIP set by hand, hits it at once). Any number of
    /// breakpoints; the guest's memory and every snapshot show the original bytes.
    /// Returns `address`.
    ///
    /// Where the host's KVM does not intercept `int3` (`python -m kvmpy info`), the vCPU
    /// needs `setup_long_mode(exceptions=True)`; otherwise this raises `KvmUnsupported`.
    ///
    /// `hardware=True` sets a debug-register breakpoint instead (DR0-DR3, no byte
    /// patched; the same `breakpoint` exit). Only hosts whose KVM delivers debug-register
    /// traps have them (bare-metal KVM: `python -m kvmpy info` says); elsewhere, as on
    /// nested software KVMs, it raises `KvmUnsupported` naming the probe's result (no
    /// patch is set instead). They share the four slots with debug-register
    /// watchpoints: a fifth user raises `ValueError`.
    #[pyo3(signature = (address, *, hardware=false))]
    fn add_breakpoint(&self, address: Int<u64>, hardware: bool) -> PyResult<u64> {
        let inner = &self.inner;
        if hardware {
            inner
                .vm
                .add_hw_breakpoint(inner, address.0, Owner::Vcpu(inner.id))?;
            return Ok(address.0);
        }
        inner
            .vm
            .add_breakpoint(inner, address.0, Owner::Vcpu(inner.id))?;
        Ok(address.0)
    }

    /// Removes this vCPU's breakpoint at `address` (the original byte goes back);
    /// `ValueError` if there is none.
    fn remove_breakpoint(&self, address: Int<u64>) -> PyResult<()> {
        Ok(self
            .inner
            .vm
            .remove_breakpoint(address.0, Owner::Vcpu(self.inner.id))?)
    }

    /// The addresses of this vCPU's breakpoints, patched and hardware (not the VM-wide
    /// ones).
    #[getter]
    fn breakpoints(&self) -> Vec<u64> {
        self.inner.vm.breakpoints_of(Owner::Vcpu(self.inner.id))
    }

    /// Executes `count` instructions, one at a time, and returns the new RIP. A
    /// breakpoint is not reported while stepping onto it; stepping on from it executes
    /// its instruction. Needs what breakpoints need (`KvmUnsupported` otherwise). If
    /// something else ends a step first (an exit port, an unhandled exit, a fault),
    /// stepping stops there: `cpu.last_exit` says what (its reason is `"step"` when every
    /// step completed).
    #[pyo3(signature = (count=Int(1), *, timeout=None), text_signature = "(self, /, count=1, *, timeout=None)")]
    fn step(&self, py: Python<'_>, count: Int<u64>, timeout: Option<f64>) -> PyResult<u64> {
        if count.0 == 0 {
            return Err(PyValueError::new_err("count must be at least 1"));
        }
        self.inner.vm.check_debuggable("single steps")?;
        for _ in 0..count.0 {
            self.inner.request_step(true);
            let exit = self.run_for(py, timeout);
            self.inner.request_step(false);
            let exit = exit?;
            let stepped = exit
                .bind(py)
                .cast::<exit::ExitInfo>()
                .is_ok_and(|e| e.get().reason == Reason::Step);
            if !stepped {
                break;
            }
        }
        Ok(self.inner.regs()?.rip)
    }

    /// Sets a watchpoint of `length` bytes (1, 2, 4 or 8, aligned to its length) at
    /// guest-virtual `address` for this vCPU: an access of `kind` (`"write"`, or `"rw"` for
    /// reads and writes) that touches those bytes ends `run()` with a `WatchpointExit`
    /// (reason `"watchpoint"`) once the instruction is done. At most 4 watchpoints per VM.
    ///
    /// The address is translated to guest-physical once, now, by this vCPU's page tables:
    /// a later change of the mapping is not followed. The page that holds it gets a KVM
    /// memory slot of its own (read-only for `"write"`, none for `"rw"`), so every write
    /// (every access, for `"rw"`) to that page exits to kvmpy, which does the access and
    /// lets the run go on unless the watched bytes were touched. Code cannot run from a
    /// page an `"rw"` watchpoint watches (such a run raises `KvmUnsupported`).
    /// `ValueError` for a bad length, alignment or kind, a fifth watchpoint or a read-only
    /// region; `GuestMemoryError` for an unmapped address; `KvmUnsupported`
    /// where the host has no read-only memory slots.
    #[pyo3(signature = (address, length, kind="write"))]
    fn add_watchpoint(&self, address: Int<u64>, length: Int<u64>, kind: &str) -> PyResult<()> {
        Ok(self.inner.add_watchpoint(address.0, length.0, kind)?)
    }

    /// Removes this vCPU's watchpoint at `address` of `length` bytes; `ValueError` if
    /// there is none.
    fn remove_watchpoint(&self, address: Int<u64>, length: Int<u64>) -> PyResult<()> {
        Ok(self.inner.remove_watchpoint(address.0, length.0)?)
    }

    /// This vCPU's watchpoints: `(address, length, kind)` tuples.
    fn watchpoints(&self) -> Vec<(u64, u64, &'static str)> {
        self.inner
            .vm
            .watches_of(Some(self.inner.id))
            .iter()
            .map(|w| (w.vaddr, w.len, w.kind.as_str()))
            .collect()
    }

    /// An iterator of the instructions the vCPU executes, one single step each: a
    /// `(rip, bytes, text)` tuple per instruction (text in Intel syntax, from the iced-x86
    /// decoder), yielded before the instruction runs. It ends after `count` instructions,
    /// when RIP reaches `until`, or when a step ends any other way (`cpu.last_exit`).
    #[pyo3(signature = (count=None, until=None))]
    fn trace<'py>(
        slf: &Bound<'py, Self>,
        count: Option<Int<u64>>,
        until: Option<Int<u64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        py.import("kvmpy._trace")?
            .call_method1("trace", (slf, count.map(|c| c.0), until.map(|u| u.0)))
    }

    /// Answers the IN or MMIO read that the last `run()` returned because no handler took
    /// it: `value` (an int, or bytes of the access size) is what the guest reads when it
    /// runs again. Without an answer the guest reads zeros.
    fn respond(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.inner.respond(|size, exit| {
            answer_data(value, size, exit, || "respond()".into()).map_err(through_engine)
        })?)
    }

    /// Queues interrupt `vector` (0-255) for the guest (`KVM_INTERRUPT`, for VMs without
    /// an in-kernel irqchip; with one, use `vm.set_irq_line`). It is injected as soon as
    /// the guest accepts interrupts (IF=1): at once if the vCPU is running, otherwise at
    /// the next `run()`. A vCPU halted in `hlt` wakes up to take it.
    fn interrupt(&self, vector: Int<u32>) -> PyResult<()> {
        let vector = vector.0;
        if vector > 255 {
            return Err(PyValueError::new_err(format!(
                "interrupt vector {vector} is outside 0..255"
            )));
        }
        if self.inner.vm.has_irqchip() {
            return Err(Error::Value(
                "this VM has an in-kernel irqchip: raise interrupts with vm.set_irq_line()".into(),
            )
            .into());
        }
        self.inner.vm.check_open()?;
        self.inner.queue_interrupt(vector);
        Ok(())
    }

    /// Asks the vCPU to stop: its `run()` returns an exit with reason `"stopped"`.
    /// Callable from any thread and from handlers. A stop requested while the vCPU is not
    /// running is kept for its next run, which then returns `"stopped"` at once without
    /// entering the guest: a stop is never lost to a run that is just starting.
    fn stop(&self) {
        self.inner.kicker.request_stop();
    }

    /// The exit that ended this vCPU's last run (by `run()` or `vm.start()`), or None
    /// before the first run or when the run ended with an exception.
    #[getter]
    fn last_exit(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        last_exit(py, &self.inner)
    }

    /// Counters since the vCPU was created: `exits` (returns from `KVM_RUN`),
    /// `handler_calls` (Python handler calls, the only times the run loop takes the GIL),
    /// `full_restores` (snapshot restores that rewrote all of the vCPU's state; the
    /// others put back only the general registers and the FPU/SSE/AVX state, because
    /// nothing else can have changed) and `stub_loads` (runs that started in kvmpy's FPU
    /// restore stub, which loaded a fast restore's FPU/SSE/AVX state in the guest instead
    /// of an ioctl; see the snapshots documentation).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (exits, calls) = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("exits", exits)?;
        d.set_item("handler_calls", calls)?;
        d.set_item("full_restores", self.inner.full_restores())?;
        d.set_item("stub_loads", self.inner.stub_loads())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Vcpu(id={})", self.inner.id)
    }

    /// The VM this vCPU belongs to.
    #[getter]
    fn vm(&self, py: Python<'_>) -> Py<crate::py::vm::Vm> {
        self.owner.clone_ref(py)
    }

    fn __traverse__(
        &self,
        visit: pyo3::PyVisit<'_>,
    ) -> std::result::Result<(), pyo3::PyTraverseError> {
        visit.call(&self.owner)
    }
}

/// The Python object a device's token holds (the face's tokens are always exit objects).
impl Vcpu {
    /// The body of `run()` (and of each step).
    fn run_for(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = deadline_after(timeout)?;
        let inner = &self.inner;
        inner.vm.check_open()?;
        kick::signal()?;
        watch_ctrl_c();
        let on_signal = || gil::attached(|py| py.check_signals()).map_err(through_engine);
        // The run begins and ends with the GIL released, so whoever waits for the run to
        // end, e.g. a VM shutting down while the interpreter exits, never waits on this
        // thread getting the GIL back.
        let outcome = gil::released(py, || {
            inner.run(&RunOptions {
                deadline,
                on_signal: Some(&on_signal),
            })
        });
        let obj = match outcome {
            Outcome::Exit(exit) => {
                warn_if_run_from_reset_state(py, inner, &exit)?;
                exit::to_python(py, &exit, inner.id)?
            }
            Outcome::Stopped(token) => token_object(py, &token),
            Outcome::Error(e) => {
                inner.set_last(None);
                return Err(e.into());
            }
        };
        inner.set_last(Some(Last::Token(Box::new(obj.clone_ref(py)))));
        Ok(obj)
    }
}

fn token_object(py: Python<'_>, token: &crate::engine::Token) -> Py<PyAny> {
    token
        .downcast_ref::<Py<PyAny>>()
        .map(|o| o.clone_ref(py))
        .unwrap_or_else(|| py.None())
}

/// The exit that ended `vcpu`'s last run, as a Python object (made once, then cached).
pub fn last_exit(py: Python<'_>, vcpu: &VcpuCore) -> PyResult<Option<Py<PyAny>>> {
    let mut last = vcpu.last();
    let obj = match last.as_ref() {
        None => return Ok(None),
        Some(Last::Token(token)) => token_object(py, token),
        Some(Last::Exit(e)) => exit::to_python(py, e, vcpu.id)?,
    };
    *last = Some(Last::Token(Box::new(obj.clone_ref(py))));
    Ok(Some(obj))
}

/// Warns, once per vCPU, when a vCPU that no mode was set up for ends its run with an exit
/// that a guest rarely means (it ran from the reset state, at 0xfffffff0, where a VM
/// usually has no RAM).
fn warn_if_run_from_reset_state(py: Python<'_>, vcpu: &VcpuCore, exit: &Exit) -> PyResult<()> {
    let nonsense = matches!(
        exit,
        Exit::Mmio { .. } | Exit::Shutdown | Exit::FailEntry { .. } | Exit::InternalError { .. }
    );
    if !nonsense
        || !vcpu.in_reset_state()
        || vcpu
            .warned_reset_state
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        return Ok(());
    }
    let message = format!(
        "vCPU {} ran from its reset state (no setup_real_mode, setup_protected_mode, \
         setup_long_mode, set_sregs or loader set a mode up): it starts at 0xfffffff0, where \
         a VM usually has no RAM, so this {} exit is rarely what the guest meant. Set a mode \
         up before run().",
        vcpu.id,
        exit.reason().as_str()
    );
    let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
    PyErr::warn(py, &category, &std::ffi::CString::new(message)?, 1)
}
