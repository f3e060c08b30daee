//! Orgs known the way a load balancer in front of the API knows them, end to end with real
//! peers: PROXY protocol v2 headers from HAProxy terminating TLS, and the spoofing attempts that
//! must fail (a PROXY header from an untrusted peer, a second PROXY header). Counts are checked
//! against the API server's own log. (API keys: tests/tests/api_keys.rs.)

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Result, ensure};
use integration_tests::{
    PROXY_UPSTREAM, TLS_PORT, World, cidr, identified_by, n, org_toml, statuses,
};
use limiter_lab::testbed::http::Parse;
use limiter_lab::testbed::{
    AccessEntry, Curl, exchange_raw, parse_response, proxy_v1_header, proxy_v2_header,
};
use serde_json::Value;

/// The `trusted_proxies` entry: the peers reach the API over the loopback.
fn trusted() -> String {
    cidr(PROXY_UPSTREAM.ip())
}

/// Served requests (garbage lines left out) counted by `who`.
fn served_by<K: Ord>(
    log: &[AccessEntry],
    who: impl Fn(&AccessEntry) -> Option<K>,
) -> BTreeMap<K, u64> {
    let mut m = BTreeMap::new();
    for e in log.iter().filter(|e| !e.is_garbage()) {
        if let Some(k) = who(e) {
            *m.entry(k).or_insert(0) += 1;
        }
    }
    m
}

/// Every identification source of a report entry, for messages and zero checks.
fn sources(o: &Value) -> [u64; 4] {
    ["address", "proxy_protocol", "forwarded", "api_key"].map(|s| identified_by(o, s))
}

