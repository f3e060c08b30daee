//! The event log: the kernel's events (concurrency breaches, exhausted quotas), its fault
//! counters and the unmapped traffic, turned into log lines at a rate a person can read.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use limiter_common::{EVENT_CONCURRENCY_BREACH, EVENT_QUOTA_EXHAUSTED, Event, UNMAPPED_ORG};
use tracing::{info, warn};

use super::{maps::KernelMaps, plan::Orgs};
use crate::{clock::Clock, config::QuotaMode};

/// Breach lines per org are at most one a minute (docs/cli.md, Log events).
pub const BREACH_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often unmapped traffic is summarised, when it changed.
pub const UNMAPPED_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// An org whose breaches the log follows (from its first breach event of the day): its count
/// of `day` when its last line was logged (or when it was first seen).
struct BreachLog {
    day: u64,
    logged: u64,
    last_logged: Option<Instant>,
}

/// One record of the kernel's event ring buffer, if it is one.
pub fn parse_event(item: &[u8]) -> Option<Event> {
    item.get(..size_of::<Event>())
        .and_then(|b| bytemuck::try_pod_read_unaligned::<Event>(b).ok())
}

/// What the event log has seen and when it last spoke.
pub struct EventLog {
    breaches: HashMap<u32, BreachLog>,
    faults_seen: HashMap<&'static str, u64>,
    unmapped_seen: (u64, u64, u64),
    unmapped_logged: Instant,
}

impl EventLog {
    pub fn new(now: Instant) -> Self {
        EventLog {
            breaches: HashMap::new(),
            faults_seen: HashMap::new(),
            unmapped_seen: (0, 0, 0),
            unmapped_logged: now,
        }
    }

    /// Takes one kernel event: breaches are counted until their org's next line is due, and an
    /// org's first refusal of the day (the kernel reports it once) is logged at once.
    pub fn record(&mut self, ev: &Event, orgs: &Orgs, clock: &Clock) {
        match ev.kind {
            EVENT_CONCURRENCY_BREACH => {
                // The kernel sends a breach event only now and then (see the constant); the
                // count since the last line comes from the org's counters.
                let log = self.breaches.entry(ev.org).or_insert(BreachLog {
                    day: ev.day,
                    logged: ev.value,
                    last_logged: None,
                });
                if log.day != ev.day {
                    log.day = ev.day;
                    log.logged = ev.value;
                }
            }
            EVENT_QUOTA_EXHAUSTED => quota_exhausted(ev, orgs, clock),
            _ => {}
        }
    }

    /// Logs the breaches counted since each org's last line, for the orgs whose line is due at
    /// `now`; returns `(org id, breaches)` of the lines logged.
    pub fn flush_breaches<M: KernelMaps>(
        &mut self,
        maps: &M,
        orgs: &Orgs,
        day: u64,
        now: Instant,
    ) -> Vec<(u32, u64)> {
        let mut logged = Vec::new();
        for (&org, log) in &mut self.breaches {
            let due = log
                .last_logged
                .is_none_or(|t| now.saturating_duration_since(t) >= BREACH_LOG_EVERY);
            if log.day != day || !due {
                continue;
            }
            let total = match maps.usage(org, day) {
                Ok((d, _)) if d.day == day => d.concurrency_breaches,
                _ => continue,
            };
            let pending = total.saturating_sub(log.logged);
            if pending == 0 {
                continue;
            }
            let limits = orgs.limits.get(org);
            warn!(
                event = "concurrency_breach",
                org = orgs.name(org),
                breaches = pending,
                breaches_today = total,
                concurrency_limit = limits.concurrent_connections,
                mode = %limits.concurrency_mode,
                "connections over the concurrency limit"
            );
            logged.push((org, pending));
            log.logged = total;
            log.last_logged = Some(now);
        }
        logged
    }

    /// Logs the kernel's fault counters that grew; returns `(fault, new)` of the lines logged.
    pub fn check_faults<M: KernelMaps>(&mut self, maps: &M) -> Vec<(&'static str, u64)> {
        let mut logged = Vec::new();
        for (name, total) in maps.faults() {
            let seen = self.faults_seen.entry(name).or_insert(0);
            if total > *seen {
                warn!(
                    event = "fault",
                    fault = name,
                    new = total - *seen,
                    total,
                    "kernel-side fault (traffic passed uncounted or partly counted)"
                );
                logged.push((name, total - *seen));
                *seen = total;
            }
        }
        logged
    }

