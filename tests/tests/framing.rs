//! Framing as an attacker would try it: the same request sequences, cut every way a client can
//! cut them (every split offset of a head, a byte at a time, 1–50 requests pipelined per write,
//! random bodies with `Content-Length` and chunked coding, empty lines before request lines),
//! go through the kernel's stream parser and the test server's own parser, and the counts must
//! agree exactly. Under a small quota, the server never serves more than the quota.

use std::{net::IpAddr, time::Duration};

use anyhow::Result;
use integration_tests::{World, cidr, n, org_toml};
use limiter_lab::testbed::{AccessEntry, open_idle};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A small deterministic generator (xorshift64*): the same sequences on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a request is for the quota.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counted,
    Media,
}

/// A request as bytes, and its kind.
struct Req {
    bytes: Vec<u8>,
    kind: Kind,
}

/// A request body that looks like requests, so a parser that loses the framing counts it.
fn body_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let fake = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    (0..len)
        .map(|i| {
            if rng.below(4) == 0 {
                b"\r\n"[i % 2]
            } else {
                fake[i % fake.len()]
            }
        })
        .collect()
}

fn request(rng: &mut Rng, i: usize) -> Req {
    let eol = if rng.below(5) == 0 { "\n" } else { "\r\n" };
    let lead = "\r\n".repeat(rng.below(3) as usize);
    let host = format!("Host: api.example{eol}User-Agent: framing/{i}{eol}");
    match rng.below(6) {
        0 | 1 => Req {
            bytes: format!("{lead}GET /api/items/{i} HTTP/1.1{eol}{host}{eol}").into_bytes(),
            kind: Kind::Counted,
        },
        2 => Req {
            bytes: format!("{lead}GET /media/img/{i}.png HTTP/1.1{eol}{host}{eol}").into_bytes(),
            kind: Kind::Media,
        },
        3 => {
            let len = rng.below(3000) as usize;
            let body = body_bytes(rng, len);
            let mut b = format!(
                "{lead}POST /api/data/{i} HTTP/1.1{eol}{host}cOnTeNt-LeNgTh: {}{eol}{eol}",
                body.len()
            )
            .into_bytes();
            b.extend(body);
            Req {
                bytes: b,
                kind: Kind::Counted,
            }
        }
        4 => {
            let mut b = format!(
                "{lead}PUT /api/chunked/{i} HTTP/1.1{eol}{host}Transfer-Encoding: chunked{eol}{eol}"
            )
            .into_bytes();
            for _ in 0..rng.below(4) {
                let len = 1 + rng.below(700) as usize;
                let chunk = body_bytes(rng, len);
                b.extend(format!("{:X};ext=\"x\"\r\n", chunk.len()).bytes());
                b.extend(chunk);
                b.extend(b"\r\n");
            }
            b.extend(b"0\r\nX-Trailer: GET / HTTP/1.1\r\n\r\n");
            Req {
                bytes: b,
                kind: Kind::Counted,
            }
        }
        _ => Req {
            bytes: format!(
                "{lead}DELETE /api/items/{i} HTTP/1.0{eol}{host}Connection: keep-alive{eol}\
                 Expect: 100-continue{eol}{eol}"
            )
            .into_bytes(),
            kind: Kind::Counted,
        },
    }
}

/// One connection's bytes, cut into the writes the client makes.
struct Conn {
    writes: Vec<Vec<u8>>,
    counted: u64,
    media: u64,
}

impl Conn {
    fn of(reqs: &[Req], cuts: impl FnOnce(usize) -> Vec<usize>) -> Conn {
        let bytes: Vec<u8> = reqs.iter().flat_map(|r| r.bytes.iter().copied()).collect();
        let mut points = cuts(bytes.len());
        points.retain(|p| *p > 0 && *p < bytes.len());
        points.sort_unstable();
        points.dedup();
        let mut writes = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            writes.push(bytes[last..p].to_vec());
            last = p;
        }
        Conn {
            writes,
            counted: reqs.iter().filter(|r| r.kind == Kind::Counted).count() as u64,
            media: reqs.iter().filter(|r| r.kind == Kind::Media).count() as u64,
        }
    }
}

