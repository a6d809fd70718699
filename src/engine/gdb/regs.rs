//! gdb's x86-64 register file (`gdbstub_arch::x86::reg::X86_64CoreRegs`: the general
//! registers, RIP, EFLAGS, the segment selectors, the x87 and SSE state) to and from KVM's
//! `kvm_regs`, `kvm_sregs` and `kvm_fpu`.

use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// The general registers in gdb's order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15.
fn general(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// Fills gdb's registers from KVM's.
pub fn to_gdb(r: &kvm_regs, s: &kvm_sregs, f: &kvm_fpu, out: &mut X86_64CoreRegs) {
    out.regs = general(r);
    out.rip = r.rip;
    out.eflags = r.rflags as u32;
    out.segments.cs = s.cs.selector.into();
    out.segments.ss = s.ss.selector.into();
    out.segments.ds = s.ds.selector.into();
    out.segments.es = s.es.selector.into();
    out.segments.fs = s.fs.selector.into();
    out.segments.gs = s.gs.selector.into();
    for (st, fpr) in out.st.iter_mut().zip(f.fpr.iter()) {
        st.copy_from_slice(&fpr[..10]);
    }
    out.fpu.fctrl = f.fcw.into();
    out.fpu.fstat = f.fsw.into();
    out.fpu.ftag = full_tag(f.ftwx);
    out.fpu.fioff = f.last_ip as u32;
    out.fpu.fiseg = (f.last_ip >> 32) as u32;
    out.fpu.fooff = f.last_dp as u32;
    out.fpu.foseg = (f.last_dp >> 32) as u32;
    out.fpu.fop = f.last_opcode.into();
    for (x, k) in out.xmm.iter_mut().zip(f.xmm.iter()) {
        *x = u128::from_le_bytes(*k);
    }
    out.mxcsr = f.mxcsr;
}

/// Writes gdb's registers into KVM's. The segment selectors cannot be changed this way
/// (a selector alone does not make a segment): returns the name of the first one gdb
/// changed, if any, and changes nothing then.
pub fn from_gdb(
    g: &X86_64CoreRegs,
    r: &mut kvm_regs,
    s: &kvm_sregs,
    f: &mut kvm_fpu,
) -> Result<(), &'static str> {
    let selectors = [
        ("cs", s.cs.selector, g.segments.cs),
        ("ss", s.ss.selector, g.segments.ss),
        ("ds", s.ds.selector, g.segments.ds),
        ("es", s.es.selector, g.segments.es),
        ("fs", s.fs.selector, g.segments.fs),
        ("gs", s.gs.selector, g.segments.gs),
    ];
    if let Some((name, ..)) = selectors
        .iter()
        .find(|(_, now, new)| u32::from(*now) != *new)
    {
        return Err(name);
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15] = g.regs;
    *r = kvm_regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rbp,
        rsp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip: g.rip,
        // The upper half of RFLAGS is reserved (zero).
        rflags: g.eflags.into(),
    };
    for (fpr, st) in f.fpr.iter_mut().zip(g.st.iter()) {
        fpr[..10].copy_from_slice(st);
    }
    f.fcw = g.fpu.fctrl as u16;
    f.fsw = g.fpu.fstat as u16;
    f.ftwx = abridged_tag(g.fpu.ftag);
    f.last_ip = u64::from(g.fpu.fioff) | u64::from(g.fpu.fiseg) << 32;
    f.last_dp = u64::from(g.fpu.fooff) | u64::from(g.fpu.foseg) << 32;
    f.last_opcode = g.fpu.fop as u16;
    for (k, x) in f.xmm.iter_mut().zip(g.xmm.iter()) {
        *k = x.to_le_bytes();
    }
    f.mxcsr = g.mxcsr;
    Ok(())
}

/// FXSAVE's abridged tag (a bit per register: in use) as the x87 tag word gdb shows (two
/// bits per register: 00 valid, 11 empty).
fn full_tag(abridged: u8) -> u32 {
    (0..8)
        .filter(|i| abridged & (1 << i) == 0)
        .fold(0, |tag, i| tag | 0b11 << (2 * i))
}

/// The x87 tag word as FXSAVE's abridged tag: a register is in use unless its tag is 11.
fn abridged_tag(tag: u32) -> u8 {
    (0..8)
        .filter(|i| (tag >> (2 * i)) & 0b11 != 0b11)
        .fold(0, |bits, i| bits | 1 << i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_go_to_gdb_and_back() {
        let regs = kvm_regs {
            rax: 1,
            rbx: 2,
            rsp: 0x8000,
            r15: 15,
            rip: 0x100000,
            rflags: 0x202,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x2b;
        sregs.ss.selector = 0x23;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            ftwx: 0b1000_0001,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3] = [7; 16];
        fpu.fpr[0][..10].copy_from_slice(&[9; 10]);
        let mut g = X86_64CoreRegs::default();
        to_gdb(&regs, &sregs, &fpu, &mut g);
        assert_eq!(g.regs[0], 1);
        assert_eq!(g.regs[1], 2);
        assert_eq!(g.regs[7], 0x8000, "rsp is gdb's eighth register");
        assert_eq!(g.regs[15], 15);
        assert_eq!((g.rip, g.eflags), (0x100000, 0x202));
        assert_eq!((g.segments.cs, g.segments.ss), (0x2b, 0x23));
        assert_eq!(
            g.fpu.ftag, 0x3ffc,
            "registers 0 and 7 valid, the others empty"
        );
        assert_eq!(g.xmm[3], u128::from_le_bytes([7; 16]));
        assert_eq!(g.st[0], [9; 10]);

        g.regs[2] = 0x33;
        g.xmm[0] = 5;
        let (mut r2, mut f2) = (kvm_regs::default(), kvm_fpu::default());
        from_gdb(&g, &mut r2, &sregs, &mut f2).unwrap();
        assert_eq!(
            (r2.rcx, r2.rip, r2.rflags, r2.rsp),
            (0x33, 0x100000, 0x202, 0x8000)
        );
        assert_eq!((f2.ftwx, f2.fcw, f2.mxcsr), (0b1000_0001, 0x37f, 0x1f80));
        assert_eq!(f2.xmm[0], 5u128.to_le_bytes());

        g.segments.ds = 0x10;
        assert_eq!(from_gdb(&g, &mut r2, &sregs, &mut f2), Err("ds"));
    }
}
