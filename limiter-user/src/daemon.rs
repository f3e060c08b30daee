//! `limiter run`: loads the programs, keeps the maps in step with the config and the clock, turns
//! kernel events into log lines and answers the CLI.
//!
//! All map access happens on the main loop; the control socket and the signal handlers only send it
//! messages.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use limiter_common::{
    DAY_SLOTS, DayCounters, EVENT_CONCURRENCY_BREACH, EVENT_QUOTA_EXHAUSTED, Event, UNMAPPED_ORG,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    clock::Clock,
    config::{ConcurrencyMode, Config, QuotaMode},
    control::{self, Pending, Request, Response},
    counters::{self, Applied, CountersError, Prepare},
    hooks,
    loader::Kernel,
    metrics::{self, Metrics},
    notify,
    orgs::{OrgIds, OrgLimitTable, UNMAPPED_NAME},
    pins, report,
    snapshot::{self, DaySnapshot},
    sync::{self, Platform},
};

/// Breach lines per org are at most one a minute (README, Logs).
const BREACH_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often unmapped traffic is summarised, when it changed.
const UNMAPPED_SUMMARY_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct BreachLog {
    pending: u64,
    last_logged: Option<Instant>,
}

pub struct Daemon {
    config_path: PathBuf,
    /// The config in force, without its org list (`orgs` is emptied once applied): what the
    /// daemon needs of the orgs is in `ids` and `limits`, and the addresses are in the kernel's
    /// maps. The org list was most of a million-org daemon's memory.
    cfg: Config,
    ids: OrgIds,
    limits: OrgLimitTable,
    clock: Clock,
    kernel: Kernel,
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
    breaches: HashMap<u32, BreachLog>,
    faults_seen: HashMap<&'static str, u64>,
    unmapped_seen: (u64, u64, u64),
    unmapped_logged: Instant,
    snapshot_taken: Instant,
    /// Remove the pins on exit (`limiter unload`).
    unload: bool,
    /// The other hosts' counts, from the last successful cluster sync.
    platform: Option<Platform>,
    /// Since when the cluster's Redis has been unreachable, and when that was last logged.
    cluster_down: Option<(Instant, Instant)>,
    metrics: Option<Metrics>,
}

/// Writes today's snapshot counts into fresh maps; returns how many orgs were restored.
/// Without a usable snapshot, a cluster host takes its own count of today back from Redis.
fn restore_snapshot(
    kernel: &mut Kernel,
    cfg: &Config,
    ids: &OrgIds,
    clock: &Clock,
    day: u64,
) -> anyhow::Result<usize> {
    let snap = match snapshot::read(&cfg.daemon.state_dir, &clock.date(day)) {
        Ok(Some(snap)) if snap.day == day => snap,
        Ok(_) => return restore_from_cluster(kernel, cfg, ids, clock, day),
        Err(e) => {
            // A damaged snapshot must not keep the limiter from starting: set it aside.
            let path = snapshot::path(&cfg.daemon.state_dir, &clock.date(day));
            let aside = path.with_extension("json.bad");
            let _ = std::fs::rename(&path, &aside);
            error!(event = "fault", error = %e, moved_to = %aside.display(), "today's snapshot is unreadable; starting from the kernel's counts");
            return restore_from_cluster(kernel, cfg, ids, clock, day);
        }
    };
    counters::write_day(
        kernel,
        UNMAPPED_ORG,
        DayCounters {
            day,
            ..snap.unmapped
        },
    )?;
    let mut n = 0;
    for (name, counts) in &snap.orgs {
        if let Some(id) = ids.id(name.as_ref()) {
            counters::write_day(kernel, id, DayCounters { day, ..*counts })?;
            n += 1;
        }
    }
    Ok(n)
}

/// This host's requests of today as it last shared them in Redis (`[cluster]` only): after a
/// reboot that lost the day's snapshot, the quota continues from there instead of from 0.
/// Redis being away is logged, not fatal: the start must not wait on it.
fn restore_from_cluster(
    kernel: &mut Kernel,
    cfg: &Config,
    ids: &OrgIds,
    clock: &Clock,
    day: u64,
) -> anyhow::Result<usize> {
    let Some(cluster) = &*cfg.cluster else {
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
            counters::write_day(kernel, id, d)?;
            n += 1;
        }
    }
    info!(event = "cluster", restored_orgs = n, host_id = %cluster.host_id, "no day snapshot: this host's requests of today restored from Redis");
    Ok(n)
}

