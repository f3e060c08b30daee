//! Quota-day arithmetic, shared by the kernel (which buckets every count by day) and the daemon
//! (which rolls days over and reports them).
//!
//! "Limiter time" is `CLOCK_TAI + KernelConfig::clock_offset_ns`: UTC moved back by `day_start`, so that
//! day `n` is `[n·len, (n+1)·len)`. Day numbers therefore count quota days since 1970-01-01.

pub const NS_PER_SEC: u64 = 1_000_000_000;
pub const SECS_PER_DAY: u64 = 86_400;
pub const NS_PER_DAY: u64 = SECS_PER_DAY * NS_PER_SEC;

/// Limiter time for a raw clock reading. Saturates at 0 (clocks before 1970 are not a case to count).
#[inline(always)]
pub fn limiter_time(tai_ns: u64, offset_ns: i64) -> u64 {
    let t = tai_ns as i128 + offset_ns as i128;
    if t < 0 { 0 } else { t as u64 }
}

/// A configured day length: zero is the standard day.
#[inline(always)]
const fn day_len(day_len_ns: u64) -> u64 {
    if day_len_ns == 0 {
        NS_PER_DAY
    } else {
        day_len_ns
    }
}

/// Day number of a limiter time. A zero day length is treated as the standard day.
#[inline(always)]
pub fn day_number(time_ns: u64, day_len_ns: u64) -> u64 {
    time_ns / day_len(day_len_ns)
}

/// Nanoseconds from a limiter time until the next day starts (never 0).
#[inline(always)]
fn ns_until_next_day(time_ns: u64, day_len_ns: u64) -> u64 {
    let len = day_len(day_len_ns);
    len - time_ns % len
}

/// Whole seconds until the next day starts, rounded up, never 0 (a `Retry-After` of 0 invites a
/// retry storm).
#[inline(always)]
pub fn seconds_until_next_day(time_ns: u64, day_len_ns: u64) -> u64 {
    let secs = ns_until_next_day(time_ns, day_len_ns).div_ceil(NS_PER_SEC);
    if secs == 0 { 1 } else { secs }
}

/// A CPU's last reading of the quota day (the TODAY map), so that most requests read the cheap
/// coarse monotonic clock instead of CLOCK_TAI (a TSC read that cost a tenth of a small
/// request's verdict). Only trusted while the config's offset and day length are those it was
/// read under, and never across a day's end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DayCache {
    /// Bumped before and after each write (odd while one is under way): a reading whose `seq`
    /// is odd or changed while it was read is not used. (A program that interrupts another on
    /// the same CPU runs to its end first, so this is all the locking a per-CPU value needs.)
    pub seq: u64,
    /// Coarse monotonic time (ns) until which `day` holds; 0: nothing cached.
    pub until: u64,
    pub day: u64,
    pub offset_ns: i64,
    pub day_len_ns: u64,
}

/// How long a reading of the day is reused: a step of the wall clock (`date -s`, an NTP step)
/// reaches the kernel's day within this.
pub const DAY_CACHE_NS: u64 = 100_000_000;

/// Margin before a day's end within which the day is read afresh every time: the coarse clock
/// lags by up to a tick, and NTP may slew the wall clock against the monotonic one.
pub const DAY_CACHE_MARGIN_NS: u64 = 20_000_000;

impl DayCache {
    /// The cached day at coarse monotonic time `now`, if it still holds under this offset and
    /// day length.
    #[inline(always)]
    pub fn get(&self, now: u64, offset_ns: i64, day_len_ns: u64) -> Option<u64> {
        (now < self.until && self.offset_ns == offset_ns && self.day_len_ns == day_len_ns)
            .then_some(self.day)
    }

    /// A fresh reading: limiter time `time_ns` at coarse monotonic time `now`. Holds for
    /// [`DAY_CACHE_NS`], and never up to the day's last [`DAY_CACHE_MARGIN_NS`] (then `until`
    /// is 0: nothing is cached).
    #[inline(always)]
    pub fn reading(now: u64, time_ns: u64, offset_ns: i64, day_len_ns: u64) -> Self {
        let left = ns_until_next_day(time_ns, day_len_ns);
        let hold = if left > DAY_CACHE_MARGIN_NS + DAY_CACHE_NS {
            DAY_CACHE_NS
        } else {
            left.saturating_sub(DAY_CACHE_MARGIN_NS)
        };
        DayCache {
            seq: 0,
            until: if hold == 0 {
                0
            } else {
                now.saturating_add(hold)
            },
            day: day_number(time_ns, day_len_ns),
            offset_ns,
            day_len_ns,
        }
    }
}

