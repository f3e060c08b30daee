//! The HTTP 429 the kernel answers with.
//!
//! The kernel rewrites the refused request's bytes in place and must keep their length (the
//! kernel advances the socket's read sequence by it), so the reply is padded with an `X-Pad:`
//! header of spaces to exactly the request's length. Two forms: the full reply with its
//! problem+json body, and, for requests too short to hold it, a compact one with the same headers
//! and an empty body, so that most refusals can keep the connection (growing the request instead
//! means closing it).
//!
//! For the verifier's sake every store has a constant length and only offsets vary: a number is
//! written as a fixed-width slot (digits, then spaces) and the text that follows it is written
//! right after its digits, over the slot's spaces, so no value ends in whitespace. The JSON body
//! has a fixed length with trailing whitespace after the object (allowed in JSON). Digit counts
//! pass through [`Scratch::forget`], so the verifier walks one path whatever the numbers are. The
//! same code renders into a `Vec` in the host tests.

/// Longest org name the kernel keeps for replies (config names are at most 64 bytes).
pub const NAME_MAX: usize = 64;

/// Where reply bytes go.
pub trait Sink {
    /// Writes `bytes` at `off`; false on failure.
    fn put(&mut self, off: usize, bytes: &[u8]) -> bool;
    /// Writes `n` spaces at `off`; false on failure.
    fn spaces(&mut self, off: usize, n: usize) -> bool;
}

/// Which limit refused the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The daily quota.
    Daily,
    /// The concurrency limit (`concurrency_mode = "reject"`).
    Concurrency,
    /// Not a limit: the connection's framing cannot be followed, so it is closed with a 400
    /// (see [`crate::stream`]).
    BadRequest,
}

/// What goes into one reply (made by [`Reply::new`]).
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    policy: Policy,
    /// The org's name (JSON-safe: config names are `[A-Za-z0-9._-]`), `org_len` bytes of it used.
    pub org: &'a [u8; NAME_MAX],
    pub org_len: usize,
    /// The limit that was hit (daily requests, or concurrent connections).
    limit: u64,
    /// Seconds until the org's day resets (Retry-After of the daily policy).
    reset_secs: u64,
    /// `Connection: keep-alive` instead of `close` (a compact reply always keeps it).
    pub keep_alive: bool,
    /// The full reply, with its problem+json body; false: the compact one, no body.
    pub body: bool,
    /// Digits of the retry seconds and of the limit, counted once (by [`Reply::new`]).
    retry_len: usize,
    limit_len: usize,
}

const fn concat<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut out = [b' '; N];
    let mut o = 0;
    let mut p = 0;
    while p < parts.len() {
        let mut i = 0;
        while i < parts[p].len() {
            out[o] = parts[p][i];
            o += 1;
            i += 1;
        }
        p += 1;
    }
    assert!(o == N, "template length");
    out
}

const fn total(parts: &[&[u8]]) -> usize {
    let mut n = 0;
    let mut p = 0;
    while p < parts.len() {
        n += parts[p].len();
        p += 1;
    }
    n
}

/// Width of the numeric slots (enough for any u64).
const W: usize = 20;
/// Size of the digit work buffer: a power of two ≥ 2·W, so indexes are bounded by a mask (the
/// verifier follows masks, not remainders).
const WORK: usize = 64;

const BODY_START: &[u8] = b"{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\"title\":\"Too Many Requests\",\"status\":429,\"detail\":\"";
const DAILY_MID: &[u8] = b" has used its ";
const DAILY_END: &[u8] = b" API calls for today\",\"violated-policies\":[\"daily\"]}";
const CONC_MID: &[u8] = b" already has ";
const CONC_END: &[u8] =
    b" concurrent API connections open\",\"violated-policies\":[\"concurrency\"]}";
/// The text after the name: middle, number, end.
const TAIL_TEXT: usize = CONC_MID.len() + W + CONC_END.len();
// The text after a name must cover the name's unused bytes (see `Reply::render`).
const _: () = assert!(DAILY_MID.len() + 1 + DAILY_END.len() >= NAME_MAX);
const _: () = assert!(CONC_MID.len() + 1 + CONC_END.len() >= NAME_MAX);
const _: () = assert!(DAILY_MID.len() + DAILY_END.len() <= CONC_MID.len() + CONC_END.len());
/// The body always has this length; what the text does not fill is trailing whitespace.
pub const BODY_LEN: usize = BODY_START.len() + NAME_MAX + TAIL_TEXT;
const BODY_LEN_TEXT: [u8; 3] = [
    b'0' + (BODY_LEN / 100) as u8,
    b'0' + (BODY_LEN / 10 % 10) as u8,
    b'0' + (BODY_LEN % 10) as u8,
];

