//! Host calls: a guest calls a host function by number through one port.
//!
//! ABI: the guest executes `out <port>, eax` with EAX = the function number, arguments in
//! RDI, RSI, RDX, R10, R8, R9 (as Linux system calls); when the guest continues, RAX holds
//! the function's result.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::{lock, Action, Data, Device, Error, Result, VcpuCtx};

/// Argument registers, in order.
pub const ARG_REGS: [&str; 6] = ["rdi", "rsi", "rdx", "r10", "r8", "r9"];

/// A function the guest can call.
pub trait HostFunction: Send + Sync + 'static {
    /// Called with the six argument registers; returns what lands in RAX.
    fn call(&self, ctx: &mut VcpuCtx<'_, '_>, args: [u64; 6]) -> Result<u64>;

    /// For the face: to find the function again by type (garbage collection).
    fn as_any(&self) -> &dyn Any;
}

/// The host-call port and its functions.
pub struct HostCallDev {
    pub port: u16,
    functions: Mutex<HashMap<u32, Arc<dyn HostFunction>>>,
}

impl HostCallDev {
    pub fn new(port: u16) -> Self {
        HostCallDev {
            port,
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The functions, by number.
    pub fn functions(&self) -> MutexGuard<'_, HashMap<u32, Arc<dyn HostFunction>>> {
        lock(&self.functions)
    }

    /// The functions, unless another thread is changing them right now.
    pub fn try_functions(&self) -> Option<MutexGuard<'_, HashMap<u32, Arc<dyn HostFunction>>>> {
        self.functions.try_lock().ok()
    }

    /// Registers (or replaces) function `number`.
    pub fn register(&self, number: u32, f: Arc<dyn HostFunction>) {
        self.functions().insert(number, f);
    }
}

impl Device for HostCallDev {
    fn name(&self) -> String {
        "the host-call port".into()
    }

    fn io_out(&self, ctx: &mut VcpuCtx<'_, '_>, _port: u16, data: &[u8]) -> Result<Action> {
        let number = Data::new(data).value() as u32;
        let f = self.functions().get(&number).cloned().ok_or_else(|| {
            Error::Value(format!(
                "the guest called host function {number} (port {:#x}), which is not registered",
                self.port
            ))
        })?;
        let r = ctx.regs()?;
        let result = f.call(ctx, [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9])?;
        // The function may have changed other registers through the vCPU: keep those.
        let mut regs = ctx.regs()?;
        regs.rax = result;
        ctx.set_regs(&regs)?;
        Ok(Action::Continue)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
