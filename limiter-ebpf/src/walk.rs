//! The verdict's walk of a chunk: a `bpf_loop` of [`Stream::step`]s over windows of the skb.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_loop, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use limiter_common::{
    AddrKey, ID_SOURCES, KernelConfig,
    ident::{self, CAP, PROXY_V1_MAX, ProxySource, ProxyStart, V1Text},
    stream::{
        ID_CONN_DIRTY, ID_OPEN, ID_PER_REQUEST, ID_PROXY_OK, ID_TRUSTED, R_ENDED, S_BODY, S_CLOSED,
        S_FWD, S_KEY, S_NAME, STREAM_CORE_WORDS, Stream, StreamRules, Tally, WALK_SLOTS, WIN,
        WalkSlot, config_fwd_name, config_key_name, media_match_index,
    },
};

use crate::{
    addr::org_of,
    ident as trust,
    maps::{API_KEYS, MEDIA_MATCH, WALK, WALK_STREAM},
};

/// What the verdict's `bpf_loop` hands each iteration: pointers only (the same every iteration);
/// everything that changes lives in map memory, where the verifier does not follow values.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    cfg: *const KernelConfig,
    slot: *mut WalkSlot,
    stream: *mut Stream,
}

/// The first window of a chunk longer than [`WIN`].
const FIRST_WIN: usize = 256;

/// One `bpf_loop` iteration: one [`Stream::step`].
#[inline(never)]
extern "C" fn walk_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the verdict's `Walk`, on its stack for the whole loop; its pointers are
    // map values (this CPU's walk slot, the socket's stream, CONFIG) and the program's context.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    try_walk_step(w.skb, slot, stream, cfg, ctx)
}

/// [`Stream::attribute`], in a `bpf_loop` of its own (see there).
#[inline(never)]
extern "C" fn attribute_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: as in `walk_step`.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    let rules = KernelRules {
        all: 0,
        key_len: 0,
        cfg,
    };
    stream.attribute(&rules, &mut slot.tally);
    1
}

/// Bytes of an API key header's value ([`Stream::key_run`]), from the window where the walk
/// stands, until its LF or the window's end.
#[inline(never)]
extern "C" fn key_step(_i: u64, ctx: *mut c_void) -> i64 {
    let Some((slot, stream, cfg, at)) = inner(ctx, S_KEY) else {
        return 1;
    };
    slot.used += stream.key_run(
        &slot.win,
        at,
        slot.win_n as usize,
        &key_rules(cfg),
        &mut slot.tally,
    );
    0
}

/// Bytes of a forwarded header's value ([`Stream::fwd_byte`]), one a turn, until its LF or the
/// window's end: a loop of its own, whose address temporaries stay off the key's frame.
#[inline(never)]
extern "C" fn fwd_step(_i: u64, ctx: *mut c_void) -> i64 {
    let Some((slot, stream, cfg, at)) = inner(ctx, S_FWD) else {
        return 1;
    };
    stream.fwd_byte(slot.win[at & (WIN - 1)], &key_rules(cfg));
    slot.used += 1;
    0
}

/// Bytes of a header name that may matter ([`Stream::name_run`]: eight at a time), from the
/// window where the walk stands, until the name is settled or the window ends: a name in one
/// turn of the walk.
#[inline(never)]
extern "C" fn name_step(_i: u64, ctx: *mut c_void) -> i64 {
    let Some((slot, stream, cfg, at)) = inner(ctx, S_NAME) else {
        return 1;
    };
    slot.used += stream.name_run(
        &slot.win,
        at,
        slot.win_n as usize,
        &key_rules(cfg),
        &mut slot.tally,
    );
    0
}

/// An inner loop's turn (`key_step`, `fwd_step`, `name_step`): the walk slot, stream and config
/// of the loop's context, and where the loop stands in the window; None once the stream has
/// left `state`, or past the chunk or the window (the loop ends).
#[inline(always)]
fn inner<'a>(
    ctx: *mut c_void,
    state: u8,
) -> Option<(&'a mut WalkSlot, &'a mut Stream, &'a KernelConfig, usize)> {
    // SAFETY: as in `walk_step`.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    if stream.state != state {
        return None;
    }
    let at = inner_at(slot)?;
    Some((slot, stream, cfg, at))
}

