//! Orgs known by the client address a TLS terminator forwards: nginx terminating TLS with an
//! upstream keep-alive pool adds `X-Forwarded-For`, and each request counts for the org of its
//! own client, through the real kernel programs. Counts are checked against the API server's
//! log, and the spoofing attempts (a forged header behind the proxy, a header from a client that
//! is no trusted proxy) are shown to fail.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Result, ensure};
use integration_tests::{PROXY_UPSTREAM, World, cidr, identified_by, n, org_toml, statuses};
use limiter_lab::testbed::{AccessEntry, exchange_raw};

/// The client nginx names: the rightmost `X-Forwarded-For` entry (nginx appends its peer).
fn forwarded_client(e: &AccessEntry) -> Option<IpAddr> {
    e.forwarded
        .as_deref()?
        .rsplit(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn forwarded_through_nginx_tls_counts_each_request_for_its_client() -> Result<()> {
    let mut w = World::new("fwd_nginx", 4, 0)?;
    let c: Vec<IpAddr> = w.tb.clients_v4().iter().map(|&a| a.into()).collect();
    w.write_config_with(
        &format!(
            "identify_by = [\"forwarded\", \"address\"]\ntrusted_proxies = [{:?}]\n\
             forwarded_header = \"X-Forwarded-For\"\n",
            cidr(PROXY_UPSTREAM.ip())
        ),
        "",
        &[
            org_toml("acme", &[cidr(c[0]), cidr(c[1])], ""),
            org_toml("globex", &[cidr(c[2])], "daily_requests = 3"),
        ]
        .concat(),
    )?;
    w.start_daemon()?;
    w.start_nginx_tls()?;
    // c1 forges globex's address in its own X-Forwarded-For: nginx appends c1 after it.
    let forged = c[2].to_string();
    let replies = w.curl_all(&[
        w.curl(c[0], "a", 4, &[]),
        w.curl(c[1], "forged", 3, &[("X-Forwarded-For", &forged)]),
        w.curl(c[2], "g", 6, &[]),
        w.curl(c[3], "none", 2, &[]),
    ])?;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, 4 + 3 + 3 + 2), (429, 3)]),
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
    let served = |ips: &[IpAddr]| {
        log.iter()
            .filter(|e| forwarded_client(e).is_some_and(|ip| ips.contains(&ip)))
            .count() as u64
    };
    assert_eq!(served(&c[..2]), 7, "{log:?}");
    assert_eq!(served(&c[2..3]), 3, "{log:?}");
    let acme = w.org("acme")?;
    assert_eq!(n(&acme, "requests"), 7, "acme: {acme}");
    assert_eq!(identified_by(&acme, "forwarded"), 7, "acme: {acme}");
    let globex = w.org("globex")?;
    assert_eq!(
        (n(&globex, "requests"), n(&globex, "rejected")),
        (3, 3),
        "globex: {globex}"
    );
    assert_eq!(n(&w.org("unmapped")?, "requests"), 2);

    // A client that is no trusted proxy, straight to the API: its header is not believed.
    let (stranger, api) = (c[3], w.api4());
    let spoof = format!(
        "GET /spoof HTTP/1.1\r\nHost: api\r\nX-Forwarded-For: {}\r\nConnection: close\r\n\r\n",
        c[0]
    );
    let reply = w.client(|| async move { exchange_raw(stranger, api, spoof.as_bytes()).await })?;
    ensure!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(n(&w.org("acme")?, "requests"), 7);
    assert_eq!(n(&w.org("unmapped")?, "requests"), 3);
    Ok(())
}
