//! `limiter_push_msg` (sk_msg on PUSH_SOCKS): counts the requests the host pushes out to an org.

use aya_ebpf::{
    bindings::sk_action::SK_PASS, helpers::bpf_msg_pull_data, macros::sk_msg,
    programs::SkMsgContext,
};
use limiter_common::{UNMAPPED_ORG, http};

use crate::{
    addr::{org_of, peer_addr},
    days::{Counter, count},
    maps::PUSH_NEXT,
    shared::{config, forward},
};

#[sk_msg]
pub fn limiter_push_msg(ctx: SkMsgContext) -> u32 {
    forward(&ctx, &PUSH_NEXT);
    try_push_msg(&ctx);
    SK_PASS
}

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