/// The connections of every framing, with what they carry.
fn framings(seed: u64) -> Vec<Conn> {
    let mut rng = Rng(seed);
    let mut conns = Vec::new();
    let mut i = 0;
    let mut next = |rng: &mut Rng| {
        i += 1;
        request(rng, i)
    };
    // Every split offset of one head (a GET, a media GET, a POST with its body).
    for template in 0..3 {
        let r = loop {
            let r = next(&mut rng);
            let want = match template {
                0 => r.bytes.starts_with(b"GET /api"),
                1 => r.kind == Kind::Media && r.bytes.starts_with(b"GET"),
                _ => r.bytes.starts_with(b"POST") && r.bytes.len() < 400,
            };
            if want {
                break r;
            }
        };
        for k in 1..r.bytes.len() {
            let copy = Req {
                bytes: r.bytes.clone(),
                kind: r.kind,
            };
            conns.push(Conn::of(&[copy], |_| vec![k]));
        }
    }
    // A byte at a time.
    let reqs: Vec<Req> = (0..4).map(|_| next(&mut rng)).collect();
    conns.push(Conn::of(&reqs, |len| (1..len).collect()));
    // 1 to 50 requests pipelined in one write.
    for count in 1..=50 {
        let reqs: Vec<Req> = (0..count).map(|_| next(&mut rng)).collect();
        conns.push(Conn::of(&reqs, |_| Vec::new()));
    }
    // Random sequences cut at random points.
    for _ in 0..40 {
        let reqs: Vec<Req> = (0..1 + rng.below(12)).map(|_| next(&mut rng)).collect();
        let cuts = 1 + rng.below(12) as usize;
        let mut points = Vec::new();
        let total: usize = reqs.iter().map(|r| r.bytes.len()).sum();
        for _ in 0..cuts {
            points.push(rng.below(total as u64) as usize);
        }
        conns.push(Conn::of(&reqs, |_| points));
    }
    conns
}

