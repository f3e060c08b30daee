//! Faults injected under traffic: Redis killed or frozen, a full state directory, the daemon
//! killed in the middle of a reload or of a snapshot write, a flooded control socket and a
//! metrics endpoint held by slow readers. Each test checks that no count is lost (the report,
//! the snapshot and Redis agree with what the API server served and the clients got) and that
//! requests keep being answered while the fault lasts.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{
    Redis, Tmpfs, World, cidr, gets, n, open_fds, org_toml, raise_nofile, rss_kib, under_traffic,
    wait_for,
};
use limiter_lab::testbed::http_requests;

/// A daily limit the tests' traffic never reaches.
const UNLIMITED: &str = "daily_requests = 1000000";

/// How long a flood client may wait to be cut off, and a fault to show, before the test fails.
const FAULT_DEADLINE: Duration = Duration::from_secs(60);

/// Statuses of `count` GETs from `src`, one connection each.
fn statuses(w: &World, src: IpAddr, count: usize) -> Result<Vec<u16>> {
    let api = w.api4();
    let r =
        w.client(|| async move { http_requests(src, api, &gets("/api/", count), false).await })?;
    Ok(r.iter().map(|r| r.status).collect())
}

/// Sends `count` GETs from `src` and checks that every one passed.
fn all_pass(w: &World, src: IpAddr, count: usize) -> Result<()> {
    let st = statuses(w, src, count)?;
    ensure!(st.iter().all(|s| *s == 200), "not all passed: {st:?}");
    Ok(())
}

