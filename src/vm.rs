//! The VM: its KVM fd, guest memory, handler table and vCPUs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm, VmFd};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCFunction, PyRange, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::devices::console::{Console, ConsoleDev};
use crate::devices::exception::ExceptionDev;
use crate::devices::exit_port::{ExitPort, ExitPortDev};
use crate::devices::hostcall::{arg_count, HostCallDev, HostFn};
use crate::devices::uart::{Uart, UartDev};
use crate::dispatch::{Handler, HandlerTable};
use crate::error::{Error, Result};
use crate::kvm;
use crate::load::{self, LoadedImage};
use crate::memory::{bytes_arg, MemoryMap, MemoryRegion};
use crate::runner::RunGroup;
use crate::vcpu::{gettid, Vcpu, VcpuInner};

/// Where KVM puts the three-page TSS it needs for real mode on Intel hosts: just below the
/// 4 GiB boundary, where firmware would be, as QEMU and Firecracker do.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// The state of one VM, shared by its Python object, its vCPUs and its memory regions.
pub struct VmInner {
    kvm: Arc<Kvm>,
    fd: Mutex<Option<VmFd>>,
    memory: Mutex<MemoryMap>,
    handlers: RwLock<Arc<HandlerTable>>,
    vcpus: Mutex<Vcpus>,
    closed: AtomicBool,
    irqchip: bool,
    /// The vCPU threads of the last `start()`, until `join()`.
    group: Mutex<Option<Arc<RunGroup>>>,
}

/// The VM's vCPUs. KVM keeps a vCPU until the VM is destroyed, and so does the VM: a vCPU
/// whose Python object is gone still runs with `Vm.run()`. (Each vCPU refers to its VM;
/// `shutdown` breaks that cycle.)
#[derive(Default)]
struct Vcpus {
    all: Vec<Arc<VcpuInner>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmInner {
    /// Whether the VM has an in-kernel irqchip (PIC, IOAPIC and local APICs).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed("VM"))
        } else {
            Ok(())
        }
    }

    /// The current handler table.
    pub fn handlers(&self) -> Arc<HandlerTable> {
        Arc::clone(&self.handlers.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Installs a new table. Tables are changed read-copy-update style from methods that
    /// hold the GIL, which keeps two changes from racing.
    fn set_handlers(&self, table: HandlerTable) {
        *self.handlers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    fn with_fd<T>(&self, f: impl FnOnce(&VmFd) -> Result<T>) -> Result<T> {
        let guard = lock(&self.fd);
        f(guard.as_ref().ok_or(Error::Closed("VM"))?)
    }

    /// `KVM_GET_DIRTY_LOG` for a slot.
    pub fn dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>> {
        self.with_fd(|fd| {
            fd.get_dirty_log(slot, size)
                .map_err(|e| Error::ioctl("KVM_GET_DIRTY_LOG", e))
        })
    }

    /// Whether guests may use 1 GiB pages (CPUID 0x80000001 EDX bit 26).
    pub fn supports_1gib_pages(&self) -> Result<bool> {
        Ok(kvm::supported_cpuid(&self.kvm)?
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0))
    }

    /// The `[start, end)` guest-physical ranges of the memory regions, by address.
    pub fn region_ranges(&self) -> Vec<(u64, u64)> {
        lock(&self.memory)
            .regions()
            .iter()
            .map(|r| (r.guest_addr, r.end()))
            .collect()
    }

    /// Reads guest physical memory.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        lock(&self.memory).read(gpa, buf)
    }

    /// Fails unless `[gpa, gpa + len)` is guest RAM.
    pub fn check_memory(&self, gpa: u64, len: usize) -> Result<()> {
        self.check_open()?;
        lock(&self.memory).check(gpa, len)
    }

    /// Registers the exception report port for reports at `report` (idempotent).
    pub fn register_exception_port(&self, py: Python<'_>, port: u16, report: u64) -> Result<()> {
        self.check_open()?;
        let table = self.handlers();
        if let Some(Handler::Exception(dev)) = table.io(port) {
            if dev.report == report {
                return Ok(());
            }
        }
        let dev = Arc::new(ExceptionDev { port, report });
        self.set_handlers(table.with_io(py, port, u32::from(port) + 1, Handler::Exception(dev))?);
        Ok(())
    }

    /// Writes guest physical memory.
    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.check_open()?;
        lock(&self.memory).write(gpa, data)
    }

    /// Asks every vCPU of the VM to stop, from any thread; does not wait.
    pub fn stop_all(&self) {
        for v in self.live_vcpus() {
            v.kicker.stop();
        }
    }

    /// Stops running vCPUs and waits for them (except one run by the calling thread, which
    /// stops at its next exit), then closes every fd. Call without holding the GIL.
    pub fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = gettid();
        let vcpus = self.live_vcpus();
        for v in &vcpus {
            if v.runner() == Some(me) {
                v.kicker.stop();
            } else {
                v.close();
            }
        }
        if let Some(group) = lock(&self.group).take() {
            if group.vcpus.iter().all(|v| v.runner() != Some(me)) {
                group.wait(None);
                group.finish();
            }
        }
        lock(&self.vcpus).all.clear();
        lock(&self.fd).take();
        lock(&self.memory).clear();
        self.set_handlers(HandlerTable::default());
    }

    /// The vCPU of this VM the calling thread is running, if any (we are in its handler).
    fn vcpu_of_this_thread(&self) -> Option<Arc<VcpuInner>> {
        let me = gettid();
        self.live_vcpus()
            .into_iter()
            .find(|v| v.runner() == Some(me))
    }

    fn live_vcpus(&self) -> Vec<Arc<VcpuInner>> {
        lock(&self.vcpus).all.clone()
    }
}

