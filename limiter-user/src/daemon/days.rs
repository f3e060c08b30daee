//! Day keeping: which quota day is in force, the rollover at its end, clock steps either way,
//! the day snapshots and the `day_end` totals.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use limiter_common::{DAY_SLOTS, DayCounters, UNMAPPED_ORG};
use tracing::{error, info, warn};

use super::{maps::KernelMaps, release_freed_memory};
use crate::{
    clock::Clock,
    counters::Prepare,
    orgs::OrgIds,
    snapshot::{self, DaySnapshot},
};

/// Which of an org's three day slots `day` uses (as `limiter_common::day_index` picks it).
fn slot_of(day: u64) -> usize {
    (day % DAY_SLOTS as u64) as usize
}

/// The quota day in force and what is known of the days around it.
pub struct Days {
    /// `daemon.state_dir`, where the day snapshots are.
    state_dir: PathBuf,
    /// The day the daemon last rolled to (or the clock was stepped to).
    day: u64,
    /// Days whose `day_end` lines were logged (also recorded in their snapshots): a day a clock
    /// step brings back is not logged a second time.
    closed: BTreeSet<u64>,
    /// Days left by a step back, not over yet: they end when the clock moves forward past them.
    suspended: BTreeSet<u64>,
    /// The day each of the three day slots (`day % 3`) last held for every org, as the daemon
    /// made it (in force, or prepared; 0: not known). After a step to a day its slot did not
    /// hold, a slot the kernel already tagged with that day holds only what it counted since.
    slot_days: [u64; DAY_SLOTS as usize],
    snapshot_taken: Instant,
    /// Snapshot writes that failed since the start (`limiter_faults{fault="snapshot_write"}`),
    /// and whether the last one did.
    snapshot_failures: u64,
    snapshot_failing: bool,
}

impl Days {
    /// `day` in force, as the daemon starts: its slots and yesterday's hold their days.
    pub fn new(state_dir: &Path, day: u64) -> Self {
        let mut slot_days = [0; DAY_SLOTS as usize];
        slot_days[slot_of(day.saturating_sub(1))] = day.saturating_sub(1);
        slot_days[slot_of(day)] = day;
        Days {
            state_dir: state_dir.to_path_buf(),
            day,
            closed: BTreeSet::new(),
            suspended: BTreeSet::new(),
            slot_days,
            snapshot_taken: Instant::now(),
            snapshot_failures: 0,
            snapshot_failing: false,
        }
    }

    /// Snapshot writes that failed since the start.
    pub fn snapshot_failures(&self) -> u64 {
        self.snapshot_failures
    }

