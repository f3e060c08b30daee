//! The `#[repr(C)]` values stored in the maps, and the constants that size them (the maps
//! themselves are declared in [`crate::layout`]).

use bytemuck::{Pod, Zeroable};

/// Program names (the Rust function names in limiter-ebpf).
pub mod programs {
    pub const SOCK_OPS: &str = "limiter_sock_ops";
    pub const VERDICT: &str = "limiter_verdict";
    pub const REFUSE: &str = "limiter_refuse";
    pub const PUSH_MSG: &str = "limiter_push_msg";
    pub const API_MSG: &str = "limiter_api_msg";
    pub const SYN_GATE: &str = "limiter_syn_gate";
}

/// Org slot 0 collects traffic whose org is unknown; real orgs start at 1.
pub const UNMAPPED_ORG: u32 = 0;
/// Default capacity of the org maps (slot 0 included). The daemon may raise it at load time.
pub const MAX_ORGS: u32 = 65_536;
/// Default capacity of the address → org trie (and of the exact-host table beside it).
pub const MAX_CIDRS: u32 = 262_144;
/// Prefix length of a single address in an [`AddrKey`] (IPv4 /32 is IPv4-mapped /128). Such
/// entries go to ORG_BY_HOST, a hash: inserting a million of them into the LPM trie took seconds.
pub const HOST_PREFIX_LEN: u32 = 128;
/// Inbound API connections with state (counted, limited, framed) at once; outbound push
/// connections have a table of this size of their own.
pub const MAX_SOCKETS: u32 = 262_144;
/// API_SOCKS holds this many times [`MAX_SOCKETS`]: an org's connection that finds the state
/// tables full still gets the verdict, which counts and limits it by its address.
pub const API_SOCKS_FACTOR: u32 = 2;
/// Name of the eBPF global with the number of inbound connections that get state
/// ([`MAX_SOCKETS`]; a test hook lowers it). Connections of no org get state only below 3/4 of
/// it, so that orgs' connections always find room.
pub const SOCK_CAPACITY_GLOBAL: &str = "SOCK_CAPACITY";
/// Name of the eBPF global that tells the programs of one daemon start from another's (see
/// SOCK_GEN): a socket keeps the programs it entered the socket map with, and those of an
/// earlier start hand its traffic to the current ones.
pub const GENERATION_GLOBAL: &str = "GENERATION";
/// What [`SockState`] (the stream parser's state in it included) means. The socket tables
/// outlive the org tables (they are shared by every map layout, so live connections survive a
/// restart that resizes the org maps); a build that changes the meaning of a field or parser
/// state bumps this, and its socket tables then start empty instead of misreading the old ones.
pub const SOCK_FORMAT: u32 = 3;
/// Name of the eBPF global that says which low bits of a socket cookie pick its SOCK_SLOTS
/// entry (`MAX_SOCKETS - 1`; the tests narrow it so that sockets share slots).
pub const SOCK_SLOT_MASK_GLOBAL: &str = "SOCK_SLOT_MASK";
pub const MAX_API_PORTS: u32 = 64;
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// The TRACE ring buffer's size: a few thousand records between two reads of the tracer.
pub const TRACE_BYTES: u32 = 1024 * 1024;

pub const MAX_MEDIA_PREFIXES: usize = 8;
/// Longest media prefix the kernel compares.
pub const MEDIA_PREFIX_MAX: usize = 64;

/// Default capacity of the API_KEYS map (more when the keys file needs it).
pub const MIN_API_KEYS: u32 = 4096;
/// Entries of the TRUSTED_PROXIES map (CIDRs of `api.trusted_proxies`).
pub const MAX_TRUSTED_PROXIES: u32 = 1024;
/// Longest API key the kernel looks up (bytes of the key itself: a Bearer token, a Basic user
/// name or a plain header value); a longer one is an unknown key.
pub const API_KEY_MAX: usize = 128;
/// Longest header name for `api.api_key_header` and `api.forwarded_header`.
pub const HEADER_NAME_MAX: usize = 32;

