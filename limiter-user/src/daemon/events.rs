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

#[derive(Default)]
struct BreachLog {
    pending: u64,
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
            EVENT_CONCURRENCY_BREACH => self.breaches.entry(ev.org).or_default().pending += 1,
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
            if log.pending == 0 || !due {
                continue;
            }
            let limits = orgs.limits.get(org);
            let total = maps
                .usage(org, day)
                .map(|(d, _)| d.concurrency_breaches)
                .unwrap_or(0);
            warn!(
                event = "concurrency_breach",
                org = orgs.name(org),
                breaches = log.pending,
                breaches_today = total,
                concurrency_limit = limits.concurrent_connections,
                mode = %limits.concurrency_mode,
                "connections over the concurrency limit"
            );
            logged.push((org, log.pending));
            log.pending = 0;
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

    fn breach(org: u32) -> Event {
        Event {
            kind: EVENT_CONCURRENCY_BREACH,
            org,
            value: 3,
            day: D,
        }
    }

    #[test]
    fn concurrency_lines_are_one_per_org_per_minute() {
        let (maps, orgs, clock) = (FakeMaps::default(), orgs(), Clock::new(0));
        let t0 = Instant::now();
        let mut log = EventLog::new(t0);
        for _ in 0..5 {
            log.record(&breach(1), &orgs, &clock);
        }
        assert_eq!(log.flush_breaches(&maps, &orgs, D, t0), [(1, 5)]);
        // Within the minute: counted, not logged; another org has its own minute.
        let later = t0 + BREACH_LOG_EVERY / 2;
        for _ in 0..3 {
            log.record(&breach(1), &orgs, &clock);
        }
        log.record(&breach(2), &orgs, &clock);
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
    }

    #[test]
    fn breach_and_quota_lines_name_the_org_its_limit_and_mode() {
        let (mut maps, clock) = (FakeMaps::default(), Clock::new(0));
        let orgs = orgs_with("concurrent_connections = 2\nconcurrency_mode = \"reject\"");
        maps.write_day(
            1,
            limiter_common::DayCounters {
                concurrency_breaches: 4,
                ..limiter_common::DayCounters::for_day(D)
            },
        )
        .expect("fake write");
        let mut log = EventLog::new(Instant::now());
        let ((), lines) = logged(|| {
            log.record(&breach(1), &orgs, &clock);
            log.record(&breach(1), &orgs, &clock);
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
        let ev = breach(1);
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
