//! Orgs known by their API keys, end to end through the real kernel programs: each request is
//! attributed by its own key header, through nginx terminating TLS with an upstream keep-alive
//! pool (one upstream connection carries many orgs' requests) and from direct clients however
//! they frame their bytes. Counts are checked against the API server's own log, and the
//! attempts to get a request through uncounted, or counted for someone else, are tried.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use integration_tests::{World, cidr, identified_by, n, org_toml, org_without_cidrs, statuses};
use limiter_lab::testbed::{AccessEntry, HELD_PREFIX, SLOW_PREFIX, exchange_raw, open_idle};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEYS: [(&str, &str); 3] = [
    ("acme", "k-acme-1"),
    ("acme", "k-acme-2"),
    ("globex", "k-globex"),
];

/// `[api]` lines that know orgs by key first, then by address.
fn identify_api(keys: &std::path::Path) -> String {
    format!(
        "identify_by = [\"api_key\", \"address\"]\napi_keys_file = {:?}\n",
        keys.display().to_string()
    )
}

/// Served requests (garbage left out) by the key the app saw.
fn served_by_key(log: &[AccessEntry]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in log.iter().filter(|e| !e.is_garbage()) {
        *m.entry(e.api_key.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

/// Through nginx terminating TLS (its upstream keep-alive pool mixes every org's requests on a
/// few connections from 127.0.0.1, which is no org's address): each request counts for its own
/// key's org, an org over its quota gets the kernel's 429 naming it while the others are served,
/// and unknown keys fall through to the address (unmapped here) and are reported.
#[test]
fn api_keys_through_nginx_tls_count_each_request_for_its_key() -> Result<()> {
    let mut w = World::new("apikeys_nginx", 4, 0)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &identify_api(&keys),
        "",
        &[
            org_without_cidrs("acme", ""),
            org_without_cidrs("globex", "daily_requests = 3"),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_nginx_tls()?;
    let run = |src, tag, count, key| w.curl(src, tag, count, &[("X-API-Key", key)]);
    let replies = w.curl_all(&[
        run(c[0], "a1", 4, "k-acme-1"),
        run(c[1], "a2", 5, "k-acme-2"),
        run(c[2], "g", 6, "k-globex"),
        run(c[3], "x", 2, "k-nobody"),
    ])?;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, 4 + 5 + 3 + 2), (429, 3)]),
        "{replies:?}"
    );
    for r in replies[2].iter().filter(|r| r.status == 429) {
        ensure!(
            r.body.contains("globex"),
            "the 429 names its org: {}",
            r.body
        );
    }
    let log = w.server_entries()?;
    let by_key = served_by_key(&log);
    assert_eq!(
        by_key,
        BTreeMap::from([
            ("k-acme-1".into(), 4),
            ("k-acme-2".into(), 5),
            ("k-globex".into(), 3),
            ("k-nobody".into(), 2),
        ]),
        "{log:?}"
    );
    let acme = w.org("acme")?;
    assert_eq!(n(&acme, "requests"), 9, "acme: {acme}");
    assert_eq!(identified_by(&acme, "api_key"), 9, "acme: {acme}");
    let globex = w.org("globex")?;
    assert_eq!(
        (n(&globex, "requests"), n(&globex, "rejected")),
        (3, 3),
        "globex: {globex}"
    );
    // Refused requests too: `identified_by` counts every request by its source.
    assert_eq!(identified_by(&globex, "api_key"), 6, "globex: {globex}");
    let unmapped = w.org("unmapped")?;
    assert_eq!(
        (n(&unmapped, "requests"), n(&unmapped, "unknown_keys")),
        (2, 2),
        "unmapped: {unmapped}"
    );
    Ok(())
}

