//! Engine errors as the Python exceptions of `kvmpy.errors`.

use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::PyErr;

use crate::engine::Error;

pyo3::import_exception!(kvmpy.errors, KvmError);
pyo3::import_exception!(kvmpy.errors, KvmUnavailable);
pyo3::import_exception!(kvmpy.errors, GuestMemoryError);
pyo3::import_exception!(kvmpy.errors, VmClosedError);
pyo3::import_exception!(kvmpy.errors, VcpuBusyError);
pyo3::import_exception!(kvmpy.errors, KvmUnsupported);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Unavailable(_) => KvmUnavailable::new_err((msg,)),
            Error::Ioctl { source, .. } => KvmError::new_err((msg, source.errno())),
            Error::Memory(_) => GuestMemoryError::new_err((msg,)),
            Error::Closed(_) => VmClosedError::new_err((msg,)),
            Error::Busy(_) => VcpuBusyError::new_err((msg,)),
            Error::Refused(_) => KvmError::new_err((msg,)),
            Error::Unsupported(_) => KvmUnsupported::new_err((msg,)),
            Error::Io(_, e) => match e.raw_os_error() {
                Some(errno) => PyOSError::new_err((errno, msg)),
                None => PyOSError::new_err(msg),
            },
            Error::Value(_) => PyValueError::new_err(msg),
            Error::Type(_) => PyTypeError::new_err(msg),
            Error::Device(inner) => match inner.downcast::<PyErr>() {
                Ok(e) => *e,
                Err(other) => KvmError::new_err((other.to_string(),)),
            },
        }
    }
}

/// A Python exception carried through the engine unchanged.
pub fn through_engine(e: PyErr) -> Error {
    Error::Device(Box::new(e))
}
