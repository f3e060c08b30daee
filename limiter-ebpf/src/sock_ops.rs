//! `limiter_sock_ops` (cgroup sock_ops): attributes inbound API connections to an org, counts
//! them, and puts them into API_SOCKS; marks outbound connections to an org's address as push
//! sockets.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering::SeqCst, atomic_xchg},
    mem::MaybeUninit,
};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use limiter_common::{
    AddrKey, DayCounters, EVENT_CONCURRENCY_BREACH, FAULT_BAD_ORG, FAULT_SOCK_STATE_FULL,
    FAULT_SOCKHASH_FULL, FAULT_UNMAPPED_UNTRACKED, ID_ADDRESS, ID_API_KEY, ID_FORWARDED,
    KernelConfig, ORG_F_CONC_REJECT, OrgLimits, SOCK_F_INBOUND, SOCK_F_INFLIGHT, SOCK_F_OVER_LIMIT,
    SockState, UNMAPPED_ORG, stream::listed,
};

use crate::{
    addr::{org_of, peer_addr},
    atomic::{add, add_i64, raise_to},
    days::day_counters,
    inflight::remember_cookie,
    maps::{API_PORTS, API_SOCKS, CONFIG, ORG_CONNS, ORG_LIMITS, PUSH_SOCKS},
    shared::{config, emit, fault, today},
    sock_table::{
        add_sock_state, release_sock_state, remove_sock_state, reserve_sock_state, sock_state,
    },
};

const TCP_ESTABLISHED: u32 = 1;

/// Makes `*p` a new inbound connection's state ([`SockState::FRESH`] with its org and the
/// config's generations), copied a word at a time (volatile, so that LLVM keeps the words).
///
/// # Safety
/// `p` is valid for writes and 8-aligned.
#[inline(always)]
unsafe fn fresh_state(p: *mut SockState, org: u32, c: &KernelConfig) {
    use core::ptr::write_volatile as put;
    const WORDS: usize = size_of::<SockState>() / 8;
    let from = &SockState::FRESH as *const SockState as *const u64;
    let to = p as *mut u64;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both are SockStates (no padding, 8-aligned) and `i` is within them.
        unsafe { put(to.add(i), *from.add(i)) };
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        put(&raw mut (*p).org, org);
        put(&raw mut (*p).addr_gen, c.addr_gen);
        put(&raw mut (*p).org_epoch, c.org_epoch);
    }
}

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn limiter_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

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
    // Without `address` among the sources, a connection is nobody's until it says otherwise.
    let org = if listed(c, ID_ADDRESS) {
        org_of(addr)
    } else {
        UNMAPPED_ORG
    };
    let cookie = cookie_of_ops(ctx);
    let mut fresh = MaybeUninit::<SockState>::uninit();
    // SAFETY: `fresh_state` writes every byte.
    let state = unsafe {
        fresh_state(fresh.as_mut_ptr(), org, c);
        fresh.assume_init_ref()
    };
    let added = if reserve_sock_state(org) {
        let st = add_sock_state(cookie, state);
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
            if per_request_possible(c, addr)
                // SAFETY: the socket sock_ops was called for (or null).
                && unsafe { remember_cookie((*ctx.ops).__bindgen_anon_2.sk, cookie) }
            {
                // SAFETY: as below.
                unsafe { (*st).kind |= SOCK_F_INFLIGHT };
            }
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

/// Whether requests on a connection from `addr` may be attributed one by one (by API key, or
/// by a trusted proxy's forwarded header): only then is its cookie left for the egress program,
/// which costs an allocation per connection.
#[inline(always)]
fn per_request_possible(c: &KernelConfig, addr: AddrKey) -> bool {
    listed(c, ID_API_KEY) || (listed(c, ID_FORWARDED) && crate::ident::trusted(&addr))
}

/// Counts a new connection; the org's `ORG_F_*` flags when it arrived while the org was at its
/// concurrency limit.
#[inline(always)]
pub(crate) fn connection_opened(org: u32, c: &KernelConfig) -> Option<u32> {
    let Some(conns) = ORG_CONNS.get_ptr_mut(org) else {
        fault(FAULT_BAD_ORG);
        return None;
    };
    let before = add_i64(conns, 1);
    let slot = day_counters(org, today(c))?;
    count_opened(org, before, 1, slot, ORG_LIMITS.get(org))
}

/// The peak and the breaches of `n` connections (or requests in flight) of `org` that came
/// when it had `before` open, in its day slot `slot`; the org's `ORG_F_*` flags when they
/// came at its concurrency limit (one breach for them all).
#[inline(always)]
pub(crate) fn count_opened(
    org: u32,
    before: i64,
    n: u64,
    slot: *mut DayCounters,
    limits: Option<&OrgLimits>,
) -> Option<u32> {
    let before = if before > 0 { before as u64 } else { 0 };
    // SAFETY: valid map value.
    unsafe { raise_to(&raw mut (*slot).peak_connections, before + n) };
    let l = limits?;
    let limit = l.concurrent_connections as u64;
    if org != UNMAPPED_ORG && limit > 0 && before >= limit {
        // SAFETY: valid map value.
        let (breaches, day) =
            unsafe { (add(&raw mut (*slot).concurrency_breaches, 1), (*slot).day) };
        // The daemon follows the count; an event (a ring buffer write and a wake-up) only at
        // the day's first breach and then at powers of two tells it which orgs to follow,
        // without one per request when requests in flight are the measure.
        if breaches & breaches.wrapping_sub(1) == 0 {
            emit(EVENT_CONCURRENCY_BREACH, org, breaches, day);
        }
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
        // Its requests in flight end with it.
        if kind & SOCK_F_INFLIGHT != 0 {
            crate::inflight::answered(st);
        }
        remove_sock_state(cookie);
    }
}