    /// Whether the unmapped summary is due at `now`.
    pub fn unmapped_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.unmapped_logged) >= UNMAPPED_SUMMARY_EVERY
    }

    /// Logs today's unmapped traffic if it changed since the last summary; true when logged.
    pub fn summarise_unmapped<M: KernelMaps>(&mut self, maps: &M, day: u64, now: Instant) -> bool {
        self.unmapped_logged = now;
        let Ok((d, conns)) = maps.usage(UNMAPPED_ORG, day) else {
            return false;
        };
        let seen = (d.requests, d.unparsed, conns as u64);
        let changed = seen != self.unmapped_seen && (d.requests, d.unparsed) != (0, 0);
        if changed {
            info!(
                event = "unmapped",
                requests = d.requests,
                unparsed = d.unparsed,
                connections = conns,
                "traffic from clients of no org today"
            );
        }
        self.unmapped_seen = seen;
        changed
    }
}

/// The line of an org's first refusal of the day.
fn quota_exhausted(ev: &Event, orgs: &Orgs, clock: &Clock) {
    let name = orgs.name(ev.org);
    match orgs.limits.get(ev.org).quota_mode {
        QuotaMode::Enforce => warn!(
            event = "quota_exhausted",
            org = name,
            daily_limit = ev.value,
            day = %clock.date(ev.day),
            resets_in_seconds = clock.resets_in_seconds(),
            "daily quota used up: further calls get 429 until the day resets"
        ),
        QuotaMode::DryRun => warn!(
            event = "quota_exhausted",
            org = name,
            daily_limit = ev.value,
            day = %clock.date(ev.day),
            mode = "dry-run",
            "daily quota used up: dry-run, calls still pass and are counted as rejected"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        daemon::fake::{FakeMaps, config_text, events, logged, orgs_of},
    };

    const D: u64 = 20_000;

    fn orgs() -> Orgs {
        orgs_with("")
    }

    /// Orgs `acme` and `initech` with `limits` as their `[limits]` table.
    fn orgs_with(limits: &str) -> Orgs {
        let text = config_text(std::path::Path::new("/tmp"), &["acme", "initech"], "")
            .replace("[daemon]", &format!("[limits]\n{limits}\n[daemon]"));
        orgs_of(&Config::parse(&text, std::path::Path::new("t.toml")).expect("test config"))
    }

    /// The kernel's breach event: `before` breaches of the org today came before it.
    fn breach(org: u32, before: u64) -> Event {
        Event {
            kind: EVENT_CONCURRENCY_BREACH,
            org,
            value: before,
            day: D,
        }
    }

    /// The org's breaches of today in the fake maps.
    fn set_breaches(maps: &mut FakeMaps, org: u32, n: u64) {
        let d = limiter_common::DayCounters {
            concurrency_breaches: n,
            ..limiter_common::DayCounters::for_day(D)
        };
        maps.write_day(org, d).expect("fake write");
    }

    #[test]
    fn concurrency_lines_are_one_per_org_per_minute() {
        let (mut maps, orgs, clock) = (FakeMaps::default(), orgs(), Clock::new(0));
        let t0 = Instant::now();
        let mut log = EventLog::new(t0);
        // The day's first breach (and the second, fourth: powers of two) send events; the
        // line counts the breaches since the first by the counter.
        log.record(&breach(1, 0), &orgs, &clock);
        log.record(&breach(1, 1), &orgs, &clock);
        log.record(&breach(1, 2), &orgs, &clock);
        set_breaches(&mut maps, 1, 5);
        assert_eq!(log.flush_breaches(&maps, &orgs, D, t0), [(1, 5)]);
        // Within the minute: counted, not logged, even without an event; another org has its
        // own minute.
        let later = t0 + BREACH_LOG_EVERY / 2;
        set_breaches(&mut maps, 1, 8);
        log.record(&breach(2, 0), &orgs, &clock);
        set_breaches(&mut maps, 2, 1);
        assert_eq!(log.flush_breaches(&maps, &orgs, D, later), [(2, 1)]);
        assert_eq!(log.flush_breaches(&maps, &orgs, D, later), []);
        // A minute after its last line, the org's breaches since are logged in one line.
        let next = t0 + BREACH_LOG_EVERY;
        assert_eq!(log.flush_breaches(&maps, &orgs, D, next), [(1, 3)]);
        // Nothing new: nothing logged, however late.
        assert_eq!(
            log.flush_breaches(&maps, &orgs, D, next + 2 * BREACH_LOG_EVERY),
            []
        );
        // The org is followed by its counter: breaches with no event of their own are logged.
        set_breaches(&mut maps, 1, 11);
        assert_eq!(
            log.flush_breaches(&maps, &orgs, D, next + 3 * BREACH_LOG_EVERY),
            [(1, 3)]
        );
        // Another day: nothing until that day's first breach event.
        assert_eq!(
            log.flush_breaches(&maps, &orgs, D + 1, next + 4 * BREACH_LOG_EVERY),
            []
        );
    }

    #[test]
    fn breaches_before_the_first_event_seen_are_not_logged_again() {
        // A daemon that starts (or restarts) mid-day hears of an org at its next power of two:
        // its line counts from there, and breaches_today says the whole day's.
        let (mut maps, orgs, clock) = (FakeMaps::default(), orgs(), Clock::new(0));
        let mut log = EventLog::new(Instant::now());
        log.record(&breach(1, 64), &orgs, &clock);
        set_breaches(&mut maps, 1, 70);
        assert_eq!(
            log.flush_breaches(&maps, &orgs, D, Instant::now()),
            [(1, 6)]
        );
    }

    #[test]
    fn breach_and_quota_lines_name_the_org_its_limit_and_mode() {
        let (mut maps, clock) = (FakeMaps::default(), Clock::new(0));
        let orgs = orgs_with("concurrent_connections = 2\nconcurrency_mode = \"reject\"");
        set_breaches(&mut maps, 1, 4);
        let mut log = EventLog::new(Instant::now());
        let ((), lines) = logged(|| {
            log.record(&breach(1, 2), &orgs, &clock);
            log.flush_breaches(&maps, &orgs, D, Instant::now());
        });
        let line = events(&lines, "concurrency_breach");
        assert_eq!(line.len(), 1);
        let fields = [
            "org",
            "breaches",
            "breaches_today",
            "concurrency_limit",
            "mode",
        ];
        let got: Vec<&serde_json::Value> = fields.iter().map(|f| &line[0][*f]).collect();
        let want = serde_json::json!(["acme", 2, 4, 2, "reject"]);
        assert_eq!(serde_json::json!(got), want);
        let quota = |orgs: &Orgs| {
            let ev = Event {
                kind: EVENT_QUOTA_EXHAUSTED,
                org: 2,
                value: 2500,
                day: D,
            };
            let ((), lines) = logged(|| EventLog::new(Instant::now()).record(&ev, orgs, &clock));
            lines
        };
        let enforced = quota(&orgs);
        let line = events(&enforced, "quota_exhausted");
        assert_eq!(
            (line[0]["org"].as_str(), line[0]["daily_limit"].as_u64()),
            (Some("initech"), Some(2500))
        );
        assert_eq!(line[0]["day"], clock.date(D));
        assert!(line[0].get("mode").is_none());
        let dry = quota(&orgs_with("quota_mode = \"dry-run\""));
        assert_eq!(events(&dry, "quota_exhausted")[0]["mode"], "dry-run");
    }

    #[test]
    fn records_that_are_not_events_are_skipped() {
        let ev = breach(1, 0);
        assert_eq!(parse_event(bytemuck::bytes_of(&ev)), Some(ev));
        assert_eq!(parse_event(&bytemuck::bytes_of(&ev)[1..]), None);
    }

    #[test]
    fn faults_are_logged_when_they_grow() {
        let mut maps = FakeMaps::default();
        let mut log = EventLog::new(Instant::now());
        maps.faults = vec![("map_full", 0), ("parse", 2)];
        assert_eq!(log.check_faults(&maps), [("parse", 2)]);
        assert_eq!(log.check_faults(&maps), []);
        maps.faults = vec![("map_full", 1), ("parse", 5)];
        assert_eq!(log.check_faults(&maps), [("map_full", 1), ("parse", 3)]);
    }

    #[test]
    fn unmapped_traffic_is_summarised_each_minute_when_it_changed() {
        let mut maps = FakeMaps::default();
        let t0 = Instant::now();
        let mut log = EventLog::new(t0);
        assert!(!log.unmapped_due(t0 + UNMAPPED_SUMMARY_EVERY / 2));
        let t1 = t0 + UNMAPPED_SUMMARY_EVERY;
        assert!(log.unmapped_due(t1));
        // No unmapped traffic: nothing to say.
        assert!(!log.summarise_unmapped(&maps, D, t1));
        assert!(!log.unmapped_due(t1));
        maps.count(UNMAPPED_ORG, D, 4);
        let t2 = t1 + UNMAPPED_SUMMARY_EVERY;
        assert!(log.summarise_unmapped(&maps, D, t2));
        // The same counts a minute later: not repeated.
        assert!(!log.summarise_unmapped(&maps, D, t2 + UNMAPPED_SUMMARY_EVERY));
    }
}
