//! An exit port: a guest OUT to it ends `run()` with reason `"exit"`.

use std::any::Any;

use crate::engine::{Action, Data, Device, Exit, Result, VcpuCtx};

pub struct ExitPortDev {
    pub port: u16,
    /// QEMU's isa-debug-exit convention: a write of v ends the run with code (v << 1) | 1.
    pub debug_exit: bool,
}

impl ExitPortDev {
    /// The exit code for a guest write of `value`.
    pub fn code(&self, value: u64) -> u64 {
        if self.debug_exit {
            (value << 1) | 1
        } else {
            value
        }
    }
}

impl Device for ExitPortDev {
    fn name(&self) -> String {
        format!("an exit port on {:#x}", self.port)
    }

    fn io_out(&self, _ctx: &mut VcpuCtx<'_, '_>, port: u16, data: &[u8]) -> Result<Action> {
        Ok(Action::Exit(Exit::Guest {
            port,
            code: self.code(Data::new(data).value()),
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
