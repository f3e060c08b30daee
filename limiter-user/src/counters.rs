//! Writing the config into the kernel maps and reading the counters back.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::{
    Pod,
    maps::{IterableMap, MapError, lpm_trie::Key},
};
use limiter_common::{
    AddrKey, CONFIG_F_READY, Config as KernelConfig, DAY_SLOTS, DayCounters, FAULT_COUNT,
    FAULT_NAMES, HOST_PREFIX_LEN, ORG_F_ACTIVE, ORG_F_CONC_DELAY, ORG_F_CONC_REJECT, ORG_F_DRY_RUN,
    OrgLimits, RemoteCount, UNMAPPED_ORG, day_index,
    layout::{CONFIG, MEDIA_MATCH, MapSpec, ORG_BY_HOST, ORG_CONNS, ORG_DAYS, ORG_LIMITS},
    stream::{MEDIA_MATCH_ENTRIES, media_match_entry},
};
use thiserror::Error;

use crate::{
    clock::Clock,
    config::{ConcurrencyMode, Config, EffectiveLimits, QuotaMode},
    loader::Kernel,
    orgs::{OrgIds, lpm_key},
    snapshot::DaySnapshot,
};

#[derive(Debug, Error)]
pub enum CountersError {
    #[error("writing {what}: {source}")]
    Map {
        what: String,
        #[source]
        source: MapError,
    },
    #[error("reading {what} in batches: {source}")]
    Batch {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("media prefix {0:?} does not fit the kernel table")]
    Prefix(String),
    #[error("the org names in the kernel's maps: {0}")]
    Ids(#[from] crate::orgs::OrgIdError),
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> CountersError {
    let what = what.into();
    move |source| CountersError::Map { what, source }
}

/// What the daemon has written into the maps: the desired state of a config, and what a later
/// config is diffed against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub ports: BTreeSet<u16>,
    /// ((prefix length, key), org id), each key once. Lists, not maps: building maps of a
    /// million entries was most of a first start's table time; [`apply`] indexes the old side.
    pub cidrs: Vec<((u32, AddrKey), u32)>,
    /// (org id, limits), each id once.
    pub limits: Vec<(u32, OrgLimits)>,
    pub kernel_config: Option<KernelConfig>,
}

impl Applied {
    /// The map contents a config asks for.
    pub fn desired(cfg: &Config, ids: &OrgIds, clock: &Clock) -> Result<Self, CountersError> {
        Self::desired_with(cfg, clock, |index, name| ids.id_at(index, name))
    }

