//! The usage report (`limiter report`) and its table form.

use std::fmt::Write as _;

use limiter_common::{DayCounters, UNMAPPED_ORG};
use serde::{Deserialize, Serialize};

use crate::{
    clock::Clock,
    daemon::KernelMaps,
    orgs::{OrgIds, OrgLimitTable},
    snapshot::DaySnapshot,
    sync::Platform,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub day: String,
    pub resets_in_seconds: u64,
    pub orgs: Vec<OrgReport>,
    pub unmapped: UnmappedReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgReport {
    pub org: String,
    pub requests: u64,
    pub daily_limit: u64,
    pub remaining: u64,
    pub rejected: u64,
    pub exempt_media_gets: u64,
    pub exempt_pushes: u64,
    pub unparsed: u64,
    pub connections: u64,
    pub peak_connections: u64,
    pub concurrency_limit: u32,
    pub concurrency_breaches: u64,
    /// Connections refused with the concurrency 429 (`concurrency_mode = "reject"`).
    #[serde(default)]
    pub concurrency_rejected: u64,
    /// SYNs held back by the XDP gate (`concurrency_mode = "delay"`).
    #[serde(default)]
    pub delayed_syns: u64,
    /// SYNs held back while the org was out of quota and paced (`pace_over_quota`).
    #[serde(default)]
    pub paced_syns: u64,
    /// Requests (counted, refused or exempt) by where the org was known from.
    #[serde(default)]
    pub identified_by: IdentifiedBy,
    /// In a cluster: requests of all hosts today (this one's `requests` included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_requests: Option<u64>,
    /// In a cluster: connections open on all hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_connections: Option<u64>,
}

/// An org's requests by the source of `api.identify_by` that knew the org.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentifiedBy {
    pub address: u64,
    pub proxy_protocol: u64,
    pub forwarded: u64,
    pub api_key: u64,
}

impl IdentifiedBy {
    pub fn of(d: &DayCounters) -> Self {
        IdentifiedBy {
            address: d.by_address,
            proxy_protocol: d.by_proxy_protocol,
            forwarded: d.by_forwarded,
            api_key: d.by_api_key,
        }
    }

    /// (source name, count) in the order of the config's sources.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("api_key", self.api_key),
            ("proxy_protocol", self.proxy_protocol),
            ("forwarded", self.forwarded),
            ("address", self.address),
        ]
    }

    /// The table's form: the sources that counted, shortest names (`key=5,addr=2`), or `-`.
    fn compact(&self) -> String {
        let short = [
            ("key", self.api_key),
            ("proxy", self.proxy_protocol),
            ("fwd", self.forwarded),
            ("addr", self.address),
        ];
        let parts: Vec<String> = short
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(",")
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmappedReport {
    pub requests: u64,
    pub connections: u64,
    pub unparsed: u64,
    /// Media GETs from unmapped clients (a key added to the original report; docs/cli.md).
    #[serde(default)]
    pub exempt_media_gets: u64,
    /// Requests that carried an API key no org has.
    #[serde(default)]
    pub unknown_keys: u64,
}

impl UnmappedReport {
    fn new(d: &DayCounters, conns: i64) -> Self {
        UnmappedReport {
            requests: d.requests,
            connections: conns.max(0) as u64,
            unparsed: d.unparsed,
            exempt_media_gets: d.exempt_media_gets,
            unknown_keys: d.unknown_keys,
        }
    }
}

impl OrgReport {
    pub fn new(org: &str, d: &DayCounters, conns: i64, daily_limit: u64, concurrency: u32) -> Self {
        let connections = conns.max(0) as u64;
        OrgReport {
            org: org.to_string(),
            requests: d.requests,
            daily_limit,
            remaining: daily_limit.saturating_sub(d.requests),
            rejected: d.rejected,
            exempt_media_gets: d.exempt_media_gets,
            exempt_pushes: d.exempt_pushes,
            unparsed: d.unparsed,
            connections,
            // The day may have started with connections already open.
            peak_connections: d.peak_connections.max(connections),
            concurrency_limit: concurrency,
            concurrency_breaches: d.concurrency_breaches,
            concurrency_rejected: d.concurrency_rejected,
            delayed_syns: d.delayed_syns,
            paced_syns: d.paced_syns,
            identified_by: IdentifiedBy::of(d),
            platform_requests: None,
            platform_connections: None,
        }
    }
}

/// What a report of one day is read from.
pub struct Inputs<'a, M> {
    pub maps: &'a M,
    pub ids: &'a OrgIds,
    pub limits: &'a OrgLimitTable,
    pub clock: &'a Clock,
    pub day: u64,
    /// One org only (None: all).
    pub only: Option<&'a str>,
    /// The other hosts' counts of `day`, in a cluster.
    pub platform: Option<&'a Platform>,
}