/// Sends one connection's writes from `src` with a pause after each (so they arrive as
/// separate segments), half-closes and reads until the server closes.
async fn play(src: IpAddr, dst: std::net::SocketAddr, conn: &Conn, pause: Duration) -> Result<()> {
    let mut s = open_idle(src, dst).await?;
    s.set_nodelay(true)?;
    for w in &conn.writes {
        // A refused connection may be reset under the client: keep going, the count is what
        // matters here.
        if s.write_all(w).await.is_err() {
            break;
        }
        if conn.writes.len() > 1 {
            tokio::time::sleep(pause).await;
        }
    }
    let _ = s.shutdown().await;
    let mut sink = [0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

fn served(entries: &[AccessEntry], ip: IpAddr) -> (u64, u64, u64) {
    let mine: Vec<&AccessEntry> = entries.iter().filter(|e| e.client == ip).collect();
    let garbage = mine.iter().filter(|e| e.is_garbage()).count() as u64;
    let media = mine
        .iter()
        .filter(|e| e.method == "GET" && e.path.starts_with("/media/"))
        .count() as u64;
    let counted = mine.len() as u64 - garbage - media;
    (counted, media, garbage)
}

/// Every framing: the kernel's count equals the server's access log, request by request kind.
#[test]
fn every_framing_counts_what_the_server_parsed() -> Result<()> {
    let mut w = World::new("framing", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config(
        "",
        &org_toml("acme", &[cidr(acme)], "daily_requests = 1000000"),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let conns = framings(0x5eed_f00d);
    let (want_counted, want_media) = conns
        .iter()
        .fold((0, 0), |(c, m), k| (c + k.counted, m + k.media));
    w.client(|| async move {
        for conn in &conns {
            play(acme, api, conn, Duration::from_micros(300)).await?;
        }
        Ok(())
    })?;
    let org = w.wait_org("acme", |o| {
        n(o, "requests") + n(o, "exempt_media_gets") >= want_counted + want_media
    })?;
    let (counted, media, garbage) = served(&w.server_entries()?, acme);
    assert_eq!(garbage, 0, "the server parsed every stream");
    assert_eq!(
        (counted, media),
        (want_counted, want_media),
        "the server saw every request"
    );
    assert_eq!(
        (n(&org, "requests"), n(&org, "exempt_media_gets")),
        (counted, media),
        "the kernel counted exactly what the server parsed: {org}"
    );
    assert_eq!((n(&org, "rejected"), n(&org, "unparsed")), (0, 0), "{org}");
    assert!(
        !w.daemon_log().contains("parse_failed"),
        "{}",
        w.daemon_log()
    );
    Ok(())
}

/// A small quota holds whatever the framing: the server never serves more than the quota, and
/// every counted request the client sent is either within it or refused.
#[test]
fn a_small_quota_holds_whatever_the_framing() -> Result<()> {
    let mut w = World::new("framingq", 1, 0)?;
    let tight = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config(
        "",
        &org_toml("tight", &[cidr(tight)], "daily_requests = 30"),
    )?;
    w.start_daemon()?;
    let api = w.api4();
    let conns: Vec<Conn> = framings(0xbad_c0de).into_iter().step_by(3).collect();
    let (sent, sent_media) = conns
        .iter()
        .fold((0, 0), |(c, m), k| (c + k.counted, m + k.media));
    assert!(sent > 100, "enough to go far past the quota: {sent}");
    w.client(|| async move {
        for conn in &conns {
            play(tight, api, conn, Duration::from_micros(300)).await?;
        }
        Ok(())
    })?;
    let org = w.wait_org("tight", |o| n(o, "requests") + n(o, "rejected") >= sent)?;
    let (counted, media, garbage) = served(&w.server_entries()?, tight);
    assert_eq!(garbage, 0);
    assert!(
        counted <= 30,
        "the server served {counted} counted requests"
    );
    assert!(
        counted <= n(&org, "requests") && n(&org, "requests") <= 30,
        "served {counted}: {org}"
    );
    assert_eq!(
        n(&org, "requests") + n(&org, "rejected"),
        sent,
        "every counted request sent is counted once: {org}"
    );
    assert_eq!(n(&org, "exempt_media_gets"), sent_media, "{org}");
    assert!(media <= sent_media);
    Ok(())
}

/// Path tricks against nginx's own normalisation: only targets nginx serves under `/media/` are
/// exempt; `..`, escaped dots and slashes, and backslashes are counted.
#[test]
fn media_exemption_follows_the_path_nginx_serves() -> Result<()> {
    let mut w = World::with_nginx("mediapath", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    let api = w.api4();
    let cases: Vec<(&str, bool)> = vec![
        ("/media/a.png", true),
        ("/media/./b.png", true),
        ("/%6Dedia/c.png", true),
        ("/media/%61.png", true),
        ("/media/../api/v1/items", false),
        ("/media/x/../../api/v1/items", false),
        ("/media/%2e%2e/api/v1/items", false),
        ("/media/.%2E/api/v1/items", false),
        ("/media%2f..%2fapi", false),
        ("/media/..\\api", false),
        ("/api/media/x", false),
    ];
    let targets: Vec<String> = cases.iter().map(|(t, _)| t.to_string()).collect();
    w.client(|| async move {
        for t in &targets {
            let req = format!("GET {t} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let conn = Conn {
                writes: vec![req.into_bytes()],
                counted: 0,
                media: 0,
            };
            play(acme, api, &conn, Duration::ZERO).await?;
        }
        Ok(())
    })?;
    let exempt = cases.iter().filter(|(_, e)| *e).count() as u64;
    let counted = cases.len() as u64 - exempt;
    let org = w.wait_org("acme", |o| {
        n(o, "requests") + n(o, "exempt_media_gets") >= cases.len() as u64
    })?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "exempt_media_gets")),
        (counted, exempt),
        "{org}"
    );
    // What nginx made of each target (its `$uri` is normalised; the log is in request order):
    // every exempt one is served under /media/, every one served elsewhere was counted.
    let seen = w.nginx_entries()?;
    assert_eq!(seen.len(), cases.len(), "{seen:?}");
    for ((target, exempt), line) in cases.iter().zip(&seen) {
        let uri = line.split(' ').nth(2).unwrap_or_default();
        if *exempt {
            assert!(
                uri.starts_with("/media/"),
                "{target} exempt but nginx served {uri}"
            );
        }
    }
    let served_elsewhere = seen
        .iter()
        .filter(|l| {
            !l.split(' ')
                .nth(2)
                .unwrap_or_default()
                .starts_with("/media/")
        })
        .count() as u64;
    assert!(
        served_elsewhere >= 5 && served_elsewhere <= counted,
        "{seen:?}"
    );
    Ok(())
}

/// Framing that cannot be followed is closed with a 400, never passed uncounted.
#[test]
fn unfollowable_framing_is_closed_with_400() -> Result<()> {
    let mut w = World::new("badframe", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    let api = w.api4();
    let bad: Vec<&[u8]> = vec![
        b"POST /api/a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/hidden HTTP/1.1\r\n\r\n",
        b"POST /api/b HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nGET /api/hidden HTTP/1.1\r\n\r\n",
        b"POST /api/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /api/hidden HTTP/1.1\r\n\r\n",
    ];
    let answers = w.client(|| async move {
        let mut out = Vec::new();
        for b in bad {
            out.push(limiter_lab::testbed::exchange_raw(acme, api, b).await?);
        }
        Ok(out)
    })?;
    for a in &answers {
        let text = String::from_utf8_lossy(a);
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Connection: close"), "{text}");
    }
    let hidden = w
        .served_from(acme)?
        .iter()
        .filter(|e| e.path == "/api/hidden")
        .count();
    assert_eq!(
        hidden, 0,
        "nothing after the broken framing reached the server"
    );
    let org = w.org("acme")?;
    assert_eq!(n(&org, "requests"), 3, "each broken request counted: {org}");
    assert_eq!(n(&org, "unparsed"), 3, "{org}");
    Ok(())
}
