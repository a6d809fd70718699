//! Tells the crate whether it is built with a profile (`-Cprofile-use`, pgo/build.sh), so
//! that `kvmpy._native.PGO` can say so and benchmarks can name the build they measured.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvmpy_pgo)");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let flags: Vec<&str> = flags.split('\x1f').collect();
    let pgo = flags.iter().enumerate().any(|(i, f)| {
        f.starts_with("-Cprofile-use")
            || (f.starts_with("profile-use") && i > 0 && flags[i - 1] == "-C")
    });
    if pgo {
        println!("cargo::rustc-cfg=kvmpy_pgo");
    }
}
