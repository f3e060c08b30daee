//! `limiter_verdict` (stream verdict on API_SOCKS): classifies and counts each inbound request
//! before the application reads it, and hands refusals to `limiter_refuse`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        __sk_buff,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_socket_cookie, bpf_loop},
    macros::stream_verdict,
    programs::SkBuffContext,
};
use limiter_common::{
    DayCounters, FAULT_NO_SOCK_STATE, FAULT_PARSE, FAULT_REPLY, ID_ADDRESS, ID_API_KEY,
    ID_FORWARDED, ID_PROXY_PROTOCOL, KernelConfig, ORG_F_CONC_REJECT, OrgLimits, SOCK_F_INFLIGHT,
    SOCK_F_OVER_LIMIT, SockState, TRACE_O_COUNTED, TRACE_O_EXEMPT, TRACE_O_PASSED, TRACE_O_REFUSED,
    TRACE_O_UNPARSED, TRACE_R_BAD_REQUEST, TRACE_R_CLOSED, TRACE_R_CONCURRENCY, TRACE_R_DAILY,
    TRACE_R_FAULT, TRACE_R_NONE, TRACE_R_NOT_HTTP, UNMAPPED_ORG,
    reply::Policy,
    stream::{
        F_REFUSED, ID_CONN_DIRTY, ID_FWD, ID_OPEN, ID_PER_REQUEST, ID_PROXY_OK, ID_TRUSTED,
        S_CLOSED, S_OPAQUE, Stream, Tally, WalkSlot, listed,
    },
};

use crate::{
    addr::{org_of, peer_addr},
    atomic::{add, add_i64},
    days::{Counter, add_by, count, day_counters},
    ident, inflight,
    maps::{ORG_CONNS, ORG_LIMITS, REFUSE, SCRATCH, VERDICT_NEXT, WALK, WALK_STREAM},
    quota::{daily_verdict, out_of_quota},
    shared::{config, fault, forward, today},
    sock_ops::connection_opened,
    sock_table::{hashed_state, slot_state},
    trace::{self, Traced, tracing},
    walk::{copy_stream, walk_chunk, with_walk_slot},
};

#[stream_verdict]
pub fn limiter_verdict(ctx: SkBuffContext) -> u32 {
    forward(&ctx, &VERDICT_NEXT);
    try_verdict(&ctx)
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
    // The walk slot is given back before a refusal's tail call, which does not return.
    let Some((action, org)) =
        with_walk_slot(|slot, stream| verdict_in(ctx, c, cookie, len, slot, stream))
    else {
        // No walk slot free on this CPU: fail open.
        fault(FAULT_PARSE);
        return SK_PASS;
    };
    match action {
        Action::Pass => SK_PASS,
        Action::Drop => SK_DROP,
        Action::Refuse {
            policy,
            keep_alive_ok,
        } => refuse(ctx, cookie, org, policy, keep_alive_ok),
    }
}

