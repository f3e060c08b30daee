//! The HTTP 429 the kernel answers with.
//!
//! The kernel rewrites the refused request's bytes in place and must keep their length (the
//! kernel advances the socket's read sequence by it), so the reply is padded with an `X-Pad:` header of spaces to exactly the request's length.
//! For the verifier's sake the layout is fixed: numbers sit in fixed-width slots followed by
//! spaces (trailing whitespace is allowed in header values), and the JSON body has a fixed length
//! with trailing whitespace after the object (allowed in JSON). The reply is built in two scratch
//! buffers and written with four stores; the same code renders into a `Vec` in the host tests.

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

/// What goes into one reply.
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    pub policy: Policy,
    /// The org's name (JSON-safe: config names are `[A-Za-z0-9._-]`), `org_len` bytes of it used.
    pub org: &'a [u8; NAME_MAX],
    pub org_len: usize,
    /// The limit that was hit (daily requests, or concurrent connections).
    pub limit: u64,
    /// Seconds until the org's day resets (Retry-After of the daily policy).
    pub reset_secs: u64,
    /// `Connection: keep-alive` instead of `close`.
    pub keep_alive: bool,
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
/// A blank slot.
const SLOT: &[u8] = &[b' '; W];
/// Width of the Connection value.
const CONN_W: usize = 10;

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

const H_STATUS: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/problem+json\r\nRetry-After: ";
const H_DAILY_POLICY: &[u8] = b"\r\nRateLimit-Policy: \"daily\";w=86400;q=";
const H_DAILY_RATE: &[u8] = b"\r\nRateLimit: \"daily\";r=0;t=";
const H_CONC_POLICY: &[u8] = b"\r\nRateLimit-Policy: \"concurrency\";qu=\"concurrent-requests\";q=";
const H_CONC_RATE: &[u8] = b"\r\nRateLimit: \"concurrency\";r=0;t=";
const H_CONN: &[u8] = b"\r\nConnection: ";
const H_LEN: &[u8] = b"\r\nContent-Length: ";
const H_PAD: &[u8] = b"\r\nX-Pad: ";
const END: &[u8] = b"\r\n\r\n";
const BAD_HEAD: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\nX-Pad: ";
/// The shortest 400 (no padding).
pub const BAD_REQUEST_MIN: usize = BAD_HEAD.len() + END.len();

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

const DAILY_PARTS: &[&[u8]] = &[
    H_STATUS,
    SLOT,
    H_DAILY_POLICY,
    SLOT,
    H_DAILY_RATE,
    SLOT,
    H_CONN,
    &[b' '; CONN_W],
    H_LEN,
    &BODY_LEN_TEXT,
    H_PAD,
];
const CONC_PARTS: &[&[u8]] = &[
    H_STATUS,
    SLOT,
    H_CONC_POLICY,
    SLOT,
    H_CONC_RATE,
    SLOT,
    H_CONN,
    &[b' '; CONN_W],
    H_LEN,
    &BODY_LEN_TEXT,
    H_PAD,
];
pub const DAILY_HEAD_LEN: usize = total(DAILY_PARTS);
pub const CONC_HEAD_LEN: usize = total(CONC_PARTS);
static DAILY_HEAD: [u8; DAILY_HEAD_LEN] = concat(DAILY_PARTS);
static CONC_HEAD: [u8; CONC_HEAD_LEN] = concat(CONC_PARTS);

/// Offsets of the slots: (retry, limit, reset, connection), the same scheme for both heads.
const fn slots(policy_len: usize, rate_len: usize) -> [usize; 4] {
    let retry = H_STATUS.len();
    let limit = retry + W + policy_len;
    let reset = limit + W + rate_len;
    let conn = reset + W + H_CONN.len();
    [retry, limit, reset, conn]
}
const DAILY_SLOTS: [usize; 4] = slots(H_DAILY_POLICY.len(), H_DAILY_RATE.len());
const CONC_SLOTS: [usize; 4] = slots(H_CONC_POLICY.len(), H_CONC_RATE.len());

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
    pub num: [u8; W],
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
        }
    }
}

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