/// The clock offset for a given TAI−UTC difference and `day_start` (seconds after UTC midnight).
pub fn clock_offset_ns(tai_minus_utc_ns: i64, day_start_secs: u32, shift_ns: i64) -> i64 {
    -tai_minus_utc_ns - (day_start_secs as i64) * NS_PER_SEC as i64 + shift_ns
}

/// Proleptic Gregorian date (year, month 1–12, day 1–31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Inverse of [`civil_from_days`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A cached day is the day of every limiter time while it is reused: the monotonic
        /// clock (here exact) advances with the wall clock, and the coarse one lags it by less
        /// than the margin.
        #[test]
        fn a_cached_day_never_outlives_its_day(
            time in 0u64..(1u64 << 62),
            now in 0u64..(1u64 << 62),
            later in 0u64..(2 * DAY_CACHE_NS),
            lag in 0u64..DAY_CACHE_MARGIN_NS,
            len in prop_oneof![Just(0u64), Just(NS_PER_DAY), 1u64..(10 * DAY_CACHE_NS)],
            offset in any::<i64>(),
        ) {
            let c = DayCache::reading(now, time, offset, len);
            prop_assert!(c.until == 0 || c.until > now);
            prop_assert!(c.until <= now + DAY_CACHE_NS);
            // `later` ns on, the coarse clock reads `lag` less.
            let coarse = (now + later).saturating_sub(lag);
            if let Some(day) = c.get(coarse, offset, len) {
                prop_assert_eq!(day, day_number(time + later, len));
            }
            prop_assert_eq!(c.get(now, offset.wrapping_add(1), len), None);
            prop_assert_eq!(c.get(now, offset, len.wrapping_add(1)), None);
        }
    }

    #[test]
    fn no_day_is_cached_near_its_end() {
        let len = NS_PER_DAY;
        let c = DayCache::reading(5, 3 * len - DAY_CACHE_MARGIN_NS, 0, len);
        assert_eq!((c.until, c.day), (0, 2));
        assert_eq!(c.get(5, 0, len), None);
        let c = DayCache::reading(5, 3 * len - DAY_CACHE_MARGIN_NS - 7, 0, len);
        assert_eq!((c.until, c.day), (12, 2));
        let c = DayCache::reading(5, 3 * len, 0, len);
        assert_eq!((c.until, c.day), (5 + DAY_CACHE_NS, 3));
    }

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(days_from_civil(2026, 11, 27), 20_784);
    }

    #[test]
    fn day_start_shifts_the_boundary() {
        // 2026-11-27 05:59:59 UTC with day_start 06:00 still belongs to the 26th.
        let utc = (20_784 * SECS_PER_DAY + 6 * 3600 - 1) * NS_PER_SEC;
        let off = clock_offset_ns(0, 6 * 3600, 0);
        assert_eq!(day_number(limiter_time(utc, off), NS_PER_DAY), 20_783);
        assert_eq!(
            seconds_until_next_day(limiter_time(utc, off), NS_PER_DAY),
            1
        );
        let utc = utc + NS_PER_SEC;
        assert_eq!(day_number(limiter_time(utc, off), NS_PER_DAY), 20_784);
        assert_eq!(
            seconds_until_next_day(limiter_time(utc, off), NS_PER_DAY),
            SECS_PER_DAY
        );
    }

    #[test]
    fn tai_offset_is_removed() {
        let utc = 20_784 * NS_PER_DAY;
        let tai = utc + 37 * NS_PER_SEC;
        assert_eq!(
            limiter_time(tai, clock_offset_ns(37 * NS_PER_SEC as i64, 0, 0)),
            utc
        );
    }

    proptest! {
        #[test]
        fn civil_roundtrip(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        /// The day slot's multiply agrees with `%` on every day, around 2^32 too.
        #[test]
        fn day_slot_is_the_remainder(day in any::<u64>(), near in 0u64..1 << 20) {
            for d in [day, day >> 32, (1u64 << 32).wrapping_sub(near), (1u64 << 32) + near] {
                prop_assert_eq!(crate::day_slot(d), (d % crate::DAY_SLOTS as u64) as u32);
            }
        }

        #[test]
        fn retry_after_reaches_next_day(t in 0u64..u64::MAX / 2, len_s in 1u64..200_000) {
            let len = len_s * NS_PER_SEC;
            let secs = seconds_until_next_day(t, len);
            prop_assert!(secs >= 1 && secs <= len_s);
            prop_assert_eq!(day_number(t + secs * NS_PER_SEC, len), day_number(t, len) + 1);
        }
    }
}