/// The verdict on a chunk, with this CPU's walk slot and its spare stream (`spare`).
///
/// A socket's state is in its slot in SOCK_SLOTS, in SOCK_STATE (its slot was another's), or
/// nowhere (a full table). The verifier walks the parser once for each map the walked stream
/// can be in, so only two are walked: a slot's stream where it is, the others in `spare`
/// (copied in from SOCK_STATE and back, or new each chunk). The state itself is looked up again
/// after the walk: a pointer to it kept across the walk would be another pass of the verifier
/// for each map it may point into.
#[inline(always)]
fn verdict_in(
    ctx: &SkBuffContext,
    c: &KernelConfig,
    cookie: u64,
    len: u64,
    slot: *mut WalkSlot,
    spare: *mut Stream,
) -> (Action, u32) {
    let Some(stream) = prepare(ctx, c, cookie, len, slot, spare) else {
        // Body bytes, skipped where they are.
        return (Action::Pass, 0);
    };
    // SAFETY: a map value, as above.
    let (state, flags, from_boundary) =
        unsafe { ((*stream).state, (*stream).flags, (*stream).at_boundary()) };
    match state {
        // After a `Connection: close` reply or broken framing nothing more reaches the app.
        S_CLOSED => return (Action::Drop, 0),
        S_OPAQUE => return (Action::Pass, 0),
        _ => {}
    }
    // SAFETY: as above; read back through memory (see `WalkSlot::sock_org`).
    let (org, via) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).sock_org),
            (*stream).via,
        )
    };
    let walked = walk_chunk(ctx, c, slot, stream, len, org, via);
    // SAFETY: the slot's tally, which the walk has filled (and no longer borrows).
    let t = unsafe { &*(&raw const (*slot).tally) };
    // The state again (and a copied stream back into it).
    // SAFETY: as above.
    let (found, kind) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).sock_found),
            core::ptr::read_volatile(&raw const (*slot).sock_kind),
        )
    };
    let st = match found {
        FOUND_IN_SLOT => slot_state(cookie),
        FOUND_HASHED => {
            let st = hashed_state(cookie);
            if let Some(st) = st {
                // SAFETY: valid map values; verdicts of one socket run one at a time.
                unsafe { copy_stream(&raw mut (*st).stream, stream) };
            }
            st
        }
        _ => None,
    };
    if let Some(st) = st {
        // SAFETY: valid map value; verdicts of one socket run one at a time.
        unsafe {
            // A trusted PROXY header named the connection's org.
            if (*st).stream.id & ID_CONN_DIRTY != 0 {
                move_conn(st, c);
            }
        }
    }
    let d = if walked {
        let sock = Sock {
            org,
            kind: if st.is_some() { kind } else { 0 },
            stream,
            st: st.unwrap_or(core::ptr::null_mut()),
        };
        decide(c, &sock, t, flags, from_boundary)
    } else {
        // The stream cannot be followed past here: fail open.
        fault(FAULT_PARSE);
        Decision::pass(TRACE_O_UNPARSED, TRACE_R_FAULT)
    };
    // The org the chunk's requests belong to (the connection's, unless its requests are
    // attributed one by one).
    let org = t.org;
    if tracing() {
        let traced = Traced {
            cookie,
            org,
            outcome: d.outcome,
            reason: d.reason,
            at_start: from_boundary,
        };
        trace::record(ctx, &traced, t);
    }
    (d.action, org)
}

/// A socket without a state: the new stream in this CPU's spare (`fresh` already), identified
/// as a new connection's, and its org in the walk slot.
#[inline(never)]
extern "C" fn no_state_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: the verdict's skb pointer, on its stack for the call.
    let skb = unsafe { *(ctx as *const *mut __sk_buff) };
    let (Some(c), Some(top)) = (config(), WALK.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: this CPU's slot 0; the verdict holds the slot below the depth.
    let depth = unsafe { (*top).depth };
    if depth == 0 {
        return 1;
    }
    let (Some(slot), Some(spare)) = (
        WALK.get_ptr_mut(depth as u32 - 1),
        WALK_STREAM.get_ptr_mut(depth as u32 - 1),
    ) else {
        return 1;
    };
    let org = peer_addr!(skb)
        .filter(|_| listed(c, ID_ADDRESS))
        .map(org_of)
        .unwrap_or(UNMAPPED_ORG);
    let sctx = SkBuffContext::new(skb);
    open(&sctx, c, spare, org);
    // SAFETY: this CPU's walk slot and spare stream, the verdict's.
    unsafe { core::ptr::write_volatile(&raw mut (*slot).sock_org, (*spare).conn_org(c).0) };
    1
}

/// `WalkSlot::sock_found`: the socket's state is in its slot (its stream walked there).
const FOUND_IN_SLOT: u64 = 1;
/// The socket's state is in SOCK_STATE (its stream walked in the spare stream).
const FOUND_HASHED: u64 = 2;