    /// [`Applied::desired`] with the org ids given by `id_of(index in the config, name)`: a first
    /// start knows them without the id table (org `i` gets id `i + 1`), so both are built at once.
    pub fn desired_with(
        cfg: &Config,
        clock: &Clock,
        id_of: impl Fn(usize, &str) -> Option<u32>,
    ) -> Result<Self, CountersError> {
        let mut kc = KernelConfig::empty();
        kc.clock_offset_ns = clock.offset_ns();
        kc.day_len_ns = clock.day_len_ns;
        kc.flags = CONFIG_F_READY;
        for p in &cfg.api.media_get_prefixes {
            if !kc.push_media_prefix(p.as_bytes()) {
                return Err(CountersError::Prefix(p.clone()));
            }
        }
        let cidrs = cfg.cidr_count();
        let mut out = Applied {
            ports: cfg.api.ports.iter().copied().collect(),
            kernel_config: Some(kc),
            cidrs: Vec::with_capacity(cidrs),
            limits: Vec::with_capacity(cfg.orgs.len()),
        };
        for (index, org) in cfg.orgs.iter().enumerate() {
            let Some(id) = id_of(index, &org.name) else {
                continue;
            };
            out.limits
                .push((id, kernel_limits(&org.name, &cfg.limits_for(org))));
            for net in &org.cidrs {
                out.cidrs.push((lpm_key(net), id));
            }
        }
        Ok(out)
    }
}

/// An org's limits and modes as the kernel keeps them.
pub fn kernel_limits(name: &str, l: &EffectiveLimits) -> OrgLimits {
    let mut flags = ORG_F_ACTIVE;
    if l.quota_mode == QuotaMode::DryRun {
        flags |= ORG_F_DRY_RUN;
    }
    flags |= match l.concurrency_mode {
        ConcurrencyMode::Observe => 0,
        ConcurrencyMode::Delay => ORG_F_CONC_DELAY,
        ConcurrencyMode::Reject => ORG_F_CONC_REJECT,
    };
    OrgLimits::new(
        name.as_bytes(),
        l.daily_requests,
        l.concurrent_connections,
        flags,
    )
}

/// What it takes to bring the maps from `old` to `new`: the one comparison behind [`apply`] and
/// the reload's list of changed orgs. Only the old side is indexed, so a first start (old empty)
/// hashes nothing.
struct Diff<'a> {
    /// Limits to write: new orgs' and changed ones.
    limits: Vec<(u32, &'a OrgLimits)>,
    /// Address entries to write (new, or now another org's): single addresses and networks.
    hosts: Vec<((u32, AddrKey), u32)>,
    nets: Vec<((u32, AddrKey), u32)>,
    /// Orgs that lost an address to another org.
    moved_from: Vec<u32>,
    /// Address entries no org has any more.
    removed_cidrs: Vec<((u32, AddrKey), u32)>,
    /// Orgs no longer configured.
    removed_ids: Vec<u32>,
}

impl<'a> Diff<'a> {
    fn new(old: &Applied, new: &'a Applied) -> Self {
        let old_limits: foldhash::HashMap<u32, &OrgLimits> =
            old.limits.iter().map(|(id, l)| (*id, l)).collect();
        let old_cidrs: foldhash::HashMap<(u32, AddrKey), u32> = old.cidrs.iter().copied().collect();
        let limits = new
            .limits
            .iter()
            .filter(|(id, l)| old_limits.get(id) != Some(&l))
            .map(|(id, l)| (*id, l))
            .collect();
        let mut moved_from = Vec::new();
        let (hosts, nets) = new
            .cidrs
            .iter()
            .filter(|(k, id)| match old_cidrs.get(k) {
                Some(was) if was == id => false,
                Some(was) => {
                    moved_from.push(*was);
                    true
                }
                None => true,
            })
            .partition(|((len, _), _)| *len == HOST_PREFIX_LEN);
        let (mut removed_cidrs, mut removed_ids) = (Vec::new(), Vec::new());
        if !old.cidrs.is_empty() {
            let kept: foldhash::HashSet<(u32, AddrKey)> =
                new.cidrs.iter().map(|(k, _)| *k).collect();
            removed_cidrs = old
                .cidrs
                .iter()
                .filter(|(k, _)| !kept.contains(k))
                .copied()
                .collect();
        }
        if !old.limits.is_empty() {
            let kept: foldhash::HashSet<u32> = new.limits.iter().map(|(id, _)| *id).collect();
            removed_ids = old
                .limits
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !kept.contains(id))
                .collect();
        }
        Diff {
            limits,
            hosts,
            nets,
            moved_from,
            removed_cidrs,
            removed_ids,
        }
    }

    fn addresses_changed(&self) -> bool {
        !(self.hosts.is_empty() && self.nets.is_empty() && self.removed_cidrs.is_empty())
    }