/// Where an inner loop stands in the window: None past the chunk or the window.
#[inline(always)]
fn inner_at(slot: &WalkSlot) -> Option<usize> {
    let pos = slot.pos + slot.used;
    (pos < slot.len && pos < slot.win_off + slot.win_n).then(|| (pos - slot.win_off) as usize)
}

/// The rules of the inner loops: the key header's length, no media prefixes.
#[inline(always)]
fn key_rules(cfg: &KernelConfig) -> KernelRules<'_> {
    KernelRules {
        all: 0,
        key_len: cfg.key_header_len as usize,
        cfg,
    }
}

/// Runs an inner loop (`callback`, at most `turns` turns) from where the walk stands, and moves
/// the walk past what it took; 1 (the walk ends) when it took nothing.
#[inline(always)]
fn inner_loop(w: &mut WalkSlot, turns: usize, callback: *const (), ctx: *mut c_void) -> i64 {
    use core::ptr::{read_volatile as get, write_volatile as put};
    // The callback reaches the slot through `ctx`, not through `w`: what it reads and writes
    // goes through memory on both sides of the loop (volatile), or the compiler, taking `w` for
    // the slot's only reference, would move a store to `w.pos` past the next loop.
    // SAFETY: fields of the slot.
    unsafe { put(&raw mut w.used, 0) };
    // SAFETY: `callback` is a static callback of this program; `ctx` outlives the loop.
    unsafe { bpf_loop(turns as u32, callback as *mut c_void, ctx, 0) };
    // SAFETY: as above.
    let used = unsafe { get(&raw const w.used) };
    if used == 0 {
        return 1;
    }
    // SAFETY: as above.
    unsafe { put(&raw mut w.pos, get(&raw const w.pos) + used) };
    past_end(w)
}

/// 1 (the walk ends) once the chunk is consumed: a head that ended there is attributed after
/// the loop, so no turn is spent finding the end.
#[inline(always)]
fn past_end(w: &WalkSlot) -> i64 {
    if w.pos >= w.len { 1 } else { 0 }
}

#[inline(always)]
fn try_walk_step(
    skb: *mut __sk_buff,
    w: &mut WalkSlot,
    stream: &mut Stream,
    cfg: &KernelConfig,
    ctx: *mut c_void,
) -> i64 {
    if stream.req & R_ENDED != 0 {
        // SAFETY: a static callback of this program; `ctx` outlives the loop.
        unsafe { bpf_loop(1, attribute_step as *const () as *mut c_void, ctx, 0) };
        // Another turn for the bytes (the loop has one per byte and one per head).
        return 0;
    }
    if w.pos >= w.len {
        return 1;
    }
    if stream.needs_bytes() && !(w.pos >= w.win_off && w.pos < w.win_off + w.win_n) {
        // Always a whole window, so the load's length is a constant: a length that followed
        // `pos` would make the verifier track `pos`. (Chunks shorter than a window are loaded
        // whole before the loop.) A long chunk's first window is a short one: its head is
        // most often all the walk reads of it (a body is skipped unread).
        let first = w.win_n == 0;
        let win = if first { FIRST_WIN } else { WIN } as u64;
        if w.len < win {
            w.failed = 1;
            return 1;
        }
        let off = if w.pos + win <= w.len {
            w.pos
        } else {
            w.len - win
        };
        let to = w.win.as_mut_ptr() as *mut c_void;
        // SAFETY: `w.win` holds WIN_BUF >= WIN > FIRST_WIN bytes, and off + win <= len.
        let loaded = unsafe {
            if first {
                bpf_skb_load_bytes(skb as *const c_void, off as u32, to, FIRST_WIN as u32)
            } else {
                bpf_skb_load_bytes(skb as *const c_void, off as u32, to, WIN as u32)
            }
        };
        if loaded != 0 {
            w.failed = 1;
            return 1;
        }
        w.win_off = off;
        w.win_n = win;
    }
    let at = (w.pos - w.win_off) as usize;
    if stream.state == S_NAME {
        // A header name, in a loop of its own.
        return inner_loop(w, NAME_MAX, name_step as *const (), ctx);
    }
    if stream.state == S_KEY {
        // An API key, in a loop of its own.
        return inner_loop(w, WIN, key_step as *const (), ctx);
    }
    if stream.state == S_FWD {
        // A forwarded header's value, in another.
        return inner_loop(w, WIN, fwd_step as *const (), ctx);
    }
    let count = cfg.media_prefix_count;
    let all = if count >= 8 {
        0xff
    } else {
        ((1u32 << count) - 1) as u8
    };
    let key_len = if stream.id & ID_PER_REQUEST != 0 {
        cfg.key_header_len as usize
    } else {
        0
    };
    let rules = KernelRules { all, key_len, cfg };
    let used = stream.step(
        &w.win,
        at & (WIN - 1),
        w.win_n as usize,
        w.len - w.pos,
        &rules,
        &mut w.tally,
    );
    if used == 0 {
        return 1;
    }
    w.pos += used;
    past_end(w)
}

