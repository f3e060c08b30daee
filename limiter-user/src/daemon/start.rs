//! Startup: loads the programs, turns the config into its [`Plan`], restores today's counts and
//! applies the plan before a single socket reaches the programs.

use std::{path::Path, time::Instant};

use anyhow::Context as _;
use limiter_common::{DayCounters, UNMAPPED_ORG};
use tracing::{error, info, warn};

use super::{Daemon, maps::KernelMaps, plan::Plan, release_freed_memory};
use crate::{
    clock::Clock,
    config::{Cluster, Config},
    counters::{self, Applied},
    hooks,
    loader::Kernel,
    orgs::OrgIds,
    pins, snapshot, sync,
};

/// The kernel loaded, and the tables of a first start built meanwhile.
struct Loaded {
    kernel: Kernel,
    ids: OrgIds,
    desired: Applied,
    load_ms: u64,
    tables_ms: u64,
}

/// Loads the programs and creates the maps while a second thread builds the tables of a first
/// start (ids and map contents): with a million orgs each takes about a second. The ids of a
/// first start follow the config's order, so the id table and the map contents are built at the
/// same time too.
fn load(cfg: &Config, clock: &Clock) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let cap = pins::Capacity::for_config(cfg);
    let fresh_ids = || {
        let t = Instant::now();
        let names = cfg.orgs.iter().map(|o| o.name.as_str());
        OrgIds::assign(names, None, cap.orgs).map(|ids| (ids, t.elapsed()))
    };
    let fresh_desired = || {
        let t = Instant::now();
        Applied::desired_with(cfg, clock, |index, _| Some(index as u32 + 1))
            .map(|d| (d, t.elapsed()))
    };
    let (kernel, ids, desired) = std::thread::scope(|s| {
        let spawn = |name: &str| std::thread::Builder::new().name(name.into());
        let ids = spawn("limiter-ids").spawn_scoped(s, fresh_ids);
        let desired = spawn("limiter-tables").spawn_scoped(s, fresh_desired);
        let kernel = Kernel::load(&cfg.daemon.pin_dir, cap);
        // Without a second thread (spawn failed) they are built here.
        let ids = match ids {
            Ok(t) => t.join().ok(),
            Err(_) => Some(fresh_ids()),
        };
        let desired = match desired {
            Ok(t) => t.join().ok(),
            Err(_) => Some(fresh_desired()),
        };
        (kernel, ids, desired)
    });
    let kernel = kernel.context("loading the kernel programs")?;
    let load_ms = started.elapsed().as_millis() as u64;
    let (ids, ids_time) =
        ids.ok_or_else(|| anyhow::anyhow!("building the org id table panicked"))??;
    let (desired, desired_time) =
        desired.ok_or_else(|| anyhow::anyhow!("building the map contents panicked"))??;
    Ok(Loaded {
        kernel,
        ids,
        desired,
        load_ms,
        tables_ms: ids_time.max(desired_time).as_millis() as u64,
    })
}

/// The plan of `cfg` for maps a restarted daemon found pinned, and what they hold: the ids the
/// kernel has are kept (ids it gives new orgs are cleared), and today's slots are prepared.
fn resume(
    kernel: &mut Kernel,
    cfg: Config,
    loaded_ids: OrgIds,
    loaded_desired: Applied,
    clock: &Clock,
    day: u64,
) -> anyhow::Result<(Plan, Applied)> {
    let names = cfg.orgs.iter().map(|o| o.name.as_str());
    let prev = counters::ids_from_kernel(kernel)?;
    let ids = OrgIds::assign(names, Some(&prev), kernel.org_capacity())?;
    // Orgs the config no longer has (edited while the daemon was away, or a reload it died in)
    // go now: their counts of today are logged first, as a reload does.
    for (id, name) in prev.iter() {
        if ids.id(name).is_none()
            && let Ok((d, _)) = kernel.usage(id, day)
        {
            info!(
                event = "org_removed",
                org = name,
                requests = d.requests,
                rejected = d.rejected,
                exempt_media_gets = d.exempt_media_gets,
                exempt_pushes = d.exempt_pushes,
                "org not in the config any more; its counts of today end here"
            );
        }
    }
    for (id, name) in ids.iter() {
        if prev.id(name) != Some(id) {
            kernel.clear_org(id)?;
        }
    }
    let plan = if ids == loaded_ids {
        Plan::with_desired(cfg, ids, loaded_desired)
    } else {
        drop(loaded_desired);
        Plan::new(cfg, ids, clock)?
    };
    let old = kernel.read_applied()?;
    // Tomorrow's slots are prepared in `run`, once the days missed while the daemon was away
    // are closed: tomorrow's slot is the one of the day before yesterday.
    kernel.prepare_day_all(&plan.orgs.ids, day, counters::Prepare::Live, None)?;
    Ok((plan, old))
}