/// Writes `pieces` from `src` on one connection, each in its own segment, then reads until the
/// server closes (every request here says `Connection: close`) or 5 s pass.
async fn send_pieces(src: IpAddr, dst: SocketAddr, pieces: &[Vec<u8>]) -> Result<Vec<u8>> {
    let mut s = open_idle(src, dst).await?;
    s.set_nodelay(true)?;
    for p in pieces {
        if s.write_all(p).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    Ok(out)
}

fn request(path: &str, key_lines: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: api\r\n{key_lines}Connection: close\r\n\r\n").into_bytes()
}

fn status(reply: &[u8]) -> &str {
    std::str::from_utf8(reply.get(9..12).unwrap_or(b"---")).unwrap_or("???")
}

/// Direct clients: a key sent byte by byte or cut anywhere still counts for its org, and holds
/// its quota; an unknown key falls through to the client's address; only the first key header
/// is read, as the server reads it; two orgs' requests in one segment are refused whole (400).
#[test]
fn api_keys_from_direct_clients_however_framed() -> Result<()> {
    let mut w = World::new("apikeys_direct", 2, 0)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &identify_api(&keys),
        "",
        &[
            org_toml("acme", &[cidr(c[0])], ""),
            org_without_cidrs("globex", "daily_requests = 2"),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let (stranger, acme_host) = (c[1], c[0]);

    // globex's key from an address no org has, byte by byte, then cut inside the key, then
    // in one piece: its quota of 2 holds.
    let g = |i: usize| request(&format!("/g/{i}"), "X-API-Key: k-globex\r\n");
    let bytewise: Vec<Vec<u8>> = g(0).iter().map(|&b| vec![b]).collect();
    let cut = g(1);
    let at = cut
        .windows(5)
        .position(|x| x == b"globe")
        .context("key in request")?
        + 3;
    let replies = w.client(|| async move {
        Ok(vec![
            send_pieces(stranger, api, &bytewise).await?,
            send_pieces(stranger, api, &[cut[..at].to_vec(), cut[at..].to_vec()]).await?,
            exchange_raw(stranger, api, &g(2)).await?,
        ])
    })?;
    let got: Vec<&str> = replies.iter().map(|r| status(r)).collect();
    assert_eq!(got, ["200", "200", "429"]);
    let globex = w.org("globex")?;
    assert_eq!(
        (n(&globex, "requests"), n(&globex, "rejected")),
        (2, 1),
        "{globex}"
    );

    // An unknown key from acme's address counts for acme by address; the second of two key
    // headers is not read (the server reads the first).
    let replies = w.client(|| async move {
        Ok(vec![
            exchange_raw(acme_host, api, &request("/u", "X-API-Key: k-forged\r\n")).await?,
            exchange_raw(
                stranger,
                api,
                &request("/two", "X-API-Key: k-acme-1\r\nX-API-Key: k-globex\r\n"),
            )
            .await?,
        ])
    })?;
    let got: Vec<&str> = replies.iter().map(|r| status(r)).collect();
    assert_eq!(got, ["200", "200"]);

    // Long heads: the key after lines the kernel's scan skips on their first eight bytes
    // (`X-Request-Id`, `Traceparent`) or reads and rejects (`X-Api-Keyring`, globex's key);
    // right after the key line a Content-Length whose body looks like a request (the body is
    // no request). The kernel loads a chunk under 512 bytes whole, a longer one 256 bytes
    // first and then 512 at a time from where the walk stands: the key's value lies across
    // 256 and across 768 in chunks of over 512 bytes (a line after it makes them long), and
    // inside a 400-byte chunk.
    let long = |path: &str, to: usize, tail: usize| {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: api\r\nX-Request-Id: 5f0c6e1a\r\n\
             Traceparent: 00-4bf92f3577b34da6-01\r\nX-Api-Keyring: k-globex\r\nX-Pad: "
        );
        // The key's value starts three bytes before `to`.
        let pad = "p".repeat(to - 3 - head.len() - "\r\nX-API-Key: ".len());
        let body = "GET /hidden HTTP/1.1\r\n\r\n";
        let req = format!(
            "{head}{pad}\r\nX-API-Key: k-acme-2\r\nContent-Length: {}\r\n\
             X-After: {}\r\nConnection: close\r\n\r\n{body}",
            body.len(),
            "a".repeat(tail)
        );
        assert_eq!(req.find("k-acme-2"), Some(to - 3));
        req.into_bytes()
    };
    let replies = w.client(|| async move {
        let mut out = Vec::new();
        for (to, tail) in [(256, 300), (768, 100), (300, 1)] {
            let req = long(&format!("/long/{to}"), to, tail);
            assert!((req.len() > 512) == (tail > 1), "{}", req.len());
            out.push(exchange_raw(stranger, api, &req).await?);
        }
        Ok(out)
    })?;
    let got: Vec<&str> = replies.iter().map(|r| status(r)).collect();
    assert_eq!(got, ["200", "200", "200"]);
    let acme = w.org("acme")?;
    assert_eq!(
        (
            identified_by(&acme, "address"),
            identified_by(&acme, "api_key"),
            n(&acme, "requests"),
        ),
        (1, 4, 5),
        "{acme}"
    );
    assert_eq!(n(&w.org("unmapped")?, "unknown_keys"), 1);
    let log = w.server_entries()?;
    let two = log
        .iter()
        .find(|e| e.path == "/two")
        .context("/two served")?;
    assert_eq!(
        two.api_key.as_deref(),
        Some("k-acme-1"),
        "the server read the first"
    );

    // acme's and globex's requests in one segment: refused whole with a 400, none served.
    let mixed = [
        request("/mixed/a", "X-API-Key: k-acme-2\r\n"),
        request("/mixed/g", "X-API-Key: k-globex\r\n"),
    ]
    .concat();
    let reply = w.client(|| async move { exchange_raw(stranger, api, &mixed).await })?;
    assert_eq!(status(&reply), "400", "{}", String::from_utf8_lossy(&reply));
    let log = w.server_entries()?;
    assert!(!log.iter().any(|e| e.path.starts_with("/mixed")), "{log:?}");
    Ok(())
}

/// Behind nginx's pool, an org's concurrency is its requests in flight (the connections are
/// nginx's): four slow requests at once against a limit of 2 in reject mode get at least one
/// concurrency 429, never more than 2 are in flight, and once answered none stays counted;
/// the same after a daemon restart.
#[test]
fn api_keys_concurrency_is_requests_in_flight() -> Result<()> {
    let mut w = World::new("apikeys_inflight", 4, 0)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &identify_api(&keys),
        "",
        &[
            org_without_cidrs("acme", ""),
            org_without_cidrs(
                "globex",
                "concurrent_connections = 2\nconcurrency_mode = \"reject\"",
            ),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_nginx_tls()?;
    let (ok, refused) = slow_burst(&w, &c, "k-globex")?;
    let globex = w.org("globex")?;
    assert!(n(&globex, "peak_connections") <= 2, "{globex}");
    assert_eq!(n(&globex, "concurrency_rejected"), refused, "{globex}");
    assert_eq!(n(&globex, "requests"), ok, "{globex}");
    // Answered: nothing stays in flight, though nginx keeps its upstream connections open.
    w.wait_org("globex", |o| n(o, "connections") == 0)?;
    // acme, on the same pooled connections, is not held by globex's limit.
    let r = w.curl_all(&[slow(&w, c[0], "k-acme-1")])?;
    assert_eq!(statuses(&r), BTreeMap::from([(200, 1)]));
    // A restarted daemon's programs find the pooled connections' requests in flight as the
    // first's did (the socket storage is pinned with the socket tables): the limit still
    // holds, and answered requests still leave the count.
    w.stop_daemon()?;
    w.start_daemon()?;
    slow_burst(&w, &c, "k-globex")?;
    w.wait_org("globex", |o| n(o, "connections") == 0)?;
    assert!(n(&w.org("globex")?, "peak_connections") <= 2);
    Ok(())
}

/// A request with `key` under the test server's slow prefix, from `src`.
fn slow(w: &World, src: IpAddr, key: &str) -> limiter_lab::testbed::Curl {
    w.curl(src, SLOW_PREFIX.trim_matches('/'), 1, &[("X-API-Key", key)])
}

/// One slow request with `key` from each client at once: (answered, refused by the
/// concurrency limit), each at least one, and nothing else.
fn slow_burst(w: &World, clients: &[IpAddr], key: &str) -> Result<(u64, u64)> {
    let replies = w.curl_all(
        &clients
            .iter()
            .map(|&src| slow(w, src, key))
            .collect::<Vec<_>>(),
    )?;
    let got = statuses(&replies);
    let (ok, refused) = (
        got.get(&200).copied().unwrap_or(0),
        got.get(&429).copied().unwrap_or(0),
    );
    assert_eq!(ok + refused, clients.len() as u64, "{replies:?}");
    ensure!(refused >= 1 && ok >= 1, "{replies:?}");
    Ok((ok, refused))
}

/// Through HAProxy terminating TLS in TCP mode with PROXY v2 headers, keys come first: each
/// request counts for its key's org, and a request without a key for its client's address (in
/// the PROXY header), not HAProxy's.
#[test]
fn api_keys_through_haproxy_then_the_proxy_header() -> Result<()> {
    let mut w = World::with_proxy_protocol("apikeys_haproxy", 2, 0)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &format!(
            "identify_by = [\"api_key\", \"proxy_protocol\"]\napi_keys_file = {:?}\n\
             trusted_proxies = [{:?}]\n",
            keys.display().to_string(),
            cidr(integration_tests::PROXY_UPSTREAM.ip())
        ),
        "",
        &[
            org_toml("acme", &[cidr(c[0])], ""),
            org_without_cidrs("globex", ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_haproxy()?;
    let replies = w.curl_all(&[
        w.curl(c[0], "nokey", 3, &[]),
        w.curl(c[0], "g", 4, &[("X-API-Key", "k-globex")]),
        w.curl(c[1], "a", 2, &[("X-API-Key", "k-acme-1")]),
    ])?;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, 9)]),
        "{replies:?}"
    );
    let acme = w.org("acme")?;
    assert_eq!(
        (
            identified_by(&acme, "proxy_protocol"),
            identified_by(&acme, "api_key")
        ),
        (3, 2),
        "{acme}"
    );
    let globex = w.org("globex")?;
    assert_eq!(identified_by(&globex, "api_key"), 4, "{globex}");
    assert_eq!(n(&w.org("unmapped")?, "requests"), 0);
    Ok(())
}

