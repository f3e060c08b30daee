//! No window without counting: a connection accepted while the daemon starts, one that lives
//! across a restart that resizes the org maps, and orgs' connections while others' idle
//! connections fill the socket tables are all counted and limited.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use integration_tests::{PUSH_PORT, World, cidr, n, org_toml};
use limiter_lab::testbed::{self, HttpConn, Request, ServeArgs, open_idle, push_on};
use serde_json::Value;
use tokio::{net::TcpStream, runtime::Runtime};

/// A client runtime whose connections outlive one `World::client` call (held while the daemon
/// starts or restarts). Connections are made in the client netns; requests go from any thread.
struct Held {
    rt: Runtime,
}

impl Held {
    fn new() -> Result<Held> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("client runtime")?;
        Ok(Held { rt })
    }

    /// A keep-alive connection from `src` to the API.
    fn connect(&self, w: &World, src: IpAddr) -> Result<HttpConn> {
        let api = w.api4();
        w.tb.in_client(|| self.rt.block_on(HttpConn::connect(Some(src), api)))
    }

    /// `count` idle connections from `src` to the API.
    fn idle(&self, w: &World, src: IpAddr, count: usize) -> Result<Vec<TcpStream>> {
        let api = w.api4();
        w.tb.in_client(|| {
            self.rt.block_on(async {
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    out.push(open_idle(src, api).await?);
                }
                Ok(out)
            })
        })
    }

    /// A push connection from the API host (a socket in the observed cgroup) to `to`.
    fn push_conn(&self, w: &World, to: std::net::SocketAddr) -> Result<HttpConn> {
        let sock = w.tb.server_socket(false)?;
        self.rt.block_on(HttpConn::connect_socket(sock, to))
    }

    /// `count` pushes on `conn`, each answered 200.
    fn push(&self, conn: &mut HttpConn, count: usize) -> Result<()> {
        self.rt.block_on(push_on(conn, count, "/hooks/event", 100))
    }

    /// Statuses of `count` keep-alive GETs on `conn`.
    fn statuses(&self, conn: &mut HttpConn, count: usize) -> Result<Vec<u16>> {
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                out.push(
                    conn.send(&Request::get(format!("/api/{i}")), true)
                        .await?
                        .status,
                );
            }
            Ok(out)
        })
    }
}

