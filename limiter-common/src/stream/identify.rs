//! Who a request belongs to: the stream captures the PROXY header at a connection's start and the
//! values of the identification headers, and [`Stream::settle`] turns them into an org with the
//! kernel's tables (behind [`Resolve`]), in the order of `KernelConfig::identify_by`.

use super::{
    CAP_FWD, CAP_KEY, CAP_PROXY1, CAP_PROXY2, EV_FWD, EV_HEAD, EV_KEY, EV_PROXY,
    F_FRAMING_LINE, S_VALUE,
    ID_CONN_DIRTY, ID_FWD, ID_FWD_OK, ID_KEY_OK, ID_KEY_SEEN, ID_KEYS, ID_OPEN, ID_PER_REQUEST,
    ID_PROXY_OK, ID_REQ_MEDIA, ID_REQ_OPEN, ID_TRUSTED, S_HDR, S_IDLE, S_METHOD, S_PROXY1,
    S_PROXY2, Stream, Tally, WIN, WIN_BUF, first_marked, word,
};
use crate::http::byte_eq_mask;
use crate::ident::{self, CAP, PROXY_V1_MAX, PROXY_V2_SIG, ProxySource};
use crate::maps::{
    AddrKey, ID_ADDRESS, ID_API_KEY, ID_END, ID_FORWARDED, ID_PROXY_PROTOCOL, ID_SOURCES,
    KernelConfig, UNMAPPED_ORG,
};

/// The kernel's tables as identification needs them (maps in the kernel, plain tables in tests).
pub trait Resolve {
    /// The org of an API key digest.
    fn key_org(&self, digest: u64) -> Option<u32>;
    /// The org owning an address, or the unmapped org.
    fn addr_org(&self, addr: &AddrKey) -> u32;
    /// Whether an address is one of `api.trusted_proxies`.
    fn trusted(&self, addr: &AddrKey) -> bool;
    /// Counts at once a request of another org than the rest of its chunk (pipelining): false
    /// when it is over its quota (then the whole chunk is refused).
    fn count_now(&self, org: u32, via: u8, media: bool) -> bool;
    /// A request carried an API key no org has.
    fn unknown_key(&self);
}

const PROXY_V1: u64 = u64::from_le_bytes(*b"PROXY \0\0");
const V1_PREFIX8: [u8; 8] = *b"PROXY \0\0";
const V2_SIG16: [u8; 16] = {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 12 {
        a[i] = PROXY_V2_SIG[i];
        i += 1;
    }
    a
};
const PROXY_V1_MASK: u64 = 0xffff_ffff_ffff;

/// Whether `source` is in `identify_by`.
#[inline(always)]
pub fn listed(cfg: &KernelConfig, source: u8) -> bool {
    let mut i = 0;
    while i < ID_SOURCES {
        if cfg.identify_by[i] == source {
            return true;
        }
        i += 1;
    }
    false
}

impl Stream {
    /// Sets up a new connection's identification: `peer_org` is its peer address's org, `trusted`
    /// whether the peer is a trusted proxy.
    #[inline(always)]
    pub fn open(&mut self, cfg: &KernelConfig, peer_org: u32, trusted: bool) {
        let mut id = ID_OPEN;
        if trusted {
            id |= ID_TRUSTED;
        }
        if cfg.key_header_len > 0 && listed(cfg, ID_API_KEY) {
            id |= ID_KEYS;
        }
        if trusted && cfg.fwd_header_len > 0 && listed(cfg, ID_FORWARDED) {
            id |= ID_FWD;
        }
        self.id = id;
        self.peer_org = peer_org;
        self.via = self.conn_org(cfg).1;
    }

    /// Whether the connection's requests are attributed one by one.
    #[inline(always)]
    pub const fn per_request(&self) -> bool {
        self.id & ID_PER_REQUEST != 0
    }

    /// The org of the connection as a whole (its open-connection count, and its requests unless
    /// they are attributed one by one) and its source: the first of the connection's sources in
    /// `identify_by` that names an org.
    #[inline(always)]
    pub fn conn_org(&self, cfg: &KernelConfig) -> (u32, u8) {
        let mut i = 0;
        while i < ID_SOURCES {
            let s = cfg.identify_by[i];
            let org = match s {
                ID_PROXY_PROTOCOL if self.id & ID_PROXY_OK != 0 => self.proxy_org,
                ID_ADDRESS => self.peer_org,
                ID_END => break,
                _ => UNMAPPED_ORG,
            };
            if org != UNMAPPED_ORG {
                return (org, s);
            }
            i += 1;
        }
        (UNMAPPED_ORG, 0)
    }