/// Makes `*p` an empty tally of the connection's org and source, in place and field by field
/// (volatile): a struct literal became a call to a byte-at-a-time `memset` on every chunk (the
/// verdict's tally, and the walk slot's).
///
/// # Safety
/// `p` is valid for writes.
#[inline(always)]
unsafe fn empty_tally(p: *mut Tally, org: u32, via: u8) {
    use core::ptr::write_volatile as put;
    // SAFETY: `p` is valid for writes (the caller's promise).
    unsafe {
        put(&raw mut (*p).counted, 0);
        put(&raw mut (*p).media, 0);
        put(&raw mut (*p).starts, 0);
        put(&raw mut (*p).org, org);
        put(&raw mut (*p).via, via);
        put(&raw mut (*p).head_method, false);
        put(&raw mut (*p).opaque, false);
        put(&raw mut (*p).broken, false);
        put(&raw mut (*p).attributed, false);
        put(&raw mut (*p)._pad[0], 0);
        put(&raw mut (*p)._pad[1], 0);
        put(&raw mut (*p)._pad[2], 0);
        put(&raw mut (*p).unknown_keys, 0);
        put(&raw mut (*p).scan, 0);
    }
}

/// The media prefixes through MEDIA_MATCH, API keys through API_KEYS.
struct KernelRules<'a> {
    /// The configured prefixes' bits.
    all: u8,
    /// The key header's length when keys are read on this connection, else 0.
    key_len: usize,
    cfg: &'a KernelConfig,
}

impl StreamRules for KernelRules<'_> {
    #[inline(always)]
    fn all(&self) -> u8 {
        self.all
    }

    #[inline(always)]
    fn key_name(&self, pos: usize) -> u8 {
        config_key_name(self.cfg, pos)
    }

    #[inline(always)]
    fn key_name_len(&self) -> usize {
        self.key_len
    }

    #[inline(always)]
    fn line_first(&self, b: u8) -> u8 {
        self.cfg.line_first[b as usize]
    }

    #[inline(always)]
    fn fwd_name(&self, pos: usize) -> u8 {
        config_fwd_name(self.cfg, pos)
    }

    #[inline(always)]
    fn key_name_word(&self, pos: usize) -> u64 {
        self.cfg.key_words[pos & (limiter_common::HEADER_NAME_MAX - 1)]
    }

    #[inline(always)]
    fn fwd_name_word(&self, pos: usize) -> u64 {
        self.cfg.fwd_words[pos & (limiter_common::HEADER_NAME_MAX - 1)]
    }

    /// The daemon names the forwarded header only when `forwarded` is a source.
    #[inline(always)]
    fn fwd_name_len(&self) -> usize {
        self.cfg.fwd_header_len as usize
    }

    #[inline(always)]
    fn fwd_kind(&self) -> u8 {
        self.cfg.forwarded_kind
    }

    #[inline(always)]
    fn trusted(&self, a: &AddrKey) -> bool {
        trust::trusted(a)
    }

    #[inline(always)]
    fn addr_org(&self, a: &AddrKey) -> u32 {
        org_of(*a)
    }

    #[inline(always)]
    fn key_kind(&self) -> u8 {
        self.cfg.key_kind
    }

    #[inline(always)]
    fn key_secret(&self) -> [u64; 2] {
        self.cfg.key_secret
    }

    #[inline(always)]
    fn key_org(&self, digest: u64) -> Option<u32> {
        // SAFETY: a map lookup; the value is read at once.
        unsafe { API_KEYS.get(&digest) }.copied()
    }

    #[inline(always)]
    fn identify_by(&self) -> [u8; ID_SOURCES] {
        self.cfg.identify_by
    }

    #[inline(always)]
    fn matching(&self, pos: u8, c: u8) -> u8 {
        MEDIA_MATCH
            .get(media_match_index(pos, c))
            .copied()
            .unwrap_or(0)
    }
}

