//! A config turned into what the kernel needs, once: the org table the daemon keeps and the map
//! contents it writes. After the apply only the settings and the org table remain; the org list
//! and the map contents (most of a million-org daemon's memory) are dropped.

use limiter_common::UNMAPPED_ORG;
use tracing::{error, info, warn};

use super::maps::KernelMaps;
use crate::{
    clock::Clock,
    config::{
        Api, Cluster, ConcurrencyMode, Config, DaemonSettings, Limits, RestartOnly, Sections,
    },
    counters::{Applied, ApplyStats, CountersError},
    orgs::{OrgIds, OrgLimitTable, UNMAPPED_NAME},
    secret::KeySecret,
};

/// The config in force without its org list: what the orgs need at runtime is in [`Orgs`], and
/// their addresses are in the kernel's maps only.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub api: Api,
    pub limits: Limits,
    pub daemon: DaemonSettings,
    pub cluster: RestartOnly<Option<Cluster>>,
}

impl Settings {
    /// The tables a reload compares with a new config's.
    pub fn sections(&self) -> Sections<'_> {
        Sections {
            api: &self.api,
            limits: &self.limits,
            daemon: &self.daemon,
            cluster: &self.cluster,
        }
    }

    /// `cfg` without its orgs.
    pub fn of(cfg: Config) -> Self {
        let Config {
            api,
            limits,
            daemon,
            cluster,
            orgs: _,
            keys: _,
        } = cfg;
        Settings {
            api,
            limits,
            daemon,
            cluster,
        }
    }
}

/// The orgs in force: their kernel ids and their limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Orgs {
    pub ids: OrgIds,
    pub limits: OrgLimitTable,
}

impl Orgs {
    /// Org `id`'s name (`unmapped` for id 0), `?` for an id of no org.
    pub fn name(&self, id: u32) -> &str {
        self.ids.name(id).unwrap_or("?")
    }

    /// `(id, name)` of one org, or of unmapped traffic and every org when `org` is None; None
    /// when no org has that name.
    pub fn targets(&self, org: Option<&str>) -> Option<Vec<(u32, String)>> {
        match org {
            Some(name) => Some(vec![(self.ids.id(name)?, name.to_string())]),
            None => Some(
                std::iter::once((UNMAPPED_ORG, UNMAPPED_NAME.to_string()))
                    .chain(self.ids.iter().map(|(id, n)| (id, n.to_string())))
                    .collect(),
            ),
        }
    }
}

/// What a config asks of the kernel, built once and handed down.
pub struct Plan {
    pub settings: Settings,
    pub orgs: Orgs,
    /// The map contents the config asks for.
    desired: Applied,
    /// How many orgs the config lists.
    pub org_count: usize,
    /// Some org (or the default) delays connections over the limit, but no interface carries the
    /// SYN gate that does it.
    pub delay_without_gate: bool,
    /// Likewise for pacing orgs out of quota (`pace_over_quota`).
    pub pace_without_gate: bool,
    /// A secret for the keys' digests that the state directory does not hold yet, and why.
    new_secret: Option<(KeySecret, String)>,
    /// How many API keys the plan writes.
    pub key_count: usize,
}

impl Plan {
    /// The plan of `cfg` with org ids `ids` (those of the config's orgs).
    pub fn new(cfg: Config, ids: OrgIds, clock: &Clock) -> Result<Self, CountersError> {
        let desired = Applied::desired(&cfg, &ids, clock)?;
        Ok(Self::with_desired(cfg, ids, desired))
    }