/// Orgs known by their clients' addresses behind HAProxy, which terminates TLS in TCP mode and
/// sends a PROXY v2 header on each connection: every request counts for the org of the address
/// in the header (IPv4 and IPv6), and the header reaches the app untouched (the app parsed it:
/// its log names the same client, with HAProxy as the peer).
#[test]
fn identity_proxy_protocol_through_haproxy_counts_the_real_client() -> Result<()> {
    let mut w = World::with_proxy_protocol("identity_proxy_haproxy", 3, 1)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    let c6: IpAddr = w.tb.clients_v6()[0].into();
    w.write_config_with(
        &format!(
            "identify_by = [\"proxy_protocol\", \"address\"]\ntrusted_proxies = [{:?}]\n",
            trusted()
        ),
        "",
        &[
            org_toml("acme", &[cidr(c[0]), cidr(c[1])], ""),
            org_toml("globex", &[cidr(c[2]), cidr(c6)], ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_haproxy()?;

    let counts = [4, 3, 5];
    let mut runs: Vec<Curl> = c
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (&src, k))| w.curl(src, &format!("c{i}"), k, &[]))
        .collect();
    // The IPv6 client reaches HAProxy's IPv6 address.
    let v6_count = 3;
    runs.push(Curl {
        urls: (0..v6_count)
            .map(|i| format!("https://[{}]:{TLS_PORT}/v6/{i}", w.tb.server_v6()))
            .collect(),
        ..w.curl(c6, "v6", 0, &[])
    });
    let replies = w.curl_all(&runs)?;
    let sent = counts.iter().sum::<usize>() + v6_count;
    assert_eq!(statuses(&replies), BTreeMap::from([(200, sent as u64)]));

    let log = w.server_entries()?;
    assert!(
        log.iter()
            .all(|e| e.peer == PROXY_UPSTREAM.ip() && !e.is_garbage()),
        "every connection came from HAProxy with a header the app read: {log:?}"
    );
    let by_client = served_by(&log, |e| Some(e.client));
    let served = |ips: &[IpAddr]| {
        ips.iter()
            .map(|ip| by_client.get(ip).copied().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(served(&c[..2]), (counts[0] + counts[1]) as u64, "{log:?}");
    assert_eq!(served(&[c6]), v6_count as u64, "{log:?}");
    let acme = w.org("acme")?;
    let globex = w.org("globex")?;
    assert_eq!(n(&acme, "requests"), served(&c[..2]), "acme: {acme}");
    assert_eq!(
        sources(&acme),
        [0, n(&acme, "requests"), 0, 0],
        "acme: {acme}"
    );
    assert_eq!(
        n(&globex, "requests"),
        served(&[c[2], c6]),
        "globex: {globex}"
    );
    assert_eq!(
        sources(&globex),
        [0, n(&globex, "requests"), 0, 0],
        "globex: {globex}"
    );
    assert_eq!(n(&w.org("unmapped")?, "requests"), 0);
    Ok(())
}

/// A hand-made keep-alive-free GET with extra header lines.
fn raw_get(path: &str, host: SocketAddr, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

/// A world for the spoofing tests: orgs `mallory` and `victim` at the two client addresses,
/// known by a trusted PROXY header and then by address, the daemon started.
fn spoof_world(name: &str) -> Result<(World, Ipv4Addr, Ipv4Addr)> {
    let mut w = World::with_proxy_protocol(name, 2, 0)?;
    let (mallory, victim) = (w.tb.clients_v4()[0], w.tb.clients_v4()[1]);
    w.write_config_with(
        &format!(
            "identify_by = [\"proxy_protocol\", \"address\"]\ntrusted_proxies = [{:?}]\n",
            trusted()
        ),
        "",
        &[
            org_toml("mallory", &[cidr(mallory.into())], ""),
            org_toml("victim", &[cidr(victim.into())], ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    Ok((w, mallory, victim))
}

/// A PROXY header sent straight to the API port by a client that is not a trusted proxy is not
/// believed (v1 and v2): the app reads it (it expects one on every connection, like nginx's
/// `listen … proxy_protocol`), but the kernel counts the request for the org of the address that
/// sent it, never for the org the header names.
#[test]
fn identity_proxy_header_from_an_untrusted_client_is_not_believed() -> Result<()> {
    let (w, mallory, victim) = spoof_world("identity_proxy_spoof")?;
    let api = w.api4();
    let v1 = proxy_v1_header(SocketAddr::from((victim, 40000)), api);
    let v2 = proxy_v2_header(SocketAddr::from((victim, 40001)), api)?;
    let sent = 4;
    let answers = w.client(|| async move {
        let mut out = Vec::new();
        for i in 0..sent {
            let header = if i % 2 == 0 { &v1 } else { &v2 };
            let bytes = [header.as_slice(), &raw_get(&format!("/pp/{i}"), api, "")].concat();
            out.push(exchange_raw(mallory.into(), api, &bytes).await?);
        }
        Ok(out)
    })?;
    for a in &answers {
        ensure!(
            a.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(a)
        );
    }
    // The app believed the header (its log names the victim); the kernel must not.
    let log = w.server_entries()?;
    let from_mallory: Vec<_> = log
        .iter()
        .filter(|e| e.peer == IpAddr::from(mallory))
        .collect();
    assert_eq!(from_mallory.len(), sent, "{log:?}");
    assert!(
        from_mallory
            .iter()
            .all(|e| e.client == IpAddr::from(victim) && !e.is_garbage())
    );
    let m = w.org("mallory")?;
    let v = w.org("victim")?;
    assert_eq!(n(&m, "requests"), sent as u64, "mallory: {m}");
    assert_eq!(
        sources(&m),
        [sent as u64, 0, 0, 0],
        "counted by address: {m}"
    );
    assert_eq!(n(&v, "requests"), 0, "victim: {v}");
    assert_eq!(sources(&v), [0; 4], "victim: {v}");
    Ok(())
}

/// A client behind HAProxy that sends its own PROXY header (inside TLS, so it follows
/// HAProxy's): the second header is not believed. The request behind it is refused (by the
/// kernel, which cannot follow the stream, or by the app, for which a PROXY line is not a
/// request), and the count never moves to the forged address; the same client's plain requests
/// still count for its own org.
#[test]
fn identity_second_proxy_header_is_not_believed() -> Result<()> {
    let (w, mallory, victim) = spoof_world("identity_proxy_stacked")?;
    let cert = w.start_haproxy()?;
    let tls = w.tls4();
    let v1 = proxy_v1_header(SocketAddr::from((victim, 40000)), tls);
    let v2 = proxy_v2_header(SocketAddr::from((victim, 40001)), tls)?;
    for header in [&v1, &v2] {
        let bytes = [header.as_slice(), &raw_get("/stacked", tls, "")].concat();
        let answer = w.tb.tls_raw(mallory.into(), tls, &cert.cert, &bytes)?;
        let status = match parse_response(&answer, "GET", true) {
            Parse::Done(r) => r.response.status,
            _ => 0,
        };
        assert!(
            answer.is_empty() || status >= 400,
            "a stacked PROXY header was not refused: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Plain requests from the same client, through the same HAProxy.
    let plain = 3;
    let replies = w.tb.curl(&w.curl(mallory.into(), "plain", plain, &[]))?;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");

    let log = w.server_entries()?;
    assert!(
        log.iter().all(|e| e.client != IpAddr::from(victim)),
        "the app never took the stacked header for the client: {log:?}"
    );
    assert!(
        log.iter().all(|e| e.path != "/stacked"),
        "no stacked request was served: {log:?}"
    );
    assert!(
        log.iter()
            .all(|e| e.client == IpAddr::from(mallory) && e.peer == PROXY_UPSTREAM.ip()),
        "what the app saw came from HAProxy, for mallory: {log:?}"
    );
    assert_eq!(
        w.served_from(mallory.into())?
            .iter()
            .filter(|e| !e.is_garbage())
            .count(),
        plain
    );
    let m = w.org("mallory")?;
    let v = w.org("victim")?;
    assert_eq!(n(&m, "requests"), plain as u64, "mallory: {m}");
    assert_eq!(
        identified_by(&m, "proxy_protocol"),
        plain as u64,
        "mallory: {m}"
    );
    assert_eq!(n(&v, "requests"), 0, "victim: {v}");
    assert_eq!(n(&v, "rejected"), 0, "victim: {v}");
    assert_eq!(n(&v, "unparsed"), 0, "victim: {v}");
    assert_eq!(sources(&v), [0; 4], "victim: {v}");
    Ok(())
}
