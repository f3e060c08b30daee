//! The HTTP/1.x request-line recogniser and the request classifier.
//!
//! The kernel sees only the first bytes of each inbound chunk ([`PEEK_LEN`]), so everything here
//! decides from a short prefix, never allocates, and loops only over fixed bounds (the verifier's
//! rule). `None`/[`Class::NotRequest`] means "these bytes do not start a request": the caller decides
//! whether that is a body segment or unparsed traffic.

use crate::maps::{Config, MAX_MEDIA_PREFIXES, MEDIA_PREFIX_MAX};

/// How many leading bytes of a chunk the kernel loads: the longest method, a space and the longest
/// media prefix.
pub const PEEK_LEN: usize = 8 + MEDIA_PREFIX_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Trace,
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Patch,
        Method::Options,
        Method::Connect,
        Method::Trace,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
        }
    }
}

/// The start of a request line: the method and where the request target begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Method,
    pub target: usize,
}

const fn word(b: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*b)
}

/// (method, token plus space as a little-endian word, mask of the bytes that matter)
const METHODS: [(Method, u64, u64); 9] = [
    (Method::Get, word(b"GET \0\0\0\0"), 0xffff_ffff),
    (Method::Put, word(b"PUT \0\0\0\0"), 0xffff_ffff),
    (Method::Post, word(b"POST \0\0\0"), 0xff_ffff_ffff),
    (Method::Head, word(b"HEAD \0\0\0"), 0xff_ffff_ffff),
    (Method::Patch, word(b"PATCH \0\0"), 0xffff_ffff_ffff),
    (Method::Trace, word(b"TRACE \0\0"), 0xffff_ffff_ffff),
    (Method::Delete, word(b"DELETE \0"), 0xff_ffff_ffff_ffff),
    (Method::Options, word(b"OPTIONS "), u64::MAX),
    (Method::Connect, word(b"CONNECT "), u64::MAX),
];

/// Recognises `METHOD SP target` at the start of `buf`.
///
/// The target must begin with `/` (origin form), `*` (`OPTIONS *`), `h`/`H` (absolute form) or, for
/// CONNECT, any visible byte (authority form). Anything else, including a chunk too short to hold
/// the first target byte, is not a request start.
#[inline(always)]
pub fn parse_request_line(buf: &[u8]) -> Option<RequestLine> {
    let mut head = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        if let Some(b) = buf.get(i) {
            head[i] = *b;
        }
        i += 1;
    }
    let w = u64::from_le_bytes(head);
    let mut m = 0;
    while m < METHODS.len() {
        let (method, token, mask) = METHODS[m];
        if w & mask == token {
            let target = (mask.count_ones() / 8) as usize;
            let first = *buf.get(target)?;
            let ok = match method {
                Method::Connect => first > b' ' && first < 0x7f,
                _ => matches!(first, b'/' | b'*' | b'h' | b'H'),
            };
            return if ok {
                Some(RequestLine { method, target })
            } else {
                None
            };
        }
        m += 1;
    }
    None
}

/// What an inbound chunk means for the org's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A request that uses quota.
    Counted(Method),
    /// A GET under a media prefix: exempt.
    ExemptMedia,
    /// These bytes do not start a request.
    NotRequest,
}

