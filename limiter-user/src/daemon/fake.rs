//! Kernel maps in memory, for the components' tests: day slots, connections and cluster counts
//! indexed as the kernel indexes them, and what a config wrote kept as one [`Applied`].

use std::collections::{BTreeMap, BTreeSet};

use limiter_common::{DAY_SLOTS, DayCounters, OrgLimits, RemoteCount, UNMAPPED_ORG, day_index};

use super::maps::KernelMaps;
use crate::{
    clock::Clock,
    counters::{self, Applied, ApplyStats, Prepare},
    orgs::OrgIds,
    snapshot::DaySnapshot,
};

#[derive(Debug, thiserror::Error)]
#[error("fake maps: {0}")]
pub struct FakeError(pub String);

pub struct FakeMaps {
    /// ORG_DAYS by index (`day_index`); a missing index is a never-used slot.
    pub slots: BTreeMap<u32, DayCounters>,
    pub conns: BTreeMap<u32, i64>,
    pub remote: BTreeMap<u32, RemoteCount>,
    pub faults: Vec<(&'static str, u64)>,
    pub applied: Applied,
    pub clock_offset_ns: Option<i64>,
    pub org_capacity: u32,
    pub cidr_capacity: u32,
    pub key_capacity: u32,
    /// The next apply fails (after writing half of its limits, as a map write failing midway).
    pub fail_apply: bool,
    /// Reads of all slots fail.
    pub fail_reads: bool,
    /// TRACE_ON's pid.
    pub tracer: u64,
}

impl Default for FakeMaps {
    fn default() -> Self {
        FakeMaps {
            slots: BTreeMap::new(),
            conns: BTreeMap::new(),
            remote: BTreeMap::new(),
            faults: Vec::new(),
            applied: Applied::default(),
            clock_offset_ns: None,
            org_capacity: 64,
            cidr_capacity: 64,
            key_capacity: 64,
            fail_apply: false,
            fail_reads: false,
            tracer: 0,
        }
    }
}

impl FakeMaps {
    /// Slot `idx` as the kernel holds it.
    pub fn slot(&self, idx: u32) -> DayCounters {
        self.slots.get(&idx).copied().unwrap_or_default()
    }

    /// What the kernel does for one request of org `id` on `day`: a slot of another day is
    /// reset first.
    pub fn count(&mut self, id: u32, day: u64, requests: u64) {
        let slot = self.slots.entry(day_index(id, day)).or_default();
        if slot.day != day {
            *slot = DayCounters::for_day(day);
        }
        slot.requests += requests;
    }

    fn of_day(slot: DayCounters, day: u64) -> DayCounters {
        if slot.day == day {
            slot
        } else {
            DayCounters::for_day(day)
        }
    }

    fn read(&self) -> Result<(), FakeError> {
        if self.fail_reads {
            return Err(FakeError("reading the day slots failed".into()));
        }
        Ok(())
    }
}

impl KernelMaps for FakeMaps {
    type Error = FakeError;

    fn usage(&self, id: u32, day: u64) -> Result<(DayCounters, i64), FakeError> {
        let conns = self.conns.get(&id).copied().unwrap_or(0).max(0);
        Ok((Self::of_day(self.slot(day_index(id, day)), day), conns))
    }

    fn each_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), FakeError> {
        self.each_slot_usage(max_id, day, &mut |id, slot, conns| {
            f(id, Self::of_day(slot, day), conns)
        })
    }

