//! The XDP gate's pace for orgs out of quota (`pace_over_quota`): GCRA, a token bucket kept as a
//! single time, when the org's next new connection is due. The kernel keeps that time per org in
//! ORG_PACE; the arithmetic lives here so that the host tests run it.

use crate::day::NS_PER_SEC;

/// A paced org may open a second's worth of connections at once (its burst is its rate).
pub const PACE_BURST_NS: u64 = NS_PER_SEC;

/// Takes one new connection at `now` for an org whose next one was due at `due`, at `rate` a
/// second (0 is read as 1): the new due time, or None when the connection must wait. The due
/// time it returns is never more than [`PACE_BURST_NS`] after `now`, so a stale or foreign
/// value can hold an org back for at most that long.
#[inline(always)]
pub fn pace_take(due: u64, now: u64, rate: u32) -> Option<u64> {
    let interval = NS_PER_SEC / if rate == 0 { 1 } else { rate as u64 };
    let next = if due > now { due } else { now }.saturating_add(interval);
    if next > now.saturating_add(PACE_BURST_NS) {
        None
    } else {
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Takes connections at the instants `at` (sorted), starting from `due`: how many passed.
    fn taken(mut due: u64, rate: u32, at: impl IntoIterator<Item = u64>) -> u64 {
        let mut n = 0;
        for now in at {
            if let Some(next) = pace_take(due, now, rate) {
                due = next;
                n += 1;
            }
        }
        n
    }

    #[test]
    fn a_burst_of_rate_then_rate_a_second() {
        let t0 = 1_000 * NS_PER_SEC;
        // 100 attempts at one instant: the burst is the rate.
        assert_eq!(taken(0, 10, core::iter::repeat_n(t0, 100)), 10);
        // Attempts every millisecond for 10 s: the burst, then 10 a second.
        let every_ms = (0..10_000).map(|i| t0 + i * 1_000_000);
        assert_eq!(taken(0, 10, every_ms), 10 + 99);
        // A due time far in the past (an idle org) is a full bucket.
        assert_eq!(taken(1, 3, core::iter::repeat_n(t0, 10)), 3);
    }

    proptest! {
        /// Whatever time the gate stored last (at most a second ahead of its clock then, so at
        /// most a second ahead now): the burst at one instant is at most the rate (the whole
        /// rate when nothing was due), the due time returned is at most a second ahead, and a
        /// second later a connection passes again.
        #[test]
        fn bounded_and_never_stuck(
            now in 0u64..u64::MAX / 2,
            ahead in 0u64..=PACE_BURST_NS,
            behind in any::<u64>(),
            is_ahead in any::<bool>(),
            rate in 1u32..=1_000,
        ) {
            let due = if is_ahead { now + ahead } else { now.saturating_sub(behind) };
            let mut d = due;
            let mut n = 0u32;
            for _ in 0..(rate + 5) {
                if let Some(next) = pace_take(d, now, rate) {
                    prop_assert!(next <= now + PACE_BURST_NS);
                    prop_assert!(next > now);
                    d = next;
                    n += 1;
                }
            }
            prop_assert!(n <= rate);
            if due <= now {
                prop_assert_eq!(n, rate);
            }
            prop_assert!(pace_take(d, now + PACE_BURST_NS, rate).is_some());
        }
    }
}