    /// The ids whose addresses or limits differ, each once, in order (ids on one side only
    /// included: the caller tells added and removed orgs apart).
    fn orgs(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .limits
            .iter()
            .map(|(id, _)| *id)
            .chain(
                self.hosts
                    .iter()
                    .chain(&self.nets)
                    .chain(&self.removed_cidrs)
                    .map(|(_, id)| *id),
            )
            .chain(self.moved_from.iter().chain(&self.removed_ids).copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The descriptor of a map the kernel handle holds open, for the batch commands aya lacks.
fn fd<K: Pod, V>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// Writes `items` into `map` in batches; false when there are few (not worth it) or the kernel
/// refused the batch (the caller then writes them one by one — a partial batch is rewritten,
/// which is harmless).
fn batched<T, K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    items: &[T],
    entry: impl Fn(&T) -> (K, V),
) -> bool {
    if items.len() < 1024 {
        return false;
    }
    let (keys, values): (Vec<K>, Vec<V>) = items.iter().map(entry).unzip();
    crate::bpf::update_batch(map, &keys, &values).is_ok()
}

/// What an apply changed, for the log and the reload's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub cidrs_written: usize,
    pub cidrs_removed: usize,
    pub limits_written: usize,
    /// Ids whose addresses or limits changed (orgs on one side only included); left empty on a
    /// first start, where every org is new.
    pub orgs_changed: Vec<u32>,
}

/// Brings the maps from `old` to `new`: additions and changes first, removals last, so no address
/// is ever without its org in between. CONFIG (with the ready flag) is written last, with
/// `old`'s address generation, moved on when the address table changed so the kernel
/// re-attributes connections made under the old table.
pub fn apply(
    kernel: &mut Kernel,
    old: &Applied,
    new: &Applied,
) -> Result<ApplyStats, CountersError> {
    let diff = Diff::new(old, new);
    for port in new.ports.difference(&old.ports) {
        kernel
            .ports
            .insert(port, 1, 0)
            .map_err(map_err(format!("API port {port}")))?;
    }
    let first_start = old.kernel_config.is_none();
    write_changes(kernel, &diff, first_start)?;
    write_removals(kernel, &diff)?;
    for port in old.ports.difference(&new.ports) {
        match kernel.ports.remove(port) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(format!("API port {port}"))(e)),
        }
    }
    if let Some(kc) = new.kernel_config {
        write_config(kernel, old, kc, diff.addresses_changed())?;
    }
    Ok(ApplyStats {
        cidrs_written: diff.hosts.len() + diff.nets.len(),
        cidrs_removed: diff.removed_cidrs.len(),
        limits_written: diff.limits.len(),
        orgs_changed: if first_start { Vec::new() } else { diff.orgs() },
    })
}

/// Writes the new and changed limits and address entries: in batches where there are many, one
/// by one where there are few or the kernel refused a batch.
fn write_changes(
    kernel: &mut Kernel,
    diff: &Diff<'_>,
    first_start: bool,
) -> Result<(), CountersError> {
    let (limits_ok, hosts_ok, nets_ok) = write_batches(kernel, diff, first_start);
    if !limits_ok {
        for (id, l) in &diff.limits {
            kernel
                .org_limits
                .set(*id, *l, 0)
                .map_err(map_err(format!("limits of org id {id}")))?;
        }
    }
    if !hosts_ok {
        for &((_, addr), id) in &diff.hosts {
            kernel
                .org_by_host
                .insert(addr, id, 0)
                .map_err(map_err(format!("host table entry for org id {id}")))?;
        }
    }
    if !nets_ok {
        for &((len, addr), id) in &diff.nets {
            kernel
                .org_by_addr
                .insert(&Key::new(len, addr), id, 0)
                .map_err(map_err(format!("address table entry for org id {id}")))?;
        }
    }
    Ok(())
}

/// [`write_changes`]' batches, through the descriptors the kernel handles hold: whether the
/// limits', the host table's and the network table's went through.
fn write_batches(kernel: &Kernel, diff: &Diff<'_>, first_start: bool) -> (bool, bool, bool) {
    let (limits_fd, hosts_fd, nets_fd) = (
        fd(&kernel.org_limits),
        fd(&kernel.org_by_host),
        fd(&kernel.org_by_addr),
    );
    let write_limits = || batched(limits_fd, &diff.limits, |(id, l)| (*id, **l));
    let write_hosts =
        |hosts: &[((u32, AddrKey), u32)]| batched(hosts_fd, hosts, |((_, addr), id)| (*addr, *id));
    let write_nets = || {
        batched(nets_fd, &diff.nets, |((len, addr), id)| {
            (Key::new(*len, *addr), *id)
        })
    };
    // A first start (the kernel ignores traffic until CONFIG is written, last) fills the three
    // tables at once; a reload keeps limits before addresses, so no new address meets stale limits.
    // The host table's inserts are the slowest; its buckets have their own locks, so two
    // threads fill it.
    if first_start {
        let (first, second) = diff.hosts.split_at(diff.hosts.len() / 2);
        std::thread::scope(|s| {
            let first = s.spawn(|| write_hosts(first));
            let second = s.spawn(|| write_hosts(second));
            let nets = s.spawn(write_nets);
            let limits = write_limits();
            let hosts = first.join().unwrap_or(false) & second.join().unwrap_or(false);
            (limits, hosts, nets.join().unwrap_or(false))
        })
    } else {
        (write_limits(), write_hosts(&diff.hosts), write_nets())
    }
}

