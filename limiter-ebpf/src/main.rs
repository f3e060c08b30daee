//! limiter's kernel programs.
//!
//! - `limiter_sock_ops` (cgroup sock_ops): attributes inbound API connections to an org, counts them,
//!   and puts them into API_SOCKS; marks outbound connections to an org's address as push sockets.
//! - `limiter_verdict` (stream verdict on API_SOCKS): classifies and counts each inbound request
//!   before the application reads it.
//! - `limiter_push_msg` (sk_msg on PUSH_SOCKS): counts requests the host pushes out to an org.
//!
//! The socket tables (SOCK_SLOTS, SOCK_STATE, API_SOCKS, PUSH_SOCKS and what goes with them) are
//! shared by every map layout, so connections live across a restart that resizes the org maps
//! stay tracked: a socket keeps the programs it entered its socket map with, and those of an
//! earlier daemon start hand every chunk to the current ones (`forward`).
//!
//! Every entry point is a thin wrapper that always lets traffic through: a limiter fault is counted
//! in FAULTS, never turned into a blocked connection.
#![no_std]
#![no_main]
// The bpfel target has no atomic CAS in its spec, so `core::sync::atomic` hides fetch_add; the
// intrinsics compile to BPF atomics (with `-C target-cpu=v3`, see xtask).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd, atomic_xchg},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        sk_action::{SK_DROP, SK_PASS},
        xdp_action,
    },
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_tai_ns, bpf_loop, bpf_msg_pull_data,
        bpf_sk_redirect_hash, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::{map, sk_msg, sock_ops, stream_verdict, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext, XdpContext},
};
use limiter_common::{
    API_SOCKS_FACTOR, AddrKey, CONFIG_F_READY, Config, DAY_SLOTS, DayCounters,
    EVENT_CONCURRENCY_BREACH, EVENT_QUOTA_EXHAUSTED, EVENTS_BYTES, Event, FAULT_BAD_ORG,
    FAULT_COUNT, FAULT_EVENTS_FULL, FAULT_NO_SOCK_STATE, FAULT_PARSE, FAULT_REPLY,
    FAULT_SOCK_STATE_FULL, FAULT_SOCKHASH_FULL, FAULT_UNMAPPED_UNTRACKED, MAX_API_PORTS, MAX_CIDRS,
    MAX_ORGS, MAX_SOCKETS, ORG_F_ACTIVE, ORG_F_CONC_DELAY, ORG_F_CONC_REJECT, ORG_F_DRY_RUN,
    OrgLimits, RemoteCount, SOCK_F_INBOUND, SOCK_F_OVER_LIMIT, SockSlot, SockState, UNMAPPED_ORG,
    day, day_index, http,
    reply::{NAME_MAX, Policy, Reply, Scratch, Sink},
    stream::{
        F_REFUSED, MEDIA_MATCH_ENTRIES, MediaPrefixes, S_CLOSED, S_OPAQUE, Stream, Tally,
        WALK_SLOTS, WIN, WalkSlot, media_match_index,
    },
    v4_mapped,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static API_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_API_PORTS, 0);
#[map]
static ORG_BY_ADDR: LpmTrie<AddrKey, u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
/// Single addresses (/32, /128): a hash is far cheaper to fill and to search than the trie. The
/// config forbids overlapping CIDRs, so an exact hit is always the longest match.
#[map]
static ORG_BY_HOST: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_CIDRS, 0);
#[map]
static ORG_LIMITS: Array<OrgLimits> = Array::with_max_entries(MAX_ORGS, 0);
#[map]
static ORG_CONNS: Array<i64> = Array::with_max_entries(MAX_ORGS, 0);
#[map]
static ORG_DAYS: Array<DayCounters> = Array::with_max_entries(MAX_ORGS * DAY_SLOTS, 0);
#[map]
static ORG_REMOTE: Array<RemoteCount> = Array::with_max_entries(MAX_ORGS * DAY_SLOTS, 0);
/// Sockets' state, found by the low bits of the socket cookie: an array lookup the verifier
/// inlines, where a hash lookup cost a call and a hash on every request. Cookies are handed out in
/// sequence, so live sockets rarely share bits; one whose slot is taken keeps its state in
/// SOCK_STATE instead.
#[map]
static SOCK_SLOTS: Array<SockSlot> = Array::with_max_entries(MAX_SOCKETS, 0);
#[map]
static SOCK_STATE: HashMap<u64, SockState> = HashMap::with_max_entries(MAX_SOCKETS, 0);
/// Which cookie bits pick a slot (set at load; the tests narrow it so sockets share slots).
#[unsafe(no_mangle)]
static SOCK_SLOT_MASK: u32 = MAX_SOCKETS - 1;
/// Inbound sockets with state (the daemon lowers it only for tests).
#[unsafe(no_mangle)]
static SOCK_CAPACITY: u32 = MAX_SOCKETS;
/// Inbound sockets holding state now, against SOCK_CAPACITY.
#[map]
static SOCK_COUNT: Array<i64> = Array::with_max_entries(1, 0);
/// Twice the state capacity: an org's socket that gets no state still gets the verdict.
#[map]
static API_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS * API_SOCKS_FACTOR, 0);
#[map]
static PUSH_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);
/// This daemon start's programs (set at load, unique per start).
#[unsafe(no_mangle)]
static GENERATION: u64 = 0;
/// The generation whose programs are current (0: none yet).
#[map]
static SOCK_GEN: Array<u64> = Array::with_max_entries(1, 0);
/// The current verdict and push counter, for sockets that entered their map under an earlier
/// generation.
#[map]
static VERDICT_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static PUSH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
static FAULTS: Array<u64> = Array::with_max_entries(FAULT_COUNT, 0);
/// Where a 429 is assembled before it is stored into the skb.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// The media prefixes as a table: which prefixes stay possible for a path byte at a position
/// (see `stream::MediaPrefixes`), written by the daemon with CONFIG.
#[map]
static MEDIA_MATCH: Array<u8> = Array::with_max_entries(MEDIA_MATCH_ENTRIES, 0);
/// Where the verdict walks a chunk (see `WalkSlot`).
#[map]
static WALK: PerCpuArray<WalkSlot> = PerCpuArray::with_max_entries(WALK_SLOTS, 0);
/// Slot 0: `limiter_refuse`, tail-called to write a 429.
#[map]
static REFUSE: ProgramArray = ProgramArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn limiter_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