/// Where an org can be known from, in the order of `KernelConfig::identify_by` (`ID_END` ends
/// the list).
pub const ID_END: u8 = 0;
/// The connection's peer address.
pub const ID_ADDRESS: u8 = 1;
/// The source address of a PROXY protocol header from a trusted proxy.
pub const ID_PROXY_PROTOCOL: u8 = 2;
/// A forwarded-address header of a request from a trusted proxy.
pub const ID_FORWARDED: u8 = 3;
/// A request's API key.
pub const ID_API_KEY: u8 = 4;
/// Most entries of `identify_by`.
pub const ID_SOURCES: usize = 4;

/// `KernelConfig::forwarded_kind`: which header syntax carries the forwarded address.
pub const FWD_X_FORWARDED_FOR: u8 = 0;
pub const FWD_FORWARDED: u8 = 1;
pub const FWD_X_REAL_IP: u8 = 2;

/// `KernelConfig::key_kind`: the key is the header's whole value.
pub const KEY_PLAIN: u8 = 0;
/// The key is an `Authorization` value's Bearer token or Basic user name.
pub const KEY_AUTHORIZATION: u8 = 1;

/// The single entry of the CONFIG array map. Written by the daemon, read by every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelConfig {
    /// Added to `CLOCK_TAI` nanoseconds to get "limiter time": UTC shifted so days start at 0.
    /// It folds in TAI−UTC, `limits.day_start` and a test-only clock shift.
    pub clock_offset_ns: i64,
    /// Length of a quota day (86 400 s; shorter only in tests).
    pub day_len_ns: u64,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Bumped whenever the address table changes: connections attributed under an older
    /// generation look their org up again on their next request.
    pub addr_gen: u32,
    pub media_prefix_count: u32,
    /// Names the org ids of these maps: sockets whose state carries another epoch were attributed
    /// under other org maps (a restart that resized them) and are attributed again.
    pub org_epoch: u32,
    pub media_prefix_len: [u8; MAX_MEDIA_PREFIXES],
    pub media_prefixes: [[u8; MEDIA_PREFIX_MAX]; MAX_MEDIA_PREFIXES],
    /// SipHash-1-3 key of API_KEYS' digests: a secret, so that no client can craft a key that
    /// lands on another org's digest.
    pub key_secret: [u64; 2],
    /// `ID_*` sources, tried in order; `ID_END` ends the list.
    pub identify_by: [u8; ID_SOURCES],
    /// `FWD_*`.
    pub forwarded_kind: u8,
    /// `KEY_*`.
    pub key_kind: u8,
    /// Bytes of `key_header` (0: no API key header).
    pub key_header_len: u8,
    /// Bytes of `fwd_header` (0: no forwarded header).
    pub fwd_header_len: u8,
    /// The API key header's name, lowercase.
    pub key_header: [u8; HEADER_NAME_MAX],
    /// The forwarded header's name, lowercase.
    pub fwd_header: [u8; HEADER_NAME_MAX],
    /// For each byte, what a header line that starts with it may be (`stream::line_class`: the
    /// framing headers, and the identifying headers named here; see
    /// `stream::fill_name_tables`).
    pub line_first: [u8; 256],
    /// `key_header` from each byte on, eight bytes as a little-endian word with `_` as `-`
    /// (`stream::name_words`): a header name is compared a word at a time, and one load here
    /// costs less than building the word byte by byte in every turn.
    pub key_words: [u64; HEADER_NAME_MAX],
    /// `fwd_header` as `key_words`.
    pub fwd_words: [u64; HEADER_NAME_MAX],
}

/// The daemon has written a valid config; until then the programs pass everything uncounted.
pub const CONFIG_F_READY: u32 = 1;

impl KernelConfig {
    pub const fn empty() -> Self {
        Self {
            clock_offset_ns: 0,
            day_len_ns: crate::day::NS_PER_DAY,
            flags: 0,
            addr_gen: 0,
            media_prefix_count: 0,
            org_epoch: 0,
            media_prefix_len: [0; MAX_MEDIA_PREFIXES],
            media_prefixes: [[0; MEDIA_PREFIX_MAX]; MAX_MEDIA_PREFIXES],
            key_secret: [0; 2],
            identify_by: [ID_ADDRESS, ID_END, ID_END, ID_END],
            forwarded_kind: FWD_X_FORWARDED_FOR,
            key_kind: KEY_PLAIN,
            key_header_len: 0,
            fwd_header_len: 0,
            key_header: [0; HEADER_NAME_MAX],
            fwd_header: [0; HEADER_NAME_MAX],
            line_first: crate::stream::line_classes(0, 0),
            key_words: [0; HEADER_NAME_MAX],
            fwd_words: [0; HEADER_NAME_MAX],
        }
    }

