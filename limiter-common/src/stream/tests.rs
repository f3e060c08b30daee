extern crate std;

use std::{format, string::String, vec, vec::Vec};

use proptest::prelude::*;

use super::*;

fn config(prefixes: &[&str]) -> KernelConfig {
    let mut c = KernelConfig::empty();
    for p in prefixes {
        assert!(c.push_media_prefix(p.as_bytes()));
    }
    c
}

fn media() -> KernelConfig {
    config(&["/media/", "/files/dl/"])
}

/// Feeds `chunks` one after the other; the sum of their tallies and the final stream.
fn feed_chunks(chunks: &[&[u8]], cfg: &KernelConfig) -> (Tally, Stream) {
    let mut s = Stream::new();
    let mut sum = Tally::default();
    for c in chunks {
        let t = s.feed(c, cfg);
        sum.counted += t.counted;
        sum.media += t.media;
        sum.starts += t.starts;
        if t.starts > 0 {
            sum.head_method = t.head_method;
        }
        sum.opaque |= t.opaque;
        sum.broken |= t.broken;
    }
    (sum, s)
}

fn feed_all(bytes: &[u8], cfg: &KernelConfig) -> (Tally, Stream) {
    feed_chunks(&[bytes], cfg)
}

fn requests(t: &Tally) -> u32 {
    t.counted + t.media
}

const GET: &[u8] = b"GET /api/v1/items HTTP/1.1\r\nHost: api.example\r\nUser-Agent: t\r\n\r\n";

#[test]
fn one_get_in_one_chunk() {
    let (t, s) = feed_all(GET, &media());
    assert_eq!((t.counted, t.media, t.starts), (1, 0, 1));
    assert!(!t.broken && !t.opaque);
    assert!(s.at_boundary());
}

#[test]
fn every_split_of_a_head_counts_once() {
    let cfg = media();
    for at in 0..=GET.len() {
        let (t, s) = feed_chunks(&[&GET[..at], &GET[at..]], &cfg);
        assert_eq!(requests(&t), 1, "split at {at}");
        assert!(s.at_boundary(), "split at {at}");
        assert!(!t.broken && !t.opaque);
    }
}

#[test]
fn byte_at_a_time_counts_once() {
    let two = [GET, b"GET /media/a.png HTTP/1.1\r\n\r\n"].concat();
    let chunks: Vec<&[u8]> = two.chunks(1).collect();
    let (t, s) = feed_chunks(&chunks, &media());
    assert_eq!((t.counted, t.media), (1, 1));
    assert!(s.at_boundary());
}

#[test]
fn pipelined_requests_all_count() {
    let many: Vec<u8> = (0..50).flat_map(|_| GET.iter().copied()).collect();
    let (t, s) = feed_all(&many, &media());
    assert_eq!((t.counted, t.starts), (50, 50));
    assert!(s.at_boundary());
}

#[test]
fn leading_empty_lines_are_skipped() {
    let bytes = [&b"\r\n\r\n\n"[..], GET, b"\r\n", GET].concat();
    let (t, _) = feed_all(&bytes, &media());
    assert_eq!(t.counted, 2);
    assert!(!t.opaque);
}

#[test]
fn a_body_that_looks_like_a_request_is_body() {
    let body = GET;
    let post = format!(
        "POST /api/x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    for split in [0, 5, post.len(), post.len() + 3] {
        let bytes = [post.as_bytes(), body, GET].concat();
        let (t, s) = feed_chunks(&[&bytes[..split], &bytes[split..]], &media());
        assert_eq!(t.counted, 2, "split {split}");
        assert!(s.at_boundary());
    }
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let body = b"POST /up HTTP/1.1\r\ntransfer-ENCODING:  Chunked \r\n\r\n\
        5;name=\"v\"\r\nGET /\r\n\
        1A\r\nGET /api HTTP/1.1\r\n\r\nxxxx\r\n\
        0\r\nTrailer: GET / HTTP/1.1\r\n\r\n";
    let bytes = [&body[..], GET].concat();
    for split in 0..bytes.len() {
        let (t, s) = feed_chunks(&[&bytes[..split], &bytes[split..]], &media());
        assert_eq!(t.counted, 2, "split {split}");
        assert!(!t.broken, "split {split}");
        assert!(s.at_boundary(), "split {split}");
    }
}

#[test]
fn http10_lf_only_and_absolute_form() {
    let bytes = b"GET http://h/media/x HTTP/1.0\nHost: h\n\nOPTIONS * HTTP/1.1\r\n\r\nCONNECT h:443 HTTP/1.1\r\n\r\n";
    let (t, s) = feed_all(bytes, &media());
    // Absolute-form targets are never exempt.
    assert_eq!((t.counted, t.media), (3, 0));
    assert!(s.at_boundary());
}

#[test]
fn expect_continue_body_in_a_later_chunk() {
    let head = b"PUT /api/f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
    let (t, s) = feed_chunks(&[head, b"GET / HTTP", GET], &media());
    assert_eq!(t.counted, 2);
    assert!(s.at_boundary());
}

#[test]
fn unfollowable_framing_breaks() {
    for bad in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1234567890123\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\n 6\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n\x16\x03\x01",
        b"GET / HTTP/1.1\r\n\r\nget\x00",
    ] {
        let (t, s) = feed_all(bad, &media());
        assert!(t.broken, "{}", String::from_utf8_lossy(bad));
        assert_eq!(s.state, S_CLOSED);
        // A broken stream stays closed: later chunks are not looked at.
        let mut s2 = s;
        assert_eq!(s2.feed(GET, &media()), Tally::default());
    }
}

#[test]
fn equal_duplicate_lengths_are_followed() {
    let bytes = b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length:3 \r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
    let (t, s) = feed_all(bytes, &media());
    assert_eq!(t.counted, 2);
    assert!(!t.broken && s.at_boundary());
}

#[test]
fn opaque_protocols_pass() {
    for first in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x01\x02garbage",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"{\"json\":1}",
    ] {
        let (t, s) = feed_chunks(&[first, GET], &media());
        assert!(t.opaque, "{first:?}");
        assert_eq!(requests(&t), 0, "{first:?}");
        assert_eq!(s.state, S_OPAQUE);
    }
}

/// The media normaliser's answers, with nginx's view of each target in the comment.
#[test]
fn media_exemption_by_the_served_path() {
    let cfg = media();
    for (target, exempt) in [
        ("/media/a.png", true),
        ("/media/", true),
        ("/media", false),
        ("/mediax/a", false),
        ("/media/../api/v1/items", false),
        ("/media/x/../../api", false),
        ("/media/%2e%2e/api", false),
        ("/media/%2E./api", false),
        ("/media%2fa", false),
        ("/media/a\\..\\..\\api", false),
        ("/%6Dedia/a.png", true),
        ("/%6d%65dia/a.png", true),
        ("/media/./a.png", true),
        ("/./media/a.png", true),
        ("/media/.", true),
        ("/media/.well-known", true),
        ("/media/..hidden", false),
        ("/media/a%20b.png", true),
        ("/media/a%00b", false),
        ("/media/a%zz", false),
        ("/media/a%2", false),
        ("/media/a.png?x=/../../api", true),
        ("/files/dl/x", true),
        ("/files/%64l/x", true),
        ("//media/a", false),
        ("/api/media/a", false),
    ] {
        let line = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        let (t, s) = feed_all(line.as_bytes(), &cfg);
        assert_eq!(
            (t.media, t.counted),
            if exempt { (1, 0) } else { (0, 1) },
            "{target}"
        );
        assert!(s.at_boundary(), "{target}");
        // Split inside the target too.
        for at in 4..line.len() {
            let (t2, _) = feed_chunks(&[&line.as_bytes()[..at], &line.as_bytes()[at..]], &cfg);
            assert_eq!(
                (t2.media, t2.counted),
                (t.media, t.counted),
                "{target} at {at}"
            );
        }
    }
    // Only GETs are exempt.
    let (t, _) = feed_all(b"HEAD /media/a.png HTTP/1.1\r\n\r\n", &cfg);
    assert_eq!((t.media, t.counted, t.head_method), (0, 1, true));
}

