//! Architecture helpers: pure functions, unit-tested without KVM.

pub mod x86_64;
