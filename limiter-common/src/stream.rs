//! Following an inbound connection as an HTTP/1.x byte stream.
//!
//! Clients frame their bytes as they like: a request head may arrive split at any byte, several
//! requests may share one chunk (pipelining), empty lines may come before a request line, and a
//! body may look like a request. So the verdict keeps a [`Stream`] per socket and feeds it every
//! inbound chunk, a window of bytes at a time. It finds every request line, skips bodies by
//! `Content-Length` and by the chunked coding, and decides for each request whether it is counted
//! or an exempt media GET ([`media`](Stream) normalisation below). Where the framing cannot be
//! followed (both `Content-Length` and `Transfer-Encoding`, differing lengths, a malformed chunk
//! size, bytes that cannot start a request where one must start) the stream is marked broken and
//! the kernel closes the connection with a 400, as nginx does: never more permissive than the
//! server.
//!
//! The same code runs in the kernel (one [`Stream::step`] per `bpf_loop` iteration, so the
//! verifier checks it once) and in the host tests ([`Stream::feed`]). Every index is masked or
//! checked: the verifier rejects anything it cannot bound.

use bytemuck::{Pod, Zeroable};

use crate::http::{byte_eq_mask, first_marked};
use crate::ident::{FwdStream, KeyHash, KeyText};
use crate::maps::{
    API_KEY_MAX, AddrKey, FWD_X_FORWARDED_FOR, HEADER_NAME_MAX, ID_ADDRESS, ID_API_KEY, ID_END,
    ID_FORWARDED, ID_PROXY_PROTOCOL, ID_SOURCES, KEY_PLAIN, KernelConfig, MAX_MEDIA_PREFIXES,
    MEDIA_PREFIX_MAX, UNMAPPED_ORG,
};

/// What the stream compares requests with: the media prefixes, a byte at a time, and, when API
/// keys identify orgs, the key header and the keys.
pub trait StreamRules {
    /// Bits of every configured prefix.
    fn all(&self) -> u8;
    /// Bits of the prefixes still possible when the normalised path has `c` at `pos`: those
    /// with `c` there and those already wholly matched. `c == 0` (never a path byte) asks for
    /// the wholly matched ones alone.
    fn matching(&self, pos: u8, c: u8) -> u8;
    /// The API key header's name, lowercase: its byte at `pos` (0 past its end), and its length
    /// (0: keys are not read).
    fn key_name(&self, _pos: usize) -> u8 {
        0
    }
    fn key_name_len(&self) -> usize {
        0
    }
    /// What a header line that starts with byte `b` may be ([`line_class`]): one lookup in
    /// [`KernelConfig::line_first`] (this runs at every line of the header-line scan, where
    /// each branch multiplies what the verifier walks).
    fn line_first(&self, b: u8) -> u8 {
        let key = if self.key_name_len() > 0 {
            self.key_name(0)
        } else {
            0
        };
        let fwd = if self.fwd_name_len() > 0 {
            self.fwd_name(0)
        } else {
            0
        };
        line_class(b, key, fwd)
    }
    /// The forwarded header's name, lowercase, as [`Self::key_name`].
    fn fwd_name(&self, _pos: usize) -> u8 {
        0
    }
    /// Bytes `pos..pos + 8` of the key header's name as a little-endian word, `_` as `-`;
    /// those past its end may be anything (a read without a branch per byte, for
    /// [`Stream::name_word`]).
    fn key_name_word(&self, pos: usize) -> u64 {
        dash_word(name_word_at(pos, |i| self.key_name(i)))
    }
    /// The forwarded header's name as [`Self::key_name_word`].
    fn fwd_name_word(&self, pos: usize) -> u64 {
        dash_word(name_word_at(pos, |i| self.fwd_name(i)))
    }
    fn fwd_name_len(&self) -> usize {
        0
    }
    /// `FWD_*`.
    fn fwd_kind(&self) -> u8 {
        FWD_X_FORWARDED_FOR
    }
    /// Whether an address is one of `api.trusted_proxies`.
    fn trusted(&self, _a: &AddrKey) -> bool {
        false
    }
    /// The org of an address (`UNMAPPED_ORG`: none).
    fn addr_org(&self, _a: &AddrKey) -> u32 {
        UNMAPPED_ORG
    }
    /// `KEY_*`: how the key header's value holds the key.
    fn key_kind(&self) -> u8 {
        KEY_PLAIN
    }
    /// The secret the keys' digests are keyed with.
    fn key_secret(&self) -> [u64; 2] {
        [0; 2]
    }
    /// The org of a key's digest.
    fn key_org(&self, _digest: u64) -> Option<u32> {
        None
    }
    /// `api.identify_by`, `ID_*`s ended by `ID_END`.
    fn identify_by(&self) -> [u8; ID_SOURCES] {
        [ID_ADDRESS, ID_END, ID_END, ID_END]
    }
}

/// Entries of the kernel's MEDIA_MATCH table: one row of 256 per position below
/// [`MEDIA_PREFIX_MAX`], and a last row for every position from there on.
pub const MEDIA_MATCH_ENTRIES: u32 = (MEDIA_PREFIX_MAX as u32 + 1) * 256;

/// Where [`StreamRules::matching`]`(pos, c)` is in MEDIA_MATCH.
#[inline(always)]
pub const fn media_match_index(pos: u8, c: u8) -> u32 {
    let row = if (pos as usize) < MEDIA_PREFIX_MAX {
        pos as u32
    } else {
        MEDIA_PREFIX_MAX as u32
    };
    row * 256 + c as u32
}

/// The MEDIA_MATCH entry at `index`, from the config's prefixes (the daemon fills the table with
/// it; the host tests use it directly).
pub fn media_match_entry(cfg: &KernelConfig, index: u32) -> u8 {
    let pos = (index / 256) as usize;
    let c = (index % 256) as u8;
    let mut bits = 0u8;
    let n = (cfg.media_prefix_count as usize).min(MAX_MEDIA_PREFIXES);
    for p in 0..n {
        let len = cfg.media_prefix_len[p] as usize;
        let wholly = len > 0 && len <= pos;
        let here = c != 0 && pos < len && cfg.media_prefixes[p][pos] == c;
        if wholly || here {
            bits |= 1 << p;
        }
    }
    bits
}

impl StreamRules for KernelConfig {
    fn all(&self) -> u8 {
        media_bits(self)
    }

    fn matching(&self, pos: u8, c: u8) -> u8 {
        media_match_entry(self, media_match_index(pos, c))
    }

    fn key_name(&self, pos: usize) -> u8 {
        config_key_name(self, pos)
    }

    fn key_name_len(&self) -> usize {
        config_key_name_len(self)
    }

    fn key_kind(&self) -> u8 {
        self.key_kind
    }

    fn key_secret(&self) -> [u64; 2] {
        self.key_secret
    }

    fn identify_by(&self) -> [u8; ID_SOURCES] {
        self.identify_by
    }

    fn fwd_name(&self, pos: usize) -> u8 {
        config_fwd_name(self, pos)
    }

    fn key_name_word(&self, pos: usize) -> u64 {
        self.key_words[pos & (HEADER_NAME_MAX - 1)]
    }

    fn line_first(&self, b: u8) -> u8 {
        self.line_first[b as usize]
    }

    fn fwd_name_word(&self, pos: usize) -> u64 {
        self.fwd_words[pos & (HEADER_NAME_MAX - 1)]
    }

    fn fwd_name_len(&self) -> usize {
        if listed(self, ID_FORWARDED) {
            self.fwd_header_len as usize
        } else {
            0
        }
    }

    fn fwd_kind(&self) -> u8 {
        self.forwarded_kind
    }
}

/// A name from each of its bytes on, eight bytes as a little-endian word (zero past its end),
/// `_` as `-` ([`KernelConfig::key_words`]).
pub const fn name_words(name: &[u8; HEADER_NAME_MAX]) -> [u64; HEADER_NAME_MAX] {
    let mut words = [0u64; HEADER_NAME_MAX];
    let mut pos = 0;
    while pos < HEADER_NAME_MAX {
        let mut j = 0;
        while j < 8 && pos + j < HEADER_NAME_MAX {
            words[pos] |= (dash(name[pos + j]) as u64) << (8 * j);
            j += 1;
        }
        pos += 1;
    }
    words
}

/// [`StreamRules::fwd_name`] from the config.
#[inline(always)]
pub fn config_fwd_name(cfg: &KernelConfig, pos: usize) -> u8 {
    if pos < cfg.fwd_header_len as usize {
        cfg.fwd_header[pos & (HEADER_NAME_MAX - 1)]
    } else {
        0
    }
}

/// Fills [`KernelConfig::line_first`], `key_words` and `fwd_words` from the key and forwarded
/// header names (the daemon, after naming them; the kernel looks a header line's first byte up
/// in `line_first`, and compares names with the words).
pub fn fill_name_tables(cfg: &mut KernelConfig) {
    cfg.key_words = name_words(&cfg.key_header);
    cfg.fwd_words = name_words(&cfg.fwd_header);
    let key = if cfg.key_header_len > 0 {
        cfg.key_header[0]
    } else {
        0
    };
    let fwd = if cfg.fwd_header_len > 0 {
        cfg.fwd_header[0]
    } else {
        0
    };
    cfg.line_first = line_classes(key, fwd);
}