    /// Adds a media prefix; false when the table is full or the prefix too long.
    pub fn push_media_prefix(&mut self, prefix: &[u8]) -> bool {
        let n = self.media_prefix_count as usize;
        if n >= MAX_MEDIA_PREFIXES || prefix.is_empty() || prefix.len() > MEDIA_PREFIX_MAX {
            return false;
        }
        self.media_prefixes[n][..prefix.len()].copy_from_slice(prefix);
        self.media_prefix_len[n] = prefix.len() as u8;
        self.media_prefix_count += 1;
        true
    }
}

/// Limits of one org, indexed by org id in ORG_LIMITS.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct OrgLimits {
    pub daily_requests: u64,
    pub concurrent_connections: u32,
    /// `ORG_F_*` bits.
    pub flags: u32,
    /// The org's name, for the 429's detail (the kernel knows orgs only by id otherwise).
    pub name_len: u32,
    /// New connections a second the XDP gate lets through while the org is out of its daily
    /// quota (`pace_over_quota`); 0: not paced.
    pub pace_rate: u32,
    pub name: [u8; crate::reply::NAME_MAX],
}

impl Default for OrgLimits {
    fn default() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

impl OrgLimits {
    /// Limits with the name copied in (truncated to NAME_MAX bytes).
    pub fn new(name: &[u8], daily_requests: u64, concurrent_connections: u32, flags: u32) -> Self {
        let mut l = OrgLimits {
            daily_requests,
            concurrent_connections,
            flags,
            ..Self::default()
        };
        let n = name.len().min(crate::reply::NAME_MAX);
        l.name[..n].copy_from_slice(&name[..n]);
        l.name_len = n as u32;
        l
    }
}

/// Slot is in use by a configured org.
pub const ORG_F_ACTIVE: u32 = 1;
/// `quota_mode = "dry-run"`: count what would be refused, refuse nothing.
pub const ORG_F_DRY_RUN: u32 = 2;
/// `concurrency_mode = "delay"`: the XDP gate drops SYNs while the org is at its limit.
pub const ORG_F_CONC_DELAY: u32 = 4;
/// `concurrency_mode = "reject"`: a connection over the limit gets a 429 on its first request.
pub const ORG_F_CONC_REJECT: u32 = 8;

/// One quota day's counters. Every field is updated with atomic adds by the kernel.
/// (Serializable on the user side: day snapshots store it as it is.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(default))]
pub struct DayCounters {
    /// The day number these counters belong to (see [`crate::day`]).
    pub day: u64,
    // The fields a passing request writes (and the tag it reads) share the first cache line:
    // when two CPUs count for one org, each request then moves one line between them, not two.
    pub requests: u64,
    pub rejected: u64,
    /// Requests of the org (counted, rejected or exempt) known by the peer address. The four
    /// `by_*` counters follow one another in the order of the `ID_*` numbers (the kernel indexes
    /// them).
    pub by_address: u64,
    /// ... by a trusted PROXY protocol header's source address.
    pub by_proxy_protocol: u64,
    /// ... by a trusted forwarded-address header.
    pub by_forwarded: u64,
    /// ... by an API key.
    pub by_api_key: u64,
    pub exempt_media_gets: u64,
    pub exempt_pushes: u64,
    pub unparsed: u64,
    pub peak_connections: u64,
    pub concurrency_breaches: u64,
    /// SYNs the XDP gate dropped (`concurrency_mode = "delay"`).
    pub delayed_syns: u64,
    /// Connections answered with the concurrency 429 (`concurrency_mode = "reject"`).
    pub concurrency_rejected: u64,
    /// Requests that carried an API key no org has (kept on the unmapped org).
    pub unknown_keys: u64,
    /// SYNs the XDP gate dropped to pace an org out of its daily quota (`pace_over_quota`).
    pub paced_syns: u64,
}

// A passing request's fields in the first 64 bytes (ORG_DAYS values are 128-byte aligned).
const _: () = assert!(
    core::mem::offset_of!(DayCounters, exempt_media_gets) < 64
        && core::mem::size_of::<DayCounters>() == 128
);

/// What [`DayCounters`]' fields are, in order: the org maps are reused from the pins by a build
/// of the same layout, so a build that moves a field bumps this, and its maps start apart (the
/// day's counts carry over through the day snapshot, by field name).
pub const DAY_FORMAT: u32 = 2;

impl DayCounters {
    pub const fn for_day(day: u64) -> Self {
        Self {
            day,
            requests: 0,
            rejected: 0,
            exempt_media_gets: 0,
            exempt_pushes: 0,
            unparsed: 0,
            peak_connections: 0,
            concurrency_breaches: 0,
            delayed_syns: 0,
            concurrency_rejected: 0,
            by_address: 0,
            by_proxy_protocol: 0,
            by_forwarded: 0,
            by_api_key: 0,
            unknown_keys: 0,
            paced_syns: 0,
        }
    }