/// What the startup line reports besides the plan.
struct Timings {
    parse_ms: u64,
    load_ms: u64,
    tables_ms: u64,
    started: Instant,
}

impl Daemon<Kernel> {
    /// Loads and attaches the programs and fills the maps from `cfg`.
    pub fn start(config_path: &Path, cfg: Config, parse_ms: u64) -> anyhow::Result<Self> {
        let started = Instant::now();
        // Test hook: start as if the daemon had been away this long.
        let away = hooks::value("LIMITER_TEST_CLOCK_SHIFT_SECS").unwrap_or(0);
        let clock = Clock::new(*cfg.limits.day_start_secs).ahead_secs(away);
        let loaded = load(&cfg, &clock)?;
        let mut kernel = loaded.kernel;
        let day = clock.today();
        // A restarted daemon finds the kernel's ids, map contents and counts as they are. Fresh
        // maps are all zero (tag 0), which the kernel takes over without clearing; today's
        // counts come from the snapshot, before the kernel starts counting (CONFIG is marked
        // ready by the apply below).
        let (plan, old, restored) = if kernel.resumed {
            let (plan, old) = resume(&mut kernel, cfg, loaded.ids, loaded.desired, &clock, day)?;
            (plan, old, 0)
        } else {
            let plan = Plan::with_desired(cfg, loaded.ids, loaded.desired);
            let restored = restore_snapshot(&mut kernel, &plan, &clock, day)?;
            (plan, Applied::default(), restored)
        };
        let timings = Timings {
            parse_ms,
            load_ms: loaded.load_ms,
            tables_ms: loaded.tables_ms,
            started,
        };
        Self::apply_and_attach(config_path, kernel, plan, old, clock, restored, timings)
    }

    /// Writes the plan into the maps, and only then attaches the programs, so sockets reach
    /// them with the tables written and CONFIG ready.
    fn apply_and_attach(
        config_path: &Path,
        mut kernel: Kernel,
        mut plan: Plan,
        old: Applied,
        clock: Clock,
        restored: usize,
        t: Timings,
    ) -> anyhow::Result<Self> {
        let before_apply = Instant::now();
        plan.keep_new_secret();
        let stats = plan.apply(&mut kernel, &old)?;
        drop(old);
        let api = &plan.settings.api;
        kernel
            .attach(&api.cgroup, &api.interfaces, api.netns.as_deref())
            .context("attaching the kernel programs")?;
        let (org_count, delay_without_gate) = (plan.org_count, plan.delay_without_gate);
        let pace_without_gate = plan.pace_without_gate;
        let key_count = plan.key_count;
        let (settings, orgs) = plan.into_parts();
        release_freed_memory();
        let apply_ms = before_apply.elapsed().as_millis() as u64;
        if delay_without_gate {
            warn!(
                event = "config",
                "concurrency_mode = \"delay\" needs api.interfaces (the XDP SYN gate); without it over-limit connections are only observed"
            );
        }
        if pace_without_gate {
            warn!(
                event = "config",
                "pace_over_quota needs api.interfaces (the XDP SYN gate); without it no org is paced"
            );
        }
        let day = clock.today();
        info!(
            event = "startup",
            programs = "sock_ops,stream_verdict,sk_msg,xdp",
            interfaces = ?*settings.api.interfaces,
            cgroup = %settings.api.cgroup.display(),
            ports = ?settings.api.ports,
            orgs = org_count,
            cidrs = stats.cidrs_written,
            identify_by = ?settings.api.identify.by.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            api_keys = key_count,
            keys_written = stats.keys_written,
            media_get_prefixes = ?settings.api.media_get_prefixes,
            day = %clock.date(day),
            pins = %kernel.pin_dir.display(),
            resumed = kernel.resumed,
            restored_orgs = restored,
            parse_ms = t.parse_ms,
            load_ms = t.load_ms,
            tables_ms = t.tables_ms,
            apply_ms,
            startup_ms = t.started.elapsed().as_millis() as u64,
            "limiter started"
        );
        Ok(Daemon::new(config_path, settings, orgs, clock, kernel, day))
    }
}

