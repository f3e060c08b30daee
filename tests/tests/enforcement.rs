//! Enforcement end to end: the kernel answers over-quota requests with a 429 the app never sees.

use std::net::IpAddr;

use anyhow::Result;
use integration_tests::{World, cidr, gets, n, org_toml};
use limiter_lab::testbed::{HttpConn, Request, Response, exchange_raw, http_requests};
use serde_json::Value;

/// Checks a response is the contract's daily 429 for `org` with `limit`.
/// The compact 429: the headers of the full one, no body, no `Connection` (HTTP/1.1 keeps it), and
/// no value ending in whitespace.
fn assert_compact_429(r: &Response, policy: &str) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("Content-Length"), Some("0"));
    assert_eq!(r.header("Connection"), None);
    assert!(r.body.is_empty());
    assert_eq!(r.header("RateLimit-Policy"), Some(policy));
    let retry = r.header("Retry-After").expect("Retry-After");
    assert!(
        retry
            .parse::<u64>()
            .is_ok_and(|s| (1..=86_400).contains(&s)),
        "{retry:?}"
    );
    let rl = r.header("RateLimit").expect("RateLimit");
    assert!(rl.ends_with(&format!(";t={retry}")), "{rl:?}");
}

fn assert_daily_429(r: &Response, org: &str, limit: u64) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
    let retry: u64 = r
        .header("Retry-After")
        .and_then(|v| v.trim().parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=86_400).contains(&retry), "Retry-After {retry}");
    let policy = r
        .header("RateLimit-Policy")
        .expect("RateLimit-Policy")
        .trim()
        .to_string();
    assert!(policy.starts_with("\"daily\""), "{policy}");
    assert!(
        policy.contains(&format!("q={limit}")) && policy.contains("w=86400"),
        "{policy}"
    );
    let rl = r.header("RateLimit").expect("RateLimit").trim().to_string();
    assert!(rl.starts_with("\"daily\";r=0;t="), "{rl}");
    let body: Value = serde_json::from_slice(&r.body).expect("problem+json body");
    assert_eq!(body["status"], 429);
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["violated-policies"][0], "daily");
    assert_eq!(
        body["detail"],
        format!("{org} has used its {limit} API calls for today")
    );
}

/// Limit N: exactly N requests pass across several keep-alive and per-request connections in
/// parallel, every later one gets a complete 429 and never reaches the server; media GETs still
/// pass; `reset` lifts the refusal at once.
#[test]
fn quota_boundary_is_exact_and_refusals_never_reach_the_app() -> Result<()> {
    let mut w = World::new("quota", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let other = IpAddr::V4(w.tb.clients_v4()[1]);
    let orgs = [
        org_toml("acme", &[cidr(acme)], "daily_requests = 25"),
        org_toml("other", &[cidr(other)], ""),
    ]
    .concat();
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    let api = w.api4();

    let responses = w.client(|| async move {
        let (a, b, c, d) = (
            gets("/api/a/", 20),
            gets("/api/b/", 20),
            gets("/api/c/", 20),
            gets("/api/o/", 30),
        );
        let (ra, rb, rc, rd) = tokio::join!(
            http_requests(acme, api, &a, true),
            http_requests(acme, api, &b, true),
            http_requests(acme, api, &c, false),
            http_requests(other, api, &d, true),
        );
        assert!(
            rd?.iter().all(|r| r.status == 200),
            "another org is not affected"
        );
        Ok([ra?, rb?, rc?].concat())
    })?;
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 25, "exactly the limit passes");
    assert_eq!(refused.len(), 35);
    for r in &refused {
        assert_daily_429(r, "acme", 25);
    }
    assert_eq!(
        w.served_from(acme)?.len(),
        25,
        "the server never saw a refused request"
    );
    let org = w.org("acme")?;
    assert_eq!(
        (
            n(&org, "requests"),
            n(&org, "rejected"),
            n(&org, "remaining")
        ),
        (25, 35, 0),
        "{org}"
    );

    // Media GETs are never refused.
    w.client(|| async move {
        let r = http_requests(acme, api, &gets("/media/file-", 5), true).await?;
        assert!(r.iter().all(|r| r.status == 200));
        Ok(())
    })?;
    assert_eq!(n(&w.org("acme")?, "exempt_media_gets"), 5);

    assert!(w.cli(&["reset", "--org", "acme"])?.status.success());
    let r =
        w.client(
            || async move { http_requests(acme, api, &gets("/api/after-reset/", 3), true).await },
        )?;
    assert!(r.iter().all(|r| r.status == 200), "reset lifts the refusal");
    assert_eq!(n(&w.org("acme")?, "requests"), 3);
    assert!(
        w.daemon_log()
            .lines()
            .any(|l| l.contains("quota_exhausted") && l.contains("acme"))
    );
    Ok(())
}

