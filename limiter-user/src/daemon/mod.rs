//! `limiter run`: loads the programs, keeps the maps in step with the config and the clock, turns
//! kernel events into log lines and answers the CLI.
//!
//! A thin loop (`serve`) ties the components together: `start` applies the config's [`Plan`] to
//! the kernel, [`Days`] keeps the quota day, [`EventLog`] writes the event lines, [`ClusterLink`]
//! shares counts with the other hosts, `handlers` answer the control socket and `reload` applies
//! a changed config. They reach the kernel only through [`KernelMaps`], so each is tested without
//! root against an in-memory fake.
//!
//! All map access happens on the main loop; the control socket and the signal handlers only send
//! it messages.

mod cluster;
mod days;
mod events;
#[cfg(test)]
mod fake;
mod handlers;
pub mod maps;
mod plan;
mod reload;
mod serve;
mod start;
#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{error, info};

use self::{cluster::ClusterLink, days::Days, events::EventLog};
pub use self::{
    maps::KernelMaps,
    plan::{Orgs, Plan, Settings},
    serve::run,
};
use crate::{clock::Clock, metrics::Metrics, report, trace};

/// The daemon's state: the kernel's maps, the config in force and the components.
pub struct Daemon<M> {
    config_path: PathBuf,
    settings: Settings,
    orgs: Orgs,
    clock: Clock,
    maps: M,
    days: Days,
    events: EventLog,
    cluster: ClusterLink,
    metrics: Option<Metrics>,
    /// Remove the pins on exit (`limiter unload`).
    unload: bool,
}

impl<M: KernelMaps> Daemon<M> {
    /// A daemon whose maps hold `orgs` and `settings` (applied), with `day` in force.
    pub fn new(
        config_path: &Path,
        settings: Settings,
        orgs: Orgs,
        clock: Clock,
        maps: M,
        day: u64,
    ) -> Self {
        Daemon {
            config_path: config_path.to_path_buf(),
            days: Days::new(&settings.daemon.state_dir, day),
            settings,
            orgs,
            clock,
            maps,
            events: EventLog::new(Instant::now()),
            cluster: ClusterLink::default(),
            metrics: None,
            unload: false,
        }
    }

    /// Moves the day in force to the clock's.
    fn follow_clock(&mut self) {
        let today = self.clock.today();
        self.days
            .follow(&mut self.maps, &self.orgs.ids, &self.clock, today);
    }

    /// The inputs of a report of `day` (of one org, or all).
    fn report_inputs<'a>(&'a self, day: u64, only: Option<&'a str>) -> report::Inputs<'a, M> {
        report::Inputs {
            maps: &self.maps,
            ids: &self.orgs.ids,
            limits: &self.orgs.limits,
            clock: &self.clock,
            day,
            only,
            platform: self.cluster.platform(&self.clock.date(day)),
        }
    }

    /// The once-a-second work: the clock, the day, the event lines, the metrics and the
    /// periodic snapshot.
    fn tick(&mut self) {
        if self.clock.refresh_tai() {
            info!(
                event = "clock",
                "the kernel's TAI offset changed; quota days follow it"
            );
            if let Err(e) = self.maps.write_clock(&self.clock) {
                error!(event = "fault", error = %e, "rewriting the clock offset failed");
            }
        }
        self.follow_clock();
        let day = self.days.day();
        self.events
            .flush_breaches(&self.maps, &self.orgs, day, Instant::now());
        self.events.check_faults(&self.maps);
        self.refresh_metrics(day);
        let every = Duration::from_secs(*self.settings.daemon.snapshot_interval_secs);
        if self.days.snapshot_due(every, Instant::now()) {
            self.days
                .write_snapshot(&self.maps, &self.orgs.ids, &self.clock, day);
        }
        let now = Instant::now();
        if self.events.unmapped_due(now) {
            self.events.summarise_unmapped(&self.maps, day, now);
        }
        self.clear_dead_tracer(trace::pid_alive);
    }

    /// Renders the metrics page from the kernel's counts of `day` (a scrape reads the last
    /// page rendered).
    fn refresh_metrics(&self, day: u64) {
        if let Some(m) = &self.metrics
            && let Ok(r) = report::build(&self.report_inputs(day, None))
        {
            let mut faults = self.maps.faults();
            faults.push(("snapshot_write", self.days.snapshot_failures()));
            m.update(&r, &faults);
        }
    }

    /// Turns tracing off when the `limiter trace` that turned it on died without doing so.
    fn clear_dead_tracer(&mut self, alive: impl Fn(u64) -> bool) {
        let Ok(pid) = self.maps.tracer() else { return };
        if !trace::stale_tracer(pid, alive) {
            return;
        }
        match self.maps.clear_tracer() {
            Ok(()) => info!(
                event = "trace",
                pid, "the tracer is gone: tracing turned off"
            ),
            Err(e) => error!(event = "fault", error = %e, "turning tracing off failed"),
        }
    }
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
