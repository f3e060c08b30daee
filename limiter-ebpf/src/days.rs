//! The orgs' day slots in ORG_DAYS: claiming the current day's slot, and counting into it.

use core::intrinsics::{AtomicOrdering::SeqCst, atomic_xchg};

use limiter_common::{DayCounters, FAULT_BAD_ORG, ID_ADDRESS, KernelConfig, day_index};

use crate::{
    atomic::{add, cas, load},
    maps::{ORG_CONNS, ORG_DAYS},
    shared::{fault, today},
};

/// The org's counters for `day`, reset lazily when the slot still holds another day.
///
/// The daemon normally prepares tomorrow's slot in advance, so the reset here only runs when the
/// daemon was away at rollover or the clock was stepped. The slot of the current day is always
/// claimed, whether it holds an older day or a later one (the clock was stepped back): a slot that
/// held on to a later day would leave the day uncountable. (A CPU that read the clock just before
/// a step of a multiple of three days may take the slot back for the old day once: the cost is
/// the requests in flight at the step's instant.) Returns None only while another CPU resets the
/// slot.
#[inline(always)]
pub(crate) fn day_counters(org: u32, day: u64) -> Option<*mut DayCounters> {
    let Some(slot) = ORG_DAYS.get_ptr_mut(day_index(org, day)) else {
        fault(FAULT_BAD_ORG);
        return None;
    };
    // SAFETY: `slot` is a valid map value.
    let tag = unsafe { &raw mut (*slot).day };
    let cur = load(tag);
    if cur == day {
        return Some(slot);
    }
    if cur & RESETTING != 0 {
        return day_slot_if(tag, slot, day);
    }
    // A slot never used (tag 0, all zero) needs no clearing.
    if cur == 0 {
        return cas(tag, 0, day)
            .ok()
            .map(|()| slot)
            .or_else(|| day_slot_if(tag, slot, day));
    }
    // Claim the reset with a marker first: other CPUs see the marker and count nothing (pass,
    // uncounted) until the fields are zero and the tag is `day`.
    if cas(tag, cur, day | RESETTING).is_ok() {
        let conns = ORG_CONNS.get(org).copied().unwrap_or(0);
        // SAFETY: as above; plain stores: the winner of the CAS owns the reset.
        unsafe {
            (*slot).requests = 0;
            (*slot).rejected = 0;
            (*slot).exempt_media_gets = 0;
            (*slot).exempt_pushes = 0;
            (*slot).unparsed = 0;
            (*slot).peak_connections = if conns > 0 { conns as u64 } else { 0 };
            (*slot).concurrency_breaches = 0;
            (*slot).delayed_syns = 0;
            (*slot).concurrency_rejected = 0;
            (*slot).by_address = 0;
            (*slot).by_proxy_protocol = 0;
            (*slot).by_forwarded = 0;
            (*slot).by_api_key = 0;
            (*slot).unknown_keys = 0;
            (*slot).paced_syns = 0;
            atomic_xchg::<u64, { SeqCst }>(tag, day);
        }
        return Some(slot);
    }
    day_slot_if(tag, slot, day)
}

/// Marks a day slot being reset by the kernel (see `day_counters`).
const RESETTING: u64 = 1 << 63;

/// The slot if its tag is `day` now (another CPU finished its reset), else None.
#[inline(always)]
fn day_slot_if(tag: *mut u64, slot: *mut DayCounters, day: u64) -> Option<*mut DayCounters> {
    (load(tag) == day).then_some(slot)
}

/// Adds `n` requests to the count of the source (`ID_*`) that named their org.
#[inline(always)]
pub(crate) fn add_by(slot: *mut DayCounters, via: u8, n: u64) {
    // by_address, by_proxy_protocol, by_forwarded and by_api_key follow one another, in the
    // order of the ID_* numbers; the mask bounds the index for the verifier.
    let i = (via as usize).wrapping_sub(ID_ADDRESS as usize);
    if i >= 4 || n == 0 {
        return;
    }
    // SAFETY: `slot` points into a valid map value; `i & 3` stays within the four fields.
    add(unsafe { (&raw mut (*slot).by_address).add(i & 3) }, n);
}

/// Which counter of today's slot a chunk or connection touches by one.
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    ExemptPush,
    Unparsed,
}

#[inline(always)]
pub(crate) fn count(org: u32, c: &KernelConfig, what: Counter) {
    let Some(slot) = day_counters(org, today(c)) else {
        return;
    };
    // SAFETY: `slot` points into a valid map value.
    let field = unsafe {
        match what {
            Counter::ExemptPush => &raw mut (*slot).exempt_pushes,
            Counter::Unparsed => &raw mut (*slot).unparsed,
        }
    };
    add(field, 1);
}