/// The connection's first chunk, before its walk: see [`proxy_header`].
#[inline(never)]
extern "C" fn open_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: as in `walk_step`.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    if !proxy_header(w.skb, cfg, stream, slot) {
        slot.failed = 1;
    }
    1
}

/// A connection's first chunk: a PROXY header at its start is skipped (the application that
/// expects it reads it), and from a trusted proxy its source becomes the connection's
/// `proxy_protocol` address. False when the chunk could not be read.
#[inline(always)]
fn proxy_header(skb: *mut __sk_buff, c: &KernelConfig, s: &mut Stream, w: &mut WalkSlot) -> bool {
    let len = w.len;
    s.id |= ID_OPEN;
    let cap = CAP as u64;
    let loaded = if len < cap {
        let short = len as u32;
        if short == 0 {
            return true;
        }
        // SAFETY: `first` holds CAP > len bytes; the verifier sees 1 <= len < CAP.
        unsafe {
            bpf_skb_load_bytes(
                skb as *const c_void,
                0,
                w.first.as_mut_ptr() as *mut c_void,
                short,
            )
        }
    } else {
        // SAFETY: `first` holds CAP bytes, and the chunk at least as many.
        unsafe {
            bpf_skb_load_bytes(
                skb as *const c_void,
                0,
                w.first.as_mut_ptr() as *mut c_void,
                CAP as u32,
            )
        }
    };
    if loaded != 0 {
        return false;
    }
    let n = if len < cap { len } else { cap } as usize;
    let (skip, source) = match ident::proxy_start(&w.first, n) {
        ProxyStart::NotProxy | ProxyStart::NeedMore => return true,
        ProxyStart::V2 => {
            let total = if n >= 16 {
                ident::proxy_v2_len(&w.first)
            } else {
                usize::MAX
            };
            if total as u64 > len {
                // Cut across segments: not followed as a header, so the stream is broken
                // (a 400 and the connection closed) rather than left unread.
                return broken(s, w);
            }
            let have = if total < CAP { total } else { CAP };
            (total, ident::proxy_v2_source(&w.first, have))
        }
        ProxyStart::V1 => {
            // Read by the walk next, in loops of its own beside this one (nested here, the
            // call chain's stacks passed the verifier's 512 bytes): `v1_step` a byte at a
            // time, then `v1_end`.
            w.v1 = V1Text::new();
            w.v1_n = n as u64;
            return true;
        }
    };
    proxy_source(c, s, w, skip, source)
}

/// The PROXY v1 line read by `v1_step`: skipped, and believed as [`proxy_header`] says.
#[inline(never)]
extern "C" fn v1_end(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: as in `walk_step`.
    let w = unsafe { &*(ctx as *const Walk) };
    let (slot, stream, cfg) = unsafe { (&mut *w.slot, &mut *w.stream, &*w.cfg) };
    let line = slot.v1.len as usize;
    if line == 0 || slot.first[(line - 1) & (CAP - 1)] != b'\n' {
        broken(stream, slot);
        return 1;
    }
    let source = slot.v1.finish();
    proxy_source(cfg, stream, slot, line, source);
    1
}