    /// A counted request line (`media`: an exempt media GET). On a per-request connection it
    /// counts once its head has ended and named its org.
    #[inline(always)]
    pub(super) fn count(&mut self, media: bool, t: &mut Tally) {
        if self.per_request() {
            self.id &= !ID_REQ_MEDIA;
            self.id |= ID_REQ_OPEN | if media { ID_REQ_MEDIA } else { 0 };
        } else if media {
            t.media += 1;
        } else {
            t.counted += 1;
        }
    }

    /// At a head's end: a per-request connection's request is attributed now.
    #[inline(always)]
    pub(super) fn head_done(&mut self, t: &mut Tally) {
        if self.id & ID_REQ_OPEN != 0 {
            t.event = EV_HEAD;
        }
    }

    /// The connection's first bytes: a PROXY header (v1 `PROXY `, or v2's signature) or not.
    /// Returns the bytes it took (while a prefix of one is being matched byte by byte), or 0
    /// when the stream goes on in the state it set.
    #[inline(always)]
    pub(super) fn start(&mut self, win: &[u8; WIN_BUF], at: usize, n: usize, t: &mut Tally) -> u64 {
        let k = self.sub as usize;
        if k == 0 && at + 12 <= n {
            let w0 = word(win, at);
            let w1 = word(win, at + 8) & 0xffff_ffff;
            if w0 == u64::from_le_bytes(sig8()) && w1 == sig_tail() {
                self.begin_proxy(CAP_PROXY2, 0);
            } else if w0 & PROXY_V1_MASK == PROXY_V1 {
                self.begin_proxy(CAP_PROXY1, 0);
            } else {
                self.state = S_IDLE;
            }
            return 0;
        }
        // Fewer bytes than a signature: match it a byte at a time, keeping what matched.
        let b = win[at & (WIN - 1)];
        if k == 0 {
            self.names = match b {
                b'\r' => 2,
                b'P' => 1,
                _ => {
                    self.state = S_IDLE;
                    return 0;
                }
            };
        }
        // Masked indices into padded copies: the verifier cannot bound a remainder.
        let (expect, whole) = if self.names == 2 {
            (V2_SIG16[k & 15], 12)
        } else {
            (V1_PREFIX8[k & 7], 6)
        };
        if b == expect {
            self.cap[k & (CAP - 1)] = b;
            self.sub += 1;
            if self.sub as usize == whole {
                let kind = if whole == 12 { CAP_PROXY2 } else { CAP_PROXY1 };
                self.begin_proxy(kind, whole as u32);
            }
            return 1;
        }
        let v2 = self.names == 2;
        self.names = 0;
        self.sub = 0;
        if v2 {
            if k <= 4 {
                // "\r\n\r\n" so far: empty lines before a request.
                self.state = S_IDLE;
            } else {
                self.state = S_IDLE;
                self.not_http(t);
                return 1;
            }
        } else {
            // A method that starts like "PROXY ": what matched is its first bytes.
            let mut m = 0u64;
            let mut i = 0;
            while i < 6 {
                if i < k {
                    m |= (self.cap[i] as u64) << (i * 8);
                }
                i += 1;
            }
            self.method = m;
            self.sub = k as u8;
            self.state = S_METHOD;
        }
        0
    }

    #[inline(always)]
    fn begin_proxy(&mut self, kind: u8, have: u32) {
        self.state = if kind == CAP_PROXY1 { S_PROXY1 } else { S_PROXY2 };
        self.cap_kind = kind;
        self.cap_len = have;
        self.sub = 0;
        self.names = 0;
    }

    /// The bytes of a captured item in view: an identification header's value up to its LF,
    /// or a PROXY header. One capture loop for all three, which also finds the LF, so the
    /// verifier walks one loop, not one after another.
    #[inline(always)]
    pub(super) fn captured(&mut self, win: &[u8; WIN_BUF], at: usize, n: usize, t: &mut Tally) -> u64 {
        let state = self.state;
        let mut from = at;
        if state == S_VALUE && self.cap_len == 0 && at < n {
            // A value's leading whitespace is not kept (up to 8 bytes of it per step).
            let w = word(win, at);
            let ows = byte_eq_mask(w, b' ') | byte_eq_mask(w, b'\t');
            let rest = !ows & 0x8080_8080_8080_8080;
            let lead = if rest == 0 { 8 } else { first_marked(rest) };
            from = if at + lead < n { at + lead } else { n };
        }
        let end = if state == S_PROXY2 { self.proxy_v2_end(from, n) } else { n };
        let (took, lf) = self.capture(win, from, end, state != S_PROXY2);
        let used = (from + took - at) as u64;
        match state {
            S_VALUE => {
                if lf {
                    // The LF itself is not part of the value.
                    self.cap_len -= 1;
                    self.state = S_HDR;
                    self.flags |= F_FRAMING_LINE;
                    t.event = if self.cap_kind == CAP_KEY { EV_KEY } else { EV_FWD };
                }
            }
            S_PROXY1 => {
                if self.cap_len as usize > PROXY_V1_MAX {
                    self.broken(t);
                } else if lf {
                    self.proxy_done(t);
                }
            }
            _ => {
                if self.cap_len >= 16 && self.remaining == 0 {
                    if self.sub == 0 {
                        // The fixed part is in: its length says how much follows.
                        self.sub = 1;
                        self.remaining = (ident::proxy_v2_len(self.cap16()) - 16) as u64;
                    }
                    if self.remaining == 0 {
                        self.proxy_done(t);
                    }
                }
            }
        }
        used
    }