/// The stream to walk, and the socket's org, kind and where its state is in the walk slot
/// (`WalkSlot::sock_*`): a new connection's identification first, or a new look at its org after
/// a reload. A socket without a state (a full table) is read as if each chunk began the
/// connection (a fault, counted). None when the chunk lies inside a body
/// ([`Stream::skip_body`], unless `limiter trace` shows every chunk): it needs no walk.
#[inline(always)]
fn prepare(
    ctx: &SkBuffContext,
    c: &KernelConfig,
    cookie: u64,
    len: u64,
    slot: *mut WalkSlot,
    spare: *mut Stream,
) -> Option<*mut Stream> {
    use core::ptr::write_volatile as put;
    let (st, found) = match slot_state(cookie) {
        Some(st) => (Some(st), FOUND_IN_SLOT),
        None => (hashed_state(cookie), FOUND_HASHED),
    };
    let Some(st) = st else {
        fault(FAULT_NO_SOCK_STATE);
        fresh(spare);
        // SAFETY: this CPU's walk slot, ours for the verdict.
        unsafe {
            put(&raw mut (*slot).sock_org, UNMAPPED_ORG);
            put(&raw mut (*slot).sock_kind, 0);
            put(&raw mut (*slot).sock_found, 0);
        }
        // The new stream's identification, in a callback of its own: the addresses it builds
        // on the stack would take the verdict's frame past the verifier's limit for its
        // deepest chain of calls (and this path is rare: a full socket table).
        let mut skb = ctx.skb.skb;
        // SAFETY: a static callback of this program; `skb` outlives the call.
        unsafe {
            bpf_loop(
                1,
                no_state_step as *const () as *mut c_void,
                &mut skb as *mut *mut __sk_buff as *mut c_void,
                0,
            )
        };
        return Some(spare);
    };
    // SAFETY: valid map values; verdicts of one socket run one at a time.
    unsafe {
        let own = &raw mut (*st).stream;
        if !tracing() && (*own).skip_body(len) {
            return None;
        }
        if (*own).id & ID_OPEN == 0 {
            open(ctx, c, own, (*st).org);
        }
        if (*st).addr_gen != c.addr_gen || (*st).org_epoch != c.org_epoch {
            reattribute(ctx, st, c);
        }
        put(&raw mut (*slot).sock_org, (*st).org);
        put(&raw mut (*slot).sock_kind, (*st).kind);
        put(&raw mut (*slot).sock_found, found);
        if found == FOUND_IN_SLOT {
            return Some(own);
        }
        copy_stream(spare, own);
    }
    Some(spare)
}

/// What the verdict does with a chunk.
#[derive(Clone, Copy)]
enum Action {
    Pass,
    Drop,
    /// Hand it to `limiter_refuse`.
    Refuse {
        policy: Policy,
        keep_alive_ok: bool,
    },
}

/// The verdict on a chunk, and how `limiter trace` shows it (`TRACE_O_*`, `TRACE_R_*`).
#[derive(Clone, Copy)]
struct Decision {
    action: Action,
    outcome: u8,
    reason: u8,
}

impl Decision {
    #[inline(always)]
    const fn pass(outcome: u8, reason: u8) -> Self {
        Decision {
            action: Action::Pass,
            outcome,
            reason,
        }
    }
}

/// The socket a chunk arrived on: its org, `SOCK_F_*` kind, and where its stream is followed.
struct Sock {
    org: u32,
    kind: u32,
    /// A map value: the socket's state, or this CPU's last walk slot when it has none.
    stream: *mut Stream,
    /// The socket's state; null when it has none (and then `kind` is 0).
    st: *mut SockState,
}

/// Counts what the walk found in a chunk, and decides on it.
#[inline(always)]
fn decide(c: &KernelConfig, sock: &Sock, t: &Tally, flags: u8, from_boundary: bool) -> Decision {
    let org = t.org;
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
        return Decision {
            action: Action::Drop,
            outcome: TRACE_O_REFUSED,
            reason: TRACE_R_CLOSED,
        };
    }
    if t.opaque {
        count(org, c, Counter::Unparsed);
        return Decision::pass(TRACE_O_UNPARSED, TRACE_R_NOT_HTTP);
    }
    if t.counted == 0 && t.media == 0 && !t.broken {
        // Body bytes or the rest of a head: nothing to count, no clock read.
        return Decision::pass(TRACE_O_PASSED, TRACE_R_NONE);
    }
    // One clock read and one slot for everything the chunk counts.
    let day = today(c);
    if t.unknown_keys > 0
        && let Some(unmapped) = day_counters(UNMAPPED_ORG, day)
    {
        // SAFETY: valid map value.
        add(
            unsafe { &raw mut (*unmapped).unknown_keys },
            t.unknown_keys as u64,
        );
    }
    let Some(slot) = day_counters(org, day) else {
        return Decision::pass(TRACE_O_PASSED, TRACE_R_FAULT);
    };
    add_by(slot, t.via, (t.counted + t.media) as u64);
    // SAFETY: `slot` is a valid map value.
    unsafe {
        if t.media > 0 {
            add(&raw mut (*slot).exempt_media_gets, t.media as u64);
        }
        if t.broken {
            add(&raw mut (*slot).unparsed, 1);
        }
    }
    if t.counted == 0 && !t.broken {
        passed(sock, t, slot, ORG_LIMITS.get(org));
        return Decision::pass(TRACE_O_EXEMPT, TRACE_R_NONE);
    }
    limit(sock, t, from_boundary, day, slot)
}