/// A PROXY header of `skip` bytes naming `source`: skipped, and from a trusted proxy believed.
#[inline(always)]
fn proxy_source(
    c: &KernelConfig,
    s: &mut Stream,
    w: &mut WalkSlot,
    skip: usize,
    source: ProxySource,
) -> bool {
    if matches!(source, ProxySource::Bad) {
        return broken(s, w);
    }
    s.state = S_BODY;
    s.remaining = skip as u64;
    match source {
        ProxySource::Addr(a) if s.id & ID_TRUSTED != 0 => {
            s.proxy_addr = a;
            s.proxy_org = org_of(a);
            s.id |= ID_PROXY_OK | ID_CONN_DIRTY;
            let (org, via) = s.conn_org(c);
            s.via = via;
            w.tally.org = org;
            w.tally.via = via;
        }
        _ => {}
    }
    true
}

/// A PROXY header the server would not take: nothing more of the connection is followed, and
/// it is closed with a 400.
#[inline(always)]
fn broken(s: &mut Stream, w: &mut WalkSlot) -> bool {
    s.state = S_CLOSED;
    w.tally.broken = true;
    true
}

/// One byte of a PROXY v1 line, up to its LF.
#[inline(never)]
extern "C" fn v1_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: as in `walk_step`.
    let w = unsafe { &mut *(*(ctx as *const Walk)).slot };
    if i >= w.v1_n {
        return 1;
    }
    let b = w.first[i as usize & (CAP - 1)];
    w.v1.push(b);
    if b == b'\n' { 1 } else { 0 }
}

/// Most header-name bytes `name_step` looks at in one turn of the walk (the names that matter
/// are shorter).
const NAME_MAX: usize = limiter_common::HEADER_NAME_MAX + 1;

/// Most `bpf_loop` iterations per chunk (each consumes at least a byte).
const WALK_MAX: u64 = 1 << 23;

/// Runs `f` with this CPU's free walk slot and its spare stream (a verdict that interrupts
/// another on this CPU takes the next); None when none is free.
#[inline(always)]
pub(crate) fn with_walk_slot<R>(f: impl FnOnce(*mut WalkSlot, *mut Stream) -> R) -> Option<R> {
    let top = WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot 0. A verdict that interrupts this one runs to its end before this
    // one goes on, so a plain read and write of the depth cannot interleave with another.
    let depth = unsafe { (*top).depth };
    if depth >= WALK_SLOTS as u64 {
        return None;
    }
    let slot = WALK.get_ptr_mut(depth as u32)?;
    let stream = WALK_STREAM.get_ptr_mut(depth as u32)?;
    // SAFETY: as above.
    unsafe { (*top).depth = depth + 1 };
    let r = f(slot, stream);
    // SAFETY: as above.
    unsafe { (*top).depth = depth };
    Some(r)
}

/// Copies a socket's stream between its state and a walk slot, a word at a time (volatile: a
/// plain struct copy becomes a `memcpy` call): the parser's state, and the identification state
/// only when it holds something ([`Stream::identifying`] of `src`).
///
/// # Safety
/// Both are valid map values.
#[inline(always)]
pub(crate) unsafe fn copy_stream(dst: *mut Stream, src: *const Stream) {
    const WORDS: usize = core::mem::size_of::<Stream>() / 8;
    let (d, s) = (dst as *mut u64, src as *const u64);
    // SAFETY: `Stream` is 8-aligned and a whole number of words (asserted in limiter-common);
    // both pointers are valid for its size (the caller's promise).
    unsafe {
        copy_words::<0, STREAM_CORE_WORDS>(d, s);
        if (*src).identifying() {
            copy_words::<STREAM_CORE_WORDS, WORDS>(d, s);
        }
    }
}

