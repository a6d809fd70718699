//! The Python face: the `kvmpy._native` classes over the engine. Conversions, the
//! devices that call Python, and the GIL helpers live here; the engine never sees Python.

pub mod args;
pub mod campaign;
pub mod devices;
pub mod disasm;
pub mod error;
pub mod exit;
pub mod exit_kinds;
pub mod fuzz;
pub mod gdb;
pub mod gil;
pub mod handler;
pub mod interrupt;
pub mod kvm;
pub mod load;
pub mod memory;
pub mod register;
pub mod regs;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vm_group;
pub mod watch;
