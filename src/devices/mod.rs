//! Devices on the bus, one file each: every one implements `engine::Device` and runs on
//! the vCPU thread without Python.

pub mod console;
pub mod exception;
pub mod exit_port;
pub mod hostcall;
pub mod uart;