/// Words `FROM..TO` of `s` to `d`, unrolled (constant bounds).
///
/// # Safety
/// Both are valid for `TO` words.
#[inline(always)]
unsafe fn copy_words<const FROM: usize, const TO: usize>(d: *mut u64, s: *const u64) {
    let mut i = FROM;
    while i < TO {
        // SAFETY: i < TO (the caller's promise).
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Feeds the chunk to `stream` in walk slot `slot`, and says what it held in the slot's tally
/// (which starts with the connection's `org` and source `via`). False when it could not be
/// followed to its end (a fault; the chunk passes).
///
/// `stream` is in a socket's slot (SOCK_SLOTS) or the walk slot's spare (WALK_STREAM, where the
/// verdict copies any other): the verifier walks the parser once for each of the two.
#[inline(always)]
pub(crate) fn walk_chunk(
    ctx: &SkBuffContext,
    c: &KernelConfig,
    slot: *mut WalkSlot,
    stream: *mut Stream,
    len: u64,
    org: u32,
    via: u8,
) -> bool {
    // SAFETY: this CPU's walk slot, ours until `with_walk_slot` gives it back. Volatile stores, field
    // by field: LLVM turns plain ones into a call to a byte-at-a-time memset.
    let w = unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*slot).pos, 0);
        put(&raw mut (*slot).len, len);
        put(&raw mut (*slot).win_off, 0);
        put(&raw mut (*slot).win_n, 0);
        put(&raw mut (*slot).failed, 0);
        put(&raw mut (*slot).v1_n, 0);
        empty_tally(&raw mut (*slot).tally, org, via);
        &mut *slot
    };
    if len < WIN as u64 {
        // SAFETY: `w.win` holds WIN_BUF > len bytes; the verifier sees 1 <= len < WIN.
        if unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                0,
                w.win.as_mut_ptr() as *mut c_void,
                len as u32,
            )
        } != 0
        {
            return false;
        }
        w.win_n = len;
    }
    let mut walk = Walk {
        skb: ctx.skb.skb,
        cfg: c as *const KernelConfig,
        slot,
        stream,
    };
    // A turn per byte, and one per head for its attribution (a head has two bytes at least).
    let turns = len + len / 2 + 2;
    let loops = if turns < WALK_MAX { turns } else { WALK_MAX };
    // SAFETY: a map value; verdicts of one socket run one at a time.
    if unsafe { (*stream).id } & ID_OPEN == 0 {
        // In a callback of its own: what it finds goes to map memory, so the verifier does not
        // walk the rest of the verdict once per way it ends.
        // SAFETY: `open_step` is a static function of this program; `walk` outlives the loop.
        unsafe {
            bpf_loop(
                1,
                open_step as *const () as *mut c_void,
                &mut walk as *mut Walk as *mut c_void,
                0,
            )
        };
        if w.v1_n != 0 {
            // SAFETY: static callbacks of this program; `walk` outlives the loops.
            unsafe {
                bpf_loop(
                    PROXY_V1_MAX as u32,
                    v1_step as *const () as *mut c_void,
                    &mut walk as *mut Walk as *mut c_void,
                    0,
                );
                bpf_loop(
                    1,
                    v1_end as *const () as *mut c_void,
                    &mut walk as *mut Walk as *mut c_void,
                    0,
                );
            }
            w.v1_n = 0;
        }
        if w.failed != 0 {
            return false;
        }
    }
    // SAFETY: `walk_step` is a static function of this program; `walk` outlives the loop.
    unsafe {
        bpf_loop(
            loops as u32,
            walk_step as *const () as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        )
    };
    // SAFETY: as above.
    if unsafe { (*stream).req } & R_ENDED != 0 {
        // The chunk's last step ended a head.
        // SAFETY: as above.
        unsafe {
            bpf_loop(
                1,
                attribute_step as *const () as *mut c_void,
                &mut walk as *mut Walk as *mut c_void,
                0,
            )
        };
    }
    w.failed == 0
}