#[stream_verdict]
pub fn limiter_verdict(ctx: SkBuffContext) -> u32 {
    forward(&ctx, &VERDICT_NEXT);
    try_verdict(&ctx)
}

#[sk_msg]
pub fn limiter_push_msg(ctx: SkMsgContext) -> u32 {
    forward(&ctx, &PUSH_NEXT);
    try_push_msg(&ctx);
    SK_PASS
}

/// A socket keeps the programs of the map it entered for life; when those are an earlier daemon
/// start's, this hands the chunk to the current program (a tail call that does not return),
/// whose maps the daemon reads. An empty slot or a failed call runs this program as before.
#[inline(always)]
fn forward<C: EbpfContext>(ctx: &C, next: &ProgramArray) {
    // SAFETY: a read of a load-time constant.
    let mine = unsafe { core::ptr::read_volatile(&GENERATION) };
    if let Some(now) = SOCK_GEN.get(0)
        && *now != 0
        && *now != mine
    {
        // SAFETY: slot 0 holds a program of this one's type (the daemon puts it there).
        let _ = unsafe { next.tail_call(ctx, 0) };
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn config() -> Option<&'static Config> {
    let c = CONFIG.get(0)?;
    (c.flags & CONFIG_F_READY != 0).then_some(c)
}

/// Today's day number per the kernel clock and the daemon's offset.
#[inline(always)]
fn today(c: &Config) -> u64 {
    // SAFETY: a helper without arguments.
    let tai = unsafe { bpf_ktime_get_tai_ns() };
    day::day_number(day::limiter_time(tai, c.clock_offset_ns), c.day_len_ns)
}

#[inline(always)]
fn fault(kind: u32) {
    if let Some(p) = FAULTS.get_ptr_mut(kind) {
        add(p, 1);
    }
}

#[inline(always)]
fn emit(kind: u32, org: u32, value: u64, day: u64) {
    let ev = Event {
        kind,
        org,
        value,
        day,
    };
    if EVENTS.output::<Event>(&ev, 0).is_err() {
        fault(FAULT_EVENTS_FULL);
    }
}

/// Atomic fetch-add on a map value field (every caller passes a pointer into a map value, which is
/// valid and 8-byte aligned for the program's lifetime).
#[inline(always)]
fn add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: see above.
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, v) }
}

#[inline(always)]
fn add_i64(p: *mut i64, v: i64) -> i64 {
    // SAFETY: as in `add`.
    unsafe { atomic_xadd::<i64, i64, { SeqCst }>(p, v) }
}

/// Compare-and-swap; true when `*p` was `old` and is now `new`.
#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: as in `add`.
    let (now, ok) = unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new) };
    if ok { Ok(()) } else { Err(now) }
}

#[inline(always)]
fn load(p: *mut u64) -> u64 {
    // SAFETY: as in `add`. A volatile read: BPF has no seq_cst load, and an aligned 8-byte load
    // is single-copy atomic.
    unsafe { core::ptr::read_volatile(p) }
}

/// Raises `*p` to at least `v` (a bounded CAS loop: the verifier wants bounded loops).
#[inline(always)]
fn raise_to(p: *mut u64, v: u64) {
    let mut cur = load(p);
    let mut i = 0;
    while i < 8 && cur < v {
        match cas(p, cur, v) {
            Ok(()) => return,
            Err(now) => cur = now,
        }
        i += 1;
    }
}

/// The slot a socket's state goes to first.
#[inline(always)]
fn sock_slot(cookie: u64) -> Option<*mut SockSlot> {
    // SAFETY: a read of a load-time constant.
    let mask = unsafe { core::ptr::read_volatile(&SOCK_SLOT_MASK) };
    SOCK_SLOTS.get_ptr_mut(cookie as u32 & mask)
}

/// The state of the socket with `cookie`: in its slot, or in SOCK_STATE when the slot is another's.
#[inline(always)]
fn sock_state(cookie: u64) -> Option<*mut SockState> {
    if let Some(slot) = sock_slot(cookie)
        // SAFETY: valid map value.
        && load(unsafe { &raw mut (*slot).cookie }) == cookie
    {
        // SAFETY: as above.
        return Some(unsafe { &raw mut (*slot).state });
    }
    SOCK_STATE.get_ptr_mut(&cookie)
}

/// Takes one of the SOCK_CAPACITY places for a new inbound socket's state. A socket of no org
/// (never limited) gets one only below 3/4 of the capacity, so that orgs' sockets always find
/// room however many idle connections others hold.
#[inline(always)]
fn reserve_sock_state(org: u32) -> bool {
    let Some(count) = SOCK_COUNT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a read of a load-time constant.
    let cap = i64::from(unsafe { core::ptr::read_volatile(&SOCK_CAPACITY) });
    let room = if org == UNMAPPED_ORG {
        cap - cap / 4
    } else {
        cap
    };
    if add_i64(count, 1) < room {
        return true;
    }
    add_i64(count, -1);
    false
}

/// Gives back a place taken by `reserve_sock_state`.
#[inline(always)]
fn release_sock_state() {
    if let Some(count) = SOCK_COUNT.get_ptr_mut(0) {
        add_i64(count, -1);
    }
}

