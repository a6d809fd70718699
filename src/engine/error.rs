//! Errors of the engine. The Python face maps each kind onto an exception of
//! `kvmpy.errors` (see `py::error`).

use vmm_sys_util::errno;

/// Everything that can go wrong in the engine.
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
    /// This host's KVM cannot do what was asked (the message names the limit).
    #[error("{0}")]
    Unsupported(String),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A bad argument value.
    #[error("{0}")]
    Value(String),
    /// An argument or a handler's result of the wrong type.
    #[error("{0}")]
    Type(String),
    /// A device's own error (for the Python face: the exception a handler raised), carried
    /// through the run loop unchanged.
    #[error("{0}")]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a failed ioctl, naming it.
    pub fn ioctl(what: &'static str, source: errno::Error) -> Self {
        Error::Ioctl { what, source }
    }
}