    /// [`Plan::new`] with the map contents already built (a first start builds them while the
    /// kernel loads). The config's API keys move into the map contents.
    pub fn with_desired(mut cfg: Config, ids: OrgIds, mut desired: Applied) -> Self {
        let mut new_secret = None;
        if let Some(keys) = cfg.keys.as_mut() {
            let entries = std::mem::take(&mut keys.entries);
            let orgs = &cfg.orgs;
            desired.take_keys(entries, |i| ids.id_at(i, &orgs.get(i)?.name));
            new_secret = keys.secret_is_new.take().map(|why| (keys.secret, why));
        }
        let limits = OrgLimitTable::new(&cfg, &ids);
        let delay = |m: Option<ConcurrencyMode>| m == Some(ConcurrencyMode::Delay);
        let delay_without_gate = cfg.api.interfaces.is_empty()
            && (delay(Some(cfg.limits.concurrency_mode))
                || cfg.orgs.iter().any(|o| delay(o.concurrency_mode)));
        let pace_without_gate = cfg.api.interfaces.is_empty()
            && (cfg.limits.pace_over_quota
                || cfg.orgs.iter().any(|o| o.pace_over_quota == Some(true)));
        Plan {
            org_count: cfg.orgs.len(),
            delay_without_gate,
            pace_without_gate,
            new_secret,
            key_count: desired.keys.len(),
            settings: Settings::of(cfg),
            orgs: Orgs { ids, limits },
            desired,
        }
    }

    /// What the daemon keeps once the plan is applied: the map contents are dropped.
    pub fn into_parts(self) -> (Settings, Orgs) {
        (self.settings, self.orgs)
    }

    /// Keeps a new secret of the keys' digests in the state directory before the digests reach
    /// the kernel, so the next start finds them valid. A failure is logged: the next start then
    /// makes another secret and rewrites the digests.
    pub fn keep_new_secret(&mut self) {
        let Some((secret, why)) = self.new_secret.take() else {
            return;
        };
        let state_dir = &self.settings.daemon.state_dir;
        match crate::secret::write(state_dir, &secret) {
            Ok(path) => info!(
                event = "key_secret",
                path = %path.display(),
                reason = why.as_str(),
                "a new secret for the API keys' digests: every digest is written anew"
            ),
            Err(e) => warn!(
                event = "fault",
                error = %e,
                path = %crate::secret::path(state_dir).display(),
                "the API keys' secret could not be kept; the next start makes another and rewrites the digests"
            ),
        }
    }

    /// How many address entries the plan writes.
    pub fn cidr_count(&self) -> usize {
        self.desired.cidrs.len()
    }

    /// Brings the maps from `old` (what they hold) to this plan.
    pub fn apply<M: KernelMaps>(
        &self,
        maps: &mut M,
        old: &Applied,
    ) -> Result<ApplyStats, M::Error> {
        maps.apply(old, &self.desired)
    }

    /// [`Plan::apply`], and when a map write fails midway, `old` is put back so the kernel and
    /// the daemon agree again (a failure of that is logged; the first error is returned).
    pub fn apply_or_roll_back<M: KernelMaps>(
        &self,
        maps: &mut M,
        old: &Applied,
    ) -> Result<ApplyStats, M::Error> {
        self.apply(maps, old).inspect_err(|_| {
            let rolled_back = maps
                .read_applied()
                .and_then(|actual| maps.apply(&actual, old));
            if let Err(r) = rolled_back {
                error!(event = "fault", error = %r, "rolling back a failed reload failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::daemon::fake::config_text;

    fn plan_of(extra: &str, org_line: &str) -> Plan {
        let text = config_text(Path::new("/tmp"), &["acme", "initech"], extra).replace(
            "name = \"initech\"",
            &format!("name = \"initech\"\n{org_line}"),
        );
        let cfg = Config::parse(&text, Path::new("t.toml")).expect("test config");
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 64)
            .expect("distinct names");
        Plan::new(cfg, ids, &Clock::new(0)).expect("plan")
    }

    #[test]
    fn a_plan_holds_the_org_table_and_the_map_contents() {
        let plan = plan_of("", "daily_requests = 7");
        assert_eq!((plan.org_count, plan.cidr_count()), (2, 2));
        let initech = plan.orgs.ids.id("initech").expect("an id");
        assert_eq!(plan.orgs.limits.get(initech).daily_requests, 7);
        assert_eq!(plan.orgs.name(initech), "initech");
        assert_eq!(plan.orgs.name(UNMAPPED_ORG), UNMAPPED_NAME);
        assert_eq!(plan.orgs.targets(Some("nobody")), None);
        let all = plan.orgs.targets(None).expect("all orgs");
        let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, [UNMAPPED_NAME, "acme", "initech"]);
    }

    #[test]
    fn delay_without_the_syn_gate_is_noticed() {
        let delay = "concurrency_mode = \"delay\"";
        assert!(plan_of("", delay).delay_without_gate);
        assert!(!plan_of("", "").delay_without_gate);
        assert!(!plan_of("interfaces = [\"eth0\"]", delay).delay_without_gate);
        let pace = "pace_over_quota = true";
        assert!(plan_of("", pace).pace_without_gate);
        assert!(!plan_of("", "").pace_without_gate);
        let rate = |p: &Plan, org: &str| {
            let id = p.orgs.ids.id(org).expect("an id");
            p.orgs.limits.get(id).pace_rate
        };
        let paced = plan_of("interfaces = [\"eth0\"]", pace);
        assert!(!paced.pace_without_gate);
        assert_eq!((rate(&paced, "initech"), rate(&paced, "acme")), (10, 0));
        // Without the gate nothing is paced: refusals keep their connections.
        assert_eq!(rate(&plan_of("", pace), "initech"), 0);
    }
}

#[cfg(test)]
mod scale {
    use std::{io::Write as _, time::Instant};

    use super::*;

    /// Peak resident memory of this process so far, in KiB: `VmHWM`. (getrusage's `ru_maxrss`
    /// survives exec, so under `cargo test` it starts at cargo's own peak.)
    fn peak_rss_kib() -> i64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
                line.trim().trim_end_matches("kB").trim().parse().ok()
            })
            .unwrap_or(i64::MAX)
    }

