//! Errors of the native core and their mapping onto the Python exceptions of
//! `kvmpy.errors`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;
use vmm_sys_util::errno;

pyo3::import_exception!(kvmpy.errors, KvmError);
pyo3::import_exception!(kvmpy.errors, KvmUnavailable);
pyo3::import_exception!(kvmpy.errors, GuestMemoryError);
pyo3::import_exception!(kvmpy.errors, VmClosedError);
pyo3::import_exception!(kvmpy.errors, VcpuBusyError);

/// Everything that can go wrong in the native core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be used.
    #[error("KVM is unavailable: {0}")]
    Unavailable(String),
    /// A KVM ioctl or system call failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: errno::Error,
    },
    /// A bad memory region or guest address.
    #[error("{0}")]
    Memory(String),
    /// The VM or vCPU was used after `close()`.
    #[error("{0} is closed")]
    Closed(&'static str),
    /// The vCPU cannot be used from this thread right now.
    #[error("{0}")]
    Busy(String),
    /// KVM refused a request that has no errno of its own.
    #[error("{0}")]
    Refused(String),
    /// A bad argument value.
    #[error("{0}")]
    Value(String),
    /// An argument or a handler's result of the wrong type.
    #[error("{0}")]
    Type(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a failed ioctl, naming it.
    pub fn ioctl(what: &'static str, source: errno::Error) -> Self {
        Error::Ioctl { what, source }
    }
}

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
            Error::Value(_) => PyValueError::new_err(msg),
            Error::Type(_) => PyTypeError::new_err(msg),
        }
    }
}