const H_STATUS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: ";
const H_DAILY_POLICY: &[u8] = b"\r\nRateLimit-Policy: \"daily\";w=86400;q=";
const H_DAILY_RATE: &[u8] = b"\r\nRateLimit: \"daily\";r=0;t=";
const H_CONC_POLICY: &[u8] = b"\r\nRateLimit-Policy: \"concurrency\";qu=\"concurrent-requests\";q=";
const H_CONC_RATE: &[u8] = b"\r\nRateLimit: \"concurrency\";r=0;t=";
const END: &[u8] = b"\r\n\r\n";
const BAD_HEAD: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\nX-Pad: ";
/// The shortest 400 (no padding).
pub const BAD_REQUEST_MIN: usize = BAD_HEAD.len() + END.len();

const fn body_tail(conn: &[u8]) -> [u8; TAIL_FULL] {
    concat(&[
        b"\r\nConnection: ",
        conn,
        b"\r\nContent-Type: application/problem+json\r\nContent-Length: ",
        &BODY_LEN_TEXT,
        b"\r\nX-Pad: ",
    ])
}
/// What follows the last number of a full reply (both Connection values 10 bytes long).
const TAIL_FULL: usize = 2 + 12 + 10 + 42 + 16 + 3 + 9;
static TAIL_KEEP: [u8; TAIL_FULL] = body_tail(b"keep-alive");
/// "close" is padded in front, where the value's leading whitespace is ignored.
static TAIL_CLOSE: [u8; TAIL_FULL] = body_tail(b"     close");
const COMPACT_PARTS: &[&[u8]] = &[b"\r\nContent-Length: 0\r\nX-Pad: "];
/// What follows the last number of a compact reply: no body, the connection stays.
static TAIL_COMPACT: [u8; total(COMPACT_PARTS)] = concat(COMPACT_PARTS);
// The text after a number covers the slot's spaces.
const _: () = assert!(H_DAILY_POLICY.len() >= W && H_DAILY_RATE.len() >= W);
const _: () = assert!(H_CONC_POLICY.len() >= W && H_CONC_RATE.len() >= W);
const _: () = assert!(TAIL_COMPACT.len() + END.len() >= W && TAIL_FULL >= W);

/// Renders the 400 padded to exactly `total` bytes (at least [`BAD_REQUEST_MIN`]).
#[inline(always)]
pub fn render_bad_request(total: usize, sink: &mut impl Sink) -> bool {
    if total < BAD_REQUEST_MIN {
        return false;
    }
    let pad = total - BAD_REQUEST_MIN;
    let mut ok = sink.put(0, BAD_HEAD);
    if pad > 0 {
        ok &= sink.spaces(BAD_HEAD.len(), pad);
    }
    ok & sink.put(BAD_HEAD.len() + pad, END)
}

/// What the verdict hands to the 429 writer it tail-calls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RefuseArgs {
    pub cookie: u64,
    pub org: u32,
    /// `Policy as u32`.
    pub policy: u32,
    /// The chunk is exactly one whole request, from a request boundary to the next, and not a
    /// HEAD request, so a 429 may keep the connection open (the stream stays in step). Found by
    /// the verdict's stream parser.
    pub keep_alive_ok: bool,
    pub _pad: [u8; 7],
}

/// Scratch space for building a reply (a per-CPU map value in the kernel: its stack is small).
#[repr(C)]
pub struct Scratch {
    pub args: RefuseArgs,
    pub work: [u8; WORK],
    /// The limit, as a number slot.
    pub num: [u8; W],
    /// The seconds to wait, as a number slot.
    pub retry: [u8; W],
    /// See [`Scratch::forget`].
    pub cell: u64,
}

impl Scratch {
    pub const fn new() -> Self {
        Scratch {
            args: RefuseArgs {
                cookie: 0,
                org: 0,
                policy: 0,
                keep_alive_ok: false,
                _pad: [0; 7],
            },
            work: [0; WORK],
            num: [0; W],
            retry: [0; W],
            cell: 0,
        }
    }

