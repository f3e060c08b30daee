//! `limiter_refuse` (tail-called by the verdict, never attached): rewrites the refused request
//! into the 429 and sends it back out of the same socket.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_tai_ns, bpf_sk_redirect_hash, bpf_skb_change_tail,
        bpf_skb_store_bytes,
    },
    macros::stream_verdict,
    programs::SkBuffContext,
};
use limiter_common::{
    FAULT_REPLY, KernelConfig, OrgLimits, day,
    reply::{NAME_MAX, Policy, RefuseArgs, Reply, Scratch, Sink},
    stream::{F_REFUSED, S_CLOSED},
};

use crate::{
    maps::{API_SOCKS, ORG_LIMITS, SCRATCH},
    shared::{config, fault},
    sock_table::sock_state,
};

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
    let mut reply = reply_to(&args, c, l, scratch);
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
            if reply.policy() == Policy::BadRequest {
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

/// The 429 the verdict asked for, full and closing (keep-alive and the compact form depend on the
/// request's length).
#[inline(always)]
fn reply_to<'a>(
    args: &RefuseArgs,
    c: &KernelConfig,
    l: &'a OrgLimits,
    scratch: &mut Scratch,
) -> Reply<'a> {
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
    Reply::new(
        policy,
        &l.name,
        org_len,
        limit,
        day::seconds_until_next_day(now, c.day_len_ns),
        scratch,
    )
}
