//! Register snapshots as Python objects: `Regs`, `Sregs`, `Segment`, `DTable`.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Converts a Python int to a 64-bit register value; negative values are taken as two's
/// complement.
pub fn reg_value(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(v);
    }
    if let Ok(v) = obj.extract::<i64>() {
        return Ok(v as u64);
    }
    if obj.cast::<pyo3::types::PyInt>().is_ok() {
        return Err(PyValueError::new_err(format!(
            "{name}: {obj} does not fit in 64 bits"
        )));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be an int, got {}",
        obj.get_type().name()?
    )))
}

macro_rules! regs_class {
    ($($field:ident),* $(,)?) => {
        /// The general purpose registers, `rip` and `rflags` of a vCPU (`KVM_GET_REGS`).
        ///
        /// A snapshot: change fields and assign it back with `cpu.regs = regs`, or use
        /// `cpu.set_regs(rax=..., rip=...)`.
        #[pyclass(module = "kvmpy._native", get_all, set_all, eq, from_py_object)]
        #[derive(Clone, Default, PartialEq, Eq)]
        pub struct Regs {
            $(pub $field: u64,)*
        }

        impl Regs {
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            pub fn from_kvm(r: &kvm_regs) -> Self {
                Regs { $($field: r.$field,)* }
            }

            pub fn to_kvm(&self) -> kvm_regs {
                kvm_regs { $($field: self.$field,)* }
            }

            /// Sets the fields named in `fields` on `r`.
            pub fn apply(r: &mut kvm_regs, fields: &Bound<'_, PyDict>) -> PyResult<()> {
                for (k, v) in fields.iter() {
                    let name: String = k.extract()?;
                    match name.as_str() {
                        $(stringify!($field) => r.$field = reg_value(&name, &v)?,)*
                        _ => return Err(PyTypeError::new_err(format!(
                            "unknown register {name:?}; expected one of {}",
                            Self::FIELDS.join(", ")
                        ))),
                    }
                }
                Ok(())
            }
        }

        #[pymethods]
        impl Regs {
            #[new]
            #[pyo3(signature = (**fields))]
            fn new(fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                let mut r = kvm_regs::default();
                if let Some(f) = fields {
                    Self::apply(&mut r, f)?;
                }
                Ok(Self::from_kvm(&r))
            }

            /// The registers as a dict.
            fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), self.$field)?;)*
                Ok(d)
            }

            fn __repr__(&self) -> String {
                let parts: Vec<String> = vec![$(format!("{}={:#x}", stringify!($field), self.$field)),*];
                format!("Regs({})", parts.join(", "))
            }
        }
    };
}

regs_class!(
    rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags
);

/// One segment register's visible and hidden state (`struct kvm_segment`).
#[pyclass(module = "kvmpy._native", get_all, set_all, eq, from_py_object)]
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Segment type (4 bits), e.g. 0xb for execute/read code (accessed), 0x3 for read/write data.
    pub r#type: u8,
    pub present: u8,
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: u8,
    /// 1 for code/data segments, 0 for system segments (TSS, LDT).
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity (1 = limit in 4 KiB units).
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

