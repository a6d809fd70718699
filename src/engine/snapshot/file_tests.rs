//! Tests of the snapshot file format (`file.rs`).

use super::*;

fn tiny() -> Snapshot {
    let mut image = RegionImage::empty(0x1000, 0x3000, false).unwrap();
    image.page_mut(1)[7] = 0x5a;
    image.set_present(1);
    Snapshot {
        id: next_id(),
        regions: vec![image],
        vcpus: Vec::new(),
        irqchip: None,
        pit: None,
        devices: vec![("a console".into(), b"hi".to_vec())],
        clock: Some(123_456_789),
    }
}

/// `tiny()` with a vCPU (all-zero KVM state, an MSR, a CPUID entry, an interrupt) and
/// a LAPIC, so that a file exercises every part of the reader.
fn tiny_with_a_vcpu() -> Snapshot {
    let mut snap = tiny();
    snap.vcpus.push(VcpuState {
        id: 0,
        mp_state: kvm_mp_state::default(),
        regs: kvm_regs::default(),
        sregs: kvm_sregs::default(),
        xsave: kvm_xsave::default(),
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs::default(),
        lapic: Some(kvm_lapic_state::default()),
        msrs: vec![kvm_msr_entry {
            index: 0x10,
            data: 7,
            ..Default::default()
        }],
        events: kvm_vcpu_events::default(),
        cpuid: vec![kvm_cpuid_entry2::default()],
        interrupts: vec![32],
        tsc_khz: Some(2_596_098),
    });
    snap
}

/// `data` with its trailing checksum made right again.
fn resealed(mut data: Vec<u8>) -> Vec<u8> {
    if data.len() >= 8 {
        let body = data.len() - 8;
        let sum = checksum(&data[..body]).to_le_bytes();
        data[body..].copy_from_slice(&sum);
    }
    data
}

#[test]
fn any_changed_or_cut_file_with_a_right_checksum_parses_or_is_refused_without_panic() {
    let data = bytes_of(&tiny_with_a_vcpu());
    assert!(parse(&data, [0; 12]).is_ok());
    // Every byte before the pages, set to values that make lengths, counts, flags and
    // sizes wrong; the checksum made right, so the reader sees the change.
    let pages_start = data.len() - 8 - 4104;
    for i in 0..pages_start {
        for value in [
            0u8,
            1,
            0x7f,
            0x80,
            0xff,
            data[i] ^ 0x40,
            data[i].wrapping_add(1),
        ] {
            let mut bad = data.clone();
            bad[i] = value;
            let _ = parse(&resealed(bad), [0; 12]);
        }
    }
    // Every length, with a checksum of its own.
    for n in 8..data.len() {
        let mut cut = data[..n].to_vec();
        cut.extend_from_slice(&checksum(&data[..n]).to_le_bytes());
        let _ = parse(&cut, [0; 12]);
    }
}

fn bytes_of(snap: &Snapshot) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("kvmpy-file-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.kvmsnap", snap.id));
    save(snap, &path, [0; 12]).unwrap();
    let data = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    data
}

#[test]
fn the_clock_and_tsc_frequency_round_trip() {
    let snap = parse(&bytes_of(&tiny_with_a_vcpu()), [0; 12]).unwrap();
    assert_eq!(snap.clock, Some(123_456_789));
    assert_eq!(snap.vcpus[0].tsc_khz, Some(2_596_098));
    assert_eq!(snap.vcpus[0].interrupts, vec![32]);
}

#[test]
fn version_1_files_load_without_a_clock_and_version_0_is_refused() {
    let mut data = encode(&tiny_with_a_vcpu(), [0; 12], 1);
    let snap = parse(&data, [0; 12]).unwrap();
    assert_eq!(snap.clock, None);
    assert_eq!(snap.vcpus[0].tsc_khz, None);
    assert_eq!(snap.vcpus[0].msrs[0].data, 7);
    assert_eq!(snap.regions[0].page(1)[7], 0x5a);
    assert_eq!(snap.devices[0].1, b"hi".to_vec());
    data[8] = 0;
    let err = parse(&resealed(data), [0; 12]).err().unwrap().to_string();
    assert!(err.contains("version 0"), "{err}");
}

#[test]
fn round_trip_keeps_pages_and_devices() {
    let data = bytes_of(&tiny());
    let snap = parse(&data, [0; 12]).unwrap();
    assert_eq!(snap.regions[0].page(1)[7], 0x5a);
    assert_eq!(snap.regions[0].present(), &[0b10]);
    assert_eq!(
        snap.devices,
        vec![("a console".to_string(), b"hi".to_vec())]
    );
}

#[test]
fn every_truncation_and_every_flipped_byte_is_refused() {
    let data = bytes_of(&tiny());
    for n in 0..data.len() {
        assert!(parse(&data[..n], [0; 12]).is_err(), "truncated to {n}");
    }
    for i in (0..data.len()).step_by(97) {
        let mut bad = data.clone();
        bad[i] ^= 0x40;
        assert!(parse(&bad, [0; 12]).is_err(), "byte {i} flipped");
    }
}

#[test]
fn a_file_describing_too_much_memory_is_refused() {
    let data = bytes_of(&tiny());
    // The region's size follows its address, at a fixed distance from the end: the
    // checksum (8), the stored page (8 + 4096), the page count (8), the flag (1).
    let at = data.len() - 8 - 4104 - 8 - 1 - 8;
    let mut big = data.clone();
    big[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let body = big.len() - 8;
    let sum = checksum(&big[..body]).to_le_bytes();
    big[body..].copy_from_slice(&sum);
    let err = parse(&big, [0; 12]).err().unwrap().to_string();
    assert!(err.contains("more than"), "{err}");
}

#[test]
fn newer_versions_and_other_vendors_are_named() {
    let mut data = bytes_of(&tiny());
    let err = parse(&data, *b"GenuineIntel").err().unwrap().to_string();
    assert!(
        err.contains("CPU vendor") || err.contains("GenuineIntel"),
        "{err}"
    );
    data[8] = 3;
    let err = parse(&data, [0; 12]).err().unwrap().to_string();
    assert!(err.contains("newer"), "{err}");
    let err = parse(b"ELF\x7f and more bytes", [0; 12])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a kvmpy snapshot"), "{err}");
}