    /// Nothing was counted (whatever the day tag).
    pub const fn is_idle(&self) -> bool {
        self.requests
            | self.rejected
            | self.exempt_media_gets
            | self.exempt_pushes
            | self.unparsed
            | self.peak_connections
            | self.concurrency_breaches
            | self.delayed_syns
            | self.concurrency_rejected
            | self.by_address
            | self.by_proxy_protocol
            | self.by_forwarded
            | self.by_api_key
            | self.unknown_keys
            | self.paced_syns
            == 0
    }
}

/// Day slots per org in ORG_DAYS: today, yesterday and tomorrow.
pub const DAY_SLOTS: u32 = 3;

/// Index of an org's counters for `day` in ORG_DAYS.
///
/// Each org has three day slots (`day % 3`): the kernel writes today's, yesterday's stays readable
/// for its totals and reports, and the daemon prepares tomorrow's in advance, so a rollover needs
/// no userspace write racing kernel increments. Open connections (not day-scoped) live apart in
/// ORG_CONNS, which only the kernel writes.
pub const fn day_index(org: u32, day: u64) -> u32 {
    org * DAY_SLOTS + day_slot(day)
}

/// `day % DAY_SLOTS`, by a multiply where the day fits in 32 bits: BPF has no multiply-high,
/// so a `%` by a constant stays a division (tens of cycles, on every counted request).
#[inline(always)]
pub const fn day_slot(day: u64) -> u32 {
    if DAY_SLOTS == 3 && day < 1 << 32 {
        // ⌊day / 3⌋ = ⌊day · ⌈2^33 / 3⌉ / 2^33⌋ for every day below 2^32.
        let q = (day * 0xAAAA_AAAB) >> 33;
        (day - q * 3) as u32
    } else {
        (day % DAY_SLOTS as u64) as u32
    }
}

/// Requests an org made on the other hosts of a cluster on `day` (ORG_REMOTE, indexed like
/// ORG_DAYS). Written only by the daemon from the shared counters; the kernel refuses when its own
/// count plus this reaches the limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemoteCount {
    pub day: u64,
    pub requests: u64,
}

/// Per-socket state in SOCK_SLOTS (or SOCK_STATE), keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockState {
    pub org: u32,
    /// `SOCK_F_*` bits that never change after insertion.
    pub kind: u32,
    /// 1 while the connection counts as open; swapped to 0 exactly once on close.
    pub open: u32,
    /// `KernelConfig::addr_gen` when `org` was looked up.
    pub addr_gen: u32,
    /// `KernelConfig::org_epoch` when `org` was looked up (and the connection counted in ORG_CONNS).
    pub org_epoch: u32,
    pub _pad: u32,
    /// The connection's requests in flight ([`inflight_word`]), for sockets with
    /// [`SOCK_F_INFLIGHT`].
    pub inflight: u64,
    /// Where the inbound byte stream stands (see [`crate::stream`]).
    pub stream: crate::stream::Stream,
}

