//! Arguments from Python: one rule for every integer (an int of the wrong range is a
//! `ValueError` naming the range, never an `OverflowError`), bytes-like objects, timeouts.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// An integer argument of type `T`: out of range is a `ValueError`.
#[derive(Clone, Copy, Debug)]
pub struct Int<T>(pub T);

macro_rules! int_arg {
    ($($t:ty),*) => {$(
        impl<'a, 'py> FromPyObject<'a, 'py> for Int<$t> {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                match obj.extract::<$t>() {
                    Ok(v) => Ok(Int(v)),
                    Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                        Err(PyValueError::new_err(format!(
                            "{} is outside the range {}..={}",
                            obj.repr()?,
                            <$t>::MIN,
                            <$t>::MAX
                        )))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    )*};
}

int_arg!(u16, u32, u64, usize);

/// The longest timeout accepted: about 31 years, far below what an `Instant` can hold.
pub const MAX_TIMEOUT: f64 = 1e9;

/// The instant `timeout` seconds from now (None: no deadline).
pub fn deadline_after(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && (0.0..=MAX_TIMEOUT).contains(&t) => {
            Ok(Instant::now().checked_add(Duration::from_secs_f64(t)))
        }
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a number of seconds from 0 to {MAX_TIMEOUT:e}, got {t}"
        ))),
    }
}

/// Borrows the bytes of a bytes-like Python object (bytes, bytearray, memoryview, ...).
pub fn bytes_arg<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a bytes-like object, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(Cow::Owned(buf.to_vec(obj.py())?))
}
