//! `limiter_syn_gate` (XDP): the SYN gate of `concurrency_mode = "delay"` and of
//! `pace_over_quota`.

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use limiter_common::{ORG_F_CONC_DELAY, UNMAPPED_ORG, pace::pace_take};

use crate::{
    addr::org_of,
    atomic::{add, cas, load},
    days::day_counters,
    ident::trusted,
    maps::{API_PORTS, ORG_CONNS, ORG_LIMITS, ORG_PACE},
    quota::out_of_quota,
    shared::{config, today},
};

#[xdp]
pub fn limiter_syn_gate(ctx: XdpContext) -> u32 {
    try_syn_gate(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// Drops the SYN of a new connection to an API port from an org in delay mode that is at its
/// concurrency limit, or from a paced org out of its daily quota beyond its rate: the client's
/// TCP retries it a moment later, so the connection waits instead of failing. Everything else
/// passes (IPv4 with options and IPv6 with extension headers too).
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
    if org == UNMAPPED_ORG {
        return None;
    }
    let l = ORG_LIMITS.get(org)?;
    let delay = l.flags & ORG_F_CONC_DELAY != 0 && l.concurrent_connections != 0;
    // A trusted proxy's connections carry many orgs' requests: never held back for one.
    if (!delay && l.pace_rate == 0) || trusted(&addr) {
        return None;
    }
    let day = today(c);
    if delay && *ORG_CONNS.get(org)? >= l.concurrent_connections as i64 {
        let slot = day_counters(org, day)?;
        // SAFETY: valid map value.
        add(unsafe { &raw mut (*slot).delayed_syns }, 1);
        return Some(xdp_action::XDP_DROP);
    }
    if l.pace_rate == 0 {
        return None;
    }
    let slot = day_counters(org, day)?;
    if !out_of_quota(org, day, slot, l) || take_pace(org, l.pace_rate) {
        return None;
    }
    // SAFETY: valid map value.
    add(unsafe { &raw mut (*slot).paced_syns }, 1);
    Some(xdp_action::XDP_DROP)
}

/// Takes one of a paced org's new connections if its rate allows ([`pace_take`] on ORG_PACE).
/// Two CPUs racing for the last one may both get it; the rate is a pace, not a count.
#[inline(always)]
fn take_pace(org: u32, rate: u32) -> bool {
    let Some(due) = ORG_PACE.get_ptr_mut(org) else {
        return true;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let cur = load(due);
    match pace_take(cur, now, rate) {
        Some(next) => {
            let _ = cas(due, cur, next);
            true
        }
        None => false,
    }
}
