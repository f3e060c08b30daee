//! The orgs' day slots: reading a day's counters, preparing a day before the kernel counts it,
//! and restoring or clearing counts.

use limiter_common::{
    DAY_SLOTS, DayCounters, RemoteCount, UNMAPPED_ORG, day_index,
    layout::{ORG_CONNS, ORG_DAYS},
};

use super::{CountersError, batched, fd, map_err, read_array, read_batches};
use crate::{loader::Kernel, orgs::OrgIds, snapshot::DaySnapshot};

/// One org's counters for `day` and its open connections.
pub fn usage(kernel: &Kernel, id: u32, day: u64) -> Result<(DayCounters, i64), CountersError> {
    let slot = kernel
        .org_days
        .get(&day_index(id, day), 0)
        .map_err(map_err(format!("reading counters of org id {id}")))?;
    let conns = kernel
        .org_conns
        .get(&id, 0)
        .map_err(map_err(format!("reading connections of org id {id}")))?;
    Ok((of_day(slot, day), conns.max(0)))
}

/// A day slot's counters if it holds `day`; zeros if it still holds another day.
fn of_day(slot: DayCounters, day: u64) -> DayCounters {
    if slot.day == day {
        slot
    } else {
        DayCounters::for_day(day)
    }
}

/// Calls `f(id, counters of day, open connections)` for org ids `0..=max_id` in order, from a
/// few batch syscalls: for the loops over all orgs (reports, snapshots, day totals, the cluster
/// sync).
pub fn each_usage(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters, i64),
) -> Result<(), CountersError> {
    each_slot_usage(kernel, max_id, day, |id, slot, open| {
        f(id, of_day(slot, day), open)
    })
}

/// [`each_usage`] with the slot as the kernel holds it, tagged with whatever day it holds: the
/// caller decides what a slot of another day means (after a clock step, the day's counts may be
/// only in its snapshot).
pub fn each_slot_usage(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters, i64),
) -> Result<(), CountersError> {
    let conns = read_array::<ORG_CONNS>(&kernel.org_conns, max_id as usize + 1)?;
    each_day_slot(kernel, max_id, day, |id, slot| {
        let open = conns.get(id as usize).copied().unwrap_or(0);
        f(id, slot, open.max(0));
    })
}

/// Whether the kernel counted anything on `day` for an org id up to `max_id` (a day a daemon
/// that stalled never saw, or one prepared from its snapshot).
pub fn counted_on(kernel: &Kernel, max_id: u32, day: u64) -> Result<bool, CountersError> {
    let mut counted = false;
    each_day_slot(kernel, max_id, day, |_, slot| {
        counted |= slot.day == day && !slot.is_idle()
    })?;
    Ok(counted)
}

/// Whether the kernel still has counters of `day` for any org id up to `max_id` (after a reboot,
/// past days are only in snapshots).
pub fn holds_day(kernel: &Kernel, max_id: u32, day: u64) -> Result<bool, CountersError> {
    // The unmapped slot is prepared for every day the daemon saw: the usual answer, in one lookup.
    if kernel
        .org_days
        .get(&day_index(UNMAPPED_ORG, day), 0)
        .is_ok_and(|d| d.day == day)
    {
        return Ok(true);
    }
    let mut held = false;
    each_day_slot(kernel, max_id, day, |_, slot| held |= slot.day == day)?;
    Ok(held)
}

/// Calls `f(id, slot)` with the ORG_DAYS slot that `day` uses, as it is, for org ids
/// `0..=max_id` in order. The slots are read a chunk at a time and only `day`'s is kept: a table
/// of every org's three slots was hundreds of MB at a million orgs, at every snapshot.
fn each_day_slot(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters),
) -> Result<(), CountersError> {
    let count = (max_id as usize + 1) * DAY_SLOTS as usize;
    read_batches::<ORG_DAYS, _, _>(&kernel.org_days, count, |keys, values| {
        for (&idx, &slot) in keys.iter().zip(values) {
            let id = idx / DAY_SLOTS;
            if idx == day_index(id, day) {
                f(id, slot);
            }
        }
    })
}

