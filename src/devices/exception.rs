//! The port through which the exception stubs of `setup_long_mode(exceptions=True)`
//! report a CPU exception; the run then ends with an `"exception"` exit.

use std::any::Any;

use crate::arch::x86_64::idt::{self, report};
use crate::engine::{Action, Device, Error, Exit, Result, VcpuCtx};

/// The report comes from the area of the stub that wrote to the port: each vCPU's stubs
/// run on its own stack, with its report below the stack's top, found from RSP.
pub struct ExceptionDev {
    pub port: u16,
}

impl ExceptionDev {
    /// The exit for the report in `bytes` (read from guest memory at the report area).
    pub fn exit(&self, bytes: &[u8; report::SIZE]) -> Exit {
        let field = |at: u64| {
            let at = at as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8-byte slot"))
        };
        Exit::Exception {
            vector: field(report::VECTOR),
            error_code: field(report::ERROR_CODE),
            rip: field(report::RIP),
            cs: field(report::CS),
            rflags: field(report::RFLAGS),
            rsp: field(report::RSP),
            cr2: field(report::CR2),
        }
    }
}

impl Device for ExceptionDev {
    fn name(&self) -> String {
        "the exception report port".into()
    }

    fn io_out(&self, ctx: &mut VcpuCtx<'_, '_>, port: u16, _data: &[u8]) -> Result<Action> {
        // kvmpy's tables are identity mapped: the stub's stack address is its physical one.
        let at = idt::report_at(ctx.regs()?.rsp);
        let mut bytes = [0u8; report::SIZE];
        ctx.vm().read_memory(at, &mut bytes).map_err(|_| {
            Error::Value(format!(
                "an OUT to the exception report port {port:#x} that did not come from \
                 kvmpy's exception stubs (no report area at {at:#x})"
            ))
        })?;
        Ok(Action::Exit(self.exit(&bytes)))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
