//! limiter's kernel programs, one module each:
//!
//! - [`sock_ops`]: attributes inbound API connections to an org, counts them, and puts them into
//!   API_SOCKS; marks outbound connections to an org's address as push sockets.
//! - [`verdict`] (stream verdict on API_SOCKS): classifies and counts each inbound request
//!   before the application reads it; [`refuse`] writes the 429 of a refused one.
//! - [`push`] (sk_msg on PUSH_SOCKS): counts requests the host pushes out to an org.
//! - [`inflight`] (sk_msg on API_SOCKS): ends the in-flight count of requests attributed one by
//!   one when the application answers.
//! - [`syn_gate`] (XDP): holds back new connections of an org at its concurrency limit.
//!
//! The maps are declared once, in limiter-common's layout ([`maps`]). The socket tables
//! (SOCK_SLOTS, SOCK_STATE, API_SOCKS, PUSH_SOCKS and what goes with them) are shared by every
//! map layout, so connections live across a restart that resizes the org maps stay tracked: a
//! socket keeps the programs it entered its socket map with, and those of an earlier daemon
//! start hand every chunk to the current ones ([`shared::forward`]).
//!
//! Every entry point is a thin wrapper that always lets traffic through: a limiter fault is counted
//! in FAULTS, never turned into a blocked connection.
#![no_std]
#![no_main]
// The bpfel target has no atomic CAS in its spec, so `core::sync::atomic` hides fetch_add; the
// intrinsics compile to BPF atomics (with `-C target-cpu=v3`, see xtask).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod addr;
mod atomic;
mod days;
mod ident;
mod inflight;
mod maps;
mod push;
mod quota;
mod refuse;
mod shared;
mod sock_ops;
mod sock_table;
mod syn_gate;
mod trace;
mod verdict;
mod walk;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