/// Removes the address entries no org has any more, and the limits of orgs no longer configured.
fn write_removals(kernel: &mut Kernel, diff: &Diff<'_>) -> Result<(), CountersError> {
    for &((len, addr), _) in &diff.removed_cidrs {
        let removed = if len == HOST_PREFIX_LEN {
            kernel.org_by_host.remove(&addr)
        } else {
            kernel.org_by_addr.remove(&Key::new(len, addr))
        };
        match removed {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("address table removal")(e)),
        }
    }
    for id in &diff.removed_ids {
        kernel
            .org_limits
            .set(*id, OrgLimits::default(), 0)
            .map_err(map_err(format!("limits of removed org id {id}")))?;
    }
    Ok(())
}

/// Writes CONFIG (and MEDIA_MATCH before it, when the media prefixes changed), keeping `old`'s
/// org epoch and address generation, the latter moved on when the address table changed.
fn write_config(
    kernel: &mut Kernel,
    old: &Applied,
    mut kc: KernelConfig,
    addresses_changed: bool,
) -> Result<(), CountersError> {
    let prev = old.kernel_config.map_or(0, |c| c.addr_gen);
    // The epoch of these org maps: chosen when they are first written (0: not yet), kept
    // after.
    kc.org_epoch = old
        .kernel_config
        .map(|c| c.org_epoch)
        .filter(|e| *e != 0)
        .unwrap_or(kernel.org_epoch);
    kc.addr_gen = if addresses_changed {
        prev.wrapping_add(1)
    } else {
        prev
    };
    let prefixes = |c: &KernelConfig| (c.media_prefix_count, c.media_prefix_len, c.media_prefixes);
    if old.kernel_config.as_ref().map(prefixes) != Some(prefixes(&kc)) {
        write_media_match(kernel, &kc)?;
    }
    kernel
        .config
        .set(0, kc, 0)
        .map_err(map_err(CONFIG::DEF.name))
}

/// Fills MEDIA_MATCH from the config's media prefixes (before CONFIG says how many there are).
fn write_media_match(kernel: &mut Kernel, kc: &KernelConfig) -> Result<(), CountersError> {
    for index in 0..MEDIA_MATCH_ENTRIES {
        kernel
            .media_match
            .set(index, media_match_entry(kc, index), 0)
            .map_err(map_err(MEDIA_MATCH::DEF.name))?;
    }
    Ok(())
}

/// One org's counters for `day` and its open connections.
pub fn usage(kernel: &Kernel, id: u32, day: u64) -> Result<(DayCounters, i64), CountersError> {
    let slot = kernel
        .org_days
        .get(&day_index(id, day), 0)
        .map_err(map_err(format!("reading counters of org id {id}")))?;
    let conns = kernel
        .org_conns
        .get(&id, 0)
        .map_err(map_err(format!("reading connections of org id {id}")))?;
    Ok((of_day(slot, day), conns.max(0)))
}

/// A day slot's counters if it holds `day`; zeros if it still holds another day.
fn of_day(slot: DayCounters, day: u64) -> DayCounters {
    if slot.day == day {
        slot
    } else {
        DayCounters::for_day(day)
    }
}

/// Up to `max` elements of `map` (map `M`'s handle), read in batches and handed to `each` a
/// chunk at a time.
fn read_batches<M: MapSpec, K: Pod, V: Pod>(
    map: &impl IterableMap<K, V>,
    max: usize,
    each: impl FnMut(&[K], &[V]),
) -> Result<(), CountersError> {
    crate::bpf::lookup_batch(fd(map), max, each)
        .map(|_| ())
        .map_err(|source| CountersError::Batch {
            what: M::DEF.name,
            source,
        })
}