/// Parses a port argument: an int or a `range` with step 1. Returns `[start, end)`.
fn port_range(ports: &Bound<'_, PyAny>) -> PyResult<(u16, u32)> {
    if let Ok(r) = ports.cast::<PyRange>() {
        let (start, stop, step): (i64, i64, i64) = (
            r.getattr("start")?.extract()?,
            r.getattr("stop")?.extract()?,
            r.getattr("step")?.extract()?,
        );
        if step != 1 || start >= stop || start < 0 || stop > 0x10000 {
            return Err(PyValueError::new_err(format!(
                "port range must be a non-empty range(start, stop) with step 1 inside 0..0x10000, got {}",
                ports.repr()?
            )));
        }
        return Ok((start as u16, stop as u32));
    }
    match ports.extract::<i64>() {
        Ok(p) if (0..=0xffff).contains(&p) => Ok((p as u16, p as u32 + 1)),
        Ok(p) => Err(PyValueError::new_err(format!(
            "I/O port {p:#x} is outside 0..0xffff"
        ))),
        Err(_) => Err(PyTypeError::new_err(
            "ports must be an int or a range of ints",
        )),
    }
}

fn single_port(port: i64) -> PyResult<u16> {
    u16::try_from(port)
        .map_err(|_| PyValueError::new_err(format!("I/O port {port:#x} is outside 0..0xffff")))
}

fn check_callable(handler: &Bound<'_, PyAny>) -> PyResult<()> {
    if handler.is_callable() {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!(
            "handler must be callable, got {}",
            handler.get_type().name()?
        )))
    }
}

/// A KVM virtual machine.
///
/// Holds guest memory regions, vCPUs and exit handlers. Use it as a context manager or
/// call `close()`: closing stops running vCPUs, closes every KVM fd the VM owns and detaches
/// its memory regions.
#[pyclass(module = "kvmpy._native", frozen, subclass)]
pub struct Vm {
    inner: Arc<VmHandle>,
}

/// The `Vm` object's hold on the VM (its `Vcpu` and `MemoryRegion` objects keep the `Vm`
/// object alive, visibly to the garbage collector): when the `Vm` object goes away, the VM
/// is shut down (running vCPUs stopped, fds closed). vCPU threads only hold `VmInner`.
pub struct VmHandle(pub Arc<VmInner>);

