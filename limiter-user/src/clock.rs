//! The quota-day clock, as the kernel sees it.
//!
//! The kernel buckets counts by `day_number(CLOCK_TAI + offset)`; the daemon computes the same
//! offset here, from the real TAI−UTC difference (0 on hosts whose TAI offset was never set) and
//! `limits.day_start`, so both sides always agree on what "today" is.

use limiter_common::day::{self, NS_PER_DAY, NS_PER_SEC};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    tai_minus_utc_ns: i64,
    day_start_secs: u32,
    /// Test-only shift (`limiter debug advance-clock`, `LIMITER_TEST_CLOCK_SHIFT_SECS`), never
    /// set in production.
    shift_ns: i64,
    pub day_len_ns: u64,
}

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * NS_PER_SEC as i128 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new(day_start_secs: u32) -> Self {
        let diff = read(libc::CLOCK_TAI) - read(libc::CLOCK_REALTIME);
        // Whole seconds: the two reads are a few ns apart.
        let secs = (diff as f64 / NS_PER_SEC as f64).round() as i64;
        Clock {
            tai_minus_utc_ns: secs * NS_PER_SEC as i64,
            day_start_secs,
            shift_ns: 0,
            day_len_ns: NS_PER_DAY,
        }
    }

    /// Re-reads TAI−UTC (NTP may set the kernel's TAI offset after limiter started); true when it
    /// changed and the kernel's offset must be rewritten.
    pub fn refresh_tai(&mut self) -> bool {
        let fresh = Clock::new(self.day_start_secs).tai_minus_utc_ns;
        let changed = fresh != self.tai_minus_utc_ns;
        self.tai_minus_utc_ns = fresh;
        changed
    }

    pub fn with_day_start(self, day_start_secs: u32) -> Self {
        Clock {
            day_start_secs,
            ..self
        }
    }

    /// The clock `secs` ahead (0 to 400 days; for the test hooks that move the day on).
    pub fn ahead_secs(self, secs: i64) -> Self {
        self.shifted(secs.clamp(0, 400 * 86_400) * NS_PER_SEC as i64)
    }

    /// The clock stepped `secs` forward or back (at most 400 days either way): the test hook
    /// that emulates an NTP step or `date -s` without touching the host's clock.
    pub fn stepped_secs(self, secs: i64) -> Self {
        let max = 400 * 86_400;
        self.shifted(secs.clamp(-max, max) * NS_PER_SEC as i64)
    }

    pub fn shifted(self, by_ns: i64) -> Self {
        Clock {
            shift_ns: self.shift_ns + by_ns,
            ..self
        }
    }

    /// The value for `Config::clock_offset_ns`.
    pub fn offset_ns(&self) -> i64 {
        day::clock_offset_ns(self.tai_minus_utc_ns, self.day_start_secs, self.shift_ns)
    }

    /// Limiter time now (what the kernel computes).
    pub fn now(&self) -> u64 {
        let tai = read(libc::CLOCK_TAI);
        day::limiter_time(tai.max(0) as u64, self.offset_ns())
    }

    pub fn today(&self) -> u64 {
        day::day_number(self.now(), self.day_len_ns)
    }

    pub fn resets_in_seconds(&self) -> u64 {
        day::seconds_until_next_day(self.now(), self.day_len_ns)
    }

    /// The calendar date (UTC date on which the quota day starts) of a day number.
    pub fn date(&self, day: u64) -> String {
        let first_ns =
            day as i128 * self.day_len_ns as i128 + self.day_start_secs as i128 * 1_000_000_000;
        let days = first_ns.div_euclid(NS_PER_DAY as i128) as i64;
        let (y, m, d) = day::civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn today_matches_the_system_date() {
        let c = Clock::new(0);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let today = c.today();
        // Allow a midnight crossing between the two reads.
        assert!(today == secs / 86_400 || today + 1 == secs / 86_400);
        let (y, m, d) = day::civil_from_days((secs / 86_400) as i64);
        if today == secs / 86_400 {
            assert_eq!(c.date(today), format!("{y:04}-{m:02}-{d:02}"));
        }
    }

    #[test]
    fn shifting_by_a_day_moves_today_by_one() {
        let c = Clock::new(0);
        let d = c.today();
        let s = c.shifted(NS_PER_DAY as i64);
        assert!(s.today() == d + 1 || s.today() == d + 2);
    }

    #[test]
    fn a_step_back_undoes_a_step_forward() {
        let c = Clock::new(0);
        let there = c.stepped_secs(3 * 86_400);
        assert_eq!(there.offset_ns() - c.offset_ns(), 3 * NS_PER_DAY as i64);
        assert_eq!(there.stepped_secs(-3 * 86_400).offset_ns(), c.offset_ns());
        // Bounded both ways.
        assert_eq!(
            c.stepped_secs(i64::MIN).offset_ns(),
            c.stepped_secs(-400 * 86_400).offset_ns()
        );
    }

    #[test]
    fn day_start_dates_name_the_starting_utc_day() {
        let c = Clock::new(6 * 3600);
        // Day 20784 with a 06:00 start begins 2026-11-27 06:00 UTC.
        assert_eq!(c.date(20_784), "2026-11-27");
    }
}