/// The first `count` values of the array map `M`, decoded chunk by chunk: no second copy of a
/// map that can be hundreds of MB.
fn read_array<M: MapSpec<Key = u32>>(
    map: &impl IterableMap<u32, M::Value>,
    count: usize,
) -> Result<Vec<M::Value>, CountersError>
where
    M::Value: Pod,
{
    let mut out = Vec::with_capacity(count);
    read_batches::<M, u32, M::Value>(map, count, |_, values| out.extend_from_slice(values))?;
    Ok(out)
}

/// Calls `f(id, counters of day, open connections)` for org ids `0..=max_id` in order, from a
/// few batch syscalls: for the loops over all orgs (reports, snapshots, day totals, the cluster
/// sync).
pub fn each_usage(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters, i64),
) -> Result<(), CountersError> {
    each_slot_usage(kernel, max_id, day, |id, slot, open| {
        f(id, of_day(slot, day), open)
    })
}

/// [`each_usage`] with the slot as the kernel holds it, tagged with whatever day it holds: the
/// caller decides what a slot of another day means (after a clock step, the day's counts may be
/// only in its snapshot).
pub fn each_slot_usage(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters, i64),
) -> Result<(), CountersError> {
    let conns = read_array::<ORG_CONNS>(&kernel.org_conns, max_id as usize + 1)?;
    each_day_slot(kernel, max_id, day, |id, slot| {
        let open = conns.get(id as usize).copied().unwrap_or(0);
        f(id, slot, open.max(0));
    })
}

/// Whether the kernel counted anything on `day` for an org id up to `max_id` (a day a daemon
/// that stalled never saw, or one prepared from its snapshot).
pub fn counted_on(kernel: &Kernel, max_id: u32, day: u64) -> Result<bool, CountersError> {
    let mut counted = false;
    each_day_slot(kernel, max_id, day, |_, slot| {
        counted |= slot.day == day && !slot.is_idle()
    })?;
    Ok(counted)
}

/// Whether the kernel still has counters of `day` for any org id up to `max_id` (after a reboot,
/// past days are only in snapshots).
pub fn holds_day(kernel: &Kernel, max_id: u32, day: u64) -> Result<bool, CountersError> {
    // The unmapped slot is prepared for every day the daemon saw: the usual answer, in one lookup.
    if kernel
        .org_days
        .get(&day_index(UNMAPPED_ORG, day), 0)
        .is_ok_and(|d| d.day == day)
    {
        return Ok(true);
    }
    let mut held = false;
    each_day_slot(kernel, max_id, day, |_, slot| held |= slot.day == day)?;
    Ok(held)
}

/// Calls `f(id, slot)` with the ORG_DAYS slot that `day` uses, as it is, for org ids
/// `0..=max_id` in order. The slots are read a chunk at a time and only `day`'s is kept: a table
/// of every org's three slots was hundreds of MB at a million orgs, at every snapshot.
fn each_day_slot(
    kernel: &Kernel,
    max_id: u32,
    day: u64,
    mut f: impl FnMut(u32, DayCounters),
) -> Result<(), CountersError> {
    let count = (max_id as usize + 1) * DAY_SLOTS as usize;
    read_batches::<ORG_DAYS, _, _>(&kernel.org_days, count, |keys, values| {
        for (&idx, &slot) in keys.iter().zip(values) {
            let id = idx / DAY_SLOTS;
            if idx == day_index(id, day) {
                f(id, slot);
            }
        }
    })
}

/// Makes sure org `id`'s slot for `day` is tagged with `day` (zeroed if it held another day).
///
/// Called for tomorrow right after a rollover and at startup, while the kernel does not touch that
/// slot, so the kernel's lazy reset (which can race) is only a fallback for a daemon that was away.
pub fn prepare_day(kernel: &mut Kernel, id: u32, day: u64) -> Result<(), CountersError> {
    let idx = day_index(id, day);
    let slot = kernel
        .org_days
        .get(&idx, 0)
        .map_err(map_err(format!("reading counters of org id {id}")))?;
    if slot.day != day {
        kernel
            .org_days
            .set(idx, DayCounters::for_day(day), 0)
            .map_err(map_err(format!("preparing day {day} of org id {id}")))?;
    }
    Ok(())
}

