//! The map layout: every map the kernel programs use, declared once in [`map_layout!`].
//!
//! The list expands here into a [`MapSpec`] type per map (its key and value types and its
//! [`MapDef`]) and into [`MAPS`], from which the daemon sizes, pins and checks the maps;
//! limiter-ebpf expands the same list into its `#[map]` statics. A map's name, types and capacity
//! are written nowhere else.

use crate::{
    API_SOCKS_FACTOR, AddrKey, DAY_SLOTS, DayCounters, EVENTS_BYTES, FAULT_COUNT, KernelConfig,
    MAX_API_PORTS, MAX_CIDRS, MAX_ORGS, MAX_SOCKETS, MAX_TRUSTED_PROXIES, MIN_API_KEYS, OrgLimits,
    RemoteCount, SockSlot, SockState, TRACE_BYTES, TRACE_ON_ENTRIES,
    day::DayCache,
    reply::Scratch,
    stream::{MEDIA_MATCH_ENTRIES, Stream, WALK_SLOTS, WalkSlot},
};

/// Every map of the kernel programs, in the form `NAME: Kind<Key, Value> = entries, pin;`.
///
/// `$then` is a macro that receives the list; both sides match each entry as
/// `$(#[$doc:meta])* $name:ident: $kind:ident<$key:ty, $value:ty> = $entries:expr, $pin:ident;`.
/// Kinds are [`MapKind`]'s variants, entries [`Entries`]' and pins [`Pin`]'s (written unqualified:
/// they, like the key and value types, resolve where the list is expanded here, so the other
/// side takes them from the [`MapSpec`] of each name). Kinds without a key or value (program
/// arrays, socket hashes, the ring buffer) give the kernel's: a `u32` descriptor, `()` for none.
#[macro_export]
macro_rules! map_layout {
    ($then:ident) => {
        $then! {
            /// The single config entry: written by the daemon, read by every program.
            CONFIG: Array<u32, KernelConfig> = Fixed(1), Layout;
            /// The API's local ports: connections to them are attributed, counted and limited.
            API_PORTS: HashMap<u16, u8> = Fixed(MAX_API_PORTS), Layout;
            /// Networks of the orgs (the longest prefix wins).
            ORG_BY_ADDR: LpmTrie<AddrKey, u32> = Cidrs, Layout;
            /// Single addresses (/32, /128): a hash is far cheaper to fill and to search than the
            /// trie. The config forbids overlapping CIDRs, so an exact hit is always the longest
            /// match.
            ORG_BY_HOST: HashMap<AddrKey, u32> = Cidrs, Layout;
            /// An API key's SipHash digest (keyed by `KernelConfig::key_secret`) -> its org.
            API_KEYS: HashMap<u64, u32> = Keys, Layout;
            /// `api.trusted_proxies`: peers whose PROXY and forwarded headers are believed.
            TRUSTED_PROXIES: LpmTrie<AddrKey, u8> = Fixed(MAX_TRUSTED_PROXIES), Layout;
            /// Each org's limits, by org id.
            ORG_LIMITS: Array<u32, OrgLimits> = PerOrg(1), Layout;
            /// Each org's open connections (written by the kernel alone).
            ORG_CONNS: Array<u32, i64> = PerOrg(1), Layout;
            /// Each org's counters, in three day slots (see `day_index`).
            ORG_DAYS: Array<u32, DayCounters> = PerOrg(DAY_SLOTS), Layout;
            /// When each paced org's next new connection is due (`bpf_ktime_get_ns`, a GCRA
            /// token bucket in one word): written by the XDP gate alone.
            ORG_PACE: Array<u32, u64> = PerOrg(1), Layout;
            /// What the other hosts of a cluster counted, indexed like ORG_DAYS.
            ORG_REMOTE: Array<u32, RemoteCount> = PerOrg(DAY_SLOTS), Layout;
            /// Events for the daemon's log (a ring buffer of this many bytes).
            EVENTS: RingBuf<(), ()> = Fixed(EVENTS_BYTES), Layout;
            /// Whether someone traces (`TRACE_PID`: the tracer's pid, 0 for nobody), and the
            /// records lost to a full TRACE (`TRACE_LOST`). The verdict reads the pid once per
            /// chunk; the tracer sets and clears it, the daemon clears a dead tracer's.
            TRACE_ON: Array<u32, u64> = Fixed(TRACE_ON_ENTRIES), Layout;
            /// `limiter trace`'s records (`TraceRecord`), apart from EVENTS so that tracing
            /// never crowds out the daemon's events.
            TRACE: RingBuf<(), ()> = Fixed(TRACE_BYTES), Layout;
            /// Fault counters, indexed by `FAULT_*`.
            FAULTS: Array<u32, u64> = Fixed(FAULT_COUNT), Layout;
            /// Where a 429 is assembled before it is stored into the skb.
            SCRATCH: PerCpuArray<u32, Scratch> = Fixed(1), Layout;
            /// The media prefixes as a table: which prefixes stay possible for a path byte at a
            /// position (see `stream::StreamRules`), written by the daemon with CONFIG.
            MEDIA_MATCH: Array<u32, u8> = Fixed(MEDIA_MATCH_ENTRIES), Layout;
            /// Each CPU's last reading of the quota day (see `day::DayCache`).
            TODAY: PerCpuArray<u32, DayCache> = Fixed(1), Layout;
            /// Where the verdict walks a chunk (see `WalkSlot`).
            WALK: PerCpuArray<u32, WalkSlot> = Fixed(WALK_SLOTS), Layout;
            /// The stream a walk slot follows when the socket's state is not in its slot: copied
            /// in from SOCK_STATE and back, or new each chunk for a socket without a state. The
            /// walk then reads two maps, not three (the verifier walks the parser once per map).
            WALK_STREAM: PerCpuArray<u32, Stream> = Fixed(WALK_SLOTS), Layout;
            /// Slot 0: `limiter_refuse`, tail-called to write a 429.
            REFUSE: ProgramArray<u32, u32> = Fixed(1), Layout;
            /// Sockets whose slot in SOCK_SLOTS is another's keep their state here.
            SOCK_STATE: LazyHashMap<u64, SockState> = PerSocket(1), Sockets;
            /// Sockets' state, found by the low bits of the socket cookie: an array lookup the
            /// verifier inlines, where a hash lookup cost a call and a hash on every request.
            /// Cookies are handed out in sequence, so live sockets rarely share bits; one whose
            /// slot is taken keeps its state in SOCK_STATE instead.
            SOCK_SLOTS: Array<u32, SockSlot> = Fixed(MAX_SOCKETS), Sockets;
            /// Inbound sockets holding state now, against the socket capacity.
            SOCK_COUNT: Array<u32, i64> = Fixed(1), Sockets;
            /// Inbound API sockets, under the verdict. Twice the state capacity: an org's socket
            /// that gets no state still gets the verdict.
            API_SOCKS: SockHash<u64, u32> = PerSocket(API_SOCKS_FACTOR), Sockets;
            /// Outbound sockets to an org's address, under the push counter.
            PUSH_SOCKS: SockHash<u64, u32> = Fixed(MAX_SOCKETS), Sockets;
            /// The generation whose programs are current (0: none yet).
            SOCK_GEN: Array<u32, u64> = Fixed(1), Sockets;
            /// The current verdict, for sockets that entered API_SOCKS under an earlier
            /// generation.
            VERDICT_NEXT: ProgramArray<u32, u32> = Fixed(1), Sockets;
            /// The current push counter, for sockets that entered PUSH_SOCKS under an earlier
            /// generation.
            PUSH_NEXT: ProgramArray<u32, u32> = Fixed(1), Sockets;
            /// Socket storage: an API socket's cookie, for the egress program, which may not ask
            /// for it, to find the socket's state (and its requests in flight) in SOCK_SLOTS.
            /// Made by sock_ops for the sockets whose requests may be attributed one by one.
            INFLIGHT: SkStorage<i32, u64> = Fixed(0), Sockets;
            /// The current egress program of API sockets, for sockets that entered API_SOCKS
            /// under an earlier generation.
            API_MSG_NEXT: ProgramArray<u32, u32> = Fixed(1), Sockets;
        }
    };
}

