//! The verdict's trace records for `limiter trace`: written to TRACE only while TRACE_ON holds a
//! tracer's pid, so that nobody tracing costs the verdict one array read per chunk.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_tai_ns, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use limiter_common::{
    TRACE_BYTES, TRACE_HEAD, TRACE_LOST, TRACE_PID, TRACE_VIA_ADDRESS, TraceRecord, stream::Tally,
};

use crate::{
    atomic::add,
    maps::{TRACE, TRACE_ON},
};

/// Whether a tracer is reading TRACE.
#[inline(always)]
pub(crate) fn tracing() -> bool {
    TRACE_ON.get(TRACE_PID).is_some_and(|pid| *pid != 0)
}

/// What the verdict decided for one chunk, as the trace shows it.
pub(crate) struct Traced {
    pub cookie: u64,
    pub org: u32,
    pub outcome: u8,
    pub reason: u8,
    /// The chunk begins at a request boundary: its first bytes are a request line.
    pub at_start: bool,
}

/// Writes one record (a full TRACE counts it as lost). A function of its own: the verifier
/// walks it once, whatever the decision that leads to it.
#[inline(never)]
pub(crate) fn record(ctx: &SkBuffContext, d: &Traced, t: &Tally) {
    let Some(mut entry) = TRACE.reserve::<TraceRecord>(0) else {
        if let Some(lost) = TRACE_ON.get_ptr_mut(TRACE_LOST) {
            add(lost, 1);
        }
        return;
    };
    let r = entry.as_mut_ptr();
    let len = ctx.len();
    // SAFETY: `r` is the reserved record, ours until submitted. Field by field (volatile): a
    // struct store becomes a byte-at-a-time memset.
    unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*r).time_ns, bpf_ktime_get_tai_ns());
        put(&raw mut (*r).cookie, d.cookie);
        put(&raw mut (*r).org, d.org);
        put(&raw mut (*r).len, len);
        put(&raw mut (*r).counted, t.counted);
        put(&raw mut (*r).media, t.media);
        put(&raw mut (*r).starts, t.starts);
        put(&raw mut (*r).outcome, d.outcome);
        put(&raw mut (*r).reason, d.reason);
        put(&raw mut (*r).via, TRACE_VIA_ADDRESS);
        put(&raw mut (*r).head_len, 0);
    }
    if d.at_start && len > 0 {
        let head = TRACE_HEAD as u32;
        // A constant length, or one the verifier sees as 1 <= len < TRACE_HEAD.
        let n = if len >= head { head } else { len };
        // SAFETY: `head` holds TRACE_HEAD >= n bytes of the reserved record.
        let ok = unsafe {
            if len >= head {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const c_void,
                    0,
                    (&raw mut (*r).head) as *mut c_void,
                    head,
                )
            } else {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const c_void,
                    0,
                    (&raw mut (*r).head) as *mut c_void,
                    len,
                )
            }
        } == 0;
        if ok {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&raw mut (*r).head_len, n) };
        }
    }
    // Waking the reader on every record costs the verdict more than the record itself: it is
    // woken once the buffer is a quarter full, and reads on its own timer otherwise.
    let wake = if TRACE.query(BPF_RB_AVAIL_DATA as u64) >= TRACE_WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}

/// Unread bytes in TRACE past which a record wakes the tracer.
const TRACE_WAKE_BYTES: u64 = TRACE_BYTES as u64 / 4;
