//! The neighbors scenario: one org floods far past its quota while another org sends its normal
//! load to the same nginx (a static file). What the well-behaved org keeps of the throughput and
//! p99 latency it has alone: (a) alone, (b) with the flood served, (c) with nginx `limit_req`
//! refusing the flooder, (d) with limiter refusing the flooder in the kernel, (e) with limiter
//! refusing it and pacing its new connections at the XDP gate (`pace_over_quota`), (f) with
//! limiter refusing it and its delay gate holding it to its concurrency limit; and (g) the
//! well-behaved org alone again with limiter and its XDP gate in place, what they cost it.
//!
//! The two loads run at once, from two client addresses: each org talks to a server address of
//! its own, and a route per server address picks the org's client address as the source.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_user::control::{self, Request as Ctl};
use serde::Serialize;

use super::{Bench, Expect, Load, Shape, check, median_min_max, nginx, wrk::WrkRun};
use crate::testbed::{Side, Testbed};

/// The flooder: keep-alive connections of short GETs, each sent as soon as the last is answered.
pub const FLOOD_CONNS: u32 = 64;
/// The well-behaved org's connections.
pub const GOOD_CONNS: u32 = 8;
/// Org names in limiter's config.
const GOOD_ORG: &str = "wellbehaved";
const FLOOD_ORG: &str = "flooder";
/// How long the flood runs before the measured load starts, so that the whole measured window
/// is flooded.
const FLOOD_LEAD: Duration = Duration::from_millis(300);
/// What the targets ask of (d) and (e).
const MIN_SHARE: f64 = 0.8;
const MIN_TIMES_NGINX: f64 = 2.0;
const MAX_P99_RATIO: f64 = 2.0;

/// Each org's client address and the server address it sends to.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub flooder: Ipv4Addr,
    pub good: Ipv4Addr,
    flooder_dst: Ipv4Addr,
    good_dst: Ipv4Addr,
}

/// Gives the server two more addresses and the client namespace a route to each, from the
/// flooder's and the well-behaved org's client address (the testbed's first two extra clients).
pub fn setup(tb: &Testbed) -> Result<Addrs> {
    let &[flooder, good, ..] = tb.clients_v4() else {
        bail!("the neighbors scenario needs two extra client addresses in the testbed");
    };
    let [a, b, c, _] = tb.server_v4().octets();
    let addrs = Addrs {
        flooder,
        good,
        flooder_dst: Ipv4Addr::new(a, b, c, 251),
        good_dst: Ipv4Addr::new(a, b, c, 252),
    };
    for (src, dst) in [(flooder, addrs.flooder_dst), (good, addrs.good_dst)] {
        let dst = format!("{dst}/32");
        ip(
            tb,
            Side::Server,
            &["addr", "add", &dst, "dev", &tb.veth(Side::Server)],
        )?;
        let (dev, src) = (tb.veth(Side::Client), src.to_string());
        ip(
            tb,
            Side::Client,
            &["route", "add", &dst, "dev", &dev, "src", &src],
        )?;
    }
    Ok(addrs)
}

fn ip(tb: &Testbed, side: Side, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["-n", tb.netns(side)])
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip -n {} {}: {}",
        tb.netns(side),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Alone,
    Flood,
    NginxRefuses,
    LimiterRefuses,
    LimiterPaces,
    LimiterDelays,
    AloneGated,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Alone,
        Phase::Flood,
        Phase::NginxRefuses,
        Phase::LimiterRefuses,
        Phase::LimiterPaces,
        Phase::LimiterDelays,
        Phase::AloneGated,
    ];

    fn label(self) -> &'static str {
        match self {
            Phase::Alone => "(a) alone",
            Phase::Flood => "(b) flood served, no limit",
            Phase::NginxRefuses => "(c) nginx limit_req refuses the flooder",
            Phase::LimiterRefuses => "(d) limiter refuses the flooder in the kernel",
            Phase::LimiterPaces => "(e) limiter refuses and paces the flooder (pace_over_quota)",
            Phase::LimiterDelays => {
                "(f) limiter refuses, its delay gate holds the flooder to 3 connections"
            }
            Phase::AloneGated => "(g) alone, limiter and its XDP gate in place",
        }
    }

    fn limiter(self) -> bool {
        matches!(
            self,
            Phase::LimiterRefuses | Phase::LimiterPaces | Phase::LimiterDelays | Phase::AloneGated
        )
    }

    fn flooded(self) -> bool {
        !matches!(self, Phase::Alone | Phase::AloneGated)
    }

    /// Only (c) goes through nginx's limits; the others are served the same file without them.
    fn path(self) -> &'static str {
        match self {
            Phase::NginxRefuses => nginx::NEIGHBORS,
            _ => nginx::STATIC,
        }
    }
}

