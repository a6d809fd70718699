//! `kvmpy._native._disassemble`: the instruction decoder for Python code (messages, tracing).

use pyo3::prelude::*;

use crate::arch::x86_64::disasm;
use crate::py::args::{bytes_arg, Int};

/// Decodes up to `count` instructions of `code` as `bits`-bit code (16, 32 or 64) at
/// `ip`: a list of `(address, bytes, text)` in Intel syntax; an invalid instruction is
/// `"(bad)"` and ends the list.
#[pyfunction]
#[pyo3(name = "_disassemble", signature = (code, bits = Int(64), ip = Int(0), count = Int(1)), text_signature = "(code, bits=64, ip=0, count=1)")]
pub fn disassemble(
    code: &Bound<'_, PyAny>,
    bits: Int<u32>,
    ip: Int<u64>,
    count: Int<usize>,
) -> PyResult<Vec<(u64, Vec<u8>, String)>> {
    let (Int(bits), Int(ip), Int(count)) = (bits, ip, count);
    if !matches!(bits, 16 | 32 | 64) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "bits must be 16, 32 or 64, not {bits}"
        )));
    }
    let code = bytes_arg(code)?;
    Ok(disasm::disassemble(&code, bits, ip, count)
        .into_iter()
        .map(|i| (i.ip, i.bytes, i.text))
        .collect())
}
