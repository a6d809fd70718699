//! Host calls: a guest calls a Python function by number through one port.
//!
//! ABI: the guest executes `out <port>, eax` with EAX = the function number, arguments in
//! RDI, RSI, RDX, R10, R8, R9 (as Linux system calls); when the guest continues, RAX holds
//! the function's result (an int; None is 0).

use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::prelude::*;

/// Argument registers, in order.
pub const ARG_REGS: [&str; 6] = ["rdi", "rsi", "rdx", "r10", "r8", "r9"];

/// A registered host function and how many arguments it takes.
pub struct HostFn {
    pub f: Py<PyAny>,
    pub nargs: usize,
}

pub struct HostCallDev {
    pub port: u16,
    pub functions: Mutex<HashMap<u32, HostFn>>,
}

impl HostCallDev {
    pub fn new(port: u16) -> Self {
        HostCallDev {
            port,
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The function registered as `number`, with its argument count.
    pub fn get(&self, py: Python<'_>, number: u32) -> Option<(Py<PyAny>, usize)> {
        let functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        functions.get(&number).map(|h| (h.f.clone_ref(py), h.nargs))
    }
}

/// How many of the six argument registers `f` takes: its positional parameters, or all six
/// if it takes `*args`.
pub fn arg_count(f: &Bound<'_, PyAny>) -> PyResult<usize> {
    let py = f.py();
    let inspect = py.import("inspect")?;
    let params = inspect
        .call_method1("signature", (f,))?
        .getattr("parameters")?
        .call_method0("values")?;
    let kind = inspect.getattr("Parameter")?;
    let positional = [
        kind.getattr("POSITIONAL_ONLY")?,
        kind.getattr("POSITIONAL_OR_KEYWORD")?,
    ];
    let var_positional = kind.getattr("VAR_POSITIONAL")?;
    let mut n = 0;
    for p in params.try_iter()? {
        let k = p?.getattr("kind")?;
        if k.eq(&var_positional)? {
            return Ok(ARG_REGS.len());
        }
        if positional.iter().any(|x| k.eq(x).unwrap_or(false)) {
            n += 1;
        }
    }
    if n > ARG_REGS.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "a host function takes at most {} arguments (RDI, RSI, RDX, R10, R8, R9), this one takes {n}",
            ARG_REGS.len()
        )));
    }
    Ok(n)
}
