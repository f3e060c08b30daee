//! The org and address tables: what a config asks of them, and bringing them there.

use std::{borrow::Cow, collections::BTreeSet};

use aya::maps::{MapError, lpm_trie::Key};
use limiter_common::{
    AddrKey, CONFIG_F_READY, HOST_PREFIX_LEN, ID_END, KEY_AUTHORIZATION, KEY_PLAIN, KernelConfig,
    ORG_F_ACTIVE, ORG_F_CONC_DELAY, ORG_F_CONC_REJECT, ORG_F_DRY_RUN, OrgLimits,
    layout::{API_KEYS, CONFIG, MEDIA_MATCH, MapSpec, ORG_BY_HOST, ORG_LIMITS, TRUSTED_PROXIES},
    stream::{MEDIA_MATCH_ENTRIES, media_match_entry},
};

use super::{CountersError, batched, fd, map_err, read_array, read_batches};
use crate::{
    clock::Clock,
    config::{ConcurrencyMode, Config, EffectiveLimits, Identify, KeyEntry, QuotaMode, Source},
    loader::Kernel,
    orgs::{OrgIds, lpm_key},
};

/// Keys per batch write: the key table is written a chunk at a time, so a million keys need no
/// second copy.
const KEY_CHUNK: usize = 16_384;

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
    /// (API key digest, org id), sorted by digest, each digest once.
    pub keys: Vec<(u64, u32)>,
    /// `api.trusted_proxies` as LPM keys, each once.
    pub trusted: Vec<(u32, AddrKey)>,
}

impl Applied {
    /// The map contents a config asks for, but its keys: [`Applied::take_keys`] moves those
    /// in.
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
        identify_config(&mut kc, &cfg.api.identify);
        if let Some(keys) = &cfg.keys {
            kc.key_secret = keys.secret.halves();
        }
        let cidrs = cfg.cidr_count();
        let mut trusted: Vec<(u32, AddrKey)> = cfg
            .api
            .identify
            .trusted_proxies
            .iter()
            .map(lpm_key)
            .collect();
        trusted.sort_unstable();
        trusted.dedup();
        let mut out = Applied {
            ports: cfg.api.ports.iter().copied().collect(),
            kernel_config: Some(kc),
            cidrs: Vec::with_capacity(cidrs),
            limits: Vec::with_capacity(cfg.orgs.len()),
            keys: Vec::new(),
            trusted,
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

impl Applied {
    /// Moves the config's key entries in as (digest, org id), with the ids `id_of(index of the
    /// org in the config)` gives; the entries' memory is reused, not copied.
    pub fn take_keys(&mut self, entries: Vec<KeyEntry>, id_of: impl Fn(usize) -> Option<u32>) {
        self.keys = entries
            .into_iter()
            .filter_map(|e| Some((e.digest, id_of(e.org as usize)?)))
            .collect();
    }
}

/// The identification settings of CONFIG: the sources in order, the headers' names and kinds.
/// A header is named only when its source is listed.
fn identify_config(kc: &mut KernelConfig, identify: &Identify) {
    kc.identify_by = [ID_END; limiter_common::ID_SOURCES];
    for (slot, source) in kc.identify_by.iter_mut().zip(&identify.by) {
        *slot = source.kernel_id();
    }
    let copy = |to: &mut [u8; limiter_common::HEADER_NAME_MAX], name: &str| {
        let n = name.len().min(to.len());
        to[..n].copy_from_slice(&name.as_bytes()[..n]);
        n as u8
    };
    // Zero when a source is not listed: the kernel takes a key header name's first byte as
    // "keys are read" (0 never starts a header line).
    kc.fwd_header = [0; limiter_common::HEADER_NAME_MAX];
    kc.fwd_header_len = 0;
    kc.key_header = [0; limiter_common::HEADER_NAME_MAX];
    kc.key_header_len = 0;
    kc.forwarded_kind = identify.forwarded_header.kernel_kind();
    if identify.uses(Source::Forwarded) {
        kc.fwd_header_len = copy(&mut kc.fwd_header, identify.forwarded_header.name());
    }
    kc.key_kind = if identify.key_is_authorization() {
        KEY_AUTHORIZATION
    } else {
        KEY_PLAIN
    };
    if identify.uses(Source::ApiKey) {
        kc.key_header_len = copy(&mut kc.key_header, &identify.api_key_header);
    }
    limiter_common::stream::fill_name_tables(kc);
}

/// What it takes to bring the key table from `old` to `new` (both sorted by digest): the
/// entries to write (new digests and those of another org now) and the digests to remove.
#[derive(Debug, PartialEq)]
pub struct KeyDiff<'a> {
    pub write: Cow<'a, [(u64, u32)]>,
    /// How many of `write` are digests the table does not hold yet.
    pub added: usize,
    /// (digest, org id it had).
    pub remove: Vec<(u64, u32)>,
}

impl<'a> KeyDiff<'a> {
    pub fn new(old: &[(u64, u32)], new: &'a [(u64, u32)]) -> Self {
        if old.is_empty() {
            return KeyDiff {
                write: Cow::Borrowed(new),
                added: new.len(),
                remove: Vec::new(),
            };
        }
        let (mut write, mut added, mut remove) = (Vec::new(), 0, Vec::new());
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o.0 == n.0 => {
                    if o.1 != n.1 {
                        write.push(*n);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o.0 < n.0 => {
                    remove.push(*o);
                    i += 1;
                }
                (Some(o), None) => {
                    remove.push(*o);
                    i += 1;
                }
                (_, Some(n)) => {
                    write.push(*n);
                    added += 1;
                    j += 1;
                }
                (None, None) => break,
            }
        }
        KeyDiff {
            write: Cow::Owned(write),
            added,
            remove,
        }
    }