/// One phase, over every run of it.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub phase: String,
    /// The well-behaved org's req/s: median, min and max over the runs.
    pub rps: f64,
    pub rps_min: f64,
    pub rps_max: f64,
    /// Its p99 latency in milliseconds, median over the runs.
    pub p99_ms: f64,
    /// `rps` over (a)'s.
    pub share_of_alone: f64,
    /// `p99_ms` over (a)'s.
    pub p99_vs_alone: f64,
    /// The flooder's answers per second (any status), median over the runs.
    pub flooder_rps: f64,
    /// The flooder's answers and how many of them were refusals, summed over the runs.
    pub flooder_responses: u64,
    pub flooder_refused: u64,
}

/// One target of the scenario, on (d) or (e).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub value: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Neighbors {
    /// What both orgs send.
    pub request: String,
    pub flooder_connections: u32,
    pub well_behaved_connections: u32,
    pub phases: Vec<PhaseResult>,
    pub targets: Vec<Target>,
}

impl Neighbors {
    /// The scenario as Markdown: the phases' table and the targets (also what the run prints).
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Neighbors, {}: the flooder on {} keep-alive connections, the well-behaved org on {}, at once\n\n\
             | phase | well-behaved req/s (min–max) | share of alone | p99 (ms) | p99 vs alone | flooder req/s | flooder refused |\n\
             |---|---|---|---|---|---|---|\n",
            self.request, self.flooder_connections, self.well_behaved_connections
        );
        for p in &self.phases {
            s.push_str(&format!(
                "| {} | {:.0} ({:.0}–{:.0}) | {:.3} | {:.2} | {:.2} | {:.0} | {} of {} |\n",
                p.phase,
                p.rps,
                p.rps_min,
                p.rps_max,
                p.share_of_alone,
                p.p99_ms,
                p.p99_vs_alone,
                p.flooder_rps,
                p.flooder_refused,
                p.flooder_responses
            ));
        }
        s.push('\n');
        for t in &self.targets {
            let met = if t.met { "met" } else { "not met" };
            s.push_str(&format!("- {}: {:.3}, {met}\n", t.target, t.value));
        }
        s
    }
}