/// A header line's first byte that [`Stream::header_start`] takes apart from names: CR, LF, SP
/// and HT.
pub const LINE_OTHER: u8 = 0x80;

/// What a header line that starts with `b` may be: the names it may begin (`NAME_CL`,
/// `NAME_TE`, and `NAME_KEY` and `NAME_FWD` when those names start with `key` and `fwd`,
/// lowercase; 0 for none), [`LINE_OTHER`], or 0: a line to skip outright (no name of interest,
/// or not a token byte).
pub const fn line_class(b: u8, key: u8, fwd: u8) -> u8 {
    if matches!(b, b'\r' | b'\n' | b' ' | b'\t') {
        return LINE_OTHER;
    }
    if !is_tchar(b) {
        return 0;
    }
    let l = lower(b);
    let mut bits = 0;
    if l == HEADER_NAMES[0][0] {
        bits |= NAME_CL;
    }
    if l == HEADER_NAMES[1][0] {
        bits |= NAME_TE;
    }
    if key != 0 && l == key {
        bits |= NAME_KEY;
    }
    if fwd != 0 && l == fwd {
        bits |= NAME_FWD;
    }
    bits
}

/// [`line_class`] of every byte.
pub const fn line_classes(key: u8, fwd: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = line_class(b as u8, key, fwd);
        b += 1;
    }
    t
}

/// [`StreamRules::key_name`] from the config (the kernel's rules and the host's).
#[inline(always)]
pub fn config_key_name(cfg: &KernelConfig, pos: usize) -> u8 {
    if pos < cfg.key_header_len as usize {
        cfg.key_header[pos & (HEADER_NAME_MAX - 1)]
    } else {
        0
    }
}

/// [`StreamRules::key_name_len`] from the config: 0 unless `api_key` is a source.
#[inline(always)]
pub fn config_key_name_len(cfg: &KernelConfig) -> usize {
    if listed(cfg, ID_API_KEY) {
        cfg.key_header_len as usize
    } else {
        0
    }
}

/// Bytes of a chunk the kernel loads at a time.
pub const WIN: usize = 512;
/// The window buffer: [`WIN`] bytes plus room for an 8-byte load at any masked index.
pub const WIN_BUF: usize = WIN + 8;
const WIN_WORDS: usize = WIN_BUF / 8;

/// The window's bytes, 8-aligned so that the scans read whole aligned words (the BPF target
/// splits a load it cannot prove aligned into byte loads). Reads as a byte array.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window(pub [u8; WIN_BUF]);

impl Window {
    /// Aligned word `i` (bytes `8i..8i + 8`), little-endian; 0 past the buffer.
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        // SAFETY: `Window` is 8-aligned and WIN_BUF a multiple of 8, so it is also an array of
        // WIN_WORDS u64s, every bit pattern of which is valid.
        let words = unsafe { &*(self as *const Window as *const [u64; WIN_WORDS]) };
        words.get(i).map_or(0, |w| u64::from_le(*w))
    }
}

impl core::ops::Deref for Window {
    type Target = [u8; WIN_BUF];

    #[inline(always)]
    fn deref(&self) -> &[u8; WIN_BUF] {
        &self.0
    }
}

impl core::ops::DerefMut for Window {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u8; WIN_BUF] {
        &mut self.0
    }
}

/// Between requests (leading empty lines are skipped); a new connection starts here.
pub const S_IDLE: u8 = 0;
/// In the method token.
pub const S_METHOD: u8 = 1;
/// After the method's space: the target's first byte is next.
pub const S_TARGET: u8 = 2;
/// In the path of a GET that may still be under a media prefix.
pub const S_PATH: u8 = 3;
/// The rest of the request line.
pub const S_LINE: u8 = 4;
/// At the start of a header line.
pub const S_HDR: u8 = 5;
/// In a header name that may be one the framing depends on.
pub const S_NAME: u8 = 6;
/// The rest of a header line that does not matter.
pub const S_SKIP: u8 = 7;
/// A CR at the start of a header line: the head ends with the LF.
pub const S_EOH: u8 = 8;
/// In a `Content-Length` value.
pub const S_CL: u8 = 9;
/// In a `Transfer-Encoding` value.
pub const S_TE: u8 = 10;
/// In a body of known length.
pub const S_BODY: u8 = 11;
/// In a chunk-size line.
pub const S_CSIZE: u8 = 12;
/// In a chunk extension (skipped to the end of the line).
pub const S_CEXT: u8 = 13;
/// In chunk data.
pub const S_CDATA: u8 = 14;
/// After chunk data: CRLF next.
pub const S_CCR: u8 = 15;
/// After chunk data and its CR: LF next.
pub const S_CLF: u8 = 16;
/// At the start of a trailer line (after the last chunk).
pub const S_TRL: u8 = 17;
/// The rest of a trailer line.
pub const S_TSKIP: u8 = 18;
/// A CR at the start of a trailer line: the message ends with the LF.
pub const S_TCR: u8 = 19;
/// The connection did not open with HTTP/1.x (TLS, HTTP/2, garbage): passed untouched.
pub const S_OPAQUE: u8 = 20;
/// Refused or broken: nothing more reaches the application.
pub const S_CLOSED: u8 = 21;
/// In the value of the API key header (digested a byte at a time).
pub const S_KEY: u8 = 22;
/// In the value of a forwarded header (read a byte at a time by [`FwdStream`]).
pub const S_FWD: u8 = 23;

/// The connection has carried an HTTP request (so bytes that do not start one are an error, not
/// an opaque protocol).
pub const F_HTTP: u8 = 1;
/// The current request had a `Content-Length`.
pub const F_CL: u8 = 2;
/// The current request's `Transfer-Encoding` is `chunked`.
pub const F_CHUNKED: u8 = 4;
/// The current request had a `Transfer-Encoding` that is not exactly `chunked`, or two of them.
pub const F_TE_BAD: u8 = 8;
/// The last header line was `Content-Length` or `Transfer-Encoding` (a folded line after it
/// would change the framing).
pub const F_FRAMING_LINE: u8 = 16;
/// The current line had a CR, so only an LF may follow.
pub const F_CR: u8 = 32;
/// A 429 with `Connection: close` was sent: the stream is still followed, so that what the
/// client had already sent is counted (as refused), but nothing more reaches the application.
pub const F_REFUSED: u8 = 64;
/// Empty lines opened the connection (before any request).
pub const F_EMPTY_START: u8 = 128;
/// Flags of the connection (the rest belong to the current request).
const F_CONNECTION: u8 = F_HTTP | F_REFUSED;

/// Longest API key header value read (an `Authorization: Basic` value of a 128-byte user name
/// and its password, with room); a longer one is an unknown key.
pub const KEY_VALUE_MAX: usize = 512;

/// Turns of the header-line scan in one step (each looks at four words or past a line).
const SCAN_TURNS: usize = 16;
/// Words of an API key taken in one turn of the kernel's value loop (five hold a 40-byte key).
const KEY_RUN_WORDS: usize = 5;
/// Words of a header name taken in one turn of the kernel's name loop (the names that matter
/// are shorter).
const NAME_RUN_WORDS: usize = HEADER_NAME_MAX / 8 + 1;

/// Longest method token followed.
pub const METHOD_MAX: u8 = 32;
/// Largest `Content-Length` accepted (beyond it the framing is called broken).
pub const CONTENT_LENGTH_MAX: u64 = 1 << 50;
/// Most hex digits in a chunk size.
pub const CHUNK_DIGITS_MAX: u8 = 12;

/// The framing state of one connection (kept in the socket's state in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Stream {
    /// Bytes left in the current body or chunk; the number being read in a chunk-size line or a
    /// `Content-Length` line.
    pub remaining: u64,
    /// The current request's `Content-Length`.
    pub length: u64,
    /// The method's first 8 bytes, little-endian.
    pub method: u64,
    /// `S_*`.
    pub state: u8,
    /// Position within the current token or value.
    pub sub: u8,
    /// `F_*`.
    pub flags: u8,
    /// Header names the current name may still be (bits of [`HEADER_NAMES`]).
    pub names: u8,
    /// Media prefixes the path may still be under (bit per prefix).
    pub media: u8,
    /// Bytes of normalised path compared so far.
    pub mpos: u8,
    /// Dot-segment state of the path: `SEG_*`.
    pub seg: u8,
    /// Percent-decoding state: 0, [`PCT_OPEN`] after `%`, or [`PCT_HALF`] | first hex digit.
    pub pct: u8,
    /// The org of the peer address (0: unmapped, or `address` is not a source).
    pub peer_org: u32,
    /// The org of a believed PROXY header's source (with [`ID_PROXY_OK`]).
    pub proxy_org: u32,
    /// A believed PROXY header's source address (its org is looked up again on reloads).
    pub proxy_addr: AddrKey,
    /// `ID_*` flags.
    pub id: u16,
    /// The `ID_*` source the connection's org comes from (0: none).
    pub via: u8,
    /// `R_*`: the current request's.
    pub req: u8,
    pub _pad: [u8; 4],
    /// The current request's API key, digested as it is read.
    pub hash: KeyHash,
    /// The current request's API key header value, as read so far.
    pub key: KeyText,
    /// The org of the current request's key (with [`R_KEY_OK`]).
    pub key_org: u32,
    /// The current request's forwarded header lines, as read so far (with [`R_FWD`]).
    pub fwd: FwdStream,
    pub _pad2: [u8; 4],
}