impl std::ops::Deref for VmHandle {
    type Target = VmInner;
    fn deref(&self) -> &VmInner {
        &self.0
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.0.is_closed() {
            return;
        }
        if self.0.live_vcpus().iter().any(|v| v.runner().is_some()) {
            // Waiting for vCPU threads that may need the GIL for a handler: release it.
            Python::attach(|py| py.detach(|| self.0.shutdown()));
        } else {
            self.0.shutdown();
        }
    }
}

/// VMs with background runs, stopped by `shutdown_all` when the interpreter exits.
static BACKGROUND: Mutex<Vec<Weak<VmInner>>> = Mutex::new(Vec::new());

/// Stops every VM that has vCPU threads, before the interpreter goes away (atexit).
#[pyfunction]
#[pyo3(name = "_shutdown_all")]
pub fn shutdown_all(py: Python<'_>) {
    let vms: Vec<Arc<VmInner>> = lock(&BACKGROUND)
        .drain(..)
        .filter_map(|w| w.upgrade())
        .collect();
    py.detach(|| vms.iter().for_each(|vm| vm.shutdown()));
}

impl Vm {
    fn exit_port(&self, py: Python<'_>, port: i64, debug_exit: bool) -> PyResult<ExitPort> {
        let port = single_port(port)?;
        let dev = Arc::new(ExitPortDev { port, debug_exit });
        self.register_io(
            py,
            (port, u32::from(port) + 1),
            Handler::ExitPort(Arc::clone(&dev)),
        )?;
        Ok(ExitPort { dev })
    }

    fn register_host_function(&self, number: u32, f: &Bound<'_, PyAny>, port: u16) -> PyResult<()> {
        let py = f.py();
        self.inner.check_open()?;
        check_callable(f)?;
        let nargs = arg_count(f)?;
        let table = self.inner.handlers();
        let dev = match table.io(port) {
            Some(Handler::HostCall(dev)) => Arc::clone(dev),
            _ => {
                let dev = Arc::new(HostCallDev::new(port));
                let new = table.with_io(
                    py,
                    port,
                    u32::from(port) + 1,
                    Handler::HostCall(Arc::clone(&dev)),
                )?;
                self.inner.set_handlers(new);
                dev
            }
        };
        dev.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                number,
                HostFn {
                    f: f.clone().unbind(),
                    nargs,
                },
            );
        Ok(())
    }

    /// Joins a finished group's threads, forgets it, and returns its first error.
    fn finish_group(&self, group: &Arc<RunGroup>) -> Option<PyErr> {
        let mut current = lock(&self.inner.group);
        if current.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
            *current = None;
        }
        drop(current);
        group.finish()
    }

    fn register_io(
        &self,
        py: Python<'_>,
        (start, end): (u16, u32),
        handler: Handler,
    ) -> PyResult<()> {
        self.inner.check_open()?;
        let table = self.inner.handlers().with_io(py, start, end, handler)?;
        self.inner.set_handlers(table);
        Ok(())
    }

    fn register_mmio(
        &self,
        py: Python<'_>,
        address: u64,
        size: u64,
        handler: Handler,
    ) -> PyResult<()> {
        self.inner.check_open()?;
        if size == 0 {
            return Err(Error::Memory("MMIO range size must not be zero".into()).into());
        }
        let end = address.checked_add(size).ok_or_else(|| {
            Error::Memory(format!("MMIO range {address:#x} + {size:#x} overflows"))
        })?;
        if let Some(r) = lock(&self.inner.memory).overlapping(address, end) {
            return Err(Error::Memory(format!(
                "MMIO range {address:#x}..{end:#x} overlaps memory region {:#x}..{:#x}: accesses \
                 there go to RAM and never exit",
                r.guest_addr,
                r.end()
            ))
            .into());
        }
        let table = self.inner.handlers().with_mmio(py, address, end, handler)?;
        self.inner.set_handlers(table);
        Ok(())
    }

    /// Returns a decorator that registers the function it decorates with `register`.
    fn decorator<'py>(
        py: Python<'py>,
        register: impl Fn(&Bound<'_, PyAny>) -> PyResult<()> + Send + Sync + 'static,
    ) -> PyResult<Bound<'py, PyAny>> {
        let f =
            PyCFunction::new_closure(py, None, None, move |args: &Bound<'_, PyTuple>, _kwargs| {
                let func = args.get_item(0)?;
                check_callable(&func)?;
                register(&func)?;
                Ok::<_, PyErr>(func.unbind())
            })?;
        Ok(f.into_any())
    }
}