/// Stores a new socket's state and returns where it went: its slot when free, else SOCK_STATE.
/// None when neither has room.
#[inline(always)]
fn add_sock_state(cookie: u64, state: &SockState) -> Option<*mut SockState> {
    if let Some(slot) = sock_slot(cookie)
        // SAFETY: valid map value; the claim is atomic.
        && cas(unsafe { &raw mut (*slot).cookie }, 0, cookie).is_ok()
    {
        // SAFETY: the slot is ours; no verdict reads it before this socket is in API_SOCKS.
        unsafe { (*slot).state = *state };
        // SAFETY: as above.
        return Some(unsafe { &raw mut (*slot).state });
    }
    SOCK_STATE.insert(&cookie, state, BPF_NOEXIST as u64).ok()?;
    SOCK_STATE.get_ptr_mut(&cookie)
}

/// Frees a closed socket's state, wherever it is, and its place in SOCK_COUNT.
#[inline(always)]
fn remove_sock_state(cookie: u64) {
    if let Some(slot) = sock_slot(cookie)
        // SAFETY: valid map value; only the owner frees its slot.
        && cas(unsafe { &raw mut (*slot).cookie }, cookie, 0).is_ok()
    {
        release_sock_state();
        return;
    }
    if SOCK_STATE.remove(&cookie).is_ok() {
        release_sock_state();
    }
}

/// The org's counters for `day`, reset lazily when the slot still holds another day.
///
/// The daemon normally prepares tomorrow's slot in advance, so the reset here only runs when the
/// daemon was away at rollover or the clock was stepped. The slot of the current day is always
/// claimed, whether it holds an older day or a later one (the clock was stepped back): a slot that
/// held on to a later day would leave the day uncountable. (A CPU that read the clock just before
/// a step of a multiple of three days may take the slot back for the old day once: the cost is
/// the requests in flight at the step's instant.) Returns None only while another CPU resets the
/// slot.
#[inline(always)]
fn day_counters(org: u32, day: u64) -> Option<*mut DayCounters> {
    let Some(slot) = ORG_DAYS.get_ptr_mut(day_index(org, day)) else {
        fault(FAULT_BAD_ORG);
        return None;
    };
    // SAFETY: `slot` is a valid map value.
    let tag = unsafe { &raw mut (*slot).day };
    let cur = load(tag);
    if cur == day {
        return Some(slot);
    }
    if cur & RESETTING != 0 {
        return day_slot_if(tag, slot, day);
    }
    // A slot never used (tag 0, all zero) needs no clearing.
    if cur == 0 {
        return cas(tag, 0, day)
            .ok()
            .map(|()| slot)
            .or_else(|| day_slot_if(tag, slot, day));
    }
    // Claim the reset with a marker first: other CPUs see the marker and count nothing (pass,
    // uncounted) until the fields are zero and the tag is `day`.
    if cas(tag, cur, day | RESETTING).is_ok() {
        let conns = ORG_CONNS.get(org).copied().unwrap_or(0);
        // SAFETY: as above; plain stores: the winner of the CAS owns the reset.
        unsafe {
            (*slot).requests = 0;
            (*slot).rejected = 0;
            (*slot).exempt_media_gets = 0;
            (*slot).exempt_pushes = 0;
            (*slot).unparsed = 0;
            (*slot).peak_connections = if conns > 0 { conns as u64 } else { 0 };
            (*slot).concurrency_breaches = 0;
            (*slot).delayed_syns = 0;
            (*slot).concurrency_rejected = 0;
            atomic_xchg::<u64, { SeqCst }>(tag, day);
        }
        return Some(slot);
    }
    day_slot_if(tag, slot, day)
}

/// Marks a day slot being reset by the kernel (see `day_counters`).
const RESETTING: u64 = 1 << 63;

/// The slot if its tag is `day` now (another CPU finished its reset), else None.
#[inline(always)]
fn day_slot_if(tag: *mut u64, slot: *mut DayCounters, day: u64) -> Option<*mut DayCounters> {
    (load(tag) == day).then_some(slot)
}

/// Which counter of today's slot a chunk or connection touches.
#[derive(Clone, Copy)]
enum Counter {
    ExemptMedia,
    ExemptPush,
    Unparsed,
}

#[inline(always)]
fn count(org: u32, c: &Config, what: Counter) {
    count_n(org, c, what, 1);
}

#[inline(always)]
fn count_n(org: u32, c: &Config, what: Counter, n: u64) {
    let Some(slot) = day_counters(org, today(c)) else {
        return;
    };
    // SAFETY: `slot` points into a valid map value.
    let field = unsafe {
        match what {
            Counter::ExemptMedia => &raw mut (*slot).exempt_media_gets,
            Counter::ExemptPush => &raw mut (*slot).exempt_pushes,
            Counter::Unparsed => &raw mut (*slot).unparsed,
        }
    };
    add(field, n);
}

/// The org owning an address (IPv4 as IPv4-mapped IPv6), or the unmapped slot.
#[inline(always)]
fn org_of(addr: AddrKey) -> u32 {
    // SAFETY: read-only lookup of a plain value.
    if let Some(org) = unsafe { ORG_BY_HOST.get(&addr) } {
        return *org;
    }
    let key = Key::new(128, addr);
    ORG_BY_ADDR.get(&key).copied().unwrap_or(UNMAPPED_ORG)
}

/// Reads the peer address of a context (`bpf_sock_ops`, `__sk_buff`, `sk_msg_md`) field by field
/// with volatile loads: the verifier rejects context loads through a computed pointer, which
/// copying the `remote_ip6` array produces.
macro_rules! peer_addr {
    ($ctx:expr) => {{
        let ctx = $ctx;
        // SAFETY: `ctx` is the program's context pointer; these are plain u32 fields.
        unsafe {
            use core::ptr::read_volatile as rv;
            let family = rv(&raw const (*ctx).family);
            let ip4 = rv(&raw const (*ctx).remote_ip4);
            let ip6 = [
                rv(&raw const (*ctx).remote_ip6[0]),
                rv(&raw const (*ctx).remote_ip6[1]),
                rv(&raw const (*ctx).remote_ip6[2]),
                rv(&raw const (*ctx).remote_ip6[3]),
            ];
            addr_key(family, ip4, ip6)
        }
    }};
}

