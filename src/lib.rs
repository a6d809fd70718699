//! kvmpy's native core: the `kvmpy._native` extension module.
//!
//! This file only assembles the module; each concern lives in its own file.

mod arch;
mod devices;
mod dispatch;
mod error;
mod exit;
mod kick;
mod kvm;
mod load;
mod loader;
mod memory;
mod regs;
mod runner;
mod vcpu;
mod vm;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<kvm::PyKvm>()?;
    m.add_class::<kvm::CpuidEntry>()?;
    m.add_class::<vm::Vm>()?;
    m.add_class::<vcpu::Vcpu>()?;
    m.add_class::<memory::MemoryRegion>()?;
    m.add_class::<regs::Regs>()?;
    m.add_class::<regs::Sregs>()?;
    m.add_class::<regs::Segment>()?;
    m.add_class::<regs::DTable>()?;
    m.add_class::<exit::ExitInfo>()?;
    m.add_class::<exit::IoExit>()?;
    m.add_class::<exit::MmioExit>()?;
    m.add_class::<exit::GuestExit>()?;
    m.add_class::<exit::FailEntryExit>()?;
    m.add_class::<exit::InternalErrorExit>()?;
    m.add_class::<exit::SystemEventExit>()?;
    m.add_class::<exit::DebugExit>()?;
    m.add_class::<exit::ExceptionExit>()?;
    m.add_class::<exit::UnknownExit>()?;
    m.add_class::<devices::console::Console>()?;
    m.add_class::<devices::exit_port::ExitPort>()?;
    m.add_class::<devices::uart::Uart>()?;
    m.add_class::<load::LoadedImage>()?;
    m.add_function(wrap_pyfunction!(vm::shutdown_all, m)?)?;
    m.add("KVM_API_VERSION", kvm::KVM_API_VERSION)?;
    Ok(())
}
