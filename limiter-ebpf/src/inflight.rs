//! `limiter_api_msg` (sk_msg on API_SOCKS) and the in-flight count of requests attributed one by
//! one: behind a pooling proxy an org's concurrency is its requests in flight, not the proxy's
//! connections. A request counts in its org's ORG_CONNS from the end of its head until the
//! application's first bytes out on that connection (its answer has begun: the work the limit
//! protects is done) or the connection's close. Kept in INFLIGHT by [`ConnKey`]: sk_msg
//! programs may not ask for the socket cookie that keys the sockets' state.

use core::intrinsics::{AtomicOrdering::SeqCst, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use limiter_common::{
    ConnKey, DayCounters, FAULT_BAD_ORG, FAULT_SOCK_STATE_FULL, Inflight, ORG_F_CONC_REJECT,
    OrgLimits,
};

use crate::{
    atomic::add_i64,
    maps::{API_MSG_NEXT, INFLIGHT, ORG_CONNS},
    shared::{fault, forward},
    sock_ops::count_opened,
};

/// The [`ConnKey`] of a context (`bpf_sock_ops`, `__sk_buff`, `sk_msg_md`). The remote port
/// is network order in the low 16 bits, or shifted into the high ones, as kernels write it: both
/// read as the same key.
macro_rules! conn_key {
    ($ctx:expr) => {{
        let ctx = $ctx;
        $crate::addr::peer_addr!(ctx).map(|addr| {
            // SAFETY: `ctx` is the program's context pointer; plain u32 fields.
            let (rp, lp) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*ctx).remote_port),
                    core::ptr::read_volatile(&raw const (*ctx).local_port),
                )
            };
            limiter_common::ConnKey {
                addr,
                remote_port: if rp > 0xffff { rp >> 16 } else { rp },
                local_port: lp,
            }
        })
    }};
}
pub(crate) use conn_key;

#[sk_msg]
pub fn limiter_api_msg(ctx: SkMsgContext) -> u32 {
    forward(&ctx, &API_MSG_NEXT);
    if let Some(key) = conn_key!(ctx.msg) {
        answered(&key, false);
    }
    SK_PASS
}

/// The connection's requests in flight are answered (or, `closed`, it closed and its entry
/// goes): they leave ORG_CONNS.
#[inline(always)]
pub(crate) fn answered(key: &ConnKey, closed: bool) {
    let Some(f) = INFLIGHT.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: valid map value; `n` is only ever changed atomically.
    let n = unsafe {
        if core::ptr::read_volatile(&raw const (*f).n) == 0 {
            0
        } else {
            atomic_xchg::<u32, { SeqCst }>(&raw mut (*f).n, 0)
        }
    };
    // SAFETY: as above; only the verdict writes `org`, before it adds to `n`.
    let org = unsafe { (*f).org };
    if n > 0
        && let Some(conns) = ORG_CONNS.get_ptr_mut(org)
    {
        add_i64(conns, -(n as i64));
    }
    if closed {
        let _ = INFLIGHT.remove(key);
    }
}

/// `n` requests of `org` passed on this connection: in flight until answered. Counted like a
/// connection (peak, breach event) in the org's day slot `slot`, which the verdict just counted
/// them in.
#[inline(always)]
pub(crate) fn started(
    key: &ConnKey,
    org: u32,
    n: u32,
    slot: *mut DayCounters,
    limits: Option<&OrgLimits>,
) {
    if n == 0 {
        return;
    }
    let f = match INFLIGHT.get_ptr_mut(key) {
        Some(f) => f,
        None => {
            let _ = INFLIGHT.insert(key, &Inflight { n: 0, org }, BPF_NOEXIST as u64);
            let Some(f) = INFLIGHT.get_ptr_mut(key) else {
                // Full: the request is not counted in flight (fail open), and that is counted.
                fault(FAULT_SOCK_STATE_FULL);
                return;
            };
            f
        }
    };
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        fault(FAULT_BAD_ORG);
        return;
    };
    let before = add_i64(conns, n as i64);
    let _ = count_opened(org, before, n as u64, slot, limits);
    // SAFETY: valid map value; see `answered`.
    unsafe {
        (*f).org = org;
        atomic_xadd::<u32, u32, { SeqCst }>(&raw mut (*f).n, n);
    }
}

/// Whether `org` is at its concurrency limit in reject mode, by its requests in flight.
#[inline(always)]
pub(crate) fn over(org: u32, limits: Option<&OrgLimits>) -> bool {
    let Some(l) = limits else { return false };
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        return false;
    };
    // SAFETY: valid map value.
    let now = unsafe { core::ptr::read_volatile(conns) };
    l.flags & ORG_F_CONC_REJECT != 0
        && l.concurrent_connections > 0
        && now >= l.concurrent_connections as i64
}
