//! Devices handled in Rust on the vCPU thread, without the GIL.

pub mod console;
pub mod exception;
pub mod exit_port;
pub mod hostcall;
pub mod uart;