    fn each_slot_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), FakeError> {
        self.read()?;
        for id in 0..=max_id {
            let conns = self.conns.get(&id).copied().unwrap_or(0).max(0);
            f(id, self.slot(day_index(id, day)), conns);
        }
        Ok(())
    }

    fn holds_day(&self, max_id: u32, day: u64) -> Result<bool, FakeError> {
        self.read()?;
        Ok((0..=max_id).any(|id| self.slot(day_index(id, day)).day == day))
    }

    fn counted_on(&self, max_id: u32, day: u64) -> Result<bool, FakeError> {
        self.read()?;
        Ok((0..=max_id).any(|id| {
            let s = self.slot(day_index(id, day));
            s.day == day && !s.is_idle()
        }))
    }

    fn prepare_day(&mut self, id: u32, day: u64) -> Result<(), FakeError> {
        if self.slot(day_index(id, day)).day != day {
            self.slots
                .insert(day_index(id, day), DayCounters::for_day(day));
        }
        Ok(())
    }

    fn prepare_day_all(
        &mut self,
        ids: &OrgIds,
        day: u64,
        how: Prepare,
        known: Option<&DaySnapshot<'_>>,
    ) -> Result<usize, FakeError> {
        self.read()?;
        let known_of = |id: u32| counters::known_counts(known, ids, id);
        let mut restored = 0;
        for id in std::iter::once(UNMAPPED_ORG).chain(ids.iter().map(|(id, _)| id)) {
            let idx = day_index(id, day);
            if let Some(value) = counters::prepared(self.slot(idx), day, known_of(id), how) {
                restored += usize::from(known_of(id).is_some());
                self.slots.insert(idx, value);
            }
        }
        Ok(restored)
    }

    fn write_day(&mut self, id: u32, counters: DayCounters) -> Result<(), FakeError> {
        self.slots.insert(day_index(id, counters.day), counters);
        Ok(())
    }

    fn reset_day(&mut self, id: u32, day: u64) -> Result<DayCounters, FakeError> {
        let (before, conns) = self.usage(id, day)?;
        let mut fresh = DayCounters::for_day(day);
        fresh.peak_connections = conns as u64;
        self.slots.insert(day_index(id, day), fresh);
        Ok(before)
    }

    fn clear_org(&mut self, id: u32) -> Result<(), FakeError> {
        for slot in 0..DAY_SLOTS {
            self.slots
                .insert(id * DAY_SLOTS + slot, DayCounters::default());
        }
        Ok(())
    }

    fn write_remote(&mut self, id: u32, day: u64, requests: u64) -> Result<(), FakeError> {
        self.remote
            .insert(day_index(id, day), RemoteCount { day, requests });
        Ok(())
    }

    fn write_clock(&mut self, clock: &Clock) -> Result<(), FakeError> {
        self.clock_offset_ns = Some(clock.offset_ns());
        Ok(())
    }

    fn faults(&self) -> Vec<(&'static str, u64)> {
        self.faults.clone()
    }

    fn tracer(&self) -> Result<u64, FakeError> {
        Ok(self.tracer)
    }

    fn clear_tracer(&mut self) -> Result<(), FakeError> {
        self.tracer = 0;
        Ok(())
    }

    fn read_applied(&self) -> Result<Applied, FakeError> {
        Ok(self.applied.clone())
    }

    fn apply(&mut self, old: &Applied, new: &Applied) -> Result<ApplyStats, FakeError> {
        if std::mem::take(&mut self.fail_apply) {
            // Half written, visibly: the caller must put the old tables back.
            let half = new.limits.len() / 2;
            self.applied.limits = new.limits[..half].to_vec();
            self.applied.cidrs = new.cidrs.clone();
            self.applied.keys = new.keys[..new.keys.len() / 2].to_vec();
            return Err(FakeError("writing limits: no space left".into()));
        }
        let old_cidrs: BTreeSet<_> = old.cidrs.iter().copied().collect();
        let new_cidrs: BTreeSet<_> = new.cidrs.iter().copied().collect();
        let old_limits: BTreeMap<u32, OrgLimits> = old.limits.iter().copied().collect();
        let new_limits: BTreeMap<u32, OrgLimits> = new.limits.iter().copied().collect();
        let limits_differ = |id: &u32| old_limits.get(id) != new_limits.get(id);
        let readdressed = old_cidrs
            .symmetric_difference(&new_cidrs)
            .map(|(_, id)| *id);
        let mut changed: Vec<u32> = old_limits
            .keys()
            .chain(new_limits.keys())
            .copied()
            .filter(limits_differ)
            .chain(readdressed)
            .collect();
        let keys = counters::KeyDiff::new(&old.keys, &new.keys);
        changed.extend(keys.orgs());
        changed.sort_unstable();
        changed.dedup();
        let stats = ApplyStats {
            keys_written: keys.write.len(),
            keys_removed: keys.remove.len(),
            cidrs_written: new_cidrs.difference(&old_cidrs).count(),
            cidrs_removed: old_cidrs.difference(&new_cidrs).count(),
            limits_written: new_limits.keys().filter(|id| limits_differ(id)).count(),
            orgs_changed: if old.kernel_config.is_none() {
                Vec::new()
            } else {
                changed
            },
        };
        self.applied = new.clone();
        Ok(stats)
    }

    fn org_capacity(&self) -> u32 {
        self.org_capacity
    }

    fn cidr_capacity(&self) -> u32 {
        self.cidr_capacity
    }

    fn key_capacity(&self) -> u32 {
        self.key_capacity
    }
}

/// A config file in `dir` with `orgs` (one /24 each, in order) and `extra` appended to its
/// `[api]` table; its state directory is `dir/state`.
pub fn config_text(dir: &std::path::Path, orgs: &[&str], extra: &str) -> String {
    let mut text = format!(
        "[api]\nports = [8080]\ncgroup = \"/sys/fs/cgroup\"\n{extra}\n[daemon]\nstate_dir = \"{}\"\n",
        dir.join("state").display()
    );
    for (i, name) in orgs.iter().enumerate() {
        text.push_str(&format!(
            "[[orgs]]\nname = \"{name}\"\ncidrs = [\"10.0.{i}.0/24\"]\n"
        ));
    }
    text
}

/// The org table a config's orgs get on a first start.
pub fn orgs_of(cfg: &crate::config::Config) -> super::Orgs {
    let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 64)
        .expect("test org names are distinct");
    let limits = crate::orgs::OrgLimitTable::new(cfg, &ids);
    super::Orgs { ids, limits }
}

/// Runs `f` and returns the log lines it wrote, as the JSON objects `daemon.log_format = "json"`
/// prints.
pub fn logged<T>(f: impl FnOnce() -> T) -> (T, Vec<serde_json::Value>) {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = lines.0.lock().map(|b| b.clone()).unwrap_or_default();
    let parsed = String::from_utf8_lossy(&text)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    (out, parsed)
}

/// The lines of `event` among `lines`.
pub fn events<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}