/// Sends `req` on `s` and reads the response's status (the test server answers with a length).
async fn ask(s: &mut tokio::net::TcpStream, req: &[u8]) -> Result<u16> {
    use limiter_lab::testbed::{http::Parse, parse_response};
    s.write_all(req).await?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Parse::Done(r) = parse_response(&buf, "GET", false) {
            return Ok(r.response.status);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await??;
        ensure!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A reload that adds `api_key` reaches connections already open: the next request on a
/// keep-alive connection counts for its key's org, not its address's.
#[test]
fn api_keys_a_reload_reaches_open_connections() -> Result<()> {
    let mut w = World::new("apikeys_reload", 1, 0)?;
    let c: IpAddr = w.tb.clients_v4()[0].into();
    let keys = w.write_api_keys(&KEYS)?;
    let orgs = [
        org_toml("acme", &[cidr(c)], ""),
        org_toml("globex", &["10.99.0.0/24".to_string()], ""),
    ]
    .concat();
    w.write_config_with("", "", &orgs)?;
    w.start_daemon()?;
    let (api, exe, config) = (w.api4(), w.exe.clone(), w.config.clone());
    let next_config = {
        let path = w.dir().join("next.toml");
        std::fs::copy(&config, &path)?;
        let text = std::fs::read_to_string(&path)?.replacen(
            "[api]\n",
            &format!("[api]\n{}", identify_api(&keys)),
            1,
        );
        std::fs::write(&path, text)?;
        path
    };
    let req = keep_alive(request("/keep", "X-API-Key: k-globex\r\n"));
    let statuses = w.client(|| async move {
        let mut s = open_idle(c, api).await?;
        let first = ask(&mut s, &req).await?;
        std::fs::copy(&next_config, &config)?;
        let out = std::process::Command::new(&exe)
            .args(["reload", "--config"])
            .arg(&config)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let second = ask(&mut s, &req).await?;
        Ok((first, second))
    })?;
    assert_eq!(statuses, (200, 200));
    let acme = w.org("acme")?;
    let globex = w.org("globex")?;
    assert_eq!(
        (n(&acme, "requests"), n(&globex, "requests")),
        (1, 1),
        "acme: {acme}, globex: {globex}"
    );
    assert_eq!(identified_by(&globex, "api_key"), 1, "{globex}");
    Ok(())
}

/// `req` with `Connection: keep-alive` for its `Connection: close`.
fn keep_alive(req: Vec<u8>) -> Vec<u8> {
    String::from_utf8_lossy(&req)
        .replace("Connection: close", "Connection: keep-alive")
        .into_bytes()
}

/// One connection carries one org's request, then another org's before the first is answered
/// (a proxy that pipelines): the first org's request leaves its in-flight count when the
/// second's arrives, rather than stay counted until an answer that the second org's request
/// would then be charged for; the second's leaves at the next answer. Both orgs end with
/// nothing in flight.
#[test]
fn api_keys_another_orgs_request_settles_the_first() -> Result<()> {
    let mut w = World::new("apikeys_settle", 1, 0)?;
    let c: IpAddr = w.tb.clients_v4()[0].into();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &identify_api(&keys),
        "",
        &[
            org_without_cidrs("acme", ""),
            org_without_cidrs("globex", ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let path = format!("{SLOW_PREFIX}settle");
    let first = keep_alive(request(&path, "X-API-Key: k-acme-1\r\n"));
    let second = keep_alive(request(&path, "X-API-Key: k-globex\r\n"));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (mid, replies) = std::thread::scope(|scope| -> Result<_> {
        let w = &w;
        let client = scope.spawn(move || {
            w.client(|| async move {
                let mut s = open_idle(c, api).await?;
                s.set_nodelay(true)?;
                s.write_all(&first).await?;
                // The first head is counted (in flight) well before its answer, 1.5 s away.
                tokio::time::sleep(Duration::from_millis(200)).await;
                s.write_all(&second).await?;
                tx.send(())?;
                let mut out = Vec::new();
                let mut tmp = [0u8; 4096];
                while out.windows(8).filter(|x| x == b"HTTP/1.1").count() < 2 {
                    let n =
                        tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp)).await??;
                    ensure!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
                    out.extend_from_slice(&tmp[..n]);
                }
                Ok(String::from_utf8_lossy(&out).into_owned())
            })
        });
        rx.recv_timeout(Duration::from_secs(10))?;
        // Both heads are in, the first answer is still over a second away.
        let mid = w.wait_org("globex", |o| n(o, "connections") == 1)?;
        let acme = w.org("acme")?;
        let replies = client
            .join()
            .map_err(|_| anyhow::anyhow!("the client panicked"))??;
        Ok(((n(&acme, "connections"), n(&mid, "connections")), replies))
    })?;
    assert_eq!(
        mid,
        (0, 1),
        "(acme, globex) in flight after the second head"
    );
    assert_eq!(replies.matches("HTTP/1.1 200").count(), 2, "{replies}");
    let acme = w.wait_org("acme", |o| n(o, "connections") == 0)?;
    let globex = w.wait_org("globex", |o| n(o, "connections") == 0)?;
    assert_eq!(
        (n(&acme, "requests"), n(&globex, "requests")),
        (1, 1),
        "acme: {acme}, globex: {globex}"
    );
    assert_eq!(
        (n(&acme, "peak_connections"), n(&globex, "peak_connections")),
        (1, 1),
        "acme: {acme}, globex: {globex}"
    );
    Ok(())
}

/// Requests in flight across midnight: an org's requests that started before a day change stay
/// in its concurrency until they are answered (its limit in reject mode still holds, and the
/// report still shows them), then leave it, however far the clock went. After a step of three
/// days (the new day takes the day slot of the day the requests started), their answers take
/// nothing from the new day's requests in flight: the limit holds exactly as before.
#[test]
fn api_keys_requests_in_flight_across_midnight() -> Result<()> {
    let mut w = World::new("apikeys_midnight", 1, 0)?;
    let c: IpAddr = w.tb.clients_v4()[0].into();
    let keys = w.write_api_keys(&KEYS)?;
    w.write_config_with(
        &identify_api(&keys),
        "",
        &[
            org_without_cidrs("acme", ""),
            org_without_cidrs(
                "globex",
                "concurrent_connections = 2\nconcurrency_mode = \"reject\"",
            ),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    for days in [1, 3] {
        let step = (days * 86_400).to_string();
        let (after_step, third, answers) = held_pair(&w, c, || {
            let out = w.cli(&["debug", "advance-clock", &step])?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let after_step = n(&w.org("globex")?, "connections");
            let api = w.api4();
            let third = w.client(|| async move {
                exchange_raw(c, api, &request("/api/third", "X-API-Key: k-globex\r\n")).await
            })?;
            Ok((after_step, third))
        })
        .map(|((a, t), r)| (a, t, r))?;
        assert_eq!(
            answers.matches("HTTP/1.1 200").count(),
            2,
            "step {days}: {answers}"
        );
        if days == 1 {
            // Yesterday's requests still count, and still hold the limit.
            assert_eq!(after_step, 2, "step {days}");
            assert_eq!(
                status(&third),
                "429",
                "step {days}: {}",
                String::from_utf8_lossy(&third)
            );
        }
        let o = w.wait_org("globex", |o| n(o, "connections") == 0)?;
        // The day's peak counts the requests that started in it.
        assert!(n(&o, "peak_connections") <= 1, "step {days}: {o}");
    }
    // Two requests in flight on the new day reach the limit: the answers of the requests from
    // three days before took nothing from this day's count.
    let ((at_limit, third), answers) = held_pair(&w, c, || {
        let api = w.api4();
        let third = w.client(|| async move {
            exchange_raw(c, api, &request("/api/third", "X-API-Key: k-globex\r\n")).await
        })?;
        Ok((n(&w.org("globex")?, "connections"), third))
    })?;
    assert_eq!(at_limit, 2);
    assert_eq!(status(&third), "429", "{}", String::from_utf8_lossy(&third));
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    w.wait_org("globex", |o| n(o, "connections") == 0)?;
    Ok(())
}

/// Two held requests of globex on two connections from `src`: once both are in flight, runs
/// `meanwhile`; returns what it gave and both answers.
fn held_pair<T: Send>(
    w: &World,
    src: IpAddr,
    meanwhile: impl FnOnce() -> Result<T>,
) -> Result<(T, String)> {
    let api = w.api4();
    let path = format!("{HELD_PREFIX}pair");
    let req = request(&path, "X-API-Key: k-globex\r\n");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| -> Result<_> {
        let client = scope.spawn(move || {
            w.client(|| async move {
                let mut conns = Vec::new();
                for _ in 0..2 {
                    let mut s = open_idle(src, api).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&req).await?;
                    conns.push(s);
                }
                tx.send(())?;
                let mut out = String::new();
                for mut s in conns {
                    let mut reply = Vec::new();
                    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
                        .await??;
                    out.push_str(&String::from_utf8_lossy(&reply));
                }
                Ok(out)
            })
        });
        rx.recv_timeout(Duration::from_secs(10))?;
        w.wait_org("globex", |o| n(o, "connections") == 2)?;
        let got = meanwhile();
        let answers = client
            .join()
            .map_err(|_| anyhow::anyhow!("the client panicked"))??;
        Ok((got?, answers))
    })
}
