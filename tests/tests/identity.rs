//! Orgs known the way API platforms know them, end to end with real peers: API keys over HTTPS
//! through an nginx TLS terminator whose upstream keep-alive pool carries many orgs' requests,
//! forwarded addresses through the same nginx, PROXY protocol v2 headers from HAProxy, and the
//! spoofing attempts that must fail (a forwarded or PROXY header from an untrusted peer, a
//! second PROXY header, a forged key). Counts are checked against the API server's own log.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, ensure};
use integration_tests::{
    PROXY_UPSTREAM, TLS_PORT, World, cidr, identified_by, n, org_toml, org_without_cidrs,
};
use limiter_lab::testbed::http::Parse;
use limiter_lab::testbed::{
    AccessEntry, Curl, CurlReply, exchange_raw, parse_response, proxy_v1_header, proxy_v2_header,
};
use serde_json::Value;

/// The `trusted_proxies` entry: the peers reach the API over the loopback.
fn trusted() -> String {
    cidr(PROXY_UPSTREAM.ip())
}

/// A header long enough that the kernel's 429 carries its full problem+json body (a shorter
/// request gets the compact 429, which has no body to name the org).
fn pad() -> (String, String) {
    ("X-Pad".into(), "p".repeat(800))
}

/// `count` HTTPS GETs of `/<tag>/<i>` from `src`, one curl process (keep-alive).
fn curl(w: &World, src: IpAddr, tag: &str, count: usize, headers: &[(String, String)]) -> Curl {
    Curl {
        src,
        urls: (0..count)
            .map(|i| w.https_url(&format!("/{tag}/{i}")))
            .collect(),
        headers: headers.to_vec(),
        ca: w.dir().join("api.crt"),
    }
}

