//! The daemon's defences, through the real binary: a pin directory others can write to,
//! reloads of restart-only settings, `--day` values that are not dates, systemd readiness, the
//! modes of the state directory and its snapshots, and the metrics endpoint.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use integration_tests::{World, cidr, gets, n, org_toml};
use limiter_lab::testbed::http_requests;
use limiter_user::control::{self, Request};

fn statuses(w: &World, src: IpAddr, count: usize) -> Result<Vec<u16>> {
    let api = w.api4();
    let r =
        w.client(|| async move { http_requests(src, api, &gets("/api/", count), false).await })?;
    Ok(r.iter().map(|r| r.status).collect())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One GET of `/metrics`; the whole answer.
fn scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// 1-based line of the first line of `path` that starts with `prefix`.
fn line_of(path: &Path, prefix: &str) -> Result<usize> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .position(|l| l.starts_with(prefix))
        .map(|i| i + 1)
        .with_context(|| format!("no line {prefix:?} in {text}"))
}

/// A pin directory that group or others can write to is refused by `limiter run` and by
/// `limiter check`, with the reason; made root's alone, it is accepted.
#[test]
fn a_pin_directory_others_can_write_is_refused() -> Result<()> {
    let mut w = World::new("pinmode", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    let pin_dir = w.tb.bpffs().join("limiter");
    std::fs::create_dir_all(&pin_dir)?;
    std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o777))?;
    let err = w
        .start_daemon()
        .expect_err("the daemon must refuse the pin directory");
    let why = format!("{err:#}");
    assert!(
        why.contains(&pin_dir.display().to_string())
            && why.contains("must be owned by root and not writable by group or others"),
        "{why}"
    );
    let out = w.cli(&["check"])?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL bpffs") && l.contains("mode 0777")),
        "{report}"
    );
    std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o755))?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 2)?.iter().all(|s| *s == 200));
    assert_eq!(n(&w.org("acme")?, "requests"), 2);
    Ok(())
}

/// `limits.day_start` and `daemon.metrics` take effect on a restart only: a reload that changes
/// them is refused with FILE:LINE:COL and changes nothing, and the metrics endpoint keeps
/// serving on its address. Undone, the reload goes through.
#[test]
fn reload_refuses_restart_only_settings() -> Result<()> {
    let mut w = World::new("restartonly", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let port = free_port()?;
    w.daemon_extra = format!("metrics = \"127.0.0.1:{port}\"");
    let orgs = org_toml("acme", &[cidr(acme)], "daily_requests = 50");
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 3)?.iter().all(|s| *s == 200));
    let day = w.report()?["day"].clone();
    let before = std::fs::read_to_string(&w.config)?;

    w.write_config("day_start = \"06:00\"", &orgs)?;
    let out = w.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let at = format!(
        "{}:{}:13: limits.day_start: changed",
        w.config.display(),
        line_of(&w.config, "day_start")?
    );
    assert!(err.contains(&at), "expected {at:?} in {err}");
    assert_eq!(w.report()?["day"], day, "the quota day stays");

    let other = free_port()?;
    w.daemon_extra = format!("metrics = \"127.0.0.1:{other}\"");
    w.write_config("", &orgs)?;
    let out = w.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}:{}:11: daemon.metrics: changed",
            w.config.display(),
            line_of(&w.config, "metrics")?
        )),
        "{err}"
    );
    assert_eq!(
        w.daemon_log().matches("reload_failed").count(),
        2,
        "{}",
        w.daemon_log()
    );
    // Still served where it was, with the counts of the config in force.
    let page = scrape(port)?;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("limiter_daily_limit{org=\"acme\"} 50"),
        "{page}"
    );
    assert!(TcpStream::connect(("127.0.0.1", other)).is_err());

    std::fs::write(
        &w.config,
        before.replace("daily_requests = 50", "daily_requests = 60"),
    )?;
    let out = w.cli(&["reload"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let org = w.org("acme")?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "daily_limit")),
        (3, 60),
        "{org}"
    );
    Ok(())
}