    /// Where the PROXY v2 bytes in view end: the fixed part first, then what its length says.
    #[inline(always)]
    fn proxy_v2_end(&mut self, at: usize, n: usize) -> usize {
        let have = self.cap_len as usize;
        if have < 16 {
            let want = 16 - have;
            return if at + want < n { at + want } else { n };
        }
        let avail = (n - at) as u64;
        let take = if self.remaining < avail {
            self.remaining
        } else {
            avail
        };
        self.remaining -= take;
        at + take as usize
    }

    #[inline(always)]
    fn proxy_done(&mut self, t: &mut Tally) {
        self.state = S_IDLE;
        self.remaining = 0;
        self.sub = 0;
        t.event = EV_PROXY;
    }

    /// The capture's first [`CAP`] bytes.
    #[inline(always)]
    fn cap16(&self) -> &[u8; CAP] {
        // SAFETY: `cap` holds CAP_BUF >= CAP bytes.
        unsafe { &*(self.cap.as_ptr() as *const [u8; CAP]) }
    }

    /// Appends `win[at..end]` to `cap`, 8 bytes at a time, up to and including the first LF when
    /// `to_lf`: a key and a PROXY header keep their first bytes, a forwarded list its last (a
    /// ring). A word's bytes past the capture's end land after it (in a forwarded ring, on its
    /// oldest bytes: [`Stream::settle`] blanks them). Returns the bytes taken and whether an LF
    /// ended them.
    #[inline(always)]
    fn capture(&mut self, win: &[u8; WIN_BUF], at: usize, end: usize, to_lf: bool) -> (usize, bool) {
        let ring = self.cap_kind == CAP_FWD;
        let mut k = 0;
        while k < WIN / 8 {
            let p = at + k * 8;
            if p >= end {
                break;
            }
            let w = word(win, p);
            let valid = if end - p < 8 { end - p } else { 8 };
            let mut m = if to_lf { byte_eq_mask(w, b'\n') } else { 0 };
            if valid < 8 {
                m &= (1u64 << (valid * 8)) - 1;
            }
            let cnt = if m != 0 { first_marked(m) + 1 } else { valid };
            let len = self.cap_len as usize;
            if ring || len < CAP {
                let i = len & (CAP - 1);
                // SAFETY: i + 8 <= CAP + 8 = the buffer's size.
                unsafe {
                    let base = self.cap.as_mut_ptr();
                    core::ptr::write_unaligned(base.add(i) as *mut u64, w);
                    if ring && i + 8 > CAP {
                        // Past the ring's end: the same bytes at its start.
                        let over = core::ptr::read_unaligned(base.add(CAP) as *const u64);
                        core::ptr::write_unaligned(base as *mut u64, over);
                    }
                }
            }
            self.cap_len = self.cap_len.saturating_add(cnt as u32);
            if m != 0 {
                return (p - at + cnt, true);
            }
            k += 1;
        }
        (if end > at { end - at } else { 0 }, false)
    }

