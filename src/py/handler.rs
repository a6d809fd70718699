//! The devices that call Python: a handler registered with `on_io`/`on_mmio`/`on_hlt`,
//! and a host function. Each takes the GIL once per call, with the vCPU's lock released
//! so the handler can use its own vCPU.

use std::any::Any;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyTuple};

use crate::devices::hostcall::HostFunction;
use crate::engine::{Action, Data, Device, Exit, Result, VcpuCtx};
use crate::py::error::through_engine;
use crate::py::exit::{self, IoExit};
use crate::py::gil;

/// A Python callable on the bus.
pub struct PyHandler {
    pub f: Py<PyAny>,
    /// The last exit object, when the handler kept no reference to it: refilled for the
    /// next exit instead of allocating a new one (taken and put back under the GIL).
    spare: GilCell<Option<Py<PyAny>>>,
    /// The same for one-element OUTs, the most frequent handler exit, typed so that
    /// refilling it needs no type check.
    spare_out: GilCell<Option<Py<IoExit>>>,
    /// The interpreter's `PyObject_Vectorcall`, looked up once (see [`vectorcall`]) and
    /// kept here, on a line every call reads anyway.
    call: Option<Vectorcall>,
}

/// A value only touched with the GIL held, which serialises every access: no lock of
/// its own on the exit path (the spare exit objects).
struct GilCell<T>(std::cell::UnsafeCell<T>);

// SAFETY: the value is reached only through `take` and `put`, which need a `Python`
// token, so only a thread that holds the GIL touches it, one at a time; each access ends
// before the method returns (no reference escapes), and `T: Send` lets the value be used
// by whichever thread holds the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T: Default> GilCell<T> {
    fn new(value: T) -> Self {
        GilCell(std::cell::UnsafeCell::new(value))
    }

    fn take(&self, _py: Python<'_>) -> T {
        // SAFETY: the GIL is held (the token), so nothing else accesses the cell now.
        unsafe { std::mem::take(&mut *self.0.get()) }
    }

    fn put(&self, _py: Python<'_>, value: T) {
        // SAFETY: as in `take`. The old value is dropped after the access has ended.
        let old = unsafe { std::mem::replace(&mut *self.0.get(), value) };
        drop(old);
    }
}

impl<T> GilCell<Option<Py<T>>> {
    /// Keeps `obj` for the next exit if nothing but the caller refers to it.
    fn keep_if_unshared(&self, py: Python<'_>, obj: Py<T>) {
        // SAFETY: `obj` is a live object and the GIL is held (the `Python` token).
        if unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) } == 1 {
            self.put(py, Some(obj));
        }
    }
}

impl PyHandler {
    pub fn new(f: Py<PyAny>) -> Self {
        PyHandler {
            f,
            spare: GilCell::new(None),
            spare_out: GilCell::new(None),
            call: vectorcall(),
        }
    }

    /// An exit object for `exit`: the spare one refilled, or a new one.
    fn exit_object(&self, py: Python<'_>, exit: &Exit, vcpu_id: u64) -> PyResult<Py<PyAny>> {
        match self.spare.take(py) {
            Some(obj) if exit::refill(obj.bind(py), exit, vcpu_id) => Ok(obj),
            _ => exit::to_python(py, exit, vcpu_id),
        }
    }

    /// Calls the handler with the exit; `answer` is the data of a read, which the
    /// handler's return value fills.
    fn call(
        &self,
        ctx: &mut VcpuCtx<'_, '_>,
        exit: Exit,
        answer: Option<&mut [u8]>,
    ) -> Result<Action> {
        let vcpu = ctx.vcpu();
        vcpu.count_handler_call();
        let size = answer.as_ref().map_or(0, |a| a.len() as u8);
        let reads = answer.is_some();
        let result = ctx.unlocked(|| {
            gil::attached_for(vcpu, |py| -> PyResult<(Option<Data>, Option<Py<PyAny>>)> {
                let obj = self.exit_object(py, &exit, vcpu.id)?;
                let f = self.f.bind(py);
                let ret = call_one(self.call, f, obj.bind(py))?;
                let stopped = if exit::stop_requested(obj.bind(py)) {
                    Some(obj)
                } else {
                    self.spare.keep_if_unshared(py, obj);
                    None
                };
                if !reads {
                    if !ret.is_none() {
                        return Err(not_none(f, &ret, &exit));
                    }
                    return Ok((None, stopped));
                }
                if ret.is_none() && stopped.is_some() {
                    return Ok((None, stopped));
                }
                let data = answer_data(&ret, size, &exit, || format!("handler {}", describe(f)))?;
                Ok((Some(data), stopped))
            })
        });
        let (data, stopped) = result.map_err(through_engine)?;
        if let (Some(d), Some(buf)) = (data, answer) {
            buf.copy_from_slice(d.as_slice());
        }
        Ok(match stopped {
            Some(obj) => Action::Stop(Box::new(obj)),
            None => Action::Continue,
        })
    }
}

