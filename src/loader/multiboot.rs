//! Multiboot v1.