    /// `v`, passed through this scratch memory. In the kernel the scratch is a map value, so the
    /// verifier forgets what it knew of `v`: a value computed with branches (a digit count is one
    /// exact value per path) becomes a single unknown, and the paths meet again instead of
    /// multiplying through the rest of the program; and comparisons made on the copy do not narrow
    /// the original. Volatile, so the compiler keeps the round trip. The identity on the host.
    #[inline(always)]
    pub fn forget(&mut self, v: u64) -> u64 {
        // SAFETY: a field of `self`, valid for reads and writes.
        unsafe {
            core::ptr::write_volatile(&raw mut self.cell, v);
            core::ptr::read_volatile(&raw const self.cell)
        }
    }

    /// The digit count of `n` (see [`digit_count`]), as an unknown in 0..32 to the verifier.
    #[inline(always)]
    fn digits_of(&mut self, n: u64) -> usize {
        let d = digit_count(self.forget(n));
        (self.forget(d as u64) & (DIGITS_BOUND as u64 - 1)) as usize
    }
}

/// A power of two above any digit count (a mask that tells the verifier the bound).
const DIGITS_BOUND: usize = 32;
const _: () = assert!(DIGITS_BOUND > W);

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Largest number a reply shows: 18 digits, below 2^63 (no limit or time gets near it).
pub const RENDER_MAX: u64 = 999_999_999_999_999_999;

/// `min(n, RENDER_MAX)` (values from 2^62 up first lose their top bits), without a branch.
#[inline(always)]
fn clamp(n: u64) -> u64 {
    let n = n & (u64::MAX >> 2);
    // 1 when n > RENDER_MAX: both are below 2^63, so the difference's sign bit tells.
    let over = RENDER_MAX.wrapping_sub(n) >> 63;
    n - over * (n - RENDER_MAX * over)
}

/// `min(n, max)` for values below 2^63, without a branch.
#[inline(always)]
fn min_branchless(n: usize, max: usize) -> usize {
    let (n, max) = (n as u64 & (u64::MAX >> 1), max as u64);
    let over = max.wrapping_sub(n) >> 63;
    (n - over * (n - max * over)) as usize
}

/// Number of decimal digits of `n` (clamped to RENDER_MAX), without branches (each would double the verifier's paths).
#[inline(always)]
pub fn digit_count(n: u64) -> usize {
    let n = clamp(n);
    let mut d = 1u64;
    let mut p = 10u64;
    let mut k = 1;
    while k < 19 {
        // 1 when n >= p: both are below 2^63, so the difference's sign bit tells.
        d += ((n.wrapping_sub(p) >> 63) ^ 1) & 1;
        p = p.wrapping_mul(10);
        k += 1;
    }
    d as usize
}

/// `n` in decimal (`d` digits: its [`digit_count`]), left-aligned in W bytes and followed by
/// spaces, without branches: the digits are laid out right-aligned with W spaces after them, and
/// the window starting `d` before the end of the digits is read.
#[inline(always)]
pub fn left_aligned(n: u64, d: usize, work: &mut [u8; WORK], out: &mut [u8; W]) {
    let n = clamp(n);
    let mut v = n;
    let mut i = 0;
    while i < W {
        work[W - 1 - i] = b'0' + (v % 10) as u8;
        v /= 10;
        work[W + i] = b' ';
        i += 1;
    }
    let mut j = 0;
    while j < W {
        // The mask keeps the index inside `work` whatever `d` the verifier assumes.
        out[j] = work[(W + j).wrapping_sub(d) & (WORK - 1)];
        j += 1;
    }
}

impl<'a> Reply<'a> {
    /// A full reply that closes the connection. Counts the numbers' digits, through `scratch`.
    #[inline(always)]
    pub fn new(
        policy: Policy,
        org: &'a [u8; NAME_MAX],
        org_len: usize,
        limit: u64,
        reset_secs: u64,
        scratch: &mut Scratch,
    ) -> Self {
        let mut r = Reply {
            policy,
            org,
            org_len,
            limit,
            reset_secs,
            keep_alive: false,
            body: true,
            retry_len: 0,
            limit_len: scratch.digits_of(limit),
        };
        r.retry_len = scratch.digits_of(r.retry());
        r
    }

    /// Which limit this reply is for.
    pub const fn policy(&self) -> Policy {
        self.policy
    }

    /// The seconds the client should wait.
    const fn retry(&self) -> u64 {
        match self.policy {
            Policy::Daily => self.reset_secs,
            Policy::Concurrency | Policy::BadRequest => 1,
        }
    }