/// Makes sure org `id`'s slot for `day` is tagged with `day` (zeroed if it held another day).
///
/// Called for tomorrow right after a rollover and at startup, while the kernel does not touch that
/// slot, so the kernel's lazy reset (which can race) is only a fallback for a daemon that was away.
pub fn prepare_day(kernel: &mut Kernel, id: u32, day: u64) -> Result<(), CountersError> {
    let idx = day_index(id, day);
    let slot = kernel
        .org_days
        .get(&idx, 0)
        .map_err(map_err(format!("reading counters of org id {id}")))?;
    if slot.day != day {
        kernel
            .org_days
            .set(idx, DayCounters::for_day(day), 0)
            .map_err(map_err(format!("preparing day {day} of org id {id}")))?;
    }
    Ok(())
}

/// How [`prepare_day_all`] treats the day it prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// A day the kernel does not count yet (tomorrow): the slots are written in one batch.
    Ahead,
    /// The day the kernel counts now: each slot is re-checked just before its write, as
    /// [`prepare_day`] does, and a slot already holding the day is left as it is.
    Live,
    /// The day the clock was just stepped to (not yesterday, whose slots still hold it): live,
    /// and a slot already holding the day holds only what the kernel counted since the step,
    /// which is added to the day's recorded counts.
    Stepped,
}

/// What the day snapshot `known` recorded for org `id`, when that is anything.
pub fn known_counts(known: Option<&DaySnapshot<'_>>, ids: &OrgIds, id: u32) -> Option<DayCounters> {
    let k = known?;
    let counts = if id == UNMAPPED_ORG {
        k.unmapped
    } else {
        *k.orgs.get(ids.name(id)?)?
    };
    (!counts.is_idle()).then_some(counts)
}

/// What a day slot must hold before `day` is counted in it, or None to leave it as it is.
///
/// `known`: what the day's snapshot recorded for this slot's org (a day the clock comes back to
/// continues from its counts, as a reboot does). A never-used slot (tag 0, all zero) is taken
/// over by the kernel as it is.
pub fn prepared(
    slot: DayCounters,
    day: u64,
    known: Option<DayCounters>,
    how: Prepare,
) -> Option<DayCounters> {
    let holds = slot.day == day;
    match known {
        _ if holds && how != Prepare::Stepped => None,
        None if holds || slot.day == 0 => None,
        None => Some(DayCounters::for_day(day)),
        Some(k) if holds => Some(added(k, slot, day)),
        Some(k) => Some(DayCounters { day, ..k }),
    }
}

/// Two counts of one day added up (the peak is the larger one), tagged `day`.
fn added(a: DayCounters, b: DayCounters, day: u64) -> DayCounters {
    DayCounters {
        day,
        requests: a.requests + b.requests,
        rejected: a.rejected + b.rejected,
        exempt_media_gets: a.exempt_media_gets + b.exempt_media_gets,
        exempt_pushes: a.exempt_pushes + b.exempt_pushes,
        unparsed: a.unparsed + b.unparsed,
        peak_connections: a.peak_connections.max(b.peak_connections),
        concurrency_breaches: a.concurrency_breaches + b.concurrency_breaches,
        delayed_syns: a.delayed_syns + b.delayed_syns,
        concurrency_rejected: a.concurrency_rejected + b.concurrency_rejected,
        by_address: a.by_address + b.by_address,
        by_proxy_protocol: a.by_proxy_protocol + b.by_proxy_protocol,
        by_forwarded: a.by_forwarded + b.by_forwarded,
        by_api_key: a.by_api_key + b.by_api_key,
        unknown_keys: a.unknown_keys + b.unknown_keys,
        paced_syns: a.paced_syns + b.paced_syns,
    }
}

