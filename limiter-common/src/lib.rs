//! Types and pure logic shared by the kernel programs (`limiter-ebpf`) and the daemon (`limiter-user`).
//!
//! Everything here is `no_std` and allocation-free so the eBPF side can call the very same functions the
//! host tests exercise.
#![no_std]

pub mod day;
pub mod http;
pub mod ident;
pub mod layout;
pub mod maps;
pub mod pace;
pub mod reply;
pub mod stream;

pub use maps::*;
