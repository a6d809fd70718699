//! The `Vm` class: memory, vCPUs, handlers and devices, running every vCPU on threads.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::devices::console::ConsoleDev;
use crate::devices::hostcall::HostCallDev;
use crate::devices::uart::UartDev;
use crate::engine::breakpoints::Owner;
use crate::engine::load;
use crate::engine::lock;
use crate::engine::{Error, RegionOptions, VmCore};
use crate::py::args::{bytes_arg, Int};
use crate::py::devices::{Console, ExitPort, Uart};
use crate::py::gdb::GdbServer;
use crate::py::gil;
use crate::py::handler::{PyHandler, PyHostFunction};
use crate::py::load::{image_bytes, module_arg, LoadedImage};
use crate::py::memory::MemoryRegion;
use crate::py::register::{port_range, single_port};
use crate::py::vcpu::Vcpu;
use crate::py::vm_group;

/// A KVM virtual machine.
///
/// Holds guest memory regions, vCPUs and exit handlers. Use it as a context manager or
/// call `close()`: closing stops running vCPUs, closes every KVM fd the VM owns and detaches
/// its memory regions.
#[pyclass(module = "kvmpy._native", frozen, subclass)]
pub struct Vm {
    pub inner: Arc<VmHandle>,
}

/// The `Vm` object's hold on the VM (its `Vcpu` and `MemoryRegion` objects keep the `Vm`
/// object alive, visibly to the garbage collector): when the `Vm` object goes away, the VM
/// is shut down (running vCPUs stopped, fds closed). vCPU threads only hold `VmCore`.
pub struct VmHandle(pub Arc<VmCore>);

impl std::ops::Deref for VmHandle {
    type Target = VmCore;
    fn deref(&self) -> &VmCore {
        &self.0
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.0.is_closed() {
            return;
        }
        if self.0.group().is_some() || self.0.vcpus().iter().any(|v| v.runner().is_some()) {
            // Waiting for vCPU threads that may need the GIL (for a handler, or as they
            // end): release it.
            gil::attached(|py| gil::released(py, || self.0.shutdown()));
        } else {
            self.0.shutdown();
        }
    }
}

#[pymethods]
impl Vm {
    /// Creates a VM. With `irqchip=True` KVM emulates the PIC, IOAPIC and local APICs in
    /// the kernel (raise interrupts with `set_irq_line`; HLT is then handled in the kernel
    /// and never reaches `on_hlt`); with `pit=True` (needs `irqchip`) also the PIT timer.
    /// With `dirty_ring=N` snapshots track the pages the guest writes in KVM's dirty ring
    /// (N entries per vCPU, a power of two; KVM_CAP_DIRTY_LOG_RING) instead of its dirty
    /// bitmap: a restore then costs what the guest wrote, not a bitmap of all guest
    /// memory. A host without the ring raises `KvmUnsupported`.
    #[new]
    #[pyo3(signature = (*, irqchip=false, pit=false, dirty_ring=None))]
    fn new(irqchip: bool, pit: bool, dirty_ring: Option<Int<u32>>) -> PyResult<Self> {
        let core = VmCore::new(irqchip, pit)?;
        if let Some(Int(entries)) = dirty_ring {
            // On failure the VM is dropped here, closing its fd.
            core.enable_dirty_ring(entries)?;
        }
        Ok(Vm {
            inner: Arc::new(VmHandle(core)),
        })
    }

    /// The entries of each vCPU's dirty ring (`dirty_ring=N`), or `None`.
    #[getter]
    fn dirty_ring(&self) -> Option<u32> {
        Some(self.inner.0.dirty_ring()).filter(|n| *n != 0)
    }

