//! The cluster link (`[cluster]`): this host's counts out to the sync task, the other hosts'
//! counts into the kernel. While Redis is away the kernel keeps enforcing on the last known
//! totals plus its own counts.

use std::time::{Duration, Instant};

use limiter_common::UNMAPPED_ORG;
use tracing::{error, info, warn};

use super::maps::KernelMaps;
use crate::{
    clock::Clock,
    orgs::OrgIds,
    sync::{self, Platform},
};

/// While Redis is away, its line is repeated at most this often.
const DOWN_LOG_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct ClusterLink {
    /// The other hosts' counts, from the last successful sync.
    platform: Option<Platform>,
    /// Since when Redis has been unreachable, and when that was last logged.
    down: Option<(Instant, Instant)>,
}

/// This host's counts of `day`, for the cluster sync.
pub fn local_counts<M: KernelMaps>(maps: &M, ids: &OrgIds, clock: &Clock, day: u64) -> sync::Local {
    let mut orgs = Vec::new();
    let read = maps.each_usage(ids.max_id(), day, &mut |id, d, conns| {
        if id != UNMAPPED_ORG
            && let Some(name) = ids.name(id)
        {
            orgs.push((name.to_string(), d.requests, conns as u64));
        }
    });
    if let Err(e) = read {
        error!(event = "fault", error = %e, "reading the counters for the cluster sync failed");
        orgs.clear();
    }
    sync::Local {
        date: clock.date(day),
        orgs,
    }
}

impl ClusterLink {
    /// The other hosts' counts, if the last sync was of `date`.
    pub fn platform(&self, date: &str) -> Option<&Platform> {
        self.platform.as_ref().filter(|p| p.date == date)
    }

    /// Takes the sync task's answer for `day`: the other hosts' counts go into the kernel, or
    /// Redis being away is logged (at most every 30 s); true when a line about Redis was logged.
    pub fn answer<M: KernelMaps>(
        &mut self,
        maps: &mut M,
        ids: &OrgIds,
        date: &str,
        day: u64,
        answer: Result<Platform, String>,
        now: Instant,
    ) -> bool {
        match answer {
            Ok(p) => {
                let back = self.down.take();
                if let Some((since, _)) = back {
                    info!(
                        event = "cluster",
                        down_secs = now.saturating_duration_since(since).as_secs(),
                        "Redis reachable again; local counts re-sent"
                    );
                }
                if p.date == date {
                    for (name, others) in &p.others {
                        if let Some(id) = ids.id(name)
                            && let Err(e) = maps.write_remote(id, day, *others)
                        {
                            error!(event = "fault", org = name.as_str(), error = %e, "writing the cluster count failed");
                        }
                    }
                    self.platform = Some(p);
                }
                back.is_some()
            }
            Err(e) => {
                let (since, logged) = self.down.unwrap_or((now, now));
                let due =
                    self.down.is_none() || now.saturating_duration_since(logged) >= DOWN_LOG_EVERY;
                if due {
                    warn!(
                        event = "cluster",
                        error = %e,
                        "Redis unreachable: enforcing on the last known platform totals plus local counts; they are re-sent when it is back"
                    );
                }
                self.down = Some((since, if due { now } else { logged }));
                due
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use limiter_common::{RemoteCount, day_index};

    use super::*;
    use crate::{
        config::Config,
        daemon::fake::{FakeMaps, config_text, orgs_of},
    };

    const D: u64 = 20_000;

    fn ids() -> OrgIds {
        let text = config_text(std::path::Path::new("/tmp"), &["acme", "initech"], "");
        orgs_of(&Config::parse(&text, std::path::Path::new("t.toml")).expect("test config")).ids
    }

    fn platform(date: &str, acme: u64) -> Platform {
        Platform {
            date: date.into(),
            others: HashMap::from([("acme".to_string(), acme)]),
            connections: HashMap::new(),
        }
    }

    #[test]
    fn while_redis_is_down_the_last_counts_stay_and_the_line_is_not_repeated() {
        let (mut maps, ids, clock) = (FakeMaps::default(), ids(), Clock::new(0));
        let date = clock.date(D);
        maps.count(1, D, 7);
        let mut link = ClusterLink::default();
        let t0 = Instant::now();
        assert!(!link.answer(&mut maps, &ids, &date, D, Ok(platform(&date, 10)), t0));
        let remote = RemoteCount {
            day: D,
            requests: 10,
        };
        assert_eq!(maps.remote.get(&day_index(1, D)), Some(&remote));
        // Redis goes away: logged once, then at most every 30 s; the other hosts' last counts
        // and this host's own stay as they were.
        let down = |t| Err::<Platform, _>(format!("redis down at {t:?}"));
        assert!(link.answer(&mut maps, &ids, &date, D, down(1), t0));
        let t1 = t0 + DOWN_LOG_EVERY / 2;
        assert!(!link.answer(&mut maps, &ids, &date, D, down(2), t1));
        assert!(link.answer(&mut maps, &ids, &date, D, down(3), t0 + DOWN_LOG_EVERY));
        assert_eq!(link.down.map(|(since, _)| since), Some(t0));
        assert_eq!(maps.remote.get(&day_index(1, D)), Some(&remote));
        assert_eq!(link.platform(&date), Some(&platform(&date, 10)));
        assert_eq!(maps.usage(1, D).map(|(d, _)| d.requests).ok(), Some(7));
        // Back: logged, and the new counts written.
        let t2 = t0 + 3 * DOWN_LOG_EVERY;
        assert!(link.answer(&mut maps, &ids, &date, D, Ok(platform(&date, 12)), t2));
        assert!(link.down.is_none());
        assert_eq!(
            maps.remote.get(&day_index(1, D)).map(|r| r.requests),
            Some(12)
        );
    }

    #[test]
    fn counts_of_another_day_are_not_written() {
        let (mut maps, ids, clock) = (FakeMaps::default(), ids(), Clock::new(0));
        let mut link = ClusterLink::default();
        let yesterday = clock.date(D - 1);
        link.answer(
            &mut maps,
            &ids,
            &clock.date(D),
            D,
            Ok(platform(&yesterday, 10)),
            Instant::now(),
        );
        assert!(maps.remote.is_empty());
        assert_eq!(link.platform(&clock.date(D)), None);
    }

    #[test]
    fn local_counts_name_every_org_and_leave_out_unmapped() {
        let (mut maps, ids, clock) = (FakeMaps::default(), ids(), Clock::new(0));
        maps.count(1, D, 3);
        maps.count(UNMAPPED_ORG, D, 9);
        maps.conns.insert(2, 2);
        let local = local_counts(&maps, &ids, &clock, D);
        assert_eq!(local.date, clock.date(D));
        assert_eq!(
            local.orgs,
            [("acme".to_string(), 3, 0), ("initech".to_string(), 0, 2)]
        );
        maps.fail_reads = true;
        assert!(local_counts(&maps, &ids, &clock, D).orgs.is_empty());
    }
}