#[pymethods]
impl Segment {
    #[new]
    #[pyo3(signature = (*, base=0, limit=0xffff, selector=0, r#type=3, present=1, dpl=0, db=0, s=1, l=0, g=0, avl=0, unusable=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        base: u64,
        limit: u32,
        selector: u16,
        r#type: u8,
        present: u8,
        dpl: u8,
        db: u8,
        s: u8,
        l: u8,
        g: u8,
        avl: u8,
        unusable: u8,
    ) -> Self {
        Segment {
            base,
            limit,
            selector,
            r#type,
            present,
            dpl,
            db,
            s,
            l,
            g,
            avl,
            unusable,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Segment(base={:#x}, limit={:#x}, selector={:#x}, type={:#x}, present={}, dpl={}, db={}, s={}, l={}, g={}, avl={}, unusable={})",
            self.base, self.limit, self.selector, self.r#type, self.present, self.dpl, self.db,
            self.s, self.l, self.g, self.avl, self.unusable
        )
    }
}

impl Segment {
    pub fn from_kvm(s: &kvm_segment) -> Self {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            r#type: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }

    pub fn to_kvm(&self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.r#type,
            present: self.present,
            dpl: self.dpl,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: self.avl,
            unusable: self.unusable,
            padding: 0,
        }
    }
}

/// A descriptor table register (GDTR/IDTR).
#[pyclass(module = "kvmpy._native", get_all, set_all, eq, from_py_object)]
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DTable {
    pub base: u64,
    pub limit: u16,
}

#[pymethods]
impl DTable {
    #[new]
    #[pyo3(signature = (base=0, limit=0xffff))]
    fn new(base: u64, limit: u16) -> Self {
        DTable { base, limit }
    }

    fn __repr__(&self) -> String {
        format!("DTable(base={:#x}, limit={:#x})", self.base, self.limit)
    }
}

impl DTable {
    fn from_kvm(d: &kvm_dtable) -> Self {
        DTable {
            base: d.base,
            limit: d.limit,
        }
    }
    fn to_kvm(&self) -> kvm_dtable {
        kvm_dtable {
            base: self.base,
            limit: self.limit,
            padding: [0; 3],
        }
    }
}

/// The special registers of a vCPU (`KVM_GET_SREGS`): segments, descriptor tables,
/// control registers, EFER and the APIC base.
///
/// A snapshot, like `Regs`: assign it back with `cpu.sregs = sregs`, or use
/// `cpu.set_sregs(cr0=..., cs=Segment(...))`.
#[pyclass(module = "kvmpy._native", get_all, set_all, eq, from_py_object)]
#[derive(Clone, PartialEq, Eq)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DTable,
    pub idt: DTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

const SREGS_FIELDS: &str =
    "cs, ds, es, fs, gs, ss, tr, ldt, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer, apic_base";

impl Sregs {
    pub fn from_kvm(s: &kvm_sregs) -> Self {
        Sregs {
            cs: Segment::from_kvm(&s.cs),
            ds: Segment::from_kvm(&s.ds),
            es: Segment::from_kvm(&s.es),
            fs: Segment::from_kvm(&s.fs),
            gs: Segment::from_kvm(&s.gs),
            ss: Segment::from_kvm(&s.ss),
            tr: Segment::from_kvm(&s.tr),
            ldt: Segment::from_kvm(&s.ldt),
            gdt: DTable::from_kvm(&s.gdt),
            idt: DTable::from_kvm(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }

    pub fn to_kvm(&self) -> kvm_sregs {
        kvm_sregs {
            cs: self.cs.to_kvm(),
            ds: self.ds.to_kvm(),
            es: self.es.to_kvm(),
            fs: self.fs.to_kvm(),
            gs: self.gs.to_kvm(),
            ss: self.ss.to_kvm(),
            tr: self.tr.to_kvm(),
            ldt: self.ldt.to_kvm(),
            gdt: self.gdt.to_kvm(),
            idt: self.idt.to_kvm(),
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap: self.interrupt_bitmap,
        }
    }

    /// Sets the fields named in `fields`.
    pub fn apply(&mut self, fields: &Bound<'_, PyDict>) -> PyResult<()> {
        for (k, v) in fields.iter() {
            let name: String = k.extract()?;
            let seg = |v: &Bound<'_, PyAny>| -> PyResult<Segment> {
                v.extract::<Segment>()
                    .map_err(|_| PyTypeError::new_err(format!("{name} must be a kvmpy.Segment")))
            };
            let table = |v: &Bound<'_, PyAny>| -> PyResult<DTable> {
                v.extract::<DTable>()
                    .map_err(|_| PyTypeError::new_err(format!("{name} must be a kvmpy.DTable")))
            };
            match name.as_str() {
                "cs" => self.cs = seg(&v)?,
                "ds" => self.ds = seg(&v)?,
                "es" => self.es = seg(&v)?,
                "fs" => self.fs = seg(&v)?,
                "gs" => self.gs = seg(&v)?,
                "ss" => self.ss = seg(&v)?,
                "tr" => self.tr = seg(&v)?,
                "ldt" => self.ldt = seg(&v)?,
                "gdt" => self.gdt = table(&v)?,
                "idt" => self.idt = table(&v)?,
                "cr0" => self.cr0 = reg_value(&name, &v)?,
                "cr2" => self.cr2 = reg_value(&name, &v)?,
                "cr3" => self.cr3 = reg_value(&name, &v)?,
                "cr4" => self.cr4 = reg_value(&name, &v)?,
                "cr8" => self.cr8 = reg_value(&name, &v)?,
                "efer" => self.efer = reg_value(&name, &v)?,
                "apic_base" => self.apic_base = reg_value(&name, &v)?,
                _ => {
                    return Err(PyTypeError::new_err(format!(
                        "unknown special register {name:?}; expected one of {SREGS_FIELDS}"
                    )))
                }
            }
        }
        Ok(())
    }
}

#[pymethods]
impl Sregs {
    fn __repr__(&self) -> String {
        format!(
            "Sregs(cr0={:#x}, cr3={:#x}, cr4={:#x}, efer={:#x}, cs={}, ss={}, gdt={}, idt={})",
            self.cr0,
            self.cr3,
            self.cr4,
            self.efer,
            self.cs.__repr__(),
            self.ss.__repr__(),
            self.gdt.__repr__(),
            self.idt.__repr__()
        )
    }
}
