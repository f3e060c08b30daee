//! `limiter_api_msg` (sk_msg on API_SOCKS) and the in-flight count of requests attributed one by
//! one: behind a pooling proxy an org's concurrency is its requests in flight, not the proxy's
//! connections. A request counts in its org's ORG_CONNS from the end of its head until the
//! application's first bytes out on that connection (its answer has begun: the work the limit
//! protects is done) or the connection's close. Kept in the socket's own state
//! (`SockState::inflight`), which the verdict holds already; the egress program, which may not
//! ask for the socket cookie, finds it through the cookie sock_ops left in the socket's INFLIGHT
//! storage. (A hash of connections, looked up on both sides, cost a keyed request more than
//! 200 ns, most of it cache misses.)

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering::SeqCst, atomic_xchg},
};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock, sk_action::SK_PASS},
    helpers::generated::bpf_sk_storage_get,
    macros::sk_msg,
    programs::SkMsgContext,
};
use limiter_common::{
    DayCounters, FAULT_BAD_ORG, ORG_F_CONC_REJECT, OrgLimits, SockState, inflight_parts,
    inflight_word,
};

use crate::{
    atomic::{add_i64, cas, load},
    maps::{API_MSG_NEXT, INFLIGHT, ORG_CONNS},
    shared::{fault, forward},
    sock_ops::count_opened,
    sock_table::sock_state,
};

#[sk_msg]
pub fn limiter_api_msg(ctx: SkMsgContext) -> u32 {
    forward(&ctx, &API_MSG_NEXT);
    try_api_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_api_msg(ctx: &SkMsgContext) {
    // SAFETY: the program's context; `sk` is the socket the message is sent on.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    // SAFETY: a lookup of the socket's storage, never created here.
    let cookie = unsafe { storage(sk, core::ptr::null_mut(), 0) };
    if cookie.is_null() {
        return;
    }
    // SAFETY: the storage's value, a u64.
    if let Some(st) = sock_state(unsafe { *cookie }) {
        answered(st);
    }
}

/// The socket's INFLIGHT storage (its cookie), made from `init` with `flags`
/// `BPF_SK_STORAGE_GET_F_CREATE`; null when it has none.
///
/// # Safety
/// `sk` is a socket pointer the program's context gave, or null.
#[inline(always)]
unsafe fn storage(sk: *mut bpf_sock, init: *mut u64, flags: u64) -> *mut u64 {
    // SAFETY: see above; INFLIGHT is a socket storage map of u64 values.
    unsafe {
        bpf_sk_storage_get(
            &INFLIGHT as *const _ as *mut c_void,
            sk as *mut c_void,
            init as *mut c_void,
            flags,
        ) as *mut u64
    }
}

/// Leaves `cookie` in the socket's INFLIGHT storage (sock_ops, at the connection's start):
/// false when the kernel had no room for it.
///
/// # Safety
/// As for [`storage`].
#[inline(always)]
pub(crate) unsafe fn remember_cookie(sk: *mut bpf_sock, cookie: u64) -> bool {
    if sk.is_null() {
        return false;
    }
    let mut init = cookie;
    // SAFETY: as above.
    !unsafe { storage(sk, &mut init, BPF_SK_STORAGE_GET_F_CREATE as u64) }.is_null()
}

/// The connection's requests in flight are answered (or it closed): they leave ORG_CONNS.
#[inline(always)]
pub(crate) fn answered(st: *mut SockState) {
    // SAFETY: valid map value; `inflight` is only ever changed atomically.
    let p = unsafe { &raw mut (*st).inflight };
    if load(p) == 0 {
        return;
    }
    // SAFETY: as above.
    settle(unsafe { atomic_xchg::<u64, { SeqCst }>(p, 0) });
}

/// Takes the requests of an [`inflight_word`] out of their org's ORG_CONNS.
#[inline(always)]
fn settle(w: u64) {
    let (org, n) = inflight_parts(w);
    if n > 0
        && let Some(conns) = ORG_CONNS.get_ptr_mut(org)
    {
        add_i64(conns, -(n as i64));
    }
}

/// `n` requests of `org` passed on the connection whose state is `st`: in flight until
/// answered. Counted like a connection (peak, breach event) in the org's day slot `slot`, which
/// the verdict just counted them in.
#[inline(always)]
pub(crate) fn started(
    st: *mut SockState,
    org: u32,
    n: u32,
    slot: *mut DayCounters,
    limits: Option<&OrgLimits>,
) {
    if n == 0 {
        return;
    }
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        fault(FAULT_BAD_ORG);
        return;
    };
    let before = add_i64(conns, n as i64);
    let _ = count_opened(org, before, n as u64, slot, limits);
    // SAFETY: valid map value; see `answered`.
    let p = unsafe { &raw mut (*st).inflight };
    // Only the egress program changes the word meanwhile, and only to 0: a second try always
    // succeeds.
    let mut old = load(p);
    let mut i = 0;
    while i < 2 {
        let (o, k) = inflight_parts(old);
        let kept = if o == org { k } else { 0 };
        match cas(p, old, inflight_word(org, kept + n)) {
            Ok(()) => {
                // Another org's requests still in flight (a proxy that pipelined two orgs'
                // requests) leave its count now rather than be taken from this org's later.
                if o != org {
                    settle(old);
                }
                return;
            }
            Err(now) => old = now,
        }
        i += 1;
    }
}

/// Whether `org` is at its concurrency limit in reject mode, by its requests in flight.
#[inline(always)]
pub(crate) fn over(org: u32, limits: Option<&OrgLimits>) -> bool {
    let Some(l) = limits else { return false };
    // The count is read only for an org in reject mode: it is a line the other CPUs write at
    // every request, and a read of it costs a miss.
    if l.flags & ORG_F_CONC_REJECT == 0 || l.concurrent_connections == 0 {
        return false;
    }
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        return false;
    };
    // SAFETY: valid map value.
    unsafe { core::ptr::read_volatile(conns) >= l.concurrent_connections as i64 }
}