    /// The day in force.
    pub fn day(&self) -> u64 {
        self.day
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Before the loop: today may be a day a clock step brought back after it had ended, and a
    /// restarted daemon (`resumed`) closes the days that ended while it was away (the kernel
    /// kept counting them) and prepares tomorrow.
    pub fn begin<M: KernelMaps>(
        &mut self,
        maps: &mut M,
        ids: &OrgIds,
        clock: &Clock,
        resumed: bool,
    ) {
        if snapshot::is_closed(&self.state_dir, &clock.date(self.day)) {
            self.closed.insert(self.day);
        }
        if resumed {
            self.close_missed_days(maps, ids, clock);
            self.prepare_tomorrow(maps, ids, clock);
            release_freed_memory();
        }
    }

    /// Whether the kernel still has counters of `day` (after a reboot, past days are only in
    /// snapshots).
    pub fn kernel_holds<M: KernelMaps>(&self, maps: &M, ids: &OrgIds, day: u64) -> bool {
        maps.holds_day(ids.max_id(), day).unwrap_or(false)
    }

    /// The days that ended while the daemon was away get their final snapshot and `day_end`
    /// lines now, unless their stored snapshot already has these counts.
    fn close_missed_days<M: KernelMaps>(&mut self, maps: &mut M, ids: &OrgIds, clock: &Clock) {
        for day in self.day.saturating_sub(2)..self.day {
            if !self.kernel_holds(maps, ids, day) {
                continue;
            }
            let Some(snap) = self.snapshot(maps, ids, clock, day) else {
                continue;
            };
            let stored = snapshot::read(&self.state_dir, &snap.date).ok().flatten();
            let same = stored.is_some_and(|s| {
                s.orgs == snap.orgs && s.idle == snap.idle && s.unmapped == snap.unmapped
            });
            if !same {
                self.close_day(maps, ids, clock, day);
            }
        }
    }

    /// Moves the day in force to `today` (the clock's): the rollover at the end of a day, or a
    /// clock step (NTP, `date -s`, the test hook) of any size in either direction.
    pub fn follow<M: KernelMaps>(&mut self, maps: &mut M, ids: &OrgIds, clock: &Clock, today: u64) {
        if today != self.day {
            self.move_to(maps, ids, clock, today);
        }
    }

    /// Leaves the day in force for `to`. Forward, the days the clock moved past end (logged and
    /// snapshotted once); days it jumped over were never in force and get nothing, unless the
    /// kernel counted on them (a daemon that stalled) or a step back left them unfinished. Back,
    /// the day in force is not over: it is snapshotted and ends when the clock passes it again.
    /// Either way the new day's slots and tomorrow's are prepared from what their snapshots
    /// recorded, so a day the clock comes back to continues from its counts.
    fn move_to<M: KernelMaps>(&mut self, maps: &mut M, ids: &OrgIds, clock: &Clock, to: u64) {
        let from = self.day;
        if to > from {
            for day in self.ended_by(maps, ids, to) {
                self.close_day(maps, ids, clock, day);
                self.suspended.remove(&day);
            }
        } else {
            self.write_snapshot(maps, ids, clock, from);
            self.suspended.insert(from);
        }
        let stepped = to != from + 1;
        let restored = if stepped {
            self.enter_stepped(maps, ids, clock, to)
        } else {
            if snapshot::is_closed(&self.state_dir, &clock.date(to)) {
                self.closed.insert(to);
            }
            0
        };
        self.day = to;
        self.slot_days[slot_of(to)] = to;
        self.prepare_tomorrow(maps, ids, clock);
        if stepped {
            warn!(
                event = "clock_step",
                from = %clock.date(from),
                to = %clock.date(to),
                days = to as i64 - from as i64,
                restored_orgs = restored,
                resets_in_seconds = clock.resets_in_seconds(),
                "the clock was stepped: the quota day follows it"
            );
        } else {
            info!(
                event = "rollover",
                day = %clock.date(to),
                resets_in_seconds = clock.resets_in_seconds(),
                "new quota day"
            );
        }
        release_freed_memory();
    }

    /// The days that end when the clock moves forward from the day in force to `to`: that day,
    /// days a step back left unfinished, and skipped days the kernel counted on.
    fn ended_by<M: KernelMaps>(&self, maps: &M, ids: &OrgIds, to: u64) -> BTreeSet<u64> {
        let from = self.day;
        let mut ended: BTreeSet<u64> = self.suspended.range(from + 1..to).copied().collect();
        ended.insert(from);
        for day in to.saturating_sub(2).max(from + 1)..to {
            if maps.counted_on(ids.max_id(), day).unwrap_or(false) {
                ended.insert(day);
            }
        }
        ended
    }

    /// Prepares the slots of `to`, a day the clock was stepped to; returns how many orgs took
    /// counts from its snapshot.
    fn enter_stepped<M: KernelMaps>(
        &mut self,
        maps: &mut M,
        ids: &OrgIds,
        clock: &Clock,
        to: u64,
    ) -> usize {
        let known = self.known(clock, to);
        if known.as_ref().is_some_and(|k| k.closed) {
            self.closed.insert(to);
        }
        // Yesterday's slots still hold it, as may a day prepared as tomorrow before a step
        // back; any other day's slots the kernel claimed since the step hold only what it
        // counted since.
        let how = if self.slot_days[slot_of(to)] == to {
            Prepare::Live
        } else {
            Prepare::Stepped
        };
        match maps.prepare_day_all(ids, to, how, known.as_ref()) {
            Ok(n) => n,
            Err(e) => {
                error!(event = "fault", error = %e, "preparing the new day's counters failed; the kernel resets them lazily");
                0
            }
        }
    }

    /// Ends `day`: its `day_end` lines, once per day (a day a clock step brought back had ended
    /// before: only its snapshot follows the later counts), and its final snapshot.
    fn close_day<M: KernelMaps>(&mut self, maps: &mut M, ids: &OrgIds, clock: &Clock, day: u64) {
        let date = clock.date(day);
        if !self.closed.contains(&day) && !snapshot::is_closed(&self.state_dir, &date) {
            self.log_totals(maps, ids, clock, "day_end", day, true);
        }
        self.closed.insert(day);
        self.write_snapshot(maps, ids, clock, day);
    }

    /// Prepares tomorrow's slots (those of the day before yesterday, which must be closed by
    /// now) from tomorrow's snapshot, if a clock step made one.
    fn prepare_tomorrow<M: KernelMaps>(&mut self, maps: &mut M, ids: &OrgIds, clock: &Clock) {
        let tomorrow = self.day + 1;
        let known = self.known(clock, tomorrow);
        let prepared = maps.prepare_day_all(ids, tomorrow, Prepare::Ahead, known.as_ref());
        // Half prepared is not prepared: the slot is known to hold tomorrow only when all went.
        self.slot_days[slot_of(tomorrow)] = if prepared.is_ok() { tomorrow } else { 0 };
        if let Err(e) = prepared {
            error!(event = "fault", error = %e, "preparing tomorrow's counters failed; the kernel will reset them lazily");
        }
    }

    /// The snapshot of `day`, if one was written and reads.
    fn known(&self, clock: &Clock, day: u64) -> Option<DaySnapshot<'static>> {
        snapshot::read(&self.state_dir, &clock.date(day))
            .inspect_err(|e| error!(event = "fault", error = %e, "a day snapshot is unreadable; that day's counts start from the kernel's"))
            .ok()
            .flatten()
    }