/// Does the target at `buf[target..]` start with `prefix`? The whole prefix must be present.
#[inline(always)]
pub fn has_prefix(buf: &[u8], target: usize, prefix: &[u8; MEDIA_PREFIX_MAX], len: usize) -> bool {
    if len == 0 || len > MEDIA_PREFIX_MAX {
        return false;
    }
    let mut i = 0;
    while i < MEDIA_PREFIX_MAX {
        if i >= len {
            return true;
        }
        match buf.get(target + i) {
            Some(b) if *b == prefix[i] => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Classifies the first bytes of an inbound chunk against the configured media prefixes.
#[inline(always)]
pub fn classify(buf: &[u8], config: &Config) -> Class {
    let Some(line) = parse_request_line(buf) else {
        return Class::NotRequest;
    };
    if line.method != Method::Get {
        return Class::Counted(line.method);
    }
    let mut p = 0;
    while p < MAX_MEDIA_PREFIXES {
        if p >= config.media_prefix_count as usize {
            break;
        }
        if has_prefix(
            buf,
            line.target,
            &config.media_prefixes[p],
            config.media_prefix_len[p] as usize,
        ) {
            return Class::ExemptMedia;
        }
        p += 1;
    }
    Class::Counted(Method::Get)
}

/// Bytes the kernel loads at a time when looking for the end of a request head.
pub const HEAD_BLOCK: usize = 64;
/// Blocks scanned at most: a head must end within the first `HEAD_BLOCKS × HEAD_BLOCK` bytes.
pub const HEAD_BLOCKS: usize = 32;

/// Bit 7 of every byte of `w` that equals `c`, and no other bit (exact: no carry crosses bytes).
#[inline(always)]
pub const fn byte_eq_mask(w: u64, c: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let v = w ^ (0x0101_0101_0101_0101u64 * c as u64);
    !(((v & LOW7) + LOW7) | v) & 0x8080_8080_8080_8080
}

/// Where in the 8 little-endian bytes of `w` the first `\r\n\r\n` starts (0..=4), eight
/// bytes compared at once: a byte-by-byte scan cost the verifier most of a million instructions.
#[inline(always)]
pub const fn crlfcrlf_in(w: u64) -> Option<usize> {
    let r = byte_eq_mask(w, b'\r');
    let n = byte_eq_mask(w, b'\n');
    let m = r & (n >> 8) & (r >> 16) & (n >> 24);
    if m == 0 {
        None
    } else if m & 0x80 != 0 {
        Some(0)
    } else if m & 0x8000 != 0 {
        Some(1)
    } else if m & 0x80_0000 != 0 {
        Some(2)
    } else if m & 0x8000_0000 != 0 {
        Some(3)
    } else {
        Some(4)
    }
}

#[inline(always)]
fn word_at(block: &[u8; HEAD_BLOCK], off: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = block.get(off..off + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// The last 4 bytes of a full block, carried into the next so a `\r\n\r\n` that straddles
/// two blocks is found.
#[inline(always)]
pub fn head_block_tail(block: &[u8; HEAD_BLOCK]) -> u32 {
    let mut t = [0u8; 4];
    if let Some(s) = block.get(HEAD_BLOCK - 4..) {
        t.copy_from_slice(s);
    }
    u32::from_le_bytes(t)
}

/// Offset (from the block's start) just past the first `\r\n\r\n` that ends within the first
/// `n` bytes of `block`, given the previous block's [`head_block_tail`] (0 for the first block).
/// Bytes of `block` past `n` may be stale: a match that needs them is no match.
#[inline(always)]
pub fn head_end_in_block(tail: u32, block: &[u8; HEAD_BLOCK], n: usize) -> Option<usize> {
    // Starts 60..=63 of the previous block (and 0 of this one): its tail, then our first 4 bytes.
    let carry = tail as u64 | (word_at(block, 0) << 32);
    if let Some(i) = crlfcrlf_in(carry) {
        return if i <= n { Some(i) } else { None };
    }
    // Overlapping 8-byte words every 4 bytes: each covers the starts o..=o+4.
    let mut k = 0;
    while k < (HEAD_BLOCK - 4) / 4 {
        let o = k * 4;
        if let Some(i) = crlfcrlf_in(word_at(block, o)) {
            let end = o + i + 4;
            return if end <= n { Some(end) } else { None };
        }
        k += 1;
    }
    None
}

/// Offset just past the first `\r\n\r\n` of `bytes` within the first `HEAD_BLOCKS` blocks: the
/// kernel's block loop over a slice, for the host tests (the kernel loads each block from the skb).
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    let mut tail = 0;
    let mut b = 0;
    while b < HEAD_BLOCKS {
        let off = b * HEAD_BLOCK;
        let rest = bytes.get(off..)?;
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(HEAD_BLOCK);
        let mut block = [0xaa; HEAD_BLOCK];
        block[..n].copy_from_slice(&rest[..n]);
        if let Some(end) = head_end_in_block(tail, &block, n) {
            return Some(off + end);
        }
        if n < HEAD_BLOCK {
            return None;
        }
        tail = head_block_tail(&block);
        b += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(prefixes: &[&str]) -> Config {
        let mut c = Config::empty();
        for p in prefixes {
            assert!(c.push_media_prefix(p.as_bytes()));
        }
        c
    }

    #[test]
    fn recognises_every_method() {
        for m in Method::ALL {
            let line = format_line(m.as_str(), "/x");
            assert_eq!(
                parse_request_line(line.as_bytes()),
                Some(RequestLine {
                    method: m,
                    target: m.as_str().len() + 1
                }),
                "{line}"
            );
        }
    }

    fn format_line(m: &str, t: &str) -> String {
        let mut s = std::string::String::new();
        s.push_str(m);
        s.push(' ');
        s.push_str(t);
        s.push_str(" HTTP/1.1\r\n");
        s
    }

    extern crate std;
    use std::{string::String, vec};

    #[test]
    fn rejects_non_requests() {
        for bad in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"get /",
            b"GETX /",
            b"GET  /",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"POST\t/",
            b"{\"json\":1}",
            b"\r\nGET / HTTP/1.1",
            b"CONNECT  x",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
            assert_eq!(classify(bad, &config(&["/media/"])), Class::NotRequest);
        }
    }

    #[test]
    fn accepts_target_forms() {
        assert!(parse_request_line(b"OPTIONS * HTTP/1.1").is_some());
        assert!(parse_request_line(b"GET http://h/ HTTP/1.1").is_some());
        assert!(parse_request_line(b"CONNECT example.com:443 HTTP/1.1").is_some());
        assert!(parse_request_line(b"GET /").is_some());
    }

    #[test]
    fn media_gets_are_exempt_only_for_get_and_whole_prefix() {
        let c = config(&["/media/", "/files/dl/"]);
        assert_eq!(
            classify(b"GET /media/a.png HTTP/1.1", &c),
            Class::ExemptMedia
        );
        assert_eq!(classify(b"GET /files/dl/x", &c), Class::ExemptMedia);
        assert_eq!(classify(b"GET /media", &c), Class::Counted(Method::Get));
        assert_eq!(classify(b"GET /mediax/", &c), Class::Counted(Method::Get));
        assert_eq!(
            classify(b"HEAD /media/a.png HTTP/1.1", &c),
            Class::Counted(Method::Head)
        );
        assert_eq!(
            classify(b"POST /media/a.png HTTP/1.1", &c),
            Class::Counted(Method::Post)
        );
        assert_eq!(
            classify(b"GET /api/media/ HTTP/1.1", &c),
            Class::Counted(Method::Get)
        );
        assert_eq!(
            classify(b"GET /media/", &config(&[])),
            Class::Counted(Method::Get)
        );
    }

    #[test]
    fn longest_prefix_fits_the_peek() {
        let long: String = core::iter::once('/')
            .chain(core::iter::repeat_n('m', 63))
            .collect();
        let c = config(&[&long]);
        let line = format_line("GET", &long);
        assert_eq!(
            classify(&line.as_bytes()[..PEEK_LEN.min(line.len())], &c),
            Class::ExemptMedia
        );
        let mut c2 = Config::empty();
        assert!(!c2.push_media_prefix(&[b'/'; MEDIA_PREFIX_MAX + 1]));
    }

    /// The naive search the word-at-a-time scan must agree with.
    fn naive_head_end(bytes: &[u8]) -> Option<usize> {
        let limit = bytes.len().min(HEAD_BLOCK * HEAD_BLOCKS);
        bytes[..limit]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
    }

    #[test]
    fn head_end_finds_every_position() {
        for len in 4..300 {
            for at in 0..=len - 4 {
                let mut v = vec![b'a'; len];
                v[at..at + 4].copy_from_slice(b"\r\n\r\n");
                assert_eq!(head_end(&v), naive_head_end(&v), "len {len} at {at}");
                assert_eq!(head_end(&v), Some(at + 4));
            }
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn head_end_stops_at_the_scan_limit() {
        let mut v = vec![b'a'; HEAD_BLOCK * HEAD_BLOCKS + 100];
        let at = HEAD_BLOCK * HEAD_BLOCKS - 2;
        v[at..at + 4].copy_from_slice(b"\r\n\r\n");
        // Straddles the limit: the kernel loads no byte past it.
        assert_eq!(head_end(&v), None);
        assert_eq!(naive_head_end(&v), None);
    }

    #[test]
    fn byte_masks_are_exact() {
        for c in [0u8, b'\r', b'\n', 0x7f, 0x80, 0xff] {
            for b in 0..=255u8 {
                let w = u64::from_le_bytes([b, c, b, 0, c, 0xff, 0x80, b]);
                let m = byte_eq_mask(w, c);
                for (i, x) in w.to_le_bytes().iter().enumerate() {
                    assert_eq!(m >> (8 * i + 7) & 1 == 1, *x == c, "c {c} b {b} byte {i}");
                }
                assert_eq!(m & !0x8080_8080_8080_8080, 0);
            }
        }
    }

    proptest! {
        /// The word-at-a-time head scan agrees with a naive search on any bytes, including
        /// CR/LF-heavy ones and heads that straddle blocks.
        #[test]
        fn head_end_matches_naive(bytes in proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), any::<u8>()], 0..2200)) {
            prop_assert_eq!(head_end(&bytes), naive_head_end(&bytes));
        }
        /// Never panics and never reads past the slice, whatever the bytes.
        #[test]
        fn classify_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let c = config(&["/media/", "/m"]);
            let _ = classify(&bytes, &c);
            let _ = parse_request_line(&bytes);
        }

        /// Any well-formed request line is recognised, with its method and target offset.
        #[test]
        fn well_formed_lines_parse(m in 0usize..9, path in "/[a-zA-Z0-9/._~-]{0,80}") {
            let method = Method::ALL[m];
            let line = format_line(method.as_str(), &path);
            let got = parse_request_line(line.as_bytes());
            prop_assert_eq!(got, Some(RequestLine { method, target: method.as_str().len() + 1 }));
        }

        /// Truncating a request to the kernel's peek never changes its class.
        #[test]
        fn peek_window_is_enough(path in "/(media/)?[a-z0-9/]{0,100}") {
            let c = config(&["/media/"]);
            let line = format_line("GET", &path);
            let full = classify(line.as_bytes(), &c);
            let cut = &line.as_bytes()[..PEEK_LEN.min(line.len())];
            prop_assert_eq!(classify(cut, &c), full);
            let want = if path.starts_with("/media/") { Class::ExemptMedia } else { Class::Counted(Method::Get) };
            prop_assert_eq!(full, want);
        }

        /// Lowercase or mangled methods never count as requests.
        #[test]
        fn lowercase_methods_rejected(m in 0usize..9, path in "/[a-z]{0,10}") {
            let line = format_line(&Method::ALL[m].as_str().to_ascii_lowercase(), &path);
            prop_assert_eq!(parse_request_line(line.as_bytes()), None);
        }
    }
}
