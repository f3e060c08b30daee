//! Atomic operations on map memory: every pointer passed in points into a map value, which is
//! valid and 8-byte aligned for the program's lifetime.

use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd};

/// Atomic fetch-add on a map value field (every caller passes a pointer into a map value, which is
/// valid and 8-byte aligned for the program's lifetime).
#[inline(always)]
pub(crate) fn add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: see above.
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, v) }
}

#[inline(always)]
pub(crate) fn add_i64(p: *mut i64, v: i64) -> i64 {
    // SAFETY: as in `add`.
    unsafe { atomic_xadd::<i64, i64, { SeqCst }>(p, v) }
}

/// Compare-and-swap; true when `*p` was `old` and is now `new`.
#[inline(always)]
pub(crate) fn cas(p: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: as in `add`.
    let (now, ok) = unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new) };
    if ok { Ok(()) } else { Err(now) }
}

#[inline(always)]
pub(crate) fn load(p: *mut u64) -> u64 {
    // SAFETY: as in `add`. A volatile read: BPF has no seq_cst load, and an aligned 8-byte load
    // is single-copy atomic.
    unsafe { core::ptr::read_volatile(p) }
}

/// Raises `*p` to at least `v` (a bounded CAS loop: the verifier wants bounded loops).
#[inline(always)]
pub(crate) fn raise_to(p: *mut u64, v: u64) {
    let mut cur = load(p);
    let mut i = 0;
    while i < 8 && cur < v {
        match cas(p, cur, v) {
            Ok(()) => return,
            Err(now) => cur = now,
        }
        i += 1;
    }
}