/// Writes today's snapshot counts into fresh maps; returns how many orgs were restored.
/// Without a usable snapshot, a cluster host takes its own count of today back from Redis.
pub fn restore_snapshot<M: KernelMaps>(
    maps: &mut M,
    plan: &Plan,
    clock: &Clock,
    day: u64,
) -> anyhow::Result<usize> {
    let (state_dir, ids) = (&plan.settings.daemon.state_dir, &plan.orgs.ids);
    let cluster = plan.settings.cluster.as_ref();
    let snap = match snapshot::read(state_dir, &clock.date(day)) {
        Ok(Some(snap)) if snap.day == day => snap,
        Ok(_) => return restore_from_cluster(maps, cluster, ids, clock, day),
        Err(e) => {
            // A damaged snapshot must not keep the limiter from starting: set it aside.
            let path = snapshot::path(state_dir, &clock.date(day));
            let aside = path.with_extension("json.bad");
            let _ = std::fs::rename(&path, &aside);
            error!(event = "fault", error = %e, moved_to = %aside.display(), "today's snapshot is unreadable; starting from the kernel's counts");
            return restore_from_cluster(maps, cluster, ids, clock, day);
        }
    };
    let unmapped = DayCounters {
        day,
        ..snap.unmapped
    };
    maps.write_day(UNMAPPED_ORG, unmapped)?;
    let mut n = 0;
    for (name, counts) in &snap.orgs {
        if let Some(id) = ids.id(name.as_ref()) {
            maps.write_day(id, DayCounters { day, ..*counts })?;
            n += 1;
        }
    }
    Ok(n)
}

/// This host's requests of today as it last shared them in Redis (`[cluster]` only): after a
/// reboot that lost the day's snapshot, the quota continues from there instead of from 0.
/// Redis being away is logged, not fatal: the start must not wait on it.
fn restore_from_cluster<M: KernelMaps>(
    maps: &mut M,
    cluster: Option<&Cluster>,
    ids: &OrgIds,
    clock: &Clock,
    day: u64,
) -> anyhow::Result<usize> {
    let Some(cluster) = cluster else {
        return Ok(0);
    };
    let counts = match sync::own_counts(cluster, &clock.date(day)) {
        Ok(counts) => counts,
        Err(e) => {
            warn!(event = "cluster", error = %e, "no day snapshot, and this host's counts could not be read back from Redis; starting from 0");
            return Ok(0);
        }
    };
    let mut n = 0;
    for (name, requests) in counts {
        if let Some(id) = ids.id(&name) {
            let d = DayCounters {
                requests,
                ..DayCounters::for_day(day)
            };
            maps.write_day(id, d)?;
            n += 1;
        }
    }
    info!(event = "cluster", restored_orgs = n, host_id = %cluster.host_id, "no day snapshot: this host's requests of today restored from Redis");
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::fake::{FakeMaps, config_text};

    const D: u64 = 20_000;

    /// The plan of orgs `acme` and `initech` with its state in `dir`.
    fn plan(dir: &Path, clock: &Clock) -> Plan {
        let text = config_text(dir, &["acme", "initech"], "");
        let cfg = Config::parse(&text, Path::new("t.toml")).expect("test config");
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 64)
            .expect("distinct names");
        Plan::new(cfg, ids, clock).expect("plan")
    }

    fn requests(maps: &FakeMaps, id: u32) -> u64 {
        maps.usage(id, D).map_or(u64::MAX, |(d, _)| d.requests)
    }

    #[test]
    fn todays_snapshot_is_restored_into_fresh_maps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Clock::new(0);
        let plan = plan(dir.path(), &clock);
        let counts = |requests| DayCounters {
            requests,
            ..DayCounters::for_day(D)
        };
        let mut snap = snapshot::DaySnapshot {
            day: D,
            date: clock.date(D),
            unmapped: counts(2),
            ..Default::default()
        };
        snap.orgs.insert("acme".into(), counts(5));
        snap.orgs.insert("gone".into(), counts(3));
        snapshot::write(&plan.settings.daemon.state_dir, &snap).expect("writing a snapshot");
        let mut maps = FakeMaps::default();
        // Only orgs still configured are restored.
        assert_eq!(restore_snapshot(&mut maps, &plan, &clock, D).ok(), Some(1));
        assert_eq!((requests(&maps, 1), requests(&maps, 2)), (5, 0));
        assert_eq!(requests(&maps, UNMAPPED_ORG), 2);
    }

    #[test]
    fn a_damaged_snapshot_is_set_aside_and_the_start_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Clock::new(0);
        let plan = plan(dir.path(), &clock);
        let path = snapshot::path(&plan.settings.daemon.state_dir, &clock.date(D));
        std::fs::create_dir_all(path.parent().expect("a days directory")).expect("mkdir");
        std::fs::write(&path, "{ not json").expect("writing");
        let mut maps = FakeMaps::default();
        assert_eq!(restore_snapshot(&mut maps, &plan, &clock, D).ok(), Some(0));
        assert!(!path.exists());
        assert!(path.with_extension("json.bad").exists());
        assert!(maps.slots.is_empty());
    }
}