    /// Resolves what the last step found (`t.event`) with the kernel's tables. `key` is room for
    /// the API key taken out of its header.
    #[inline(always)]
    pub fn settle(&mut self, cfg: &KernelConfig, r: &impl Resolve, key: &mut [u8; CAP], t: &mut Tally) {
        let ev = t.event;
        t.event = 0;
        match ev {
            EV_KEY => {
                if self.id & ID_KEY_SEEN != 0 {
                    // Two key headers: which one the app reads is unknown, so neither counts.
                    self.id &= !ID_KEY_OK;
                    return;
                }
                self.id |= ID_KEY_SEEN;
                if let Some(len) = ident::api_key(cfg.key_kind, self.cap16(), self.cap_len, key) {
                    self.key_digest = ident::siphash24(cfg.key_secret, key, len);
                    self.id |= ID_KEY_OK;
                }
            }
            EV_FWD => {
                if self.cap_len as usize > CAP - 16 {
                    // Cut: the ring's oldest bytes may be a word's overrun, so they are blanked
                    // (a zero byte parses as no address).
                    let mut j = 0;
                    while j < 16 {
                        self.cap[(self.cap_len as usize + j) & (CAP - 1)] = 0;
                        j += 1;
                    }
                }
                let trusted = |a: &AddrKey| r.trusted(a);
                match ident::forwarded_addr(cfg.forwarded_kind, self.cap16(), self.cap_len, &trusted) {
                    Some(a) => {
                        self.fwd_addr = a;
                        self.id |= ID_FWD_OK;
                    }
                    None => self.id &= !ID_FWD_OK,
                }
            }
            EV_PROXY => self.proxy_header(cfg, r, t),
            EV_HEAD => self.request_done(cfg, r, t),
            _ => {}
        }
    }

    /// A whole PROXY header: believed only from a trusted peer, once, and only when
    /// `proxy_protocol` is listed; one the server would refuse breaks the stream.
    #[inline(always)]
    fn proxy_header(&mut self, cfg: &KernelConfig, r: &impl Resolve, t: &mut Tally) {
        let len = self.cap_len as usize;
        let source = if self.cap_kind == CAP_PROXY1 {
            ident::proxy_v1_source(self.cap16(), len)
        } else {
            ident::proxy_v2_source(self.cap16(), if len < CAP { len } else { CAP })
        };
        match source {
            ProxySource::Bad => self.broken(t),
            ProxySource::Addr(a)
                if self.id & (ID_TRUSTED | ID_PROXY_OK) == ID_TRUSTED
                    && listed(cfg, ID_PROXY_PROTOCOL) =>
            {
                self.proxy_addr = a;
                self.proxy_org = r.addr_org(&a);
                self.id |= ID_PROXY_OK | ID_CONN_DIRTY;
                let (org, via) = self.conn_org(cfg);
                self.via = via;
                if t.counted == 0 && t.media == 0 {
                    t.org = org;
                    t.via = via;
                }
            }
            _ => {}
        }
    }

    /// The org of the request whose head just ended: the first source in `identify_by` that
    /// names one.
    #[inline(always)]
    fn identify(&self, cfg: &KernelConfig, r: &impl Resolve) -> (u32, u8) {
        let mut unknown = false;
        let mut found = (UNMAPPED_ORG, 0);
        let mut i = 0;
        while i < ID_SOURCES {
            let s = cfg.identify_by[i];
            let org = match s {
                ID_API_KEY if self.id & ID_KEY_OK != 0 => match r.key_org(self.key_digest) {
                    Some(o) => o,
                    None => {
                        unknown = true;
                        UNMAPPED_ORG
                    }
                },
                ID_PROXY_PROTOCOL if self.id & ID_PROXY_OK != 0 => self.proxy_org,
                ID_FORWARDED if self.id & ID_FWD_OK != 0 => r.addr_org(&self.fwd_addr),
                ID_ADDRESS => self.peer_org,
                ID_END => break,
                _ => UNMAPPED_ORG,
            };
            if org != UNMAPPED_ORG {
                found = (org, s);
                break;
            }
            i += 1;
        }
        if unknown {
            r.unknown_key();
        }
        found
    }

    /// Counts a per-request connection's request under its own org: in the chunk's tally when
    /// it is the chunk's org, at once otherwise.
    #[inline(always)]
    fn request_done(&mut self, cfg: &KernelConfig, r: &impl Resolve, t: &mut Tally) {
        let media = self.id & ID_REQ_MEDIA != 0;
        let (org, via) = self.identify(cfg, r);
        self.id &= !(ID_REQ_OPEN | ID_REQ_MEDIA | ID_KEY_OK | ID_KEY_SEEN | ID_FWD_OK);
        if (t.counted == 0 && t.media == 0) || (t.org == org && t.via == via) {
            t.org = org;
            t.via = via;
            if media {
                t.media += 1;
            } else {
                t.counted += 1;
            }
        } else if !r.count_now(org, via, media) {
            t.other_over = true;
        }
    }
}

/// The v2 signature's first 8 bytes.
#[inline(always)]
const fn sig8() -> [u8; 8] {
    let s = PROXY_V2_SIG;
    [s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]
}

/// The v2 signature's last 4 bytes, as the low half of a little-endian word.
#[inline(always)]
const fn sig_tail() -> u64 {
    let s = PROXY_V2_SIG;
    u32::from_le_bytes([s[8], s[9], s[10], s[11]]) as u64
}