/// Words of a [`Stream`] before its identification state (`hash` on): what every chunk's walk
/// reads and changes. The rest matters only while a request's identifying header is being read
/// or its result waits for the head's end ([`Stream::identifying`]).
pub const STREAM_CORE_WORDS: usize = core::mem::offset_of!(Stream, hash) / 8;
const _: () = assert!(core::mem::offset_of!(Stream, hash).is_multiple_of(8));

/// `Stream::req`: the current request uses quota (counted at the end of its head, once its org
/// is known).
pub const R_COUNTED: u8 = 1;
/// The current request is an exempt media GET (likewise).
pub const R_MEDIA: u8 = 2;
/// The current request had an API key header (only the first is read).
pub const R_KEY: u8 = 4;
/// Its key named an org (`key_org`).
pub const R_KEY_OK: u8 = 8;
/// Its head has ended: [`Stream::attribute`] is due.
pub const R_ENDED: u8 = 16;
/// It had a forwarded header line (`fwd` reads them).
pub const R_FWD: u8 = 32;

/// `Stream::id`: the connection's first bytes were looked at (a PROXY header skipped and,
/// from a trusted proxy, believed).
pub const ID_OPEN: u16 = 1;
/// The peer is a trusted proxy and `proxy_protocol` a source: a PROXY header is believed.
pub const ID_TRUSTED: u16 = 8;
/// A trusted PROXY header named the source in `proxy_addr`.
pub const ID_PROXY_OK: u16 = 2;
/// `api_key` is a source, or `forwarded` on a connection from a trusted proxy: each request is
/// attributed on its own, at the end of its head (when its headers have been read), and counted
/// then.
pub const ID_PER_REQUEST: u16 = 16;
/// `forwarded` is a source and the peer a trusted proxy: its forwarded headers are believed.
pub const ID_FWD: u16 = 32;
/// The connection's org may have changed: the kernel moves its open-connection count.
pub const ID_CONN_DIRTY: u16 = 4;

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

const SEG_START: u8 = 0;
const SEG_DOT: u8 = 1;
const SEG_NAME: u8 = 2;
const PCT_OPEN: u8 = 0x40;
const PCT_HALF: u8 = 0x80;

/// What one chunk held.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests that use quota.
    pub counted: u32,
    /// Exempt media GETs.
    pub media: u32,
    /// Request lines that started in the chunk.
    pub starts: u32,
    /// The org the chunk's requests count for, and its `ID_*` source.
    pub org: u32,
    pub via: u8,
    /// The last request started was a HEAD (its 429 must not carry a body it does not expect).
    pub head_method: bool,
    /// The connection turned out not to be HTTP/1.x (first bytes).
    pub opaque: bool,
    /// The framing broke: the connection must be closed.
    pub broken: bool,
    /// A request attributed on its own (`ID_PER_REQUEST`) set `org` and `via`: a later one of
    /// another org in the same chunk breaks the stream (a chunk is passed or refused whole).
    pub attributed: bool,
    pub _pad: [u8; 3],
    /// Requests whose API key header named no org.
    pub unknown_keys: u32,
    /// Where a scan of header lines, or a run of a name's or a key's words, has got to in the
    /// window. Kept here, in map memory in the kernel, so that the verifier does not follow its
    /// value: each turn of the loop then starts from the same state, however far it got. (Also
    /// what leaves the tally without padding: a copy must not carry undefined bytes, which the
    /// verifier rejects.)
    pub scan: u32,
}

impl Tally {
    #[inline(always)]
    fn set_scan(&mut self, at: usize) {
        // SAFETY: a plain field of `self`. Volatile, so the compiler does not carry the value
        // past the memory that is to hide it from the verifier.
        unsafe { core::ptr::write_volatile(&mut self.scan, at as u32) }
    }

    #[inline(always)]
    fn scan(&self) -> usize {
        // SAFETY: as in `set_scan`.
        unsafe { core::ptr::read_volatile(&self.scan) as usize }
    }
}

/// The kernel's working space for walking one chunk (a per-CPU map value: the verifier tracks
/// nothing stored in map memory, so every `bpf_loop` iteration starts from the same unknown
/// state and the loop is verified in a few passes instead of value by value).
#[repr(C)]
pub struct WalkSlot {
    /// Next byte of the chunk to look at.
    pub pos: u64,
    pub len: u64,
    /// Where the window's bytes start in the chunk, and how many it holds.
    pub win_off: u64,
    pub win_n: u64,
    /// A load failed: the chunk could not be followed to its end.
    pub failed: u64,
    /// Verdicts running on this CPU (a softirq can interrupt one in process context): which
    /// slot the next one takes. Used in slot 0 only.
    pub depth: u64,
    pub tally: Tally,
    /// The socket's org and `SOCK_F_*` kind, and where its state is (0: nowhere; the verdict's
    /// `FOUND_*`), noted before the walk (in map memory: values the verdict keeps in registers
    /// across the walk make the verifier walk it again for each way they were reached).
    pub sock_org: u32,
    pub sock_kind: u32,
    pub sock_found: u64,
    pub win: Window,
    /// A connection's first bytes, read for a PROXY header.
    pub first: [u8; crate::ident::CAP],
    /// Bytes of the window an inner loop (an API key's value, [`Stream::key_run`]; a forwarded
    /// header's, [`Stream::fwd_byte`]; a header name, [`Stream::name_run`]) has taken.
    pub used: u64,
    /// A PROXY v1 line starts the connection: bytes of `first` to read it from (0: none).
    pub v1_n: u64,
    /// A PROXY v1 line as read so far.
    pub v1: crate::ident::V1Text,
}

/// Walk slots per CPU: a verdict and one that interrupts it.
pub const WALK_SLOTS: u32 = 2;

/// What [`Stream::name_word`] did with a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameWord {
    /// Bytes used; the name goes on, or its line is skipped.
    Used(u64),
    /// The name ends at a `:`: bytes up to it included, the `:` left to `name_byte`.
    Colon(u64),
}

/// Header names the framing depends on (lowercase) and their lengths.
pub const HEADER_NAMES: [[u8; 32]; 2] = [pad32(b"content-length"), pad32(b"transfer-encoding")];
const HEADER_LENS: [u8; 2] = [14, 17];
const NAME_CL: u8 = 1;
const NAME_TE: u8 = 2;
/// The API key header (see [`KernelConfig::line_first`]).
pub const NAME_KEY: u8 = 4;
/// The forwarded header.
pub const NAME_FWD: u8 = 8;
const CHUNKED: &[u8; 8] = b"chunked\0";

const fn pad32(name: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < name.len() {
        out[i] = name[i];
        i += 1;
    }
    out
}

/// [`HEADER_NAMES`] from each byte on as words ([`name_words`]; bytes past a name are masked
/// off by [`prefix_marks`]).
const HEADER_WORDS: [[u64; HEADER_NAME_MAX]; 2] =
    [name_words(&HEADER_NAMES[0]), name_words(&HEADER_NAMES[1])];

/// `HEADER_NAMES[i]` from byte `pos` as a little-endian word.
#[inline(always)]
fn header_word(i: usize, pos: usize) -> u64 {
    HEADER_WORDS[i & 1][pos & (HEADER_NAME_MAX - 1)]
}

/// Bytes `pos..pos + 8` of a name, `byte(j)` each, as a little-endian word.
#[inline(always)]
pub(crate) fn name_word_at(pos: usize, byte: impl Fn(usize) -> u8) -> u64 {
    let mut w = 0u64;
    let mut j = 0;
    while j < 8 {
        w |= (byte(pos + j) as u64) << (8 * j);
        j += 1;
    }
    w
}

/// Marks (0x80) on the first bytes of `w` that equal those of `target`, a name's bytes from
/// `pos` (`len` bytes long), up to the first that does not or the name's end.
#[inline(always)]
fn prefix_marks(w: u64, target: u64, len: usize, pos: usize) -> u64 {
    const HI: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Byte j is the name's when pos + j < len: (0x80 + len) - (pos + j + 1) keeps its high bit
    // (names are shorter than 0x80 - 8 bytes, so no byte borrows from the next).
    let ends = (pos as u64 & 0x3f) * ONES + 0x0807_0605_0403_0201;
    let valid = ((((len as u64 & 0x3f) * ONES) | HI) - ends) & HI;
    let miss = !(byte_eq_mask(w ^ target, 0) & valid) & HI;
    (miss & miss.wrapping_neg()).wrapping_sub(1) & HI
}