/// A request at least as long as the 429 gets a keep-alive 429 and the connection stays usable; a
/// shorter one that holds the compact 429 (no body) too; a short one gets `Connection: close`; pipelined requests after a refusal and a refused POST's
/// 200 KB body never reach the app.
#[test]
fn keep_alive_close_pipelined_and_large_bodies() -> Result<()> {
    let mut w = World::new("ka", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 1"))?;
    w.start_daemon()?;
    let api = w.api4();
    let long_path = format!("/api/{}", "x".repeat(900));
    let (long, medium, short, post, pipelined) = w.client(|| async move {
        let first = http_requests(acme, api, &[Request::get("/api/first")], true).await?;
        assert_eq!(first[0].status, 200);
        let mut conn = HttpConn::connect(Some(acme), api).await?;
        let long = conn.send(&Request::get(long_path.as_str()), true).await?;
        // Same connection: a media GET still passes after the keep-alive 429.
        let media = conn.send(&Request::get("/media/x.png"), true).await?;
        assert_eq!(
            media.status, 200,
            "the connection stays usable after a keep-alive 429"
        );
        // Too short for the body, long enough for the compact 429: the connection stays too.
        let mut conn = HttpConn::connect(Some(acme), api).await?;
        let medium = conn
            .send(&Request::get(format!("/api/{}", "m".repeat(100))), true)
            .await?;
        let media = conn.send(&Request::get("/media/y.png"), true).await?;
        assert_eq!(
            media.status, 200,
            "the connection stays usable after a compact 429"
        );
        let short = http_requests(acme, api, &[Request::get("/a")], true)
            .await?
            .remove(0);
        let post = http_requests(
            acme,
            api,
            &[Request::post("/api/upload", vec![b'z'; 200 * 1024])],
            true,
        )
        .await?
        .remove(0);
        let pipelined = exchange_raw(
            acme,
            api,
            b"GET /api/p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/p2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await?;
        Ok((long, medium, short, post, pipelined))
    })?;
    assert_daily_429(&long, "acme", 1);
    assert_eq!(long.header("Connection"), Some("keep-alive"));
    assert_compact_429(&medium, "\"daily\";w=86400;q=1");
    assert_daily_429(&short, "acme", 1);
    assert_eq!(short.header("Connection"), Some("close"));
    assert_daily_429(&post, "acme", 1);
    let text = String::from_utf8_lossy(&pipelined);
    assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
    assert_eq!(
        text.matches("HTTP/1.1").count(),
        1,
        "exactly one 429 (the pipelined second request is not answered)"
    );

    let served = w.served_from(acme)?;
    let paths: Vec<&str> = served.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/api/first", "/media/x.png", "/media/y.png"],
        "nothing refused reached the server"
    );
    // The pipelined chunk's two requests are both refused and both counted.
    let org = w.org("acme")?;
    assert_eq!((n(&org, "requests"), n(&org, "rejected")), (1, 6), "{org}");
    Ok(())
}

/// Standard clients parse the kernel's 429: curl and Python's http.client.
#[test]
fn standard_clients_parse_the_429() -> Result<()> {
    let mut w = World::new("clients", 1, 0)?;
    let acme = w.tb.clients_v4()[0];
    w.write_config(
        "",
        &org_toml("acme", &[cidr(IpAddr::V4(acme))], "daily_requests = 1"),
    )?;
    w.start_daemon()?;
    let url = format!(
        "http://{}:{}/api/x",
        w.tb.server_v4(),
        integration_tests::API_PORT
    );
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "-i", "--interface", &acme.to_string(), &url, &url]);
    curl.stdout(std::process::Stdio::piped());
    let out = w.tb.spawn_in_client(curl)?.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {text}");
    assert!(text.contains("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("HTTP/1.1 429 Too Many Requests"), "{text}");
    assert!(
        text.contains("acme has used its 1 API calls for today"),
        "{text}"
    );

    let script = format!(
        "import http.client, json\n\
         c = http.client.HTTPConnection('{server}', {port}, source_address=('{acme}', 0))\n\
         c.request('GET', '/api/py')\n\
         r = c.getresponse()\n\
         b = json.loads(r.read())\n\
         assert r.status == 429, r.status\n\
         assert int(r.getheader('Retry-After')) > 0\n\
         assert b['violated-policies'] == ['daily'], b\n\
         assert r.getheader('Connection') == 'close', r.getheader('Connection')\n\
         for k in ('Retry-After', 'RateLimit-Policy', 'RateLimit', 'Content-Length'):\n\
         \x20   assert r.getheader(k) == r.getheader(k).strip(), (k, r.getheader(k))\n\
         c = http.client.HTTPConnection('{server}', {port}, source_address=('{acme}', 0))\n\
         c.request('GET', '/api/compact', headers={{'X-Request-Id': 'r' * 100}})\n\
         r = c.getresponse()\n\
         assert r.status == 429 and r.read() == b'', r.status\n\
         assert r.getheader('RateLimit-Policy') == '\"daily\";w=86400;q=1', r.getheader('RateLimit-Policy')\n\
         assert r.getheader('RateLimit') == '\"daily\";r=0;t=' + r.getheader('Retry-After'), r.getheader('RateLimit')\n\
         assert int(r.getheader('Retry-After')) > 0\n\
         c.request('GET', '/media/py.png')\n\
         r = c.getresponse()\n\
         assert r.status == 200, r.status\n\
         r.read()\n\
         print('ok', r.getheader('RateLimit-Policy'))\n",
        server = w.tb.server_v4(),
        port = integration_tests::API_PORT,
    );
    let mut py = std::process::Command::new("python3");
    py.args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = w.tb.spawn_in_client(py)?.wait_with_output()?;
    assert!(
        out.status.success(),
        "python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok"));
    assert_eq!(
        w.served_from(IpAddr::V4(acme))?.len(),
        2,
        "the first call and the media GET"
    );
    Ok(())
}

