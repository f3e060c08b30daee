//! Knowing a request's org by what it carries: an API key, a PROXY protocol header, a forwarded
//! header.
//!
//! The kernel captures a header value (or a connection's first bytes) into a fixed [`CAP`]-byte
//! buffer. Reading it in one call with a loop over its bytes is past the verifier's reach (it
//! follows every path of every iteration: a 128-byte loop over an IPv6 text or a Basic value
//! passed its million instructions). So each parser is a small state machine, `#[repr(C)]` and
//! `Pod`, that takes one byte (or one step) per call: the kernel keeps it in map memory, whose
//! values the verifier does not track, and calls it once per `bpf_loop` iteration, so the
//! verifier checks one call:
//!
//! | reads | state | kernel | host |
//! |---|---|---|---|
//! | an API key header | [`KeyText`] | `push` per byte, `finish` | [`api_key`] |
//! | IP text | [`AddrText`] | `push` per byte, `finish` | [`parse_addr`] |
//! | a forwarded header | [`FwdStream`] | `push` per byte, `line_end` per line, `result` | [`forwarded_stream`] |
//! | a PROXY v1 line | [`V1Text`] | `push` per byte, `finish` | [`proxy_v1_source`] |
//!
//! [`siphash13`], [`proxy_start`], [`proxy_v2_len`] and [`proxy_v2_source`] are cheap enough to
//! call whole. The host functions (the daemon's and the tests' entry points) drive the same state
//! machines over a buffer. Everything is written for the verifier: no allocation, no panics,
//! every index masked into its array, loops bounded by constants.
//!
//! A PROXY header is captured linearly (byte `i` at `buf[i]`, the first [`CAP`] bytes kept); a
//! key header and a forwarded header are read as they stream past, with no buffer. The tests
//! keep `FwdText`, a reader of a forwarded value captured as a ring (the last [`CAP`] bytes,
//! right to left, as proxies append), as the reference [`FwdStream`] is held to.

use bytemuck::{Pod, Zeroable};

use crate::http::{byte_eq_mask, first_marked};

use crate::maps::{
    API_KEY_MAX, AddrKey, FWD_FORWARDED, FWD_X_FORWARDED_FOR, FWD_X_REAL_IP, KEY_AUTHORIZATION,
    KEY_PLAIN, v4_mapped,
};

/// Bytes of a captured header value (a power of two: indexes are masked with `CAP - 1`).
pub const CAP: usize = 128;
const M: usize = CAP - 1;
const _: () = assert!(CAP == API_KEY_MAX && CAP.is_power_of_two());
const _: () = assert!(core::mem::size_of::<AddrText>() == 28);

/// Longest IPv6 text (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
pub const IPV6_TEXT_MAX: usize = 45;
/// Entries of a forwarded header examined from the right; a request that passed more trusted
/// proxies than this is not identified by the header.
pub const FWD_ENTRIES_MAX: usize = 8;

/// Longest PROXY protocol v1 line, `\r\n` included.
pub const PROXY_V1_MAX: usize = 107;
/// What a PROXY protocol v1 header starts with.
pub const PROXY_V1_PREFIX: [u8; 6] = *b"PROXY ";
/// What a PROXY protocol v2 header starts with.
pub const PROXY_V2_SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// The fixed part of a v2 header: signature, version and command, family and protocol, length.
pub const PROXY_V2_FIXED: usize = 16;

#[inline(always)]
const fn at(buf: &[u8; CAP], i: usize) -> u8 {
    buf[i & M]
}

#[inline(always)]
const fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() { b | 0x20 } else { b }
}

/// Whitespace around header values and list elements (OWS), and the line end the capture keeps.
#[inline(always)]
const fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

#[inline(always)]
const fn hex(b: u8) -> Option<u32> {
    match b {
        b'0'..=b'9' => Some((b - b'0') as u32),
        b'a'..=b'f' => Some((b - b'a' + 10) as u32),
        b'A'..=b'F' => Some((b - b'A' + 10) as u32),
        _ => None,
    }
}