/// Whether a header line whose first eight bytes are `w` may be one of the names of interest
/// (the line's first byte a name's: [`StreamRules::line_first`] neither 0 nor [`LINE_OTHER`]):
/// false only when every name differs from it within the word (the line is then skipped as
/// `name_run` would skip it, without a loop of its own). Not inlined: in the kernel its
/// temporaries would take the walk's frame past the verifier's limit on the chain of calls.
#[inline(never)]
fn may_be_named(w: u64, cfg: &impl StreamRules) -> bool {
    let dw = dash_word(lower_word(w));
    // 1 when `dw` differs from a name within the name's first eight bytes (`target`, zero
    // past its end), or there is no such name (0). A name whose first byte is not the line's
    // differs at its first byte, so the classes need no other look. `dw` is `_`-folded for all
    // four: that lets through at most a `Content_Length`, which `name_run` then skips.
    let differs = |target: u64| -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        // Name bytes are tokens (below 0x80, not 0): each marks its byte of the mask.
        let named = ((target + LOW7) & !LOW7) >> 7;
        let x = (dw ^ target) & named.wrapping_mul(0xff);
        ((x | x.wrapping_neg()) >> 63) | (((target | target.wrapping_neg()) >> 63) ^ 1)
    };
    differs(header_word(0, 0))
        & differs(header_word(1, 0))
        & differs(cfg.key_name_word(0))
        & differs(cfg.fwd_name_word(0))
        == 0
}

/// Whether the header line at `win[at..n]` starts with the key header's name (of 1 to 15
/// bytes) and its `:`, whole in the window, as the name loop reads them (case and `_`/`-`
/// aside). The name loop then reads the line as the key's whatever framing name it also is;
/// only the forwarded header's name comes first there, so a key header named like it is left
/// to the loop. Not inlined, as [`may_be_named`] (and the words are read here, not in the
/// walk's frame).
#[inline(never)]
fn key_name_here(win: &Window, at: usize, n: usize, cfg: &impl StreamRules) -> bool {
    if at + 16 > n {
        return false;
    }
    let (w0, w1) = (word(win, at), word(win, at + 8));
    let l = cfg.key_name_len();
    if l == 0 || l > 15 {
        return false;
    }
    // The name's bytes in each word, and where its `:` is.
    let (m0, m1) = if l >= 8 {
        (u64::MAX, (1u64 << (8 * (l - 8))) - 1)
    } else {
        ((1u64 << (8 * l)) - 1, 0)
    };
    let colon = if l >= 8 {
        w1 >> (8 * (l - 8))
    } else {
        w0 >> (8 * l)
    } & 0xff;
    let (k0, k1) = (cfg.key_name_word(0), cfg.key_name_word(8));
    let same_as_fwd = cfg.fwd_name_len() == l
        && (cfg.fwd_name_word(0) ^ k0) & m0 == 0
        && (cfg.fwd_name_word(8) ^ k1) & m1 == 0;
    colon == b':' as u64
        && !same_as_fwd
        && (dash_word(lower_word(w0)) ^ k0) & m0 == 0
        && (dash_word(lower_word(w1)) ^ k1) & m1 == 0
}

/// All ones when name `i` is among `names`, else 0.
#[inline(always)]
fn alive(names: u64, i: u32) -> u64 {
    0u64.wrapping_sub((names >> i) & 1)
}

/// [`dash`] of each byte of a word.
#[inline(always)]
fn dash_word(w: u64) -> u64 {
    w ^ ((byte_eq_mask(w, b'_') >> 7) * (b'_' ^ b'-') as u64)
}

/// [`lower`] of each byte of a word.
#[inline(always)]
fn lower_word(w: u64) -> u64 {
    const HI: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let low = w & !HI;
    // High bit of each byte: its low seven bits are at least `A`, and more than `Z`.
    let ge_a = (low + ONES * (0x80 - b'A') as u64) & HI;
    let gt_z = (low + ONES * (0x80 - b'Z' - 1) as u64) & HI;
    let upper = ge_a & !gt_z & !w;
    w | (upper >> 2)
}

/// `tchar` of RFC 9110 (method and header-name bytes).
#[inline(always)]
pub const fn is_tchar(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// `_` as `-` (see `name_byte`).
#[inline(always)]
const fn dash(b: u8) -> u8 {
    if b == b'_' { b'-' } else { b }
}

#[inline(always)]
const fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() { b | 0x20 } else { b }
}

#[inline(always)]
const fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Unreserved characters other than `.` (RFC 3986): decoding their escapes cannot change how a
/// path splits into segments.
#[inline(always)]
const fn is_plain_unreserved(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'~')
}

const GET: u64 = u64::from_le_bytes(*b"GET\0\0\0\0\0");

/// (method and space as a little-endian word, mask of its bytes, method length)
const KNOWN_METHODS: [(u64, u64, u8); 7] = [
    (u64::from_le_bytes(*b"GET \0\0\0\0"), 0xffff_ffff, 3),
    (u64::from_le_bytes(*b"POST \0\0\0"), 0xff_ffff_ffff, 4),
    (u64::from_le_bytes(*b"PUT \0\0\0\0"), 0xffff_ffff, 3),
    (u64::from_le_bytes(*b"HEAD \0\0\0"), 0xff_ffff_ffff, 4),
    (u64::from_le_bytes(*b"DELETE \0"), 0xff_ffff_ffff_ffff, 6),
    (u64::from_le_bytes(*b"PATCH \0\0"), 0xffff_ffff_ffff, 5),
    (u64::from_le_bytes(*b"OPTIONS "), u64::MAX, 7),
];

/// A usual method and its space at the start of `w`: the method's word (as [`Stream::method`]
/// holds it) and its length.
#[inline(always)]
fn known_method(w: u64) -> Option<(u64, u8)> {
    let mut i = 0;
    while i < KNOWN_METHODS.len() {
        let (token, mask, len) = KNOWN_METHODS[i];
        if w & mask == token {
            // The method without its space.
            return Some((token & (mask >> 8), len));
        }
        i += 1;
    }
    None
}
const HEAD: u64 = u64::from_le_bytes(*b"HEAD\0\0\0\0");
const PRI: u64 = u64::from_le_bytes(*b"PRI\0\0\0\0\0");
const CONNECT: u64 = u64::from_le_bytes(*b"CONNECT\0");
/// A PROXY v1 line read as a request line: one the first look at the connection could not see
/// whole (cut across segments).
const PROXY: u64 = u64::from_le_bytes(*b"PROXY\0\0\0");

/// 8 bytes of the window from `at` (masked into the buffer), little-endian.
#[inline(always)]
fn word(win: &Window, at: usize) -> u64 {
    let at = at & (WIN - 1);
    let lo = win.word(at / 8);
    let shift = (at % 8) * 8;
    if shift == 0 {
        return lo;
    }
    (lo >> shift) | (win.word(at / 8 + 1) << (64 - shift))
}

/// Offset of the first `\n` in `win[at..n]`, an aligned word at a time.
#[inline(always)]
pub fn find_lf(win: &Window, at: usize, n: usize) -> Option<usize> {
    if at >= n || at >= WIN {
        return None;
    }
    let mut o = at & !7;
    // Bytes before `at` in the first word are not looked at.
    let mut keep = u64::MAX << ((at - o) * 8);
    let mut k = 0;
    while k < WIN / 8 {
        if o >= n || o >= WIN {
            return None;
        }
        let mut m = byte_eq_mask(win.word(o / 8), b'\n') & keep;
        let valid = n - o;
        if valid < 8 {
            // Bytes past `n` are stale.
            m &= (1u64 << (valid * 8)) - 1;
        }
        if m != 0 {
            return Some(o + first_marked(m));
        }
        keep = u64::MAX;
        o += 8;
        k += 1;
    }
    None
}

impl Stream {
    /// The state of a new connection.
    pub const fn new() -> Self {
        Stream {
            remaining: 0,
            length: 0,
            method: 0,
            state: S_IDLE,
            sub: 0,
            flags: 0,
            names: 0,
            media: 0,
            mpos: 0,
            seg: 0,
            pct: 0,
            peer_org: UNMAPPED_ORG,
            proxy_org: UNMAPPED_ORG,
            proxy_addr: [0; 16],
            id: 0,
            via: 0,
            req: 0,
            _pad: [0; 4],
            hash: KeyHash::new([0; 2]),
            key: KeyText::new(KEY_PLAIN),
            key_org: UNMAPPED_ORG,
            fwd: FwdStream::new(FWD_X_FORWARDED_FOR),
            _pad2: [0; 4],
        }
    }

    /// The org of the connection as a whole and its `ID_*` source: the first of the
    /// connection's sources (`proxy_protocol`, `address`) in `identify_by` that names an org.
    #[inline(always)]
    pub fn conn_org(&self, cfg: &KernelConfig) -> (u32, u8) {
        self.org_by(&cfg.identify_by, false, UNMAPPED_ORG)
    }

    /// The org of the connection's current request and its `ID_*` source: as
    /// [`Self::conn_org`], with its API key and its forwarded address where those are listed.
    #[inline(always)]
    pub fn request_org(&self, cfg: &impl StreamRules) -> (u32, u8) {
        let mut fwd_org = UNMAPPED_ORG;
        if self.req & R_FWD != 0
            && self.id & ID_FWD != 0
            && let Some(a) = self.fwd.result()
        {
            fwd_org = cfg.addr_org(&a);
        }
        self.org_by(&cfg.identify_by(), true, fwd_org)
    }

