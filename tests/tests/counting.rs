//! Counting end to end: real programs in the kernel, a real daemon, a real server and real clients,
//! every count checked against what the server itself saw.

use std::net::IpAddr;

use anyhow::Result;
use integration_tests::{PUSH_PORT, World, cidr, gets, n, org_toml};
use limiter_lab::testbed::{
    self, PushArgs, Request, ServeArgs, http_requests, open_idle, reset, send_raw,
};
use serde_json::Value;

/// Several orgs in parallel, IPv4 (arriving IPv4-mapped on the dual-stack server socket) and IPv6,
/// keep-alive and one connection per request, media GETs, an unmapped client: every org's counts
/// equal the server's own count of its requests.
#[test]
fn requests_per_org_equal_what_the_server_saw() -> Result<()> {
    let mut w = World::new("count", 3, 2)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let globex = IpAddr::V4(w.tb.clients_v4()[1]);
    let stranger = IpAddr::V4(w.tb.clients_v4()[2]);
    let initech = IpAddr::V6(w.tb.clients_v6()[0]);
    let orgs = [
        org_toml("acme", &[cidr(acme)], "daily_requests = 100000"),
        org_toml("globex", &[cidr(globex)], ""),
        org_toml("initech", &[cidr(initech)], ""),
    ]
    .concat();
    w.write_config("", &orgs)?;
    w.start_daemon()?;

    let (api4, api6) = (w.api4(), w.api6());
    w.client(|| async move {
        let mut media = gets("/media/img", 20);
        media.extend(gets("/api/items/", 10));
        let posts: Vec<Request> = (0..60)
            .map(|i| Request::post(format!("/api/data/{i}"), vec![b'x'; 300]))
            .collect();
        let (ka, kg, ki, ks) = (
            gets("/api/a/", 150),
            gets("/api/g/", 90),
            gets("/api/i/", 120),
            gets("/api/s/", 30),
        );
        let (a, b, c, d, e, f) = tokio::join!(
            http_requests(acme, api4, &ka, true),
            http_requests(acme, api4, &media, false),
            http_requests(globex, api4, &posts, true),
            http_requests(globex, api4, &kg, false),
            http_requests(initech, api6, &ki, true),
            http_requests(stranger, api4, &ks, true),
        );
        // Passing requests reach the server untouched: each answer echoes its own request line.
        for (r, sent) in [a, b, c, d, e, f]
            .into_iter()
            .zip([&ka, &media, &posts, &kg, &ki, &ks])
        {
            for (resp, req) in r?.iter().zip(sent.iter()) {
                assert_eq!(resp.status, 200);
                assert_eq!(resp.text(), format!("ok {} {}\n", req.method, req.path));
            }
        }
        Ok(())
    })?;

    let report = w.report()?;
    for (name, ip) in [("acme", acme), ("globex", globex), ("initech", initech)] {
        let served = w.served_from(ip)?;
        let media = served
            .iter()
            .filter(|e| e.path.starts_with("/media/"))
            .count() as u64;
        let org = w.org(name)?;
        assert_eq!(
            n(&org, "requests"),
            served.len() as u64 - media,
            "{name}: {org}"
        );
        assert_eq!(n(&org, "exempt_media_gets"), media, "{name}: {org}");
        assert_eq!(n(&org, "unparsed"), 0, "{name}: {org}");
        assert_eq!(n(&org, "exempt_pushes"), 0, "{name}: {org}");
    }
    assert_eq!(n(&w.org("acme")?, "requests"), 160);
    assert_eq!(n(&w.org("acme")?, "exempt_media_gets"), 20);
    assert_eq!(n(&w.org("globex")?, "requests"), 150);
    assert_eq!(
        n(&w.org("globex")?, "remaining"),
        2500 - 150,
        "org default limit applies"
    );
    assert_eq!(n(&w.org("initech")?, "requests"), 120);
    assert_eq!(
        n(&report["unmapped"], "requests"),
        w.served_from(stranger)?.len() as u64
    );
    assert_eq!(n(&report["unmapped"], "requests"), 30);
    Ok(())
}