impl Daemon {
    /// Loads and attaches the programs and fills the maps from `cfg`.
    pub fn start(config_path: &Path, mut cfg: Config, parse_ms: u64) -> anyhow::Result<Self> {
        // Test hook: start as if the daemon had been away this long.
        let away = hooks::value("LIMITER_TEST_CLOCK_SHIFT_SECS").unwrap_or(0);
        let clock = Clock::new(*cfg.limits.day_start_secs).ahead_secs(away);
        let started = Instant::now();
        let cap = pins::Capacity::for_config(&cfg);
        // While the kernel verifies the programs and creates the maps, a second thread builds
        // the tables of a first start (ids and map contents): with a million orgs each takes
        // about a second. A restart that finds its maps pinned redoes the ids from the kernel's.
        // The ids of a first start follow the config's order, so the id table and the map
        // contents are built at the same time too.
        let fresh_ids = || {
            let t = Instant::now();
            let names = cfg.orgs.iter().map(|o| o.name.as_str());
            OrgIds::assign(names, None, cap.orgs).map(|ids| (ids, t.elapsed()))
        };
        let fresh_desired = || {
            let t = Instant::now();
            Applied::desired_with(&cfg, &clock, |index, _| Some(index as u32 + 1))
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
        let mut kernel = kernel.context("loading the kernel programs")?;
        let load_ms = started.elapsed().as_millis() as u64;
        let (fresh_ids, ids_time) =
            ids.ok_or_else(|| anyhow::anyhow!("building the org id table panicked"))??;
        let (fresh_desired, desired_time) =
            desired.ok_or_else(|| anyhow::anyhow!("building the map contents panicked"))??;
        let tables_ms = ids_time.max(desired_time).as_millis() as u64;
        let day = clock.today();
        // A restarted daemon finds the kernel's ids, map contents and counts as they are.
        let (ids, old, desired) = if kernel.resumed {
            let names = cfg.orgs.iter().map(|o| o.name.as_str());
            let prev = counters::ids_from_kernel(&kernel)?;
            let ids = OrgIds::assign(names, Some(&prev), kernel.org_capacity())?;
            for (id, name) in ids.iter() {
                if prev.id(name) != Some(id) {
                    counters::clear_org(&mut kernel, id)?;
                }
            }
            let desired = if ids == fresh_ids {
                fresh_desired
            } else {
                Applied::desired(&cfg, &ids, &clock)?
            };
            (ids, counters::read_applied(&kernel)?, desired)
        } else {
            (fresh_ids, Applied::default(), fresh_desired)
        };
        // Fresh maps are all zero (tag 0), which the kernel takes over without clearing; only
        // reused slots of older days need preparing.
        // Tomorrow's slots are prepared in `run`, once the days missed while the daemon was away
        // are closed: tomorrow's slot is the one of the day before yesterday.
        if kernel.resumed {
            counters::prepare_day_all(&mut kernel, &ids, day, Prepare::Live, None)?;
        }
        // Fresh maps (first start, or after a reboot): today's counts come from the snapshot,
        // before the kernel starts counting (CONFIG is marked ready by the apply below).
        let restored = if kernel.resumed {
            0
        } else {
            restore_snapshot(&mut kernel, &cfg, &ids, &clock, day)?
        };
        let before_apply = Instant::now();
        let stats = counters::apply(&mut kernel, &old, &desired)?;
        drop((desired, old));
        // Only now, with the tables written and CONFIG ready, do sockets reach the programs.
        kernel
            .attach(
                &cfg.api.cgroup,
                &cfg.api.interfaces,
                cfg.api.netns.as_deref(),
            )
            .context("attaching the kernel programs")?;
        let limits = OrgLimitTable::new(&cfg, &ids);
        let org_count = cfg.orgs.len();
        let delay_without_gate = cfg.api.interfaces.is_empty()
            && (cfg.limits.concurrency_mode == ConcurrencyMode::Delay
                || cfg
                    .orgs
                    .iter()
                    .any(|o| o.concurrency_mode == Some(ConcurrencyMode::Delay)));
        cfg.orgs = Vec::new();
        release_freed_memory();
        let apply_ms = before_apply.elapsed().as_millis() as u64;
        let startup_ms = started.elapsed().as_millis() as u64;
        if delay_without_gate {
            warn!(
                event = "config",
                "concurrency_mode = \"delay\" needs api.interfaces (the XDP SYN gate); without it over-limit connections are only observed"
            );
        }
        info!(
            event = "startup",
            programs = "sock_ops,stream_verdict,sk_msg,xdp",
            interfaces = ?cfg.api.interfaces,
            cgroup = %cfg.api.cgroup.display(),
            ports = ?cfg.api.ports,
            orgs = org_count,
            cidrs = stats.cidrs_written,
            media_get_prefixes = ?cfg.api.media_get_prefixes,
            day = %clock.date(day),
            pins = %kernel.pin_dir.display(),
            resumed = kernel.resumed,
            restored_orgs = restored,
            parse_ms,
            load_ms,
            tables_ms,
            apply_ms,
            startup_ms,
            "limiter started"
        );
        Ok(Daemon {
            config_path: config_path.to_path_buf(),
            cfg,
            ids,
            limits,
            clock,
            kernel,
            day,
            closed: BTreeSet::new(),
            suspended: BTreeSet::new(),
            slot_days: {
                let mut held = [0; DAY_SLOTS as usize];
                held[slot_of(day.saturating_sub(1))] = day.saturating_sub(1);
                held[slot_of(day)] = day;
                held
            },
            breaches: HashMap::new(),
            faults_seen: HashMap::new(),
            unmapped_seen: (0, 0, 0),
            unmapped_logged: Instant::now(),
            snapshot_taken: Instant::now(),
            unload: false,
            platform: None,
            cluster_down: None,
            metrics: None,
        })
    }

    /// Whether the kernel still has counters of `day` (after a reboot, past days are only in
    /// snapshots).
    fn kernel_holds(&self, day: u64) -> bool {
        counters::holds_day(&self.kernel, self.ids.max_id(), day).unwrap_or(false)
    }

    /// After a restart: the days that ended while the daemon was away get their final
    /// snapshot and `day_end` lines now (the kernel kept counting them).
    fn close_missed_days(&mut self) {
        for day in self.day.saturating_sub(2)..self.day {
            if !self.kernel_holds(day) {
                continue;
            }
            let Some(snap) = self.snapshot(day) else {
                continue;
            };
            let stored = snapshot::read(&self.cfg.daemon.state_dir, &snap.date)
                .ok()
                .flatten();
            let same = stored.is_some_and(|s| {
                s.orgs == snap.orgs && s.idle == snap.idle && s.unmapped == snap.unmapped
            });
            if !same {
                self.close_day(day);
            }
        }
    }

    /// This host's counts of today, for the cluster sync.
    fn local_counts(&self) -> sync::Local {
        let day = self.clock.today().max(self.day);
        let mut orgs = Vec::new();
        let read = counters::each_usage(&self.kernel, self.ids.max_id(), day, |id, d, conns| {
            if id != UNMAPPED_ORG
                && let Some(name) = self.ids.name(id)
            {
                orgs.push((name.to_string(), d.requests, conns as u64));
            }
        });
        if let Err(e) = read {
            error!(event = "fault", error = %e, "reading the counters for the cluster sync failed");
            orgs.clear();
        }
        sync::Local {
            date: self.clock.date(day),
            orgs,
        }
    }

    /// Writes the other hosts' counts into the kernel, or logs that Redis is away (the kernel
    /// keeps enforcing on the last known totals plus its own counts meanwhile).
    fn cluster_answer(&mut self, answer: Result<Platform, String>) {
        match answer {
            Ok(p) => {
                if let Some((since, _)) = self.cluster_down.take() {
                    info!(
                        event = "cluster",
                        down_secs = since.elapsed().as_secs(),
                        "Redis reachable again; local counts re-sent"
                    );
                }
                let day = self.day.max(self.clock.today());
                if p.date != self.clock.date(day) {
                    return;
                }
                for (name, others) in &p.others {
                    if let Some(id) = self.ids.id(name)
                        && let Err(e) = counters::write_remote(&mut self.kernel, id, day, *others)
                    {
                        error!(event = "fault", org = name.as_str(), error = %e, "writing the cluster count failed");
                    }
                }
                self.platform = Some(p);
            }
            Err(e) => {
                let now = Instant::now();
                let due = match self.cluster_down {
                    None => true,
                    Some((_, logged)) => now.duration_since(logged) >= Duration::from_secs(30),
                };
                if due {
                    warn!(
                        event = "cluster",
                        error = %e,
                        "Redis unreachable: enforcing on the last known platform totals plus local counts; they are re-sent when it is back"
                    );
                }
                let since = self.cluster_down.map(|(s, _)| s).unwrap_or(now);
                self.cluster_down = Some((
                    since,
                    if due {
                        now
                    } else {
                        self.cluster_down.map(|(_, l)| l).unwrap_or(now)
                    },
                ));
            }
        }
    }

    /// Today's (or another kernel-held day's) counts of every org, by name.
    /// None when the counters could not be read (logged): a partial snapshot must not replace a
    /// whole one.
    fn snapshot(&self, day: u64) -> Option<DaySnapshot<'_>> {
        let mut snap = DaySnapshot {
            day,
            date: self.clock.date(day),
            taken_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..DaySnapshot::default()
        };
        snap.closed = self.closed.contains(&day);
        // Names are borrowed from the id table: a million idle orgs made a million strings.
        let ids = &self.ids;
        let read = self.each_known(day, |id, d, _| {
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

    fn write_snapshot(&mut self, day: u64) {
        self.snapshot_taken = Instant::now();
        if let Some(snap) = self.snapshot(day)
            && let Err(e) = snapshot::write(&self.cfg.daemon.state_dir, &snap)
        {
            error!(event = "fault", error = %e, "writing the day snapshot failed; counts stay in the kernel");
        }
        release_freed_memory();
    }

    /// Runs until SIGTERM or SIGINT.
    pub async fn run(mut self) -> anyhow::Result<()> {
        // Today may be a day a clock step brought back after it had ended.
        if snapshot::is_closed(&self.cfg.daemon.state_dir, &self.clock.date(self.day)) {
            self.closed.insert(self.day);
        }
        if self.kernel.resumed {
            self.close_missed_days();
            self.prepare_tomorrow();
            release_freed_memory();
        }
        // Snapshots hold every org's usage: the state directory is root's alone (0700), also
        // when an older version made it 0755.
        if let Err(e) = snapshot::prepare_dir(&self.cfg.daemon.state_dir) {
            error!(event = "fault", error = %e, "securing the state directory failed");
        }
        let listener = control::bind(&self.cfg.daemon.control_socket).with_context(|| {
            format!(
                "binding the control socket {}",
                self.cfg.daemon.control_socket.display()
            )
        })?;
        if let Some(addr) = *self.cfg.daemon.metrics {
            let listener = metrics::bind(addr)
                .await
                .with_context(|| format!("serving metrics on daemon.metrics = {addr}"))?;
            let m = Metrics::new();
            tokio::spawn(metrics::serve(listener, m.text()));
            info!(event = "startup", metrics = %addr, "serving Prometheus metrics at /metrics");
            self.metrics = Some(m);
        }
        let (tx, mut requests) = mpsc::channel::<Pending>(16);
        let server = tokio::spawn(control::serve(listener, tx));
        let ring = self
            .kernel
            .events
            .take()
            .context("the event ring buffer was already taken")?;
        // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd holds it.
        let mut events = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (batches, mut platform) = match Option::clone(&self.cfg.cluster) {
            Some(cluster) => {
                let (btx, brx) = mpsc::channel::<sync::Local>(1);
                let (ptx, prx) = mpsc::channel(4);
                info!(event = "cluster", redis = %sync::redact_url(&cluster.redis), host_id = %cluster.host_id, sync_interval_ms = cluster.sync_interval_ms, "sharing counts with the other hosts");
                tokio::spawn(sync::run(cluster, brx, ptx));
                (Some(btx), Some(prx))
            }
            None => (None, None),
        };
        let sync_every = Duration::from_millis(
            self.cfg
                .cluster
                .as_ref()
                .map(|c| c.sync_interval_ms)
                .unwrap_or(1000),
        );
        let mut sync_tick = tokio::time::interval(sync_every);
        // Everything is bound and attached: under systemd (Type=notify), units ordered after
        // limiter start now.
        if let Err(e) = notify::send("READY=1") {
            warn!(event = "fault", error = %e, "telling systemd the daemon is ready failed");
        }
        loop {
            tokio::select! {
                _ = sync_tick.tick(), if batches.is_some() => {
                    // A batch still in flight (Redis slow): skip this one without reading the
                    // counters at all; the next carries newer counts.
                    if let Some(permit) = batches.as_ref().and_then(|tx| tx.try_reserve().ok()) {
                        permit.send(self.local_counts());
                    }
                }
                Some(answer) = async { match platform.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                    self.cluster_answer(answer);
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    if let Err(e) = self.reload() {
                        error!(event = "reload_failed", error = %e, "config reload failed; the old config stays in force");
                    }
                }
                Some(p) = requests.recv() => {
                    let stop = matches!(p.request, Request::Shutdown { .. });
                    let resp = self.handle(p.request);
                    let _ = p.reply.send(resp);
                    release_freed_memory();
                    if stop {
                        break;
                    }
                }
                guard = events.readable_mut() => {
                    match guard {
                        Ok(mut guard) => {
                            self.drain_events(guard.get_inner_mut());
                            guard.clear_ready();
                        }
                        Err(e) => warn!(event = "fault", error = %e, "event ring buffer poll failed"),
                    }
                }
                _ = tick.tick() => self.tick(),
            }
        }
        let _ = notify::send("STOPPING=1");
        server.abort();
        let _ = std::fs::remove_file(&self.cfg.daemon.control_socket);
        self.write_snapshot(self.day);
        // Only the orgs with traffic: a million idle lines would hold up the stop for minutes.
        self.log_totals("shutdown", self.day, false);
        if self.unload {
            let removed = pins::unload(&self.cfg.daemon.pin_dir)?;
            info!(
                event = "shutdown",
                unpinned = removed.len(),
                "limiter stopped and unloaded: programs detach"
            );
        } else {
            info!(
                event = "shutdown",
                pins = %self.kernel.pin_dir.display(),
                "limiter stopped; the kernel programs keep counting and enforcing"
            );
        }
        Ok(())
    }

    fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let Some(ev) = item
                .get(..size_of::<Event>())
                .and_then(|b| bytemuck::try_pod_read_unaligned::<Event>(b).ok())
            else {
                continue;
            };
            match ev.kind {
                EVENT_CONCURRENCY_BREACH => self.breaches.entry(ev.org).or_default().pending += 1,
                EVENT_QUOTA_EXHAUSTED => self.quota_exhausted(&ev),
                _ => {}
            }
        }
        self.flush_breaches();
    }

    /// The kernel reports an org's first refusal of each day once.
    fn quota_exhausted(&self, ev: &Event) {
        let name = self.ids.name(ev.org).unwrap_or("?");
        match self.limits.get(ev.org).quota_mode {
            QuotaMode::Enforce => warn!(
                event = "quota_exhausted",
                org = name,
                daily_limit = ev.value,
                day = %self.clock.date(ev.day),
                resets_in_seconds = self.clock.resets_in_seconds(),
                "daily quota used up: further calls get 429 until the day resets"
            ),
            QuotaMode::DryRun => warn!(
                event = "quota_exhausted",
                org = name,
                daily_limit = ev.value,
                day = %self.clock.date(ev.day),
                mode = "dry-run",
                "daily quota used up: dry-run, calls still pass and are counted as rejected"
            ),
        }
    }

    fn flush_breaches(&mut self) {
        let now = Instant::now();
        for (&org, log) in &mut self.breaches {
            let due = log
                .last_logged
                .is_none_or(|t| now.duration_since(t) >= BREACH_LOG_EVERY);
            if log.pending == 0 || !due {
                continue;
            }
            let name = self.ids.name(org).unwrap_or("?");
            let limits = self.limits.get(org);
            let (limit, mode) = (limits.concurrent_connections, limits.concurrency_mode);
            let total = counters::usage(&self.kernel, org, self.day)
                .map(|(d, _)| d.concurrency_breaches)
                .unwrap_or(0);
            warn!(
                event = "concurrency_breach",
                org = name,
                breaches = log.pending,
                breaches_today = total,
                concurrency_limit = limit,
                mode = %mode,
                "connections over the concurrency limit"
            );
            log.pending = 0;
            log.last_logged = Some(now);
        }
    }

    fn tick(&mut self) {
        if self.clock.refresh_tai() {
            info!(
                event = "clock",
                "the kernel's TAI offset changed; quota days follow it"
            );
            let clock = self.clock;
            if let Err(e) = self.write_clock(&clock) {
                error!(event = "fault", error = %e, "rewriting the clock offset failed");
            }
        }
        self.follow_clock();
        self.flush_breaches();
        self.check_faults();
        if let Some(m) = &self.metrics {
            let day = self.day;
            let platform = self
                .platform
                .as_ref()
                .filter(|p| p.date == self.clock.date(day));
            if let Ok(r) = report::build(
                &self.kernel,
                &self.ids,
                &self.limits,
                &self.clock,
                day,
                None,
                platform,
            ) {
                m.update(&r, &counters::faults(&self.kernel));
            }
        }
        if self.snapshot_taken.elapsed()
            >= Duration::from_secs(*self.cfg.daemon.snapshot_interval_secs)
        {
            self.write_snapshot(self.day);
        }
        if self.unmapped_logged.elapsed() >= UNMAPPED_SUMMARY_EVERY {
            self.summarise_unmapped();
        }
    }

    /// Moves the daemon's day to the clock's: the rollover at the end of a day, or a clock step
    /// (NTP, `date -s`, the test hook) of any size in either direction.
    fn follow_clock(&mut self) {
        let today = self.clock.today();
        if today != self.day {
            self.move_to(today);
        }
    }

    /// Leaves the day in force for `to`. Forward, the days the clock moved past end (logged and
    /// snapshotted once); days it jumped over were never in force and get nothing, unless the
    /// kernel counted on them (a daemon that stalled) or a step back left them unfinished. Back,
    /// the day in force is not over: it is snapshotted and ends when the clock passes it again.
    /// Either way the new day's slots and tomorrow's are prepared from what their snapshots
    /// recorded, so a day the clock comes back to continues from its counts.
    fn move_to(&mut self, to: u64) {
        let from = self.day;
        if to > from {
            let mut ended: BTreeSet<u64> = self.suspended.range(from + 1..to).copied().collect();
            ended.insert(from);
            for day in to.saturating_sub(2).max(from + 1)..to {
                if counters::counted_on(&self.kernel, self.ids.max_id(), day).unwrap_or(false) {
                    ended.insert(day);
                }
            }
            for day in ended {
                self.close_day(day);
                self.suspended.remove(&day);
            }
        } else {
            self.write_snapshot(from);
            self.suspended.insert(from);
        }
        let stepped = to != from + 1;
        let mut restored = 0;
        if stepped {
            let known = self.known(to);
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
            match counters::prepare_day_all(&mut self.kernel, &self.ids, to, how, known.as_ref()) {
                Ok(n) => restored = n,
                Err(e) => {
                    error!(event = "fault", error = %e, "preparing the new day's counters failed; the kernel resets them lazily")
                }
            }
        } else if snapshot::is_closed(&self.cfg.daemon.state_dir, &self.clock.date(to)) {
            self.closed.insert(to);
        }
        self.day = to;
        self.slot_days[slot_of(to)] = to;
        self.prepare_tomorrow();
        if stepped {
            warn!(
                event = "clock_step",
                from = %self.clock.date(from),
                to = %self.clock.date(to),
                days = to as i64 - from as i64,
                restored_orgs = restored,
                resets_in_seconds = self.clock.resets_in_seconds(),
                "the clock was stepped: the quota day follows it"
            );
        } else {
            info!(
                event = "rollover",
                day = %self.clock.date(to),
                resets_in_seconds = self.clock.resets_in_seconds(),
                "new quota day"
            );
        }
        release_freed_memory();
    }

    /// Ends `day`: its `day_end` lines, once per day (a day a clock step brought back had ended
    /// before: only its snapshot follows the later counts), and its final snapshot.
    fn close_day(&mut self, day: u64) {
        let date = self.clock.date(day);
        if !self.closed.contains(&day) && !snapshot::is_closed(&self.cfg.daemon.state_dir, &date) {
            self.log_totals("day_end", day, true);
        }
        self.closed.insert(day);
        self.write_snapshot(day);
    }

    /// Prepares tomorrow's slots (those of the day before yesterday, which must be closed by
    /// now) from tomorrow's snapshot, if a clock step made one.
    fn prepare_tomorrow(&mut self) {
        let tomorrow = self.day + 1;
        let known = self.known(tomorrow);
        let prepared = counters::prepare_day_all(
            &mut self.kernel,
            &self.ids,
            tomorrow,
            Prepare::Ahead,
            known.as_ref(),
        );
        // Half prepared is not prepared: the slot is known to hold tomorrow only when all went.
        self.slot_days[slot_of(tomorrow)] = if prepared.is_ok() { tomorrow } else { 0 };
        if let Err(e) = prepared {
            error!(event = "fault", error = %e, "preparing tomorrow's counters failed; the kernel will reset them lazily");
        }
    }

    /// The snapshot of `day`, if one was written and reads.
    fn known(&self, day: u64) -> Option<DaySnapshot<'static>> {
        snapshot::read(&self.cfg.daemon.state_dir, &self.clock.date(day))
            .inspect_err(|e| error!(event = "fault", error = %e, "a day snapshot is unreadable; that day's counts start from the kernel's"))
            .ok()
            .flatten()
    }