/// The BPF map types the layout uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    HashMap,
    /// A hash map whose entries are allocated as they are inserted (`BPF_F_NO_PREALLOC`), for
    /// tables sized for the worst case but mostly empty: a preallocated one takes its whole
    /// size in kernel memory from the start.
    LazyHashMap,
    LpmTrie,
    PerCpuArray,
    ProgramArray,
    RingBuf,
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): a value per socket, freed with it; no
    /// entries of its own (max_entries 0), and a BTF map definition.
    SkStorage,
    SockHash,
}

impl MapKind {
    /// The key size the kernel sees for a declared key of `size` bytes: an LPM trie's key starts
    /// with the prefix length.
    pub const fn key_size(self, size: usize) -> u32 {
        match self {
            MapKind::LpmTrie => 4 + size as u32,
            _ => size as u32,
        }
    }
}

/// How many entries a map has: fixed, or following what the daemon sizes at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    Fixed(u32),
    /// This many per org slot (slot 0, the unmapped org, included).
    PerOrg(u32),
    /// One per address-table entry.
    Cidrs,
    /// One per API key slot.
    Keys,
    /// This many per inbound socket with state.
    PerSocket(u32),
}

/// What the capacities follow: org slots, address-table entries and inbound sockets with state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub orgs: u32,
    pub cidrs: u32,
    pub keys: u32,
    pub sockets: u32,
}

impl Sizes {
    /// The sizes compiled into the object; the daemon sets each map's at load.
    pub const BUILT_IN: Sizes = Sizes {
        orgs: MAX_ORGS,
        cidrs: MAX_CIDRS,
        keys: MIN_API_KEYS,
        sockets: MAX_SOCKETS,
    };
}