/// dry-run refuses nothing and counts what would have been refused.
#[test]
fn dry_run_passes_everything_and_counts() -> Result<()> {
    let mut w = World::new("dryrun", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config(
        "quota_mode = \"dry-run\"",
        &org_toml("acme", &[cidr(acme)], "daily_requests = 10"),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let r = w.client(|| async move { http_requests(acme, api, &gets("/api/", 30), true).await })?;
    assert!(r.iter().all(|r| r.status == 200));
    assert_eq!(w.served_from(acme)?.len(), 30);
    let org = w.org("acme")?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "rejected")),
        (10, 20),
        "{org}"
    );
    assert!(
        w.daemon_log()
            .lines()
            .any(|l| l.contains("quota_exhausted") && l.contains("dry-run")),
        "{}",
        w.daemon_log()
    );
    Ok(())
}

/// `concurrency_mode = "reject"`: the first request on a connection over the limit gets the
/// concurrency 429 and the connection closes; connections within the limit are untouched.
#[test]
fn concurrency_reject_answers_the_extra_connection() -> Result<()> {
    let mut w = World::new("conreject", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config(
        "",
        &org_toml(
            "acme",
            &[cidr(acme)],
            "concurrent_connections = 3\nconcurrency_mode = \"reject\"",
        ),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let (fourth, within) = w.client(|| async move {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(HttpConn::connect(Some(acme), api).await?);
        }
        let fourth = http_requests(acme, api, &[Request::get("/api/4th")], true)
            .await?
            .remove(0);
        let within = held[0].send(&Request::get("/api/held"), true).await?;
        Ok((fourth, within))
    })?;
    assert_eq!(within.status, 200, "connections within the limit work");
    assert_eq!(fourth.status, 429, "{}", fourth.text());
    let policy = fourth
        .header("RateLimit-Policy")
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        policy.starts_with("\"concurrency\"") && policy.contains("q=3"),
        "{policy}"
    );
    assert_eq!(fourth.header("Connection"), Some("close"));
    let body: Value = serde_json::from_slice(&fourth.body)?;
    assert_eq!(body["violated-policies"][0], "concurrency");
    let served = w.served_from(acme)?;
    assert_eq!(
        served.len(),
        1,
        "only the held connection's request reached the server"
    );
    let org = w.wait_org("acme", |o| o["connections"] == 0)?;
    assert_eq!(n(&org, "concurrency_rejected"), 1, "{org}");
    assert_eq!(n(&org, "concurrency_breaches"), 1, "{org}");
    assert_eq!(n(&org, "requests"), 1, "{org}");
    Ok(())
}