/// Counts the chunk's `t.counted` requests against the org's limits, and refuses them when
/// over (or when the framing broke): the refusal is handed to `limiter_refuse`.
#[inline(always)]
fn limit(
    sock: &Sock,
    t: &Tally,
    from_boundary: bool,
    day: u64,
    slot: *mut DayCounters,
) -> Decision {
    let org = t.org;
    let limits = ORG_LIMITS.get(org);
    let n = t.counted as u64;
    // The connection's concurrency limit holds for its own org's requests; requests attributed
    // one by one meet their org's limit on requests in flight.
    let over = if per_request(sock.kind, t) {
        inflight::over(org, limits)
    } else {
        sock.kind & SOCK_F_OVER_LIMIT != 0 && org == sock.org
    };
    // One refusal for every policy: the verifier walks the 429 path once, not per policy.
    let policy = if over && limits.is_some() && n > 0 {
        // SAFETY: valid map value.
        add(unsafe { &raw mut (*slot).concurrency_rejected }, 1);
        add(unsafe { &raw mut (*slot).rejected }, n);
        Policy::Concurrency
    } else {
        match daily_verdict(org, day, slot, limits, n) {
            Some(p) => p,
            None if t.broken => Policy::BadRequest,
            None => {
                passed(sock, t, slot, limits);
                return Decision::pass(TRACE_O_COUNTED, TRACE_R_NONE);
            }
        }
    };
    // A 429 may keep the connection only when the chunk was exactly one whole request, and
    // never for a paced org out of quota known by its address: its next request has to come
    // through the XDP gate (a proxy's connections are not paced, nor closed for one org).
    let paced = t.via == ID_ADDRESS
        && limits.is_some_and(|l| {
            l.pace_rate != 0
                && match policy {
                    Policy::Daily => true,
                    Policy::Concurrency => out_of_quota(org, day, slot, l),
                    Policy::BadRequest => false,
                }
        });
    let keep_alive_ok = !paced
        && from_boundary
        && t.starts == 1
        && !t.broken
        && !t.head_method
        // SAFETY: a map value, as above.
        && unsafe { (*sock.stream).at_boundary() };
    let reason = match policy {
        Policy::Daily => TRACE_R_DAILY,
        Policy::Concurrency => TRACE_R_CONCURRENCY,
        Policy::BadRequest => TRACE_R_BAD_REQUEST,
    };
    Decision {
        action: Action::Refuse {
            policy,
            keep_alive_ok,
        },
        outcome: TRACE_O_REFUSED,
        reason,
    }
}

/// The chunk's requests pass, counted in `slot`: those attributed one by one go in flight
/// ([`inflight::started`]).
#[inline(always)]
fn passed(sock: &Sock, t: &Tally, slot: *mut DayCounters, limits: Option<&OrgLimits>) {
    if per_request(sock.kind, t) && !sock.st.is_null() {
        inflight::started(sock.st, t.org, t.counted + t.media, slot, limits);
    }
}

/// Whether the chunk's requests were attributed one by one (by API key or forwarded address) on
/// a connection whose answers the egress program sees and can tie to its state: their org's
/// concurrency is then its requests in flight.
#[inline(always)]
fn per_request(kind: u32, t: &Tally) -> bool {
    kind & SOCK_F_INFLIGHT != 0 && t.attributed && (t.via == ID_API_KEY || t.via == ID_FORWARDED)
}

