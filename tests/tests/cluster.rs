//! One quota across hosts: two "hosts" (two testbeds, two daemons, two pin directories) share an
//! org's daily count through a local redis-server.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use integration_tests::{Redis, World, n, org_toml};
use limiter_lab::testbed::{Request, http_requests};
use serde_json::Value;

fn host(name: &str, redis: u16, limit: u64) -> Result<(World, IpAddr)> {
    let mut w = World::new(name, 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let orgs = format!(
        "{}[cluster]\nredis = \"redis://127.0.0.1:{redis}\"\nhost_id = {name:?}\nsync_interval_ms = 100\n",
        org_toml(
            "acme",
            &[format!("{ip}/32")],
            &format!("daily_requests = {limit}")
        ),
    );
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    Ok((w, ip))
}

fn send(w: &World, src: IpAddr, count: usize) -> Result<Vec<u16>> {
    let api = w.api4();
    let r = w.client(|| async move {
        let reqs: Vec<Request> = (0..count)
            .map(|i| Request::get(format!("/api/{i}")))
            .collect();
        http_requests(src, api, &reqs, true).await
    })?;
    Ok(r.iter().map(|r| r.status).collect())
}

fn wait_log(w: &World, line: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.daemon_log().contains(line) {
        if Instant::now() > deadline {
            bail!("no {line:?} in the log: {}", w.daemon_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_platform(w: &World, org: &str, want: u64) -> Result<Value> {
    w.wait_org(org, |o| o["platform_requests"].as_u64() == Some(want))
}

/// Host A uses 60 of acme's 100; host B then gets exactly the remaining 40; with Redis stopped
/// and restarted empty, the hosts keep enforcing and the counts come back whole.
#[test]
fn two_hosts_share_one_quota_and_survive_a_redis_restart() -> Result<()> {
    let mut redis = Redis::start(None)?;
    let (a, ip_a) = host("hosta", redis.port, 100)?;
    let (b, ip_b) = host("hostb", redis.port, 100)?;

    assert!(send(&a, ip_a, 60)?.iter().all(|s| *s == 200));
    wait_platform(&b, "acme", 60)?;
    let st = send(&b, ip_b, 60)?;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 40, "{st:?}");
    assert_eq!(st.iter().filter(|s| **s == 429).count(), 20, "{st:?}");
    assert_eq!(a.served_from(ip_a)?.len() + b.served_from(ip_b)?.len(), 100);
    let ob = wait_platform(&b, "acme", 100)?;
    assert_eq!(n(&ob, "remaining"), 0, "{ob}");
    wait_platform(&a, "acme", 100)?;
    // A refuses too now: the platform total reached the limit.
    assert_eq!(send(&a, ip_a, 2)?, [429, 429]);

    // Redis goes away: the hosts keep enforcing on what they know.
    let port = redis.port;
    redis.kill();
    assert_eq!(send(&b, ip_b, 3)?, [429, 429, 429]);
    wait_log(&a, "Redis unreachable")?;
    // Back, empty: every host rewrites its absolute count, nothing is lost.
    let _redis = Redis::start(Some(port))?;
    for w in [&a, &b] {
        wait_log(w, "Redis reachable again")?;
    }
    // The restarted Redis holds both hosts' counts again, read back by each.
    let mut check = redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_connection()?;
    let day = a.report()?["day"].as_str().unwrap_or_default().to_string();
    let counts: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("limiter:count:{day}:acme"))
        .query(&mut check)?;
    assert_eq!(counts.get("hosta"), Some(&60), "{counts:?}");
    assert_eq!(counts.get("hostb"), Some(&40), "{counts:?}");
    wait_platform(&a, "acme", 100)?;
    wait_platform(&b, "acme", 100)?;
    Ok(())
}

/// A reboot that also lost the day's snapshot (here: damaged): the host takes its own count of
/// today back from its field in Redis, so its quota continues instead of starting over. A field
/// in the shared hash that is not an integer is logged and skipped; the other hosts' counts
/// still arrive.
#[test]
fn a_host_without_its_snapshot_restores_its_count_from_redis() -> Result<()> {
    let redis = Redis::start(None)?;
    let (mut a, ip) = host("restore", redis.port, 100)?;
    assert!(send(&a, ip, 7)?.iter().all(|s| *s == 200));
    let day = a.report()?["day"].as_str().unwrap_or_default().to_string();
    let key = format!("limiter:count:{day}:acme");
    let mut con = redis::Client::open(redis.url())?.get_connection()?;
    redis::cmd("HSET")
        .arg(&key)
        .arg("otherhost")
        .arg(5)
        .arg("intruder")
        .arg("lots")
        .query::<()>(&mut con)?;
    // 7 here + 5 there: the bad field did not stop the sync.
    wait_platform(&a, "acme", 12)?;
    wait_log(&a, "a shared count is not an integer; skipped")?;
    let own: Option<u64> = redis::cmd("HGET")
        .arg(&key)
        .arg("restore")
        .query(&mut con)?;
    assert_eq!(own, Some(7));

    // A reboot: no pinned maps, and today's snapshot is damaged.
    a.stop_daemon()?;
    let out = a.cli(&["unload"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = a.dir().join("state/days").join(format!("{day}.json"));
    std::fs::write(&snap, "{ damaged")?;
    a.start_daemon()?;
    wait_log(&a, "this host's requests of today restored from Redis")?;
    let org = a.org("acme")?;
    assert_eq!(n(&org, "requests"), 7, "{org}");
    wait_platform(&a, "acme", 12)?;
    // 100 - 12 left.
    let st = send(&a, ip, 90)?;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 88, "{st:?}");
    assert_eq!(a.served_from(ip)?.len(), 7 + 88);
    Ok(())
}

/// The Redis password never reaches the log: not in the startup line, not in the errors of a
/// refused AUTH (this redis-server has no password, so it refuses one).
#[test]
fn redis_passwords_stay_out_of_the_logs() -> Result<()> {
    let redis = Redis::start(None)?;
    let mut w = World::new("redact", 1, 0)?;
    let ip = IpAddr::V4(w.tb.clients_v4()[0]);
    let orgs = format!(
        "{}[cluster]\nredis = \"redis://app:Sup3rS3cretPw@127.0.0.1:{}\"\nhost_id = \"redact\"\nsync_interval_ms = 100\n",
        org_toml("acme", &[format!("{ip}/32")], ""),
        redis.port
    );
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    wait_log(&w, "Redis unreachable")?;
    let log = w.daemon_log();
    assert!(!log.contains("Sup3rS3cretPw"), "{log}");
    assert!(log.contains("redis://app:***@127.0.0.1"), "{log}");
    Ok(())
}