/// Reads the counters of `day` for every configured org (or only `only`), in id order.
pub fn build<M: KernelMaps>(inputs: &Inputs<'_, M>) -> Result<Report, M::Error> {
    let Inputs {
        maps,
        ids,
        limits,
        clock,
        day,
        only,
        platform,
    } = *inputs;
    let mut orgs = Vec::new();
    let mut push = |id: u32, name: &str, d: DayCounters, conns: i64| {
        let l = limits.get(id);
        let mut r = OrgReport::new(name, &d, conns, l.daily_requests, l.concurrent_connections);
        if let Some(p) = platform {
            let total = r.requests + p.others.get(name).copied().unwrap_or(0);
            r.platform_requests = Some(total);
            r.remaining = r.daily_limit.saturating_sub(total);
            r.platform_connections =
                Some(p.connections.get(name).copied().unwrap_or(r.connections));
        }
        orgs.push(r);
    };
    // All orgs: a few batch reads; one org: two lookups.
    match only {
        None => maps.each_usage(ids.max_id(), day, &mut |id, d, conns| {
            if id != UNMAPPED_ORG
                && let Some(name) = ids.name(id)
            {
                push(id, name, d, conns);
            }
        })?,
        Some(name) => {
            if let Some(id) = ids.id(name) {
                let (d, conns) = maps.usage(id, day)?;
                push(id, name, d, conns);
            }
        }
    }
    let (u, conns) = maps.usage(UNMAPPED_ORG, day)?;
    Ok(Report {
        day: clock.date(day),
        resets_in_seconds: if day == clock.today() {
            clock.resets_in_seconds()
        } else {
            0
        },
        orgs,
        unmapped: UnmappedReport::new(&u, conns),
    })
}

/// A past day's report from its snapshot (connections are not kept for past days), with the
/// limits in force now. Orgs the snapshot lists as idle report zeros; orgs it does not know, or
/// that are no longer configured, are left out.
pub fn from_snapshot(
    ids: &OrgIds,
    limits: &OrgLimitTable,
    snap: &DaySnapshot<'_>,
    only: Option<&str>,
) -> Report {
    let idle: std::collections::HashSet<&str> = snap.idle.iter().map(|n| n.as_ref()).collect();
    let zero = DayCounters::for_day(snap.day);
    let mut orgs = Vec::new();
    for (id, name) in ids.iter() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let Some(c) = snap
            .orgs
            .get(name)
            .or_else(|| idle.contains(name).then_some(&zero))
        else {
            continue;
        };
        let l = limits.get(id);
        orgs.push(OrgReport::new(
            name,
            c,
            0,
            l.daily_requests,
            l.concurrent_connections,
        ));
    }
    Report {
        day: snap.date.clone(),
        resets_in_seconds: 0,
        orgs,
        unmapped: UnmappedReport::new(&snap.unmapped, 0),
    }
}