#[pymethods]
impl Vm {
    /// Creates a VM. With `irqchip=True` KVM emulates the PIC, IOAPIC and local APICs in
    /// the kernel (raise interrupts with `set_irq_line`; HLT is then handled in the kernel
    /// and never reaches `on_hlt`); with `pit=True` (needs `irqchip`) also the PIT timer.
    #[new]
    #[pyo3(signature = (*, irqchip=false, pit=false))]
    fn new(irqchip: bool, pit: bool) -> PyResult<Self> {
        if pit && !irqchip {
            return Err(PyValueError::new_err("pit=True needs irqchip=True"));
        }
        let kvm = kvm::shared()?;
        let fd = kvm
            .create_vm()
            .map_err(|e| Error::ioctl("KVM_CREATE_VM", e))?;
        if kvm::has_cap(&kvm, Cap::SetTssAddr) {
            fd.set_tss_address(TSS_ADDRESS)
                .map_err(|e| Error::ioctl("KVM_SET_TSS_ADDR", e))?;
        }
        // KVM's order: the irqchip before the PIT, both before any vCPU.
        if irqchip {
            fd.create_irq_chip()
                .map_err(|e| Error::ioctl("KVM_CREATE_IRQCHIP", e))?;
        }
        if pit {
            let config = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(config)
                .map_err(|e| Error::ioctl("KVM_CREATE_PIT2", e))?;
        }
        Ok(Vm {
            inner: Arc::new(VmHandle(Arc::new(VmInner {
                kvm,
                fd: Mutex::new(Some(fd)),
                memory: Mutex::new(MemoryMap::default()),
                handlers: RwLock::new(Arc::new(HandlerTable::default())),
                vcpus: Mutex::new(Vcpus::default()),
                closed: AtomicBool::new(false),
                irqchip,
                group: Mutex::new(None),
            }))),
        })
    }

    /// Adds `size` bytes of RAM at guest physical address `guest_addr` (both page
    /// aligned). With `readonly=True` guest writes exit as MMIO writes; with
    /// `dirty_log=True` KVM logs written pages (see `MemoryRegion.dirty_pages`).
    #[pyo3(signature = (guest_addr, size, *, readonly=false, dirty_log=false))]
    fn add_memory(
        slf: &Bound<'_, Self>,
        guest_addr: u64,
        size: u64,
        readonly: bool,
        dirty_log: bool,
    ) -> PyResult<MemoryRegion> {
        let inner = &slf.get().inner;
        inner.check_open()?;
        if readonly && !kvm::has_cap(&inner.kvm, Cap::ReadonlyMem) {
            return Err(
                Error::Memory("this host's KVM does not support read-only memory".into()).into(),
            );
        }
        if let Some(end) = guest_addr.checked_add(size) {
            if let Some((s, e)) = inner.handlers().mmio_overlapping(guest_addr, end) {
                return Err(Error::Memory(format!(
                    "memory region {guest_addr:#x}..{end:#x} overlaps the MMIO range {s:#x}..{e:#x}"
                ))
                .into());
            }
        }
        let max_slots = inner.kvm.get_nr_memslots();
        let region = inner.with_fd(|fd| {
            lock(&inner.memory).add(fd, max_slots, guest_addr, size, readonly, dirty_log)
        })?;
        Ok(MemoryRegion {
            region,
            vm: Arc::clone(&inner.0),
            owner: slf.clone().unbind(),
        })
    }

    /// Removes a region from the guest's address space. Views of it stay valid; its
    /// `read`/`write` raise afterwards.
    fn remove_memory(&self, region: &Bound<'_, MemoryRegion>) -> PyResult<()> {
        let region = region.get();
        if !Arc::ptr_eq(&region.vm, &self.inner.0) {
            return Err(Error::Memory("the memory region belongs to another VM".into()).into());
        }
        self.inner.check_open()?;
        self.inner
            .with_fd(|fd| lock(&self.inner.memory).remove(fd, &region.region))?;
        Ok(())
    }

