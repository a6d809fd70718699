//! `kvmpy._native._disassemble`: the instruction decoder for Python code (messages, tracing).

use pyo3::prelude::*;

use crate::arch::x86_64::{blocks, disasm};
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

/// The basic blocks of the 64-bit code `code` at virtual address `base`, found by
/// recursive-descent disassembly from `entries` (addresses; those outside the code are
/// ignored): `(block_starts, instruction_starts, bad)`, sorted lists, where `bad` are the
/// `check` addresses (none by default) that lie inside a decoded instruction without
/// being its start.
#[pyfunction]
#[pyo3(name = "_find_blocks", signature = (code, base, entries, check = Vec::new()), text_signature = "(code, base, entries, check=[])")]
pub fn find_blocks(
    code: &Bound<'_, PyAny>,
    base: Int<u64>,
    entries: Vec<Int<u64>>,
    check: Vec<Int<u64>>,
) -> PyResult<(Vec<u64>, Vec<u64>, Vec<u64>)> {
    let code = bytes_arg(code)?;
    let entries: Vec<u64> = entries.into_iter().map(|e| e.0).collect();
    let found = blocks::find_blocks(&code, base.0, &entries);
    let bad = check
        .into_iter()
        .map(|c| c.0)
        .filter(|&a| found.inside_instruction(a, |ip| blocks::instruction_len(&code, base.0, ip)))
        .collect();
    Ok((
        found.starts.into_iter().collect(),
        found.instructions.into_iter().collect(),
        bad,
    ))
}