/// How [`prepare_day_all`] treats the day it prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// A day the kernel does not count yet (tomorrow): the slots are written in one batch.
    Ahead,
    /// The day the kernel counts now: each slot is re-checked just before its write, as
    /// [`prepare_day`] does, and a slot already holding the day is left as it is.
    Live,
    /// The day the clock was just stepped to (not yesterday, whose slots still hold it): live,
    /// and a slot already holding the day holds only what the kernel counted since the step,
    /// which is added to the day's recorded counts.
    Stepped,
}

/// What a day slot must hold before `day` is counted in it, or None to leave it as it is.
///
/// `known`: what the day's snapshot recorded for this slot's org (a day the clock comes back to
/// continues from its counts, as a reboot does). A never-used slot (tag 0, all zero) is taken
/// over by the kernel as it is.
pub fn prepared(
    slot: DayCounters,
    day: u64,
    known: Option<DayCounters>,
    how: Prepare,
) -> Option<DayCounters> {
    let holds = slot.day == day;
    match known {
        _ if holds && how != Prepare::Stepped => None,
        None if holds || slot.day == 0 => None,
        None => Some(DayCounters::for_day(day)),
        Some(k) if holds => Some(added(k, slot, day)),
        Some(k) => Some(DayCounters { day, ..k }),
    }
}

/// Two counts of one day added up (the peak is the larger one), tagged `day`.
fn added(a: DayCounters, b: DayCounters, day: u64) -> DayCounters {
    DayCounters {
        day,
        requests: a.requests + b.requests,
        rejected: a.rejected + b.rejected,
        exempt_media_gets: a.exempt_media_gets + b.exempt_media_gets,
        exempt_pushes: a.exempt_pushes + b.exempt_pushes,
        unparsed: a.unparsed + b.unparsed,
        peak_connections: a.peak_connections.max(b.peak_connections),
        concurrency_breaches: a.concurrency_breaches + b.concurrency_breaches,
        delayed_syns: a.delayed_syns + b.delayed_syns,
        concurrency_rejected: a.concurrency_rejected + b.concurrency_rejected,
    }
}

/// Prepares `day` for the unmapped slot and every org id in use (see [`prepared`] and
/// [`Prepare`]), from what `known` (the day's snapshot) recorded: a streamed batch read finds the
/// slots to write (a million single reads took seconds). Returns how many slots took counts from
/// `known`.
pub fn prepare_day_all(
    kernel: &mut Kernel,
    ids: &OrgIds,
    day: u64,
    how: Prepare,
    known: Option<&DaySnapshot<'_>>,
) -> Result<usize, CountersError> {
    let known_of = |id: u32| -> Option<DayCounters> {
        let k = known?;
        let counts = if id == UNMAPPED_ORG {
            k.unmapped
        } else {
            *k.orgs.get(ids.name(id)?)?
        };
        (!counts.is_idle()).then_some(counts)
    };
    let mut stale: Vec<u32> = Vec::new();
    each_day_slot(kernel, ids.max_id(), day, |id, slot| {
        let in_use = id == UNMAPPED_ORG || ids.name(id).is_some();
        if in_use && prepared(slot, day, known_of(id), how).is_some() {
            stale.push(day_index(id, day));
        }
    })?;
    let restored = stale
        .iter()
        .filter(|idx| known_of(*idx / DAY_SLOTS).is_some())
        .count();
    if how != Prepare::Ahead {
        for idx in stale {
            let id = idx / DAY_SLOTS;
            let slot = kernel
                .org_days
                .get(&idx, 0)
                .map_err(map_err(format!("reading counters of org id {id}")))?;
            if let Some(value) = prepared(slot, day, known_of(id), how) {
                kernel
                    .org_days
                    .set(idx, value, 0)
                    .map_err(map_err(format!("preparing day {day} of org id {id}")))?;
            }
        }
        return Ok(restored);
    }
    // Ahead, nothing holds the day yet: the value follows from the org alone.
    let value_of = |idx: u32| match known_of(idx / DAY_SLOTS) {
        Some(k) => DayCounters { day, ..k },
        None => DayCounters::for_day(day),
    };
    if !batched(fd(&kernel.org_days), &stale, |idx| (*idx, value_of(*idx))) {
        for idx in stale {
            kernel
                .org_days
                .set(idx, value_of(idx), 0)
                .map_err(map_err(format!("preparing day {day} in slot {idx}")))?;
        }
    }
    Ok(restored)
}