/// Waits (bounded) until `cond` holds.
fn wait_for(w: &World, what: &str, cond: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within 20 s:\n{}", w.daemon_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One org's report entry, asked for by name (the full report of many orgs is large).
fn org_entry(w: &World, name: &str) -> Result<Value> {
    let out = w.cli(&["report", "--json", "--org", name])?;
    if !out.status.success() {
        bail!("report failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: Value = serde_json::from_slice(&out.stdout)?;
    r["orgs"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["org"] == name).cloned())
        .with_context(|| format!("no org {name} in {r}"))
}

/// Polls `org_entry` until `cond` holds (connection counts settle asynchronously).
fn wait_entry(w: &World, name: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = org_entry(w, name)?;
        if cond(&o) {
            return Ok(o);
        }
        if Instant::now() > deadline {
            bail!("org {name} never reached the expected state; last: {o}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// API connections from `src` the server's TCP holds in ESTABLISHED.
fn established_from(w: &World, src: IpAddr) -> Result<usize> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", w.tb.netns(testbed::Side::Server)])
        .args(["ss", "-tanH", "state", "established", "sport", "=", ":8080"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let peer = [format!("{src}]:"), format!(" {src}:")];
    Ok(text
        .lines()
        .filter(|l| peer.iter().any(|p| l.contains(p.as_str())))
        .count())
}

/// The layout directories (not the shared socket tables) under the world's pin directory.
fn layouts(w: &World) -> Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(w.tb.bpffs().join("limiter"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("v1-") && !n.starts_with("v1-socks-"))
        .collect();
    out.sort();
    Ok(out)
}

/// A connection accepted while the daemon is held right after attaching sock_ops (a test hook)
/// finds the config in place: it is tracked, counted and limited like any other.
#[test]
fn a_connection_accepted_while_the_daemon_starts_is_tracked() -> Result<()> {
    let mut w = World::new("gap", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let pause = w.dir().join("pause-after-attach");
    w.daemon_env.push((
        "LIMITER_TEST_PAUSE_AFTER_ATTACH".into(),
        pause.display().to_string(),
    ));
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 3"))?;
    w.spawn_daemon()?;
    wait_for(&w, "the pause after attaching", || pause.exists())?;
    let held = Held::new()?;
    let mut conn = held.connect(&w, acme)?;
    std::fs::remove_file(&pause)?;
    w.wait_daemon()?;
    let org = wait_entry(&w, "acme", |o| o["connections"] == 1)?;
    assert_eq!(n(&org, "peak_connections"), 1, "{org}");
    assert_eq!(held.statuses(&mut conn, 4)?, [200, 200, 200, 429]);
    let org = org_entry(&w, "acme")?;
    assert_eq!((n(&org, "requests"), n(&org, "rejected")), (3, 1), "{org}");
    drop(conn);
    wait_entry(&w, "acme", |o| o["connections"] == 0)?;
    assert_eq!(
        w.served_from(acme)?.len(),
        3,
        "the refused request never reached the server"
    );
    Ok(())
}

/// A keep-alive connection held across a restart whose config needs bigger org maps (a new
/// layout, fresh org maps with other ids) keeps being counted and refused over quota, and its
/// open connection moves to the new maps; pushes on a connection held across it keep counting.
/// An idle connection that closes before its next request leaves the new maps' counts alone
/// (beta, which gets acme's old id, keeps its connection).
#[test]
fn a_connection_lives_across_a_restart_that_resizes_the_org_maps() -> Result<()> {
    // More orgs than the smallest org maps hold (65,536 slots, slot 0 unmapped).
    const FILLER: usize = 65_536;
    let mut w = World::new("resize", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let beta = IpAddr::V4(w.tb.clients_v4()[1]);
    let acme_org = org_toml("acme", &[cidr(acme)], "daily_requests = 5");
    w.write_config("", &acme_org)?;
    w.start_daemon()?;
    // acme's webhook receiver, in the client netns on acme's address.
    let IpAddr::V4(acme4) = acme else {
        bail!("acme has an IPv4 address")
    };
    let receiver = ServeArgs {
        listen: vec![(acme4, PUSH_PORT).into()],
        log: w.dir().join("receiver.log"),
        body_bytes: 0,
        proxy_protocol: false,
    };
    w.tb.spawn_in_client(testbed::serve_command(&w.lab, &receiver))?;
    w.tb.wait_listening(testbed::Side::Client, PUSH_PORT, Duration::from_secs(10))?;
    let held = Held::new()?;
    let mut conn = held.connect(&w, acme)?;
    assert_eq!(held.statuses(&mut conn, 2)?, [200, 200]);
    let mut pushes = held.push_conn(&w, (acme4, PUSH_PORT).into())?;
    held.push(&mut pushes, 2)?;
    let idle = held.idle(&w, acme, 1)?;
    let org = wait_entry(&w, "acme", |o| o["connections"] == 2)?;
    assert_eq!(n(&org, "exempt_pushes"), 2, "{org}");
    let before = layouts(&w)?;
    w.stop_daemon()?;

    // acme comes last: its id changes, and beta gets acme's old id, so a socket still carrying
    // that id would count against beta.
    let mut orgs = org_toml("beta", &[cidr(beta)], "");
    for i in 0..FILLER {
        orgs.push_str(&org_toml(
            &format!("f{i}"),
            &[format!("100.64.{}.{}/32", i / 256, i % 256)],
            "",
        ));
    }
    orgs.push_str(&acme_org);
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    let after = layouts(&w)?;
    assert!(
        after.len() == 1 && before.len() == 1 && after != before,
        "a new layout replaced the old one: {before:?} -> {after:?}"
    );
    let mut beta_conn = held.connect(&w, beta)?;
    assert_eq!(held.statuses(&mut beta_conn, 1)?, [200]);
    wait_entry(&w, "beta", |o| o["connections"] == 1)?;
    drop(idle);
    // The server's TCP has seen the close (sock_ops ran) once the connection left ESTABLISHED.
    wait_for(&w, "the idle connection's close", || {
        established_from(&w, acme).is_ok_and(|n| n == 1)
    })?;
    assert_eq!(held.statuses(&mut conn, 4)?, [200, 200, 200, 429]);
    held.push(&mut pushes, 3)?;
    let org = wait_entry(&w, "acme", |o| o["connections"] == 1)?;
    assert_eq!((n(&org, "requests"), n(&org, "rejected")), (5, 1), "{org}");
    assert_eq!(n(&org, "exempt_pushes"), 5, "{org}");
    let b = org_entry(&w, "beta")?;
    assert_eq!((n(&b, "requests"), n(&b, "connections")), (1, 1), "{b}");
    drop((conn, pushes, beta_conn));
    wait_entry(&w, "acme", |o| o["connections"] == 0)?;
    assert_eq!(
        w.served_from(acme)?.len(),
        5,
        "the refused request never reached the server"
    );
    let pushed = testbed::read_access_log(&receiver.log)?;
    assert_eq!(pushed.len(), 5, "{pushed:?}");
    Ok(())
}

/// With the socket tables shrunk to a few dozen (a test hook), idle connections of no org stop
/// being tracked at 3/4 of the capacity; an org's idle connections take the rest, and an org's
/// connection that then finds no room for its state still gets the verdict: counted and refused
/// at its limit.
#[test]
fn idle_connections_cannot_lift_the_limits() -> Result<()> {
    const CAPACITY: usize = 16;
    let mut w = World::new("crowd", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let stranger = IpAddr::V4(w.tb.clients_v4()[1]);
    w.daemon_env
        .push(("LIMITER_TEST_SOCK_CAPACITY".into(), CAPACITY.to_string()));
    w.write_config(
        "concurrent_connections = 100",
        &org_toml("acme", &[cidr(acme)], "daily_requests = 3"),
    )?;
    w.start_daemon()?;
    let held = Held::new()?;
    // Three times the capacity: without the high-water mark they would fill even the socket map.
    let strangers = held.idle(&w, stranger, 3 * CAPACITY)?;
    let high_water = CAPACITY - CAPACITY / 4;
    let unmapped = w.wait_org("unmapped", |o| o["connections"] == high_water as u64)?;
    assert_eq!(n(&unmapped, "connections"), high_water as u64, "{unmapped}");
    // The org's own idle connections take the remaining state places.
    let idle = held.idle(&w, acme, CAPACITY - high_water)?;
    wait_entry(&w, "acme", |o| {
        o["connections"] == (CAPACITY - high_water) as u64
    })?;
    let mut conn = held.connect(&w, acme)?;
    assert_eq!(held.statuses(&mut conn, 4)?, [200, 200, 200, 429]);
    let org = org_entry(&w, "acme")?;
    assert_eq!((n(&org, "requests"), n(&org, "rejected")), (3, 1), "{org}");
    assert_eq!(
        w.served_from(acme)?.len(),
        3,
        "the refused request never reached the server"
    );
    wait_for(&w, "the faults' log lines", || {
        let log = w.daemon_log();
        log.contains("unmapped_untracked") && log.contains("sock_state_full")
    })?;
    // Room comes back as connections close.
    drop((strangers, idle, conn));
    w.wait_org("unmapped", |o| o["connections"] == 0)?;
    wait_entry(&w, "acme", |o| o["connections"] == 0)?;
    let stranger_conns = held.idle(&w, stranger, high_water)?;
    w.wait_org("unmapped", |o| o["connections"] == high_water as u64)?;
    drop(stranger_conns);
    Ok(())
}