    /// The header texts before the limit and before the second retry number.
    const fn texts(&self) -> (&'static [u8], &'static [u8]) {
        match self.policy {
            Policy::Daily => (H_DAILY_POLICY, H_DAILY_RATE),
            Policy::Concurrency | Policy::BadRequest => (H_CONC_POLICY, H_CONC_RATE),
        }
    }

    /// The shortest this reply can be (no padding).
    #[inline(always)]
    pub fn min_len(&self) -> usize {
        if self.policy == Policy::BadRequest {
            return BAD_REQUEST_MIN;
        }
        let (policy, rate) = self.texts();
        let numbers = 2 * self.retry_len + self.limit_len;
        let rest = if self.body {
            TAIL_FULL + END.len() + BODY_LEN
        } else {
            TAIL_COMPACT.len() + END.len()
        };
        H_STATUS.len() + policy.len() + rate.len() + numbers + rest
    }

    /// Renders the reply padded to exactly `total` bytes (at least [`Reply::min_len`]).
    /// Returns false when `total` is too short or the sink failed.
    ///
    /// Every write has a constant length (only offsets vary), and later writes may overlap earlier
    /// ones: each number slot's spaces are overwritten by the text after it, and in the body the
    /// name is written whole (NAME_MAX bytes) and the text after it overwrites the name's unused
    /// bytes. So the kernel needs no byte loops and no length-dependent branches.
    #[inline(always)]
    pub fn render(&self, total: usize, scratch: &mut Scratch, sink: &mut impl Sink) -> bool {
        if self.policy == Policy::BadRequest {
            return render_bad_request(total, sink);
        }
        if total < self.min_len() {
            return false;
        }
        // Blank everything up to the end of the head first, from a fixed offset, before the
        // writes whose offsets depend on the numbers: the verifier walks this loop once.
        let body_len = BODY_LEN * self.body as usize;
        let head_end = total - END.len() - body_len;
        let mut ok = sink.spaces(0, head_end);
        let (policy, rate) = self.texts();
        let retry_len = self.retry_len;
        // The counts again, unbounded to the compiler too: told they are below 32, it turns the
        // masked window index into a pointer minus the count, which the verifier refuses.
        let d = scratch.forget(retry_len as u64) as usize;
        left_aligned(self.retry(), d, &mut scratch.work, &mut scratch.retry);
        let d = scratch.forget(self.limit_len as u64) as usize;
        left_aligned(self.limit, d, &mut scratch.work, &mut scratch.num);
        ok &= sink.put(0, H_STATUS);
        let mut off = H_STATUS.len();
        ok &= sink.put(off, &scratch.retry);
        off += retry_len;
        ok &= sink.put(off, policy);
        off += policy.len();
        ok &= sink.put(off, &scratch.num);
        off += self.limit_len;
        ok &= sink.put(off, rate);
        off += rate.len();
        ok &= sink.put(off, &scratch.retry);
        off += retry_len;
        let tail: &[u8] = match (self.body, self.keep_alive) {
            (false, _) => &TAIL_COMPACT,
            (true, true) => &TAIL_KEEP,
            (true, false) => &TAIL_CLOSE,
        };
        ok &= sink.put(off, tail);
        // The padding between the tail and END is already blank.
        ok &= sink.put(head_end, END);
        let off = head_end + END.len();
        if !self.body {
            return ok;
        }

        // Body: blank, fixed start, the name, then "<mid><limit><end>" right after the name.
        ok &= sink.spaces(off, BODY_LEN);
        ok &= sink.put(off, BODY_START);
        ok &= sink.put(off + BODY_START.len(), self.org);
        let (mid, end): (&[u8], &[u8]) = match self.policy {
            Policy::Daily => (DAILY_MID, DAILY_END),
            Policy::Concurrency | Policy::BadRequest => (CONC_MID, CONC_END),
        };
        let o = off + BODY_START.len() + min_branchless(self.org_len, NAME_MAX);
        ok &= sink.put(o, mid);
        ok &= sink.put(o + mid.len(), &scratch.num);
        ok &= sink.put(o + mid.len() + self.limit_len, end);
        ok
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{
        string::{String, ToString},
        vec,
        vec::Vec,
    };

    use proptest::prelude::*;

    use super::*;

    struct VecSink(Vec<u8>);

    impl Sink for VecSink {
        fn put(&mut self, off: usize, bytes: &[u8]) -> bool {
            if self.0.len() < off + bytes.len() {
                self.0.resize(off + bytes.len(), 0);
            }
            self.0[off..off + bytes.len()].copy_from_slice(bytes);
            true
        }
        fn spaces(&mut self, off: usize, n: usize) -> bool {
            self.put(off, &vec![b' '; n])
        }
    }

    fn render(r: &Reply, total: usize) -> String {
        let mut s = VecSink(Vec::new());
        let mut scratch = Scratch::new();
        assert!(r.render(total, &mut scratch, &mut s), "render to {total}");
        assert_eq!(s.0.len(), total);
        String::from_utf8(s.0).unwrap()
    }

    fn name(org: &str) -> [u8; NAME_MAX] {
        let mut n = [0u8; NAME_MAX];
        n[..org.len()].copy_from_slice(org.as_bytes());
        n
    }

    fn daily(org: &'static [u8; NAME_MAX], len: usize, keep_alive: bool) -> Reply<'static> {
        Reply {
            keep_alive,
            ..Reply::new(Policy::Daily, org, len, 2500, 3600, &mut Scratch::new())
        }
    }

    static ACME: std::sync::LazyLock<[u8; NAME_MAX]> = std::sync::LazyLock::new(|| name("acme"));
    static INITECH: std::sync::LazyLock<[u8; NAME_MAX]> =
        std::sync::LazyLock::new(|| name("initech"));

    /// Splits a response into (status line, headers with trimmed values, body).
    fn parse(text: &str) -> (String, Vec<(String, String)>, String) {
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header colon");
                assert!(!k.contains(' '), "header name {k:?}");
                // Clients strip a value's leading whitespace, not always its trailing one.
                assert!(
                    k == "X-Pad" || !v.ends_with([' ', '\t']),
                    "{k}: {v:?} ends in whitespace"
                );
                (k.to_string(), v.trim_start().to_string())
            })
            .collect();
        (status, headers, body.to_string())
    }

