//! The daily quota: counting requests against it without ever passing it.

use limiter_common::{
    DayCounters, EVENT_QUOTA_EXHAUSTED, ORG_F_ACTIVE, ORG_F_DRY_RUN, OrgLimits, UNMAPPED_ORG,
    day_index, reply::Policy,
};

use crate::{
    atomic::{add, cas, load},
    maps::ORG_REMOTE,
    shared::emit,
};

/// The daily quota's decision for the `n` counted requests of a chunk: None lets them through
/// (counted), Some refuses them all (counted as rejected).
#[inline(always)]
pub(crate) fn daily_verdict(
    org: u32,
    day: u64,
    slot: *mut DayCounters,
    limits: Option<&OrgLimits>,
    n: u64,
) -> Option<Policy> {
    // SAFETY: valid map value.
    let requests = unsafe { &raw mut (*slot).requests };
    if n == 0 {
        return None;
    }
    let Some(l) = limits.filter(|l| org != UNMAPPED_ORG && l.flags & ORG_F_ACTIVE != 0) else {
        add(requests, n);
        return None;
    };
    if take_quota(requests, remote(org, day), l.daily_requests, n) {
        return None;
    }
    // Over quota: the requests go to `rejected`, not `requests`.
    // SAFETY: valid map value.
    if add(unsafe { &raw mut (*slot).rejected }, n) == 0 {
        emit(EVENT_QUOTA_EXHAUSTED, org, l.daily_requests, day);
    }
    if l.flags & ORG_F_DRY_RUN != 0 {
        return None;
    }
    Some(Policy::Daily)
}

/// Whether the org's next counted request would be refused for its daily quota (the XDP gate's
/// question: no request is counted here).
#[inline(always)]
pub(crate) fn out_of_quota(org: u32, day: u64, slot: *mut DayCounters, l: &OrgLimits) -> bool {
    if l.flags & ORG_F_ACTIVE == 0 || l.flags & ORG_F_DRY_RUN != 0 {
        return false;
    }
    // SAFETY: valid map value.
    load(unsafe { &raw mut (*slot).requests }).saturating_add(remote(org, day)) >= l.daily_requests
}

/// In a cluster, the other hosts' count of `day`, which counts against the same limit.
#[inline(always)]
fn remote(org: u32, day: u64) -> u64 {
    ORG_REMOTE
        .get(day_index(org, day))
        .filter(|r| r.day == day)
        .map(|r| r.requests)
        .unwrap_or(0)
}

/// Counts `n` requests against the quota if all fit: a compare-and-swap from below the limit,
/// so the limit is never passed across CPUs and a refusal never touches the count (a reset or
/// day change landing meanwhile cannot make it wrap). Under heavy contention the bounded loop
/// gives up and lets the requests through, counted (fail open).
#[inline(always)]
fn take_quota(requests: *mut u64, remote: u64, limit: u64, n: u64) -> bool {
    let mut cur = load(requests);
    let mut i = 0;
    while i < 16 {
        if cur.saturating_add(remote).saturating_add(n) > limit {
            return false;
        }
        match cas(requests, cur, cur + n) {
            Ok(()) => return true,
            Err(now) => cur = now,
        }
        i += 1;
    }
    add(requests, n);
    true
}