    /// Adds `size` bytes of RAM at guest physical address `guest_addr` (both page
    /// aligned). With `readonly=True` guest writes exit as MMIO writes; with
    /// `dirty_log=True` KVM logs written pages (see `MemoryRegion.dirty_pages`). A region
    /// larger than the host's memory is refused unless `overcommit=True`: KVM allocates
    /// metadata for every page of a region when it is added.
    #[pyo3(signature = (guest_addr, size, *, readonly=false, dirty_log=false, overcommit=false))]
    fn add_memory(
        slf: &Bound<'_, Self>,
        guest_addr: Int<u64>,
        size: Int<u64>,
        readonly: bool,
        dirty_log: bool,
        overcommit: bool,
    ) -> PyResult<MemoryRegion> {
        let opts = RegionOptions {
            readonly,
            dirty_log,
            overcommit,
        };
        let region = slf.get().inner.add_memory(guest_addr.0, size.0, opts)?;
        Ok(Self::wrap_region(slf, region))
    }

    /// Removes a region from the guest's address space. Views of it stay valid; its
    /// `read`/`write` raise afterwards.
    fn remove_memory(&self, region: &Bound<'_, MemoryRegion>) -> PyResult<()> {
        let region = region.get();
        if !Arc::ptr_eq(&region.vm, self.core()) {
            return Err(Error::Memory("the memory region belongs to another VM".into()).into());
        }
        Ok(self.inner.remove_memory(&region.region)?)
    }

    /// The VM's memory regions, by guest address.
    #[getter]
    fn memory_regions(slf: &Bound<'_, Self>) -> Vec<MemoryRegion> {
        let regions = slf.get().inner.with_memory(|m| m.regions().to_vec());
        regions
            .into_iter()
            .map(|r| Self::wrap_region(slf, r))
            .collect()
    }