/// limiter's config for (d): the flooder's daily quota is 1, the well-behaved org's is huge.
/// (e) also paces the flooder, (f) holds it to 3 connections (`concurrency_mode = "delay"`),
/// both by the XDP gate on the server's interface.
fn config(b: &Bench, addrs: &Addrs, phase: Phase) -> Result<PathBuf> {
    let mut head = b.config_head(1_000_000_000_000);
    let flooder = match phase {
        Phase::LimiterPaces | Phase::AloneGated => "pace_over_quota = true\n",
        Phase::LimiterDelays => "concurrent_connections = 3\nconcurrency_mode = \"delay\"\n",
        _ => "",
    };
    if !flooder.is_empty() {
        head = head.replacen("[api]\n", &format!("[api]\n{}", b.tb.gate_config()), 1);
    }
    let text = format!(
        "{head}[[orgs]]\nname = \"{GOOD_ORG}\"\ncidrs = [\"{}/32\"]\n\n\
         [[orgs]]\nname = \"{FLOOD_ORG}\"\ncidrs = [\"{}/32\"]\ndaily_requests = 1\n{flooder}",
        addrs.good, addrs.flooder
    );
    let path = b.tb.dir().join("bench-neighbors.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Today's counts of one org that the phases check.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    rejected: u64,
    paced_syns: u64,
    delayed_syns: u64,
}

/// Today's counts per org, from the daemon's report.
fn org_counts(b: &Bench) -> Result<HashMap<String, Counts>> {
    let r = control::call(
        &b.socket,
        &Ctl::Report {
            org: None,
            day: None,
        },
    )?;
    if !r.ok {
        bail!("limiter report: {}", r.error.unwrap_or_default());
    }
    let v: serde_json::Value = r.parse().context("reading limiter's report")?;
    let orgs = v["orgs"]
        .as_array()
        .context("limiter's report has no `orgs` list")?;
    orgs.iter()
        .map(|o| {
            let n = |k: &str| {
                o[k].as_u64()
                    .with_context(|| format!("limiter's report: an org without `{k}`: {o}"))
            };
            let name = o["org"]
                .as_str()
                .context("limiter's report: an org without a name")?;
            let counts = Counts {
                requests: n("requests")?,
                rejected: n("rejected")?,
                paced_syns: n("paced_syns")?,
                delayed_syns: n("delayed_syns")?,
            };
            Ok((name.to_string(), counts))
        })
        .collect()
}

/// `org`'s counts since `before`.
fn delta(
    before: &HashMap<String, Counts>,
    after: &HashMap<String, Counts>,
    org: &str,
) -> Result<Counts> {
    let (b, a) = before
        .get(org)
        .zip(after.get(org))
        .with_context(|| format!("org {org} is not in limiter's report"))?;
    Ok(Counts {
        requests: a.requests.saturating_sub(b.requests),
        rejected: a.rejected.saturating_sub(b.rejected),
        paced_syns: a.paced_syns.saturating_sub(b.paced_syns),
        delayed_syns: a.delayed_syns.saturating_sub(b.delayed_syns),
    })
}

/// One run of `phase`: the well-behaved org's run and, except alone, the flooder's.
fn run_phase(
    b: &mut Bench,
    phase: Phase,
    addrs: &Addrs,
    shape: Shape,
) -> Result<(WrkRun, Option<WrkRun>)> {
    let what = phase.label();
    let load = |conns| Load {
        path: phase.path(),
        conns,
        keep_alive: true,
        padded: false,
        shape,
    };
    let before = if phase.limiter() {
        let cfg = config(b, addrs, phase)?;
        b.start(&cfg, GOOD_ORG)?;
        Some(org_counts(b)?)
    } else {
        b.stop();
        None
    };
    let flood = if !phase.flooded() {
        None
    } else {
        // Runs until it is interrupted after the measured load (wrk then prints its summary).
        let cmd = b.wrk_command(addrs.flooder_dst, &load(FLOOD_CONNS), b.secs + 600.0, false);
        let child = b.tb.spawn_in_client(cmd)?;
        std::thread::sleep(FLOOD_LEAD);
        Some(child)
    };
    let good =
        b.tb.spawn_in_client(b.wrk_command(addrs.good_dst, &load(GOOD_CONNS), b.secs, true))
            .and_then(super::wait_wrk);
    let flood = flood
        .map(|child| {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            super::wait_wrk(child)
        })
        .transpose();
    let (good, flood) = (good?, flood?);
    check(
        &format!("{what}: the well-behaved org"),
        &good,
        Expect::Pass,
    )?;
    if good.p99_us.is_none() {
        bail!("{what}: wrk printed no 99th percentile for the well-behaved org");
    }
    match (phase, &flood) {
        (Phase::Alone | Phase::AloneGated, _) => {}
        (Phase::Flood, Some(f)) => check(&format!("{what}: the flooder"), f, Expect::Pass)?,
        (
            Phase::NginxRefuses
            | Phase::LimiterRefuses
            | Phase::LimiterPaces
            | Phase::LimiterDelays,
            Some(f),
        ) => {
            check(&format!("{what}: the flooder"), f, Expect::Refuse)?;
            let status = b.status(addrs.flooder_dst, phase.path(), None)?;
            ensure!(
                status == 429,
                "{what}: the flooder's next request got {status}, not 429"
            );
        }
        (_, None) => bail!("{what}: no flood ran"),
    }
    if let Some(before) = before {
        let after = org_counts(b)?;
        let good = delta(&before, &after, GOOD_ORG)?;
        let flood = delta(&before, &after, FLOOD_ORG)?;
        ensure!(
            good.rejected == 0 && good.requests > 0 && good.paced_syns == 0,
            "{what}: limiter counted {} requests, rejected {} and paced {} SYNs of the well-behaved org (expected requests only)",
            good.requests,
            good.rejected,
            good.paced_syns
        );
        ensure!(
            flood.rejected > 0 || !phase.flooded(),
            "{what}: limiter rejected none of the flooder's requests"
        );
        // (e) is only what it claims if the gate held the flooder's connections back.
        ensure!(
            phase != Phase::LimiterPaces || flood.paced_syns > 0,
            "{what}: the XDP gate paced none of the flooder's SYNs"
        );
        ensure!(
            phase != Phase::LimiterDelays || flood.delayed_syns > 0,
            "{what}: the XDP gate delayed none of the flooder's SYNs"
        );
        b.stop();
    }
    Ok((good, flood))
}

/// Runs every phase `b.reps` times (a b … g, a b … g, …) and compares them with (a).
pub fn run(b: &mut Bench, addrs: &Addrs, shape: Shape) -> Result<Neighbors> {
    let mut runs: Vec<(Vec<WrkRun>, Vec<WrkRun>)> = vec![Default::default(); Phase::ALL.len()];
    for _ in 0..b.reps {
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            let (good, flood) = run_phase(b, phase, addrs, shape)?;
            runs[i].0.push(good);
            runs[i].1.extend(flood);
        }
    }
    b.stop();
    let median =
        |v: &[WrkRun], f: fn(&WrkRun) -> f64| median_min_max(&v.iter().map(f).collect::<Vec<_>>());
    let alone_rps = median(&runs[0].0, |r| r.rps).0;
    let alone_p99 = median(&runs[0].0, |r| r.p99_us.unwrap_or(0.0)).0;
    let ratio = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    let phases: Vec<PhaseResult> = Phase::ALL
        .iter()
        .zip(&runs)
        .map(|(phase, (good, flood))| {
            let (rps, rps_min, rps_max) = median(good, |r| r.rps);
            let p99 = median(good, |r| r.p99_us.unwrap_or(0.0)).0;
            PhaseResult {
                phase: phase.label().to_string(),
                rps,
                rps_min,
                rps_max,
                p99_ms: p99 / 1000.0,
                share_of_alone: ratio(rps, alone_rps),
                p99_vs_alone: ratio(p99, alone_p99),
                flooder_rps: median(flood, |r| r.rps).0,
                flooder_responses: flood.iter().map(|r| r.requests).sum(),
                flooder_refused: flood.iter().map(|r| r.refused).sum(),
            }
        })
        .collect();
    let c = &phases[2];
    let targets = [(3, "(d)"), (4, "(e)")]
        .into_iter()
        .flat_map(|(i, name)| {
            let p = &phases[i];
            let times_nginx = ratio(p.share_of_alone, c.share_of_alone);
            [
                Target {
                    target: format!("{name} keeps at least {MIN_SHARE} of its alone throughput"),
                    value: p.share_of_alone,
                    met: p.share_of_alone >= MIN_SHARE,
                },
                Target {
                    target: format!("{name} keeps at least {MIN_TIMES_NGINX}× what (c) keeps"),
                    value: times_nginx,
                    met: times_nginx >= MIN_TIMES_NGINX,
                },
                Target {
                    target: format!("{name} p99 within {MAX_P99_RATIO}× of alone"),
                    value: p.p99_vs_alone,
                    met: p.p99_vs_alone <= MAX_P99_RATIO,
                },
            ]
        })
        .collect();
    Ok(Neighbors {
        request: match shape {
            Shape::ApiHeaders => {
                "API client requests (about 210-byte heads: User-Agent, Accept, a bearer token)"
            }
            _ => "wrk's minimal GETs (about 45-byte heads)",
        }
        .to_string(),
        flooder_connections: FLOOD_CONNS,
        well_behaved_connections: GOOD_CONNS,
        phases,
        targets,
    })
}
