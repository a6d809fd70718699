//! kvmpy's native core: the `kvmpy._native` extension module.
//!
//! `engine` runs VMs without Python; `py` is the Python face over it; `devices`, `arch` and
//! `loader` are what the engine uses. This file only assembles the module.

pub mod arch;
pub mod devices;
pub mod engine;
pub mod loader;
mod py;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    engine::runner::on_thread_end(py::gil::release_thread_state);
    m.add_class::<py::kvm::PyKvm>()?;
    m.add_class::<py::kvm::CpuidEntry>()?;
    m.add_class::<py::vm::Vm>()?;
    m.add_class::<py::vcpu::Vcpu>()?;
    m.add_class::<py::memory::MemoryRegion>()?;
    m.add_class::<py::regs::Regs>()?;
    m.add_class::<py::regs::Sregs>()?;
    m.add_class::<py::regs::Segment>()?;
    m.add_class::<py::regs::DTable>()?;
    m.add_class::<py::exit::ExitInfo>()?;
    m.add_class::<py::exit::IoExit>()?;
    m.add_class::<py::exit::MmioExit>()?;
    m.add_class::<py::exit::GuestExit>()?;
    m.add_class::<py::exit::FailEntryExit>()?;
    m.add_class::<py::exit::InternalErrorExit>()?;
    m.add_class::<py::exit::SystemEventExit>()?;
    m.add_class::<py::exit::DebugExit>()?;
    m.add_class::<py::exit::ExceptionExit>()?;
    m.add_class::<py::exit::BreakpointExit>()?;
    m.add_class::<py::exit::StepExit>()?;
    m.add_class::<py::watch::WatchpointExit>()?;
    m.add_class::<py::exit::UnknownExit>()?;
    m.add_class::<py::devices::Console>()?;
    m.add_class::<py::devices::ExitPort>()?;
    m.add_class::<py::devices::Uart>()?;
    m.add_class::<py::load::LoadedImage>()?;
    m.add_class::<py::snapshot::Snapshot>()?;
    m.add_class::<py::fuzz::FuzzExecutor>()?;
    m.add_class::<py::gdb::GdbServer>()?;
    m.add_function(wrap_pyfunction!(py::vm_group::shutdown_all, m)?)?;
    m.add_function(wrap_pyfunction!(py::exit::exit_reasons, m)?)?;
    m.add_function(wrap_pyfunction!(py::kvm::kick_signal, m)?)?;
    m.add_function(wrap_pyfunction!(py::kvm::debug_support, m)?)?;
    m.add_function(wrap_pyfunction!(py::disasm::disassemble, m)?)?;
    m.add_function(wrap_pyfunction!(py::disasm::find_blocks, m)?)?;
    m.add("KVM_API_VERSION", engine::kvm::KVM_API_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Built with the profile of pgo/build.sh.
    m.add("PGO", cfg!(kvmpy_pgo))?;
    Ok(())
}