    fn header<'h>(headers: &'h [(String, String)], k: &str) -> Option<&'h str> {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn daily_reply_matches_the_contract() {
        let r = daily(&ACME, 4, false);
        let text = render(&r, r.min_len());
        let (status, headers, body) = parse(&text);
        assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
        assert_eq!(
            header(&headers, "Content-Type"),
            Some("application/problem+json")
        );
        assert_eq!(header(&headers, "Retry-After"), Some("3600"));
        assert_eq!(
            header(&headers, "RateLimit-Policy"),
            Some("\"daily\";w=86400;q=2500")
        );
        assert_eq!(header(&headers, "RateLimit"), Some("\"daily\";r=0;t=3600"));
        assert_eq!(header(&headers, "Connection"), Some("close"));
        assert_eq!(
            header(&headers, "Content-Length"),
            Some(BODY_LEN.to_string().as_str())
        );
        assert_eq!(body.len(), BODY_LEN);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
                "title": "Too Many Requests",
                "status": 429,
                "detail": "acme has used its 2500 API calls for today",
                "violated-policies": ["daily"]
            })
        );
    }

    #[test]
    fn concurrency_reply_names_its_policy() {
        let r = Reply {
            keep_alive: true,
            ..Reply::new(
                Policy::Concurrency,
                &INITECH,
                7,
                3,
                3600,
                &mut Scratch::new(),
            )
        };
        let (_, headers, body) = parse(&render(&r, r.min_len() + 10));
        assert_eq!(
            header(&headers, "RateLimit-Policy"),
            Some("\"concurrency\";qu=\"concurrent-requests\";q=3")
        );
        assert_eq!(header(&headers, "Retry-After"), Some("1"));
        assert_eq!(header(&headers, "Connection"), Some("keep-alive"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["detail"],
            "initech already has 3 concurrent API connections open"
        );
        assert_eq!(v["violated-policies"][0], "concurrency");
    }

    #[test]
    fn bad_request_closes_and_pads_exactly() {
        for total in [BAD_REQUEST_MIN, BAD_REQUEST_MIN + 1, 700, 70_000] {
            let mut s = VecSink(Vec::new());
            assert!(render_bad_request(total, &mut s));
            let text = String::from_utf8(s.0).unwrap();
            assert_eq!(text.len(), total);
            let (status, headers, body) = parse(&text);
            assert_eq!(status, "HTTP/1.1 400 Bad Request");
            assert_eq!(header(&headers, "Connection"), Some("close"));
            assert_eq!(header(&headers, "Content-Length"), Some("0"));
            assert!(body.is_empty());
        }
        assert!(!render_bad_request(
            BAD_REQUEST_MIN - 1,
            &mut VecSink(Vec::new())
        ));
    }

    #[test]
    fn compact_reply_has_the_headers_and_no_body() {
        for (policy, limit, retry, rate_policy) in [
            (Policy::Daily, 2500, "3600", "\"daily\";w=86400;q=2500"),
            (
                Policy::Concurrency,
                3,
                "1",
                "\"concurrency\";qu=\"concurrent-requests\";q=3",
            ),
        ] {
            let r = Reply {
                keep_alive: true,
                body: false,
                ..Reply::new(policy, &ACME, 4, limit, 3600, &mut Scratch::new())
            };
            assert!(r.min_len() < 200, "compact is {} bytes", r.min_len());
            for extra in [0, 1, 37, 5000] {
                let text = render(&r, r.min_len() + extra);
                let (status, headers, body) = parse(&text);
                assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
                assert_eq!(header(&headers, "Retry-After"), Some(retry));
                assert_eq!(header(&headers, "RateLimit-Policy"), Some(rate_policy));
                assert!(
                    header(&headers, "RateLimit")
                        .unwrap()
                        .ends_with(&std::format!("t={retry}"))
                );
                assert_eq!(header(&headers, "Content-Length"), Some("0"));
                assert_eq!(header(&headers, "Connection"), None, "HTTP/1.1 keeps it");
                assert!(body.is_empty());
            }
        }
    }

    #[test]
    fn closing_reply_says_close() {
        let r = daily(&ACME, 4, false);
        let (_, headers, _) = parse(&render(&r, r.min_len()));
        assert_eq!(header(&headers, "Connection"), Some("close"));
        let r = daily(&ACME, 4, true);
        let (_, headers, _) = parse(&render(&r, r.min_len()));
        assert_eq!(header(&headers, "Connection"), Some("keep-alive"));
    }

    #[test]
    fn too_short_a_total_is_refused() {
        let r = daily(&ACME, 4, true);
        let mut s = VecSink(Vec::new());
        assert!(!r.render(r.min_len() - 1, &mut Scratch::new(), &mut s));
    }

    #[test]
    fn numbers_render_left_aligned() {
        let mut work = [0u8; WORK];
        for (n, want) in [
            (0, "0"),
            (9, "9"),
            (10, "10"),
            (86_400, "86400"),
            (999, "999"),
        ] {
            assert_eq!(digit_count(n), want.len());
            let mut out = [0u8; W];
            left_aligned(n, digit_count(n), &mut work, &mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap().trim_end(), want);
        }
        assert_eq!(digit_count(u64::MAX), 18, "clamped");
        let mut out = [0u8; W];
        left_aligned(u64::MAX, digit_count(u64::MAX), &mut work, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap().trim_end(),
            RENDER_MAX.to_string()
        );
    }

    proptest! {
        /// Any padded length yields a well-formed reply: every header parses, the body is exactly
        /// Content-Length bytes of valid JSON naming the org and its limit.
        #[test]
        fn padded_replies_stay_well_formed(
            name in "[A-Za-z0-9._-]{1,64}",
            limit in 0u64..=RENDER_MAX,
            secs in 1u64..10_000_000,
            extra in 0usize..70_000,
            keep in any::<bool>(),
            conc in any::<bool>(),
            full in any::<bool>(),
        ) {
            let org = super::tests::name(&name);
            let policy = if conc { Policy::Concurrency } else { Policy::Daily };
            let r = Reply {
                keep_alive: keep,
                body: full,
                ..Reply::new(policy, &org, name.len(), limit, secs, &mut Scratch::new())
            };
            let text = render(&r, r.min_len() + extra);
            let (status, headers, body) = parse(&text);
            prop_assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
            let cl: usize = header(&headers, "Content-Length").unwrap().parse().unwrap();
            prop_assert_eq!(cl, body.len());
            let want_retry = if conc { 1 } else { secs };
            let retry: u64 = header(&headers, "Retry-After").unwrap().parse().unwrap();
            prop_assert_eq!(retry, want_retry);
            let q = header(&headers, "RateLimit-Policy").unwrap().rsplit_once("q=").unwrap().1;
            prop_assert_eq!(q, limit.to_string());
            if !full {
                prop_assert!(body.is_empty());
                return Ok(());
            }
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let detail = v["detail"].as_str().unwrap().to_string();
            let want = if conc {
                std::format!("{name} already has {limit} concurrent API connections open")
            } else {
                std::format!("{name} has used its {limit} API calls for today")
            };
            prop_assert_eq!(detail, want);
        }
    }
}