    /// Calls `f(id, counts of day, open connections)` for every org id in order: the kernel's
    /// counts where its slot holds `day`, else the day's snapshot's (a slot the kernel reused
    /// for another day after a clock step must not read as zeros).
    fn each_known<M: KernelMaps>(
        &self,
        maps: &M,
        ids: &OrgIds,
        clock: &Clock,
        day: u64,
        mut f: impl FnMut(u32, DayCounters, i64),
    ) -> Result<(), M::Error> {
        let mut stored: Option<Option<DaySnapshot<'static>>> = None;
        maps.each_slot_usage(ids.max_id(), day, &mut |id, slot, conns| {
            // A never-used slot (tag 0) counted nothing.
            let d = if slot.day == day || slot.day == 0 {
                DayCounters { day, ..slot }
            } else {
                let snap = stored.get_or_insert_with(|| self.known(clock, day));
                let recorded = snap.as_ref().and_then(|s| {
                    if id == UNMAPPED_ORG {
                        Some(s.unmapped)
                    } else {
                        s.orgs.get(ids.name(id)?).copied()
                    }
                });
                DayCounters {
                    day,
                    ..recorded.unwrap_or_default()
                }
            };
            f(id, d, conns)
        })
    }

    /// `day`'s counts of every org, by name (borrowed from `ids`: a million idle orgs made a
    /// million strings). None when the counters could not be read (logged): a partial snapshot
    /// must not replace a whole one.
    pub fn snapshot<'i, M: KernelMaps>(
        &self,
        maps: &M,
        ids: &'i OrgIds,
        clock: &Clock,
        day: u64,
    ) -> Option<DaySnapshot<'i>> {
        let mut snap = DaySnapshot {
            day,
            date: clock.date(day),
            taken_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            closed: self.closed.contains(&day),
            ..DaySnapshot::default()
        };
        let read = self.each_known(maps, ids, clock, day, |id, d, _| {
            if id == UNMAPPED_ORG {
                snap.unmapped = d;
            } else if let Some(name) = ids.name(id) {
                if d.is_idle() {
                    snap.idle.push(name.into());
                } else {
                    snap.orgs.insert(name.into(), d);
                }
            }
        });
        match read {
            Ok(()) => Some(snap),
            Err(e) => {
                error!(event = "fault", error = %e, "reading the counters for a snapshot failed; the last snapshot stays");
                None
            }
        }
    }

    /// Writes `day`'s snapshot (a failure is logged: the counts stay in the kernel).
    pub fn write_snapshot<M: KernelMaps>(
        &mut self,
        maps: &M,
        ids: &OrgIds,
        clock: &Clock,
        day: u64,
    ) {
        self.snapshot_taken = Instant::now();
        let written = self
            .snapshot(maps, ids, clock, day)
            .map(|snap| snapshot::write(&self.state_dir, &snap));
        match written {
            Some(Err(e)) => {
                self.snapshot_failures += 1;
                self.snapshot_failing = true;
                error!(event = "fault", fault = "snapshot_write", total = self.snapshot_failures, error = %e, "writing the day snapshot failed; counts stay in the kernel");
            }
            Some(Ok(_)) if self.snapshot_failing => {
                self.snapshot_failing = false;
                info!(
                    event = "snapshot",
                    failures = self.snapshot_failures,
                    "day snapshot written again"
                );
            }
            _ => {}
        }
        release_freed_memory();
    }

    /// Whether the last snapshot is `every` old or older at `now`.
    pub fn snapshot_due(&self, every: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.snapshot_taken) >= every
    }

    /// One line per org (and unmapped) with its totals of `day`; with `idle` false, orgs without
    /// any traffic that day are left out and counted in one closing line.
    pub fn log_totals<M: KernelMaps>(
        &self,
        maps: &M,
        ids: &OrgIds,
        clock: &Clock,
        event: &str,
        day: u64,
        idle: bool,
    ) {
        let date = clock.date(day);
        let mut skipped = 0u64;
        let read = self.each_known(maps, ids, clock, day, |id, d, conns| {
            let Some(name) = ids.name(id) else {
                return;
            };
            if !idle && conns == 0 && d.is_idle() {
                skipped += 1;
                return;
            }
            info!(
                event,
                day = %date,
                org = name,
                requests = d.requests,
                rejected = d.rejected,
                exempt_media_gets = d.exempt_media_gets,
                exempt_pushes = d.exempt_pushes,
                unparsed = d.unparsed,
                peak_connections = d.peak_connections.max(conns as u64),
                concurrency_breaches = d.concurrency_breaches,
                "day totals"
            );
        });
        if let Err(e) = read {
            error!(event = "fault", error = %e, "reading the day totals failed");
        }
        if skipped > 0 {
            info!(event, day = %date, orgs = skipped, "orgs without traffic (totals all zero)");
        }
    }
}