/// `(requests, rejected)` of `org` in the report.
fn counts(w: &World, org: &str) -> Result<(u64, u64)> {
    let o = w.org(org)?;
    Ok((n(&o, "requests"), n(&o, "rejected")))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---- Redis ----

/// A cluster host of one org (`acme`, one client address, a limit far above the traffic)
/// syncing every 100 ms with `redis`.
fn cluster_host(name: &str, redis: &Redis) -> Result<(World, IpAddr)> {
    let mut w = World::new(name, 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let orgs = format!(
        "{}[cluster]\nredis = {:?}\nhost_id = {name:?}\nsync_interval_ms = 100\n",
        org_toml("acme", &[cidr(ip)], UNLIMITED),
        redis.url(),
    );
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    Ok((w, ip))
}

/// A field of acme's count hash of `day`, when Redis answers.
fn shared_count(redis: &Redis, day: &str, field: &str) -> Result<Option<u64>, String> {
    let mut con = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    redis::cmd("HGET")
        .arg(format!("limiter:count:{day}:acme"))
        .arg(field)
        .query(&mut con)
        .map_err(|e| e.to_string())
}

/// Waits until Redis holds `want` as `host`'s count of acme.
fn wait_shared(redis: &Redis, day: &str, host: &str, want: u64) -> Result<()> {
    wait_for(
        &format!("{host}'s count {want} in Redis"),
        FAULT_DEADLINE,
        || {
            Ok(match shared_count(redis, day, host) {
                Ok(Some(v)) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
}

/// What the hosts' fault tests check at the end: every request passed, and the server, the
/// report and Redis all have the same count.
fn check_cluster_counts(
    w: &World,
    ip: IpAddr,
    redis: &Redis,
    host: &str,
    day: &str,
    before: u64,
    tally: &integration_tests::Tally,
) -> Result<u64> {
    ensure!(
        tally.count(200) == tally.statuses.len(),
        "every request passed: {:?}",
        tally.statuses
    );
    let total = before + tally.statuses.len() as u64;
    assert_eq!(w.served_from(ip)?.len() as u64, total, "served");
    assert_eq!(counts(w, "acme")?, (total, 0), "counted");
    wait_shared(redis, day, host, total)?;
    Ok(total)
}

/// Redis killed under traffic, then started again empty: the host keeps counting and answering,
/// logs the outage, and once Redis is back writes its whole count of the day again.
#[test]
fn redis_killed_under_traffic_loses_no_count() -> Result<()> {
    let mut redis = Redis::start(None)?;
    let (w, ip) = cluster_host("fltrkill", &redis)?;
    let day = w.today()?;
    all_pass(&w, ip, 10)?;
    wait_shared(&redis, &day, "fltrkill", 10)?;
    let port = redis.port;
    let ((), tally) = under_traffic(&w, ip, 50_000, |load| {
        load.wait_more(10)?;
        redis.kill();
        w.wait_log("Redis unreachable")?;
        // Requests are answered and counted locally while Redis is away.
        load.wait_more(50)?;
        let answered = load.answered();
        let (requests, _) = counts(&w, "acme")?;
        ensure!(
            requests >= 10 + answered,
            "the kernel counted {requests}, but {answered} + 10 were answered"
        );
        redis = Redis::start(Some(port))?;
        w.wait_log("Redis reachable again")?;
        load.wait_more(20)
    })?;
    check_cluster_counts(&w, ip, &redis, "fltrkill", &day, 10, &tally)?;
    Ok(())
}

/// Redis frozen (SIGSTOP) for longer than the sync interval, under traffic: the syncs time out
/// and are logged, requests keep passing, and once Redis runs again the host's count and the
/// platform total (another host's count included) are right.
#[test]
fn redis_paused_longer_than_the_sync_interval_loses_no_count() -> Result<()> {
    let redis = Redis::start(None)?;
    let (w, ip) = cluster_host("fltrstop", &redis)?;
    let day = w.today()?;
    let mut con = redis::Client::open(redis.url())?.get_connection()?;
    redis::cmd("HSET")
        .arg(format!("limiter:count:{day}:acme"))
        .arg("peer")
        .arg(5)
        .query::<()>(&mut con)?;
    all_pass(&w, ip, 10)?;
    wait_shared(&redis, &day, "fltrstop", 10)?;
    w.wait_org("acme", |o| o["platform_requests"].as_u64() == Some(15))?;
    let ((), tally) = under_traffic(&w, ip, 50_000, |load| {
        load.wait_more(10)?;
        redis.pause()?;
        // A sync stuck on a frozen Redis times out, and it is said.
        w.wait_log("Redis unreachable")?;
        load.wait_more(50)?;
        // The daemon answers the CLI meanwhile, with the count going on locally.
        let answered = load.answered();
        let (requests, _) = counts(&w, "acme")?;
        ensure!(requests >= 10 + answered, "{requests} < 10 + {answered}");
        redis.resume()?;
        w.wait_log("Redis reachable again")?;
        load.wait_more(20)
    })?;
    let total = check_cluster_counts(&w, ip, &redis, "fltrstop", &day, 10, &tally)?;
    w.wait_org("acme", |o| {
        o["platform_requests"].as_u64() == Some(total + 5)
    })?;
    Ok(())
}

// ---- A full state directory ----

/// `state_dir` on a small tmpfs that fills up: snapshot writes fail and are logged and counted,
/// the last good snapshot stays whole, the kernel's counts and the request path are untouched,
/// and once there is room again the next snapshot has every count.
#[test]
fn a_full_state_dir_fails_snapshots_but_loses_no_count() -> Result<()> {
    let mut w = World::new("fltdisk", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let port = free_port()?;
    w.daemon_extra = format!("snapshot_interval_secs = 1\nmetrics = \"127.0.0.1:{port}\"");
    w.write_config("", &org_toml("acme", &[cidr(ip)], UNLIMITED))?;
    let disk = Tmpfs::mount(&w.dir().join("state"), 256)?;
    w.start_daemon()?;
    let day = w.today()?;
    all_pass(&w, ip, 10)?;
    w.wait_snapshot(&day, "acme", 10)?;
    let failed = "writing the day snapshot failed";
    let ((), tally) = under_traffic(&w, ip, 50_000, |load| {
        load.wait_more(10)?;
        let filler = disk.fill("filler")?;
        let log = w.wait_log(failed)?;
        ensure!(
            log.lines()
                .any(|l| l.contains(failed) && l.contains("No space left on device")),
            "{log}"
        );
        load.wait_more(50)?;
        // Two failures at least, counted in the metrics.
        w.wait_log_count(failed, 2)?;
        wait_for(
            "2 failed snapshot writes in the metrics",
            FAULT_DEADLINE,
            || {
                let page = scrape(port)?;
                Ok(
                    match metric(&page, "limiter_faults{fault=\"snapshot_write\"}") {
                        Some(k) if k >= 2 => Ok(()),
                        _ => Err(page),
                    },
                )
            },
        )?;
        // The snapshot on disk is the last whole one.
        let snap = w.snapshot(&day)?.context("the last snapshot is gone")?;
        let kept = snap["orgs"]["acme"]["requests"].as_u64().unwrap_or(0);
        ensure!(kept >= 10, "{snap}");
        ensure!(
            kept < counts(&w, "acme")?.0,
            "the failed writes replaced it: {snap}"
        );
        std::fs::remove_file(filler)?;
        w.wait_log("day snapshot written again")?;
        load.wait_more(20)
    })?;
    assert_eq!(
        tally.count(200),
        tally.statuses.len(),
        "{:?}",
        tally.statuses
    );
    let total = 10 + tally.statuses.len() as u64;
    assert_eq!(w.served_from(ip)?.len() as u64, total);
    assert_eq!(counts(&w, "acme")?, (total, 0));
    w.wait_snapshot(&day, "acme", total)?;
    let leftovers: Vec<_> = std::fs::read_dir(w.dir().join("state/days"))?
        .flatten()
        .map(|e| e.file_name())
        .filter(|f| f.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    w.stop_daemon()?;
    drop(disk);
    Ok(())
}

/// One GET of `/metrics` on a fresh connection; the whole answer.
fn scrape(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of the series `name` (with its labels) in a metrics page.
fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

// ---- The daemon killed mid-work ----

/// A test hook armed by creating its directory: `LIMITER_TEST_PAUSE_*` points at `<dir>/file`.
struct Hook {
    dir: PathBuf,
    file: PathBuf,
}

impl Hook {
    fn new(w: &mut World, var: &str, name: &str) -> Hook {
        let dir = w.dir().join(format!("hook-{name}"));
        let file = dir.join("paused");
        w.daemon_env
            .push((var.to_string(), file.display().to_string()));
        Hook { dir, file }
    }

    fn arm(&self) -> Result<()> {
        Ok(std::fs::create_dir_all(&self.dir)?)
    }

    fn disarm(&self) -> Result<()> {
        Ok(std::fs::remove_dir_all(&self.dir)?)
    }

    /// Waits until the daemon is held at the hook.
    fn wait_held(&self) -> Result<()> {
        wait_for("the daemon held at its test hook", FAULT_DEADLINE, || {
            Ok(if self.file.exists() {
                Ok(())
            } else {
                Err("not yet".into())
            })
        })
    }
}

/// Kills the daemon while a reload it was asked for is held between writing the new limits and
/// addresses and removing the old ones; the reload's caller gets no answer.
fn kill_mid_reload(
    w: &mut World,
    hook: &Hook,
    during: impl FnOnce(&World) -> Result<()>,
) -> Result<()> {
    hook.arm()?;
    let reload = std::thread::scope(|s| -> Result<std::process::Output> {
        let wr = &*w;
        let cli = s.spawn(move || wr.cli(&["reload"]));
        hook.wait_held()?;
        // The daemon is stopped mid-apply; the kernel keeps answering and counting.
        during(wr)?;
        let pid = wr.daemon_pid().context("no daemon")?;
        // SAFETY: SIGKILL to our own child daemon, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        cli.join()
            .map_err(|_| anyhow::anyhow!("the reload thread panicked"))?
    })?;
    ensure!(
        !reload.status.success(),
        "a reload whose daemon died cannot have succeeded: {}",
        String::from_utf8_lossy(&reload.stdout)
    );
    w.kill_daemon()?;
    hook.disarm()
}

/// The orgs of the report, with `(requests, daily_limit)` each.
fn in_force(w: &World) -> Result<Vec<(String, u64, u64)>> {
    let r = w.report()?;
    Ok(r["orgs"]
        .as_array()
        .context("no orgs")?
        .iter()
        .map(|o| {
            (
                o["org"].as_str().unwrap_or_default().to_string(),
                n(o, "requests"),
                n(o, "daily_limit"),
            )
        })
        .collect())
}

/// The `requests=` of the `org_removed` lines for `org`, summed.
fn removed_requests(log: &str, org: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("org_removed") && l.contains(&format!("org=\"{org}\"")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("requests="))?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The daemon killed in the middle of a reload, twice: restarted on the file of the reload, the
/// new config is in force; restarted on the file from before the reload, the old one is. Either
/// way no count of today is lost (an org the restart drops has its counts logged), and requests
/// pass while the daemon is held mid-reload and while it is dead.
#[test]
fn the_daemon_killed_mid_reload_restarts_on_one_whole_config() -> Result<()> {
    let mut w = World::new("fltreload", 3, 0)?;
    let [a, b, c] = [0, 1, 2].map(|i| IpAddr::V4(w.tb.clients_v4()[i]));
    let hook = Hook::new(&mut w, "LIMITER_TEST_PAUSE_MID_APPLY", "apply");
    let old = [
        org_toml("a", &[cidr(a)], "daily_requests = 50"),
        org_toml("b", &[cidr(b)], "daily_requests = 50"),
    ]
    .concat();
    let new = [
        org_toml("a", &[cidr(a)], "daily_requests = 80"),
        org_toml("c", &[cidr(c)], "daily_requests = 60"),
    ]
    .concat();
    w.write_config("", &old)?;
    w.start_daemon()?;
    all_pass(&w, a, 3)?;
    all_pass(&w, b, 4)?;

    // First: the reload to `new` dies half done; the restart reads `new`.
    w.write_config("", &new)?;
    kill_mid_reload(&mut w, &hook, |w| {
        all_pass(w, a, 2)?;
        all_pass(w, b, 1)?;
        all_pass(w, c, 2)
    })?;
    // Dead daemon: the kernel still counts.
    all_pass(&w, a, 1)?;
    w.start_daemon()?;
    assert_eq!(
        in_force(&w)?,
        [("a".into(), 6, 80), ("c".into(), 2, 60)],
        "the new config, with today's counts"
    );
    assert_eq!(w.served_from(a)?.len(), 6);
    // b is gone: its counts of today were logged, and its address is nobody's now.
    let log = w.daemon_log();
    assert_eq!(removed_requests(&log, "b"), 5, "{log}");
    assert_eq!(w.served_from(b)?.len(), 5);
    all_pass(&w, b, 1)?;
    assert_eq!(n(&w.org("unmapped")?, "requests"), 1);
    all_pass(&w, c, 1)?;

    // Then: the reload back to `old` dies half done, and the file is put back as it was
    // before that reload; the restart keeps `new`.
    w.write_config("", &old)?;
    kill_mid_reload(&mut w, &hook, |w| {
        all_pass(w, a, 1)?;
        all_pass(w, b, 2)?;
        all_pass(w, c, 1)
    })?;
    w.write_config("", &new)?;
    w.start_daemon()?;
    assert_eq!(
        in_force(&w)?,
        [("a".into(), 7, 80), ("c".into(), 4, 60)],
        "the config from before the reload"
    );
    let log = w.daemon_log();
    assert_eq!(
        removed_requests(&log, "b"),
        5 + 2,
        "b's second life logged too: {log}"
    );
    // Every request from b's address is in b's logged counts or unmapped.
    assert_eq!(n(&w.org("unmapped")?, "requests"), 1);
    assert_eq!(w.served_from(b)?.len(), 5 + 1 + 2);
    assert_eq!(w.served_from(c)?.len(), 4);
    // The limits in force are enforced.
    let st = statuses(&w, c, 60)?;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 56, "{st:?}");
    Ok(())
}

/// The daemon killed while a snapshot write is held between the complete temporary file and
/// its rename: the day's file is still the last whole snapshot, requests passed meanwhile, and
/// the restarted daemon has every count and writes the next snapshot over the leftover.
#[test]
fn the_daemon_killed_mid_snapshot_loses_no_count() -> Result<()> {
    let mut w = World::new("fltsnap", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let hook = Hook::new(&mut w, "LIMITER_TEST_PAUSE_SNAPSHOT_RENAME", "snap");
    w.daemon_extra = "snapshot_interval_secs = 1".into();
    w.write_config("", &org_toml("acme", &[cidr(ip)], ""))?;
    w.start_daemon()?;
    let day = w.today()?;
    all_pass(&w, ip, 10)?;
    w.wait_snapshot(&day, "acme", 10)?;
    hook.arm()?;
    hook.wait_held()?;
    // The daemon is stuck in the write; the kernel answers and counts.
    all_pass(&w, ip, 5)?;
    w.kill_daemon()?;
    hook.disarm()?;
    let snap = w.snapshot(&day)?.context("the snapshot is gone")?;
    assert_eq!(snap["orgs"]["acme"]["requests"], 10, "{snap}");
    let tmp = w.dir().join(format!("state/days/.{day}.tmp"));
    assert!(tmp.exists(), "the killed write left its temporary file");
    all_pass(&w, ip, 3)?;
    w.start_daemon()?;
    assert_eq!(counts(&w, "acme")?, (18, 0));
    assert_eq!(w.served_from(ip)?.len(), 18);
    w.wait_snapshot(&day, "acme", 18)?;
    assert!(!tmp.exists(), "the next write took the leftover's place");
    Ok(())
}

// ---- The control socket flooded ----

/// How one flood client of the control socket ended.
#[derive(Debug)]
enum Cut {
    /// The daemon closed the connection (EOF, reset or a refused write), after sending this.
    Closed(String),
    /// Still open when the client gave up.
    Open,
}

/// One flood client: connects to `socket` (then counts itself in `connected`), sends `send`
/// bytes by `step` every `every` (or nothing), and reads until the daemon closes, giving up
/// after [`FAULT_DEADLINE`].
async fn flood_client(
    socket: PathBuf,
    connected: Arc<AtomicUsize>,
    (send, step, every): (usize, usize, Duration),
) -> Result<Cut> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let give_up = tokio::time::Instant::now() + FAULT_DEADLINE;
    // A full accept queue refuses a connect at once (EAGAIN): try again.
    let stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < give_up => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(e).context("connecting to the control socket");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e).context("connecting to the control socket"),
        }
    };
    connected.fetch_add(1, Ordering::SeqCst);
    let (mut rd, mut wr) = stream.into_split();
    let writer = async move {
        let chunk = vec![b'x'; step.max(1)];
        let mut sent = 0;
        // Until a write fails (the daemon closed), then holding the connection open: the
        // reader sees how it ends.
        while sent < send && wr.write_all(&chunk).await.is_ok() {
            sent += step;
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await;
    };
    let reader = async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return Cut::Closed(String::from_utf8_lossy(&got).into()),
                Ok(k) => got.extend_from_slice(&buf[..k]),
            }
        }
    };
    Ok(tokio::select! {
        cut = reader => cut,
        () = writer => Cut::Open,
        () = tokio::time::sleep_until(give_up) => Cut::Open,
    })
}

/// Waits until `flood` clients connected.
fn wait_flooded(connected: &AtomicUsize, flood: usize) -> Result<()> {
    wait_for("every flood client connected", FAULT_DEADLINE, || {
        let n = connected.load(Ordering::SeqCst);
        Ok(if n >= flood {
            Ok(())
        } else {
            Err(format!("{n}"))
        })
    })
}

/// The control socket flooded with silent clients, clients sending a byte a second and clients
/// sending far more than a request may hold: `limiter report` keeps answering, the daemon's
/// memory grows by less than one maximal request per flood client, and every flood client is
/// cut off; an oversized request is refused. Requests to the API pass and are counted
/// throughout.
#[test]
fn a_flooded_control_socket_stays_responsive() -> Result<()> {
    const SILENT: usize = 300;
    const TRICKLE: usize = 100;
    const OVERSIZED: usize = 20;
    let flood = SILENT + TRICKLE + OVERSIZED;
    raise_nofile(flood as u64 + 1024)?;
    let mut w = World::new("fltctl", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(ip)], UNLIMITED))?;
    w.start_daemon()?;
    let pid = w.daemon_pid().context("no daemon")?;
    let socket = w.dir().join("state/control.sock");
    // Warm: the report path has run once before the baseline is taken.
    w.report()?;
    let rss_before = rss_kib(pid)?;
    let oversized = 64 * limiter_user::control::MAX_REQUEST as usize;
    let connected = Arc::new(AtomicUsize::new(0));
    let ((cuts, reports, rss_peak), tally) = under_traffic(&w, ip, 50_000, |load| {
        std::thread::scope(|s| {
            let flooding = s.spawn(|| -> Result<Vec<Cut>> {
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(async {
                    let mut clients = Vec::new();
                    let second = Duration::from_secs(1);
                    for i in 0..flood {
                        let (send, step) = match i % 21 {
                            0 => (oversized, 64 * 1024),
                            1..=5 => (usize::MAX, 1),
                            _ => (0, 0),
                        };
                        let every = if step == 1 { second } else { Duration::ZERO };
                        clients.push(tokio::spawn(flood_client(
                            socket.clone(),
                            connected.clone(),
                            (send, step, every),
                        )));
                    }
                    let mut cuts = Vec::new();
                    for c in clients {
                        cuts.push(c.await??);
                    }
                    Ok(cuts)
                })
            });
            // While the flood holds the socket: reports answer, and API requests pass. (A CLI
            // call that comes amid the burst of connections may be cut off with them.)
            wait_flooded(&connected, flood)?;
            let mut reports = 0;
            let mut rss_peak = rss_before;
            while !flooding.is_finished() {
                let r = w.report()?;
                ensure!(r["orgs"][0]["org"] == "acme", "{r}");
                reports += 1;
                rss_peak = rss_peak.max(rss_kib(pid)?);
                load.wait_more(1)?;
                std::thread::sleep(Duration::from_millis(100));
            }
            let cuts = flooding
                .join()
                .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
            Ok((cuts, reports, rss_peak))
        })
    })?;
    let open = cuts.iter().filter(|c| matches!(c, Cut::Open)).count();
    assert_eq!(open, 0, "flood clients never cut off");
    assert_eq!(cuts.len(), flood);
    // An oversized request on its own is refused, and the connection closed.
    let alone = tokio::runtime::Runtime::new()?.block_on(flood_client(
        socket.clone(),
        connected.clone(),
        (oversized, 64 * 1024, Duration::ZERO),
    ))?;
    assert!(
        matches!(&alone, Cut::Closed(t) if t.contains("bad request")),
        "{alone:?}"
    );
    assert!(reports > 0);
    let bound = flood as u64 * limiter_user::control::MAX_REQUEST / 1024;
    assert!(
        rss_peak.saturating_sub(rss_before) < bound,
        "the daemon grew from {rss_before} KiB to {rss_peak} KiB (bound: {bound} KiB more)"
    );
    assert_eq!(tally.count(200), tally.statuses.len());
    let total = tally.statuses.len() as u64;
    assert_eq!(counts(&w, "acme")?, (total, 0));
    assert_eq!(w.served_from(ip)?.len() as u64, total);
    Ok(())
}

// ---- The metrics endpoint held by slow readers ----

/// A slow reader of the metrics endpoint: a small receive buffer, the request sent (or, when
/// `silent`, nothing at all), counted in `ready`, then one byte read a second until the daemon
/// closes, `stop` is set or [`FAULT_DEADLINE`] passes.
async fn slow_reader(
    port: u16,
    silent: bool,
    ready: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let connected = sock
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    let mut s = match connected {
        Ok(s) if silent => Some(s),
        Ok(mut s) => s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()
            .map(|()| s),
        // A full accept queue may refuse it: then it holds nothing.
        Err(_) => None,
    };
    ready.fetch_add(1, Ordering::SeqCst);
    let give_up = tokio::time::Instant::now() + FAULT_DEADLINE;
    let mut byte = [0u8; 1];
    while let Some(conn) = s.as_mut() {
        if stop.load(Ordering::SeqCst) || tokio::time::Instant::now() > give_up {
            break;
        }
        // Bounded: a connection the server dropped from a full accept queue is open on this
        // side only, and never gets a byte.
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => s = None,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(_) => {}
        }
    }
    Ok(())
}

/// 1,000 slow readers on the metrics endpoint, half of them not even sending their request
/// (those hold a connection until the daemon's read timeout; an answer that fits in the socket
/// buffers frees the others' at once): while they are all connected, a fresh client's first
/// request is answered, the daemon keeps no more connections than its limit, and the API
/// requests meanwhile pass and are counted.
#[test]
fn slow_metrics_readers_do_not_hold_the_endpoint() -> Result<()> {
    const READERS: usize = 1000;
    const FILLER_ORGS: usize = 500;
    raise_nofile(READERS as u64 + 1024)?;
    let mut w = World::new("fltmetrics", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let port = free_port()?;
    w.daemon_extra = format!("metrics = \"127.0.0.1:{port}\"");
    let mut orgs = org_toml("acme", &[cidr(ip)], UNLIMITED);
    for i in 0..FILLER_ORGS {
        orgs.push_str(&org_toml(
            &format!("filler{i}"),
            &[format!("100.64.{}.{}/32", i / 256, i % 256)],
            "",
        ));
    }
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    let pid = w.daemon_pid().context("no daemon")?;
    let page = wait_for("a metrics page with every org", FAULT_DEADLINE, || {
        let page = scrape(port).unwrap_or_default();
        Ok(
            if page.contains(&format!("org=\"filler{}\"", FILLER_ORGS - 1)) {
                Ok(page)
            } else {
                Err(page.chars().take(200).collect())
            },
        )
    })?;
    let fds_before = open_fds(pid)?;
    let slots = limiter_user::metrics::ServeLimits::default().max_connections as u64;
    let ready = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (fresh, tally) = under_traffic(&w, ip, 50_000, |load| {
        std::thread::scope(|s| {
            let readers = s.spawn(|| -> Result<()> {
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(async {
                    let all: Vec<_> = (0..READERS)
                        .map(|i| {
                            let reader = slow_reader(port, i % 2 == 0, ready.clone(), stop.clone());
                            tokio::spawn(reader)
                        })
                        .collect();
                    for r in all {
                        r.await??;
                    }
                    Ok(())
                })
            });
            let held = (|| {
                wait_for("every reader connected", FAULT_DEADLINE, || {
                    let n = ready.load(Ordering::SeqCst);
                    Ok(if n == READERS {
                        Ok(())
                    } else {
                        Err(format!("{n}"))
                    })
                })?;
                // Queued behind every reader, the fresh client is answered at its first try.
                let fresh = scrape(port)?;
                // The daemon let the readers go: it holds no more than its limit of them
                // (the wait fails the test otherwise).
                wait_for(
                    "the daemon's connections back within its limit",
                    FAULT_DEADLINE,
                    || {
                        let fds = open_fds(pid)?;
                        Ok(if fds <= fds_before + slots {
                            Ok(fds)
                        } else {
                            Err(format!("{fds} fds"))
                        })
                    },
                )?;
                load.wait_more(20)?;
                Ok(fresh)
            })();
            stop.store(true, Ordering::SeqCst);
            readers
                .join()
                .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
            held
        })
    })?;
    assert!(fresh.starts_with("HTTP/1.1 200 OK"), "{fresh}");
    assert!(fresh.len() >= page.len() / 2, "a whole page: {fresh}");
    assert_eq!(tally.count(200), tally.statuses.len());
    let total = tally.statuses.len() as u64;
    assert_eq!(counts(&w, "acme")?, (total, 0));
    assert_eq!(w.served_from(ip)?.len() as u64, total);
    Ok(())
}

/// Sets the soft limit of open files of process `pid`.
fn limit_fds(pid: u32, soft: u64) -> Result<()> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child with valid rlimit pointers.
    unsafe {
        if libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) != 0 {
            anyhow::bail!("prlimit: {}", std::io::Error::last_os_error());
        }
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        if libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) != 0 {
            anyhow::bail!("prlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// More silent clients on the control socket than the daemon may open files (its soft limit
/// lowered to a little above what it uses, as systemd's default of 1,024 would be to a flood of
/// thousands): `limiter report` still answers, snapshots are still written, and the flood is cut
/// off.
#[test]
fn a_control_socket_flood_beyond_the_fd_limit_stays_responsive() -> Result<()> {
    const FLOOD: usize = 400;
    raise_nofile(FLOOD as u64 + 1024)?;
    let mut w = World::new("fltfds", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    w.daemon_extra = "snapshot_interval_secs = 1".into();
    w.write_config("", &org_toml("acme", &[cidr(ip)], UNLIMITED))?;
    w.start_daemon()?;
    let day = w.today()?;
    let pid = w.daemon_pid().context("no daemon")?;
    // Room for the daemon's own files and its CLI connections, not for the flood.
    let room = 2 * limiter_user::control::MAX_CONNECTIONS as u64;
    limit_fds(pid, open_fds(pid)? + room)?;
    let socket = w.dir().join("state/control.sock");
    let connected = Arc::new(AtomicUsize::new(0));
    let (cuts, reports) = std::thread::scope(|s| -> Result<(Vec<Cut>, u64)> {
        let flooding = s.spawn(|| -> Result<Vec<Cut>> {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let silent = (0, 0, Duration::ZERO);
                let clients: Vec<_> = (0..FLOOD)
                    .map(|_| tokio::spawn(flood_client(socket.clone(), connected.clone(), silent)))
                    .collect();
                let mut cuts = Vec::new();
                for c in clients {
                    cuts.push(c.await??);
                }
                Ok(cuts)
            })
        });
        wait_flooded(&connected, FLOOD)?;
        let mut reports = 0;
        let mut sent = 0;
        while !flooding.is_finished() {
            all_pass(&w, ip, 1)?;
            sent += 1;
            let r = w.report()?;
            ensure!(n(&r["orgs"][0], "requests") == sent, "{r}");
            reports += 1;
        }
        let cuts = flooding
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
        Ok((cuts, reports))
    })?;
    assert!(
        cuts.iter().all(|c| matches!(c, Cut::Closed(_))),
        "flood clients never cut off"
    );
    assert!(reports > 0);
    let (requests, _) = counts(&w, "acme")?;
    w.wait_snapshot(&day, "acme", requests)?;
    let log = w.daemon_log();
    assert!(!log.contains("snapshot_write"), "{log}");
    Ok(())
}
