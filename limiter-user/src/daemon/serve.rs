//! The main loop: waits on the clock, the kernel's events, the control socket, the signals and
//! the cluster sync, and hands each to its component.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use super::{Daemon, cluster, events::parse_event, maps::KernelMaps, release_freed_memory};
use crate::{
    config::Config,
    control::{self, Pending, Request},
    loader::Kernel,
    metrics::{self, Metrics},
    notify, pins, snapshot,
    sync::{self, Platform},
};

/// `limiter run`.
/// `parse_ms`: how long reading the config took, for the startup line.
pub async fn run(config_path: &Path, cfg: Config, parse_ms: u64) -> anyhow::Result<()> {
    Daemon::start(config_path, cfg, parse_ms)?.run().await
}

/// What the loop waits on besides the clock.
struct Sources {
    requests: mpsc::Receiver<Pending>,
    events: AsyncFd<RingBuf<MapData>>,
    term: Signal,
    int: Signal,
    hup: Signal,
    /// The cluster sync task (`[cluster]` only).
    sync: Option<SyncTask>,
}

/// The channels to and from the cluster sync task.
struct SyncTask {
    batches: mpsc::Sender<sync::Local>,
    answers: mpsc::Receiver<Result<Platform, String>>,
    every: Duration,
}

impl<M: KernelMaps> Daemon<M> {
    /// Hands the kernel's events to the event log.
    fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            if let Some(ev) = parse_event(&item) {
                self.events.record(&ev, &self.orgs, &self.clock);
            }
        }
        let day = self.days.day();
        self.events
            .flush_breaches(&self.maps, &self.orgs, day, Instant::now());
    }

    /// The day the cluster shares counts of.
    fn sync_day(&self) -> u64 {
        self.clock.today().max(self.days.day())
    }

    /// Sends this host's counts to the sync task, unless a batch is still in flight (Redis
    /// slow): then the counters are not read at all, and the next batch carries newer counts.
    fn send_counts(&self, batches: &mpsc::Sender<sync::Local>) {
        if let Ok(permit) = batches.try_reserve() {
            let day = self.sync_day();
            permit.send(cluster::local_counts(
                &self.maps,
                &self.orgs.ids,
                &self.clock,
                day,
            ));
        }
    }

    fn cluster_answer(&mut self, answer: Result<Platform, String>) {
        let day = self.sync_day();
        let date = self.clock.date(day);
        self.cluster.answer(
            &mut self.maps,
            &self.orgs.ids,
            &date,
            day,
            answer,
            Instant::now(),
        );
    }
}

impl Daemon<Kernel> {
    /// Runs until SIGTERM, SIGINT or a shutdown request.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let resumed = self.maps.resumed;
        self.days
            .begin(&mut self.maps, &self.orgs.ids, &self.clock, resumed);
        // Snapshots hold every org's usage: the state directory is root's alone (0700), also
        // when an older version made it 0755.
        if let Err(e) = snapshot::prepare_dir(&self.settings.daemon.state_dir) {
            error!(event = "fault", error = %e, "securing the state directory failed");
        }
        let socket = &self.settings.daemon.control_socket;
        let listener = control::bind(socket)
            .with_context(|| format!("binding the control socket {}", socket.display()))?;
        self.serve_metrics().await?;
        let (tx, requests) = mpsc::channel::<Pending>(16);
        let server = tokio::spawn(control::serve(listener, tx));
        let ring = self
            .maps
            .events
            .take()
            .context("the event ring buffer was already taken")?;
        // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd holds it.
        let events = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        let sources = Sources {
            requests,
            events,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            sync: self.spawn_sync(),
        };
        // Everything is bound and attached: under systemd (Type=notify), units ordered after
        // limiter start now.
        if let Err(e) = notify::send("READY=1") {
            warn!(event = "fault", error = %e, "telling systemd the daemon is ready failed");
        }
        self.serve(sources).await;
        let _ = notify::send("STOPPING=1");
        server.abort();
        self.stop()
    }

    /// Serves Prometheus metrics (`daemon.metrics`), when asked to.
    async fn serve_metrics(&mut self) -> anyhow::Result<()> {
        let Some(addr) = *self.settings.daemon.metrics else {
            return Ok(());
        };
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("serving metrics on daemon.metrics = {addr}"))?;
        let m = Metrics::new();
        let text = m.text();
        self.metrics = Some(m);
        // The first page before the first scrape: one before the first tick gets the counts,
        // not an empty page.
        self.refresh_metrics(self.days.day());
        tokio::spawn(metrics::serve(listener, text));
        info!(event = "startup", metrics = %addr, "serving Prometheus metrics at /metrics");
        Ok(())
    }

    /// Starts the cluster sync task (`[cluster]` only).
    fn spawn_sync(&self) -> Option<SyncTask> {
        let cluster = Option::clone(&self.settings.cluster)?;
        let (btx, brx) = mpsc::channel::<sync::Local>(1);
        let (ptx, prx) = mpsc::channel(4);
        info!(event = "cluster", redis = %sync::redact_url(&cluster.redis), host_id = %cluster.host_id, sync_interval_ms = cluster.sync_interval_ms, "sharing counts with the other hosts");
        let every = Duration::from_millis(cluster.sync_interval_ms);
        tokio::spawn(sync::run(cluster, brx, ptx));
        Some(SyncTask {
            batches: btx,
            answers: prx,
            every,
        })
    }

    /// The loop, until a signal or a shutdown request ends it.
    async fn serve(&mut self, mut sources: Sources) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (batches, mut answers, sync_every) = match sources.sync.take() {
            Some(s) => (Some(s.batches), Some(s.answers), s.every),
            None => (None, None, Duration::from_secs(1)),
        };
        let mut sync_tick = tokio::time::interval(sync_every);
        loop {
            tokio::select! {
                _ = sync_tick.tick(), if batches.is_some() => {
                    if let Some(batches) = &batches {
                        self.send_counts(batches);
                    }
                }
                Some(answer) = async { match answers.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                    self.cluster_answer(answer);
                }
                _ = sources.term.recv() => break,
                _ = sources.int.recv() => break,
                _ = sources.hup.recv() => {
                    if let Err(e) = self.reload() {
                        error!(event = "reload_failed", error = %e, "config reload failed; the old config stays in force");
                    }
                }
                Some(p) = sources.requests.recv() => {
                    let stop = matches!(p.request, Request::Shutdown { .. });
                    let resp = self.handle(p.request);
                    let _ = p.reply.send(resp);
                    release_freed_memory();
                    if stop {
                        break;
                    }
                }
                guard = sources.events.readable_mut() => {
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
    }

    /// After the loop: the last snapshot and totals, and the pins removed if asked to.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.settings.daemon.control_socket);
        let day = self.days.day();
        self.days
            .write_snapshot(&self.maps, &self.orgs.ids, &self.clock, day);
        // Only the orgs with traffic: a million idle lines would hold up the stop for minutes.
        self.days.log_totals(
            &self.maps,
            &self.orgs.ids,
            &self.clock,
            "shutdown",
            day,
            false,
        );
        if self.unload {
            let removed = pins::unload(&self.settings.daemon.pin_dir)?;
            info!(
                event = "shutdown",
                unpinned = removed.len(),
                "limiter stopped and unloaded: programs detach"
            );
        } else {
            info!(
                event = "shutdown",
                pins = %self.maps.pin_dir.display(),
                "limiter stopped; the kernel programs keep counting and enforcing"
            );
        }
        Ok(())
    }
}