/// `concurrency_mode = "delay"`: the XDP gate holds the 4th connection's SYN until one of the 3
/// open connections closes; it then connects and is served.
#[test]
fn concurrency_delay_holds_the_extra_connection_until_one_closes() -> Result<()> {
    use std::time::{Duration, Instant};
    let mut w = World::new("delay", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let api_lines = w.tb.gate_config();
    w.write_config_with(
        &api_lines,
        "",
        &org_toml(
            "acme",
            &[cidr(acme)],
            "concurrent_connections = 3\nconcurrency_mode = \"delay\"",
        ),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let report = |w: &World| w.org("acme");
    let (waited, status) = std::thread::scope(|s| -> Result<(Duration, u16)> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (checked_tx, checked_rx) = std::sync::mpsc::channel::<()>();
        let wr = &w;
        let client = s.spawn(move || {
            wr.client(|| async move {
                let mut held = Vec::new();
                for _ in 0..3 {
                    held.push(HttpConn::connect(Some(acme), api).await?);
                }
                let started = Instant::now();
                let fourth = tokio::spawn(HttpConn::connect(Some(acme), api));
                // Let the gate drop the first SYN, then free a slot.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx.send(());
                // (Blocking this runtime is fine: the SYN retries are the kernel's.)
                let _ = checked_rx.recv_timeout(Duration::from_secs(10));
                assert!(
                    !fourth.is_finished(),
                    "the 4th connection waited while 3 were open"
                );
                drop(held.pop());
                let mut conn = fourth.await??;
                let waited = started.elapsed();
                let r = conn.send(&Request::get("/api/after-wait"), true).await?;
                Ok((waited, r.status))
            })
        });
        // While the 4th waits: still 3 connections and at least one held-back SYN.
        let _ = rx.recv_timeout(Duration::from_secs(10));
        let o = report(&w)?;
        assert_eq!(n(&o, "connections"), 3, "{o}");
        assert!(n(&o, "delayed_syns") >= 1, "{o}");
        let _ = checked_tx.send(());
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?
    })?;
    assert_eq!(status, 200);
    assert!(
        waited >= Duration::from_millis(1400),
        "the 4th connection waited: {waited:?}"
    );
    let o = w.org("acme")?;
    assert_eq!(
        n(&o, "concurrency_breaches"),
        0,
        "delay keeps the org within its limit: {o}"
    );
    assert_eq!(n(&o, "peak_connections"), 3, "{o}");
    Ok(())
}

/// `pace_over_quota`: once an org is out of its daily quota, the XDP gate lets its new
/// connections through at `pace_rate` (here 1 a second) and its 429s close the connection even
/// where the compact 429 would have kept it, so a client that goes on sending has to come back
/// through the gate. Its exempt media GETs still get through, on paced connections; another org
/// out of quota but not paced keeps its compact keep-alive 429 and opens connections freely.
/// The org's IPv6 address is paced too, and `limiter reset` ends the pacing at once. An org in
/// `dry-run` is never paced: nothing is refused, so nothing is out of quota.
#[test]
fn pace_over_quota_paces_new_connections_of_an_org_out_of_quota() -> Result<()> {
    let mut w = World::new("pace", 3, 1)?;
    let initech = IpAddr::V4(w.tb.clients_v4()[2]);
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let acme6 = IpAddr::V6(w.tb.clients_v6()[0]);
    let acme4 = acme;
    let globex = IpAddr::V4(w.tb.clients_v4()[1]);
    let api_lines = w.tb.gate_config();
    let orgs = org_toml("acme", &[cidr(acme), cidr(acme6)], "daily_requests = 2")
        + &org_toml(
            "globex",
            &[cidr(globex)],
            "daily_requests = 2\npace_over_quota = false",
        )
        + &org_toml(
            "initech",
            &[cidr(initech)],
            "daily_requests = 2\nquota_mode = \"dry-run\"",
        );
    w.write_config_with(&api_lines, "pace_over_quota = true\npace_rate = 1", &orgs)?;
    w.start_daemon()?;
    let api = w.api4();
    // Long enough for the compact 429 (which would keep the connection).
    let long = format!("/api/{}", "x".repeat(200));
    let run = |org: IpAddr| {
        let long = long.clone();
        async move {
            let mut conn = HttpConn::connect(Some(org), api).await?;
            for _ in 0..2 {
                let r = conn.send(&Request::get("/api/in-quota"), true).await?;
                anyhow::ensure!(r.status == 200, "{}", r.text());
            }
            let refused = conn.send(&Request::get(long), true).await?;
            // Three new connections at once, each with a media GET.
            let media = media_gets_at_once(org, api).await?;
            Ok::<_, anyhow::Error>((refused, media))
        }
    };
    let (acme_r, globex_r) = w.client(|| async move {
        let a = run(acme).await?;
        let g = run(globex).await?;
        Ok((a, g))
    })?;
    let ((acme_429, acme_media), (globex_429, globex_media)) = (acme_r, globex_r);
    assert_eq!(acme_429.status, 429, "{}", acme_429.text());
    assert_eq!(
        acme_429.header("Connection"),
        Some("close"),
        "a paced org's 429 closes the connection"
    );
    assert_compact_429(&globex_429, "\"daily\";w=86400;q=2");
    assert_eq!(acme_media, [200; 3], "paced media GETs still get through");
    assert_eq!(globex_media, [200; 3]);
    let acme = w.org("acme")?;
    let globex = w.org("globex")?;
    assert!(
        n(&acme, "paced_syns") >= 1,
        "three SYNs at once at 1 a second: {acme}"
    );
    assert_eq!(n(&globex, "paced_syns"), 0, "{globex}");
    for o in [&acme, &globex] {
        assert_eq!(n(o, "requests"), 2, "{o}");
        assert_eq!(n(o, "rejected"), 1, "{o}");
        assert_eq!(n(o, "exempt_media_gets"), 3, "{o}");
        assert_eq!(n(o, "delayed_syns"), 0, "{o}");
    }
    // Dry-run: its third request passes (counted as would-be rejected), and its new
    // connections are not paced.
    let dry = w.client(|| async move {
        let mut conn = HttpConn::connect(Some(initech), api).await?;
        for _ in 0..3 {
            let r = conn.send(&Request::get("/api/dry"), true).await?;
            anyhow::ensure!(r.status == 200, "{}", r.text());
        }
        media_gets_at_once(initech, api).await
    })?;
    assert_eq!(dry, [200; 3]);
    let o = w.org("initech")?;
    assert_eq!(n(&o, "paced_syns"), 0, "{o}");
    // The org's IPv6 address: the same org, the same pace.
    let paced = n(&acme, "paced_syns");
    let api6 = w.api6();
    let v6 = w.client(|| media_gets_at_once(acme6, api6))?;
    assert_eq!(v6, [200; 3]);
    let acme = w.org("acme")?;
    assert!(n(&acme, "paced_syns") > paced, "IPv6 SYNs paced: {acme}");
    // A reset puts the org back within its quota: nothing is paced any more.
    assert!(w.cli(&["reset", "--org", "acme"])?.status.success());
    let paced = n(&w.org("acme")?, "paced_syns");
    let after = w.client(|| media_gets_at_once(acme4, api))?;
    assert_eq!(after, [200; 3]);
    let acme = w.org("acme")?;
    assert_eq!(
        n(&acme, "paced_syns"),
        paced,
        "no pacing after the reset: {acme}"
    );
    Ok(())
}

/// Opens three connections from `src` at once and sends a media GET on each: their statuses.
async fn media_gets_at_once(src: IpAddr, api: std::net::SocketAddr) -> Result<Vec<u16>> {
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = HttpConn::connect(Some(src), api).await?;
                let r = c
                    .send(&Request::get(format!("/media/{i}.jpg")), false)
                    .await?;
                Ok::<u16, anyhow::Error>(r.status)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Against Debian's nginx, a few hundred refusals of every shape (short and long GETs, keep-alive
/// and not, POSTs with large bodies, pipelined requests): every one gets a complete 429 and none
/// reaches nginx; the requests within the quota are served normally.
#[test]
fn nginx_never_sees_a_refused_request() -> Result<()> {
    let mut w = World::with_nginx("nginx", 1, 1)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let acme6 = IpAddr::V6(w.tb.clients_v6()[0]);
    w.write_config(
        "",
        &org_toml("acme", &[cidr(acme), cidr(acme6)], "daily_requests = 40"),
    )?;
    w.start_daemon()?;
    let (api4, api6) = (w.api4(), w.api6());
    let long = format!("/api/{}", "l".repeat(1200));
    let responses = w.client(|| async move {
        let mut all = Vec::new();
        // Within quota: 40 pass (IPv4 and IPv6 share the org's quota).
        all.extend(http_requests(acme, api4, &gets("/api/ok/", 20), true).await?);
        all.extend(http_requests(acme6, api6, &gets("/api/ok6/", 20), false).await?);
        for round in 0..60 {
            let short = gets(&format!("/s{round}/"), 2);
            let longs: Vec<Request> = (0..2).map(|_| Request::get(long.as_str())).collect();
            let post = [Request::post(format!("/api/up/{round}"), vec![b'p'; 64 * 1024])];
            all.extend(http_requests(acme, api4, &short, true).await?);
            all.extend(http_requests(acme, api4, &longs, true).await?);
            all.extend(http_requests(acme6, api6, &short, false).await?);
            if round % 6 == 0 {
                all.extend(http_requests(acme, api4, &post, true).await?);
                let raw = exchange_raw(
                    acme,
                    api4,
                    b"GET /api/p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/p2 HTTP/1.1\r\nHost: x\r\n\r\n",
                )
                .await?;
                let text = String::from_utf8_lossy(&raw).to_string();
                assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
            }
        }
        Ok(all)
    })?;
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 40);
    assert_eq!(
        refused.len(),
        responses.len() - 40,
        "every other request got a 429"
    );
    assert!(refused.len() >= 300, "{}", refused.len());
    for r in &refused {
        assert_daily_429(r, "acme", 40);
    }
    let seen = w.nginx_entries()?;
    assert_eq!(
        seen.len(),
        40,
        "nginx logged only the requests within quota: {:?}",
        &seen[..seen.len().min(5)]
    );
    let org = w.org("acme")?;
    assert_eq!(n(&org, "requests"), 40, "{org}");
    // Each raw exchange pipelined two requests in one chunk: both are refused, both counted.
    assert_eq!(n(&org, "rejected"), refused.len() as u64 + 20, "{org}");
    Ok(())
}

/// After `Connection: close` 429s (short requests, the reply grows the skb) every server-side
/// connection still ends: nginx sees the client's FIN and closes, and the org's connection count
/// returns to 0.
#[test]
fn refused_connections_close_cleanly() -> Result<()> {
    let mut w = World::with_nginx("closeclean", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 1"))?;
    w.start_daemon()?;
    let api = w.api4();
    let statuses = w.client(|| async move {
        let mut st = Vec::new();
        for i in 0..50 {
            let r = http_requests(acme, api, &[Request::get(format!("/s{i}"))], false).await?;
            st.push(r[0].status);
        }
        // And many at once: 16 rounds of 32 parallel connections.
        for round in 0..16 {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..32 {
                let req = vec![Request::get(format!("/p{round}/{i}"))];
                set.spawn(async move { http_requests(acme, api, &req, false).await });
            }
            while let Some(r) = set.join_next().await {
                st.push(r??[0].status);
            }
        }
        Ok(st)
    })?;
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 49 + 16 * 32);
    let org = w.wait_org("acme", |o| o["connections"] == 0)?;
    assert_eq!(n(&org, "rejected"), 49 + 16 * 32, "{org}");
    // And nginx holds no connection: none left established or half-closed on the server side.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            w.tb.netns(limiter_lab::testbed::Side::Server),
            "ss",
            "-tanH",
            "state",
            "established",
            "state",
            "close-wait",
        ])
        .output()?;
    let left = String::from_utf8_lossy(&out.stdout);
    assert!(
        left.trim().is_empty(),
        "server-side connections left: {left}"
    );
    Ok(())
}