    /// The org ids whose keys change (on either side), each once, in order.
    pub fn orgs(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .write
            .iter()
            .chain(&self.remove)
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether the new digests fit beside the old ones; if not, the removals go first (keys
    /// being removed stop working a moment earlier, no key that stays is ever missing).
    pub fn fits(&self, held: usize, capacity: u32) -> bool {
        held + self.added <= capacity as usize
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
    OrgLimits {
        pace_rate: l.pace_rate,
        ..OrgLimits::new(
            name.as_bytes(),
            l.daily_requests,
            l.concurrent_connections,
            flags,
        )
    }
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

/// What an apply changed, for the log and the reload's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub cidrs_written: usize,
    pub cidrs_removed: usize,
    pub limits_written: usize,
    pub keys_written: usize,
    pub keys_removed: usize,
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
    let keys = KeyDiff::new(&old.keys, &new.keys);
    let removals_first = !keys.fits(old.keys.len(), kernel.capacity.keys);
    if removals_first {
        remove_keys(kernel, &keys.remove)?;
    }
    write_keys(kernel, &keys.write)?;
    let trusted_changed = write_trusted(kernel, &old.trusted, &new.trusted)?;
    // Test hook: the new limits and addresses are in, the removals and CONFIG not yet.
    crate::hooks::pause("LIMITER_TEST_PAUSE_MID_APPLY");
    write_removals(kernel, &diff)?;
    if !removals_first {
        remove_keys(kernel, &keys.remove)?;
    }
    for port in old.ports.difference(&new.ports) {
        match kernel.ports.remove(port) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(format!("API port {port}"))(e)),
        }
    }
    if let Some(kc) = new.kernel_config {
        let sources_changed = old.kernel_config.map(|c| c.identify_by) != Some(kc.identify_by);
        let reattribute = diff.addresses_changed() || trusted_changed || sources_changed;
        write_config(kernel, old, kc, reattribute)?;
    }
    Ok(ApplyStats {
        cidrs_written: diff.hosts.len() + diff.nets.len(),
        cidrs_removed: diff.removed_cidrs.len(),
        limits_written: diff.limits.len(),
        keys_written: keys.write.len(),
        keys_removed: keys.remove.len(),
        orgs_changed: if first_start {
            Vec::new()
        } else {
            let mut ids = diff.orgs();
            ids.extend(keys.orgs());
            ids.sort_unstable();
            ids.dedup();
            ids
        },
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

/// Writes (digest, org id) entries into API_KEYS a batch at a time, one by one where the kernel
/// refuses a batch. Many entries are written by two threads: the hash's buckets have their own
/// locks, and a million inserts take about a second on one.
fn write_keys(kernel: &mut Kernel, entries: &[(u64, u32)]) -> Result<(), CountersError> {
    let chunks: Vec<&[(u64, u32)]> = entries.chunks(KEY_CHUNK).collect();
    let refused: Vec<&[(u64, u32)]> = {
        let map = fd(&kernel.api_keys);
        let refused_of = |part| refused_chunks(map, part);
        let (first, second) = chunks.split_at(chunks.len() / 2);
        if first.is_empty() {
            refused_of(second)
        } else {
            std::thread::scope(|s| {
                let other = s.spawn(|| refused_of(second));
                let mut refused = refused_of(first);
                // A thread that died is taken as having written nothing: its chunks again.
                refused.extend(other.join().unwrap_or_else(|_| second.to_vec()));
                refused
            })
        }
    };
    for chunk in refused {
        for (digest, id) in chunk {
            kernel
                .api_keys
                .insert(digest, id, 0)
                .map_err(map_err(format!("API key of org id {id}")))?;
        }
    }
    Ok(())
}

/// The chunks of `part` the kernel did not take as a batch.
fn refused_chunks<'a>(
    map: std::os::fd::BorrowedFd<'_>,
    part: &[&'a [(u64, u32)]],
) -> Vec<&'a [(u64, u32)]> {
    part.iter()
        .copied()
        .filter(|chunk| {
            let (digests, ids): (Vec<u64>, Vec<u32>) = chunk.iter().copied().unzip();
            chunk.len() < 2 || crate::bpf::update_batch(map, &digests, &ids).is_err()
        })
        .collect()
}

/// Removes digests from API_KEYS a batch at a time (one by one where a batch fails: a digest
/// already gone ends a batch).
fn remove_keys(kernel: &mut Kernel, entries: &[(u64, u32)]) -> Result<(), CountersError> {
    for chunk in entries.chunks(KEY_CHUNK) {
        let digests: Vec<u64> = chunk.iter().map(|(d, _)| *d).collect();
        if chunk.len() > 1 && crate::bpf::delete_batch(fd(&kernel.api_keys), &digests).is_ok() {
            continue;
        }
        for digest in &digests {
            match kernel.api_keys.remove(digest) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(API_KEYS::DEF.name)(e)),
            }
        }
    }
    Ok(())
}

/// Brings TRUSTED_PROXIES from `old` to `new` (additions first); whether it changed.
fn write_trusted(
    kernel: &mut Kernel,
    old: &[(u32, AddrKey)],
    new: &[(u32, AddrKey)],
) -> Result<bool, CountersError> {
    let mut changed = false;
    for &(len, addr) in new.iter().filter(|k| !old.contains(k)) {
        kernel
            .trusted_proxies
            .insert(&Key::new(len, addr), 1, 0)
            .map_err(map_err(TRUSTED_PROXIES::DEF.name))?;
        changed = true;
    }
    for &(len, addr) in old.iter().filter(|k| !new.contains(k)) {
        match kernel.trusted_proxies.remove(&Key::new(len, addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(TRUSTED_PROXIES::DEF.name)(e)),
        }
        changed = true;
    }
    Ok(changed)
}

/// Writes CONFIG (and MEDIA_MATCH before it, when the media prefixes changed), keeping `old`'s
/// org epoch and address generation, the latter moved on when connections must look their org
/// up again (the address table, the trusted proxies or the sources changed).
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
    let max = kernel.capacity.keys as usize;
    read_batches::<API_KEYS, _, _>(&kernel.api_keys, max, |digests, ids| {
        out.keys
            .extend(digests.iter().copied().zip(ids.iter().copied()));
    })?;
    out.keys.sort_unstable();
    for entry in kernel.trusted_proxies.iter() {
        let (key, _) = entry.map_err(map_err("reading the trusted proxies"))?;
        out.trusted.push((key.prefix_len(), key.data()));
    }
    out.kernel_config = Some(
        kernel
            .config
            .get(&0, 0)
            .map_err(map_err("reading CONFIG"))?,
    );
    Ok(out)
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
    fn the_key_diff_writes_new_and_moved_digests_and_removes_the_rest() {
        let old = [(1, 1), (3, 1), (5, 2), (7, 2)];
        // 1 stays, 3 goes, 5 moves to org 3, 6 is new, 7 stays.
        let new = [(1, 1), (5, 3), (6, 2), (7, 2)];
        let d = KeyDiff::new(&old, &new);
        assert_eq!(d.write.as_ref(), [(5, 3), (6, 2)]);
        assert_eq!(d.added, 1);
        assert_eq!(d.remove, [(3, 1)]);
        assert_eq!(d.orgs(), [1, 2, 3]);
        assert!(d.fits(old.len(), 5));
        assert!(!d.fits(old.len(), 4));
        // A first start writes the new side as it is, without a copy.
        let first = KeyDiff::new(&[], &new);
        assert!(matches!(first.write, Cow::Borrowed(_)));
        assert_eq!((first.added, first.remove.len()), (4, 0));
        let same = KeyDiff::new(&old, &old);
        assert!(same.write.is_empty() && same.remove.is_empty());
    }