/// POSTs the host pushes out to an org's address are `exempt_pushes` of that org, never requests;
/// an inbound POST with a body spread over many segments is one request.
#[test]
fn pushes_are_exempt_and_multi_segment_bodies_count_once() -> Result<()> {
    let mut w = World::new("push", 1, 0)?;
    let acme = w.tb.clients_v4()[0];
    w.write_config("", &org_toml("acme", &[cidr(IpAddr::V4(acme))], ""))?;
    w.start_daemon()?;

    // The customer's webhook receiver, in the client netns on acme's address.
    let receiver_log = w.dir().join("receiver.log");
    let recv = ServeArgs {
        listen: vec![(acme, PUSH_PORT).into()],
        log: receiver_log.clone(),
        body_bytes: 0,
        proxy_protocol: false,
    };
    w.tb.spawn_in_client(testbed::serve_command(&w.lab, &recv))?;
    w.tb.wait_listening(
        testbed::Side::Client,
        PUSH_PORT,
        std::time::Duration::from_secs(10),
    )?;
    // The API platform (a process in the observed cgroup) pushes 7 webhooks.
    let push = PushArgs {
        to: (acme, PUSH_PORT).into(),
        count: 7,
        path: "/hooks/event".into(),
        body_bytes: 2000,
    };
    let status =
        w.tb.spawn_in_server(testbed::push_command(&w.lab, &push))?
            .wait()?;
    assert!(status.success(), "push sender failed");

    let api = w.api4();
    let src = IpAddr::V4(acme);
    w.client(|| async move {
        let big: Vec<Request> = (0..3)
            .map(|i| Request::post(format!("/api/upload/{i}"), vec![b'y'; 64 * 1024]).in_chunks(8))
            .collect();
        let r = http_requests(src, api, &big, true).await?;
        assert!(r.iter().all(|r| r.status == 200));
        Ok(())
    })?;

    let org = w.org("acme")?;
    let pushed = testbed::read_access_log(&receiver_log)?.len() as u64;
    assert_eq!(pushed, 7);
    assert_eq!(n(&org, "exempt_pushes"), pushed, "{org}");
    let served = w.served_from(src)?;
    assert_eq!(served.len(), 3);
    assert!(
        served.iter().all(|e| e.body == 64 * 1024),
        "bodies arrived whole"
    );
    assert_eq!(
        n(&org, "requests"),
        3,
        "each multi-segment POST counts once: {org}"
    );
    Ok(())
}

/// Connections are counted per org with their peak and breaches, and return to 0 after closing,
/// whether by FIN or RST.
#[test]
fn concurrency_is_counted_and_released() -> Result<()> {
    let mut w = World::new("conc", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let stranger = IpAddr::V4(w.tb.clients_v4()[1]);
    w.write_config(
        "concurrent_connections = 3",
        &org_toml("acme", &[cidr(acme)], ""),
    )?;
    w.start_daemon()?;
    let api = w.api4();

    let (conns, other) = w.client(|| async move {
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(open_idle(acme, api).await?);
        }
        let other = open_idle(stranger, api).await?;
        Ok((conns, other))
    })?;
    let org = w.wait_org("acme", |o| o["connections"] == 5)?;
    assert_eq!(n(&org, "peak_connections"), 5, "{org}");
    assert_eq!(n(&org, "concurrency_limit"), 3, "{org}");
    assert_eq!(n(&org, "concurrency_breaches"), 2, "{org}");
    assert_eq!(n(&org, "requests"), 0, "{org}");
    assert_eq!(n(&w.org("unmapped")?, "connections"), 1);

    let mut conns = conns.into_iter();
    // Two closed normally, three reset by the client.
    drop(conns.next());
    drop(conns.next());
    for c in conns {
        reset(c)?;
    }
    let org = w.wait_org("acme", |o| o["connections"] == 0)?;
    assert_eq!(n(&org, "peak_connections"), 5, "the peak stays: {org}");
    drop(other);
    w.wait_org("unmapped", |o| o["connections"] == 0)?;
    let log = w.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("concurrency_breach") && l.contains("acme")),
        "a breach line is logged: {log}"
    );
    Ok(())
}