/// Clears org `id`'s counters of `day` (`limiter reset`). The peak restarts at the connections
/// open now.
pub fn reset_day(kernel: &mut Kernel, id: u32, day: u64) -> Result<DayCounters, CountersError> {
    let (before, conns) = usage(kernel, id, day)?;
    let mut fresh = DayCounters::for_day(day);
    fresh.peak_connections = conns as u64;
    kernel
        .org_days
        .set(day_index(id, day), fresh, 0)
        .map_err(map_err(format!("resetting org id {id}")))?;
    Ok(before)
}

/// Clears org `id`'s counters of every day slot, for an id handed to a new org.
pub fn clear_org(kernel: &mut Kernel, id: u32) -> Result<(), CountersError> {
    for slot in 0..DAY_SLOTS {
        kernel
            .org_days
            .set(id * DAY_SLOTS + slot, DayCounters::default(), 0)
            .map_err(map_err(format!("clearing org id {id}")))?;
    }
    Ok(())
}

/// The org ids and names the kernel holds (ORG_LIMITS entries marked active).
pub fn ids_from_kernel(kernel: &Kernel) -> Result<OrgIds, CountersError> {
    let all = read_array::<ORG_LIMITS>(&kernel.org_limits, kernel.org_capacity() as usize)?;
    // A name twice (maps left inconsistent by a crash mid-write) keeps its first id; the other
    // entry is then no org's and the next apply clears it.
    let mut seen = foldhash::HashSet::default();
    let pairs = all.iter().enumerate().filter_map(|(id, l)| {
        let n = (l.name_len as usize).min(l.name.len());
        let name = std::str::from_utf8(&l.name[..n]).ok()?;
        (l.flags & ORG_F_ACTIVE != 0 && seen.insert(name)).then_some((id as u32, name))
    });
    OrgIds::from_pairs(pairs).map_err(CountersError::Ids)
}

/// What the maps hold now, so a restarted daemon applies only the differences.
pub fn read_applied(kernel: &Kernel) -> Result<Applied, CountersError> {
    let mut out = Applied::default();
    for port in kernel.ports.keys() {
        out.ports
            .insert(port.map_err(map_err("reading API ports"))?);
    }
    for entry in kernel.org_by_addr.iter() {
        let (key, id) = entry.map_err(map_err("reading the address table"))?;
        out.cidrs.push(((key.prefix_len(), key.data()), id));
    }
    let max = kernel.capacity.cidrs as usize;
    read_batches::<ORG_BY_HOST, _, _>(&kernel.org_by_host, max, |keys, values| {
        for (&addr, &id) in keys.iter().zip(values) {
            out.cidrs.push(((HOST_PREFIX_LEN, addr), id));
        }
    })?;
    let all = read_array::<ORG_LIMITS>(&kernel.org_limits, kernel.org_capacity() as usize)?;
    for (id, l) in all.into_iter().enumerate() {
        if l.flags & ORG_F_ACTIVE != 0 {
            out.limits.push((id as u32, l));
        }
    }
    out.kernel_config = Some(
        kernel
            .config
            .get(&0, 0)
            .map_err(map_err("reading CONFIG"))?,
    );
    Ok(out)
}

/// Sets org `id`'s counters of `day` (restoring a snapshot before the kernel counts).
pub fn write_day(kernel: &mut Kernel, id: u32, counters: DayCounters) -> Result<(), CountersError> {
    kernel
        .org_days
        .set(day_index(id, counters.day), counters, 0)
        .map_err(map_err(format!("restoring counters of org id {id}")))
}

/// Sets what the other hosts of a cluster counted for org `id` on `day`.
pub fn write_remote(
    kernel: &mut Kernel,
    id: u32,
    day: u64,
    requests: u64,
) -> Result<(), CountersError> {
    kernel
        .org_remote
        .set(day_index(id, day), RemoteCount { day, requests }, 0)
        .map_err(map_err(format!("writing the cluster count of org id {id}")))
}