    /// Calls `f(id, counts of day, open connections)` for every org id in order: the kernel's
    /// counts where its slot holds `day`, else the day's snapshot's (a slot the kernel reused
    /// for another day after a clock step must not read as zeros).
    fn each_known(
        &self,
        day: u64,
        mut f: impl FnMut(u32, DayCounters, i64),
    ) -> Result<(), CountersError> {
        let mut stored: Option<Option<DaySnapshot<'static>>> = None;
        counters::each_slot_usage(&self.kernel, self.ids.max_id(), day, |id, slot, conns| {
            // A never-used slot (tag 0) counted nothing.
            let d = if slot.day == day || slot.day == 0 {
                DayCounters { day, ..slot }
            } else {
                let snap = stored.get_or_insert_with(|| self.known(day));
                let recorded = snap.as_ref().and_then(|s| {
                    if id == UNMAPPED_ORG {
                        Some(s.unmapped)
                    } else {
                        s.orgs.get(self.ids.name(id)?).copied()
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

    /// One line per org (and unmapped) with its totals of `day`; with `idle` false, orgs without
    /// any traffic that day are left out and counted in one closing line.
    fn log_totals(&self, event: &str, day: u64, idle: bool) {
        let date = self.clock.date(day);
        let mut skipped = 0u64;
        let read = self.each_known(day, |id, d, conns| {
            let Some(name) = self.ids.name(id) else {
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

    fn summarise_unmapped(&mut self) {
        self.unmapped_logged = Instant::now();
        let Ok((d, conns)) = counters::usage(&self.kernel, UNMAPPED_ORG, self.day) else {
            return;
        };
        let now = (d.requests, d.unparsed, conns as u64);
        if now != self.unmapped_seen && (d.requests, d.unparsed) != (0, 0) {
            info!(
                event = "unmapped",
                requests = d.requests,
                unparsed = d.unparsed,
                connections = conns,
                "traffic from clients of no org today"
            );
        }
        self.unmapped_seen = now;
    }

    fn check_faults(&mut self) {
        for (name, total) in counters::faults(&self.kernel) {
            let seen = self.faults_seen.entry(name).or_insert(0);
            if total > *seen {
                warn!(
                    event = "fault",
                    fault = name,
                    new = total - *seen,
                    total,
                    "kernel-side fault (traffic passed uncounted or partly counted)"
                );
                *seen = total;
            }
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Report { org, day } => {
                // A step since the last tick: the report shows the clock's day.
                self.follow_clock();
                self.report(org.as_deref(), day.as_deref())
            }
            Request::Reset { org } => self.reset(org.as_deref()),
            Request::Reload => match self.reload() {
                Ok(summary) => Response::ok(summary),
                Err(e) => {
                    error!(event = "reload_failed", error = %e, "config reload failed; the old config stays in force");
                    Response::err(e.to_string())
                }
            },
            Request::Shutdown { unload } => {
                self.unload = unload;
                Response::ok(serde_json::json!({ "unload": unload }))
            }
            Request::AdvanceClock { .. } if !hooks::enabled() => Response::err(
                "advance-clock is a test hook: start the daemon with LIMITER_TEST_HOOKS=1",
            ),
            Request::AdvanceClock { secs, kernel_only } => {
                let stepped = self.clock.stepped_secs(secs);
                if let Err(e) = self.write_clock(&stepped) {
                    return Response::err(e.to_string());
                }
                if kernel_only {
                    return Response::ok(
                        serde_json::json!({ "kernel_day": stepped.date(stepped.today()) }),
                    );
                }
                self.clock = stepped;
                self.tick();
                Response::ok(serde_json::json!({ "day": self.clock.date(self.day) }))
            }
        }
    }

    /// Rewrites the clock fields of CONFIG from `clock` (the rest of it stays as applied).
    fn write_clock(&mut self, clock: &Clock) -> anyhow::Result<()> {
        let mut kc = self.kernel.config.get(&0, 0).context("reading CONFIG")?;
        kc.clock_offset_ns = clock.offset_ns();
        kc.day_len_ns = clock.day_len_ns;
        self.kernel.config.set(0, kc, 0).context("writing CONFIG")?;
        Ok(())
    }

    fn report(&self, org: Option<&str>, day: Option<&str>) -> Response {
        if let Some(o) = org
            && self.ids.id(o).is_none()
        {
            return Response::err(format!(
                "no org named {o:?} in {}",
                self.config_path.display()
            ));
        }
        let day = match day {
            None => self.day,
            Some(date) => match (self.day.saturating_sub(1)..=self.day)
                .find(|d| self.clock.date(*d) == date)
                .filter(|d| *d == self.day || self.kernel_holds(*d))
            {
                Some(d) => d,
                None => {
                    return match snapshot::read(&self.cfg.daemon.state_dir, date) {
                        Ok(Some(snap)) => {
                            Response::ok(report::from_snapshot(&self.ids, &self.limits, &snap, org))
                        }
                        Ok(None) => Response::err(format!("no counts kept for {date}")),
                        Err(e) => Response::err(e.to_string()),
                    };
                }
            },
        };
        let platform = self
            .platform
            .as_ref()
            .filter(|p| p.date == self.clock.date(day));
        match report::build(
            &self.kernel,
            &self.ids,
            &self.limits,
            &self.clock,
            day,
            org,
            platform,
        ) {
            Ok(r) => Response::ok(&r),
            Err(e) => Response::err(e.to_string()),
        }
    }

    fn reset(&mut self, org: Option<&str>) -> Response {
        let targets: Vec<(u32, String)> = match org {
            Some(name) => match self.ids.id(name) {
                Some(id) => vec![(id, name.to_string())],
                None => return Response::err(format!("no org named {name:?}")),
            },
            None => std::iter::once((UNMAPPED_ORG, UNMAPPED_NAME.to_string()))
                .chain(self.ids.iter().map(|(id, n)| (id, n.to_string())))
                .collect(),
        };
        let day = self.clock.today();
        let mut done = Vec::new();
        for (id, name) in targets {
            match counters::reset_day(&mut self.kernel, id, day) {
                Ok(before) => {
                    info!(event = "reset", org = %name, requests_before = before.requests, rejected_before = before.rejected, "today's counters cleared");
                    done.push(name);
                }
                Err(e) => return Response::err(e.to_string()),
            }
        }
        Response::ok(serde_json::json!({ "reset": done }))
    }

    /// Re-reads the config and applies only the differences. On any error nothing changes.
    fn reload(&mut self) -> anyhow::Result<serde_json::Value> {
        let new_cfg = Config::load(&self.config_path)?;
        // What is attached, opened or scheduled at startup cannot change under a running
        // daemon (see README, Reloads): the config's types say which settings those are.
        self.cfg.check_reload(&new_cfg, &self.config_path)?;
        if new_cfg.cidr_count() > self.kernel.capacity.cidrs as usize {
            anyhow::bail!(
                "{}: {} CIDRs do not fit the kernel's address table ({}): restart the daemon to resize it",
                self.config_path.display(),
                new_cfg.cidr_count(),
                self.kernel.capacity.cidrs
            );
        }
        let ids = OrgIds::assign(
            new_cfg.orgs.iter().map(|o| o.name.as_str()),
            Some(&self.ids),
            self.kernel.org_capacity(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}: restart the daemon to resize the maps",
                self.config_path.display()
            )
        })?;
        let clock = self.clock.with_day_start(*new_cfg.limits.day_start_secs);
        // The old side is what the maps hold: the daemon keeps no copy of it.
        let old = counters::read_applied(&self.kernel)?;
        let new = Applied::desired(&new_cfg, &ids, &clock)?;
        let added: Vec<String> = ids
            .iter()
            .filter(|(_, name)| self.ids.id(name).is_none())
            .map(|(_, name)| name.to_string())
            .collect();
        let removed: Vec<String> = self
            .ids
            .iter()
            .filter(|(_, name)| ids.id(name).is_none())
            .map(|(_, name)| name.to_string())
            .collect();
        for name in &added {
            if let Some(id) = ids.id(name) {
                counters::clear_org(&mut self.kernel, id)?;
                let day = clock.today();
                counters::prepare_day(&mut self.kernel, id, day)?;
                counters::prepare_day(&mut self.kernel, id, day + 1)?;
            }
        }
        let stats = match counters::apply(&mut self.kernel, &old, &new) {
            Ok(stats) => stats,
            Err(e) => {
                // A map write failed midway: put back what was in force, so the kernel and the
                // daemon agree again, and report the failure.
                let rolled_back = counters::read_applied(&self.kernel)
                    .and_then(|actual| counters::apply(&mut self.kernel, &actual, &old));
                if let Err(r) = rolled_back {
                    error!(event = "fault", error = %r, "rolling back a failed reload failed");
                }
                return Err(anyhow::anyhow!(
                    "{}: applying the new config failed: {e}",
                    self.config_path.display()
                ));
            }
        };
        // Orgs that stay keep their ids; those whose addresses or limits differ changed.
        let changed: Vec<String> = stats
            .orgs_changed
            .iter()
            .filter_map(|&id| {
                let name = ids.name(id)?;
                (self.ids.id(name) == Some(id)).then(|| name.to_string())
            })
            .collect();
        // After the apply: nothing new is attributed to a removed org from here on.
        for name in &removed {
            if let Some(id) = self.ids.id(name)
                && let Ok((d, _)) = counters::usage(&self.kernel, id, self.day)
            {
                info!(
                    event = "org_removed",
                    org = name.as_str(),
                    requests = d.requests,
                    rejected = d.rejected,
                    exempt_media_gets = d.exempt_media_gets,
                    exempt_pushes = d.exempt_pushes,
                    "org removed; its counts of today end here"
                );
            }
        }
        info!(
            event = "reload",
            added = ?added,
            removed = ?removed,
            changed = ?changed,
            ports = ?new_cfg.api.ports,
            cidrs_written = stats.cidrs_written,
            cidrs_removed = stats.cidrs_removed,
            limits_written = stats.limits_written,
            "config reloaded"
        );
        self.limits = OrgLimitTable::new(&new_cfg, &ids);
        self.cfg = Config {
            orgs: Vec::new(),
            ..new_cfg
        };
        self.ids = ids;
        self.clock = clock;
        drop((old, new));
        release_freed_memory();
        Ok(serde_json::json!({ "added": added, "removed": removed, "changed": changed }))
    }
}

/// Which of an org's three day slots `day` uses (as `limiter_common::day_index` picks it).
fn slot_of(day: u64) -> usize {
    (day % DAY_SLOTS as u64) as usize
}

/// One malloc arena for all threads: the startup helpers' arenas kept about 10 % of a
/// million-org daemon's heap resident. Call before any thread starts.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes glibc's allocator settings; no thread allocates yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands freed heap back to the kernel: building a million orgs' tables leaves hundreds of MB
/// free but resident otherwise.
fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `limiter run`.
/// `parse_ms`: how long reading the config took, for the startup line.
pub async fn run(config_path: &Path, cfg: Config, parse_ms: u64) -> anyhow::Result<()> {
    Daemon::start(config_path, cfg, parse_ms)?.run().await
}