/// `n` in decimal, left-aligned in W bytes and followed by spaces, without branches: the digits
/// are laid out right-aligned with W spaces after them, and the window starting `d` before the
/// end of the digits is read.
#[inline(always)]
pub fn left_aligned(n: u64, work: &mut [u8; WORK], out: &mut [u8; W]) {
    let n = clamp(n);
    let d = digit_count(n);
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
        // d in 1..=W, so the index stays inside `work`.
        out[j] = work[(W - d + j) & (WORK - 1)];
        j += 1;
    }
}

impl Reply<'_> {
    pub const fn head_len(&self) -> usize {
        match self.policy {
            Policy::Daily => DAILY_HEAD_LEN,
            Policy::Concurrency | Policy::BadRequest => CONC_HEAD_LEN,
        }
    }

    /// The shortest this reply can be (no padding).
    pub const fn min_len(&self) -> usize {
        match self.policy {
            Policy::BadRequest => BAD_REQUEST_MIN,
            _ => self.head_len() + END.len() + BODY_LEN,
        }
    }

    /// Renders the reply padded to exactly `total` bytes (at least [`Reply::min_len`]).
    /// Returns false when `total` is too short or the sink failed.
    ///
    /// Every write has a constant length (only offsets vary), and later writes may overlap earlier
    /// ones: the body is blanked, then the name is written whole (NAME_MAX bytes) and the text
    /// after it overwrites the name's unused bytes. So the kernel needs no byte loops and no
    /// length-dependent branches.
    #[inline(always)]
    pub fn render(&self, total: usize, scratch: &mut Scratch, sink: &mut impl Sink) -> bool {
        if self.policy == Policy::BadRequest {
            return render_bad_request(total, sink);
        }
        let min = self.min_len();
        if total < min {
            return false;
        }
        let pad = total - min;
        let (template, at): (&[u8], [usize; 4]) = match self.policy {
            Policy::Daily => (&DAILY_HEAD, DAILY_SLOTS),
            Policy::Concurrency | Policy::BadRequest => (&CONC_HEAD, CONC_SLOTS),
        };
        let retry = match self.policy {
            Policy::Daily => self.reset_secs,
            Policy::Concurrency | Policy::BadRequest => 1,
        };
        let mut ok = sink.put(0, template);
        left_aligned(retry, &mut scratch.work, &mut scratch.num);
        ok &= sink.put(at[0], &scratch.num);
        ok &= sink.put(at[2], &scratch.num);
        left_aligned(self.limit, &mut scratch.work, &mut scratch.num);
        ok &= sink.put(at[1], &scratch.num);
        let conn: &[u8; CONN_W] = if self.keep_alive {
            b"keep-alive"
        } else {
            b"close     "
        };
        ok &= sink.put(at[3], conn);
        let mut off = self.head_len();
        if pad > 0 {
            ok &= sink.spaces(off, pad);
            off += pad;
        }
        ok &= sink.put(off, END);
        off += END.len();

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
        ok &= sink.put(o + mid.len() + digit_count(self.limit), end);
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
            policy: Policy::Daily,
            org,
            org_len: len,
            limit: 2500,
            reset_secs: 3600,
            keep_alive,
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
                (k.to_string(), v.trim().to_string())
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
            policy: Policy::Concurrency,
            limit: 3,
            ..daily(&INITECH, 7, true)
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
            left_aligned(n, &mut work, &mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap().trim_end(), want);
        }
        assert_eq!(digit_count(u64::MAX), 18, "clamped");
        let mut out = [0u8; W];
        left_aligned(u64::MAX, &mut work, &mut out);
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
        ) {
            let org = super::tests::name(&name);
            let r = Reply {
                policy: if conc { Policy::Concurrency } else { Policy::Daily },
                org: &org,
                org_len: name.len(),
                limit,
                reset_secs: secs,
                keep_alive: keep,
            };
            let text = render(&r, r.min_len() + extra);
            let (status, headers, body) = parse(&text);
            prop_assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
            let cl: usize = header(&headers, "Content-Length").unwrap().parse().unwrap();
            prop_assert_eq!(cl, body.len());
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let detail = v["detail"].as_str().unwrap().to_string();
            prop_assert!(detail.starts_with(&name), "{}", detail);
            prop_assert!(detail.contains(&limit.to_string()), "{}", detail);
            let want_retry = if conc { 1 } else { secs };
            let retry: u64 = header(&headers, "Retry-After").unwrap().parse().unwrap();
            prop_assert_eq!(retry, want_retry);
        }
    }
}