#[inline(always)]
fn addr_key(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<AddrKey> {
    match family {
        AF_INET => Some(v4_mapped(ip4.to_ne_bytes())),
        AF_INET6 => {
            let mut k = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let b = ip6[i].to_ne_bytes();
                k[i * 4] = b[0];
                k[i * 4 + 1] = b[1];
                k[i * 4 + 2] = b[2];
                k[i * 4 + 3] = b[3];
                i += 1;
            }
            Some(k)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// sock_ops: connections
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_inbound(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_outbound(ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(ctx, ctx.arg(1)),
        _ => {}
    }
}

#[inline(always)]
fn cookie_of_ops(ctx: &SockOpsContext) -> u64 {
    // SAFETY: sock_ops may pass its context to bpf_get_socket_cookie.
    unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) }
}

#[inline(always)]
fn on_inbound(ctx: &SockOpsContext) {
    let Some(c) = config() else { return };
    let port = ctx.local_port() as u16;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { API_PORTS.get(&port) }.is_none() {
        return;
    }
    let Some(addr) = peer_addr!(ctx.ops) else {
        return;
    };
    let org = org_of(addr);
    let cookie = cookie_of_ops(ctx);
    let state = SockState {
        org,
        kind: SOCK_F_INBOUND,
        open: 1,
        stream: Stream::new(),
        addr_gen: c.addr_gen,
        org_epoch: c.org_epoch,
        ..SockState::default()
    };
    let added = if reserve_sock_state(org) {
        let st = add_sock_state(cookie, &state);
        if st.is_none() {
            release_sock_state();
        }
        st
    } else if org == UNMAPPED_ORG {
        // Past the high-water mark a connection of no org is left alone: it would only take
        // room from the orgs' connections.
        fault(FAULT_UNMAPPED_UNTRACKED);
        return;
    } else {
        None
    };
    match added {
        // Without state the connection cannot be un-counted exactly on close, so it is not counted;
        // its requests are still counted and limited (the verdict falls back to the address).
        None => fault(FAULT_SOCK_STATE_FULL),
        Some(st) => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            if connection_opened(org, c).is_some_and(|flags| flags & ORG_F_CONC_REJECT != 0) {
                // SAFETY: valid map value, not yet visible to the verdict (not in API_SOCKS yet).
                unsafe { (*st).kind |= SOCK_F_OVER_LIMIT };
            }
        }
    }
    let mut key = cookie;
    // SAFETY: `ctx.ops` is the kernel's bpf_sock_ops for this call.
    if API_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .is_err()
    {
        fault(FAULT_SOCKHASH_FULL);
    }
}

/// Counts a new connection; the org's `ORG_F_*` flags when it arrived while the org was at its
/// concurrency limit.
#[inline(always)]
fn connection_opened(org: u32, c: &Config) -> Option<u32> {
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        fault(FAULT_BAD_ORG);
        return None;
    };
    let before = add_i64(conns, 1);
    let before = if before > 0 { before as u64 } else { 0 };
    let d = today(c);
    let slot = day_counters(org, d)?;
    // SAFETY: valid map value.
    unsafe { raise_to(&raw mut (*slot).peak_connections, before + 1) };
    let l = ORG_LIMITS.get(org)?;
    let limit = l.concurrent_connections as u64;
    if org != UNMAPPED_ORG && limit > 0 && before >= limit {
        // SAFETY: valid map value.
        add(unsafe { &raw mut (*slot).concurrency_breaches }, 1);
        emit(EVENT_CONCURRENCY_BREACH, org, before, d);
        return Some(l.flags);
    }
    None
}

#[inline(always)]
fn on_outbound(ctx: &SockOpsContext) {
    if config().is_none() {
        return;
    }
    let Some(addr) = peer_addr!(ctx.ops) else {
        return;
    };
    // Only connections to a customer's address are pushes; the rest are left alone.
    if org_of(addr) == UNMAPPED_ORG {
        return;
    }
    let mut key = cookie_of_ops(ctx);
    // SAFETY: `ctx.ops` is the kernel's bpf_sock_ops for this call.
    if PUSH_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .is_err()
    {
        fault(FAULT_SOCKHASH_FULL);
    }
}

/// Un-counts an inbound connection exactly once, on its first move out of ESTABLISHED (whoever
/// closes, however: FIN, RST or timeout), and frees its state when it reaches CLOSE.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext, new_state: u32) {
    if new_state == TCP_ESTABLISHED {
        return;
    }
    let cookie = cookie_of_ops(ctx);
    let Some(st) = sock_state(cookie) else {
        return;
    };
    // SAFETY: valid map value; `open` is only ever swapped atomically.
    let (was_open, org, kind, epoch) = unsafe {
        let open = atomic_xchg::<u32, { SeqCst }>(&raw mut (*st).open, 0);
        (open, (*st).org, (*st).kind, (*st).org_epoch)
    };
    // A connection attributed under other org maps (before a restart that resized them) and not
    // attributed again since is not in these maps' counts.
    let here = CONFIG.get(0).map_or(0, |c| c.org_epoch);
    if was_open == 1
        && kind & SOCK_F_INBOUND != 0
        && epoch == here
        && let Some(conns) = ORG_CONNS.get_ptr_mut(org)
    {
        add_i64(conns, -1);
    }
    if new_state == TCP_CLOSE {
        remove_sock_state(cookie);
    }
}

