/* cext_exit.c - the floor for a KVM binding that calls a Python handler on each exit.
 *
 * A hand-written CPython extension, compiled by the benchmark runner (`python -m benchmarks`)
 * with `cc -O2 -shared -fPIC` and loaded from a temporary directory. It sets up the same
 * counter64 VM as `raw_kvm serve` (raw_kvm.h) and runs it with the least a binding that
 * hands exits to Python must do per exit:
 *
 *     Py_BEGIN_ALLOW_THREADS; ioctl(KVM_RUN); Py_END_ALLOW_THREADS;
 *     port = int, data = bytes; handler(port, data); decref; loop.
 *
 * No exit object, no dispatch table, no handler answer to interpret: the difference between
 * this loop and raw C is the price of the GIL and of one Python call per exit, which any
 * such binding pays; what a binding spends beyond this loop is its own.
 *
 *   Exits(guest_path)         one VM with one vCPU running the guest (counter64)
 *   Exits.run(n, handler)     sets RIP and RDI = n, runs until the OUT to 0xF4, calling
 *                             handler(port, data) for every OUT to 0x11; returns
 *                             (seconds, exits, handler calls, data bytes not as expected).
 *                             With handler None: raw C's loop inside this process (the GIL
 *                             kept, no Python call; "handler calls" counts the OUTs)
 *   Exits.close()             closes the vCPU and the VM
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>

/* raw_kvm.h's setup functions report errors through DIE; here an error becomes a Python
 * exception (the setup's partly created VM is leaked, which only happens when the
 * benchmark is failing anyway). */
static jmp_buf setup_failed;
static char setup_error[256];
#define DIE(...)                                                                           \
    do {                                                                                   \
        int errno_ = errno;                                                                \
        int len_ = snprintf(setup_error, sizeof setup_error, __VA_ARGS__);                 \
        if (len_ >= 0 && (size_t)len_ < sizeof setup_error)                                \
            snprintf(setup_error + len_, sizeof setup_error - (size_t)len_,                \
                     " (errno %d: %s)", errno_, strerror(errno_));                         \
        longjmp(setup_failed, 1);                                                          \
    } while (0)

#include "raw_kvm.h"

typedef struct {
    PyObject_HEAD
    vm_t v;
    vcpu_t c;
    int open;
} ExitsObject;

static int kvm_opened;

static int Exits_init(ExitsObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"guest_path", NULL};
    const char *path;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s:Exits", kwlist, &path)) return -1;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "Exits is already initialized");
        return -1;
    }
    if (setjmp(setup_failed)) {
        PyErr_Format(PyExc_OSError, "cext_exit: %s", setup_error);
        return -1;
    }
    if (!kvm_opened) {
        open_kvm();
        kvm_opened = 1;
    }
    boot_one(&self->v, &self->c, path, 0);
    self->open = 1;
    return 0;
}

static void close_vm(ExitsObject *self) {
    if (self->open) {
        vcpu_destroy(&self->c);
        vm_destroy(&self->v);
        self->open = 0;
    }
}

static void Exits_dealloc(ExitsObject *self) {
    close_vm(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Exits_close(ExitsObject *self, PyObject *Py_UNUSED(ignored)) {
    close_vm(self);
    Py_RETURN_NONE;
}

static PyObject *Exits_run(ExitsObject *self, PyObject *args) {
    unsigned long long n;
    PyObject *handler;
    if (!PyArg_ParseTuple(args, "KO:run", &n, &handler)) return NULL;
    if (!self->open) {
        PyErr_SetString(PyExc_ValueError, "the VM is closed");
        return NULL;
    }
    struct kvm_regs regs = {.rip = LOAD_ADDR, .rdi = n, .rflags = 0x3002};
    if (ioctl(self->c.fd, KVM_SET_REGS, &regs) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    int fd = self->c.fd;
    struct kvm_run *run = self->c.run;
    unsigned long long exits = 0, calls = 0, wrong = 0;
    double t0 = now();
    int bare = handler == Py_None;
    for (;;) {
        int rc;
        if (bare) {
            rc = ioctl(fd, KVM_RUN, 0);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = ioctl(fd, KVM_RUN, 0);
            Py_END_ALLOW_THREADS
        }
        if (rc < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (PyErr_CheckSignals() < 0) return NULL;
                continue;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        exits++;
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT)
            return PyErr_Format(PyExc_RuntimeError, "unexpected exit %u after %llu exits",
                                run->exit_reason, exits);
        if (run->io.port == PORT_EXIT) break;
        if (run->io.port != PORT_DEVICE)
            return PyErr_Format(PyExc_RuntimeError, "OUT to unexpected port 0x%x", run->io.port);
        const char *d = (const char *)run + run->io.data_offset;
        /* counter64 writes i & 0xff on its i-th OUT */
        wrong += (unsigned char)d[0] != (unsigned char)calls;
        if (bare) {
            calls++;
            continue;
        }
        PyObject *port = PyLong_FromLong(run->io.port);
        PyObject *data = PyBytes_FromStringAndSize(d, (Py_ssize_t)run->io.size * run->io.count);
        PyObject *result = NULL;
        if (port != NULL && data != NULL)
            result = PyObject_CallFunctionObjArgs(handler, port, data, NULL);
        Py_XDECREF(port);
        Py_XDECREF(data);
        if (result == NULL) return NULL;
        Py_DECREF(result);
        calls++;
    }
    double seconds = now() - t0;
    return Py_BuildValue("dKKK", seconds, exits, calls, wrong);
}

static PyMethodDef Exits_methods[] = {
    {"run", (PyCFunction)Exits_run, METH_VARARGS,
     "run(n, handler) -> (seconds, exits, handler calls, wrong data bytes)"},
    {"close", (PyCFunction)Exits_close, METH_NOARGS, "Closes the vCPU and the VM."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ExitsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cext_exit.Exits",
    .tp_doc = "counter64 on one VM, each device OUT handed to a Python handler.",
    .tp_basicsize = sizeof(ExitsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Exits_init,
    .tp_dealloc = (destructor)Exits_dealloc,
    .tp_methods = Exits_methods,
};

static struct PyModuleDef cext_exit_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cext_exit",
    .m_doc = "The C-extension floor for a KVM exit handled in Python.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit_cext_exit(void) {
    if (PyType_Ready(&ExitsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&cext_exit_module);
    if (m == NULL) return NULL;
    Py_INCREF(&ExitsType);
    if (PyModule_AddObject(m, "Exits", (PyObject *)&ExitsType) < 0) {
        Py_DECREF(&ExitsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