    #[test]
    fn the_identification_settings_reach_the_kernel_config() {
        let mut kc = KernelConfig::empty();
        let identify = Identify {
            by: vec![Source::ApiKey, Source::Forwarded, Source::Address],
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            forwarded_header: crate::config::ForwardedHeader::XRealIp,
            api_key_header: "authorization".into(),
            api_keys_file: None,
        };
        identify_config(&mut kc, &identify);
        use limiter_common::{FWD_X_REAL_IP, ID_ADDRESS, ID_API_KEY, ID_FORWARDED};
        assert_eq!(
            kc.identify_by,
            [ID_API_KEY, ID_FORWARDED, ID_ADDRESS, ID_END]
        );
        assert_eq!(
            (kc.forwarded_kind, kc.key_kind),
            (FWD_X_REAL_IP, KEY_AUTHORIZATION)
        );
        assert_eq!(&kc.fwd_header[..kc.fwd_header_len as usize], b"x-real-ip");
        assert_eq!(
            &kc.key_header[..kc.key_header_len as usize],
            b"authorization"
        );
        // Headers of sources not listed are not named, even in a config that named them.
        identify_config(&mut kc, &Identify::default());
        assert_eq!((kc.key_header, kc.fwd_header), ([0; 32], [0; 32]));
        assert_eq!(
            kc.identify_by,
            [limiter_common::ID_ADDRESS, ID_END, ID_END, ID_END]
        );
        assert_eq!(
            (kc.fwd_header_len, kc.key_header_len, kc.key_kind),
            (0, 0, KEY_PLAIN)
        );
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