// ---------------------------------------------------------------------------------------------
// stream verdict: inbound requests
// ---------------------------------------------------------------------------------------------

/// What the verdict's `bpf_loop` hands each iteration: pointers only (the same every iteration);
/// everything that changes lives in map memory, where the verifier does not follow values.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    cfg: *const Config,
    slot: *mut WalkSlot,
    stream: *mut Stream,
}

/// One `bpf_loop` iteration: one [`Stream::step`].
#[inline(never)]
extern "C" fn walk_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the verdict's `Walk`, on its stack for the whole loop; its pointers are
    // map values (this CPU's walk slot, the socket's stream, CONFIG) and the program's context.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    try_walk_step(w.skb, slot, stream, cfg)
}

#[inline(always)]
fn try_walk_step(skb: *mut __sk_buff, w: &mut WalkSlot, stream: &mut Stream, cfg: &Config) -> i64 {
    if w.pos >= w.len {
        return 1;
    }
    if stream.needs_bytes() && !(w.pos >= w.win_off && w.pos < w.win_off + w.win_n) {
        // Always a whole window, so the load's length is a constant: a length that followed
        // `pos` would make the verifier track `pos`. (Chunks shorter than a window are loaded
        // whole before the loop.)
        let win = WIN as u64;
        if w.len < win {
            w.failed = 1;
            return 1;
        }
        let off = if w.pos + win <= w.len {
            w.pos
        } else {
            w.len - win
        };
        // SAFETY: `w.win` holds WIN_BUF >= WIN bytes, and off + WIN <= len.
        if unsafe {
            bpf_skb_load_bytes(
                skb as *const c_void,
                off as u32,
                w.win.as_mut_ptr() as *mut c_void,
                WIN as u32,
            )
        } != 0
        {
            w.failed = 1;
            return 1;
        }
        w.win_off = off;
        w.win_n = win;
    }
    let at = (w.pos - w.win_off) as usize;
    let count = cfg.media_prefix_count;
    let all = if count >= 8 {
        0xff
    } else {
        ((1u32 << count) - 1) as u8
    };
    let used = stream.step(
        &w.win,
        at & (WIN - 1),
        w.win_n as usize,
        w.len - w.pos,
        &KernelMedia(all),
        &mut w.tally,
    );
    if used == 0 {
        return 1;
    }
    w.pos += used;
    0
}

/// The media prefixes through MEDIA_MATCH; `0` holds the configured prefixes' bits.
struct KernelMedia(u8);

impl MediaPrefixes for KernelMedia {
    #[inline(always)]
    fn all(&self) -> u8 {
        self.0
    }

    #[inline(always)]
    fn matching(&self, pos: u8, c: u8) -> u8 {
        MEDIA_MATCH
            .get(media_match_index(pos, c))
            .copied()
            .unwrap_or(0)
    }
}

/// Most `bpf_loop` iterations per chunk (each consumes at least a byte).
const WALK_MAX: u64 = 1 << 23;

/// Feeds the chunk to `stream` (a map value) in this CPU's walk slot. None when it could not be
/// followed to its end (a fault; the chunk passes).
#[inline(always)]
fn walk_chunk(ctx: &SkBuffContext, c: &Config, stream: *mut Stream, len: u64) -> Option<Tally> {
    let top = WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot 0. A verdict that interrupts this one runs to its end before this
    // one goes on, so a plain read and write of the depth cannot interleave with another.
    let depth = unsafe { (*top).depth };
    if depth >= WALK_SLOTS as u64 {
        return None;
    }
    let slot = WALK.get_ptr_mut(depth as u32)?;
    // SAFETY: as above.
    unsafe { (*top).depth = depth + 1 };
    let tally = walk_in(ctx, c, stream, len, slot);
    // SAFETY: as above.
    unsafe { (*top).depth = depth };
    tally
}

#[inline(always)]
fn walk_in(
    ctx: &SkBuffContext,
    c: &Config,
    stream: *mut Stream,
    len: u64,
    slot: *mut WalkSlot,
) -> Option<Tally> {
    // SAFETY: this CPU's walk slot, ours until `walk_chunk` gives it back. Volatile stores, field
    // by field: LLVM turns plain ones into a call to a byte-at-a-time memset.
    let w = unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*slot).pos, 0);
        put(&raw mut (*slot).len, len);
        put(&raw mut (*slot).win_off, 0);
        put(&raw mut (*slot).win_n, 0);
        put(&raw mut (*slot).failed, 0);
        put(&raw mut (*slot).tally.counted, 0);
        put(&raw mut (*slot).tally.media, 0);
        put(&raw mut (*slot).tally.starts, 0);
        put(&raw mut (*slot).tally.head_method, false);
        put(&raw mut (*slot).tally.opaque, false);
        put(&raw mut (*slot).tally.broken, false);
        &mut *slot
    };
    if len < WIN as u64 {
        // SAFETY: `w.win` holds WIN_BUF > len bytes; the verifier sees 1 <= len < WIN.
        if unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                0,
                w.win.as_mut_ptr() as *mut c_void,
                len as u32,
            )
        } != 0
        {
            return None;
        }
        w.win_n = len;
    }
    let mut walk = Walk {
        skb: ctx.skb.skb,
        cfg: c as *const Config,
        slot,
        stream,
    };
    let loops = if len < WALK_MAX { len } else { WALK_MAX };
    // SAFETY: `walk_step` is a static function of this program; `walk` outlives the loop.
    unsafe {
        bpf_loop(
            loops as u32,
            walk_step as *const () as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        )
    };
    (w.failed == 0).then_some(w.tally)
}