#[test]
fn find_lf_every_position() {
    for n in 1..=WIN {
        for at in 0..n {
            for lf in 0..n {
                let mut w = Window([b'a'; WIN_BUF]);
                w[lf] = b'\n';
                // A stale LF past `n` is never found.
                if n < WIN {
                    w[n] = b'\n';
                }
                let want = (lf >= at).then_some(lf);
                assert_eq!(find_lf(&w, at, n), want, "n {n} at {at} lf {lf}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Differential: a reference framer on httparse, over generated request sequences and splits.
// ---------------------------------------------------------------------------------------------

/// What the reference makes of a byte stream: (counted, media) or None if it cannot frame it.
fn reference(mut bytes: &[u8], prefixes: &[&str]) -> Option<(u32, u32)> {
    let (mut counted, mut exempt) = (0, 0);
    loop {
        while let [b'\r' | b'\n', rest @ ..] = bytes {
            bytes = rest;
        }
        if bytes.is_empty() {
            return Some((counted, exempt));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(n) = req.parse(bytes).ok()? else {
            return None;
        };
        let method = req.method?;
        let path = req.path?;
        if method == "GET" && reference_exempt(path, prefixes) {
            exempt += 1;
        } else {
            counted += 1;
        }
        let mut length = 0usize;
        let mut chunked = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            }
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        bytes = &bytes[n..];
        if chunked {
            loop {
                let httparse::Status::Complete((used, size)) =
                    httparse::parse_chunk_size(bytes).ok()?
                else {
                    return None;
                };
                bytes = &bytes[used..];
                if size == 0 {
                    let mut trailers = [httparse::EMPTY_HEADER; 16];
                    let httparse::Status::Complete((used, _)) =
                        httparse::parse_headers(bytes, &mut trailers).ok()?
                    else {
                        return None;
                    };
                    bytes = &bytes[used..];
                    break;
                }
                bytes = bytes.get(size as usize + 2..)?;
            }
        } else {
            bytes = bytes.get(length..)?;
        }
    }
}

/// The media rule written plainly: decode escapes of unreserved characters, refuse what could
/// change the segments, drop `.` segments, refuse `..`, compare the prefix.
fn reference_exempt(target: &str, prefixes: &[&str]) -> bool {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return false;
    }
    let raw = path.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return false;
        }
        if b == b'%' {
            let Some(hex) = raw.get(i + 1..i + 3) else {
                return false;
            };
            let Ok(c) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("x"), 16) else {
                return false;
            };
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return false;
            }
            if matches!(c, b'.' | b'/' | b'\\') || c < 0x20 || c == 0x7f {
                return false;
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~') {
                decoded.push(c);
            } else {
                decoded.extend(format!("%{c:02X}").bytes());
            }
            i += 3;
            continue;
        }
        decoded.push(b);
        i += 1;
    }
    let mut out = Vec::new();
    for (k, seg) in decoded.split(|b| *b == b'/').enumerate() {
        if k == 0 {
            continue;
        }
        if seg.starts_with(b"..") {
            return false;
        }
        if seg == b"." {
            continue;
        }
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    // A trailing `/` (or one after a dropped `.`) stays.
    if decoded.ends_with(b"/") || decoded.ends_with(b"/.") {
        out.push(b'/');
    }
    prefixes.iter().any(|p| out.starts_with(p.as_bytes()))
}

#[test]
fn reference_agrees_on_the_fixed_cases() {
    assert!(reference_exempt("/media/./a", &["/media/"]));
    assert!(!reference_exempt("/media/../a", &["/media/"]));
    assert!(reference_exempt("/media/.", &["/media/"]));
    assert_eq!(reference(GET, &["/media/"]), Some((1, 0)));
}

fn arb_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/media/"),
        Just("/files/dl/"),
        Just("/api/v1/"),
        Just("/"),
        Just("."),
        Just(".."),
        Just("%2e"),
        Just("%6d"),
        Just("%6D"),
        Just("%20"),
        Just("%2F"),
        Just("%"),
        Just("\\"),
        Just("?q=/../"),
        Just("media"),
        Just("x"),
        Just("a.png"),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|v| {
        let mut s = String::from("/");
        for p in v {
            s.push_str(p);
        }
        s
    })
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Length(Vec<u8>),
    Chunked(Vec<Vec<u8>>, bool),
}

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Body,
    lf_only: bool,
    leading_crlf: usize,
}

fn arb_body() -> impl Strategy<Value = Body> {
    let bytes = proptest::collection::vec(
        prop_oneof![Just(b'G'), Just(b'\r'), Just(b'\n'), any::<u8>()],
        0..300,
    );
    prop_oneof![
        Just(Body::None),
        bytes.clone().prop_map(Body::Length),
        (proptest::collection::vec(bytes, 0..4), any::<bool>())
            .prop_map(|(c, t)| Body::Chunked(c, t)),
    ]
}

fn arb_req() -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            Just("GET"),
            Just("GET"),
            Just("POST"),
            Just("PUT"),
            Just("HEAD"),
            Just("DELETE"),
            Just("PURGE"),
            Just("M-SEARCH"),
        ],
        arb_path(),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("Host"),
                    Just("Content-Type"),
                    Just("Content-Len"),
                    Just("X-Content-Length"),
                    Just("Transfer"),
                    Just("Accept"),
                ],
                "[ -~]{0,40}",
            ),
            0..5,
        ),
        arb_body(),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(method, path, headers, body, lf_only, leading_crlf)| Req {
            method,
            path,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.into(), v.trim().into()))
                .collect(),
            body,
            lf_only,
            leading_crlf,
        })
}

