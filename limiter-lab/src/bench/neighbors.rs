//! The neighbors scenario: one org floods far past its quota while another org sends its normal
//! load to the same nginx (a static file). What the well-behaved org keeps of the throughput and
//! p99 latency it has alone: (a) alone, (b) with the flood served, (c) with nginx `limit_req`
//! refusing the flooder, (d) with limiter refusing the flooder in the kernel.
//!
//! The two loads run at once, from two client addresses: each org talks to a server address of
//! its own, and a route per server address picks the org's client address as the source.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

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
/// What the targets ask of (d).
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
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Alone,
        Phase::Flood,
        Phase::NginxRefuses,
        Phase::LimiterRefuses,
    ];

    fn label(self) -> &'static str {
        match self {
            Phase::Alone => "(a) alone",
            Phase::Flood => "(b) flood served, no limit",
            Phase::NginxRefuses => "(c) nginx limit_req refuses the flooder",
            Phase::LimiterRefuses => "(d) limiter refuses the flooder in the kernel",
        }
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

/// One target of the scenario, on (d).
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
fn config(b: &Bench, addrs: &Addrs) -> Result<PathBuf> {
    let text = format!(
        "{}[[orgs]]\nname = \"{GOOD_ORG}\"\ncidrs = [\"{}/32\"]\n\n\
         [[orgs]]\nname = \"{FLOOD_ORG}\"\ncidrs = [\"{}/32\"]\ndaily_requests = 1\n",
        b.config_head(1_000_000_000_000),
        addrs.good,
        addrs.flooder
    );
    let path = b.tb.dir().join("bench-neighbors.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Today's (requests, rejected) per org, from the daemon's report.
fn org_counts(b: &Bench) -> Result<HashMap<String, (u64, u64)>> {
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
            Ok((name.to_string(), (n("requests")?, n("rejected")?)))
        })
        .collect()
}

/// (requests, rejected) of `org` since `before`.
fn delta(
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
    org: &str,
) -> Result<(u64, u64)> {
    let (b, a) = (before.get(org), after.get(org));
    let ((br, bj), (ar, aj)) = b
        .zip(a)
        .with_context(|| format!("org {org} is not in limiter's report"))?;
    Ok((ar.saturating_sub(*br), aj.saturating_sub(*bj)))
}

/// One run of `phase`: the well-behaved org's run and, except alone, the flooder's.
fn run_phase(
    b: &mut Bench,
    phase: Phase,
    addrs: &Addrs,
    cfg: &Path,
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
    let before = if phase == Phase::LimiterRefuses {
        b.start(cfg, GOOD_ORG)?;
        Some(org_counts(b)?)
    } else {
        b.stop();
        None
    };
    let flood = if phase == Phase::Alone {
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
        (Phase::Alone, _) => {}
        (Phase::Flood, Some(f)) => check(&format!("{what}: the flooder"), f, Expect::Pass)?,
        (Phase::NginxRefuses | Phase::LimiterRefuses, Some(f)) => {
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
        let (good_req, good_rej) = delta(&before, &after, GOOD_ORG)?;
        let (_, flood_rej) = delta(&before, &after, FLOOD_ORG)?;
        ensure!(
            good_rej == 0 && good_req > 0,
            "{what}: limiter counted {good_req} requests and rejected {good_rej} of the well-behaved org (expected requests and no rejections)"
        );
        ensure!(
            flood_rej > 0,
            "{what}: limiter rejected none of the flooder's requests"
        );
        b.stop();
    }
    Ok((good, flood))
}

/// Runs every phase `b.reps` times (a b c d, a b c d, …) and compares them with (a).
pub fn run(b: &mut Bench, addrs: &Addrs, shape: Shape) -> Result<Neighbors> {
    let cfg = config(b, addrs)?;
    let mut runs: Vec<(Vec<WrkRun>, Vec<WrkRun>)> = vec![Default::default(); Phase::ALL.len()];
    for _ in 0..b.reps {
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            let (good, flood) = run_phase(b, phase, addrs, &cfg, shape)?;
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
    let (c, d) = (&phases[2], &phases[3]);
    let times_nginx = ratio(d.share_of_alone, c.share_of_alone);
    let targets = vec![
        Target {
            target: format!("(d) keeps at least {MIN_SHARE} of its alone throughput"),
            value: d.share_of_alone,
            met: d.share_of_alone >= MIN_SHARE,
        },
        Target {
            target: format!("(d) keeps at least {MIN_TIMES_NGINX}× what (c) keeps"),
            value: times_nginx,
            met: times_nginx >= MIN_TIMES_NGINX,
        },
        Target {
            target: format!("(d) p99 within {MAX_P99_RATIO}× of alone"),
            value: d.p99_vs_alone,
            met: d.p99_vs_alone <= MAX_P99_RATIO,
        },
    ];
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