/// Whether `buf[start..]` (below `end`) begins with `pat`, ASCII case ignored (`pat` lowercase).
#[cfg(test)]
#[inline(always)]
fn starts_with_ci<const N: usize>(
    buf: &[u8; CAP],
    start: usize,
    end: usize,
    pat: &[u8; N],
) -> bool {
    if end < start + N {
        return false;
    }
    let mut k = 0;
    while k < N {
        if lower(at(buf, start + k)) != pat[k] {
            return false;
        }
        k += 1;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// SipHash

struct Sip {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl Sip {
    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }
}

/// Which keyed digest API_KEYS holds: SipHash-1-3 (one round per word, three to finish), the
/// variant Rust's and CPython's hash tables use against crafted collisions: 8 rounds for a
/// 36-byte key where SipHash-2-4 took 14, in a kernel where a rotation takes three
/// instructions. A build that changes the digest bumps this: it names the map layout, so
/// pinned digests of another format are never read as its own.
pub const KEY_DIGEST_FORMAT: u32 = 13;

/// SipHash-1-3 (64-bit output) of `data[..len]` (`len` above [`CAP`] counts as [`CAP`]): the
/// keyed digest API_KEYS is indexed by, so that the kernel never holds a raw key and no client
/// can craft a key that lands on another org's digest. Equal to `siphasher`'s `SipHasher13`.
#[inline(always)]
pub fn siphash13(k: [u64; 2], data: &[u8; CAP], len: usize) -> u64 {
    let len = if len > CAP { CAP } else { len };
    let mut s = Sip {
        v0: k[0] ^ 0x736f_6d65_7073_6575,
        v1: k[1] ^ 0x646f_7261_6e64_6f6d,
        v2: k[0] ^ 0x6c79_6765_6e65_7261,
        v3: k[1] ^ 0x7465_6462_7974_6573,
    };
    let mut i = 0;
    while i < CAP / 8 {
        let o = i * 8;
        if o + 8 > len {
            break;
        }
        let w = u64::from_le_bytes([
            at(data, o),
            at(data, o + 1),
            at(data, o + 2),
            at(data, o + 3),
            at(data, o + 4),
            at(data, o + 5),
            at(data, o + 6),
            at(data, o + 7),
        ]);
        s.compress(w);
        i += 1;
    }
    // The last 0..7 bytes, with the length in the top byte.
    let base = len & !7;
    let mut last = (len as u64) << 56;
    let mut j = 0;
    while j < 7 {
        if base + j < len {
            last |= (at(data, base + j) as u64) << (8 * j);
        }
        j += 1;
    }
    s.compress(last);
    s.v2 ^= 0xff;
    s.round();
    s.round();
    s.round();
    s.v0 ^ s.v1 ^ s.v2 ^ s.v3
}

// ---------------------------------------------------------------------------------------------
// API keys

/// A byte an API key may hold: visible ASCII. The kernel takes nothing else from a header, so the
/// daemon refuses keys with other bytes in the keys file (they could never match).
#[inline(always)]
pub const fn valid_key_byte(b: u8) -> bool {
    b > 0x20 && b < 0x7f
}

/// Where [`KeyText`] writes a key's bytes: a buffer (host side), or a [`KeyHash`] that digests
/// them as they come (the kernel, which then needs no buffer per connection).
pub trait KeySink {
    /// Key byte `i` (written in order, `i < CAP`).
    fn put(&mut self, i: usize, b: u8);
}

impl KeySink for [u8; CAP] {
    #[inline(always)]
    fn put(&mut self, i: usize, b: u8) {
        self[i & M] = b;
    }
}

/// [`siphash13`] taken a byte at a time: the kernel digests a key header's value as the
/// stream reads it, so a key split across segments (or sent byte by byte) needs no buffer, only
/// these 48 bytes in the connection's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KeyHash {
    pub v: [u64; 4],
    /// The bytes of the current word not yet compressed, little-endian.
    pub tail: u64,
    /// Bytes taken.
    pub n: u32,
    pub _pad: u32,
}

impl KeyHash {
    pub const fn new(k: [u64; 2]) -> Self {
        KeyHash {
            v: [
                k[0] ^ 0x736f_6d65_7073_6575,
                k[1] ^ 0x646f_7261_6e64_6f6d,
                k[0] ^ 0x6c79_6765_6e65_7261,
                k[1] ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            n: 0,
            _pad: 0,
        }
    }

    /// Back to [`Self::new`], field by field (volatile): a whole-struct store becomes a
    /// byte-at-a-time memset that the verifier walks byte by byte.
    #[inline(always)]
    pub fn reset(&mut self, k: [u64; 2]) {
        // SAFETY: plain fields of `self`.
        unsafe {
            use core::ptr::write_volatile as put;
            put(&mut self.v[0], k[0] ^ 0x736f_6d65_7073_6575);
            put(&mut self.v[1], k[1] ^ 0x646f_7261_6e64_6f6d);
            put(&mut self.v[2], k[0] ^ 0x6c79_6765_6e65_7261);
            put(&mut self.v[3], k[1] ^ 0x7465_6462_7974_6573);
            put(&mut self.tail, 0);
            put(&mut self.n, 0);
        }
    }

    /// A SipHash round on `v`, in place (the kernel's stack is small).
    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    #[inline(always)]
    fn compress(v: &mut [u64; 4], m: u64) {
        v[3] ^= m;
        Self::round(v);
        v[0] ^= m;
    }

    /// The next `k` (1 to 8) bytes of the key at once: the low `k` bytes of `w`.
    #[inline(always)]
    pub fn take_bytes(&mut self, w: u64, k: usize) {
        let k = if k > 8 { 8 } else { k };
        let m = if k >= 8 {
            w
        } else {
            w & ((1u64 << (8 * k)) - 1)
        };
        let r = (self.n & 7) as usize * 8;
        let full = self.tail | (m << r);
        if r + 8 * k >= 64 {
            Self::compress(&mut self.v, full);
            self.tail = if r == 0 { 0 } else { m >> (64 - r) };
        } else {
            self.tail = full;
        }
        self.n = self.n.wrapping_add(k as u32);
    }

    /// The next byte of the key.
    #[inline(always)]
    pub fn take(&mut self, b: u8) {
        self.tail |= (b as u64) << ((self.n & 7) * 8);
        self.n = self.n.wrapping_add(1);
        if self.n & 7 == 0 {
            Self::compress(&mut self.v, self.tail);
            self.tail = 0;
        }
    }

    /// The digest of the bytes taken: [`siphash13`] of them. Spends the state.
    #[inline(always)]
    pub fn finish(&mut self) -> u64 {
        let last = self.tail | ((self.n as u64) << 56);
        Self::compress(&mut self.v, last);
        self.v[2] ^= 0xff;
        Self::round(&mut self.v);
        Self::round(&mut self.v);
        Self::round(&mut self.v);
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

impl KeySink for KeyHash {
    #[inline(always)]
    fn put(&mut self, _i: usize, b: u8) {
        self.take(b);
    }
}

/// Reads an API key header's value a byte at a time (see [`api_key`] for what it takes), writing
/// the key's bytes to an output buffer as it goes.
///
/// For the kernel: the state lives in map memory and [`Self::push`] runs once per `bpf_loop`
/// iteration (a loop over the value in one call passes the verifier's limit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KeyText {
    /// Key bytes written.
    pub n: u32,
    /// Base64 bits not yet decoded.
    pub acc: u32,
    /// Bytes pushed.
    pub seen: u32,
    pub bits: u8,
    /// Base64 characters and `=` read.
    pub chars: u8,
    pub pad: u8,
    /// `KT_*`.
    pub phase: u8,
    /// Position in the scheme's name.
    pub sub: u8,
    /// The schemes the name may still be (`SCHEME_*`).
    pub cand: u8,
    /// `K_*`.
    pub flags: u8,
    /// `KEY_*`.
    pub kind: u8,
}

/// Leading blanks.
const KT_LEAD: u8 = 0;
/// The Authorization scheme's name.
const KT_SCHEME: u8 = 1;
/// Spaces after the scheme.
const KT_SPACES: u8 = 2;
/// A plain key or a Bearer token.
const KT_TOKEN: u8 = 3;
/// Basic credentials (base64).
const KT_BASIC: u8 = 4;
const SCHEME_BEARER: u8 = 1;
const SCHEME_BASIC: u8 = 2;
const BEARER: [u8; 8] = *b"bearer\0\0";
const BASIC: [u8; 8] = *b"basic\0\0\0";
const K_BAD: u8 = 1;
/// A blank was read after the key: only blanks may follow.
const K_TRAILING: u8 = 2;
/// The Basic user name is complete (its `:` was decoded).
const K_USER: u8 = 4;

impl KeyText {
    /// The state before a `kind` (`KEY_*`) value's first byte.
    pub const fn new(kind: u8) -> Self {
        KeyText {
            n: 0,
            acc: 0,
            seen: 0,
            bits: 0,
            chars: 0,
            pad: 0,
            phase: KT_LEAD,
            sub: 0,
            cand: SCHEME_BEARER | SCHEME_BASIC,
            flags: if kind == KEY_PLAIN || kind == KEY_AUTHORIZATION {
                0
            } else {
                K_BAD
            },
            kind,
        }
    }

    /// Back to [`Self::new`], field by field (volatile, as [`KeyHash::reset`]).
    #[inline(always)]
    pub fn reset(&mut self, kind: u8) {
        let n = Self::new(kind);
        // SAFETY: plain fields of `self`.
        unsafe {
            use core::ptr::write_volatile as put;
            put(&mut self.n, 0);
            put(&mut self.acc, 0);
            put(&mut self.seen, 0);
            put(&mut self.bits, 0);
            put(&mut self.chars, 0);
            put(&mut self.pad, 0);
            put(&mut self.phase, n.phase);
            put(&mut self.sub, 0);
            put(&mut self.cand, n.cand);
            put(&mut self.flags, n.flags);
            put(&mut self.kind, kind);
        }
    }

    #[inline(always)]
    fn bad(&mut self) {
        self.flags |= K_BAD;
    }

    /// The value's next byte; key bytes go to `out`. The kernel may push the first [`CAP`]
    /// bytes of a longer value (see [`Self::finish`]) or all of them.
    #[inline(always)]
    pub fn push(&mut self, b: u8, out: &mut impl KeySink) {
        self.seen = self.seen.saturating_add(1);
        if self.flags & K_BAD != 0 {
            return;
        }
        match self.phase {
            KT_LEAD => {
                if is_blank(b) {
                    return;
                }
                if self.kind == KEY_PLAIN {
                    self.phase = KT_TOKEN;
                    self.token(b, out);
                } else {
                    self.phase = KT_SCHEME;
                    self.scheme(b);
                }
            }
            KT_SCHEME => self.scheme(b),
            KT_SPACES => {
                if b == b' ' {
                    return;
                }
                if self.cand == SCHEME_BEARER {
                    self.phase = KT_TOKEN;
                    self.token(b, out);
                } else {
                    self.phase = KT_BASIC;
                    self.basic(b, out);
                }
            }
            KT_TOKEN => self.token(b, out),
            _ => self.basic(b, out),
        }
    }

    /// The first `avail` (at most 8) bytes of `w` (little-endian) at once, as far as
    /// [`Self::push`] would take them as key bytes: the blanks before a plain key, then the
    /// key's bytes up to the first that is not one. How many were taken; 0 (nothing taken)
    /// when none, and then the byte goes through `push`. The kernel's fast path: a byte per
    /// `bpf_loop` turn made a 40-byte key cost microseconds.
    #[inline(always)]
    pub fn take_run(&mut self, w: u64, avail: usize, hash: &mut KeyHash) -> usize {
        const HI: u64 = 0x8080_8080_8080_8080;
        let lead_ok = self.phase == KT_LEAD && self.kind == KEY_PLAIN;
        if (self.phase != KT_TOKEN && !lead_ok)
            || self.flags != 0
            || self.seen as usize + 8 > crate::stream::KEY_VALUE_MAX
        {
            return 0;
        }
        let low7 = w & !HI;
        // Marks on the bytes in 0x21..=0x7e: no high bit, low 7 bits at least 0x21, not 0x7f.
        let visible = ((low7 + 0x5f5f_5f5f_5f5f_5f5f) & !(low7 + 0x0101_0101_0101_0101) & !w) & HI;
        let lead = if lead_ok {
            let blank = byte_eq_mask(w, b' ') | byte_eq_mask(w, b'\t');
            let rest = !blank & HI;
            if rest == 0 { 8 } else { first_marked(rest) }
        } else {
            0
        };
        if lead >= avail || lead >= 8 {
            return 0;
        }
        // Key bytes from `lead` on, up to the first other byte or `avail`.
        let stop = !visible & HI & (u64::MAX << (8 * lead));
        let end = if stop == 0 { 8 } else { first_marked(stop) };
        let end = if end < avail { end } else { avail };
        if end <= lead || self.n as usize + (end - lead) > CAP {
            return 0;
        }
        let run = end - lead;
        hash.take_bytes(w >> (8 * lead), run);
        self.phase = KT_TOKEN;
        self.n += run as u32;
        self.seen += end as u32;
        end
    }

    /// A byte of the scheme's name (case ignored), or the space that ends it.
    #[inline(always)]
    fn scheme(&mut self, b: u8) {
        let pos = self.sub as usize & 7;
        if b == b' ' {
            self.cand &= if pos == 6 {
                SCHEME_BEARER
            } else if pos == 5 {
                SCHEME_BASIC
            } else {
                0
            };
            if self.cand == 0 {
                return self.bad();
            }
            self.phase = KT_SPACES;
            return;
        }
        let l = lower(b);
        if pos >= 6 || BEARER[pos] != l {
            self.cand &= !SCHEME_BEARER;
        }
        if pos >= 5 || BASIC[pos] != l {
            self.cand &= !SCHEME_BASIC;
        }
        if self.cand == 0 {
            return self.bad();
        }
        self.sub += 1;
    }

    /// Blanks may only end the value: true when `b` is taken care of.
    #[inline(always)]
    fn trailing(&mut self, b: u8) -> bool {
        if is_blank(b) {
            self.flags |= K_TRAILING;
            return true;
        }
        if self.flags & K_TRAILING != 0 {
            self.bad();
            return true;
        }
        false
    }

    #[inline(always)]
    fn token(&mut self, b: u8, out: &mut impl KeySink) {
        if self.trailing(b) {
            return;
        }
        if !valid_key_byte(b) || self.n as usize >= CAP {
            return self.bad();
        }
        out.put(self.n as usize, b);
        self.n += 1;
    }

    /// RFC 7617: base64 (standard alphabet) of `user:password`; the user name is decoded into
    /// `out`, the rest only checked to be base64.
    #[inline(always)]
    fn basic(&mut self, b: u8, out: &mut impl KeySink) {
        if self.trailing(b) {
            return;
        }
        if b == b'=' {
            if self.pad >= 2 {
                return self.bad();
            }
            self.pad += 1;
            self.chars = self.chars.wrapping_add(1);
            return;
        }
        let Some(v) = base64_value(b) else {
            return self.bad();
        };
        if self.pad > 0 {
            return self.bad();
        }
        self.chars = self.chars.wrapping_add(1);
        self.acc = ((self.acc << 6) | v) & 0xfff;
        self.bits += 6;
        if self.bits < 8 {
            return;
        }
        self.bits -= 8;
        let c = (self.acc >> (self.bits & 7)) as u8;
        if self.flags & K_USER != 0 {
            return;
        }
        if c == b':' {
            self.flags |= K_USER;
        } else if valid_key_byte(c) && (self.n as usize) < CAP {
            out.put(self.n as usize, c);
            self.n += 1;
        } else {
            self.bad();
        }
    }

    /// The key's length in `out` once the bytes are pushed; `len` is the value's whole length.
    /// When fewer bytes were pushed, the value was cut: a plain key or a token is then too long
    /// (longer than [`API_KEY_MAX`] anyway), and a Basic user name counts only when its `:` was
    /// pushed.
    #[inline(always)]
    pub fn finish(&self, len: u32) -> Option<usize> {
        if self.flags & K_BAD != 0 || self.n == 0 {
            return None;
        }
        let truncated = len > self.seen;
        match self.phase {
            KT_TOKEN if !truncated => Some(self.n as usize),
            KT_BASIC => {
                if self.flags & K_USER == 0 {
                    return None;
                }
                // Whole base64: full quanta with their padding, or unpadded with no lone
                // character left over.
                let whole = if self.pad > 0 {
                    self.chars & 3 == 0
                } else {
                    self.chars & 3 != 1
                };
                if truncated || whole {
                    Some(self.n as usize)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// The API key of a captured key header value (`len` = the value's whole length, `value` its
/// first bytes): the key's bytes go to `out`, their number is returned. `kind` is a `KEY_*`:
/// the value itself, or an `Authorization` value's Bearer token or Basic user name. None when the
/// value holds no usable key (empty, another scheme, bad base64, a byte that is not visible
/// ASCII, or a key longer than [`API_KEY_MAX`], which no org can have). Host side and tests: the
/// kernel drives [`KeyText`] from `bpf_loop`.
pub fn api_key(kind: u8, value: &[u8; CAP], len: u32, out: &mut [u8; CAP]) -> Option<usize> {
    let mut t = KeyText::new(kind);
    let mut i = 0;
    while i < CAP {
        if i >= len as usize {
            break;
        }
        t.push(at(value, i), out);
        i += 1;
    }
    t.finish(len)
}

#[inline(always)]
const fn base64_value(b: u8) -> Option<u32> {
    match b {
        b'A'..=b'Z' => Some((b - b'A') as u32),
        b'a'..=b'z' => Some((b - b'a' + 26) as u32),
        b'0'..=b'9' => Some((b - b'0' + 52) as u32),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses

/// Reads IP text a byte at a time (IPv4 dotted quad, or IPv6: full, `::`-compressed, with an
/// IPv4 suffix; no zone), accepting exactly what `std::net::IpAddr` accepts.
///
/// For the kernel: a loop over the bytes with its state on the stack multiplies the verifier's
/// paths past its limit, so the kernel keeps this state in map memory and calls [`Self::push`]
/// once per `bpf_loop` iteration (the verifier then checks one push, with unknown state).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrText {
    /// The IPv6 groups read so far (an IPv4 part fills two of them as it is read).
    pub groups: [u16; 8],
    /// The current group, in hex.
    pub val: u16,
    /// The current token in decimal (an IPv4 octet).
    pub dec: u16,
    /// Bytes pushed.
    pub len: u8,
    /// Groups in `groups` (before an IPv4 part).
    pub ng: u8,
    /// Where `::` stands among the groups ([`NO_GAP`]: nowhere).
    pub gap: u8,
    /// Digits of the current token.
    pub digits: u8,
    /// IPv4 octets completed.
    pub octets: u8,
    /// `A_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// [`AddrText::gap`] when there is no `::`.
pub const NO_GAP: u8 = 0xff;
const A_BAD: u8 = 1;
/// The last byte was a `:` ending a group.
const A_COLON: u8 = 2;
/// The last bytes were `::`.
const A_DCOLON: u8 = 4;
/// The text began with a single `:` (a second must follow).
const A_LEAD: u8 = 8;
/// A `:` was seen: IPv6.
const A_V6: u8 = 16;
/// In the dotted IPv4 part.
const A_V4: u8 = 32;
/// The current token is no decimal octet (a hex letter, a leading zero).
const A_NOT_DEC: u8 = 64;

impl Default for AddrText {
    fn default() -> Self {
        Self::new()
    }
}

impl AddrText {
    pub const fn new() -> Self {
        AddrText {
            groups: [0; 8],
            val: 0,
            dec: 0,
            len: 0,
            ng: 0,
            gap: NO_GAP,
            digits: 0,
            octets: 0,
            flags: 0,
            _pad: [0; 2],
        }
    }

    /// Back to [`Self::new`] in place, as words (volatile): the kernel's PROXY v1 reader has
    /// no stack to spare for a new one.
    #[inline(always)]
    pub fn reset(&mut self) {
        // SAFETY: `AddrText` is 28 bytes of 2-aligned plain data (Pod); as fourteen u16 words,
        // the new state is all zero but `gap`.
        unsafe {
            let w = self as *mut AddrText as *mut u16;
            let mut i = 0;
            while i < 14 {
                core::ptr::write_volatile(w.add(i), 0);
                i += 1;
            }
        }
        self.gap = NO_GAP;
    }

    /// Whether the text is already known not to be an address.
    #[inline(always)]
    pub const fn is_bad(&self) -> bool {
        self.flags & A_BAD != 0
    }

    /// Whether the text is IPv6 so far (it has a `:`).
    #[inline(always)]
    pub const fn is_v6(&self) -> bool {
        self.flags & A_V6 != 0
    }

    #[inline(always)]
    fn bad(&mut self) {
        self.flags |= A_BAD;
    }

    /// The next byte of the text.
    #[inline(always)]
    pub fn push(&mut self, b: u8) {
        if self.flags & A_BAD != 0 {
            return;
        }
        if self.len as usize >= IPV6_TEXT_MAX {
            return self.bad();
        }
        self.len += 1;
        match b {
            b':' => self.colon(),
            b'.' => self.dot(),
            _ => match hex(b) {
                Some(h) => self.digit(h as u16, b.is_ascii_digit()),
                None => self.bad(),
            },
        }
    }

    #[inline(always)]
    fn digit(&mut self, h: u16, decimal: bool) {
        let f = self.flags;
        if f & A_LEAD != 0 {
            return self.bad();
        }
        self.flags = f & !(A_COLON | A_DCOLON);
        if f & A_V4 != 0 {
            // An octet: decimal, no leading zero, at most 255.
            if !decimal || (self.digits > 0 && self.dec == 0) {
                return self.bad();
            }
            self.dec = self.dec * 10 + h;
            self.digits += 1;
            if self.dec > 255 {
                self.bad();
            }
            return;
        }
        if self.digits >= 4 {
            return self.bad();
        }
        self.val = (self.val << 4) | h;
        self.digits += 1;
        // The same token read as a decimal octet, in case a `.` follows.
        if !decimal || (self.digits > 1 && self.dec == 0) {
            self.flags |= A_NOT_DEC;
        } else {
            self.dec = self.dec * 10 + h;
        }
    }

    #[inline(always)]
    fn colon(&mut self) {
        let f = self.flags;
        if f & A_V4 != 0 || f & A_DCOLON != 0 {
            return self.bad();
        }
        self.flags = f | A_V6;
        if f & A_LEAD != 0 {
            // The leading `::`.
            self.gap = 0;
            self.flags = (self.flags & !A_LEAD) | A_DCOLON;
            return;
        }
        if self.digits > 0 {
            if self.ng >= 8 {
                return self.bad();
            }
            self.groups[self.ng as usize & 7] = self.val;
            self.ng += 1;
            self.val = 0;
            self.dec = 0;
            self.digits = 0;
            self.flags = (self.flags & !A_NOT_DEC) | A_COLON;
        } else if f & A_COLON != 0 {
            if self.gap != NO_GAP {
                return self.bad();
            }
            self.gap = self.ng;
            self.flags = (self.flags & !A_COLON) | A_DCOLON;
        } else {
            // Only the very first byte gets here.
            self.flags |= A_LEAD;
        }
    }

    #[inline(always)]
    fn dot(&mut self) {
        let f = self.flags;
        if self.digits == 0 {
            return self.bad();
        }
        if f & A_V4 == 0 {
            // The IPv4 part starts: the token so far is its first octet, and two groups remain.
            if f & A_NOT_DEC != 0 || self.dec > 255 || self.ng > 6 {
                return self.bad();
            }
            self.flags = f | A_V4;
        } else if self.octets >= 3 {
            return self.bad();
        }
        self.put_octet();
    }

    /// Stores the current octet into the groups.
    #[inline(always)]
    fn put_octet(&mut self) {
        let o = self.octets;
        let shift = if o & 1 == 0 { 8 } else { 0 };
        let gi = (self.ng as usize + (o as usize >> 1)) & 7;
        self.groups[gi] |= (self.dec & 0xff) << shift;
        self.octets = o + 1;
        self.dec = 0;
        self.digits = 0;
    }

    /// The address, once every byte is pushed (IPv4 as IPv4-mapped).
    #[inline(always)]
    pub fn finish(&self) -> Option<AddrKey> {
        match self.finish_or_zero() {
            (true, a) => Some(a),
            _ => None,
        }
    }

    /// [`Self::finish`] as whether there is an address and the address, zeroed when there is
    /// none. The kernel's forwarded reader takes this form: an `Option`'s undefined payload
    /// let LLVM load stack that the path had never written, which the verifier refuses.
    #[inline(always)]
    pub fn finish_or_zero(&self) -> (bool, AddrKey) {
        const NONE: (bool, AddrKey) = (false, [0; 16]);
        let mut t = *self;
        let f = t.flags;
        if f & (A_BAD | A_LEAD) != 0 {
            return NONE;
        }
        let ng;
        if f & A_V4 != 0 {
            if t.octets != 3 || t.digits == 0 {
                return NONE;
            }
            t.put_octet();
            if f & A_V6 == 0 {
                let (a, b) = (t.groups[0], t.groups[1]);
                return (
                    true,
                    v4_mapped([(a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8]),
                );
            }
            ng = t.ng as usize + 2;
        } else {
            if f & A_V6 == 0 || f & A_COLON != 0 {
                // No `:` at all, or a single one at the end.
                return NONE;
            }
            let mut n = t.ng as usize;
            if t.digits > 0 {
                if n >= 8 {
                    return NONE;
                }
                t.groups[n & 7] = t.val;
                n += 1;
            }
            ng = n;
        }
        // Groups the `::` stands for (without one, all eight must be there).
        let (gap, zeros) = if t.gap == NO_GAP {
            if ng != 8 {
                return NONE;
            }
            (8, 0)
        } else {
            if ng > 7 {
                return NONE;
            }
            (t.gap as usize, 8 - ng)
        };
        let mut out = [0u8; 16];
        let mut j = 0;
        while j < 8 {
            let v = if j < gap {
                t.groups[j & 7]
            } else if j >= gap + zeros {
                t.groups[(j - zeros) & 7]
            } else {
                0
            };
            out[(2 * j) & 15] = (v >> 8) as u8;
            out[(2 * j + 1) & 15] = v as u8;
            j += 1;
        }
        (true, out)
    }
}

/// [`AddrText`] over `buf[start..end]` (host side and tests; the kernel pushes from `bpf_loop`).
#[inline(always)]
fn addr_text(buf: &[u8; CAP], start: usize, end: usize) -> AddrText {
    let mut t = AddrText::new();
    if end <= start || end - start > IPV6_TEXT_MAX {
        t.bad();
        return t;
    }
    let mut k = 0;
    while k < IPV6_TEXT_MAX {
        let i = start + k;
        if i >= end {
            break;
        }
        t.push(at(buf, i));
        k += 1;
    }
    t
}

/// The IPv6 text `buf[start..end]` (full, `::`-compressed, with an IPv4 suffix; no zone), as
/// `std::net::Ipv6Addr` reads it.
pub fn parse_ipv6(buf: &[u8; CAP], start: usize, end: usize) -> Option<AddrKey> {
    let t = addr_text(buf, start, end);
    if t.is_v6() { t.finish() } else { None }
}

/// An IP address in text, `buf[start..end]`, as `std::net::IpAddr` reads it, into the key the
/// address maps use (IPv4 IPv4-mapped).
pub fn parse_addr(buf: &[u8; CAP], start: usize, end: usize) -> Option<AddrKey> {
    addr_text(buf, start, end).finish()
}

// ---------------------------------------------------------------------------------------------
// Forwarded headers

/// The client address of a captured forwarded header value (`ring`, `len` = the value's whole
/// length; see the module doc for the ring). `kind` is a `FWD_*`:
/// - `X-Forwarded-For`: a comma-separated list; the rightmost address that is not `trusted` (the
///   nearest proxy wrote it; whatever is left of it, the client may have forged).
/// - `Forwarded` (RFC 7239): the `for=` of each element, the same way.
/// - `X-Real-IP`: the whole value.
///
/// None when the header cannot be read (an entry that is not an address, an obfuscated `for=`,
/// a truncated value whose captured entries are all trusted, more than [`FWD_ENTRIES_MAX`]
/// trusted entries): the request falls through to the next source. A whole value whose entries
/// are all trusted gives its leftmost one. Host side and tests: the kernel drives [`FwdText`]
/// from `bpf_loop`.
#[cfg(test)]
pub fn forwarded_addr(
    kind: u8,
    ring: &[u8; CAP],
    len: u32,
    trusted: &impl Fn(&AddrKey) -> bool,
) -> Option<AddrKey> {
    let mut t = FwdText::new(kind);
    let mut i = 0;
    while i < FWD_STEPS_MAX {
        if t.step(ring, len, trusted) {
            break;
        }
        i += 1;
    }
    t.result()
}

/// Steps [`FwdText::step`] may take on one value: the scan and every entry's bytes.
#[cfg(test)]
pub const FWD_STEPS_MAX: u32 = (CAP as u32 + 2) * (FWD_ENTRIES_MAX as u32 + 1);

/// Reads a captured forwarded header value (see [`forwarded_addr`] for what it takes) one step
/// at a time: first its bytes right to left, to find the entries' spans, then each entry's bytes
/// left to right through an [`AddrText`], nearest proxy first, until an untrusted address.
///
/// For the kernel: the state lives in map memory and [`Self::step`] runs once per `bpf_loop`
/// iteration, at most [`FWD_STEPS_MAX`] of them (it returns true when done).
#[cfg(test)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FwdText {
    /// The entries' spans (value positions), nearest proxy first; an empty span stands for an
    /// entry that cannot be read.
    pub starts: [u32; FWD_ENTRIES_MAX],
    pub ends: [u32; FWD_ENTRIES_MAX],
    /// Scan: bytes looked at from the right. Entries: the next byte's position.
    pub k: u32,
    /// The current pair's (or list entry's) first and last non-blank byte ([`NONE`]: none yet).
    pub first: u32,
    pub last: u32,
    /// The current element's `for=` value.
    pub for_s: u32,
    pub for_e: u32,
    pub _pad: u32,
    pub addr: AddrText,
    /// The last trusted address (the answer when a whole value holds only trusted ones).
    pub leftmost: AddrKey,
    pub result: AddrKey,
    /// Entries found, and the one being read.
    pub n: u8,
    pub j: u8,
    /// `for=` pairs in the current element.
    pub fors: u8,
    /// `FS_*`.
    pub phase: u8,
    /// `FWD_*`.
    pub kind: u8,
    /// `N_*`: where a `Forwarded` node's text stands.
    pub node: u8,
    /// Bytes of a `Forwarded` node's port.
    pub plen: u8,
    /// `FF_*`.
    pub flags: u8,
}

#[cfg(test)]
const NONE: u32 = u32::MAX;
#[cfg(test)]
const FS_SCAN: u8 = 0;
#[cfg(test)]
const FS_ENTRY: u8 = 1;
#[cfg(test)]
const FS_DONE: u8 = 2;
/// The scan reached the value's start: every entry was seen.
#[cfg(test)]
const FF_WHOLE: u8 = 1;
#[cfg(test)]
const FF_LEFTMOST: u8 = 2;
#[cfg(test)]
const FF_FOUND: u8 = 4;
const N_STARTED: u8 = 1;
const N_QUOTED: u8 = 2;
const N_END_QUOTE: u8 = 4;
const N_CONTENT: u8 = 8;
const N_BRACKET: u8 = 16;
const N_CLOSED: u8 = 32;
const N_PORT: u8 = 64;
const N_BAD: u8 = 128;

#[cfg(test)]
impl FwdText {
    /// The state before reading a `kind` (`FWD_*`) value.
    pub const fn new(kind: u8) -> Self {
        FwdText {
            starts: [0; FWD_ENTRIES_MAX],
            ends: [0; FWD_ENTRIES_MAX],
            k: 0,
            first: 0,
            last: NONE,
            for_s: 0,
            for_e: 0,
            _pad: 0,
            addr: AddrText::new(),
            leftmost: [0; 16],
            result: [0; 16],
            n: 0,
            j: 0,
            fors: 0,
            phase: if matches!(kind, FWD_X_FORWARDED_FOR | FWD_FORWARDED | FWD_X_REAL_IP) {
                FS_SCAN
            } else {
                FS_DONE
            },
            kind,
            node: 0,
            plen: 0,
            flags: 0,
        }
    }

    /// The client address, once [`Self::step`] returned true.
    #[inline(always)]
    pub const fn result(&self) -> Option<AddrKey> {
        if self.phase == FS_DONE && self.flags & FF_FOUND != 0 {
            Some(self.result)
        } else {
            None
        }
    }

    /// One step over `ring` (the captured value, `len` its whole length); true when done.
    #[inline(always)]
    pub fn step(
        &mut self,
        ring: &[u8; CAP],
        len: u32,
        trusted: &impl Fn(&AddrKey) -> bool,
    ) -> bool {
        match self.phase {
            FS_SCAN => self.scan(ring, len),
            FS_ENTRY => self.entry(ring, trusted),
            _ => {}
        }
        self.phase == FS_DONE
    }

    /// One byte of the value, right to left (the left end acts as a separator).
    #[inline(always)]
    fn scan(&mut self, ring: &[u8; CAP], len: u32) {
        let len = len as usize;
        let lo = len.saturating_sub(CAP);
        let k = self.k as usize;
        if self.n as usize >= FWD_ENTRIES_MAX || k > CAP {
            return self.begin_entries();
        }
        let fwd = self.kind == FWD_FORWARDED;
        let edge = len.saturating_sub(k) <= lo;
        let p = len.wrapping_sub(k + 1);
        let b = if edge { 0 } else { at(ring, p) };
        self.k += 1;
        let elem_end = edge || (b == b',' && self.kind != FWD_X_REAL_IP);
        if elem_end || (fwd && b == b';') {
            let last = self.last as usize;
            if fwd
                && self.last != NONE
                && starts_with_ci(ring, self.first as usize, last + 1, b"for=")
            {
                self.for_s = self.first + 4;
                self.for_e = self.last + 1;
                self.fors = self.fors.saturating_add(1);
            }
            if elem_end {
                if edge && lo > 0 {
                    // The leftmost entry was cut: it does not count.
                    return self.begin_entries();
                }
                let (s, e) = if fwd {
                    if self.fors == 1 {
                        (self.for_s, self.for_e)
                    } else {
                        (0, 0)
                    }
                } else if self.last != NONE {
                    (self.first, self.last + 1)
                } else {
                    (0, 0)
                };
                let i = self.n as usize & (FWD_ENTRIES_MAX - 1);
                self.starts[i] = s;
                self.ends[i] = e;
                self.n += 1;
                self.fors = 0;
                if edge {
                    self.flags |= FF_WHOLE;
                    return self.begin_entries();
                }
            }
            self.last = NONE;
        } else if !is_blank(b) {
            if self.last == NONE {
                self.last = p as u32;
            }
            self.first = p as u32;
        }
    }

    #[inline(always)]
    fn begin_entries(&mut self) {
        if self.n == 0 {
            self.phase = FS_DONE;
            return;
        }
        self.phase = FS_ENTRY;
        self.j = 0;
        self.start_entry();
    }

    #[inline(always)]
    fn start_entry(&mut self) {
        self.k = self.starts[self.j as usize & (FWD_ENTRIES_MAX - 1)];
        self.addr = AddrText::new();
        self.node = 0;
        self.plen = 0;
    }

    /// One byte of the current entry, or its end.
    #[inline(always)]
    fn entry(&mut self, ring: &[u8; CAP], trusted: &impl Fn(&AddrKey) -> bool) {
        let j = self.j as usize & (FWD_ENTRIES_MAX - 1);
        if self.k < self.ends[j] && self.k.wrapping_sub(self.starts[j]) < CAP as u32 {
            let b = at(ring, self.k as usize);
            self.k += 1;
            if self.kind == FWD_FORWARDED {
                self.node_byte(b);
            } else {
                self.addr.push(b);
            }
            return;
        }
        let Some(a) = self.entry_addr() else {
            // An entry that cannot be read: the whole header cannot.
            self.phase = FS_DONE;
            return;
        };
        if self.kind == FWD_X_REAL_IP || !trusted(&a) {
            self.result = a;
            self.flags |= FF_FOUND;
            self.phase = FS_DONE;
            return;
        }
        self.leftmost = a;
        self.flags |= FF_LEFTMOST;
        self.j += 1;
        if self.j >= self.n {
            if self.flags & (FF_WHOLE | FF_LEFTMOST) == FF_WHOLE | FF_LEFTMOST {
                self.result = self.leftmost;
                self.flags |= FF_FOUND;
            }
            self.phase = FS_DONE;
            return;
        }
        self.start_entry();
    }

    #[inline(always)]
    fn node_byte(&mut self, b: u8) {
        node_byte(&mut self.node, &mut self.plen, &mut self.addr, b);
    }

    /// The current entry's address, once its bytes are read.
    #[inline(always)]
    fn entry_addr(&self) -> Option<AddrKey> {
        if self.kind == FWD_FORWARDED {
            let (found, a) = node_addr(self.node, self.plen, &self.addr);
            return found.then_some(a);
        }
        self.addr.finish()
    }
}

/// Reads a forwarded header's value a byte per call, left to right, as the request's bytes
/// arrive: the kernel keeps this state in the connection's
/// stream, so a value cut across segments (or sent byte by byte) needs no buffer, and several
/// header lines of the same name read as one list (RFC 9110 §5.3: HAProxy's `option forwardfor`
/// adds its own line after the client's). The answer is the rightmost entry whose address is
/// not trusted, provided every entry right of it is a readable trusted address, and at most
/// [`FWD_ENTRIES_MAX`] - 1 of them; when every entry is a trusted address (at most
/// [`FWD_ENTRIES_MAX`]), the leftmost. For a value of at most [`CAP`] bytes it gives exactly
/// what the tests' ring reader `forwarded_addr` gives (a property test holds it to that); a
/// longer one is read whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FwdStream {
    /// The current entry's address text.
    pub addr: AddrText,
    /// The rightmost untrusted address so far (`FW_CAND`).
    pub cand: AddrKey,
    /// The first entry, when it is a trusted address (`FW_LEFTMOST`).
    pub leftmost: AddrKey,
    /// `FWD_*`.
    pub kind: u8,
    /// `FW_*`.
    pub flags: u8,
    /// Trusted entries after the candidate (or since the start, without one), saturating.
    pub after: u8,
    /// Entries read, saturating.
    pub entries: u8,
    /// `E_*`: the current entry (or `Forwarded` pair).
    pub ent: u8,
    /// A `Forwarded` element's `for=` node, as [`FwdText`] reads it.
    pub node: u8,
    pub plen: u8,
    /// `Forwarded`: `for=` pairs in the current element.
    pub fors: u8,
}

/// A candidate was found.
const FW_CAND: u8 = 1;
/// An entry that cannot be read came after the candidate (or, without one, anywhere).
const FW_BAD_AFTER: u8 = 2;
const FW_LEFTMOST: u8 = 4;
/// The list's (or a header line's) first entry has begun: a line end ends an entry.
const FW_OPEN: u8 = 8;
/// Non-blank bytes began the entry (or pair).
const E_STARTED: u8 = 1;
/// Blanks after them: only blanks may follow.
const E_TRAILING: u8 = 2;
const E_BAD: u8 = 4;
/// `Forwarded`: the pair's first bytes so far are `f`, `fo`, `for` (in `E_MATCH`), then the
/// pair is `for=` ([`E_FOR`]) or another ([`E_OTHER`]).
const E_MATCH: u8 = 0x30;
const E_MATCH_SHIFT: u8 = 4;
const E_FOR: u8 = 0x40;
const E_OTHER: u8 = 0x80;
const FOR_EQ: [u8; 4] = *b"for=";

impl FwdStream {
    pub const fn new(kind: u8) -> Self {
        FwdStream {
            addr: AddrText::new(),
            cand: [0; 16],
            leftmost: [0; 16],
            kind,
            flags: 0,
            after: 0,
            entries: 0,
            ent: 0,
            node: 0,
            plen: 0,
            fors: 0,
        }
    }

    /// Back to [`Self::new`] in place (volatile, as [`AddrText::reset`]).
    #[inline(always)]
    pub fn reset(&mut self, kind: u8) {
        self.addr.reset();
        // SAFETY: plain fields of `self`.
        unsafe {
            use core::ptr::write_volatile as put;
            put(&mut self.kind, kind);
            put(&mut self.flags, 0);
            put(&mut self.after, 0);
            put(&mut self.entries, 0);
            put(&mut self.ent, 0);
            put(&mut self.node, 0);
            put(&mut self.plen, 0);
            put(&mut self.fors, 0);
        }
    }

    /// The next byte of the value (its line's CR included, its LF not: see
    /// [`Self::line_end`]).
    #[inline(always)]
    pub fn push(&mut self, b: u8, trusted: &impl Fn(&AddrKey) -> bool) {
        self.flags |= FW_OPEN;
        match self.kind {
            FWD_X_FORWARDED_FOR | FWD_X_REAL_IP => {
                if b == b',' && self.kind == FWD_X_FORWARDED_FOR {
                    return self.list_entry_end(trusted);
                }
                if is_blank(b) {
                    if self.ent & E_STARTED != 0 {
                        self.ent |= E_TRAILING;
                    }
                    return;
                }
                if self.ent & E_TRAILING != 0 {
                    self.ent |= E_BAD;
                }
                self.ent |= E_STARTED;
                self.addr.push(b);
            }
            FWD_FORWARDED => match b {
                b',' => {
                    self.pair_end();
                    self.element_end(trusted);
                }
                b';' => self.pair_end(),
                _ => self.pair_byte(b),
            },
            _ => {}
        }
    }

    /// The end of a header line of the value: the next line of the same header continues the
    /// list (a new entry).
    #[inline(always)]
    pub fn line_end(&mut self, trusted: &impl Fn(&AddrKey) -> bool) {
        if self.flags & FW_OPEN == 0 {
            return;
        }
        self.flags &= !FW_OPEN;
        match self.kind {
            FWD_FORWARDED => {
                self.pair_end();
                self.element_end(trusted);
            }
            _ => self.list_entry_end(trusted),
        }
    }

    /// A byte of a `Forwarded` pair: `for=` (any case, after blanks) feeds the node.
    #[inline(always)]
    fn pair_byte(&mut self, b: u8) {
        let e = self.ent;
        if e & E_OTHER != 0 {
            return;
        }
        if e & E_FOR != 0 {
            // Blanks may only end the pair: `for= x` is as bad as `for=x y`.
            if is_blank(b) {
                self.ent |= E_TRAILING;
                return;
            }
            if e & E_TRAILING != 0 {
                self.node |= N_BAD;
            }
            return node_byte(&mut self.node, &mut self.plen, &mut self.addr, b);
        }
        if e & E_STARTED == 0 && is_blank(b) {
            return;
        }
        self.ent |= E_STARTED;
        let m = (e & E_MATCH) >> E_MATCH_SHIFT;
        if lower(b) != FOR_EQ[m as usize & 3] {
            self.ent |= E_OTHER;
            return;
        }
        if m == 3 {
            self.ent |= E_FOR;
            self.fors = self.fors.saturating_add(1);
            return;
        }
        self.ent = (e & !E_MATCH) | E_STARTED | ((m + 1) << E_MATCH_SHIFT);
    }

    #[inline(always)]
    fn pair_end(&mut self) {
        self.ent = 0;
    }

    /// The end of a `Forwarded` element: its entry is its one `for=` node.
    #[inline(always)]
    fn element_end(&mut self, trusted: &impl Fn(&AddrKey) -> bool) {
        let (found, a) = node_addr(self.node, self.plen, &self.addr);
        let found = found && self.fors == 1;
        self.fors = 0;
        self.node = 0;
        self.plen = 0;
        self.addr.reset();
        self.entry(found, a, trusted);
    }

    /// The end of an `X-Forwarded-For` entry (or the `X-Real-IP` value).
    #[inline(always)]
    fn list_entry_end(&mut self, trusted: &impl Fn(&AddrKey) -> bool) {
        let (found, a) = self.addr.finish_or_zero();
        let found = found && self.ent & (E_STARTED | E_BAD) == E_STARTED;
        self.ent = 0;
        self.addr.reset();
        self.entry(found, a, trusted);
    }

    /// An entry read, left to right: `a` when `found` (else zeroed; see
    /// [`AddrText::finish_or_zero`]).
    #[inline(always)]
    fn entry(&mut self, found: bool, a: AddrKey, trusted: &impl Fn(&AddrKey) -> bool) {
        self.entries = self.entries.saturating_add(1);
        if !found {
            self.flags |= FW_BAD_AFTER;
            return;
        }
        if self.kind == FWD_X_REAL_IP || !trusted(&a) {
            self.cand = a;
            self.flags = (self.flags | FW_CAND) & !FW_BAD_AFTER;
            self.after = 0;
            return;
        }
        if self.entries == 1 {
            self.leftmost = a;
            self.flags |= FW_LEFTMOST;
        }
        self.after = self.after.saturating_add(1);
    }

    /// The client address, once the head's lines of the header are read (each ended by
    /// [`Self::line_end`]).
    #[inline(always)]
    pub fn result(&self) -> Option<AddrKey> {
        let f = self.flags;
        if f & FW_BAD_AFTER != 0 {
            return None;
        }
        if self.kind == FWD_X_REAL_IP && self.entries > 1 {
            // Two X-Real-IP lines: which one the server takes is not known.
            return None;
        }
        if f & FW_CAND != 0 {
            return ((self.after as usize) < FWD_ENTRIES_MAX).then_some(self.cand);
        }
        if f & FW_LEFTMOST != 0 && self.entries as usize <= FWD_ENTRIES_MAX {
            return Some(self.leftmost);
        }
        None
    }
}

/// A byte of a `Forwarded` node (RFC 7239 §6), token or quoted: `192.0.2.1`,
/// `"192.0.2.1:4711"`, `"[2001:db8::1]"`, `"[2001:db8::1]:4711"`, the port possibly
/// obfuscated (`_` then letters, digits, `.`, `_`, `-`).
#[inline(always)]
fn node_byte(node: &mut u8, plen: &mut u8, addr: &mut AddrText, b: u8) {
    let f = *node;
    if f & N_STARTED == 0 {
        *node = f | N_STARTED;
        if b == b'"' {
            *node |= N_QUOTED;
            return;
        }
    }
    let f = *node;
    if f & N_END_QUOTE != 0 {
        *node |= N_BAD;
        return;
    }
    if f & N_QUOTED != 0 && b == b'"' {
        *node |= N_END_QUOTE;
        return;
    }
    if f & N_PORT != 0 {
        // The port: digits, or `_` and then letters, digits, `.`, `_`, `-` (bit 7 of
        // `plen` says which).
        let count = *plen & 0x7f;
        let obfuscated = if count == 0 {
            b == b'_'
        } else {
            *plen & 0x80 != 0
        };
        let ok = if obfuscated {
            count == 0 || b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
        } else {
            b.is_ascii_digit() && count < 5
        };
        if !ok || count >= 16 {
            *node |= N_BAD;
            return;
        }
        *plen = if obfuscated { 0x80 } else { 0 } | (count + 1);
        return;
    }
    if f & N_CONTENT == 0 {
        *node |= N_CONTENT;
        if b == b'[' {
            *node |= N_BRACKET;
            return;
        }
    }
    if f & N_BRACKET != 0 {
        if f & N_CLOSED != 0 {
            if b == b':' {
                *node |= N_PORT;
            } else {
                *node |= N_BAD;
            }
        } else if b == b']' {
            *node |= N_CLOSED;
        } else {
            addr.push(b);
        }
        return;
    }
    if b == b':' {
        *node |= N_PORT;
    } else {
        addr.push(b);
    }
}

/// The address of a `Forwarded` node read by [`node_byte`], if it is a whole one (as
/// [`AddrText::finish_or_zero`] gives it).
#[inline(always)]
fn node_addr(node: u8, plen: u8, addr: &AddrText) -> (bool, AddrKey) {
    let unclosed_quote = node & N_QUOTED != 0 && node & N_END_QUOTE == 0;
    let bad_bracket = node & N_BRACKET != 0 && (node & N_CLOSED == 0 || !addr.is_v6());
    let empty_port = node & N_PORT != 0 && plen & 0x7f == 0;
    let (found, a) = addr.finish_or_zero();
    let whole = !(node & N_BAD != 0 || unclosed_quote || bad_bracket || empty_port);
    (found && whole, a)
}

/// [`FwdStream`] over a whole value, as one header line (host side and tests).
pub fn forwarded_stream(
    kind: u8,
    value: &[u8],
    trusted: &impl Fn(&AddrKey) -> bool,
) -> Option<AddrKey> {
    let mut f = FwdStream::new(kind);
    for &b in value {
        f.push(b, trusted);
    }
    f.line_end(trusted);
    f.result()
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

/// What a connection's first bytes say about a PROXY protocol header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyStart {
    /// No PROXY header: the bytes are the application's.
    NotProxy,
    /// `PROXY `: a v1 line, up to its `\r\n`.
    V1,
    /// The v2 signature: [`proxy_v2_len`] bytes once the fixed part is in.
    V2,
    /// The bytes so far begin a header's prefix: wait for more.
    NeedMore,
}

/// What a PROXY header says about the connection's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxySource {
    /// v2 LOCAL (the proxy's own connection, a health check): the peer address stands.
    Local,
    /// The proxy does not know the source (v1 UNKNOWN, v2 AF_UNSPEC, AF_UNIX, a non-stream
    /// protocol): the peer address stands.
    Unknown,
    /// The client's address.
    Addr(AddrKey),
    /// Malformed: the header cannot be believed.
    Bad,
}

/// 1 when `buf[..n]` begins with all of `pat`, 0 when it holds a prefix of it, -1 otherwise.
#[inline(always)]
fn prefix_state<const N: usize>(buf: &[u8; CAP], n: usize, pat: &[u8; N]) -> i8 {
    let mut k = 0;
    while k < N {
        if k >= n {
            return 0;
        }
        if at(buf, k) != pat[k] {
            return -1;
        }
        k += 1;
    }
    1
}

/// Whether the first `n` bytes of a connection start a PROXY header (v1 `PROXY `, or the v2
/// signature), so the kernel knows to read it before the request stream starts.
#[inline(always)]
pub fn proxy_start(buf: &[u8; CAP], n: usize) -> ProxyStart {
    if n == 0 {
        return ProxyStart::NeedMore;
    }
    let (state, found) = if at(buf, 0) == PROXY_V1_PREFIX[0] {
        (prefix_state(buf, n, &PROXY_V1_PREFIX), ProxyStart::V1)
    } else {
        (prefix_state(buf, n, &PROXY_V2_SIG), ProxyStart::V2)
    };
    match state {
        1 => found,
        0 => ProxyStart::NeedMore,
        _ => ProxyStart::NotProxy,
    }
}

/// The whole length of a v2 header whose fixed part is in `buf`: the bytes to hand on before
/// the application's own.
#[inline(always)]
pub const fn proxy_v2_len(buf: &[u8; CAP]) -> usize {
    PROXY_V2_FIXED + (((buf[14] as usize) << 8) | buf[15] as usize)
}

/// Reads a PROXY v1 line a byte at a time: `PROXY TCP4|TCP6 src dst sport dport\r\n` or
/// `PROXY UNKNOWN …\r\n` (see [`proxy_v1_source`]).
///
/// For the kernel: the state lives in map memory and [`Self::push`] runs once per `bpf_loop`
/// iteration over the line's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct V1Text {
    pub src: AddrKey,
    pub addr: AddrText,
    /// The port being read.
    pub port: u32,
    /// Bytes pushed.
    pub len: u8,
    /// `V1_*`: the field being read.
    pub field: u8,
    /// Position in the field (prefix and protocol), or digits of the port.
    pub sub: u8,
    /// The protocols the word may still be (`PROTO_*`).
    pub cand: u8,
}

const V1_PREFIX: u8 = 0;
const V1_PROTO: u8 = 1;
const V1_SRC: u8 = 2;
const V1_DST: u8 = 3;
const V1_SPORT: u8 = 4;
const V1_DPORT: u8 = 5;
/// After UNKNOWN: anything up to the CR.
const V1_REST: u8 = 6;
/// The CR was read: the LF is next.
const V1_CR: u8 = 7;
const V1_END: u8 = 8;
const V1_BAD: u8 = 9;
const PROTO_TCP4: u8 = 1;
const PROTO_TCP6: u8 = 2;
const PROTO_UNKNOWN: u8 = 4;
const PROTO_WORDS: [[u8; 8]; 3] = [*b"TCP4 \0\0\0", *b"TCP6 \0\0\0", *b"UNKNOWN\0"];

impl Default for V1Text {
    fn default() -> Self {
        Self::new()
    }
}

impl V1Text {
    pub const fn new() -> Self {
        V1Text {
            src: [0; 16],
            addr: AddrText::new(),
            port: 0,
            len: 0,
            field: V1_PREFIX,
            sub: 0,
            cand: PROTO_TCP4 | PROTO_TCP6 | PROTO_UNKNOWN,
        }
    }

    /// The line's next byte.
    #[inline(always)]
    pub fn push(&mut self, b: u8) {
        if self.field == V1_BAD {
            return;
        }
        if self.len as usize >= PROXY_V1_MAX {
            self.field = V1_BAD;
            return;
        }
        self.len += 1;
        let sub = self.sub as usize & 7;
        match self.field {
            V1_PREFIX => {
                if b != PROXY_V1_PREFIX[sub % 6] {
                    self.field = V1_BAD;
                } else if sub == 5 {
                    self.field = V1_PROTO;
                    self.sub = 0;
                } else {
                    self.sub += 1;
                }
            }
            V1_PROTO => self.proto(b, sub),
            V1_SRC | V1_DST => {
                if b != b' ' {
                    return self.addr.push(b);
                }
                let v6 = self.cand == PROTO_TCP6;
                match self.addr.finish() {
                    Some(a) if self.addr.is_v6() == v6 => {
                        if self.field == V1_SRC {
                            self.src = a;
                        }
                        self.addr.reset();
                        self.field += 1;
                    }
                    _ => self.field = V1_BAD,
                }
            }
            V1_SPORT | V1_DPORT => {
                let end = if self.field == V1_SPORT { b' ' } else { b'\r' };
                if b == end && self.sub > 0 {
                    self.field += if self.field == V1_SPORT { 1 } else { 2 };
                    self.sub = 0;
                    self.port = 0;
                } else if b.is_ascii_digit() && self.sub < 5 && !(self.sub > 0 && self.port == 0) {
                    self.port = self.port * 10 + (b - b'0') as u32;
                    self.sub += 1;
                    if self.port > 65535 {
                        self.field = V1_BAD;
                    }
                } else {
                    self.field = V1_BAD;
                }
            }
            V1_REST => match b {
                b'\r' => self.field = V1_CR,
                b'\n' => self.field = V1_BAD,
                _ => {}
            },
            V1_CR => self.field = if b == b'\n' { V1_END } else { V1_BAD },
            _ => self.field = V1_BAD,
        }
    }

    /// A byte of the protocol word: `TCP4 `, `TCP6 ` or `UNKNOWN` (then a space or the CR).
    #[inline(always)]
    fn proto(&mut self, b: u8, sub: usize) {
        if self.cand == PROTO_UNKNOWN && sub == 7 {
            self.field = match b {
                b' ' => V1_REST,
                b'\r' => V1_CR,
                _ => V1_BAD,
            };
            return;
        }
        let mut i = 0;
        while i < 3 {
            if PROTO_WORDS[i][sub] != b {
                self.cand &= !(1 << i);
            }
            i += 1;
        }
        if self.cand == 0 {
            self.field = V1_BAD;
        } else if sub == 4 && self.cand & PROTO_UNKNOWN == 0 {
            // `TCP4 ` or `TCP6 ` (the two differ at their fourth byte).
            self.field = V1_SRC;
            self.sub = 0;
        } else {
            self.sub += 1;
        }
    }

    /// The source, once the whole line (up to its LF) is pushed.
    #[inline(always)]
    pub const fn finish(&self) -> ProxySource {
        if self.field != V1_END {
            ProxySource::Bad
        } else if self.cand == PROTO_UNKNOWN {
            ProxySource::Unknown
        } else {
            ProxySource::Addr(self.src)
        }
    }
}

/// The source of a v1 header, `buf[..n]` being the whole line with its `\r\n`:
/// `PROXY TCP4|TCP6 src dst sport dport\r\n` or `PROXY UNKNOWN …\r\n`. Host side and tests:
/// the kernel drives [`V1Text`] from `bpf_loop`.
pub fn proxy_v1_source(buf: &[u8; CAP], n: usize) -> ProxySource {
    if n > PROXY_V1_MAX {
        return ProxySource::Bad;
    }
    let mut t = V1Text::new();
    let mut i = 0;
    while i < PROXY_V1_MAX {
        if i >= n {
            break;
        }
        t.push(at(buf, i));
        i += 1;
    }
    t.finish()
}

/// The source of a v2 header, `buf[..n]` holding its first `min(total, CAP)` bytes (the
/// addresses come before any TLV, so those are never needed).
#[inline(always)]
pub fn proxy_v2_source(buf: &[u8; CAP], n: usize) -> ProxySource {
    if n < PROXY_V2_FIXED || prefix_state(buf, n, &PROXY_V2_SIG) != 1 {
        return ProxySource::Bad;
    }
    let ver_cmd = at(buf, 12);
    if ver_cmd >> 4 != 2 {
        return ProxySource::Bad;
    }
    match ver_cmd & 0x0f {
        // LOCAL: the family and addresses are to be ignored.
        0 => return ProxySource::Local,
        1 => {}
        _ => return ProxySource::Bad,
    }
    let fam = at(buf, 13) >> 4;
    let proto = at(buf, 13) & 0x0f;
    let total = proxy_v2_len(buf);
    if n < total && n < CAP {
        // Cut short of what the capture should hold.
        return ProxySource::Bad;
    }
    let len = total - PROXY_V2_FIXED;
    // Address block sizes: AF_INET, AF_INET6, AF_UNIX.
    let need = match fam {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return ProxySource::Bad,
    };
    if proto > 2 || len < need {
        return ProxySource::Bad;
    }
    // 1: STREAM.
    if (fam != 1 && fam != 2) || proto != 1 {
        return ProxySource::Unknown;
    }
    if n < PROXY_V2_FIXED + need {
        return ProxySource::Bad;
    }
    if fam == 1 {
        return ProxySource::Addr(v4_mapped([
            at(buf, 16),
            at(buf, 17),
            at(buf, 18),
            at(buf, 19),
        ]));
    }
    let mut a = [0u8; 16];
    let mut k = 0;
    while k < 16 {
        a[k & 15] = at(buf, 16 + k);
        k += 1;
    }
    ProxySource::Addr(a)
}

#[cfg(test)]
mod tests;