fn key_header(key: &str) -> (String, String) {
    ("X-API-Key".into(), key.into())
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

/// The statuses of every reply, counted.
fn statuses(replies: &[Vec<CurlReply>]) -> BTreeMap<u16, u64> {
    let mut m = BTreeMap::new();
    for r in replies.iter().flatten() {
        *m.entry(r.status).or_insert(0) += 1;
    }
    m
}

/// Every identification source of a report entry, for messages and zero checks.
fn sources(o: &Value) -> [u64; 4] {
    ["address", "proxy_protocol", "forwarded", "api_key"].map(|s| identified_by(o, s))
}

/// Two orgs known by their API keys over HTTPS through nginx: several curl clients per org share
/// nginx's upstream keep-alive pool, so one upstream connection carries both orgs' requests.
/// Each org's count and `identified_by.api_key` equal the API server's log of its keys; under a
/// small quota the 429s (kernel-made, passed back by nginx) name the right org and the other org
/// is unaffected.
#[test]
fn identity_api_keys_through_nginx_tls_count_per_org() -> Result<()> {
    let mut w = World::new("identity_api_key_nginx", 4, 0)?;
    let c = w.tb.clients_v4().to_vec();
    let acme_keys = ["acme-live-4f1c2b9e7d", "acme-ci-0a8e3d5c6b"];
    let globex_keys = ["globex-prod-77e1a0c3f9", "globex-etl-5b2d9c4e81"];
    let keys_file = w.write_api_keys(&[
        ("acme", acme_keys[0]),
        ("acme", acme_keys[1]),
        ("globex", globex_keys[0]),
        ("globex", globex_keys[1]),
    ])?;
    let acme_limit = 7;
    w.write_config_with(
        &format!(
            "identify_by = [\"api_key\", \"address\"]\ntrusted_proxies = [{:?}]\n\
             api_key_header = \"X-API-Key\"\napi_keys_file = {:?}\n",
            trusted(),
            keys_file.display().to_string()
        ),
        "",
        &[
            org_without_cidrs("acme", &format!("daily_requests = {acme_limit}")),
            org_without_cidrs("globex", ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_nginx_tls()?;

    // Four clients at once, two per org, each on its own key and address; acme asks for more
    // than its quota.
    let per_client = 6;
    let runs: Vec<Curl> = [
        (c[0], acme_keys[0], "acme-a"),
        (c[1], acme_keys[1], "acme-b"),
        (c[2], globex_keys[0], "globex-a"),
        (c[3], globex_keys[1], "globex-b"),
    ]
    .iter()
    .map(|&(src, key, tag)| curl(&w, src.into(), tag, per_client, &[key_header(key), pad()]))
    .collect();
    let replies = w.curl_all(&runs)?;

    let acme_replies: Vec<_> = replies[..2].to_vec();
    let globex_replies: Vec<_> = replies[2..].to_vec();
    let acme_sent = (2 * per_client) as u64;
    let acme_st = statuses(&acme_replies);
    assert_eq!(
        acme_st,
        BTreeMap::from([(200, acme_limit), (429, acme_sent - acme_limit)]),
        "acme: exactly its quota passes"
    );
    assert_eq!(
        statuses(&globex_replies),
        BTreeMap::from([(200, (2 * per_client) as u64)]),
        "globex is unaffected by acme's quota"
    );
    for r in acme_replies.iter().flatten().filter(|r| r.status == 429) {
        let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| {
            panic!(
                "the 429 through nginx has no problem+json body ({e}): {:?}",
                r.body
            )
        });
        assert_eq!(
            body["detail"],
            format!("acme has used its {acme_limit} API calls for today"),
            "the 429 names the org whose key was refused"
        );
    }

    // The API server's log, by key: what each org really got.
    let log = w.server_entries()?;
    let by_key = served_by(&log, |e| e.api_key.clone());
    let served = |keys: &[&str]| {
        keys.iter()
            .map(|k| by_key.get(*k).copied().unwrap_or(0))
            .sum::<u64>()
    };
    assert!(
        log.iter().all(|e| e.client == PROXY_UPSTREAM.ip()),
        "every request reached the API from nginx: {log:?}"
    );
    let acme = w.org("acme")?;
    let globex = w.org("globex")?;
    assert_eq!(n(&acme, "requests"), served(&acme_keys), "acme: {acme}");
    assert_eq!(n(&acme, "requests"), acme_limit, "acme: {acme}");
    assert_eq!(n(&acme, "rejected"), acme_sent - acme_limit, "acme: {acme}");
    assert_eq!(
        sources(&acme),
        [0, 0, 0, acme_sent],
        "acme is known by its keys alone, refused requests included: {acme}"
    );
    assert_eq!(
        n(&globex, "requests"),
        served(&globex_keys),
        "globex: {globex}"
    );
    assert_eq!(
        n(&globex, "requests"),
        (2 * per_client) as u64,
        "globex: {globex}"
    );
    assert_eq!(n(&globex, "rejected"), 0, "globex: {globex}");
    assert_eq!(
        sources(&globex),
        [0, 0, 0, (2 * per_client) as u64],
        "globex: {globex}"
    );
    let unmapped = w.org("unmapped")?;
    assert_eq!(
        n(&unmapped, "requests"),
        0,
        "nothing went unattributed: {unmapped}"
    );
    assert_eq!(n(&unmapped, "unknown_keys"), 0, "{unmapped}");
    Ok(())
}

/// Orgs known by their clients' addresses behind the nginx TLS terminator: nginx is the only
/// trusted proxy and adds `X-Forwarded-For`, so each request counts for the org of the address
/// (IPv4 or IPv6) that sent it, although all of them reach the API from nginx over shared
/// connections.
#[test]
fn identity_forwarded_through_nginx_tls_counts_the_real_client() -> Result<()> {
    let mut w = World::new("identity_forwarded_nginx", 3, 1)?;
    let c6: IpAddr = w.tb.clients_v6()[0].into();
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    w.write_config_with(
        &format!(
            "identify_by = [\"forwarded\", \"address\"]\ntrusted_proxies = [{:?}]\n\
             forwarded_header = \"X-Forwarded-For\"\n",
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
    w.start_nginx_tls()?;

    let counts = [5, 4, 6];
    let mut runs: Vec<Curl> = c
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (&src, k))| curl(&w, src, &format!("c{i}"), k, &[]))
        .collect();
    let v6_count = 3;
    runs.push(Curl {
        urls: (0..v6_count)
            .map(|i| format!("https://[{}]:{TLS_PORT}/v6/{i}", w.tb.server_v6()))
            .collect(),
        ..curl(&w, c6, "v6", 0, &[])
    });
    let replies = w.curl_all(&runs)?;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, (counts.iter().sum::<usize>() + v6_count) as u64)])
    );

    // nginx wrote each client's address into X-Forwarded-For; the API saw only nginx.
    let log = w.server_entries()?;
    assert!(
        log.iter().all(|e| e.client == PROXY_UPSTREAM.ip()),
        "{log:?}"
    );
    let by_client = served_by(&log, |e| {
        e.forwarded
            .as_deref()
            .and_then(|v| v.rsplit(',').next())
            .and_then(|a| a.trim().parse::<IpAddr>().ok())
    });
    let served = |ips: &[IpAddr]| {
        ips.iter()
            .map(|ip| by_client.get(ip).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let acme = w.org("acme")?;
    let globex = w.org("globex")?;
    assert_eq!(served(&c[..2]), (counts[0] + counts[1]) as u64, "{log:?}");
    assert_eq!(n(&acme, "requests"), served(&c[..2]), "acme: {acme}");
    assert_eq!(
        sources(&acme),
        [0, 0, n(&acme, "requests"), 0],
        "acme: {acme}"
    );
    assert_eq!(served(&[c6]), v6_count as u64, "{log:?}");
    assert_eq!(
        n(&globex, "requests"),
        served(&[c[2], c6]),
        "globex: {globex}"
    );
    assert_eq!(
        n(&globex, "requests"),
        (counts[2] + v6_count) as u64,
        "globex: {globex}"
    );
    assert_eq!(
        sources(&globex),
        [0, 0, n(&globex, "requests"), 0],
        "globex: {globex}"
    );
    assert_eq!(n(&w.org("unmapped")?, "requests"), 0);
    Ok(())
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
        .map(|(i, (&src, k))| curl(&w, src, &format!("c{i}"), k, &[]))
        .collect();
    // The IPv6 client reaches HAProxy's IPv6 address.
    let v6_count = 3;
    runs.push(Curl {
        urls: (0..v6_count)
            .map(|i| format!("https://[{}]:{TLS_PORT}/v6/{i}", w.tb.server_v6()))
            .collect(),
        ..curl(&w, c6, "v6", 0, &[])
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

/// An `X-Forwarded-For` sent straight to the API port by a client that is not a trusted proxy
/// is not believed: the request counts for the org of the address that sent it, never for the
/// org the header names.
#[test]
fn identity_forwarded_header_from_an_untrusted_client_is_not_believed() -> Result<()> {
    let mut w = World::new("identity_xff_spoof", 2, 0)?;
    let (mallory, victim): (IpAddr, IpAddr) =
        (w.tb.clients_v4()[0].into(), w.tb.clients_v4()[1].into());
    w.write_config_with(
        &format!(
            "identify_by = [\"forwarded\", \"address\"]\ntrusted_proxies = [{:?}]\n\
             forwarded_header = \"X-Forwarded-For\"\n",
            trusted()
        ),
        "",
        &[
            org_toml("mallory", &[cidr(mallory)], ""),
            org_toml("victim", &[cidr(victim)], ""),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let sent = 4;
    let answers = w.client(|| async move {
        let mut out = Vec::new();
        for i in 0..sent {
            // A forged chain, as a client would write it, and one naming only the victim.
            let xff = if i % 2 == 0 {
                format!("X-Forwarded-For: {victim}\r\n")
            } else {
                format!("X-Forwarded-For: {victim}, {}\r\n", PROXY_UPSTREAM.ip())
            };
            out.push(exchange_raw(mallory, api, &raw_get(&format!("/xff/{i}"), api, &xff)).await?);
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
    let log = w.served_from(mallory)?;
    assert_eq!(log.len(), sent, "{log:?}");
    assert!(log.iter().all(|e| {
        e.forwarded
            .as_deref()
            .is_some_and(|v| v.contains(&victim.to_string()))
    }));
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

/// A PROXY header sent straight to the API port by a client that is not a trusted proxy is not
/// believed (v1 and v2): the app reads it (it expects one on every connection, like nginx's
/// `listen … proxy_protocol`), but the kernel counts the request for the org of the address that
/// sent it, never for the org the header names.
#[test]
fn identity_proxy_header_from_an_untrusted_client_is_not_believed() -> Result<()> {
    let mut w = World::with_proxy_protocol("identity_proxy_spoof", 2, 0)?;
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
    let mut w = World::with_proxy_protocol("identity_proxy_stacked", 2, 0)?;
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
    let replies = w.tb.curl(&curl(&w, mallory.into(), "plain", plain, &[]))?;
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

/// Keys no org has (one a real key with a character changed, one made up) are counted as
/// unmapped with `unknown_keys`, never for the org whose key they resemble, however many
/// requests carry them.
#[test]
fn identity_forged_api_keys_count_as_unmapped() -> Result<()> {
    let mut w = World::new("identity_forged_key", 2, 0)?;
    let key = "acme-live-4f1c2b9e7d";
    let keys_file = w.write_api_keys(&[("acme", key)])?;
    w.write_config_with(
        &format!(
            "identify_by = [\"api_key\", \"address\"]\ntrusted_proxies = [{:?}]\n\
             api_key_header = \"X-API-Key\"\napi_keys_file = {:?}\n",
            trusted(),
            keys_file.display().to_string()
        ),
        "",
        &org_without_cidrs("acme", "daily_requests = 1000"),
    )?;
    w.start_daemon()?;
    w.start_nginx_tls()?;
    let c = w.tb.clients_v4().to_vec();
    let (forged, real) = (5, 2);
    let runs = [
        curl(
            &w,
            c[0].into(),
            "near",
            forged,
            &[key_header("acme-live-4f1c2b9e7e")],
        ),
        curl(
            &w,
            c[1].into(),
            "made-up",
            forged,
            &[key_header("0000000000000000")],
        ),
        curl(&w, c[1].into(), "real", real, &[key_header(key)]),
    ];
    let replies = w.curl_all(&runs)?;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, (2 * forged + real) as u64)])
    );
    let log = w.server_entries()?;
    let by_key = served_by(&log, |e| e.api_key.clone());
    let acme = w.org("acme")?;
    let unmapped = w.org("unmapped")?;
    let real_served = by_key.get(key).copied().unwrap_or(0);
    assert_eq!(real_served, real as u64, "{log:?}");
    assert_eq!(n(&acme, "requests"), real_served, "acme: {acme}");
    assert_eq!(sources(&acme), [0, 0, 0, real as u64], "acme: {acme}");
    let forged_served = by_key.values().sum::<u64>() - real_served;
    assert_eq!(forged_served, (2 * forged) as u64, "{log:?}");
    assert_eq!(
        n(&unmapped, "requests"),
        forged_served,
        "unmapped: {unmapped}"
    );
    assert_eq!(
        n(&unmapped, "unknown_keys"),
        forged_served,
        "unmapped: {unmapped}"
    );
    Ok(())
}