/// The address table changed (a reload) since this connection was attributed, or the org maps
/// were replaced (a restart that resized them): look its org up again, and move its
/// open-connection count along (or, from other org maps, count it here), so added and removed
/// orgs take effect on existing keep-alive connections too.
#[inline(always)]
fn reattribute(ctx: &SkBuffContext, st: *mut SockState, c: &KernelConfig) {
    let peer = peer_addr!(ctx.skb.skb)
        .filter(|_| listed(c, ID_ADDRESS))
        .map(org_of)
        .unwrap_or(UNMAPPED_ORG);
    // The trusted proxies or `forwarded` may have changed: this peer's forwarded headers are
    // believed from here only if they still say so.
    let fwd =
        listed(c, ID_FORWARDED) && peer_addr!(ctx.skb.skb).is_some_and(|a| ident::trusted(&a));
    // SAFETY: valid map value; verdicts of one socket run one at a time.
    unsafe {
        let s = &raw mut (*st).stream;
        (*s).peer_org = peer;
        // `api_key` now listed: requests are attributed one by one from here. Never cleared
        // (a request counted at its head's end must still be): without a key header to read,
        // its org is the connection's anyway.
        if listed(c, ID_API_KEY) {
            (*s).id |= ID_PER_REQUEST;
        }
        if fwd {
            (*s).id |= ID_FWD | ID_PER_REQUEST;
        } else {
            (*s).id &= !ID_FWD;
        }
        if (*s).id & ID_PROXY_OK != 0 {
            (*s).proxy_org = org_of((*s).proxy_addr);
        }
        let (org, via) = (*s).conn_org(c);
        (*s).via = via;
        (*s).id &= !ID_CONN_DIRTY;
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

/// Makes `stream` a new connection's, field by field (volatile): a whole-struct store becomes a
/// byte-at-a-time memset the verifier walks byte by byte.
#[inline(always)]
fn fresh(stream: *mut Stream) {
    // SAFETY: a map value (this CPU's last walk slot's stream).
    unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*stream).remaining, 0);
        put(&raw mut (*stream).length, 0);
        put(&raw mut (*stream).method, 0);
        put(&raw mut (*stream).state, 0);
        put(&raw mut (*stream).sub, 0);
        put(&raw mut (*stream).flags, 0);
        put(&raw mut (*stream).names, 0);
        put(&raw mut (*stream).media, 0);
        put(&raw mut (*stream).mpos, 0);
        put(&raw mut (*stream).seg, 0);
        put(&raw mut (*stream).pct, 0);
        put(&raw mut (*stream).peer_org, UNMAPPED_ORG);
        put(&raw mut (*stream).proxy_org, UNMAPPED_ORG);
        put(&raw mut (*stream).id, 0);
        put(&raw mut (*stream).via, 0);
        put(&raw mut (*stream).req, 0);
        put(&raw mut (*stream).key_org, UNMAPPED_ORG);
    }
}

/// A new connection's identification: its peer's org, and whether the peer is a trusted proxy
/// (looked up only when `proxy_protocol` is a source). The walk reads its first bytes next.
#[inline(always)]
fn open(ctx: &SkBuffContext, c: &KernelConfig, stream: *mut Stream, peer_org: u32) {
    let (pp, fwd) = (listed(c, ID_PROXY_PROTOCOL), listed(c, ID_FORWARDED));
    let trusted = (pp || fwd) && peer_addr!(ctx.skb.skb).is_some_and(|a| ident::trusted(&a));
    let mut id = 0;
    if trusted && pp {
        id |= ID_TRUSTED;
    }
    if trusted && fwd {
        id |= ID_FWD | ID_PER_REQUEST;
    }
    if listed(c, ID_API_KEY) {
        id |= ID_PER_REQUEST;
    }
    // SAFETY: a map value; verdicts of one socket run one at a time.
    unsafe {
        (*stream).peer_org = peer_org;
        (*stream).id = id;
        let (_, via) = (*stream).conn_org(c);
        (*stream).via = via;
    }
}

/// The connection's org changed (a trusted PROXY header, or sources that leave the peer
/// address out): its open-connection count moves there, and the new org's concurrency limit
/// is checked as for a new connection.
#[inline(always)]
fn move_conn(st: *mut SockState, c: &KernelConfig) {
    // SAFETY: valid map value; verdicts of one socket run one at a time.
    unsafe {
        let s = &raw mut (*st).stream;
        (*s).id &= !ID_CONN_DIRTY;
        let (to, via) = (*s).conn_org(c);
        (*s).via = via;
        let from = (*st).org;
        if to == from {
            return;
        }
        (*st).org = to;
        (*st).kind &= !SOCK_F_OVER_LIMIT;
        if (*st).open != 1 || (*st).org_epoch != c.org_epoch {
            return;
        }
        if let Some(conns) = ORG_CONNS.get_ptr_mut(from) {
            add_i64(conns, -1);
        }
        if connection_opened(to, c).is_some_and(|f| f & ORG_F_CONC_REJECT != 0) {
            (*st).kind |= SOCK_F_OVER_LIMIT;
        }
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