impl Report {
    /// The human table of `limiter report`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let h = self.resets_in_seconds / 3600;
        let m = self.resets_in_seconds % 3600 / 60;
        let _ = writeln!(out, "day {} (resets in {h}h{m:02}m)", self.day);
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8} {:>6} {:>5} {:>8}  IDENTIFIED BY",
            "ORG",
            "REQUESTS",
            "LIMIT",
            "REMAINING",
            "REJECTED",
            "MEDIA",
            "PUSHES",
            "UNPARSED",
            "CONNS",
            "PEAK",
            "BREACHES"
        );
        for o in &self.orgs {
            let _ = writeln!(
                out,
                "{:<20} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8} {:>6} {:>5} {:>8}  {}",
                o.org,
                o.requests,
                o.daily_limit,
                o.remaining,
                o.rejected,
                o.exempt_media_gets,
                o.exempt_pushes,
                o.unparsed,
                format!("{}/{}", o.connections, o.concurrency_limit),
                o.peak_connections,
                o.concurrency_breaches,
                o.identified_by.compact()
            );
        }
        let u = &self.unmapped;
        let unknown = match u.unknown_keys {
            0 => "-".to_owned(),
            n => format!("unknown_keys={n}"),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8} {:>6} {:>5} {:>8}  {}",
            "(unmapped)",
            u.requests,
            "-",
            "-",
            "-",
            u.exempt_media_gets,
            "-",
            u.unparsed,
            u.connections,
            "-",
            "-",
            unknown
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn past_days_report_idle_orgs_as_zero_and_skip_unknown_ones() {
        let cfg = Config::parse(
            "[api]\nports = [8080]\n[[orgs]]\nname = \"acme\"\ncidrs = [\"10.0.0.0/24\"]\n\
             [[orgs]]\nname = \"initech\"\ncidrs = [\"10.0.1.0/24\"]\ndaily_requests = 7\n\
             [[orgs]]\nname = \"newco\"\ncidrs = [\"10.0.2.0/24\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let mut snap = DaySnapshot {
            day: 9,
            date: "1970-01-10".into(),
            ..Default::default()
        };
        let mut d = DayCounters::for_day(9);
        d.requests = 5;
        snap.orgs.insert("acme".into(), d);
        snap.idle.push("initech".into());
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 10).unwrap();
        let limits = OrgLimitTable::new(&cfg, &ids);
        let r = from_snapshot(&ids, &limits, &snap, None);
        let got: Vec<(&str, u64, u64)> = r
            .orgs
            .iter()
            .map(|o| (o.org.as_str(), o.requests, o.daily_limit))
            .collect();
        assert_eq!(
            got,
            [("acme", 5, 2500), ("initech", 0, 7)],
            "newco was not configured that day"
        );
        assert_eq!(
            from_snapshot(&ids, &limits, &snap, Some("initech"))
                .orgs
                .len(),
            1
        );
    }

    #[test]
    fn json_has_the_contract_keys() {
        let mut d = DayCounters::for_day(5);
        d.requests = 120;
        d.exempt_media_gets = 4;
        d.exempt_pushes = 2;
        d.peak_connections = 4;
        d.concurrency_breaches = 1;
        d.by_api_key = 100;
        d.by_forwarded = 20;
        d.by_address = 6;
        let r = Report {
            day: "2026-11-27".into(),
            resets_in_seconds: 3600,
            orgs: vec![OrgReport::new("acme", &d, 1, 2500, 3)],
            unmapped: UnmappedReport {
                requests: 3,
                unknown_keys: 2,
                ..Default::default()
            },
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let want = serde_json::json!({
            "org": "acme", "requests": 120, "daily_limit": 2500, "remaining": 2380, "rejected": 0,
            "exempt_media_gets": 4, "exempt_pushes": 2, "unparsed": 0,
            "connections": 1, "peak_connections": 4, "concurrency_limit": 3, "concurrency_breaches": 1,
            "concurrency_rejected": 0, "delayed_syns": 0, "paced_syns": 0,
            "identified_by": {"address": 6, "proxy_protocol": 0, "forwarded": 20, "api_key": 100}
        });
        assert_eq!(v["orgs"][0], want);
        assert_eq!(v["day"], "2026-11-27");
        assert_eq!(v["resets_in_seconds"], 3600);
        assert_eq!(v["unmapped"]["requests"], 3);
        assert_eq!(v["unmapped"]["connections"], 0);
        assert_eq!(v["unmapped"]["unparsed"], 0);
        assert_eq!(v["unmapped"]["unknown_keys"], 2);
        let table = r.table();
        let acme = table.lines().find(|l| l.starts_with("acme")).unwrap();
        assert!(acme.ends_with("  key=100,fwd=20,addr=6"), "{table}");
        let unmapped = table.lines().find(|l| l.starts_with("(unmapped)")).unwrap();
        assert!(unmapped.ends_with("  unknown_keys=2"), "{table}");
        // A report of an older daemon, without the identification fields, still reads.
        let mut old = v.clone();
        old["orgs"][0]
            .as_object_mut()
            .unwrap()
            .remove("identified_by");
        old["unmapped"]
            .as_object_mut()
            .unwrap()
            .remove("unknown_keys");
        let back: Report = serde_json::from_value(old).unwrap();
        assert_eq!(back.orgs[0].identified_by, IdentifiedBy::default());
    }

    #[test]
    fn a_past_days_report_keeps_the_sources_and_unknown_keys() {
        let cfg = Config::parse(
            "[api]\nports = [8080]\n[[orgs]]\nname = \"acme\"\ncidrs = [\"10.0.0.0/24\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 10).unwrap();
        let limits = OrgLimitTable::new(&cfg, &ids);
        let mut snap = DaySnapshot {
            day: 9,
            date: "1970-01-10".into(),
            ..Default::default()
        };
        let mut d = DayCounters::for_day(9);
        d.requests = 5;
        d.by_proxy_protocol = 5;
        snap.orgs.insert("acme".into(), d);
        snap.unmapped.unknown_keys = 3;
        let r = from_snapshot(&ids, &limits, &snap, None);
        assert_eq!(r.orgs[0].identified_by.proxy_protocol, 5);
        assert_eq!(r.unmapped.unknown_keys, 3);
    }

    #[test]
    fn remaining_never_underflows_and_peak_covers_open_connections() {
        let mut d = DayCounters::for_day(1);
        d.requests = 30;
        let o = OrgReport::new("x", &d, 5, 20, 3);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.peak_connections, 5);
    }
}