impl PyHandler {
    /// [`PyHandler::call`] for a one-element OUT, the hot case: no `Exit` is built and the
    /// kept exit object is refilled without a type check.
    fn out_one(&self, ctx: &mut VcpuCtx<'_, '_>, port: u16, data: Data) -> Result<Action> {
        let vcpu = ctx.vcpu();
        vcpu.count_handler_call();
        let id = vcpu.id;
        let stopped = ctx.unlocked(|| {
            gil::attached_for(vcpu, |py| -> PyResult<Option<Py<PyAny>>> {
                let obj = match self.spare_out.take(py) {
                    Some(obj) => {
                        IoExit::refill_out(obj.bind(py), port, data, id);
                        obj
                    }
                    None => exit::new_out(py, port, data, id)?,
                };
                let f = self.f.bind(py);
                let ret = call_one(self.call, f, obj.bind(py).as_any())?;
                if !ret.is_none() {
                    let exit = Exit::Io {
                        port,
                        size: data.as_slice().len() as u8,
                        count: 1,
                        is_write: true,
                        data,
                    };
                    return Err(not_none(f, &ret, &exit));
                }
                if IoExit::stop_requested(obj.bind(py)) {
                    return Ok(Some(obj.into_any()));
                }
                self.spare_out.keep_if_unshared(py, obj);
                Ok(None)
            })
        });
        Ok(match stopped.map_err(through_engine)? {
            Some(obj) => Action::Stop(Box::new(obj)),
            None => Action::Continue,
        })
    }
}

impl Device for PyHandler {
    fn name(&self) -> String {
        gil::attached(|py| describe(self.f.bind(py)))
    }

    fn io_in(&self, ctx: &mut VcpuCtx<'_, '_>, port: u16, data: &mut [u8]) -> Result<Action> {
        let exit = Exit::Io {
            port,
            size: data.len() as u8,
            count: ctx.io_count,
            is_write: false,
            data: Data::default(),
        };
        self.call(ctx, exit, Some(data))
    }

    fn io_out(&self, ctx: &mut VcpuCtx<'_, '_>, port: u16, data: &[u8]) -> Result<Action> {
        if ctx.io_count == 1 {
            return self.out_one(ctx, port, Data::new(data));
        }
        let exit = Exit::Io {
            port,
            size: data.len() as u8,
            count: ctx.io_count,
            is_write: true,
            data: Data::new(data),
        };
        self.call(ctx, exit, None)
    }

    fn mmio_read(&self, ctx: &mut VcpuCtx<'_, '_>, addr: u64, data: &mut [u8]) -> Result<Action> {
        let exit = Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: false,
            data: Data::default(),
        };
        self.call(ctx, exit, Some(data))
    }

    fn mmio_write(&self, ctx: &mut VcpuCtx<'_, '_>, addr: u64, data: &[u8]) -> Result<Action> {
        let exit = Exit::Mmio {
            addr,
            size: data.len() as u8,
            is_write: true,
            data: Data::new(data),
        };
        self.call(ctx, exit, None)
    }

    fn hlt(&self, ctx: &mut VcpuCtx<'_, '_>) -> Result<Action> {
        self.call(ctx, Exit::Hlt, None)
    }

    fn breakpoint(&self, ctx: &mut VcpuCtx<'_, '_>, address: u64) -> Result<Action> {
        self.call(ctx, Exit::Breakpoint { address }, None)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A Python function registered as a host function.
pub struct PyHostFunction {
    pub f: Py<PyAny>,
    pub number: u32,
    pub nargs: usize,
}

impl HostFunction for PyHostFunction {
    fn call(&self, ctx: &mut VcpuCtx<'_, '_>, args: [u64; 6]) -> Result<u64> {
        let vcpu = ctx.vcpu();
        vcpu.count_handler_call();
        let number = self.number;
        let result = ctx.unlocked(|| {
            gil::attached_for(vcpu, |py| -> PyResult<u64> {
                let f = self.f.bind(py);
                let ret = f.call1(PyTuple::new(py, &args[..self.nargs])?)?;
                if ret.is_none() {
                    return Ok(0);
                }
                if ret.cast::<PyInt>().is_err() {
                    return Err(PyTypeError::new_err(format!(
                        "host function {number} ({}) returned {}; it must return an int or None",
                        describe(f),
                        type_name(&ret)
                    )));
                }
                ret.extract::<u64>()
                    .or_else(|_| ret.extract::<i64>().map(|v| v as u64))
                    .map_err(|_| {
                        PyValueError::new_err(format!(
                            "host function {number} ({}) returned {ret}, which does not fit in \
                             64 bits",
                            describe(f)
                        ))
                    })
            })
        });
        result.map_err(through_engine)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `PyObject_Vectorcall`: exported by every CPython this package supports (3.11 exports
/// it, 3.12 made it part of the stable ABI), but not in 3.11's limited API, so it is looked
/// up at run time instead of linked.
type Vectorcall = unsafe extern "C" fn(
    *mut pyo3::ffi::PyObject,
    *const *mut pyo3::ffi::PyObject,
    usize,
    *mut pyo3::ffi::PyObject,
) -> *mut pyo3::ffi::PyObject;

/// The interpreter's `PyObject_Vectorcall`, if it has one.
fn vectorcall() -> Option<Vectorcall> {
    static FOUND: std::sync::OnceLock<Option<Vectorcall>> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the symbol
        // up in the process's global scope, where the interpreter's symbols are.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"PyObject_Vectorcall".as_ptr()) };
        // SAFETY: where the symbol exists it is CPython's `PyObject_Vectorcall`, whose C
        // signature is exactly `Vectorcall`.
        (!sym.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut libc::c_void, Vectorcall>(sym) })
    })
}

/// `PY_VECTORCALL_ARGUMENTS_OFFSET`: the callee may use the slot before the arguments.
const ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// Calls `f(arg)` without building an argument tuple: by `vectorcall` (the interpreter's
/// `PyObject_Vectorcall`, see [`vectorcall`]) where the interpreter exports it, else
/// `PyObject_CallFunctionObjArgs` (which passes the arguments on the C stack, at about 90
/// more instructions a call).
fn call_one<'py>(
    vectorcall: Option<Vectorcall>,
    f: &Bound<'py, PyAny>,
    arg: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = f.py();
    let ret = match vectorcall {
        Some(call) => {
            // Slot 0 is the one ARGUMENTS_OFFSET lets the callee overwrite for a moment.
            let args = [std::ptr::null_mut(), arg.as_ptr()];
            // SAFETY: `f` and `arg` are live objects borrowed for the call and the GIL is
            // held; `args[1..]` holds the one argument (nargs 1) and `args[0]` is writable
            // scratch as ARGUMENTS_OFFSET promises; no keyword names.
            unsafe {
                call(
                    f.as_ptr(),
                    args.as_ptr().add(1),
                    1 | ARGUMENTS_OFFSET,
                    std::ptr::null_mut(),
                )
            }
        }
        // SAFETY: both pointers are live objects borrowed for the call and the GIL is held;
        // the argument list is NULL-terminated as the function requires.
        None => unsafe {
            pyo3::ffi::PyObject_CallFunctionObjArgs(
                f.as_ptr(),
                arg.as_ptr(),
                std::ptr::null_mut::<pyo3::ffi::PyObject>(),
            )
        },
    };
    // SAFETY: the result is a new reference or NULL with a Python error set, which
    // `from_owned_ptr_or_err` handles.
    unsafe { Bound::from_owned_ptr_or_err(py, ret) }
}