/// `--day` must be a date before it becomes a file name: the CLI refuses anything else, and so
/// does the daemon when asked directly on its socket.
#[test]
fn report_days_must_be_dates() -> Result<()> {
    let mut w = World::new("reportday", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    for bad in [
        "../../../etc/passwd",
        "2026-11-28/../x",
        "2026-02-30",
        "today",
    ] {
        let out = w.cli(&["report", "--day", bad])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(
            err.contains("is not a date: expected YYYY-MM-DD"),
            "{bad}: {err}"
        );
    }
    let socket = w.dir().join("state/control.sock");
    let resp = control::call(
        &socket,
        &Request::Report {
            org: None,
            day: Some("../days/x".into()),
        },
    )?;
    assert!(!resp.ok);
    assert!(
        resp.error
            .as_deref()
            .is_some_and(|e| e.contains("not a date")),
        "{resp:?}"
    );
    let out = w.cli(&["report", "--json", "--day", "2001-01-01"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no counts kept for 2001-01-01"),
        "{err}"
    );
    Ok(())
}

/// Under systemd (`NOTIFY_SOCKET`), the daemon says READY=1 once it answers, and STOPPING=1 on
/// the way out. Its state directory is made 0700 even when it was 0755, and the snapshot it
/// writes is 0600.
#[test]
fn systemd_hears_ready_and_state_stays_private() -> Result<()> {
    let mut w = World::new("notify", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    let state = w.dir().join("state");
    std::fs::create_dir_all(state.join("days"))?;
    for d in [&state, &state.join("days")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let socket_path = w.dir().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path)?;
    systemd.set_read_timeout(Some(Duration::from_secs(30)))?;
    w.daemon_env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    w.start_daemon()?;
    let mut buf = [0u8; 256];
    let got = systemd
        .recv(&mut buf)
        .context("no READY=1 from the daemon")?;
    assert_eq!(&buf[..got], b"READY=1");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("days")), 0o700);
    assert!(statuses(&w, acme, 2)?.iter().all(|s| *s == 200));
    let day = w.report()?["day"].as_str().unwrap_or_default().to_string();
    w.stop_daemon()?;
    let got = systemd
        .recv(&mut buf)
        .context("no STOPPING=1 from the daemon")?;
    assert_eq!(&buf[..got], b"STOPPING=1");
    let snap = state.join("days").join(format!("{day}.json"));
    assert_eq!(mode(&snap), 0o600);
    let text = std::fs::read_to_string(&snap)?;
    assert!(text.contains("\"acme\""), "{text}");
    Ok(())
}

/// The metrics endpoint holds at most its limit of connections: idle ones take every slot, and
/// one more closes the oldest of them and is answered.
#[test]
fn metrics_connections_are_bounded() -> Result<()> {
    let mut w = World::new("metricsconn", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let port = free_port()?;
    w.daemon_extra = format!("metrics = \"127.0.0.1:{port}\"");
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    // Idle connections take every slot.
    let slots = limiter_user::metrics::ServeLimits::default().max_connections;
    let mut idle: Vec<TcpStream> = (0..slots)
        .map(|_| TcpStream::connect(("127.0.0.1", port)))
        .collect::<std::io::Result<_>>()?;
    let page = scrape(port)?;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("limiter_requests_today{org=\"acme\"}"),
        "{page}"
    );
    // The oldest idle connection was closed for it, unanswered.
    idle[0].set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut rest = Vec::new();
    match idle[0].read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    Ok(())
}

/// Without a daemon, a bad `--day` is refused before anything is asked.
#[test]
fn report_day_is_checked_by_the_cli() -> Result<()> {
    let out = Command::new(limiter_lab::testbed::limiter_exe()?)
        .args([
            "report",
            "--day",
            "../x",
            "--config",
            "/nonexistent/limiter.toml",
        ])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("\"../x\" is not a date: expected YYYY-MM-DD"),
        "{err}"
    );
    Ok(())
}