    #[inline(always)]
    fn org_by(&self, ids: &[u8; ID_SOURCES], request: bool, fwd_org: u32) -> (u32, u8) {
        let mut i = 0;
        while i < ID_SOURCES {
            let s = ids[i];
            let org = match s {
                ID_API_KEY if request && self.req & R_KEY_OK != 0 => self.key_org,
                ID_FORWARDED if request => fwd_org,
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

    /// Whether the next step reads bytes (else it only skips `remaining` of them).
    #[inline(always)]
    pub const fn needs_bytes(&self) -> bool {
        !matches!(self.state, S_BODY | S_CDATA | S_OPAQUE | S_CLOSED)
    }

    /// Skips a chunk of `len` bytes that lies wholly inside a body or a chunk's data, not
    /// reaching its end, exactly as [`Self::feed`] would (nothing counted, the state kept): true
    /// when it did. The kernel takes such chunks (most of a large upload) without a walk. Never
    /// after a refusal that closes the connection (those bytes are counted and dropped).
    #[inline(always)]
    pub fn skip_body(&mut self, len: u64) -> bool {
        if !matches!(self.state, S_BODY | S_CDATA)
            || self.remaining <= len
            || self.flags & F_REFUSED != 0
        {
            return false;
        }
        self.remaining -= len;
        true
    }

    /// Nothing more of this connection needs looking at (opaque or closed).
    #[inline(always)]
    pub const fn is_done(&self) -> bool {
        matches!(self.state, S_OPAQUE | S_CLOSED)
    }

    /// Between requests: what comes next starts a new one.
    #[inline(always)]
    pub const fn at_boundary(&self) -> bool {
        self.state == S_IDLE
    }

    /// Consumes bytes of the chunk: `win[at..n]` are its next bytes and `left` (≥ 1) how many
    /// remain in it from `at` on (body skips need no window). Returns how many were consumed (0
    /// only when the stream is done).
    #[inline(always)]
    pub fn step(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        left: u64,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        match self.state {
            S_BODY | S_CDATA => {
                let take = if self.remaining < left {
                    self.remaining
                } else {
                    left
                };
                self.remaining -= take;
                if self.remaining == 0 {
                    self.state = if self.state == S_BODY { S_IDLE } else { S_CCR };
                }
                take
            }
            S_OPAQUE | S_CLOSED => 0,
            // Only from the step's own `at`: the verifier then meets the skip's loop with one
            // state, not one per way the step could have got there.
            S_LINE | S_SKIP | S_TSKIP | S_CEXT => self.skip_line(win, at, n, cfg, t),
            _ => self.head_step(win, at, n, cfg, t),
        }
    }

    /// A step of the other states that read bytes: a byte of a state that looks at each byte,
    /// then the target when the method has just ended.
    #[inline(always)]
    fn head_step(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        let mut used = 0;
        if !matches!(self.state, S_TARGET | S_PATH) {
            used = self.byte(win[at & (WIN - 1)], win, at, n, cfg, t) as usize;
        }
        if matches!(self.state, S_TARGET | S_PATH) && at + used < n {
            used += self.target(win, at + used, n, cfg, t) as usize;
        }
        used as u64
    }

    /// Skips to the end of the current line (its LF consumed), then moves on. After a request
    /// or header line, the header lines that follow and do not matter are skipped too, and the
    /// empty line that ends the head is taken, as far as the window goes.
    #[inline(always)]
    fn skip_line(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        match self.state {
            S_LINE | S_SKIP => self.skip_header_lines(win, at, n, cfg, t),
            _ => {
                let Some(lf) = find_lf(win, at, n) else {
                    return (n - at) as u64;
                };
                if self.state == S_TSKIP {
                    self.state = S_TRL;
                } else {
                    self.chunk_size_line_end();
                }
                (lf + 1 - at) as u64
            }
        }
    }

    /// [`Self::skip_line`] of a request or header line: a scan of the window, four aligned
    /// words a turn, that goes on past each LF while [`Self::header_line`] skips the line after
    /// it.
    #[inline(always)]
    fn skip_header_lines(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        t.set_scan(at);
        let mut k = 0;
        while k < SCAN_TURNS {
            k += 1;
            let from = t.scan();
            if from >= n || from >= WIN {
                return n.saturating_sub(at) as u64;
            }
            let o = from & !7;
            let w = (o / 8) & (WIN / 8 - 1);
            // Bytes before `from` in the first word are not looked at; words past the buffer
            // read as 0 (no LF).
            let m0 = byte_eq_mask(win.word(w), b'\n') & (u64::MAX << ((from - o) * 8));
            let m1 = byte_eq_mask(win.word(w + 1), b'\n');
            let m2 = byte_eq_mask(win.word(w + 2), b'\n');
            let m3 = byte_eq_mask(win.word(w + 3), b'\n');
            let (base, m) = if m0 != 0 {
                (o, m0)
            } else if m1 != 0 {
                (o + 8, m1)
            } else if m2 != 0 {
                (o + 16, m2)
            } else if m3 != 0 {
                (o + 24, m3)
            } else {
                t.set_scan(o + 32);
                continue;
            };
            // Through map memory: the rest of the turn starts from one state for the verifier,
            // whichever word held the LF.
            t.set_scan(base + first_marked(m) + 1);
            let next = t.scan();
            // Bytes past `n` are stale: an LF there is none.
            if next > n {
                return n.saturating_sub(at) as u64;
            }
            if next >= n {
                self.state = S_HDR;
                return next.saturating_sub(at) as u64;
            }
            let b = win[next & (WIN - 1)];
            let names = cfg.line_first(b);
            // A line that starts with CR, LF or a blank goes on to `header_start` without the
            // first-word look (the end of every head, where a call would be wasted).
            if names == 0
                || (names & LINE_OTHER == 0 && next + 8 <= n && !may_be_named(word(win, next), cfg))
            {
                // Most header lines: a name of no interest, skipped with no more look at it
                // (as `header_start` and `name_run` do).
                self.flags &= !(F_FRAMING_LINE | F_CR);
                self.state = S_SKIP;
                t.set_scan(next + 1);
                continue;
            }
            // The key header's name and its `:`, whole in the window, where `name_byte` would
            // read the key: straight to its value, without a name loop.
            if names & NAME_KEY != 0
                && self.id & ID_PER_REQUEST != 0
                && self.req & R_KEY == 0
                && key_name_here(win, next, n, cfg)
            {
                self.key_named();
                return (next - at + cfg.key_name_len() + 1) as u64;
            }
            self.state = S_HDR;
            let after = (next + 1 < n).then(|| win[(next + 1) & (WIN - 1)]);
            let (used, skip) = self.header_line(b, after, cfg, t);
            if !skip {
                return (next - at) as u64 + used;
            }
            t.set_scan(next + 1);
        }
        (t.scan().min(n) - at) as u64
    }

    /// The first bytes of the target, then of the path while it may be under a media prefix
    /// (most are decided by their second byte: `/ ` or `/api`).
    #[inline(always)]
    fn target(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        let b = win[at & (WIN - 1)];
        if self.state == S_TARGET {
            self.target_byte(b, cfg, t);
        } else {
            self.path_byte(b, cfg, t);
        }
        if self.state == S_PATH && at + 1 < n {
            self.path_byte(win[(at + 1) & (WIN - 1)], cfg, t);
            return 2;
        }
        1
    }

    /// One byte of a state that looks at each byte (a usual method and its space at once; the
    /// empty line that ends a head as its CRLF).
    #[inline(always)]
    fn byte(
        &mut self,
        b: u8,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        match self.state {
            S_IDLE => {
                // The usual methods in one step, eight bytes compared at once.
                if at + 8 <= n
                    && let Some((method, len)) = known_method(word(win, at))
                {
                    self.method = method;
                    self.sub = len;
                    self.state = S_TARGET;
                    return len as u64 + 1;
                }
                self.idle(b, t)
            }
            S_METHOD => self.method_byte(b, t),
            S_HDR => {
                let after = (at + 1 < n).then(|| win[(at + 1) & (WIN - 1)]);
                return self.header_line(b, after, cfg, t).0;
            }
            S_EOH => {
                if b == b'\n' {
                    self.head_end(t);
                } else {
                    self.broken(t);
                }
            }
            S_CL => self.length_byte(b, t),
            S_TE => self.te_byte(b, t),
            S_CSIZE => self.chunk_size_byte(b, t),
            S_CCR => match b {
                b'\r' => self.state = S_CLF,
                b'\n' => self.start_chunk_size(),
                _ => self.broken(t),
            },
            S_CLF => {
                if b == b'\n' {
                    self.start_chunk_size();
                } else {
                    self.broken(t);
                }
            }
            S_TRL => match b {
                b'\r' => self.state = S_TCR,
                b'\n' => self.state = S_IDLE,
                _ => self.state = S_TSKIP,
            },
            S_TCR => {
                if b == b'\n' {
                    self.state = S_IDLE;
                } else {
                    self.broken(t);
                }
            }
            _ => return 0,
        }
        1
    }

    /// The start of a header line, `b` and the byte `after` it if the window has it: the empty
    /// line that ends the head (its CRLF at once), or [`Self::header_start`]. Bytes used, and
    /// whether the rest of the line is to be skipped.
    #[inline(always)]
    fn header_line(
        &mut self,
        b: u8,
        after: Option<u8>,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> (u64, bool) {
        if b == b'\r' && after == Some(b'\n') {
            self.flags &= !(F_FRAMING_LINE | F_CR);
            self.head_end(t);
            return (2, false);
        }
        (1, self.header_start(b, cfg, t))
    }

    #[inline(always)]
    fn broken(&mut self, t: &mut Tally) {
        self.state = S_CLOSED;
        t.broken = true;
    }

    /// Bytes that cannot start a request: on a new connection, an opaque protocol; after HTTP,
    /// broken framing.
    #[inline(always)]
    fn not_http(&mut self, t: &mut Tally) {
        if self.flags & F_HTTP == 0 {
            self.state = S_OPAQUE;
            t.opaque = true;
        } else {
            self.broken(t);
        }
    }

    #[inline(always)]
    fn idle(&mut self, b: u8, t: &mut Tally) {
        if b == b'\r' || b == b'\n' {
            if self.flags & F_HTTP == 0 {
                self.flags |= F_EMPTY_START;
            }
            return;
        }
        if b == 0 && self.flags & (F_HTTP | F_EMPTY_START) == F_EMPTY_START {
            // Empty lines then a zero byte: a PROXY v2 signature cut across segments, which a
            // server that expects one reads. Not followed as such, so never left unread.
            self.broken(t);
            return;
        }
        if !is_tchar(b) {
            self.not_http(t);
            return;
        }
        self.state = S_METHOD;
        self.method = b as u64;
        self.sub = 1;
    }

    #[inline(always)]
    fn method_byte(&mut self, b: u8, t: &mut Tally) {
        if b == b' ' {
            self.state = S_TARGET;
            return;
        }
        if !is_tchar(b) || self.sub >= METHOD_MAX {
            self.not_http(t);
            return;
        }
        if self.sub < 8 {
            self.method |= (b as u64) << ((self.sub as u64 & 7) * 8);
        }
        self.sub += 1;
    }

    /// The first byte of the target decides that this is a request (on a new connection it must
    /// look like one: origin form, `*`, absolute form, or CONNECT's authority).
    #[inline(always)]
    fn target_byte(&mut self, b: u8, cfg: &impl StreamRules, t: &mut Tally) {
        if b == b' ' {
            return;
        }
        let method = if self.sub <= 8 { self.method } else { 0 };
        if self.flags & F_HTTP == 0 {
            let plausible = if method == CONNECT {
                b > b' ' && b < 0x7f
            } else {
                matches!(b, b'/' | b'*' | b'h' | b'H')
            };
            if method == PROXY {
                return self.broken(t);
            }
            // `PRI * HTTP/2.0`: the HTTP/2 connection preface.
            if !plausible || (method == PRI && b == b'*') {
                self.not_http(t);
                return;
            }
        }
        self.flags |= F_HTTP;
        t.starts += 1;
        t.head_method = method == HEAD;
        self.req = 0;
        let all = cfg.all();
        if method == GET && b == b'/' && all != 0 {
            self.state = S_PATH;
            self.media = all;
            self.mpos = 0;
            self.seg = SEG_START;
            self.pct = 0;
            self.emit(b'/', cfg);
            return;
        }
        self.tally_request(false, t);
        self.state = if b == b'\n' { S_HDR } else { S_LINE };
    }

    /// The current request is counted (or, `media`, exempt): now, or at the end of its head
    /// when each request is attributed on its own.
    #[inline(always)]
    fn tally_request(&mut self, media: bool, t: &mut Tally) {
        if self.id & ID_PER_REQUEST != 0 {
            self.req |= if media { R_MEDIA } else { R_COUNTED };
        } else if media {
            t.media += 1;
        } else {
            t.counted += 1;
        }
    }

    /// One byte of a GET's path, normalised (RFC 3986 dot segments removed, escapes of
    /// unreserved characters decoded) and compared with the media prefixes as it goes. Anything
    /// the normaliser cannot settle (`..`, an escaped `.` or `/`, a backslash, a bad escape,
    /// control bytes) makes the request counted.
    #[inline(always)]
    fn path_byte(&mut self, b: u8, cfg: &impl StreamRules, t: &mut Tally) {
        if self.pct != 0 {
            let Some(h) = hex(b) else {
                return self.path_settled(false, b, t);
            };
            if self.pct == PCT_OPEN {
                self.pct = PCT_HALF | h;
                return;
            }
            let c = ((self.pct & 0x0f) << 4) | h;
            self.pct = 0;
            if is_plain_unreserved(c) {
                return self.path_char(c, cfg, t);
            }
            if c == b'.' || c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f {
                return self.path_settled(false, b, t);
            }
            // Another escape stays as it is (servers decode it into a byte that cannot change
            // the segments): compare it as the three bytes `%XY`, uppercase.
            self.path_char(b'%', cfg, t);
            self.path_char(upper_hex(c >> 4), cfg, t);
            return self.path_char(upper_hex(c & 0xf), cfg, t);
        }
        match b {
            b' ' | b'?' | b'#' | b'\r' | b'\n' => {
                // The path ends: a pending `.` segment is dropped, and the prefixes that were
                // wholly matched decide.
                let matched = self.media & cfg.matching(self.mpos, 0);
                self.path_settled(matched != 0, b, t)
            }
            b'%' => self.pct = PCT_OPEN,
            b'\\' => self.path_settled(false, b, t),
            _ if b < 0x20 || b == 0x7f => self.path_settled(false, b, t),
            _ => self.path_char(b, cfg, t),
        }
    }

    /// A (decoded) path byte: segment bookkeeping, then the comparison.
    #[inline(always)]
    fn path_char(&mut self, c: u8, cfg: &impl StreamRules, t: &mut Tally) {
        if self.state != S_PATH {
            return;
        }
        match (self.seg, c) {
            (_, b'/') => {
                // A `.` segment is dropped: the `/` before it is already out.
                if self.seg != SEG_DOT {
                    self.emit(b'/', cfg);
                }
                self.seg = SEG_START;
            }
            (SEG_START, b'.') => self.seg = SEG_DOT,
            // `..`: climbing out of a prefix is what an attacker would try.
            (SEG_DOT, b'.') => self.path_settled(false, c, t),
            (SEG_DOT, _) => {
                self.emit(b'.', cfg);
                self.emit(c, cfg);
                self.seg = SEG_NAME;
            }
            _ => {
                self.emit(c, cfg);
                self.seg = SEG_NAME;
            }
        }
        if self.state == S_PATH && self.media == 0 {
            // No prefix can match any more: counted, and the rest of the line skipped.
            self.path_settled(false, c, t);
        }
    }

    /// Compares one normalised byte with every prefix still possible (a table lookup: a loop
    /// over the prefixes multiplied the verifier's paths).
    #[inline(always)]
    fn emit(&mut self, c: u8, cfg: &impl StreamRules) {
        self.media &= cfg.matching(self.mpos, c);
        self.mpos = self.mpos.saturating_add(1);
    }

    /// The media decision for the current GET is made: exempt or counted. `b` is the byte that
    /// made it; the request line goes on to its end.
    #[inline(always)]
    fn path_settled(&mut self, exempt: bool, b: u8, t: &mut Tally) {
        self.tally_request(exempt, t);
        self.media = 0;
        self.pct = 0;
        self.state = if b == b'\n' { S_HDR } else { S_LINE };
    }

    /// The first byte of a header line. True when the line is to be skipped from here.
    #[inline(always)]
    fn header_start(&mut self, b: u8, cfg: &impl StreamRules, t: &mut Tally) -> bool {
        let framing_line = self.flags & F_FRAMING_LINE != 0;
        self.flags &= !(F_FRAMING_LINE | F_CR);
        match b {
            b'\r' => self.state = S_EOH,
            b'\n' => self.head_end(t),
            b' ' | b'\t' => {
                // A folded continuation line: harmless unless it continues a framing header.
                if framing_line {
                    self.broken(t);
                } else {
                    self.state = S_SKIP;
                    return true;
                }
            }
            _ => {
                let names = cfg.line_first(b);
                if names == 0 {
                    self.state = S_SKIP;
                    return true;
                }
                self.names = names;
                self.sub = 1;
                self.state = S_NAME;
            }
        }
        false
    }

    /// One byte of a header name that may matter ([`S_NAME`]); the kernel runs these in a
    /// loop of their own, a name in one turn of the walk.
    #[inline(always)]
    pub fn name_byte(&mut self, b: u8, cfg: &impl StreamRules) {
        let pos = self.sub as usize;
        if b == b':' {
            let cl = self.names & NAME_CL != 0 && pos == HEADER_LENS[0] as usize;
            let te = self.names & NAME_TE != 0 && pos == HEADER_LENS[1] as usize;
            // Only the first key header is read (nginx's `$http_x_api_key` is the first).
            let key = self.names & NAME_KEY != 0
                && pos == cfg.key_name_len()
                && self.id & ID_PER_REQUEST != 0
                && self.req & R_KEY == 0;
            // Every forwarded line is read, as one list, and only from a trusted proxy.
            let fwd = self.names & NAME_FWD != 0
                && pos == cfg.fwd_name_len()
                && self.id & (ID_PER_REQUEST | ID_FWD) == ID_PER_REQUEST | ID_FWD;
            self.sub = 0;
            self.remaining = 0;
            if fwd {
                self.state = S_FWD;
                if self.req & R_FWD == 0 {
                    self.req |= R_FWD;
                    self.fwd.reset(cfg.fwd_kind());
                }
                self.flags |= F_FRAMING_LINE;
            } else if key {
                self.key_named();
            } else if cl {
                self.state = S_CL;
                self.flags |= F_FRAMING_LINE;
            } else if te {
                self.state = S_TE;
                // A second Transfer-Encoding is not followed.
                if self.flags & (F_CHUNKED | F_TE_BAD) != 0 {
                    self.flags |= F_TE_BAD;
                }
                self.flags |= F_FRAMING_LINE;
            } else {
                self.state = S_SKIP;
            }
            return;
        }
        let l = lower(b);
        let mut i = 0;
        while i < 2 {
            if self.names & (1 << i) != 0
                && (pos >= HEADER_LENS[i] as usize || HEADER_NAMES[i][pos & 31] != l)
            {
                self.names &= !(1 << i);
            }
            i += 1;
        }
        // `_` and `-` match each other in the identifying names: CGI and WSGI servers hand an
        // app `X_API_Key` as HTTP_X_API_KEY, the same as `X-API-Key`, so a client must not
        // get its key past the kernel unread by spelling it with underscores.
        let d = dash(l);
        if self.names & NAME_KEY != 0 && (pos >= cfg.key_name_len() || dash(cfg.key_name(pos)) != d)
        {
            self.names &= !NAME_KEY;
        }
        if self.names & NAME_FWD != 0 && (pos >= cfg.fwd_name_len() || dash(cfg.fwd_name(pos)) != d)
        {
            self.names &= !NAME_FWD;
        }
        if self.names == 0 {
            self.state = S_SKIP;
        }
        self.sub = self.sub.saturating_add(1);
    }

    /// The key header's name and its `:` are read (by [`Self::name_byte`], or whole by the
    /// header-line scan): its value comes next.
    #[inline(always)]
    fn key_named(&mut self) {
        // As after any name and its `:` (`names` is read only in a name).
        self.sub = 0;
        self.remaining = 0;
        // `sub` 0: the key's state is reset at its first byte (in `key_byte`, which the kernel
        // verifies apart).
        self.state = S_KEY;
        self.req |= R_KEY;
        // A folded line after it would change the key the server reads.
        self.flags = (self.flags & !F_CR) | F_FRAMING_LINE;
    }

    /// A header name that may matter from `win[at..n]`: eight bytes at once where the window
    /// has them ([`Self::name_word`]), else one ([`Self::name_byte`]). Bytes used.
    #[inline(always)]
    pub fn name_run(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        // Where the run stands goes through `t.scan` (map memory in the kernel): the verifier
        // then meets what follows the words in one state, not one per number of bytes taken.
        t.set_scan(at);
        let mut i = 0;
        // The byte `name_byte` takes: the `:` that ends the words, or the one here when the
        // window has no word left.
        let mut b = win[at & (WIN - 1)];
        while i < NAME_RUN_WORDS {
            let from = t.scan();
            if from + 8 > n {
                break;
            }
            match self.name_word(word(win, from), cfg) {
                NameWord::Used(k) => {
                    t.set_scan(from + k as usize);
                    if self.state != S_NAME {
                        return (t.scan() - at) as u64;
                    }
                }
                NameWord::Colon(k) => {
                    t.set_scan(from + k as usize - 1);
                    b = b':';
                    break;
                }
            }
            i += 1;
        }
        let used = t.scan().saturating_sub(at);
        if used != 0 && b != b':' {
            return used as u64;
        }
        self.name_byte(b, cfg);
        used as u64 + 1
    }

    /// Eight bytes of a header name (`w`, little-endian) at once, exactly as [`Self::name_byte`]
    /// would take them one by one, up to where it would stop: the `:` (left to `name_byte`,
    /// with the names that reach it), or the byte where no name the header may be is left
    /// (then the rest of the line is skipped). In the kernel a name costs one turn of its loop
    /// instead of one per byte; without branches per name, which the verifier would walk in
    /// every combination.
    #[inline(always)]
    pub fn name_word(&mut self, w: u64, cfg: &impl StreamRules) -> NameWord {
        const HI: u64 = 0x8080_8080_8080_8080;
        let pos = self.sub as usize;
        let lw = lower_word(w);
        // `_` as `-` for the identifying names (see `name_byte`).
        let dw = dash_word(lw);
        // Each name's bytes of the word it matches from the first on, as marks (0x80).
        let names = self.names as u64;
        let cl =
            prefix_marks(lw, header_word(0, pos), HEADER_LENS[0] as usize, pos) & alive(names, 0);
        let te =
            prefix_marks(lw, header_word(1, pos), HEADER_LENS[1] as usize, pos) & alive(names, 1);
        let key = prefix_marks(dw, cfg.key_name_word(pos), cfg.key_name_len(), pos);
        let key = key & alive(names, 2);
        let fwd = prefix_marks(dw, cfg.fwd_name_word(pos), cfg.fwd_name_len(), pos);
        let fwd = fwd & alive(names, 3);
        let any = cl | te | key | fwd;
        let colon = byte_eq_mask(w, b':');
        if colon != 0 {
            let c = first_marked(colon);
            // Which names match every byte before the `:` (a mark's shift, not a branch per
            // name: the verifier would walk every combination).
            let reach = |marks: u64| (((marks << 8) | 0x80) >> (8 * c + 7)) as u8 & 1;
            if reach(any) != 0 {
                // The name ends here, as one of those: `name_byte` takes the `:`.
                self.names &= reach(cl) | reach(te) << 1 | reach(key) << 2 | reach(fwd) << 3;
                self.sub = (pos + c) as u8;
                return NameWord::Colon(c as u64 + 1);
            }
        }
        if any != HI {
            // No name is left at the first byte none matches (not a `:`): the line is skipped
            // from after it.
            let most = first_marked(!any & HI);
            self.names = 0;
            self.state = S_SKIP;
            self.sub = (pos + most + 1) as u8;
            return NameWord::Used(most as u64 + 1);
        }
        let whole = |marks: u64| (marks >> 63) as u8;
        self.names = whole(cl) | whole(te) << 1 | whole(key) << 2 | whole(fwd) << 3;
        self.sub = (pos + 8) as u8;
        NameWord::Used(8)
    }

    /// `Content-Length: OWS digits OWS`. Anything else, or a second header with another value,
    /// breaks the framing.
    #[inline(always)]
    fn length_byte(&mut self, b: u8, t: &mut Tally) {
        if self.flags & F_CR != 0 && b != b'\n' {
            return self.broken(t);
        }
        match b {
            b' ' | b'\t' => {
                if self.sub == 1 {
                    self.sub = 2;
                }
            }
            b'0'..=b'9' if self.sub <= 1 => {
                self.sub = 1;
                self.remaining = self.remaining * 10 + (b - b'0') as u64;
                if self.remaining > CONTENT_LENGTH_MAX {
                    self.broken(t);
                }
            }
            b'\r' => self.flags |= F_CR,
            b'\n' => {
                if self.sub == 0 || (self.flags & F_CL != 0 && self.length != self.remaining) {
                    return self.broken(t);
                }
                self.flags = (self.flags & !F_CR) | F_CL;
                self.length = self.remaining;
                self.remaining = 0;
                self.state = S_HDR;
            }
            _ => self.broken(t),
        }
    }

    /// `Transfer-Encoding: OWS chunked OWS` (any case); any other value is not followed.
    #[inline(always)]
    fn te_byte(&mut self, b: u8, t: &mut Tally) {
        if self.flags & F_CR != 0 && b != b'\n' {
            return self.broken(t);
        }
        match b {
            b'\r' => self.flags |= F_CR,
            b'\n' => {
                if self.sub != 7 && self.sub != 8 {
                    self.flags |= F_TE_BAD;
                }
                self.flags = (self.flags & !F_CR) | F_CHUNKED;
                self.state = S_HDR;
            }
            b' ' | b'\t' => match self.sub {
                0 | 8 => {}
                7 => self.sub = 8,
                _ => {
                    self.flags |= F_TE_BAD;
                    self.sub = 9;
                }
            },
            _ => {
                if self.sub < 7 && lower(b) == CHUNKED[self.sub as usize & 7] {
                    self.sub += 1;
                } else {
                    self.flags |= F_TE_BAD;
                    self.sub = 9;
                }
            }
        }
    }

    /// The empty line after the headers: the body's framing is known now.
    #[inline(always)]
    fn head_end(&mut self, t: &mut Tally) {
        if self.id & ID_PER_REQUEST != 0 {
            // Attributed right after this step, by the walk (see `attribute`).
            self.req |= R_ENDED;
        }
        let f = self.flags;
        self.flags = f & F_CONNECTION;
        self.remaining = 0;
        self.sub = 0;
        if f & F_TE_BAD != 0 || (f & F_CHUNKED != 0 && f & F_CL != 0) {
            self.broken(t);
        } else if f & F_CHUNKED != 0 {
            self.start_chunk_size();
        } else if f & F_CL != 0 && self.length > 0 {
            self.remaining = self.length;
            self.state = S_BODY;
        } else {
            self.state = S_IDLE;
        }
        self.length = 0;
    }

    /// The end of a head attributed on its own ([`R_ENDED`], set by the step that ended it;
    /// the walk calls this before the next step): the request counts for the org its sources
    /// name. A chunk holds one org's requests: another org's breaks the stream. Apart from the
    /// step because the kernel runs it in a `bpf_loop` of its own: inlined at every place a
    /// head can end, it multiplied what the verifier walks.
    #[inline(always)]
    pub fn attribute(&mut self, cfg: &impl StreamRules, t: &mut Tally) {
        let req = self.req;
        let (org, via) = self.request_org(cfg);
        self.req = 0;
        if req & (R_COUNTED | R_MEDIA) == 0 {
            return;
        }
        if t.attributed && org != t.org {
            return self.broken(t);
        }
        t.attributed = true;
        t.org = org;
        t.via = via;
        if req & R_MEDIA != 0 {
            t.media += 1;
        } else {
            t.counted += 1;
        }
        if req & (R_KEY | R_KEY_OK) == R_KEY {
            t.unknown_keys += 1;
        }
    }

    /// Whether the identification state (`hash`, `key`, `key_org`, `fwd`) holds anything the
    /// stream will read: a value is being read, or the current request has a key or forwarded
    /// result that its head's end will use. Otherwise each is reset before it is next read.
    #[inline(always)]
    pub const fn identifying(&self) -> bool {
        self.req & (R_KEY | R_KEY_OK | R_FWD) != 0 || self.in_value()
    }

    /// Whether the stream is in a header value read apart from [`Self::step`] (by
    /// [`Self::key_run`] or [`Self::fwd_byte`]).
    #[inline(always)]
    pub const fn in_value(&self) -> bool {
        matches!(self.state, S_KEY | S_FWD)
    }

    /// A byte of a forwarded header's value ([`S_FWD`]).
    #[inline(always)]
    pub fn fwd_byte(&mut self, b: u8, cfg: &impl StreamRules) {
        if b == b'\n' {
            self.fwd.line_end(&|a: &AddrKey| cfg.trusted(a));
            self.state = S_HDR;
        } else {
            self.fwd.push(b, &|a: &AddrKey| cfg.trusted(a));
        }
    }

    /// Bytes of an API key header's value ([`S_KEY`]) at `win[at..n]`: up to [`KEY_RUN_WORDS`]
    /// words at once ([`KeyText::take_run`]) and the CR after them (the LF that ends the value
    /// is looked up and left to the header-line scan), else one byte. How many were taken.
    /// The kernel runs it in a loop apart from the forwarded header's, whose
    /// address temporaries would otherwise take the key's stack frame past the verifier's
    /// limit.
    #[inline(always)]
    pub fn key_run(
        &mut self,
        win: &Window,
        at: usize,
        n: usize,
        cfg: &impl StreamRules,
        t: &mut Tally,
    ) -> u64 {
        let b = win[at & (WIN - 1)];
        if self.sub == 0 {
            self.key_start(cfg);
        }
        // Up to KEY_RUN_WORDS words of the window's bytes at once (past `n` they are stale),
        // while each is key bytes to its end. Where the run stands goes through `t.scan`, as in
        // `name_run`.
        t.set_scan(at);
        let mut i = 0;
        while i < KEY_RUN_WORDS {
            let from = t.scan();
            if from >= n {
                break;
            }
            let avail = if n - from < 8 { n - from } else { 8 };
            let k = self.key.take_run(word(win, from), avail, &mut self.hash);
            t.set_scan(from + k);
            if k < 8 {
                break;
            }
            i += 1;
        }
        let mut used = t.scan().saturating_sub(at);
        // Then one byte, as `key_byte` takes it: the one here when no run was taken, or the LF
        // of the usual end of the value, CR LF, right after a run (the CR as `push` takes it,
        // a trailing blank): a key in one turn.
        let b = if used == 0 {
            b
        } else {
            let cr = at + used;
            if cr + 1 >= n || win[cr & (WIN - 1)] != b'\r' || win[(cr + 1) & (WIN - 1)] != b'\n' {
                return used as u64;
            }
            self.key.push(b'\r', &mut self.hash);
            used += 1;
            b'\n'
        };
        self.key_byte(b, cfg);
        if b == b'\n' && used > 0 {
            // The LF is left to the header-line scan (`S_SKIP` there), which then looks at the
            // next line as after any other: one of no interest is skipped without a turn.
            self.state = S_SKIP;
            return used as u64;
        }
        used as u64 + 1
    }

    /// The key header's value begins: its reading and digest start over.
    #[inline(always)]
    fn key_start(&mut self, cfg: &impl StreamRules) {
        self.sub = 1;
        self.key.reset(cfg.key_kind());
        self.hash.reset(cfg.key_secret());
    }

    /// A byte of the API key header's value ([`S_KEY`]; [`Self::step`] takes every other
    /// state). Its LF ends it, and the key's digest is looked up. Apart from `step` because the
    /// kernel runs it in a `bpf_loop` of its own: inside the step it doubled what the verifier
    /// walks.
    #[inline(always)]
    fn key_byte(&mut self, b: u8, cfg: &impl StreamRules) {
        if b != b'\n' {
            if self.key.seen as usize >= KEY_VALUE_MAX {
                // Longer than any key a value can carry: unknown, and the rest skipped.
                self.state = S_SKIP;
                return;
            }
            self.key.push(b, &mut self.hash);
            return;
        }
        self.state = S_HDR;
        if let Some(n) = self.key.finish(self.key.seen)
            && n <= API_KEY_MAX
            && let Some(org) = cfg.key_org(self.hash.finish())
        {
            self.key_org = org;
            self.req |= R_KEY_OK;
        }
    }

    #[inline(always)]
    fn start_chunk_size(&mut self) {
        self.state = S_CSIZE;
        self.sub = 0;
        self.remaining = 0;
        self.flags &= !F_CR;
    }

    /// `chunk-size [BWS ; ext] CRLF`, hex digits first.
    #[inline(always)]
    fn chunk_size_byte(&mut self, b: u8, t: &mut Tally) {
        if self.flags & F_CR != 0 && b != b'\n' {
            return self.broken(t);
        }
        if let Some(h) = hex(b)
            && self.sub < CHUNK_DIGITS_MAX
        {
            self.remaining = (self.remaining << 4) | h as u64;
            self.sub += 1;
            return;
        }
        if self.sub == 0 || hex(b).is_some() {
            return self.broken(t);
        }
        match b {
            b';' | b' ' | b'\t' => self.state = S_CEXT,
            b'\r' => self.flags |= F_CR,
            b'\n' => self.chunk_size_line_end(),
            _ => self.broken(t),
        }
    }

    /// The chunk-size line ended: data follows, or (size 0) the trailer.
    #[inline(always)]
    fn chunk_size_line_end(&mut self) {
        self.flags &= !F_CR;
        self.sub = 0;
        self.state = if self.remaining == 0 { S_TRL } else { S_CDATA };
    }

    /// Feeds a whole chunk, a window at a time, as the kernel does (host side and tests).
    pub fn feed(&mut self, bytes: &[u8], cfg: &impl StreamRules) -> Tally {
        let mut t = Tally::default();
        let mut win = Window([0u8; WIN_BUF]);
        let (mut win_off, mut win_n) = (0usize, 0usize);
        let mut pos = 0usize;
        while pos < bytes.len() {
            if self.needs_bytes() && !(pos >= win_off && pos < win_off + win_n) {
                win_off = pos;
                win_n = (bytes.len() - pos).min(WIN);
                // Past the chunk's bytes, LFs: the kernel's window holds stale bytes there,
                // and a stale LF must never be taken for one of the chunk's.
                win = Window([b'\n'; WIN_BUF]);
                win[..win_n].copy_from_slice(&bytes[pos..pos + win_n]);
            }
            let at = pos.wrapping_sub(win_off);
            let used = if self.state == S_KEY {
                self.key_run(&win, at, win_n, cfg, &mut t)
            } else if self.state == S_FWD {
                self.fwd_byte(win[at & (WIN - 1)], cfg);
                1
            } else if self.state == S_NAME {
                self.name_run(&win, at, win_n, cfg, &mut t)
            } else {
                self.step(&win, at, win_n, (bytes.len() - pos) as u64, cfg, &mut t)
            };
            if self.req & R_ENDED != 0 {
                self.attribute(cfg, &mut t);
            }
            if used == 0 {
                break;
            }
            pos += used as usize;
        }
        t
    }
}

#[inline(always)]
const fn upper_hex(v: u8) -> u8 {
    if v < 10 { b'0' + v } else { b'A' + v - 10 }
}

/// Bits of the configured media prefixes.
#[inline(always)]
fn media_bits(cfg: &KernelConfig) -> u8 {
    let n = cfg.media_prefix_count as usize;
    if n >= MAX_MEDIA_PREFIXES {
        0xff
    } else {
        ((1u32 << n) - 1) as u8
    }
}

#[cfg(test)]
mod tests;