/// The kernel's fault counters by name.
pub fn faults(kernel: &Kernel) -> Vec<(&'static str, u64)> {
    (0..FAULT_COUNT)
        .filter_map(|i| {
            let name = FAULT_NAMES.get(i as usize)?;
            Some((*name, kernel.faults.get(&i, 0).unwrap_or(0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cidrs(cidrs: Vec<((u32, AddrKey), u32)>) -> Applied {
        Applied {
            cidrs,
            ..Applied::default()
        }
    }

    #[test]
    fn changed_orgs_are_those_whose_addresses_or_limits_differ() {
        let net = |last: u8, id| ((128, limiter_common::v4_mapped([10, 0, 0, last])), id);
        let lim = |q| OrgLimits::new(b"x", q, 3, ORG_F_ACTIVE);
        let old = Applied {
            cidrs: vec![net(1, 1), net(2, 2), net(3, 3), net(4, 4), net(6, 6)],
            limits: vec![
                (1, lim(10)),
                (2, lim(10)),
                (3, lim(10)),
                (4, lim(10)),
                (6, lim(10)),
            ],
            ..Applied::default()
        };
        let new = Applied {
            // 2 moves to another address, 3 gets another limit, 4 is gone, 5 is new, and 6's
            // address is now 1's (both changed).
            cidrs: vec![net(1, 1), net(9, 2), net(3, 3), net(5, 5), net(6, 1)],
            limits: vec![
                (1, lim(10)),
                (2, lim(10)),
                (3, lim(20)),
                (5, lim(10)),
                (6, lim(10)),
            ],
            ..Applied::default()
        };
        assert_eq!(Diff::new(&old, &new).orgs(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(Diff::new(&old, &old).orgs(), [] as [u32; 0]);
    }

    #[test]
    fn a_day_is_prepared_from_what_is_known_of_it() {
        let day = 20_788;
        let counts = |day, requests, peak| DayCounters {
            requests,
            rejected: 1,
            peak_connections: peak,
            ..DayCounters::for_day(day)
        };
        let known = Some(counts(day, 5, 2));
        let other = counts(day - 3, 9, 9);
        let here = counts(day, 3, 4);
        for how in [Prepare::Ahead, Prepare::Live, Prepare::Stepped] {
            // A slot of another day takes the recorded counts, or zeros; a never-used slot is
            // left to the kernel unless there are counts to put in.
            assert_eq!(
                prepared(other, day, known, how),
                Some(counts(day, 5, 2)),
                "{how:?}"
            );
            assert_eq!(
                prepared(other, day, None, how),
                Some(DayCounters::for_day(day))
            );
            assert_eq!(prepared(DayCounters::default(), day, None, how), None);
            assert_eq!(
                prepared(DayCounters::default(), day, known, how),
                Some(counts(day, 5, 2))
            );
            assert_eq!(prepared(here, day, None, how), None);
        }
        // A slot holding the day: kept, unless the kernel claimed it after a step (then what it
        // counted since is added to the recorded counts; the peak is the larger).
        assert_eq!(prepared(here, day, known, Prepare::Live), None);
        assert_eq!(prepared(here, day, known, Prepare::Ahead), None);
        let mut sum = counts(day, 8, 4);
        sum.rejected = 2;
        assert_eq!(prepared(here, day, known, Prepare::Stepped), Some(sum));
    }

    #[test]
    fn the_address_generation_moves_only_when_the_table_changes() {
        let a = ((120, limiter_common::v4_mapped([10, 0, 0, 0])), 1);
        let b = ((128, limiter_common::v4_mapped([10, 0, 1, 7])), 2);
        let old = with_cidrs(vec![a, b]);
        let changed = |new: Vec<_>| Diff::new(&old, &with_cidrs(new)).addresses_changed();
        // The same entries in another order (a reordered config, or read back from the kernel).
        assert!(!changed(vec![b, a]));
        // Another org for an address, an address less, or a first start: a new generation.
        assert!(changed(vec![a, (b.0, 3)]));
        assert!(changed(vec![a]));
        assert!(Diff::new(&Applied::default(), &old).addresses_changed());
        assert!(!Diff::new(&Applied::default(), &Applied::default()).addresses_changed());
    }
}
