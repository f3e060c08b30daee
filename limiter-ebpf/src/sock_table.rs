//! Sockets' state: in the SOCK_SLOTS entry the cookie's low bits pick, or in SOCK_STATE when
//! that slot is another socket's; at most SOCK_CAPACITY inbound sockets hold state.

use aya_ebpf::bindings::BPF_NOEXIST;
use limiter_common::{SockSlot, SockState, UNMAPPED_ORG};

use crate::{
    atomic::{add_i64, cas, load},
    maps::{SOCK_CAPACITY, SOCK_COUNT, SOCK_SLOT_MASK, SOCK_SLOTS, SOCK_STATE},
};

/// The slot a socket's state goes to first.
#[inline(always)]
fn sock_slot(cookie: u64) -> Option<*mut SockSlot> {
    // SAFETY: a read of a load-time constant.
    let mask = unsafe { core::ptr::read_volatile(&SOCK_SLOT_MASK) };
    SOCK_SLOTS.get_ptr_mut(cookie as u32 & mask)
}

/// The state of the socket with `cookie`: in its slot, or in SOCK_STATE when the slot is another's.
#[inline(always)]
pub(crate) fn sock_state(cookie: u64) -> Option<*mut SockState> {
    match slot_state(cookie) {
        Some(st) => Some(st),
        None => hashed_state(cookie),
    }
}

/// The state of the socket with `cookie` when it is in its slot.
#[inline(always)]
pub(crate) fn slot_state(cookie: u64) -> Option<*mut SockState> {
    let slot = sock_slot(cookie)?;
    // SAFETY: valid map value.
    (load(unsafe { &raw mut (*slot).cookie }) == cookie).then(|| unsafe { &raw mut (*slot).state })
}

/// The state of the socket with `cookie` when its slot is another's (SOCK_STATE).
#[inline(always)]
pub(crate) fn hashed_state(cookie: u64) -> Option<*mut SockState> {
    SOCK_STATE.get_ptr_mut(&cookie)
}

/// Takes one of the SOCK_CAPACITY places for a new inbound socket's state. A socket of no org
/// (never limited) gets one only below 3/4 of the capacity, so that orgs' sockets always find
/// room however many idle connections others hold.
#[inline(always)]
pub(crate) fn reserve_sock_state(org: u32) -> bool {
    let Some(count) = SOCK_COUNT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a read of a load-time constant.
    let cap = i64::from(unsafe { core::ptr::read_volatile(&SOCK_CAPACITY) });
    let room = if org == UNMAPPED_ORG {
        cap - cap / 4
    } else {
        cap
    };
    if add_i64(count, 1) < room {
        return true;
    }
    add_i64(count, -1);
    false
}

/// Gives back a place taken by `reserve_sock_state`.
#[inline(always)]
pub(crate) fn release_sock_state() {
    if let Some(count) = SOCK_COUNT.get_ptr_mut(0) {
        add_i64(count, -1);
    }
}

/// Stores a new socket's state and returns where it went: its slot when free, else SOCK_STATE.
/// None when neither has room.
#[inline(always)]
pub(crate) fn add_sock_state(cookie: u64, state: &SockState) -> Option<*mut SockState> {
    if let Some(slot) = sock_slot(cookie)
        // SAFETY: valid map value; the claim is atomic.
        && cas(unsafe { &raw mut (*slot).cookie }, 0, cookie).is_ok()
    {
        // SAFETY: the slot is ours; no verdict reads it before this socket is in API_SOCKS.
        unsafe { (*slot).state = *state };
        // SAFETY: as above.
        return Some(unsafe { &raw mut (*slot).state });
    }
    SOCK_STATE.insert(&cookie, state, BPF_NOEXIST as u64).ok()?;
    SOCK_STATE.get_ptr_mut(&cookie)
}

/// Frees a closed socket's state, wherever it is, and its place in SOCK_COUNT.
#[inline(always)]
pub(crate) fn remove_sock_state(cookie: u64) {
    if let Some(slot) = sock_slot(cookie)
        // SAFETY: valid map value; only the owner frees its slot.
        && cas(unsafe { &raw mut (*slot).cookie }, cookie, 0).is_ok()
    {
        release_sock_state();
        return;
    }
    if SOCK_STATE.remove(&cookie).is_ok() {
        release_sock_state();
    }
}