#[inline(always)]
fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let Some(c) = config() else { return SK_PASS };
    let len = ctx.len() as u64;
    if len == 0 {
        return SK_PASS;
    }
    // SAFETY: stream verdict programs may ask for their socket's cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let st = sock_state(cookie);
    let (org, kind, stream) = match st {
        // SAFETY: valid map value; verdicts of one socket run one at a time.
        Some(st) => unsafe {
            if (*st).addr_gen != c.addr_gen || (*st).org_epoch != c.org_epoch {
                reattribute(ctx, st, c);
            }
            ((*st).org, (*st).kind, &raw mut (*st).stream)
        },
        None => {
            // Nothing to follow the stream with: each chunk is read as if it began the
            // connection (a fault, counted), in the walk slot's own stream.
            fault(FAULT_NO_SOCK_STATE);
            let Some(w) = WALK.get_ptr_mut(WALK_SLOTS - 1) else {
                return SK_PASS;
            };
            let addr = peer_addr!(ctx.skb.skb);
            // SAFETY: this CPU's last walk slot's stream, used only here.
            unsafe { (*w).stream = Stream::new() };
            (
                addr.map(org_of).unwrap_or(UNMAPPED_ORG),
                0,
                // SAFETY: as above.
                unsafe { &raw mut (*w).stream },
            )
        }
    };
    // SAFETY: a map value, as above.
    let (state, flags, from_boundary) =
        unsafe { ((*stream).state, (*stream).flags, (*stream).at_boundary()) };
    match state {
        // After a `Connection: close` reply or broken framing nothing more reaches the app.
        S_CLOSED => return SK_DROP,
        S_OPAQUE => return SK_PASS,
        _ => {}
    }
    let Some(t) = walk_chunk(ctx, c, stream, len) else {
        // The stream cannot be followed past here: fail open.
        fault(FAULT_PARSE);
        return SK_PASS;
    };
    if flags & F_REFUSED != 0 {
        // After a `Connection: close` 429: what the client still sent is counted (counted
        // requests as refused) and dropped.
        if let Some(slot) = day_counters(org, today(c)) {
            // SAFETY: valid map value.
            unsafe {
                add(&raw mut (*slot).rejected, t.counted as u64);
                add(&raw mut (*slot).exempt_media_gets, t.media as u64);
            }
        }
        return SK_DROP;
    }
    if t.opaque {
        count(org, c, Counter::Unparsed);
        return SK_PASS;
    }
    if t.media > 0 {
        count_n(org, c, Counter::ExemptMedia, t.media as u64);
    }
    if t.broken {
        count(org, c, Counter::Unparsed);
    }
    if t.counted == 0 && !t.broken {
        return SK_PASS;
    }
    let day = today(c);
    let Some(slot) = day_counters(org, day) else {
        return SK_PASS;
    };
    let limits = ORG_LIMITS.get(org);
    let n = t.counted as u64;
    // One call site for every refusal: the verifier walks the 429 path once, not per policy.
    let policy = if kind & SOCK_F_OVER_LIMIT != 0 && limits.is_some() && n > 0 {
        // SAFETY: valid map value.
        add(unsafe { &raw mut (*slot).concurrency_rejected }, 1);
        add(unsafe { &raw mut (*slot).rejected }, n);
        Policy::Concurrency
    } else {
        match daily_verdict(org, day, slot, limits, n) {
            Some(p) => p,
            None if t.broken => Policy::BadRequest,
            None => return SK_PASS,
        }
    };
    // A 429 may keep the connection only when the chunk was exactly one whole request.
    let keep_alive_ok = from_boundary
        && t.starts == 1
        && !t.broken
        && !t.head_method
        // SAFETY: a map value, as above.
        && unsafe { (*stream).at_boundary() };
    refuse(ctx, cookie, org, policy, keep_alive_ok)
}

/// The daily quota's decision for the `n` counted requests of a chunk: None lets them through
/// (counted), Some refuses them all (counted as rejected).
#[inline(always)]
fn daily_verdict(
    org: u32,
    day: u64,
    slot: *mut DayCounters,
    limits: Option<&OrgLimits>,
    n: u64,
) -> Option<Policy> {
    // SAFETY: valid map value.
    let requests = unsafe { &raw mut (*slot).requests };
    if n == 0 {
        return None;
    }
    let Some(l) = limits.filter(|l| org != UNMAPPED_ORG && l.flags & ORG_F_ACTIVE != 0) else {
        add(requests, n);
        return None;
    };
    // In a cluster the other hosts' count of today counts against the same limit.
    let remote = ORG_REMOTE
        .get(day_index(org, day))
        .filter(|r| r.day == day)
        .map(|r| r.requests)
        .unwrap_or(0);
    if take_quota(requests, remote, l.daily_requests, n) {
        return None;
    }
    // Over quota: the requests go to `rejected`, not `requests`.
    // SAFETY: valid map value.
    if add(unsafe { &raw mut (*slot).rejected }, n) == 0 {
        emit(EVENT_QUOTA_EXHAUSTED, org, l.daily_requests, day);
    }
    if l.flags & ORG_F_DRY_RUN != 0 {
        return None;
    }
    Some(Policy::Daily)
}

/// Counts `n` requests against the quota if all fit: a compare-and-swap from below the limit,
/// so the limit is never passed across CPUs and a refusal never touches the count (a reset or
/// day change landing meanwhile cannot make it wrap). Under heavy contention the bounded loop
/// gives up and lets the requests through, counted (fail open).
#[inline(always)]
fn take_quota(requests: *mut u64, remote: u64, limit: u64, n: u64) -> bool {
    let mut cur = load(requests);
    let mut i = 0;
    while i < 16 {
        if cur.saturating_add(remote).saturating_add(n) > limit {
            return false;
        }
        match cas(requests, cur, cur + n) {
            Ok(()) => return true,
            Err(now) => cur = now,
        }
        i += 1;
    }
    add(requests, n);
    true
}