/// Every socket's state lives in a slot picked by its cookie, or in a hash when that slot is
/// taken. With one slot for all (a test hook), one connection takes it and the others go to the
/// hash: all of them are counted, refused and released exactly, and connections opened after
/// they closed get their state too.
#[test]
fn sockets_that_share_a_slot_are_tracked_exactly() -> Result<()> {
    let mut w = World::new("slots", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.daemon_env
        .push(("LIMITER_TEST_SOCK_SLOTS".into(), "1".into()));
    w.write_config(
        "concurrent_connections = 100",
        &org_toml("acme", &[cidr(acme)], "daily_requests = 12"),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    // Long enough for a keep-alive 429, so each connection is refused and stays usable.
    let path = format!("/api/{}", "x".repeat(900));
    let get = Request::get(path.as_str());
    // The connections live in the client's runtime; the reports are read from inside it.
    let wr = &w;
    w.client(|| async move {
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(HttpConn::connect(Some(acme), api).await?);
        }
        for round in 0..3 {
            for c in conns.iter_mut() {
                assert_eq!(c.send(&get, true).await?.status, 200, "round {round}");
            }
        }
        let org = wr.wait_org("acme", |o| o["connections"] == 4)?;
        assert_eq!(n(&org, "requests"), 12, "{org}");
        // Over quota now: every connection, whichever table holds it, gets the kernel's 429.
        for c in conns.iter_mut() {
            let r = c.send(&get, true).await?;
            assert_daily_429(&r, "acme", 12);
            assert_eq!(r.header("Connection"), Some("keep-alive"));
        }
        drop(conns);
        let org = wr.wait_org("acme", |o| o["connections"] == 0)?;
        assert_eq!((n(&org, "requests"), n(&org, "rejected")), (12, 4), "{org}");
        assert_eq!(n(&org, "peak_connections"), 4, "{org}");
        // Opened after the others closed (their slot and hash entries freed): tracked as before.
        let mut a = HttpConn::connect(Some(acme), api).await?;
        let mut b = HttpConn::connect(Some(acme), api).await?;
        assert_eq!(a.send(&get, true).await?.status, 429);
        assert_eq!(b.send(&get, true).await?.status, 429);
        wr.wait_org("acme", |o| o["connections"] == 2)?;
        Ok(())
    })?;
    let org = w.wait_org("acme", |o| o["connections"] == 0)?;
    assert_eq!(n(&org, "rejected"), 6, "{org}");
    assert_eq!(
        w.served_from(acme)?.len(),
        12,
        "nothing refused reached the server"
    );
    let log = w.daemon_log();
    assert!(
        !log.contains("no_sock_state") && !log.contains("sock_state_full"),
        "every socket had its state: {log}"
    );
    Ok(())
}