/// Prepares `day` for the unmapped slot and every org id in use (see [`prepared`] and
/// [`Prepare`]), from what `known` (the day's snapshot) recorded: a streamed batch read finds the
/// slots to write (a million single reads took seconds). Returns how many slots took counts from
/// `known`.
pub fn prepare_day_all(
    kernel: &mut Kernel,
    ids: &OrgIds,
    day: u64,
    how: Prepare,
    known: Option<&DaySnapshot<'_>>,
) -> Result<usize, CountersError> {
    let known_of = |id: u32| known_counts(known, ids, id);
    let mut stale: Vec<u32> = Vec::new();
    each_day_slot(kernel, ids.max_id(), day, |id, slot| {
        let in_use = id == UNMAPPED_ORG || ids.name(id).is_some();
        if in_use && prepared(slot, day, known_of(id), how).is_some() {
            stale.push(day_index(id, day));
        }
    })?;
    let restored = stale
        .iter()
        .filter(|idx| known_of(*idx / DAY_SLOTS).is_some())
        .count();
    if how != Prepare::Ahead {
        for idx in stale {
            let id = idx / DAY_SLOTS;
            let slot = kernel
                .org_days
                .get(&idx, 0)
                .map_err(map_err(format!("reading counters of org id {id}")))?;
            if let Some(value) = prepared(slot, day, known_of(id), how) {
                kernel
                    .org_days
                    .set(idx, value, 0)
                    .map_err(map_err(format!("preparing day {day} of org id {id}")))?;
            }
        }
        return Ok(restored);
    }
    // Ahead, nothing holds the day yet: the value follows from the org alone.
    let value_of = |idx: u32| match known_of(idx / DAY_SLOTS) {
        Some(k) => DayCounters { day, ..k },
        None => DayCounters::for_day(day),
    };
    if !batched(fd(&kernel.org_days), &stale, |idx| (*idx, value_of(*idx))) {
        for idx in stale {
            kernel
                .org_days
                .set(idx, value_of(idx), 0)
                .map_err(map_err(format!("preparing day {day} in slot {idx}")))?;
        }
    }
    Ok(restored)
}

/// Clears org `id`'s counters of `day` (`limiter reset`). The peak restarts at the connections
/// open now.
pub fn reset_day(kernel: &mut Kernel, id: u32, day: u64) -> Result<DayCounters, CountersError> {
    let (before, conns) = usage(kernel, id, day)?;
    let mut fresh = DayCounters::for_day(day);
    fresh.peak_connections = conns as u64;
    kernel
        .org_days
        .set(day_index(id, day), fresh, 0)
        .map_err(map_err(format!("resetting org id {id}")))?;
    Ok(before)
}

/// Clears org `id`'s counters of every day slot, for an id handed to a new org.
pub fn clear_org(kernel: &mut Kernel, id: u32) -> Result<(), CountersError> {
    for slot in 0..DAY_SLOTS {
        kernel
            .org_days
            .set(id * DAY_SLOTS + slot, DayCounters::default(), 0)
            .map_err(map_err(format!("clearing org id {id}")))?;
    }
    Ok(())
}

/// Sets org `id`'s counters of `day` (restoring a snapshot before the kernel counts).
pub fn write_day(kernel: &mut Kernel, id: u32, counters: DayCounters) -> Result<(), CountersError> {
    kernel
        .org_days
        .set(day_index(id, counters.day), counters, 0)
        .map_err(map_err(format!("restoring counters of org id {id}")))
}

/// Sets what the other hosts of a cluster counted for org `id` on `day`.
pub fn write_remote(
    kernel: &mut Kernel,
    id: u32,
    day: u64,
    requests: u64,
) -> Result<(), CountersError> {
    kernel
        .org_remote
        .set(day_index(id, day), RemoteCount { day, requests }, 0)
        .map_err(map_err(format!("writing the cluster count of org id {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_day_is_prepared_from_what_is_known_of_it() {
        let day = 20_788;
        let counts = |day, requests, peak| DayCounters {
            requests,
            rejected: 1,
            peak_connections: peak,
            ..DayCounters::for_day(day)
        };
        let known = Some(counts(day, 5, 2));
        let other = counts(day - 3, 9, 9);
        let here = counts(day, 3, 4);
        for how in [Prepare::Ahead, Prepare::Live, Prepare::Stepped] {
            // A slot of another day takes the recorded counts, or zeros; a never-used slot is
            // left to the kernel unless there are counts to put in.
            assert_eq!(
                prepared(other, day, known, how),
                Some(counts(day, 5, 2)),
                "{how:?}"
            );
            assert_eq!(
                prepared(other, day, None, how),
                Some(DayCounters::for_day(day))
            );
            assert_eq!(prepared(DayCounters::default(), day, None, how), None);
            assert_eq!(
                prepared(DayCounters::default(), day, known, how),
                Some(counts(day, 5, 2))
            );
            assert_eq!(prepared(here, day, None, how), None);
        }
        // A slot holding the day: kept, unless the kernel claimed it after a step (then what it
        // counted since is added to the recorded counts; the peak is the larger).
        assert_eq!(prepared(here, day, known, Prepare::Live), None);
        assert_eq!(prepared(here, day, known, Prepare::Ahead), None);
        let mut sum = counts(day, 8, 4);
        sum.rejected = 2;
        assert_eq!(prepared(here, day, known, Prepare::Stepped), Some(sum));
    }
}
