//! What each CPU mode needs written into guest memory and into the special registers:
//! pure values, applied to a vCPU by the engine (`engine::setup`).

use kvm_bindings::{kvm_segment, kvm_sregs};

use super::{gdt, idt, paging, Layout, CR0_PE, CR0_PG, EFER_LMA, EFER_LME};

/// Special registers for 16-bit real mode with `CS = cs` (base `cs * 16`) and the data
/// and stack segments at 0, from the vCPU's current ones.
pub fn real_mode_sregs(base: &kvm_sregs, cs: u16) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    let mut s = *base;
    s.cs = seg(cs, 0xb);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(0, 0x3);
    }
    s.cr0 &= !(CR0_PE | CR0_PG);
    s.efer &= !(EFER_LME | EFER_LMA);
    s
}

/// The guest memory writes of long mode at `layout`: GDT, TSS, an empty exception report,
/// with `exceptions` the IDT and stubs reporting through `exception_port`, and the page
/// tables. `(guest physical address, bytes)`, in order.
pub fn long_mode_image(
    layout: &Layout,
    exceptions: bool,
    exception_port: u16,
) -> Vec<(u64, Vec<u8>)> {
    let mut writes = vec![
        (layout.gdt, gdt::table_bytes(layout.tss)),
        (layout.tss, gdt::tss_bytes(layout.stack_top)),
        (layout.report, vec![0; idt::report::SIZE]),
    ];
    if exceptions {
        writes.push((layout.idt, idt::idt_bytes(layout.stubs, gdt::KERNEL_CODE64)));
        writes.push((layout.stubs, idt::stub_code(layout.stubs, exception_port)));
    }
    writes.extend(paging::identity_map(layout));
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_mode_clears_protection_and_long_mode() {
        let base = kvm_sregs {
            cr0: CR0_PE | CR0_PG | 0x10,
            efer: EFER_LME | EFER_LMA | 1,
            ..Default::default()
        };
        let s = real_mode_sregs(&base, 0x100);
        assert_eq!(
            (s.cs.selector, s.cs.base, s.cs.limit),
            (0x100, 0x1000, 0xffff)
        );
        assert_eq!((s.ds.base, s.ss.selector), (0, 0));
        assert_eq!((s.cr0, s.efer), (0x10, 1));
    }

    #[test]
    fn long_mode_image_stays_inside_the_layout() {
        let layout = Layout::at(0x1000, 1, false).unwrap();
        for exceptions in [false, true] {
            let writes = long_mode_image(&layout, exceptions, 0xf6);
            for (gpa, bytes) in &writes {
                assert!(*gpa >= layout.gdt && gpa + bytes.len() as u64 <= layout.end());
            }
            assert_eq!(writes.iter().any(|(gpa, _)| *gpa == layout.idt), exceptions);
        }
    }
}