    /// Reads `n` bytes of guest physical memory at `gpa`; the range may span regions but
    /// must lie entirely in guest RAM.
    fn read<'py>(
        &self,
        py: Python<'py>,
        gpa: Int<u64>,
        n: Int<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.inner.check_open()?;
        let (gpa, n) = (gpa.0, n.0);
        // Breakpoints show their original bytes (the table is locked before the memory,
        // as everywhere).
        let breakpoints = lock(&self.inner.breakpoints);
        self.inner.with_memory(|memory| {
            memory.check(gpa, n)?;
            PyBytes::new_with(py, n, |buf| {
                memory.read(gpa, buf)?;
                breakpoints.hide(gpa, buf);
                Ok(())
            })
        })
    }

    /// Writes a bytes-like object to guest physical memory at `gpa`.
    fn write(&self, gpa: Int<u64>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = bytes_arg(data)?;
        Ok(self.inner.write_memory(gpa.0, &data)?)
    }

    /// Writes a flat binary image (bytes-like, or a path to read) at guest physical
    /// `address`; it must lie entirely in RAM.
    fn load_flat(&self, image: &Bound<'_, PyAny>, address: Int<u64>) -> PyResult<()> {
        let data = image_bytes(image)?;
        Ok(load::load_flat(&self.inner, &data, address.0)?)
    }

    /// Loads an ELF executable (32- or 64-bit x86; bytes-like, or a path to read): each
    /// PT_LOAD segment at its physical address, zero-filled past its file size. Every
    /// segment and the entry point must lie in RAM. Returns a `LoadedImage` with the entry
    /// point and the symbol table. Set the vCPU's mode and `rip` yourself.
    fn load_elf(&self, image: &Bound<'_, PyAny>) -> PyResult<LoadedImage> {
        let data = image_bytes(image)?;
        Ok(load::load_elf(&self.inner, &data)?.into())
    }

    /// Boots a Multiboot v1 kernel as QEMU's `-kernel` does: loads it (ELF, or the a.out
    /// kludge), its `modules` (each bytes-like, a path, or a `(data, cmdline)` tuple) and
    /// the multiboot information (memory map, `cmdline`, modules) after the kernel, and
    /// puts `cpu` in 32-bit protected mode at the entry point with EAX = 0x2BADB002 and
    /// EBX = the information's address. The GDT goes at `tables_addr`.
    #[pyo3(
        signature = (cpu, kernel, *, cmdline="", modules=None, tables_addr=Int(0x1000)),
        text_signature = "(self, /, cpu, kernel, *, cmdline='', modules=None, tables_addr=4096)"
    )]
    fn load_multiboot(
        &self,
        cpu: &Bound<'_, Vcpu>,
        kernel: &Bound<'_, PyAny>,
        cmdline: &str,
        modules: Option<Vec<Bound<'_, PyAny>>>,
        tables_addr: Int<u64>,
    ) -> PyResult<LoadedImage> {
        let vcpu = &cpu.get().inner;
        if !Arc::ptr_eq(&vcpu.vm, self.core()) {
            return Err(PyValueError::new_err("the vCPU belongs to another VM"));
        }
        let kernel = image_bytes(kernel)?;
        let modules = modules
            .unwrap_or_default()
            .iter()
            .map(module_arg)
            .collect::<PyResult<Vec<_>>>()?;
        let image =
            load::load_multiboot(&self.inner, vcpu, &kernel, cmdline, &modules, tables_addr.0)?;
        Ok(image.into())
    }

    /// Creates a vCPU. `id` defaults to the lowest id not in use. The vCPU gets the host's
    /// supported CPUID (with the hypervisor bit and its APIC id set).
    #[pyo3(signature = (id=None))]
    fn create_vcpu(slf: &Bound<'_, Self>, id: Option<Int<u64>>) -> PyResult<Vcpu> {
        let inner = slf.get().inner.0.create_vcpu(id.map(|i| i.0))?;
        Ok(Self::wrap_vcpu(slf, inner))
    }

    /// Sets a software breakpoint at guest-virtual `address` for every vCPU (translated by
    /// the first vCPU's page tables): see `Vcpu.add_breakpoint`. Returns `address`.
    /// `hardware=True`: a debug-register breakpoint in every vCPU, where the host has them
    /// (see `Vcpu.add_breakpoint`; `KvmUnsupported` elsewhere).
    #[pyo3(signature = (address, *, hardware=false))]
    fn add_breakpoint(&self, address: Int<u64>, hardware: bool) -> PyResult<u64> {
        let vm = &self.inner.0;
        let Some(cpu) = vm.vcpus().into_iter().next() else {
            return Err(PyValueError::new_err(
                "create a vCPU first: its page tables translate a breakpoint's address",
            ));
        };
        if hardware {
            vm.add_hw_breakpoint(&cpu, address.0, Owner::Vm)?;
        } else {
            vm.add_breakpoint(&cpu, address.0, Owner::Vm)?;
        }
        Ok(address.0)
    }

    /// Removes the VM-wide breakpoint at `address`; `ValueError` if there is none.
    fn remove_breakpoint(&self, address: Int<u64>) -> PyResult<()> {
        Ok(self.inner.0.remove_breakpoint(address.0, Owner::Vm)?)
    }

    /// The addresses of the VM-wide breakpoints set from Python, patched and hardware
    /// (not a gdb client's).
    #[getter]
    fn breakpoints(&self) -> Vec<u64> {
        self.inner.0.breakpoints_of(Owner::Vm)
    }

    /// Starts a gdb remote stub for this VM on `host:port` (port 0: a free port, see
    /// `GdbServer.port`) and returns at once; gdb connects with `target remote HOST:PORT`.
    /// See `GdbServer`. Raises `KvmUnsupported` where breakpoints cannot reach kvmpy (the
    /// vCPUs need `setup_long_mode(exceptions=True)` on hosts whose KVM does not intercept
    /// `int3`), `ValueError` without vCPUs, `OSError` when the port cannot be listened on,
    /// `VcpuBusyError` while another server of this VM has not ended.
    #[pyo3(signature = (port=Int(0), host="127.0.0.1"), text_signature = "(self, /, port=0, host='127.0.0.1')")]
    fn gdb_server(slf: &Bound<'_, Self>, port: Int<u16>, host: &str) -> PyResult<GdbServer> {
        GdbServer::start(slf, host, port.0)
    }

    /// Serves one gdb session on `host:port` and returns when it ends, saying how (see
    /// `GdbServer.ending`); the vCPUs are then stopped where gdb left them. Ctrl-C ends
    /// the session and raises `KeyboardInterrupt`.
    #[pyo3(signature = (port=Int(1234), host="127.0.0.1"), text_signature = "(self, /, port=1234, host='127.0.0.1')")]
    fn serve_gdb(slf: &Bound<'_, Self>, port: Int<u16>, host: &str) -> PyResult<String> {
        let server = GdbServer::start(slf, host, port.0)?;
        server.wait_for(slf.py(), None)?;
        Ok(server.ending_text())
    }

    /// Registers `handler` for port I/O on `ports` (an int or a `range`). Without
    /// `handler`, returns a decorator. The handler gets an `IoExit`; for an IN it returns
    /// the value the guest reads (an int, or bytes of the access size), for an OUT it
    /// returns None. Returns the handler.
    #[pyo3(signature = (ports, handler=None))]
    fn on_io<'py>(
        slf: &Bound<'py, Self>,
        ports: &Bound<'py, PyAny>,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let range = port_range(ports)?;
        Self::handler_or_decorator(slf, handler, move |vm, f| {
            vm.register_io(range, Arc::new(PyHandler::new(f.clone().unbind())))
        })
    }

    /// Registers `handler` for MMIO accesses to `[address, address + size)`, which must not
    /// overlap RAM. Without `handler`, returns a decorator. The handler gets an `MmioExit`;
    /// for a read it returns the data (an int, or bytes of the access size).
    #[pyo3(signature = (address, size, handler=None))]
    fn on_mmio<'py>(
        slf: &Bound<'py, Self>,
        address: Int<u64>,
        size: Int<u64>,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (address, size) = (address.0, size.0);
        Self::handler_or_decorator(slf, handler, move |vm, f| {
            vm.register_mmio(address, size, Arc::new(PyHandler::new(f.clone().unbind())))
        })
    }

    /// Registers `handler` for HLT exits (it returns None to resume the guest after the
    /// `hlt`, or calls `exit.stop()`). Without `handler`, returns a decorator. Without an
    /// HLT handler, `run()` returns on HLT.
    #[pyo3(signature = (handler=None))]
    fn on_hlt<'py>(
        slf: &Bound<'py, Self>,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::handler_or_decorator(slf, handler, |vm, f| vm.register_hlt(f))
    }

    /// Registers `handler` for breakpoints (those of `add_breakpoint`): it gets the
    /// `BreakpointExit`, with the vCPU's registers as they are at the breakpoint, and
    /// returns None to let the guest run on (executing the instruction there), or calls
    /// `exit.stop()` to end the run with that exit. Without `handler`, returns a
    /// decorator. Without a breakpoint handler, `run()` returns at each breakpoint.
    #[pyo3(signature = (handler=None))]
    fn on_breakpoint<'py>(
        slf: &Bound<'py, Self>,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::handler_or_decorator(slf, handler, |vm, f| vm.register_breakpoint(f))
    }

    /// Removes every registration of `handler` (a function, a `Console` or an `ExitPort`).
    /// Returns how many were removed; raises `ValueError` if there were none.
    fn remove_handler(&self, handler: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.remove_registrations(handler)
    }

    /// Adds a console on `port`, handled natively: OUT bytes are collected (read them with
    /// `console.output()`), with no Python call per byte. Keeps the last `limit` bytes.
    #[pyo3(signature = (port=0x3f8, *, limit=Int(1 << 20)))]
    fn add_console(&self, port: i64, limit: Int<usize>) -> PyResult<Console> {
        if limit.0 == 0 {
            return Err(PyValueError::new_err("console limit must be positive"));
        }
        let port = single_port(port)?;
        let dev = Arc::new(ConsoleDev::new(port, limit.0));
        self.register_io((port, u32::from(port) + 1), dev.clone())?;
        Ok(Console { dev })
    }

    /// Adds an exit port: a guest OUT to `port` ends `run()` with a `GuestExit` whose
    /// `reason` is `"exit"` and `code` the value written.
    fn add_exit_port(&self, port: i64) -> PyResult<ExitPort> {
        self.exit_port(port, false)
    }

    /// Adds QEMU's isa-debug-exit device on `port`: a guest write of v ends `run()` with a
    /// `GuestExit` whose `code` is `(v << 1) | 1`, as with `qemu -device isa-debug-exit`.
    #[pyo3(signature = (port=0xf4))]
    fn add_debug_exit(&self, port: i64) -> PyResult<ExitPort> {
        self.exit_port(port, true)
    }

    /// Adds a 16550-style UART on ports `port..port+8`, handled natively (no Python call
    /// per byte): read what the guest sent with `uart.output()`, give it input with
    /// `uart.feed(data)`. Keeps the last `limit` bytes of output.
    #[pyo3(signature = (port=0x3f8, *, limit=Int(1 << 20)))]
    fn add_uart(&self, port: i64, limit: Int<usize>) -> PyResult<Uart> {
        if limit.0 == 0 {
            return Err(PyValueError::new_err("UART limit must be positive"));
        }
        let base = single_port(port)?;
        if u32::from(base) + 8 > 0x10000 {
            return Err(PyValueError::new_err(format!(
                "a UART at {base:#x} would run past port 0xffff"
            )));
        }
        let dev = Arc::new(UartDev::new(base, limit.0));
        self.register_io((base, u32::from(base) + 8), dev.clone())?;
        Ok(Uart { dev })
    }

    /// Registers `handler` as host function `number` (0 to 2**32-1), which guests call
    /// with `out <port>, eax` (EAX = number; arguments in RDI, RSI, RDX, R10, R8, R9; the
    /// result comes back in RAX). The handler gets as many arguments as it declares
    /// positional parameters and returns an int (or None for 0). Without `handler`, returns
    /// a decorator. All host functions of a VM share one port.
    #[pyo3(signature = (number, handler=None, *, port=0xf5))]
    fn host_function<'py>(
        slf: &Bound<'py, Self>,
        number: Int<u32>,
        handler: Option<&Bound<'py, PyAny>>,
        port: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (number, port) = (number.0, single_port(port)?);
        Self::handler_or_decorator(slf, handler, move |vm, f| {
            vm.register_host_function(number, f, port)
        })
    }

    /// Whether the VM has an in-kernel irqchip.
    #[getter]
    fn irqchip(&self) -> bool {
        self.inner.has_irqchip()
    }

    /// Sets the level of interrupt line `irq` of the in-kernel irqchip (`KVM_IRQ_LINE`):
    /// `set_irq_line(4, True)` then `set_irq_line(4, False)` makes an edge. Lines 0-15 go
    /// to the PIC and the IOAPIC, 16-23 to the IOAPIC.
    fn set_irq_line(&self, irq: Int<u32>, level: bool) -> PyResult<()> {
        Ok(self.inner.set_irq_line(irq.0, level)?)
    }

    /// The VM's vCPUs, by creation order.
    #[getter]
    fn vcpus(slf: &Bound<'_, Self>) -> Vec<Vcpu> {
        slf.get()
            .inner
            .vcpus()
            .into_iter()
            .map(|inner| Self::wrap_vcpu(slf, inner))
            .collect()
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Stops running vCPUs, closes the VM's and vCPUs' fds and detaches memory regions.
    /// Idempotent. Raises `VcpuBusyError` when called from a handler of this VM's own
    /// vCPU (stop the run with `exit.stop()` and close after `run()` returns).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(v) = self.inner.vcpu_of_this_thread() {
            return Err(Error::Busy(format!(
                "cannot close the VM from a handler of its own vCPU {}; call exit.stop() and close \
                 it after run() returns",
                v.id
            ))
            .into());
        }
        gil::released(py, || self.inner.shutdown());
        Ok(())
    }

    /// Captures the whole VM (see `Snapshot`) at this exit boundary. No vCPU may be
    /// running (`VcpuBusyError`); an access a handler answered is completed first; a read
    /// returned by `run()` must be answered with `respond()` first. From now on KVM logs
    /// the pages the guest writes, so `restore` copies back only what changed.
    fn snapshot(&self, py: Python<'_>) -> PyResult<crate::py::snapshot::Snapshot> {
        crate::py::snapshot::take(py, self.core())
    }

    /// Puts the VM back as `snapshot` saw it: memory (only the pages written since the
    /// snapshot or the last restore; a whole region if a writable view of it was
    /// exported since), every vCPU's state, the irqchip and PIT, kvmpy's devices. The
    /// snapshot may come from another VM with the same memory regions, vCPU ids and
    /// devices; a mismatch raises `ValueError` before anything changes.
    fn restore(
        &self,
        py: Python<'_>,
        snapshot: PyRef<'_, crate::py::snapshot::Snapshot>,
    ) -> PyResult<()> {
        crate::py::snapshot::restore(py, self.core(), &snapshot)
    }

    /// A new VM from a snapshot: the same memory regions, as copy-on-write views of the
    /// snapshot's memory (several VMs from one snapshot share its pages and pay only for
    /// the pages they write), vCPUs with the same ids, CPUID and state, and the same
    /// irqchip and PIT. kvmpy's devices and handlers are not created: add them, then
    /// `vm.restore(snapshot)` also puts the devices' state back. `dirty_ring=N` as for
    /// `Vm(...)`.
    #[staticmethod]
    #[pyo3(signature = (snapshot, *, dirty_ring=None))]
    fn from_snapshot(
        py: Python<'_>,
        snapshot: PyRef<'_, crate::py::snapshot::Snapshot>,
        dirty_ring: Option<Int<u32>>,
    ) -> PyResult<Self> {
        let core = Arc::clone(&snapshot.inner);
        let entries = dirty_ring.map_or(0, |Int(n)| n);
        if dirty_ring.is_some() && entries == 0 {
            return Err(crate::engine::Error::Value(
                "dirty_ring=0: give a number of entries, or None for the dirty bitmap".into(),
            )
            .into());
        }
        let vm = gil::released(py, || VmCore::from_snapshot_with_ring(&core, entries))?;
        Ok(Vm {
            inner: Arc::new(VmHandle(vm)),
        })
    }

    /// Runs every vCPU on its own native thread until all have stopped, and returns
    /// their final exits (in `vcpus` order). `timeout` applies to each vCPU. With
    /// `until="any"` the first vCPU to stop stops the others; with `until="all"` (the
    /// default) each stops on its own. The first exception a handler raises on any vCPU
    /// stops them all and is raised here; so is `KeyboardInterrupt` (Ctrl-C).
    #[pyo3(signature = (timeout=None, *, until="all"))]
    fn run(&self, py: Python<'_>, timeout: Option<f64>, until: &str) -> PyResult<Vec<Py<PyAny>>> {
        self.start(timeout, until)?;
        Ok(self.join(py, None)?.unwrap_or_default())
    }

    /// Starts every vCPU on its own native thread and returns at once; see `run()`.
    #[pyo3(signature = (timeout=None, *, until="all"))]
    fn start(&self, timeout: Option<f64>, until: &str) -> PyResult<()> {
        vm_group::start(self, timeout, until)
    }

    /// Waits for the vCPUs started by `start()` to stop, at most `timeout` seconds. Returns
    /// their final exits, or None if they are still running at the timeout. Raises the first
    /// handler exception, or `KeyboardInterrupt` on Ctrl-C (after stopping every vCPU).
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Vec<Py<PyAny>>>> {
        vm_group::join(self, py, timeout)
    }

    /// Asks every vCPU to stop; callable from any thread and from handlers. Their runs
    /// end with reason `"stopped"`; a vCPU that is not running stops its next run at once.
    fn stop(&self) {
        self.inner.request_stop_all();
    }

    /// Whether vCPUs started by `start()` have not been joined yet.
    #[getter]
    fn started(&self) -> bool {
        self.inner.group().is_some()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Vm(regions={}, vcpus={}{})",
            self.inner.with_memory(|m| m.regions().len()),
            self.inner.vcpus().len(),
            if self.inner.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> std::result::Result<(), PyTraverseError> {
        // Handlers often close over the VM itself; let the garbage collector see them.
        for device in self.inner.bus().devices() {
            let any = device.as_any();
            if let Some(h) = any.downcast_ref::<PyHandler>() {
                visit.call(&h.f)?;
            } else if let Some(dev) = any.downcast_ref::<HostCallDev>() {
                let Some(functions) = dev.try_functions() else {
                    continue;
                };
                for f in functions.values() {
                    if let Some(h) = f.as_any().downcast_ref::<PyHostFunction>() {
                        visit.call(&h.f)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let _ = self
            .inner
            .update_bus(|_| Ok((crate::engine::Bus::default(), ())));
    }
}
