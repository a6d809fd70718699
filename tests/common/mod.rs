//! What the Rust integration tests share.

/// Whether `/dev/kvm` can be opened; if not, says so once per test (the test then passes
/// without running anything).
pub fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("/dev/kvm cannot be opened: KVM tests skipped");
    }
    ok
}