    /// The VM's memory regions, by guest address.
    #[getter]
    fn memory_regions(slf: &Bound<'_, Self>) -> Vec<MemoryRegion> {
        let inner = &slf.get().inner;
        lock(&inner.memory)
            .regions()
            .iter()
            .map(|r| MemoryRegion {
                region: Arc::clone(r),
                vm: Arc::clone(&inner.0),
                owner: slf.clone().unbind(),
            })
            .collect()
    }

    /// Reads `n` bytes of guest physical memory at `gpa`; the range may span regions but
    /// must lie entirely in guest RAM.
    fn read<'py>(&self, py: Python<'py>, gpa: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        self.inner.check_open()?;
        let memory = lock(&self.inner.memory);
        memory.check(gpa, n)?;
        PyBytes::new_with(py, n, |buf| Ok(memory.read(gpa, buf)?))
    }

    /// Writes a bytes-like object to guest physical memory at `gpa`.
    fn write(&self, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.check_open()?;
        let data = bytes_arg(data)?;
        lock(&self.inner.memory).write(gpa, &data)?;
        Ok(())
    }

    /// Writes a flat binary image (bytes-like, or a path to read) at guest physical
    /// `address`; it must lie entirely in RAM.
    fn load_flat(&self, image: &Bound<'_, PyAny>, address: u64) -> PyResult<()> {
        let data = load::image_bytes(image)?;
        Ok(load::load_flat(&self.inner, &data, address)?)
    }

    /// Loads an ELF executable (32- or 64-bit x86; bytes-like, or a path to read): each
    /// PT_LOAD segment at its physical address, zero-filled past its file size. Every
    /// segment and the entry point must lie in RAM. Returns a `LoadedImage` with the entry
    /// point and the symbol table. Set the vCPU's mode and `rip` yourself.
    fn load_elf(&self, image: &Bound<'_, PyAny>) -> PyResult<LoadedImage> {
        let data = load::image_bytes(image)?;
        Ok(load::load_elf(&self.inner, &data)?)
    }

    /// Boots a Multiboot v1 kernel as QEMU's `-kernel` does: loads it (ELF, or the a.out
    /// kludge), its `modules` (each bytes-like, a path, or a `(data, cmdline)` tuple) and
    /// the multiboot information (memory map, `cmdline`, modules) after the kernel, and
    /// puts `cpu` in 32-bit protected mode at the entry point with EAX = 0x2BADB002 and
    /// EBX = the information's address. The GDT goes at `tables_addr`.
    #[pyo3(signature = (cpu, kernel, *, cmdline="", modules=None, tables_addr=0x1000))]
    fn load_multiboot(
        &self,
        cpu: &Bound<'_, Vcpu>,
        kernel: &Bound<'_, PyAny>,
        cmdline: &str,
        modules: Option<Vec<Bound<'_, PyAny>>>,
        tables_addr: u64,
    ) -> PyResult<LoadedImage> {
        let vcpu = &cpu.get().inner;
        if !Arc::ptr_eq(&vcpu.vm, &self.inner.0) {
            return Err(PyValueError::new_err("the vCPU belongs to another VM"));
        }
        let kernel = load::image_bytes(kernel)?;
        let modules = modules
            .unwrap_or_default()
            .iter()
            .map(load::module_arg)
            .collect::<PyResult<Vec<_>>>()?;
        Ok(load::load_multiboot(
            &self.inner,
            vcpu,
            &kernel,
            cmdline,
            &modules,
            tables_addr,
        )?)
    }

    /// Creates a vCPU. `id` defaults to the lowest id not in use. The vCPU gets the host's
    /// supported CPUID (with the hypervisor bit and its APIC id set).
    #[pyo3(signature = (id=None))]
    fn create_vcpu(slf: &Bound<'_, Self>, id: Option<u64>) -> PyResult<Vcpu> {
        let inner = &slf.get().inner;
        inner.check_open()?;
        let mut vcpus = lock(&inner.vcpus);
        let used: Vec<u64> = vcpus.all.iter().map(|v| v.id).collect();
        let id = match id {
            Some(id) if used.contains(&id) => {
                return Err(PyValueError::new_err(format!(
                    "a vCPU with id {id} already exists"
                )))
            }
            Some(id) => id,
            None => (0..).find(|i| !used.contains(i)).unwrap_or(0),
        };
        let max_id = inner.kvm.get_max_vcpu_id() as u64;
        if id >= max_id {
            return Err(PyValueError::new_err(format!(
                "vCPU id {id} is out of range (max {})",
                max_id - 1
            )));
        }
        if used.len() >= inner.kvm.get_max_vcpus() {
            return Err(PyValueError::new_err(format!(
                "this VM already has the maximum of {} vCPUs",
                inner.kvm.get_max_vcpus()
            )));
        }
        let fd = inner.with_fd(|fd| {
            fd.create_vcpu(id)
                .map_err(|e| Error::ioctl("KVM_CREATE_VCPU", e))
        })?;
        let cpuid = kvm::cpuid_for_vcpu(&inner.kvm, id)?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::ioctl("KVM_SET_CPUID2", e))?;
        let sync_regs = inner
            .kvm
            .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into())
            & kvm_bindings::KVM_SYNC_X86_REGS as i32
            != 0;
        let vcpu = Arc::new(VcpuInner::new(id, Arc::clone(&inner.0), fd, sync_regs));
        vcpus.all.push(Arc::clone(&vcpu));
        Ok(Vcpu {
            inner: vcpu,
            owner: slf.clone().unbind(),
        })
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
        let py = slf.py();
        let range = port_range(ports)?;
        match handler {
            Some(h) => {
                check_callable(h)?;
                slf.get()
                    .register_io(py, range, Handler::Python(h.clone().unbind()))?;
                Ok(h.clone())
            }
            None => {
                let vm = slf.clone().unbind();
                Self::decorator(py, move |f| {
                    vm.get()
                        .register_io(f.py(), range, Handler::Python(f.clone().unbind()))
                })
            }
        }
    }

    /// Registers `handler` for MMIO accesses to `[address, address + size)`, which must not
    /// overlap RAM. Without `handler`, returns a decorator. The handler gets an `MmioExit`;
    /// for a read it returns the data (an int, or bytes of the access size).
    #[pyo3(signature = (address, size, handler=None))]
    fn on_mmio<'py>(
        slf: &Bound<'py, Self>,
        address: u64,
        size: u64,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match handler {
            Some(h) => {
                check_callable(h)?;
                slf.get()
                    .register_mmio(py, address, size, Handler::Python(h.clone().unbind()))?;
                Ok(h.clone())
            }
            None => {
                let vm = slf.clone().unbind();
                Self::decorator(py, move |f| {
                    vm.get().register_mmio(
                        f.py(),
                        address,
                        size,
                        Handler::Python(f.clone().unbind()),
                    )
                })
            }
        }
    }

    /// Registers `handler` for HLT exits (it returns None to resume the guest after the
    /// `hlt`, or calls `exit.stop()`). Without `handler`, returns a decorator. Without an
    /// HLT handler, `run()` returns on HLT.
    #[pyo3(signature = (handler=None))]
    fn on_hlt<'py>(
        slf: &Bound<'py, Self>,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let register = |vm: &Vm, f: &Bound<'_, PyAny>| -> PyResult<()> {
            vm.inner.check_open()?;
            let table = vm
                .inner
                .handlers()
                .with_hlt(f.py(), Some(f.clone().unbind()));
            vm.inner.set_handlers(table);
            Ok(())
        };
        match handler {
            Some(h) => {
                check_callable(h)?;
                register(slf.get(), h)?;
                Ok(h.clone())
            }
            None => {
                let vm = slf.clone().unbind();
                Self::decorator(py, move |f| register(vm.get(), f))
            }
        }
    }

    /// Removes every registration of `handler` (a function, a `Console` or an `ExitPort`).
    /// Returns how many were removed; raises `ValueError` if there were none.
    fn remove_handler(&self, py: Python<'_>, handler: &Bound<'_, PyAny>) -> PyResult<usize> {
        let (table, removed) = self.inner.handlers().without(py, handler);
        if removed == 0 {
            return Err(PyValueError::new_err(format!(
                "{} is not registered with this VM",
                handler.repr()?
            )));
        }
        self.inner.set_handlers(table);
        Ok(removed)
    }

    /// Adds a console on `port`, handled natively: OUT bytes are collected (read them with
    /// `console.output()`), with no Python call per byte. Keeps the last `limit` bytes.
    #[pyo3(signature = (port=0x3f8, *, limit=1 << 20))]
    fn add_console(&self, py: Python<'_>, port: i64, limit: usize) -> PyResult<Console> {
        if limit == 0 {
            return Err(PyValueError::new_err("console limit must be positive"));
        }
        let port = single_port(port)?;
        let dev = Arc::new(ConsoleDev::new(port, limit));
        self.register_io(
            py,
            (port, u32::from(port) + 1),
            Handler::Console(Arc::clone(&dev)),
        )?;
        Ok(Console { dev })
    }

    /// Adds an exit port: a guest OUT to `port` ends `run()` with a `GuestExit` whose
    /// `reason` is `"exit"` and `code` the value written.
    fn add_exit_port(&self, py: Python<'_>, port: i64) -> PyResult<ExitPort> {
        self.exit_port(py, port, false)
    }

    /// Adds QEMU's isa-debug-exit device on `port`: a guest write of v ends `run()` with a
    /// `GuestExit` whose `code` is `(v << 1) | 1`, as with `qemu -device isa-debug-exit`.
    #[pyo3(signature = (port=0xf4))]
    fn add_debug_exit(&self, py: Python<'_>, port: i64) -> PyResult<ExitPort> {
        self.exit_port(py, port, true)
    }

    /// Adds a 16550-style UART on ports `port..port+8`, handled natively (no Python call
    /// per byte): read what the guest sent with `uart.output()`, give it input with
    /// `uart.feed(data)`. Keeps the last `limit` bytes of output.
    #[pyo3(signature = (port=0x3f8, *, limit=1 << 20))]
    fn add_uart(&self, py: Python<'_>, port: i64, limit: usize) -> PyResult<Uart> {
        if limit == 0 {
            return Err(PyValueError::new_err("UART limit must be positive"));
        }
        let base = single_port(port)?;
        if u32::from(base) + 8 > 0x10000 {
            return Err(PyValueError::new_err(format!(
                "a UART at {base:#x} would run past port 0xffff"
            )));
        }
        let dev = Arc::new(UartDev::new(base, limit));
        self.register_io(
            py,
            (base, u32::from(base) + 8),
            Handler::Uart(Arc::clone(&dev)),
        )?;
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
        number: u32,
        handler: Option<&Bound<'py, PyAny>>,
        port: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let port = single_port(port)?;
        match handler {
            Some(h) => {
                slf.get().register_host_function(number, h, port)?;
                Ok(h.clone())
            }
            None => {
                let vm = slf.clone().unbind();
                Self::decorator(slf.py(), move |f| {
                    vm.get().register_host_function(number, f, port)
                })
            }
        }
    }

    /// Whether the VM has an in-kernel irqchip.
    #[getter]
    fn irqchip(&self) -> bool {
        self.inner.irqchip
    }

    /// Sets the level of interrupt line `irq` of the in-kernel irqchip (`KVM_IRQ_LINE`):
    /// `set_irq_line(4, True)` then `set_irq_line(4, False)` makes an edge. Lines 0-15 go
    /// to the PIC and the IOAPIC, 16-23 to the IOAPIC.
    fn set_irq_line(&self, irq: u32, level: bool) -> PyResult<()> {
        self.inner.check_open()?;
        if !self.inner.irqchip {
            return Err(Error::Value(
                "this VM has no in-kernel irqchip: create it with Vm(irqchip=True), or queue \
                 interrupts with vcpu.interrupt()"
                    .into(),
            )
            .into());
        }
        self.inner.with_fd(|fd| {
            fd.set_irq_line(irq, level)
                .map_err(|e| Error::ioctl("KVM_IRQ_LINE", e))
        })?;
        Ok(())
    }

    /// The VM's vCPUs, by creation order.
    #[getter]
    fn vcpus(slf: &Bound<'_, Self>) -> Vec<Vcpu> {
        slf.get()
            .inner
            .live_vcpus()
            .into_iter()
            .map(|inner| Vcpu {
                inner,
                owner: slf.clone().unbind(),
            })
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
        py.detach(|| self.inner.shutdown());
        Ok(())
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
        let inner = &self.inner;
        inner.check_open()?;
        let until_any = match until {
            "all" => false,
            "any" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "until must be \"all\" or \"any\", not {other:?}"
                )))
            }
        };
        let deadline = crate::vcpu::deadline_after(timeout)?;
        let mut group = lock(&inner.group);
        if group.is_some() {
            return Err(Error::Busy(
                "the VM's vCPUs were started and not joined yet: call join()".into(),
            )
            .into());
        }
        let vcpus = inner.live_vcpus();
        if vcpus.is_empty() {
            return Err(PyValueError::new_err(
                "the VM has no vCPUs: create_vcpu() first",
            ));
        }
        *group = Some(RunGroup::start(&inner.0, vcpus, deadline, until_any)?);
        let mut background = lock(&BACKGROUND);
        background.retain(|w| w.strong_count() > 0);
        if !background
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&inner.0)))
        {
            background.push(Arc::downgrade(&inner.0));
        }
        Ok(())
    }

    /// Waits for the vCPUs started by `start()` to stop, at most `timeout` seconds. Returns
    /// their final exits, or None if they are still running at the timeout. Raises the first
    /// handler exception, or `KeyboardInterrupt` on Ctrl-C (after stopping every vCPU).
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Vec<Py<PyAny>>>> {
        let inner = &self.inner;
        if let Some(v) = inner.vcpu_of_this_thread() {
            return Err(Error::Busy(format!(
                "cannot join the VM from a handler of its own vCPU {}",
                v.id
            ))
            .into());
        }
        let deadline = crate::vcpu::deadline_after(timeout)?;
        let Some(group) = lock(&inner.group).clone() else {
            return Err(PyValueError::new_err("nothing to join: call start() first"));
        };
        loop {
            let step = Duration::from_millis(50);
            let step = deadline.map_or(step, |d| {
                step.min(d.saturating_duration_since(Instant::now()))
            });
            if py.detach(|| group.wait(Some(step))) {
                break;
            }
            if let Err(e) = py.check_signals() {
                inner.stop_all();
                py.detach(|| group.wait(None));
                self.finish_group(&group);
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
        if let Some(e) = self.finish_group(&group) {
            return Err(e);
        }
        let mut exits = Vec::with_capacity(group.vcpus.len());
        for v in &group.vcpus {
            exits.push(v.last_exit(py)?.unwrap_or_else(|| py.None()));
        }
        Ok(Some(exits))
    }

    /// Asks every vCPU to stop; callable from any thread and from handlers. Their runs
    /// end with reason `"stopped"`.
    fn stop(&self) {
        self.inner.stop_all();
    }

    /// Whether vCPUs started by `start()` have not been joined yet.
    #[getter]
    fn started(&self) -> bool {
        lock(&self.inner.group).is_some()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        let memory = lock(&self.inner.memory);
        format!(
            "Vm(regions={}, vcpus={}{})",
            memory.regions().len(),
            self.inner.live_vcpus().len(),
            if self.inner.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> std::result::Result<(), PyTraverseError> {
        // Handlers often close over the VM itself; let the garbage collector see them.
        let Ok(table) = self.inner.handlers.try_read() else {
            return Ok(());
        };
        table.visit(|obj| visit.call(obj))
    }

    fn __clear__(&self) {
        self.inner.set_handlers(HandlerTable::default());
    }
}