/// The error for a handler of a write, HLT or breakpoint that returned something.
fn not_none(f: &Bound<'_, PyAny>, ret: &Bound<'_, PyAny>, exit: &Exit) -> PyErr {
    PyTypeError::new_err(format!(
        "handler {} returned {} for {}; handlers of writes, HLT and breakpoints must return \
         None",
        describe(f),
        type_name(ret),
        describe_exit(exit)
    ))
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn describe(f: &Bound<'_, PyAny>) -> String {
    f.getattr("__qualname__")
        .and_then(|n| n.extract::<String>())
        .unwrap_or_else(|_| f.repr().map(|r| r.to_string()).unwrap_or_default())
}

fn describe_exit(exit: &Exit) -> String {
    match exit {
        Exit::Io {
            port,
            size,
            is_write,
            ..
        } => format!(
            "{} of {size} byte(s) on port {port:#x}",
            if *is_write { "OUT" } else { "IN" }
        ),
        Exit::Mmio {
            addr,
            size,
            is_write,
            ..
        } => format!(
            "MMIO {} of {size} byte(s) at {addr:#x}",
            if *is_write { "write" } else { "read" }
        ),
        Exit::Hlt => "HLT".into(),
        other => other.reason().as_str().into(),
    }
}

/// Converts a read handler's return value into `size` bytes of data; `who` names the
/// handler in an error (built only when there is one).
pub fn answer_data(
    ret: &Bound<'_, PyAny>,
    size: u8,
    exit: &Exit,
    who: impl FnOnce() -> String,
) -> PyResult<Data> {
    let size = size as usize;
    if let Ok(v) = ret.extract::<u64>() {
        if size == 8 || v >> (8 * size) == 0 {
            return Ok(Data::new(&v.to_le_bytes()[..size]));
        }
    } else if let Ok(v) = ret.extract::<i64>() {
        if size == 8 || v >= -(1i64 << (8 * size - 1)) {
            return Ok(Data::new(&v.to_le_bytes()[..size]));
        }
    } else if let Ok(b) = ret.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        if bytes.len() == size {
            return Ok(Data::new(bytes));
        }
        return Err(PyValueError::new_err(format!(
            "{} returned {} bytes for {}; it must return exactly {size}",
            who(),
            bytes.len(),
            describe_exit(exit)
        )));
    } else if ret.cast::<PyInt>().is_err() {
        return Err(PyTypeError::new_err(format!(
            "{} returned {} for {}; it must return an int or {size} bytes",
            who(),
            type_name(ret),
            describe_exit(exit)
        )));
    }
    Err(PyValueError::new_err(format!(
        "{} returned {} for {}, which does not fit in {size} byte(s)",
        who(),
        ret,
        describe_exit(exit)
    )))
}
