//! `limiter_verdict` (stream verdict on API_SOCKS): classifies and counts each inbound request
//! before the application reads it, and hands refusals to `limiter_refuse`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use limiter_common::{
    DayCounters, EVENT_QUOTA_EXHAUSTED, FAULT_NO_SOCK_STATE, FAULT_PARSE, FAULT_REPLY,
    KernelConfig, ORG_F_ACTIVE, ORG_F_DRY_RUN, OrgLimits, SOCK_F_OVER_LIMIT, SockState,
    TRACE_O_COUNTED, TRACE_O_EXEMPT, TRACE_O_PASSED, TRACE_O_REFUSED, TRACE_O_UNPARSED,
    TRACE_R_BAD_REQUEST, TRACE_R_CLOSED, TRACE_R_CONCURRENCY, TRACE_R_DAILY, TRACE_R_FAULT,
    TRACE_R_NONE, TRACE_R_NOT_HTTP, UNMAPPED_ORG, day_index,
    reply::Policy,
    stream::{F_REFUSED, S_CLOSED, S_OPAQUE, Stream, Tally, WALK_SLOTS},
};

use crate::{
    addr::{org_of, peer_addr},
    atomic::{add, add_i64, cas, load},
    days::{Counter, count, day_counters},
    maps::{ORG_CONNS, ORG_LIMITS, ORG_REMOTE, REFUSE, SCRATCH, VERDICT_NEXT, WALK},
    shared::{config, emit, fault, forward, today},
    sock_table::sock_state,
    trace::{self, Traced, tracing},
    walk::walk_chunk,
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
    let walked = walk_chunk(ctx, c, stream, len);
    let d = match walked {
        Some(t) => {
            let sock = Sock { org, kind, stream };
            decide(c, &sock, &t, flags, from_boundary)
        }
        None => {
            // The stream cannot be followed past here: fail open.
            fault(FAULT_PARSE);
            Decision::pass(TRACE_O_UNPARSED, TRACE_R_FAULT)
        }
    };
    if tracing() {
        let traced = Traced {
            cookie,
            org,
            outcome: d.outcome,
            reason: d.reason,
            at_start: from_boundary,
        };
        trace::record(ctx, &traced, &walked.unwrap_or_default());
    }
    match d.action {
        Action::Pass => SK_PASS,
        Action::Drop => SK_DROP,
        Action::Refuse {
            policy,
            keep_alive_ok,
        } => refuse(ctx, cookie, org, policy, keep_alive_ok),
    }
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
}

/// Counts what the walk found in a chunk, and decides on it.
#[inline(always)]
fn decide(c: &KernelConfig, sock: &Sock, t: &Tally, flags: u8, from_boundary: bool) -> Decision {
    let org = sock.org;
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
    let Some(slot) = day_counters(org, day) else {
        return Decision::pass(TRACE_O_PASSED, TRACE_R_FAULT);
    };
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
    let (org, kind) = (sock.org, sock.kind);
    let limits = ORG_LIMITS.get(org);
    let n = t.counted as u64;
    // One refusal for every policy: the verifier walks the 429 path once, not per policy.
    let policy = if kind & SOCK_F_OVER_LIMIT != 0 && limits.is_some() && n > 0 {
        // SAFETY: valid map value.
        add(unsafe { &raw mut (*slot).concurrency_rejected }, 1);
        add(unsafe { &raw mut (*slot).rejected }, n);
        Policy::Concurrency
    } else {
        match daily_verdict(org, day, slot, limits, n) {
            Some(p) => p,
            None if t.broken => Policy::BadRequest,
            None => return Decision::pass(TRACE_O_COUNTED, TRACE_R_NONE),
        }
    };
    // A 429 may keep the connection only when the chunk was exactly one whole request.
    let keep_alive_ok = from_boundary
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
fn reattribute(ctx: &SkBuffContext, st: *mut SockState, c: &KernelConfig) {
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