/// Garbage and TLS-looking bytes pass through to the server untouched and are counted as unparsed;
/// the connection's org still sees its real requests.
#[test]
fn garbage_and_tls_pass_through_as_unparsed() -> Result<()> {
    let mut w = World::new("garbage", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let stranger = IpAddr::V4(w.tb.clients_v4()[1]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    let api = w.api4();
    let tls_hello: Vec<u8> = [
        &[
            0x16, 0x03, 0x01, 0x00, 0xf1, 0x01, 0x00, 0x00, 0xed, 0x03, 0x03,
        ][..],
        &[0xaa; 200],
    ]
    .concat();
    w.client(|| async move {
        send_raw(acme, api, b"\x00\x01\x02 hello, not http\r\n\r\n").await?;
        send_raw(acme, api, &tls_hello).await?;
        send_raw(acme, api, b"get / http/1.1\r\n\r\n").await?;
        send_raw(stranger, api, &[0xffu8; 3000]).await?;
        let r = http_requests(acme, api, &[Request::get("/api/ok")], true).await?;
        assert_eq!(r[0].status, 200);
        Ok(())
    })?;
    // `get / http/1.1` is a request line (a method token, a space, a target): some servers
    // take lowercase methods, so it is counted, never waved through as unparsed.
    let org = w.org("acme")?;
    assert_eq!(n(&org, "unparsed"), 2, "{org}");
    assert_eq!(n(&org, "requests"), 2, "{org}");
    assert_eq!(n(&w.org("unmapped")?, "unparsed"), 1);
    // The server got every byte stream (it logs non-HTTP input as GARBAGE).
    let garbage = w
        .server_entries()?
        .iter()
        .filter(|e| e.method == "GARBAGE")
        .count();
    assert_eq!(garbage, 4, "non-HTTP bytes reached the server untouched");
    Ok(())
}

/// A new quota day starts every org from zero, and the daemon logs each org's totals of the day
/// that ended; `reset` clears one org at once.
#[test]
fn day_rollover_and_reset() -> Result<()> {
    let mut w = World::new("rollover", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let globex = IpAddr::V4(w.tb.clients_v4()[1]);
    let orgs = [
        org_toml("acme", &[cidr(acme)], ""),
        org_toml("globex", &[cidr(globex)], ""),
    ]
    .concat();
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    let api = w.api4();
    w.client(|| async move {
        http_requests(acme, api, &gets("/api/", 7), true).await?;
        http_requests(globex, api, &gets("/api/", 4), false).await?;
        Ok(())
    })?;
    let day1 = w.report()?["day"].clone();
    assert_eq!(n(&w.org("acme")?, "requests"), 7);

    let out = w.cli(&["debug", "advance-clock", "86400"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = w.report()?;
    assert_ne!(report["day"], day1, "the report moved to the new day");
    assert_eq!(n(&w.org("acme")?, "requests"), 0);
    assert_eq!(n(&w.org("globex")?, "requests"), 0);
    let log = w.daemon_log();
    let ended: Vec<&str> = log.lines().filter(|l| l.contains("day_end")).collect();
    assert!(
        ended
            .iter()
            .any(|l| l.contains("acme") && l.contains("requests=7")),
        "acme's totals of the ended day are logged: {log}"
    );
    assert!(
        ended
            .iter()
            .any(|l| l.contains("globex") && l.contains("requests=4"))
    );
    // Yesterday is still reportable.
    let y = w.cli(&[
        "report",
        "--json",
        "--day",
        day1.as_str().unwrap_or_default(),
    ])?;
    assert!(y.status.success());
    let y: Value = serde_json::from_slice(&y.stdout)?;
    assert_eq!(n(&y["orgs"][0], "requests"), 7, "{y}");

    w.client(|| async move {
        http_requests(acme, api, &gets("/api/", 3), true).await?;
        Ok(())
    })?;
    assert_eq!(n(&w.org("acme")?, "requests"), 3);
    let out = w.cli(&["reset", "--org", "acme"])?;
    assert!(out.status.success());
    assert_eq!(n(&w.org("acme")?, "requests"), 0);
    Ok(())
}

/// A bad config is refused with file, line and key; the CLI says which daemon it cannot reach.
#[test]
fn bad_config_names_file_line_and_key() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("limiter-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[api]\nports = [8080]\n\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\n[[orgs]]\nname = \"b\"\ncidrs = [\"10.1.0.0/16\"]\n",
    )?;
    let exe = testbed::limiter_exe()?;
    let out = std::process::Command::new(&exe)
        .args(["run", "--config"])
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:10"), "{err}");
    assert!(err.contains("orgs[1].cidrs[0]"), "{err}");
    std::fs::write(&path, "[api]\nports = [8080]\nbogus = 1\n")?;
    let out = std::process::Command::new(&exe)
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("bad.toml:3") && text.contains("bogus"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `daemon.metrics` serves today's per-org usage in the Prometheus text format.
#[test]
fn metrics_show_per_org_usage() -> Result<()> {
    let mut w = World::new("metrics", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    w.daemon_extra = format!("metrics = \"127.0.0.1:{port}\"");
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    let api = w.api4();
    w.client(|| async move {
        http_requests(acme, api, &gets("/api/", 9), true).await?;
        Ok(())
    })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text)?;
        if text.contains("limiter_requests_today{org=\"acme\"} 9") {
            assert!(text.starts_with("HTTP/1.1 200 OK"));
            assert!(
                text.contains("limiter_daily_limit{org=\"acme\"} 2500"),
                "{text}"
            );
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed acme's 9 requests: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