impl Entries {
    pub const fn resolve(self, sizes: Sizes) -> u32 {
        match self {
            Entries::Fixed(n) => n,
            Entries::PerOrg(n) => sizes.orgs * n,
            Entries::Cidrs => sizes.cidrs,
            Entries::Keys => sizes.keys,
            Entries::PerSocket(n) => sizes.sockets * n,
        }
    }
}

/// Which pin directory holds a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// The layout's own: the org-side maps, whose sizes follow the config, and what the programs
    /// of one layout own.
    Layout,
    /// The shared socket tables': the same for every layout, so live connections stay tracked
    /// across a restart that resizes the org maps.
    Sockets,
}

/// One map as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// The kernel object name (at most 15 bytes) and the pin file's name.
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: Entries,
    pub pin: Pin,
}

impl MapDef {
    pub const fn max_entries(&self, sizes: Sizes) -> u32 {
        self.entries.resolve(sizes)
    }
}

/// A map of the layout, as a type: its key and value types and its [`MapDef`].
pub trait MapSpec {
    type Key;
    type Value;
    const DEF: MapDef;
    /// The daemon's typed handle (`aya::maps::*` over `MapData`); the per-CPU working space,
    /// which the daemon never reads, stays an untyped `aya::maps::Map`.
    #[cfg(feature = "user")]
    type Handle;
}

/// The daemon's handle of map `M`.
#[cfg(feature = "user")]
pub type Handle<M> = <M as MapSpec>::Handle;

/// The number of entries the object declares for map `M`.
pub const fn built_in_entries<M: MapSpec>() -> u32 {
    M::DEF.entries.resolve(Sizes::BUILT_IN)
}

#[cfg(feature = "user")]
macro_rules! user_handle {
    (Array, $k:ty, $v:ty) => { aya::maps::Array<aya::maps::MapData, $v> };
    (HashMap, $k:ty, $v:ty) => { aya::maps::HashMap<aya::maps::MapData, $k, $v> };
    (LazyHashMap, $k:ty, $v:ty) => { aya::maps::HashMap<aya::maps::MapData, $k, $v> };
    (LpmTrie, $k:ty, $v:ty) => { aya::maps::LpmTrie<aya::maps::MapData, $k, $v> };
    (PerCpuArray, $k:ty, $v:ty) => { aya::maps::Map };
    (ProgramArray, $k:ty, $v:ty) => { aya::maps::ProgramArray<aya::maps::MapData> };
    (RingBuf, $k:ty, $v:ty) => { aya::maps::RingBuf<aya::maps::MapData> };
    (SkStorage, $k:ty, $v:ty) => { aya::maps::SkStorage<aya::maps::MapData, $v> };
    (SockHash, $k:ty, $v:ty) => { aya::maps::SockHash<aya::maps::MapData, $k> };
}

macro_rules! declare {
    ($(
        $(#[$doc:meta])*
        $name:ident: $kind:ident<$k:ty, $v:ty> = $entries:expr, $pin:ident;
    )*) => {
        $(
            $(#[$doc])*
            #[allow(non_camel_case_types)]
            pub enum $name {}

            impl MapSpec for $name {
                type Key = $k;
                type Value = $v;
                const DEF: MapDef = MapDef {
                    name: stringify!($name),
                    kind: MapKind::$kind,
                    key_size: MapKind::$kind.key_size(size_of::<$k>()),
                    value_size: size_of::<$v>() as u32,
                    entries: {
                        #[allow(unused_imports)]
                        use Entries::*;
                        $entries
                    },
                    pin: Pin::$pin,
                };
                #[cfg(feature = "user")]
                type Handle = user_handle!($kind, $k, $v);
            }
        )*

        /// Every map, in the order of [`map_layout!`].
        pub const MAPS: &[MapDef] = &[$(<$name as MapSpec>::DEF),*];
    };
}

map_layout!(declare);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_are_unique() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(!m.name.is_empty() && m.name.len() <= 15, "{}", m.name);
            assert!(
                MAPS[..i].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
    }

    #[test]
    fn entries_follow_the_sizes() {
        let sizes = Sizes {
            orgs: 8,
            cidrs: 16,
            keys: 32,
            sockets: 4,
        };
        assert_eq!(ORG_DAYS::DEF.max_entries(sizes), 8 * DAY_SLOTS);
        assert_eq!(ORG_BY_ADDR::DEF.max_entries(sizes), 16);
        assert_eq!(API_SOCKS::DEF.max_entries(sizes), 4 * API_SOCKS_FACTOR);
        assert_eq!(SOCK_SLOTS::DEF.max_entries(sizes), MAX_SOCKETS);
        assert_eq!(ORG_BY_ADDR::DEF.key_size, 4 + size_of::<AddrKey>() as u32);
    }

    #[test]
    fn the_socket_tables_follow_no_org_or_address_count() {
        let a = Sizes::BUILT_IN;
        let b = Sizes {
            orgs: a.orgs * 2,
            cidrs: a.cidrs * 2,
            keys: a.keys * 2,
            ..a
        };
        for m in MAPS.iter().filter(|m| m.pin == Pin::Sockets) {
            assert_eq!(m.max_entries(a), m.max_entries(b), "{}", m.name);
        }
    }
}
