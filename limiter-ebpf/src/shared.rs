//! What every program uses: the config, today's day number, fault counters and events, and the
//! hand-off to the current daemon start's programs.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_tai_ns},
    maps::ProgramArray,
};
use limiter_common::{
    CONFIG_F_READY, Event, FAULT_EVENTS_FULL, KernelConfig,
    day::{self, DayCache},
};

use crate::{
    atomic::add,
    maps::{CONFIG, EVENTS, FAULTS, GENERATION, SOCK_GEN, TODAY},
};

#[inline(always)]
pub(crate) fn config() -> Option<&'static KernelConfig> {
    let c = CONFIG.get(0)?;
    (c.flags & CONFIG_F_READY != 0).then_some(c)
}

/// Today's day number per the kernel clock and the daemon's offset: this CPU's last reading
/// while it holds (see `DayCache`), else CLOCK_TAI read afresh.
#[inline(always)]
pub(crate) fn today(c: &KernelConfig) -> u64 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cache = TODAY.get_ptr_mut(0);
    if let Some(p) = cache {
        // SAFETY: this CPU's map value; see `DayCache::seq`.
        let (seq, cached, again) = unsafe {
            let seq = read_volatile(&raw const (*p).seq);
            let cached = read_volatile(p);
            (seq, cached, read_volatile(&raw const (*p).seq))
        };
        if seq & 1 == 0
            && seq == again
            && let Some(day) = cached.get(now, c.clock_offset_ns, c.day_len_ns)
        {
            return day;
        }
    }
    // SAFETY: a helper without arguments.
    let tai = unsafe { bpf_ktime_get_tai_ns() };
    let fresh = DayCache::reading(
        now,
        day::limiter_time(tai, c.clock_offset_ns),
        c.clock_offset_ns,
        c.day_len_ns,
    );
    if let Some(p) = cache {
        // SAFETY: as above; `seq` odd while the fields change.
        unsafe {
            let seq = &raw mut (*p).seq;
            write_volatile(seq, read_volatile(seq).wrapping_add(1));
            write_volatile(&raw mut (*p).until, fresh.until);
            write_volatile(&raw mut (*p).day, fresh.day);
            write_volatile(&raw mut (*p).offset_ns, fresh.offset_ns);
            write_volatile(&raw mut (*p).day_len_ns, fresh.day_len_ns);
            write_volatile(seq, read_volatile(seq).wrapping_add(1));
        }
    }
    fresh.day
}

#[inline(always)]
pub(crate) fn fault(kind: u32) {
    if let Some(p) = FAULTS.get_ptr_mut(kind) {
        add(p, 1);
    }
}

#[inline(always)]
pub(crate) fn emit(kind: u32, org: u32, value: u64, day: u64) {
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

/// A socket keeps the programs of the map it entered for life; when those are an earlier daemon
/// start's, this hands the chunk to the current program (a tail call that does not return),
/// whose maps the daemon reads. An empty slot or a failed call runs this program as before.
#[inline(always)]
pub(crate) fn forward<C: EbpfContext>(ctx: &C, next: &ProgramArray) {
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