/// The address table changed (a reload) since this connection was attributed, or the org maps
/// were replaced (a restart that resized them): look its org up again, and move its
/// open-connection count along (or, from other org maps, count it here), so added and removed
/// orgs take effect on existing keep-alive connections too.
#[inline(always)]
fn reattribute(ctx: &SkBuffContext, st: *mut SockState, c: &Config) {
    let org = peer_addr!(ctx.skb.skb).map(org_of).unwrap_or(UNMAPPED_ORG);
    // SAFETY: valid map value; verdicts of one socket run one at a time.
    unsafe {
        let old = (*st).org;
        let counted_here = (*st).org_epoch == c.org_epoch;
        (*st).addr_gen = c.addr_gen;
        (*st).org_epoch = c.org_epoch;
        if counted_here && old == org {
            return;
        }
        if (*st).open == 1
            && let Some(to) = ORG_CONNS.get_ptr_mut(org)
        {
            if counted_here && let Some(from) = ORG_CONNS.get_ptr_mut(old) {
                add_i64(from, -1);
            }
            add_i64(to, 1);
        }
        (*st).org = org;
    }
}

/// Longest chunk a reply can replace: the reply's head and padding are blanked with one store
/// from [`SPACES`].
const PAD_MAX: usize = 65 * 1024;
/// Spaces for blanking the reply's head and padding: one store of any length up to PAD_MAX, so
/// the verifier walks no loop.
static SPACES: [u8; PAD_MAX] = [b' '; PAD_MAX];

/// Writes reply bytes into the skb being refused.
struct SkbSink<'a> {
    ctx: &'a SkBuffContext,
}

impl SkbSink<'_> {
    #[inline(always)]
    fn store(&self, off: usize, from: *const u8, len: usize) -> bool {
        // SAFETY: `from` points at `len` readable bytes (a static, the stack or a map value).
        unsafe {
            bpf_skb_store_bytes(
                self.ctx.skb.skb,
                off as u32,
                from as *const c_void,
                len as u32,
                0,
            ) == 0
        }
    }
}

impl Sink for SkbSink<'_> {
    #[inline(always)]
    fn put(&mut self, off: usize, bytes: &[u8]) -> bool {
        let len = bytes.len();
        len == 0 || self.store(off, bytes.as_ptr(), len)
    }

    #[inline(always)]
    fn spaces(&mut self, off: usize, n: usize) -> bool {
        n == 0 || (n <= PAD_MAX && self.store(off, SPACES.as_ptr(), n))
    }
}

/// Hands a refusal to `limiter_refuse` (a tail call: the 429 writer is verified as a program
/// of its own, apart from the paths of the parser and counters that lead to it).
#[inline(always)]
fn refuse(ctx: &SkBuffContext, cookie: u64, org: u32, policy: Policy, keep_alive_ok: bool) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        fault(FAULT_REPLY);
        return SK_PASS;
    };
    // SAFETY: this CPU's scratch value; the tail call runs next on this same CPU. Field by
    // field (volatile): a struct store becomes a byte-at-a-time memset.
    unsafe {
        use core::ptr::write_volatile as put;
        let args = &raw mut (*scratch).args;
        put(&raw mut (*args).cookie, cookie);
        put(&raw mut (*args).org, org);
        put(&raw mut (*args).policy, policy as u32);
        put(&raw mut (*args).keep_alive_ok, keep_alive_ok);
        REFUSE.tail_call(ctx, 0);
    }
    // Only reached when the tail call failed: let the request through rather than break it.
    fault(FAULT_REPLY);
    SK_PASS
}

#[stream_verdict]
pub fn limiter_refuse(ctx: SkBuffContext) -> u32 {
    try_refuse(&ctx)
}