#[cfg(test)]
mod tests {
    use limiter_common::day_index;

    use super::*;
    use crate::{
        config::Config,
        daemon::fake::{FakeMaps, config_text, events, logged, orgs_of},
    };

    const D: u64 = 20_000;

    struct World {
        _dir: tempfile::TempDir,
        maps: FakeMaps,
        ids: OrgIds,
        clock: Clock,
        days: Days,
    }

    /// Org `acme` (id 1) and `initech` (id 2), with day `D` in force.
    fn world() -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = config_text(dir.path(), &["acme", "initech"], "");
        let cfg = Config::parse(&text, Path::new("t.toml")).expect("test config");
        let days = Days::new(&cfg.daemon.state_dir, D);
        World {
            maps: FakeMaps::default(),
            ids: orgs_of(&cfg).ids,
            clock: Clock::new(0),
            days,
            _dir: dir,
        }
    }

    impl World {
        fn follow(&mut self, today: u64) {
            self.days
                .follow(&mut self.maps, &self.ids, &self.clock, today);
        }

        fn requests(&self, id: u32, day: u64) -> u64 {
            self.maps
                .usage(id, day)
                .map(|(d, _)| d.requests)
                .unwrap_or(u64::MAX)
        }

        fn stored(&self, day: u64) -> Option<DaySnapshot<'static>> {
            snapshot::read(self.days.state_dir(), &self.clock.date(day)).expect("readable")
        }
    }

    fn requests_in(snap: &DaySnapshot<'_>, org: &str) -> u64 {
        snap.orgs.get(org).map_or(0, |d| d.requests)
    }

    #[test]
    fn a_rollover_snapshots_the_day_then_moves_on_with_tomorrow_prepared() {
        let mut w = world();
        // The day before yesterday's slot is tomorrow's.
        w.maps.count(1, D - 1, 9);
        w.maps.count(1, D, 5);
        w.follow(D + 1);
        assert_eq!(w.days.day(), D + 1);
        let ended = w.stored(D).expect("the ended day has its snapshot");
        assert!(ended.closed, "the ended day is closed");
        assert_eq!(requests_in(&ended, "acme"), 5);
        assert_eq!(ended.idle, ["initech"]);
        // Tomorrow's slot holds tomorrow, zeroed; never-used slots are left to the kernel.
        assert_eq!(
            w.maps.slot(day_index(1, D + 2)),
            DayCounters::for_day(D + 2)
        );
        assert_eq!(w.maps.slot(day_index(2, D + 2)), DayCounters::default());
        // The ended day stays readable as yesterday; the new one counts from 0.
        assert_eq!(w.requests(1, D), 5);
        assert_eq!(w.requests(1, D + 1), 0);
        assert!(w.stored(D + 1).is_none(), "the new day has no snapshot yet");
    }

    #[test]
    fn a_day_ends_with_one_totals_line_per_org_once_even_if_a_step_brings_it_back() {
        let mut w = world();
        w.maps.count(1, D, 5);
        let ((), lines) = logged(|| w.follow(D + 1));
        let ends = events(&lines, "day_end");
        let orgs: Vec<&str> = ends.iter().filter_map(|l| l["org"].as_str()).collect();
        assert_eq!(orgs, ["unmapped", "acme", "initech"], "idle orgs included");
        assert_eq!(ends[1]["requests"], 5);
        assert_eq!(ends[1]["day"], w.clock.date(D));
        let rollover = events(&lines, "rollover");
        assert_eq!(rollover.len(), 1);
        assert_eq!(rollover[0]["day"], w.clock.date(D + 1));
        // Back to D (a step), then on to D + 1 again (a rollover): D had ended already.
        let ((), lines) = logged(|| {
            w.follow(D);
            w.follow(D + 1);
        });
        let steps = events(&lines, "clock_step");
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0]["days"], -1);
        assert_eq!(events(&lines, "rollover").len(), 1);
        assert_eq!(events(&lines, "day_end"), [] as [&serde_json::Value; 0]);
    }

    #[test]
    fn a_step_forward_ends_the_day_and_starts_the_new_one_from_zero() {
        let mut w = world();
        w.maps.count(1, D, 5);
        // D + 3 uses D's slots: the kernel must not carry D's counts into it.
        w.follow(D + 3);
        assert_eq!(w.days.day(), D + 3);
        assert_eq!(w.requests(1, D + 3), 0);
        assert!(w.stored(D).is_some_and(|s| s.closed));
        // Days jumped over were never in force and nothing counted on them.
        assert!(w.stored(D + 1).is_none());
        assert!(w.stored(D + 2).is_none());
    }

    #[test]
    fn a_step_back_suspends_the_day_and_the_earlier_day_continues_from_its_counts() {
        let mut w = world();
        w.maps.count(1, D, 5);
        w.follow(D + 1);
        w.maps.count(1, D + 1, 2);
        w.follow(D);
        assert_eq!(w.days.day(), D);
        // The day left is snapshotted but not over.
        let left = w.stored(D + 1).expect("the day left has its snapshot");
        assert!(!left.closed);
        assert_eq!(requests_in(&left, "acme"), 2);
        // The day come back to continues from its counts, and the one left is tomorrow again,
        // with its counts.
        assert_eq!(w.requests(1, D), 5);
        assert_eq!(w.requests(1, D + 1), 2);
        w.maps.count(1, D, 1);
        // Forward again: D ends a second time (its snapshot follows the later counts), and
        // D + 1 goes on from its 2.
        w.follow(D + 1);
        let again = w.stored(D).expect("snapshot of D");
        assert!(again.closed);
        assert_eq!(requests_in(&again, "acme"), 6);
        assert_eq!(w.requests(1, D + 1), 2);
    }

    #[test]
    fn a_step_back_to_a_day_only_snapshots_know_restores_its_counts() {
        let mut w = world();
        w.maps.count(1, D, 5);
        w.follow(D + 1);
        // D + 3 takes over D's slots.
        w.follow(D + 3);
        w.maps.count(1, D + 3, 1);
        // Back to D: its counts come from its snapshot, and D + 3 is left unfinished.
        w.follow(D);
        assert_eq!(w.requests(1, D), 5);
        let left = w.stored(D + 3).expect("snapshot of the day left");
        assert!(!left.closed);
        assert_eq!(requests_in(&left, "acme"), 1);
    }

    #[test]
    fn a_snapshot_is_not_written_from_counters_that_could_not_be_read() {
        let mut w = world();
        w.maps.count(1, D, 5);
        w.maps.fail_reads = true;
        assert!(w.days.snapshot(&w.maps, &w.ids, &w.clock, D).is_none());
        w.days.write_snapshot(&w.maps, &w.ids, &w.clock, D);
        assert!(w.stored(D).is_none());
        w.maps.fail_reads = false;
        w.days.write_snapshot(&w.maps, &w.ids, &w.clock, D);
        assert_eq!(w.stored(D).map(|s| requests_in(&s, "acme")), Some(5));
    }

    #[test]
    fn a_snapshot_falls_due_after_its_interval() {
        let w = world();
        let every = Duration::from_secs(60);
        let taken = w.days.snapshot_taken;
        assert!(!w.days.snapshot_due(every, taken + Duration::from_secs(59)));
        assert!(w.days.snapshot_due(every, taken + every));
    }
}