fn render(r: &Req) -> Vec<u8> {
    let eol = if r.lf_only { "\n" } else { "\r\n" };
    let mut s = String::new();
    for _ in 0..r.leading_crlf {
        s.push_str("\r\n");
    }
    s.push_str(&format!("{} {} HTTP/1.1{eol}", r.method, r.path));
    for (n, v) in &r.headers {
        s.push_str(&format!("{n}: {v}{eol}"));
    }
    let mut out;
    match &r.body {
        Body::None => {
            s.push_str(eol);
            out = s.into_bytes();
        }
        Body::Length(b) => {
            s.push_str(&format!("cOnTeNt-LeNgTh:  {} {eol}{eol}", b.len()));
            out = s.into_bytes();
            out.extend_from_slice(b);
        }
        Body::Chunked(chunks, trailer) => {
            s.push_str(&format!("Transfer-Encoding: chunked{eol}{eol}"));
            out = s.into_bytes();
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                out.extend(format!("{:x};ext=1\r\n", c.len()).bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            if *trailer {
                out.extend_from_slice(b"X-Trailer: GET / HTTP/1.1\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Cuts `bytes` at the given offsets (taken modulo its length).
fn split_at_points(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        if p > last {
            out.push(bytes[last..p].to_vec());
            last = p;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// Any sequence of well-framed requests, cut anywhere: the stream counts exactly what the
    /// httparse-based reference frames, request by request, media GETs included.
    #[test]
    fn matches_the_reference_over_any_split(
        reqs in proptest::collection::vec(arb_req(), 1..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let prefixes = ["/media/", "/files/dl/"];
        let cfg = config(&prefixes);
        let bytes: Vec<u8> = reqs.iter().flat_map(render).collect();
        let want = reference(&bytes, &prefixes);
        prop_assume!(want.is_some());
        let (counted, exempt) = want.unwrap_or_default();
        prop_assert_eq!(counted + exempt, reqs.len() as u32);
        let chunks = split_at_points(&bytes, &cuts);
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let (t, s) = feed_chunks(&refs, &cfg);
        prop_assert!(!t.broken && !t.opaque);
        prop_assert_eq!((t.counted, t.media), (counted, exempt));
        prop_assert!(s.at_boundary());
    }

    /// A chunk that `skip_body` takes (the kernel then walks nothing) is one the walk would
    /// have passed with nothing counted, leaving the stream exactly as `skip_body` does; and
    /// every chunk the walk passes without leaving a body or a chunk's data is taken.
    #[test]
    fn a_skipped_body_chunk_is_what_the_walk_does(
        reqs in proptest::collection::vec(arb_req(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let prefixes = ["/media/", "/files/dl/"];
        let cfg = config(&prefixes);
        let bytes: Vec<u8> = reqs.iter().flat_map(render).collect();
        let mut s = Stream::new();
        for chunk in split_at_points(&bytes, &cuts) {
            let before = s;
            let mut fast = s;
            let took = fast.skip_body(chunk.len() as u64);
            let t = s.feed(&chunk, &cfg);
            if took {
                prop_assert_eq!(fast, s);
                prop_assert_eq!((t.counted, t.media, t.broken), (0, 0, false));
            }
            let inside = matches!(before.state, S_BODY | S_CDATA)
                && s.state == before.state
                && s.remaining + chunk.len() as u64 == before.remaining;
            prop_assert_eq!(took, inside, "{:?}", chunk.len());
        }
    }

    /// Byte at a time is just another split.
    #[test]
    fn byte_at_a_time_matches(reqs in proptest::collection::vec(arb_req(), 1..4)) {
        let prefixes = ["/media/", "/files/dl/"];
        let cfg = config(&prefixes);
        let bytes: Vec<u8> = reqs.iter().flat_map(render).collect();
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let (t, _) = feed_chunks(&chunks, &cfg);
        prop_assert_eq!(t.counted + t.media, reqs.len() as u32);
    }

    /// Whatever the bytes, the stream never loops, never panics, and once it says closed or
    /// opaque it stays so.
    #[test]
    fn total_on_any_bytes(
        chunks in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b' '), Just(b'G'), Just(b'/'), Just(b':'),
                Just(b'0'), Just(b'c'), any::<u8>()
            ], 0..200), 1..6),
    ) {
        let cfg = media();
        let mut s = Stream::new();
        for c in &chunks {
            let before = s.state;
            let t = s.feed(c, &cfg);
            if before == S_OPAQUE || before == S_CLOSED {
                prop_assert_eq!(s.state, before);
                prop_assert_eq!(t, Tally::default());
            }
            prop_assert!(t.counted + t.media <= t.starts);
        }
    }

    /// The media decision is the reference's for any generated path, however it is split.
    #[test]
    fn media_matches_the_reference(path in arb_path(), cut in any::<usize>()) {
        let prefixes = ["/media/", "/files/dl/"];
        let cfg = config(&prefixes);
        let line = format!("GET {path} HTTP/1.1\r\n\r\n");
        let want = reference_exempt(&path, &prefixes);
        let chunks = split_at_points(line.as_bytes(), &[cut]);
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let (t, _) = feed_chunks(&refs, &cfg);
        prop_assert_eq!((t.media, t.counted), if want { (1, 0) } else { (0, 1) }, "{}", path);
    }
}

#[test]
fn split_points_cover_the_bytes() {
    let v: Vec<u8> = (0..10).collect();
    let parts = split_at_points(&v, &[3, 3, 25, 0]);
    assert_eq!(parts.concat(), v);
    assert_eq!(parts.len(), 2);
    assert_eq!(split_at_points(&v, &[]), vec![v.clone()]);
}

/// A PROXY header the kernel's first look could not see whole (cut across segments) is never
/// left unread: the stream breaks (a 400), where it would otherwise call the connection opaque
/// and count nothing on it.
#[test]
fn a_cut_proxy_header_breaks_the_stream() {
    let cfg = media();
    for (first, rest) in [
        (
            &b"PROX"[..],
            &b"Y TCP4 192.0.2.1 192.0.2.2 1 2\r\nGET / HTTP/1.1\r\n\r\n"[..],
        ),
        (
            b"PROXY",
            b" TCP4 192.0.2.1 192.0.2.2 1 2\r\nGET / HTTP/1.1\r\n\r\n",
        ),
        (b"\r\n\r\n", b"\0\r\nQUIT\n\x21\x11\0\x0c"),
        (b"\r\n", b"\r\n\0\r\nQUIT\n"),
    ] {
        let mut s = Stream::new();
        let a = s.feed(first, &cfg);
        let b = s.feed(rest, &cfg);
        assert!(a.broken || b.broken, "{first:?} + {rest:?}: {a:?} {b:?}");
        assert!(!a.opaque && !b.opaque, "{first:?} + {rest:?}");
        assert_eq!(s.state, S_CLOSED);
    }
    // Empty lines before a request, and methods that start like PROXY, are still requests.
    for head in [
        &b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"[..],
        b"PROPFIND / HTTP/1.1\r\n\r\n",
        b"PRO / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = Stream::new();
        let t = s.feed(head, &cfg);
        assert_eq!(
            (t.counted, t.broken, t.opaque),
            (1, false, false),
            "{head:?}"
        );
    }
    // Garbage that is not a cut signature stays opaque.
    let mut s = Stream::new();
    assert!(s.feed(b"\0\x01\x02", &cfg).opaque);
}

/// The connection's org: the first connection-level source of `identify_by` that names one (a
/// believed PROXY header's source, the peer address); request-level sources never name it.
#[test]
fn the_connection_org_follows_identify_by() {
    use crate::{ID_ADDRESS, ID_API_KEY, ID_END, ID_FORWARDED, ID_PROXY_PROTOCOL};
    let mut cfg = media();
    let mut s = Stream::new();
    s.peer_org = 3;
    s.proxy_org = 7;
    let by = |cfg: &mut KernelConfig, list: [u8; 4]| cfg.identify_by = list;

    by(&mut cfg, [ID_PROXY_PROTOCOL, ID_ADDRESS, ID_END, ID_END]);
    // No PROXY header believed: the peer address.
    assert_eq!(s.conn_org(&cfg), (3, ID_ADDRESS));
    s.id |= ID_PROXY_OK;
    assert_eq!(s.conn_org(&cfg), (7, ID_PROXY_PROTOCOL));
    // The order decides.
    by(&mut cfg, [ID_ADDRESS, ID_PROXY_PROTOCOL, ID_END, ID_END]);
    assert_eq!(s.conn_org(&cfg), (3, ID_ADDRESS));
    // A source that names no org hands over to the next.
    s.peer_org = crate::UNMAPPED_ORG;
    assert_eq!(s.conn_org(&cfg), (7, ID_PROXY_PROTOCOL));
    // Without `address` listed, the peer never names the connection; request-level sources
    // never do.
    by(&mut cfg, [ID_API_KEY, ID_FORWARDED, ID_END, ID_END]);
    s.peer_org = 3;
    assert_eq!(s.conn_org(&cfg), (crate::UNMAPPED_ORG, 0));
    by(&mut cfg, [ID_PROXY_PROTOCOL, ID_END, ID_END, ID_END]);
    assert_eq!(s.conn_org(&cfg), (7, ID_PROXY_PROTOCOL));
    s.id &= !ID_PROXY_OK;
    assert_eq!(s.conn_org(&cfg), (crate::UNMAPPED_ORG, 0));
    assert!(listed(&cfg, ID_PROXY_PROTOCOL) && !listed(&cfg, ID_ADDRESS));
}

// ---------------------------------------------------------------------------------------------
// API keys: each request attributed on its own, at the end of its head.

/// The config's rules, plus what the kernel reads from maps: API keys (digest → org) and the
/// address tables of the forwarded tests (10.0.0.0/8 trusted, 198.51.100.0/24 is org 5,
/// 203.0.113.0/24 org 6).
struct Rules {
    cfg: KernelConfig,
    keys: std::collections::HashMap<u64, u32>,
}

impl StreamRules for Rules {
    fn all(&self) -> u8 {
        self.cfg.all()
    }
    fn matching(&self, pos: u8, c: u8) -> u8 {
        self.cfg.matching(pos, c)
    }
    fn key_name(&self, pos: usize) -> u8 {
        self.cfg.key_name(pos)
    }
    fn key_name_len(&self) -> usize {
        self.cfg.key_name_len()
    }
    fn key_kind(&self) -> u8 {
        self.cfg.key_kind
    }
    fn key_secret(&self) -> [u64; 2] {
        self.cfg.key_secret
    }
    fn key_org(&self, digest: u64) -> Option<u32> {
        self.keys.get(&digest).copied()
    }
    fn identify_by(&self) -> [u8; crate::ID_SOURCES] {
        self.cfg.identify_by
    }
    fn fwd_name(&self, pos: usize) -> u8 {
        self.cfg.fwd_name(pos)
    }
    fn key_name_word(&self, pos: usize) -> u64 {
        self.cfg.key_name_word(pos)
    }
    fn line_first(&self, b: u8) -> u8 {
        self.cfg.line_first(b)
    }
    fn fwd_name_word(&self, pos: usize) -> u64 {
        self.cfg.fwd_name_word(pos)
    }
    fn fwd_name_len(&self) -> usize {
        self.cfg.fwd_name_len()
    }
    fn fwd_kind(&self) -> u8 {
        self.cfg.forwarded_kind
    }
    fn trusted(&self, a: &AddrKey) -> bool {
        a[10] == 0xff && a[12] == 10
    }
    fn addr_org(&self, a: &AddrKey) -> u32 {
        match (a[12], a[13], a[14]) {
            (198, 51, 100) => 5,
            (203, 0, 113) => 6,
            _ => crate::UNMAPPED_ORG,
        }
    }
}

const PEER_ORG: u32 = 9;

/// Rules with API keys: `header` read, `keys` → orgs by their digests.
fn keys_rules(header: &str, kind: u8, keys: &[(&str, u32)]) -> Rules {
    use crate::{ID_ADDRESS, ID_API_KEY, ID_END};
    let mut cfg = media();
    cfg.identify_by = [ID_API_KEY, ID_ADDRESS, ID_END, ID_END];
    cfg.key_kind = kind;
    cfg.key_secret = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
    let name = header.to_ascii_lowercase();
    cfg.key_header[..name.len()].copy_from_slice(name.as_bytes());
    cfg.key_header_len = name.len() as u8;
    fill_name_tables(&mut cfg);
    let keys = keys
        .iter()
        .map(|(k, org)| {
            let mut buf = [0u8; crate::ident::CAP];
            buf[..k.len()].copy_from_slice(k.as_bytes());
            (crate::ident::siphash13(cfg.key_secret, &buf, k.len()), *org)
        })
        .collect();
    Rules { cfg, keys }
}

fn default_keys() -> Rules {
    keys_rules(
        "X-API-Key",
        crate::KEY_PLAIN,
        &[("k-acme-1", 5), ("k-acme-2", 5), ("k-globex", 6)],
    )
}

fn key_stream() -> Stream {
    let mut s = Stream::new();
    s.id |= ID_PER_REQUEST;
    s.peer_org = PEER_ORG;
    s
}

fn keyed(key_line: &str) -> Vec<u8> {
    format!("GET /api/v1/items HTTP/1.1\r\nHost: a\r\n{key_line}\r\nAccept: */*\r\n\r\n")
        .into_bytes()
}

/// (org, via, counted, media, unknown_keys) of one chunk.
fn attributed(t: &Tally) -> (u32, u8, u32, u32, u32) {
    (t.org, t.via, t.counted, t.media, t.unknown_keys)
}

#[test]
fn each_request_counts_for_its_key() {
    use crate::{ID_ADDRESS, ID_API_KEY};
    let r = default_keys();
    let mut s = key_stream();
    let t = s.feed(&keyed("X-API-Key: k-acme-1"), &r);
    assert_eq!(attributed(&t), (5, ID_API_KEY, 1, 0, 0));
    let t = s.feed(&keyed("x-api-key:k-globex  "), &r);
    assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0));
    // An unknown key falls through to the next source, and is reported.
    let t = s.feed(&keyed("X-Api-Key: k-nobody"), &r);
    assert_eq!(attributed(&t), (PEER_ORG, ID_ADDRESS, 1, 0, 1));
    // No key: the next source, nothing unknown.
    let t = s.feed(&keyed("X-Other: k-acme-1"), &r);
    assert_eq!(attributed(&t), (PEER_ORG, ID_ADDRESS, 1, 0, 0));
    // Only the first key header is read.
    let t = s.feed(&keyed("X-API-Key: k-globex\r\nX-API-Key: k-acme-1"), &r);
    assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0));
    // A key that is not one token is no key.
    let t = s.feed(&keyed("X-API-Key: k-acme-1 k-globex"), &r);
    assert_eq!(attributed(&t), (PEER_ORG, ID_ADDRESS, 1, 0, 1));
    // A media GET is exempt for the key's org.
    let t = s.feed(
        b"GET /media/a.png HTTP/1.1\r\nX-API-Key: k-acme-2\r\n\r\n",
        &r,
    );
    assert_eq!(attributed(&t), (5, ID_API_KEY, 0, 1, 0));
    // Pipelined requests of one org count together.
    let two = [keyed("X-API-Key: k-acme-1"), keyed("X-API-Key: k-acme-2")].concat();
    let t = s.feed(&two, &r);
    assert_eq!(attributed(&t), (5, ID_API_KEY, 2, 0, 0));
    assert!(s.at_boundary() && !t.broken);
}

#[test]
fn a_head_split_anywhere_counts_once_for_its_key() {
    use crate::ID_API_KEY;
    let r = default_keys();
    let bytes = [
        keyed("X-API-Key: k-globex"),
        b"POST /api/v1/x HTTP/1.1\r\nContent-Length: 5\r\nX-API-Key:  k-globex\r\n\r\nhello"
            .to_vec(),
    ]
    .concat();
    for cut in 0..=bytes.len() {
        for cut2 in [cut, (cut + 7).min(bytes.len()), bytes.len()] {
            let mut s = key_stream();
            let mut total = 0;
            for c in [&bytes[..cut], &bytes[cut..cut2], &bytes[cut2..]] {
                let t = s.feed(c, &r);
                assert!(!t.broken, "cut {cut} {cut2}");
                if t.counted > 0 {
                    assert_eq!((t.org, t.via), (6, ID_API_KEY), "cut {cut} {cut2}");
                }
                total += t.counted;
            }
            assert_eq!(total, 2, "cut {cut} {cut2}");
        }
    }
    // Byte at a time.
    let mut s = key_stream();
    let mut total = 0;
    for b in bytes.chunks(1) {
        let t = s.feed(b, &r);
        if t.counted > 0 {
            assert_eq!(t.org, 6);
        }
        total += t.counted;
    }
    assert_eq!(total, 2);
}

/// Rules that read `X-API-Key` and, from trusted proxies, `X-Forwarded-For`.
fn key_and_fwd_rules() -> Rules {
    use crate::{FWD_X_FORWARDED_FOR, ID_ADDRESS, ID_API_KEY, ID_FORWARDED};
    let mut r = default_keys();
    r.cfg.identify_by = [ID_API_KEY, ID_FORWARDED, ID_ADDRESS, crate::ID_END];
    r.cfg.forwarded_kind = FWD_X_FORWARDED_FOR;
    let name = b"x-forwarded-for";
    r.cfg.fwd_header[..name.len()].copy_from_slice(name);
    r.cfg.fwd_header_len = name.len() as u8;
    fill_name_tables(&mut r.cfg);
    r
}

/// Whether the header scan may take the header line `line` (padded to a word) for a name of
/// interest: its first byte's class, then [`may_be_named`], as `skip_header_lines` asks.
fn first_word_may_name(line: &str, r: &impl StreamRules) -> bool {
    let mut w = [b'x'; 8];
    let n = line.len().min(8);
    w[..n].copy_from_slice(&line.as_bytes()[..n]);
    match r.line_first(line.as_bytes()[0]) {
        0 => false,
        LINE_OTHER => true,
        _ => may_be_named(u64::from_le_bytes(w), r),
    }
}

#[test]
fn the_first_word_rules_out_only_other_names() {
    let r = key_and_fwd_rules();
    for line in [
        "Content-Length: 5",
        "content-length:5",
        "CONTENT-LENGTH: 5",
        "Transfer-Encoding: chunked",
        "X-API-Key: k",
        "x_api_key: k",
        "X-Api-KEY: k",
        "X-Forwarded-For: 10.0.0.1",
        "x-forwarded_for: 10.0.0.1",
        // The first eight bytes of a name of interest: the name's own loop decides.
        "X-Api-Keyring: k",
        "Transfer-Length: 5",
        "Content-Type: a/b",
    ] {
        assert!(first_word_may_name(line, &r), "{line:?}");
    }
    for line in [
        "X-Request-Id: 5f0c",
        "Traceparent: 00-4bf9",
        "Content: a/b",
        "Cookie: a=b",
        "Cache-Control: no",
        "Connection: close",
        "X-Api-Other: k",
        "Transfe: x",
        "x-forwa: 1",
    ] {
        assert!(!first_word_may_name(line, &r), "{line:?}");
    }
    // A name shorter than a word: only its own bytes are compared.
    let short = keys_rules("ApiKey", crate::KEY_PLAIN, &[("k-acme-1", 5)]);
    for line in ["ApiKey: k", "apikey:k", "api_key: k", "ApiKeys: k"] {
        let expected = !line.starts_with("api_");
        assert_eq!(first_word_may_name(line, &short), expected, "{line:?}");
    }
    // With no key or forwarded header configured, only the framing headers stay.
    let plain = media();
    assert!(!first_word_may_name("X-API-Key: k", &plain));
    assert!(first_word_may_name("Content-Length: 5", &plain));
}

/// Lines around a key header are read as any other: lines the scan skips before it, a name
/// that starts like the key's, and framing headers right after the key line.
#[test]
fn lines_around_a_key_are_read_as_any_other() {
    use crate::ID_API_KEY;
    let r = key_and_fwd_rules();
    let hidden = "GET /hidden HTTP/1.1\r\n\r\n";
    let bytes = [
        "GET /a HTTP/1.1\r\nX-Request-Id: 1\r\nTraceparent: 00-1\r\n\
         X-Api-Keyring: k-globex\r\nX-API-Key: k-acme-1\r\nX-Request-Id: 2\r\n\r\n"
            .into(),
        format!(
            "POST /b HTTP/1.1\r\nX-API-Key: k-acme-2\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
        format!(
            "POST /c HTTP/1.1\r\nX-API-Key: k-acme-1\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{hidden}\r\n0\r\n\r\n",
            hidden.len()
        ),
    ]
    .concat()
    .into_bytes();
    for cut in 0..=bytes.len() {
        let mut s = key_stream();
        let mut total = 0;
        for c in [&bytes[..cut], &bytes[cut..]] {
            let t = s.feed(c, &r);
            assert!(!t.broken, "cut {cut}");
            if t.counted > 0 {
                assert_eq!(
                    (t.org, t.via, t.unknown_keys),
                    (5, ID_API_KEY, 0),
                    "cut {cut}"
                );
            }
            total += t.counted;
        }
        assert_eq!(total, 3, "cut {cut}");
        assert!(s.at_boundary(), "cut {cut}");
    }
}

/// Header names near the names of interest: their case changed, `-` and `_` swapped, cut,
/// lengthened or with one byte changed; and any token.
fn arb_name() -> impl Strategy<Value = String> {
    let near = (
        prop::sample::select(vec![
            "content-length",
            "transfer-encoding",
            "x-api-key",
            "x-forwarded-for",
        ]),
        any::<u64>(),
        any::<u64>(),
        1usize..20,
        "[a-zA-Z0-9_-]{0,4}",
        (any::<usize>(), "[a-zA-Z0-9_-]"),
    )
        .prop_map(|(base, upper, swap, keep, more, (at, with))| {
            let mut b: Vec<u8> = base.bytes().collect();
            for (i, c) in b.iter_mut().enumerate() {
                if upper >> (i % 64) & 1 == 1 {
                    c.make_ascii_uppercase();
                }
                if swap >> (i % 64) & 1 == 1 && *c == b'-' {
                    *c = b'_';
                }
            }
            b.truncate(keep);
            b.extend(more.bytes());
            let i = at % b.len();
            b[i] = with.as_bytes()[0];
            String::from_utf8(b).unwrap_or_default()
        });
    prop_oneof![near, "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,20}"]
}

proptest! {
    /// A line the first-word look rules out is one the name's own reading skips.
    #[test]
    fn a_line_the_first_word_rules_out_is_one_its_name_skips(name in arb_name()) {
        let r = key_and_fwd_rules();
        let line = format!("{name}: 1\r\n");
        let b = line.as_bytes();
        prop_assume!(r.line_first(b[0]) != 0);
        if !first_word_may_name(&line, &r) {
            let mut s = proxy_stream();
            s.names = r.line_first(b[0]);
            s.sub = 1;
            s.state = S_NAME;
            for &c in &b[1..] {
                if s.state != S_NAME {
                    break;
                }
                s.name_byte(c, &r);
            }
            prop_assert_eq!(s.state, S_SKIP, "{}", line);
        }
    }
}

#[test]
fn authorization_bearer_and_basic() {
    use crate::ID_API_KEY;
    use base64::Engine as _;
    let r = keys_rules(
        "Authorization",
        crate::KEY_AUTHORIZATION,
        &[("tok-acme", 5), ("globex-user", 6)],
    );
    let mut s = key_stream();
    let t = s.feed(&keyed("Authorization: Bearer tok-acme"), &r);
    assert_eq!(attributed(&t), (5, ID_API_KEY, 1, 0, 0));
    let basic = base64::engine::general_purpose::STANDARD.encode("globex-user:secret pw");
    let t = s.feed(&keyed(&format!("authorization: basic {basic}")), &r);
    assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0));
    let t = s.feed(&keyed("Authorization: Digest tok-acme"), &r);
    assert_eq!(t.unknown_keys, 1);
    assert_eq!(t.org, PEER_ORG);
}

#[test]
fn keys_the_stream_cannot_settle() {
    let r = default_keys();
    // Two orgs' requests in one chunk: a chunk is passed or refused whole, so the stream
    // breaks (400) rather than count one org's request for the other.
    let mut s = key_stream();
    let two = [keyed("X-API-Key: k-acme-1"), keyed("X-API-Key: k-globex")].concat();
    let t = s.feed(&two, &r);
    assert!(t.broken);
    assert_eq!(attributed(&t).2, 1);
    // A folded line after the key header would change the key the server reads.
    let mut s = key_stream();
    let t = s.feed(&keyed("X-API-Key: k-acme-1\r\n  k-globex"), &r);
    assert!(t.broken);
    // A value longer than any key: unknown, and the head still followed.
    let mut s = key_stream();
    let long = "k".repeat(KEY_VALUE_MAX + 10);
    let t = s.feed(&keyed(&format!("X-API-Key: {long}")), &r);
    assert_eq!(attributed(&t), (PEER_ORG, crate::ID_ADDRESS, 1, 0, 1));
    assert!(s.at_boundary());
    // Without `ID_PER_REQUEST` (api_key not a source) keys are not read.
    let mut s = Stream::new();
    s.peer_org = PEER_ORG;
    let t = s.feed(&keyed("X-API-Key: k-acme-1"), &r);
    assert_eq!((t.org, t.counted), (0, 1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Requests that all carry one org's key, cut anywhere: every request counts once, all for
    /// that org, as the reference frames them.
    #[test]
    fn keyed_requests_over_any_split(
        reqs in proptest::collection::vec(arb_req(), 1..8),
        key in prop_oneof![Just("k-acme-1"), Just("k-globex")],
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
    ) {
        let r = default_keys();
        let org = if key == "k-acme-1" { 5 } else { 6 };
        let prefixes = ["/media/", "/files/dl/"];
        let reqs: Vec<Req> = reqs
            .into_iter()
            .map(|mut q| {
                q.headers.insert(0, ("X-API-Key".into(), key.into()));
                q
            })
            .collect();
        let bytes: Vec<u8> = reqs.iter().flat_map(render).collect();
        let want = reference(&bytes, &prefixes);
        prop_assume!(want.is_some());
        let (counted, exempt) = want.unwrap_or_default();
        let mut s = key_stream();
        let (mut c, mut m) = (0, 0);
        for chunk in split_at_points(&bytes, &cuts) {
            let t = s.feed(&chunk, &r);
            prop_assert!(!t.broken && !t.opaque);
            if t.counted + t.media > 0 {
                prop_assert_eq!(t.org, org);
            }
            c += t.counted;
            m += t.media;
        }
        prop_assert_eq!((c, m), (counted, exempt));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Keys of any length, with blanks around them and either line end, cut anywhere: the
    /// kernel's runs of several words and its CR LF at the end of a run digest exactly the key
    /// (its org), and a key longer than any stored is unknown.
    #[test]
    fn long_keys_over_any_split(
        key in proptest::collection::vec(0x21u8..0x7f, 1..150),
        lead in proptest::collection::vec(prop_oneof![Just(b' '), Just(b'\t')], 0..3),
        trail in proptest::collection::vec(prop_oneof![Just(b' '), Just(b'\t')], 0..3),
        crlf in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        use crate::{ID_ADDRESS, ID_API_KEY};
        let text = String::from_utf8(key.clone()).unwrap();
        let stored = key.len() <= crate::API_KEY_MAX;
        let r = if stored {
            keys_rules("X-API-Key", crate::KEY_PLAIN, &[(text.as_str(), 7)])
        } else {
            keys_rules("X-API-Key", crate::KEY_PLAIN, &[])
        };
        let mut head = b"GET /api/v1/items HTTP/1.1\r\nHost: a\r\nX-API-Key:".to_vec();
        head.extend_from_slice(&lead);
        head.extend_from_slice(&key);
        head.extend_from_slice(&trail);
        head.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        head.extend_from_slice(b"Accept: */*\r\n\r\n");
        let mut s = key_stream();
        let mut got = (0, 0, 0, 0, 0);
        for chunk in split_at_points(&head, &cuts) {
            let t = s.feed(&chunk, &r);
            prop_assert!(!t.broken && !t.opaque);
            if t.counted > 0 {
                got = attributed(&t);
            }
        }
        let want = if stored {
            (7, ID_API_KEY, 1, 0, 0)
        } else {
            (PEER_ORG, ID_ADDRESS, 1, 0, 1)
        };
        prop_assert_eq!(got, want);
    }
}

/// What the kernel does between chunks when the stream is not [`Stream::identifying`]: it
/// copies only the words before `hash`, so the rest may hold anything (another socket's).
fn scramble_unused_identification(s: &mut Stream) {
    if !s.identifying() {
        let off = STREAM_CORE_WORDS * 8;
        bytemuck::bytes_of_mut(s)[off..].fill(0xa5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Keyed and forwarded requests, cut anywhere, count the same when the identification
    /// state is overwritten between chunks wherever the stream says it holds nothing.
    #[test]
    fn identification_state_outside_identifying_is_never_read(
        reqs in proptest::collection::vec(arb_req(), 1..6),
        key in prop_oneof![Just("k-acme-1"), Just("k-globex"), Just("k-nobody-at-all-0123456789")],
        fwd in prop_oneof![Just("198.51.100.7"), Just("203.0.113.4, 10.1.2.3"), Just("junk")],
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
    ) {
        let r = key_and_fwd_rules();
        let reqs: Vec<Req> = reqs
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                if i % 2 == 0 {
                    q.headers.insert(0, ("X-API-Key".into(), key.into()));
                }
                q.headers.push(("X-Forwarded-For".into(), fwd.into()));
                q
            })
            .collect();
        let bytes: Vec<u8> = reqs.iter().flat_map(render).collect();
        let (mut plain, mut scrambled) = (proxy_stream(), proxy_stream());
        for chunk in split_at_points(&bytes, &cuts) {
            scramble_unused_identification(&mut scrambled);
            let a = plain.feed(&chunk, &r);
            let b = scrambled.feed(&chunk, &r);
            prop_assert_eq!(attributed(&a), attributed(&b));
            prop_assert_eq!((a.broken, a.opaque), (b.broken, b.opaque));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarded headers from a trusted proxy: each request by its client address.

/// Rules with `identify_by = ["forwarded", "address"]` (the addresses of [`Rules`]).
fn fwd_rules(kind: u8, header: &str) -> Rules {
    use crate::{ID_ADDRESS, ID_END, ID_FORWARDED};
    let mut cfg = media();
    cfg.identify_by = [ID_FORWARDED, ID_ADDRESS, ID_END, ID_END];
    cfg.forwarded_kind = kind;
    let name = header.to_ascii_lowercase();
    cfg.fwd_header[..name.len()].copy_from_slice(name.as_bytes());
    cfg.fwd_header_len = name.len() as u8;
    fill_name_tables(&mut cfg);
    Rules {
        cfg,
        keys: Default::default(),
    }
}

/// A connection from a trusted proxy (its own address no org's).
fn proxy_stream() -> Stream {
    let mut s = Stream::new();
    s.id |= ID_PER_REQUEST | ID_FWD;
    s.peer_org = crate::UNMAPPED_ORG;
    s
}

fn fwd_req(lines: &str) -> Vec<u8> {
    format!("GET /api/x HTTP/1.1\r\nHost: a\r\n{lines}Accept: */*\r\n\r\n").into_bytes()
}

#[test]
fn each_request_counts_for_its_forwarded_client() {
    use crate::{FWD_FORWARDED, FWD_X_FORWARDED_FOR, FWD_X_REAL_IP, ID_FORWARDED};
    let r = fwd_rules(FWD_X_FORWARDED_FOR, "X-Forwarded-For");
    let mut s = proxy_stream();
    let t = s.feed(&fwd_req("X-Forwarded-For: 198.51.100.7\r\n"), &r);
    assert_eq!(attributed(&t), (5, ID_FORWARDED, 1, 0, 0));
    // A forged entry on the left: the nearest proxy's entry counts.
    let t = s.feed(
        &fwd_req("x-forwarded-for: 198.51.100.9, 203.0.113.4, 10.0.0.2\r\n"),
        &r,
    );
    assert_eq!(attributed(&t), (6, ID_FORWARDED, 1, 0, 0));
    // Two lines read as one list (HAProxy appends its own line).
    let t = s.feed(
        &fwd_req("X-Forwarded-For: 203.0.113.4\r\nX-Forwarded-For: 198.51.100.7\r\n"),
        &r,
    );
    assert_eq!(attributed(&t), (5, ID_FORWARDED, 1, 0, 0));
    // Unreadable: falls through to the peer (no org): unmapped.
    let t = s.feed(&fwd_req("X-Forwarded-For: 198.51.100.7, junk\r\n"), &r);
    assert_eq!(attributed(&t), (crate::UNMAPPED_ORG, 0, 1, 0, 0));
    // Split anywhere, byte by byte included.
    let bytes = fwd_req("X-Forwarded-For: 203.0.113.4, 10.1.2.3\r\n");
    for cut in 0..=bytes.len() {
        let mut s = proxy_stream();
        let (a, b) = (s.feed(&bytes[..cut], &r), s.feed(&bytes[cut..], &r));
        let t = if b.counted > 0 { b } else { a };
        assert_eq!(attributed(&t), (6, ID_FORWARDED, 1, 0, 0), "cut {cut}");
    }
    // From a peer that is not trusted the header is not believed.
    let mut s = proxy_stream();
    s.id &= !ID_FWD;
    s.peer_org = 9;
    let t = s.feed(&fwd_req("X-Forwarded-For: 198.51.100.7\r\n"), &r);
    assert_eq!(attributed(&t), (9, crate::ID_ADDRESS, 1, 0, 0));

    let r = fwd_rules(FWD_FORWARDED, "Forwarded");
    let mut s = proxy_stream();
    let t = s.feed(
        &fwd_req("Forwarded: for=198.51.100.7;proto=https, for=\"[fd00::1]\"\r\n"),
        &r,
    );
    // fd00::1 is not trusted by these rules: it is the client, of no org.
    assert_eq!(attributed(&t), (crate::UNMAPPED_ORG, 0, 1, 0, 0));
    let t = s.feed(
        &fwd_req("Forwarded: for=198.51.100.7, for=10.0.0.1;by=10.0.0.2\r\n"),
        &r,
    );
    assert_eq!(attributed(&t), (5, ID_FORWARDED, 1, 0, 0));

    let r = fwd_rules(FWD_X_REAL_IP, "X-Real-IP");
    let mut s = proxy_stream();
    let t = s.feed(&fwd_req("X-Real-IP: 203.0.113.77\r\n"), &r);
    assert_eq!(attributed(&t), (6, ID_FORWARDED, 1, 0, 0));
}

#[test]
fn identifying_names_match_with_underscores() {
    use crate::{FWD_X_FORWARDED_FOR, ID_API_KEY, ID_FORWARDED};
    // WSGI and CGI servers read `X_API_Key` as `X-API-Key`: so does the kernel.
    let r = default_keys();
    let mut s = key_stream();
    let t = s.feed(&keyed("X_API_Key: k-globex"), &r);
    assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0));
    let t = s.feed(&keyed("x-api_KEY: k-acme-1"), &r);
    assert_eq!(attributed(&t), (5, ID_API_KEY, 1, 0, 0));
    let r = fwd_rules(FWD_X_FORWARDED_FOR, "X-Forwarded-For");
    let mut s = proxy_stream();
    let t = s.feed(&fwd_req("X_Forwarded_For: 198.51.100.7\r\n"), &r);
    assert_eq!(attributed(&t), (5, ID_FORWARDED, 1, 0, 0));
}

/// Bytes a header name is made of, in either case, and those that end or spoil it.
fn arb_name_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => proptest::sample::select(b"content-lgthrasfidxpkyCONTENTLGXAPIKY_".to_vec()),
        1 => proptest::sample::select(vec![b':', b'\n', b'\r', b' ', 0u8, 0x7f, 0xc3, b'@', b'[']),
    ]
}

proptest! {
    /// Eight bytes of a header name at once leave the stream exactly as the same bytes one by
    /// one do, and use as many: whatever names the header may still be, wherever in the name.
    #[test]
    fn a_name_word_is_its_bytes_one_by_one(
        bytes in proptest::collection::vec(arb_name_byte(), 8),
        names in 1u8..16,
        sub in 0u8..24,
        key in proptest::sample::select(vec!["X-API-Key", "X_Api_Key", "Authorization", "Content-Lengthy", "x"]),
        fwd in proptest::sample::select(vec!["X-Forwarded-For", "Forwarded", "X-Real-IP", "transfer"]),
    ) {
        use crate::{ID_ADDRESS, ID_API_KEY, ID_FORWARDED};
        let mut r = keys_rules(key, crate::KEY_PLAIN, &[]);
        r.cfg.identify_by = [ID_API_KEY, ID_FORWARDED, ID_ADDRESS, crate::ID_END];
        let name = fwd.to_ascii_lowercase();
        r.cfg.fwd_header[..name.len()].copy_from_slice(name.as_bytes());
        r.cfg.fwd_header_len = name.len() as u8;
        fill_name_tables(&mut r.cfg);
        let mut word_wise = proxy_stream();
        word_wise.state = S_NAME;
        word_wise.names = names;
        word_wise.sub = sub;
        let mut byte_wise = word_wise;
        let w = u64::from_le_bytes(bytes.as_slice().try_into().unwrap());
        let used = match word_wise.name_word(w, &r) {
            NameWord::Used(k) => k,
            NameWord::Colon(k) => {
                word_wise.name_byte(b':', &r);
                k
            }
        };
        let mut k = 0;
        while k < 8 && byte_wise.state == S_NAME {
            byte_wise.name_byte(bytes[k], &r);
            k += 1;
        }
        prop_assert_eq!(used, k as u64);
        prop_assert_eq!(word_wise, byte_wise);
    }
}

#[test]
fn names_word_by_word_in_a_whole_head() {
    use crate::ID_API_KEY;
    // Names that share first bytes with the ones that matter, cut at every length.
    let r = default_keys();
    let mut s = key_stream();
    let head = keyed(
        "Content-Type: a\r\nContent-Lengt: 1\r\nX-API-Keys: k-acme-1\r\nX-API: 2\r\nTransfer-Encodin: x\r\nX-Api-Key: k-globex",
    );
    let t = s.feed(&head, &r);
    assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0));
    let t = s.feed(&keyed("content-length: 0\r\nX-API-KEY: k-acme-2"), &r);
    assert_eq!(attributed(&t), (5, ID_API_KEY, 1, 0, 0));
}

/// A configured key header with `_` matches the name however the client writes its `_`/`-`
/// and case (the prepared name words read `_` as `-`, as `name_byte` does).
#[test]
fn a_key_header_with_underscores_matches_either_spelling() {
    use crate::ID_API_KEY;
    let r = keys_rules("X_Api_Key", crate::KEY_PLAIN, &[("k-acme", 6)]);
    for line in [
        "x-api-key: k-acme",
        "X_API_KEY: k-acme",
        "x_Api-key: k-acme",
    ] {
        let mut s = key_stream();
        let t = s.feed(&keyed(line), &r);
        assert_eq!(attributed(&t), (6, ID_API_KEY, 1, 0, 0), "{line}");
    }
}

/// The line table the daemon fills agrees with the rule it tabulates, for every byte and for
/// key and forwarded names that start alike, apart, or not at all.
#[test]
fn the_line_table_is_the_line_rule() {
    let base = KernelConfig::empty();
    let mut named = KernelConfig::empty();
    for (key, fwd) in [
        ("", ""),
        ("x-api-key", ""),
        ("", "x-forwarded-for"),
        ("x-api-key", "x-forwarded-for"),
        ("authorization", "forwarded"),
        ("Tx", "c"),
    ] {
        named.key_header = [0; crate::HEADER_NAME_MAX];
        named.fwd_header = [0; crate::HEADER_NAME_MAX];
        named.key_header[..key.len()].copy_from_slice(key.to_ascii_lowercase().as_bytes());
        named.fwd_header[..fwd.len()].copy_from_slice(fwd.to_ascii_lowercase().as_bytes());
        named.key_header_len = key.len() as u8;
        named.fwd_header_len = fwd.len() as u8;
        fill_name_tables(&mut named);
        for b in 0..=255u8 {
            let k = key.bytes().next().map_or(0, |c| c.to_ascii_lowercase());
            let f = fwd.bytes().next().map_or(0, |c| c.to_ascii_lowercase());
            assert_eq!(
                named.line_first[b as usize],
                line_class(b, k, f),
                "{key:?} {fwd:?} {b}"
            );
        }
    }
    for b in 0..=255u8 {
        let expect = match b {
            b'\r' | b'\n' | b' ' | b'\t' => LINE_OTHER,
            b'c' | b'C' => NAME_CL,
            b't' | b'T' => NAME_TE,
            _ => 0,
        };
        assert_eq!(base.line_first[b as usize], expect, "{b}");
    }
    assert_eq!(line_class(b'X', b'x', b'x'), NAME_KEY | NAME_FWD);
    assert_eq!(line_class(b':', 0, 0), 0);
}

/// A large upload's chunks are skipped without a walk, all but those that hold its head or
/// reach its end.
#[test]
fn upload_chunks_skip_the_walk() {
    let cfg = media();
    let body = vec![b'x'; 65536];
    let mut bytes = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"GET /api/v1/items HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut s = Stream::new();
    let (mut skipped, mut walked, mut counted) = (0, 0, 0);
    for chunk in bytes.chunks(1000) {
        if s.skip_body(chunk.len() as u64) {
            skipped += 1;
        } else {
            walked += 1;
            counted += s.feed(chunk, &cfg).counted;
        }
    }
    assert_eq!(counted, 2);
    assert_eq!((skipped, walked), (64, 2));
    // After a refusal that closes the connection, nothing is skipped: those bytes are counted.
    let mut s = Stream::new();
    s.feed(&bytes[..2000], &cfg);
    s.flags |= F_REFUSED;
    assert!(!s.skip_body(1000));
}

/// Rules that read the key from `key_header` and, from trusted proxies, the forwarded header
/// `fwd_header`: either may be named like the other, or like a framing header.
fn key_and_fwd_named(key_header: &str, fwd_header: &str) -> Rules {
    use crate::{FWD_FORWARDED, FWD_X_FORWARDED_FOR, FWD_X_REAL_IP, ID_ADDRESS, ID_API_KEY};
    let mut r = keys_rules(
        key_header,
        crate::KEY_PLAIN,
        &[("k-acme-1", 5), ("k-globex", 6)],
    );
    r.cfg.identify_by = [ID_API_KEY, crate::ID_FORWARDED, ID_ADDRESS, crate::ID_END];
    let name = fwd_header.to_ascii_lowercase();
    r.cfg.forwarded_kind = match name.as_str() {
        "forwarded" => FWD_FORWARDED,
        "x-real-ip" => FWD_X_REAL_IP,
        _ => FWD_X_FORWARDED_FOR,
    };
    r.cfg.fwd_header = [0; crate::HEADER_NAME_MAX];
    r.cfg.fwd_header[..name.len()].copy_from_slice(name.as_bytes());
    r.cfg.fwd_header_len = name.len() as u8;
    fill_name_tables(&mut r.cfg);
    r
}

/// A header name spelled as a server may still read it as `name`: each byte's case flipped
/// or `-` made `_` by the bits of `spell`.
fn respelled(name: &str, spell: u64) -> String {
    name.bytes()
        .enumerate()
        .map(|(i, c)| {
            let c = if spell >> (i % 32) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            if c == b'-' && spell >> (32 + i % 32) & 1 == 1 {
                '_'
            } else {
                c as char
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// The header-line scan's shortcut to a key's value (the key header's name and `:` whole
    /// in the window) reads every head as the name loop does byte by byte: key headers of any
    /// length, named like the forwarded header or a framing header, lines near the key's name
    /// (longer, cut short, a byte changed, a blank before the `:`, another name's first word),
    /// a second key line; on a direct client's connection, a proxy's, and one whose requests
    /// are not attributed one by one.
    #[test]
    fn the_key_names_shortcut_reads_heads_as_the_name_loop(
        key_header in prop::sample::select(vec![
            "X-API-Key", "Authorization", "k", "ApiKey", "X-Tenant-Token1", "X-Forwarded-For",
            "Forwarded", "X-Real-IP", "Content-Length", "Content", "X-Api-Key-Longer",
        ]),
        fwd_header in prop::sample::select(vec!["X-Forwarded-For", "Forwarded", "X-Real-IP"]),
        lines in proptest::collection::vec(
            (0u8..8, any::<u64>(), arb_name(), "[a-zA-Z0-9_ -]{1,3}", prop::sample::select(vec![
                "k-acme-1", "k-globex", "k-nobody", "198.51.100.7", "for=203.0.113.9", "5",
            ])),
            1..5,
        ),
        conn in 0u8..3,
    ) {
        let r = key_and_fwd_named(key_header, fwd_header);
        let mut head = b"GET /api/v1/items HTTP/1.1\r\nHost: a\r\n".to_vec();
        for (which, spell, other, more, value) in &lines {
            let name = match which {
                0 | 1 => respelled(key_header, *spell),
                2 => respelled(fwd_header, *spell),
                // The key's name and more before the `:` (a blank too, which no name has).
                3 => respelled(key_header, *spell) + more,
                // Its name cut short.
                4 => respelled(&key_header[..key_header.len() - 1], *spell),
                // One of its bytes changed.
                5 => {
                    let mut b = respelled(key_header, *spell).into_bytes();
                    let i = (*spell as usize >> 8) % b.len();
                    b[i] = more.as_bytes()[0];
                    String::from_utf8(b).unwrap_or_default()
                }
                // The forwarded header's first word, then the rest of the key's name.
                6 => respelled(
                    &format!(
                        "{}{}",
                        &fwd_header[..fwd_header.len().min(8)],
                        key_header.get(8..).unwrap_or_default()
                    ),
                    *spell,
                ),
                _ => other.clone(),
            };
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        // A direct client's connection, a trusted proxy's, and one whose requests are not
        // attributed one by one.
        let stream = || match conn {
            0 => key_stream(),
            1 => proxy_stream(),
            _ => {
                let mut s = Stream::new();
                s.peer_org = PEER_ORG;
                s
            }
        };
        let mut whole = stream();
        let t = whole.feed(&head, &r);
        let mut bytes = stream();
        let (mut got, mut unknown, mut broken) = ((0, 0, 0, 0, 0), 0, false);
        for b in &head {
            let t = bytes.feed(std::slice::from_ref(b), &r);
            broken |= t.broken;
            unknown += t.unknown_keys;
            if t.counted + t.media > 0 {
                got = attributed(&t);
            }
        }
        got.4 = unknown;
        prop_assert_eq!(
            (attributed(&t), t.broken),
            (got, broken),
            "{}",
            String::from_utf8_lossy(&head)
        );
        prop_assert_eq!(whole.state, bytes.state);
        prop_assert_eq!(whole.req, bytes.req);
    }
}