/// Rewrites the refused request into the 429 of `reply` (docs/cli.md), padded (or, when the
/// request is shorter than the reply, grown) to the right length, and sends it back out of the
/// same socket. Keep-alive when the chunk is exactly one whole request and holds the full or the
/// compact reply; otherwise `Connection: close` and everything after it is dropped.
#[inline(always)]
fn try_refuse(ctx: &SkBuffContext) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return SK_DROP;
    };
    // SAFETY: this CPU's scratch value, filled by the verdict that tail-called us.
    let scratch = unsafe { &mut *scratch };
    let args = scratch.args;
    // Another verdict on this CPU (softirq over process context) may have refused in between and
    // overwritten the arguments: only answer for our own socket, else let the request through.
    // SAFETY: stream verdict programs may ask for their socket's cookie.
    if unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) } != args.cookie {
        fault(FAULT_REPLY);
        return SK_PASS;
    }
    let (Some(c), Some(l)) = (config(), ORG_LIMITS.get(args.org)) else {
        fault(FAULT_REPLY);
        return SK_DROP;
    };
    let st = sock_state(args.cookie);
    let len = ctx.len() as usize;
    let org_len = if (l.name_len as usize) < NAME_MAX {
        l.name_len as usize
    } else {
        NAME_MAX
    };
    let (policy, limit) = if args.policy == Policy::Concurrency as u32 {
        (Policy::Concurrency, l.concurrent_connections as u64)
    } else if args.policy == Policy::BadRequest as u32 {
        (Policy::BadRequest, 0)
    } else {
        (Policy::Daily, l.daily_requests)
    };
    // SAFETY: a helper without arguments.
    let now = day::limiter_time(unsafe { bpf_ktime_get_tai_ns() }, c.clock_offset_ns);
    let mut reply = Reply::new(
        policy,
        &l.name,
        org_len,
        limit,
        day::seconds_until_next_day(now, c.day_len_ns),
        scratch,
    );
    reply.keep_alive = args.keep_alive_ok;
    if args.keep_alive_ok && len < reply.min_len() {
        // Too short for the body: the compact reply keeps the connection if it fits.
        reply.body = false;
        if len < reply.min_len() {
            reply.body = true;
            reply.keep_alive = false;
        }
    }
    let min = reply.min_len();
    let total = if len < min {
        // SAFETY: growing the skb this program owns; the connection closes after this reply.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, min as u32, 0) } != 0 {
            // Nothing written yet: fail open.
            fault(FAULT_REPLY);
            return SK_PASS;
        }
        min
    } else if len > PAD_MAX {
        // Too long to pad (a very large first segment): pass it rather than break the connection.
        fault(FAULT_REPLY);
        return SK_PASS;
    } else {
        len
    };
    if let Some(st) = st
        && !reply.keep_alive
    {
        // SAFETY: valid map value; verdicts of one socket run one at a time.
        unsafe {
            if policy == Policy::BadRequest {
                (*st).stream.state = S_CLOSED;
            } else {
                (*st).stream.flags |= F_REFUSED;
            }
        }
    }
    if !reply.render(total, scratch, &mut SkbSink { ctx }) {
        // Half-written: never hand it to the app.
        fault(FAULT_REPLY);
        return SK_DROP;
    }
    let mut key = args.cookie;
    // SAFETY: redirect to the egress of the socket this skb arrived on (flags 0 = egress).
    unsafe {
        bpf_sk_redirect_hash(
            ctx.skb.skb as *mut _,
            &API_SOCKS as *const _ as *mut c_void,
            &mut key as *mut u64 as *mut c_void,
            0,
        ) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// XDP: the SYN gate of `concurrency_mode = "delay"`
// ---------------------------------------------------------------------------------------------

#[xdp]
pub fn limiter_syn_gate(ctx: XdpContext) -> u32 {
    try_syn_gate(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// Drops the SYN of a new connection to an API port from an org in delay mode that is at its
/// concurrency limit: the client's TCP retries it a moment later, so the connection waits instead
/// of failing. Everything else passes (IPv4 with options and IPv6 with extension headers too).
#[inline(always)]
fn try_syn_gate(ctx: &XdpContext) -> Option<u32> {
    const ETH: usize = 14;
    let c = config()?;
    let data = ctx.data();
    let end = ctx.data_end();
    // One bounds check per layout, then fixed offsets: what the verifier follows best.
    let at = |off: usize| -> u8 {
        // SAFETY: every caller's offset is below the length checked before it.
        unsafe { *((data + off) as *const u8) }
    };
    if data + ETH > end {
        return None;
    }
    let mut addr = [0u8; 16];
    let tcp = match u16::from_be_bytes([at(12), at(13)]) {
        0x0800 => {
            const TCP: usize = ETH + 20;
            if data + TCP + 20 > end || at(ETH) != 0x45 || at(ETH + 9) != 6 {
                return None;
            }
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12] = at(ETH + 12);
            addr[13] = at(ETH + 13);
            addr[14] = at(ETH + 14);
            addr[15] = at(ETH + 15);
            TCP
        }
        0x86dd => {
            const TCP: usize = ETH + 40;
            if data + TCP + 20 > end || at(ETH + 6) != 6 {
                return None;
            }
            let mut i = 0;
            while i < 16 {
                addr[i] = at(ETH + 8 + i);
                i += 1;
            }
            TCP
        }
        _ => return None,
    };
    let (flags, port) = if tcp == ETH + 20 {
        (
            at(ETH + 20 + 13),
            u16::from_be_bytes([at(ETH + 20 + 2), at(ETH + 20 + 3)]),
        )
    } else {
        (
            at(ETH + 40 + 13),
            u16::from_be_bytes([at(ETH + 40 + 2), at(ETH + 40 + 3)]),
        )
    };
    // SYN without ACK: a new connection.
    if flags & 0x12 != 0x02 {
        return None;
    }
    // SAFETY: read-only lookup of a plain value.
    unsafe { API_PORTS.get(&port) }?;
    let org = org_of(addr);
    let l = ORG_LIMITS.get(org)?;
    if org == UNMAPPED_ORG || l.flags & ORG_F_CONC_DELAY == 0 || l.concurrent_connections == 0 {
        return None;
    }
    let open = *ORG_CONNS.get(org)?;
    if open < l.concurrent_connections as i64 {
        return None;
    }
    let slot = day_counters(org, today(c))?;
    // SAFETY: valid map value.
    add(unsafe { &raw mut (*slot).delayed_syns }, 1);
    Some(xdp_action::XDP_DROP)
}

// ---------------------------------------------------------------------------------------------
// sk_msg: outbound pushes
// ---------------------------------------------------------------------------------------------

/// Bytes of an outbound message needed to recognise a request line.
const PUSH_PEEK: usize = 16;

#[inline(always)]
fn try_push_msg(ctx: &SkMsgContext) {
    let Some(c) = config() else { return };
    let want = if ctx.size() < PUSH_PEEK as u32 {
        ctx.size()
    } else {
        PUSH_PEEK as u32
    };
    if ctx.data() + want as usize > ctx.data_end() {
        // SAFETY: pulls the first bytes of the message into the linear area.
        unsafe { bpf_msg_pull_data(ctx.msg, 0, want, 0) };
    }
    let mut buf = [0u8; PUSH_PEEK];
    let mut n = 0;
    let data = ctx.data();
    let end = ctx.data_end();
    while n < PUSH_PEEK {
        if data + n + 1 > end {
            break;
        }
        // SAFETY: bounds checked against data_end just above.
        buf[n] = unsafe { *((data + n) as *const u8) };
        n += 1;
    }
    let Some(bytes) = buf.get(..n) else { return };
    if http::parse_request_line(bytes).is_none() {
        return;
    }
    let addr = peer_addr!(ctx.msg);
    let org = addr.map(org_of).unwrap_or(UNMAPPED_ORG);
    if org != UNMAPPED_ORG {
        count(org, c, Counter::ExemptPush);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