    /// The load path of a million API keys (10 orgs x 100,000): reading and checking the keys
    /// file, the digests, and the map contents the daemon writes (in chunks) into API_KEYS.
    /// A measurement, so it runs alone and in release:
    /// `cargo test --release -p limiter-user --lib -- --ignored --exact daemon::plan::scale::a_million_keys`
    #[test]
    #[ignore = "a measurement; run alone in a release build"]
    fn a_million_keys() {
        const ORGS: usize = 10;
        const PER_ORG: usize = 100_000;
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = dir.path().join("api-keys");
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&keys)
                .expect("keys file");
            let mut out = std::io::BufWriter::new(file);
            for i in 0..ORGS * PER_ORG {
                // 40-byte keys, like the tokens of API platforms.
                let key = crate::secret::KeySecret::from_bytes([7; 16]).digest(&i.to_le_bytes());
                writeln!(out, "org-{} sk_live_{key:016x}{i:016x}", i % ORGS).expect("write");
            }
            out.flush().expect("flush");
        }
        let mut text = format!(
            "[api]\nports = [8080]\nidentify_by = [\"api_key\"]\napi_keys_file = \"{}\"\n\
             [daemon]\nstate_dir = \"{}\"\n",
            keys.display(),
            dir.path().join("state").display()
        );
        for o in 0..ORGS {
            text.push_str(&format!("[[orgs]]\nname = \"org-{o}\"\n"));
        }
        let config = dir.path().join("limiter.toml");
        std::fs::write(&config, text).expect("config");
        let before = peak_rss_kib();
        let started = Instant::now();
        let cfg = Config::load(&config).expect("a valid config");
        let parsed = started.elapsed();
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 64).expect("ids");
        let mut plan = Plan::new(cfg, ids, &Clock::new(0)).expect("plan");
        plan.keep_new_secret();
        // What `write_keys` builds for the kernel, a chunk at a time.
        let written: usize = plan
            .desired
            .keys
            .chunks(16_384)
            .map(|chunk| {
                let (d, i): (Vec<u64>, Vec<u32>) = chunk.iter().copied().unzip();
                std::hint::black_box((d, i)).0.len()
            })
            .sum();
        let elapsed = started.elapsed();
        let peak = peak_rss_kib();
        eprintln!(
            "{} keys: parsed and digested in {:.2} s, planned in {:.2} s; peak RSS {:.1} MiB \
             ({:.1} MiB before the load)",
            written,
            parsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            peak as f64 / 1024.0,
            before as f64 / 1024.0
        );
        assert_eq!((written, plan.key_count), (ORGS * PER_ORG, ORGS * PER_ORG));
        assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    }
}