impl SockState {
    /// A new inbound connection's state, before its org and generations are filled in (the
    /// kernel copies it from this constant a word at a time: built as a struct on the stack,
    /// it cost byte-at-a-time `memset` calls for the zero runs between its fields).
    pub const FRESH: SockState = SockState {
        org: UNMAPPED_ORG,
        kind: SOCK_F_INBOUND,
        open: 1,
        addr_gen: 0,
        org_epoch: 0,
        _pad: 0,
        inflight: 0,
        stream: crate::stream::Stream::new(),
    };
}

// The kernel copies `SockState::FRESH`, and a socket's stream to and from its walk slot, a word
// at a time.
const _: () = assert!(
    core::mem::size_of::<SockState>().is_multiple_of(8) && core::mem::align_of::<SockState>() == 8
);
const _: () = assert!(
    core::mem::size_of::<crate::stream::Stream>().is_multiple_of(8)
        && core::mem::align_of::<crate::stream::Stream>() == 8
        && core::mem::offset_of!(SockState, stream).is_multiple_of(8)
);

/// One entry of SOCK_SLOTS: the state of the socket whose cookie is `cookie` (0: free).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockSlot {
    pub cookie: u64,
    pub state: SockState,
}

pub const SOCK_F_INBOUND: u32 = 1;
/// Arrived while its org was at its concurrency limit in reject mode: its requests are refused.
pub const SOCK_F_OVER_LIMIT: u32 = 4;
/// Has its cookie in INFLIGHT (the egress program's way to this state; sock_ops leaves it
/// after the egress program is attached, so the socket entered API_SOCKS with it): its requests
/// attributed one by one are counted in flight in [`SockState::inflight`]. (Bit 8, once "entered
/// with the egress program", is no longer used: every socket with this bit did.)
pub const SOCK_F_INFLIGHT: u32 = 16;

/// A connection's requests in flight that were attributed one by one (API key, forwarded
/// address), in one word so that the verdict and the egress program, which may run at once on
/// two CPUs, swap it whole: the org in the high half, the count in the low. They count in the
/// org's ORG_CONNS from the end of their head until the application answers (its first bytes
/// out) or the connection closes.
#[inline(always)]
pub const fn inflight_word(org: u32, n: u32) -> u64 {
    ((org as u64) << 32) | n as u64
}

/// The org and the count of an [`inflight_word`].
#[inline(always)]
pub const fn inflight_parts(w: u64) -> (u32, u32) {
    ((w >> 32) as u32, w as u32)
}

/// Key of ORG_BY_ADDR (an LPM trie): IPv6 address, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).
pub type AddrKey = [u8; 16];

/// Records in the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    pub kind: u32,
    pub org: u32,
    pub value: u64,
    pub day: u64,
}

/// A connection (or a request in flight) arrived while its org was at its concurrency limit, and
/// it was the org's first breach of the day or one whose number is a power of two; `value` =
/// the org's breaches of the day before it. The daemon follows `concurrency_breaches` from there.
pub const EVENT_CONCURRENCY_BREACH: u32 = 1;
/// The org's first refusal of the day (`value` = its daily limit; also in dry-run).
pub const EVENT_QUOTA_EXHAUSTED: u32 = 2;

/// TRACE_ON slot: the pid of the `limiter trace` process reading TRACE (0: nobody traces, and
/// the verdict writes no records).
pub const TRACE_PID: u32 = 0;
/// TRACE_ON slot: records the verdict could not write because TRACE was full.
pub const TRACE_LOST: u32 = 1;
pub const TRACE_ON_ENTRIES: u32 = 2;
/// Bytes of a chunk's start a trace record carries: a request line's method and the first 64
/// bytes of its path fit.
pub const TRACE_HEAD: usize = 128;

/// One verdict in the TRACE ring buffer (written only while someone traces): a chunk of an
/// inbound stream, what was in it and what the verdict did with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceRecord {
    /// `CLOCK_TAI` nanoseconds.
    pub time_ns: u64,
    pub cookie: u64,
    pub org: u32,
    /// The chunk's length.
    pub len: u32,
    /// Requests in the chunk that use quota, exempt media GETs, and request lines started.
    pub counted: u32,
    pub media: u32,
    pub starts: u32,
    /// Bytes of `head` that hold the chunk's start: 0 when the chunk does not begin at a request
    /// boundary (it continues a request of an earlier chunk).
    pub head_len: u32,
    /// `TRACE_O_*`.
    pub outcome: u8,
    /// `TRACE_R_*`.
    pub reason: u8,
    /// `TRACE_VIA_*`: how the org was identified.
    pub via: u8,
    pub _pad: [u8; 5],
    pub head: [u8; TRACE_HEAD],
}

/// The chunk's requests were counted against the quota and passed.
pub const TRACE_O_COUNTED: u8 = 1;
/// Only exempt media GETs: passed, counted as exempt.
pub const TRACE_O_EXEMPT: u8 = 2;
/// Refused (a 429, a 400, or dropped after an earlier `Connection: close` refusal).
pub const TRACE_O_REFUSED: u8 = 3;
/// Not followed as HTTP: passed, counted as unparsed (or, for a fault, not counted).
pub const TRACE_O_UNPARSED: u8 = 4;
/// No request started or ended in the chunk (a body, a header continued): passed.
pub const TRACE_O_PASSED: u8 = 5;

pub const TRACE_R_NONE: u8 = 0;
pub const TRACE_R_DAILY: u8 = 1;
pub const TRACE_R_CONCURRENCY: u8 = 2;
/// The framing broke (a 400, the connection closed).
pub const TRACE_R_BAD_REQUEST: u8 = 3;
/// After a 429 with `Connection: close`: what the client still sent is dropped.
pub const TRACE_R_CLOSED: u8 = 4;
/// The connection's first bytes are not an HTTP/1.x request.
pub const TRACE_R_NOT_HTTP: u8 = 5;
/// The chunk could not be followed (a limiter fault): it passed uncounted.
pub const TRACE_R_FAULT: u8 = 6;

/// The org was found by the peer's address (ORG_BY_HOST, ORG_BY_ADDR).
pub const TRACE_VIA_ADDRESS: u8 = 1;

/// Indexes of the FAULTS array (u64 counters). A fault never blocks traffic.
pub const FAULT_SOCK_STATE_FULL: u32 = 0;
pub const FAULT_SOCKHASH_FULL: u32 = 1;
pub const FAULT_EVENTS_FULL: u32 = 2;
pub const FAULT_NO_SOCK_STATE: u32 = 3;
pub const FAULT_BAD_ORG: u32 = 4;
/// A 429 could not be written (skb too long to pad, or a helper failed); the request passed.
pub const FAULT_REPLY: u32 = 5;
/// A chunk's bytes could not be loaded for the stream parser; the chunk passed.
pub const FAULT_PARSE: u32 = 6;
/// A connection of no org arrived while the state tables were 3/4 full: it is not tracked (its
/// requests are not counted), so that orgs' connections keep room.
pub const FAULT_UNMAPPED_UNTRACKED: u32 = 7;
pub const FAULT_COUNT: u32 = 8;

pub const FAULT_NAMES: [&str; 8] = [
    "sock_state_full",
    "sockhash_full",
    "events_full",
    "no_sock_state",
    "bad_org",
    "reply_failed",
    "parse_failed",
    "unmapped_untracked",
];

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for KernelConfig {}
    unsafe impl aya::Pod for OrgLimits {}
    unsafe impl aya::Pod for DayCounters {}
    unsafe impl aya::Pod for RemoteCount {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for SockSlot {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for TraceRecord {}
}

/// IPv4 address as the IPv4-mapped IPv6 key ORG_BY_ADDR uses.
pub const fn v4_mapped(octets: [u8; 4]) -> AddrKey {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

// The kernel finds a source's `by_*` counter by its `ID_*` number.
const _: () = {
    use core::mem::offset_of;
    let base = offset_of!(DayCounters, by_address);
    assert!(offset_of!(DayCounters, by_proxy_protocol) == base + 8);
    assert!(offset_of!(DayCounters, by_forwarded) == base + 16);
    assert!(offset_of!(DayCounters, by_api_key) == base + 24);
    assert!(ID_PROXY_PROTOCOL == ID_ADDRESS + 1);
    assert!(ID_FORWARDED == ID_ADDRESS + 2);
    assert!(ID_API_KEY == ID_ADDRESS + 3);
};
