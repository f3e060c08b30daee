//! What the daemon's components need of the kernel's maps, as one trait: the aya-backed maps
//! implement it by way of `counters`, and the components' tests use an in-memory fake, so no
//! component needs root to be tested.

use limiter_common::{DayCounters, TRACE_PID};

use crate::{
    clock::Clock,
    counters::{self, Applied, ApplyStats, CountersError, Prepare},
    loader::Kernel,
    orgs::OrgIds,
    snapshot::DaySnapshot,
};

/// Reads and writes of the kernel's maps, as the daemon's components make them.
pub trait KernelMaps {
    type Error: std::error::Error + Send + Sync + 'static;

    /// One org's counters of `day` (zeros if its slot holds another day) and its open
    /// connections.
    fn usage(&self, id: u32, day: u64) -> Result<(DayCounters, i64), Self::Error>;

    /// Calls `f(id, counters of day, open connections)` for org ids `0..=max_id` in order.
    fn each_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), Self::Error>;

    /// [`KernelMaps::each_usage`] with each slot as it is, tagged with whatever day it holds.
    fn each_slot_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), Self::Error>;

    /// Whether any slot of an org id up to `max_id` holds `day`.
    fn holds_day(&self, max_id: u32, day: u64) -> Result<bool, Self::Error>;

    /// Whether the kernel counted anything on `day` for an org id up to `max_id`.
    fn counted_on(&self, max_id: u32, day: u64) -> Result<bool, Self::Error>;

    /// Tags org `id`'s slot of `day` with `day` (zeroed if it held another day).
    fn prepare_day(&mut self, id: u32, day: u64) -> Result<(), Self::Error>;

    /// Prepares `day`'s slot of every org in `ids` and of unmapped traffic; returns how many
    /// took their counts from `known`.
    fn prepare_day_all(
        &mut self,
        ids: &OrgIds,
        day: u64,
        how: Prepare,
        known: Option<&DaySnapshot<'_>>,
    ) -> Result<usize, Self::Error>;

    /// Sets org `id`'s counters of `counters.day`.
    fn write_day(&mut self, id: u32, counters: DayCounters) -> Result<(), Self::Error>;

    /// Clears org `id`'s counters of `day`; returns what they were.
    fn reset_day(&mut self, id: u32, day: u64) -> Result<DayCounters, Self::Error>;

    /// Clears every day slot of org `id` (an id handed to a new org).
    fn clear_org(&mut self, id: u32) -> Result<(), Self::Error>;

    /// Sets what the other hosts of a cluster counted for org `id` on `day`.
    fn write_remote(&mut self, id: u32, day: u64, requests: u64) -> Result<(), Self::Error>;

    /// Rewrites the clock fields of the kernel's config from `clock` (the rest stays).
    fn write_clock(&mut self, clock: &Clock) -> Result<(), Self::Error>;

    /// The kernel's fault counters by name.
    fn faults(&self) -> Vec<(&'static str, u64)>;

    /// The pid of the `limiter trace` process the verdict writes records for (0: none).
    fn tracer(&self) -> Result<u64, Self::Error>;

    /// Turns tracing off.
    fn clear_tracer(&mut self) -> Result<(), Self::Error>;

    /// What the maps hold of a config now.
    fn read_applied(&self) -> Result<Applied, Self::Error>;

    /// Brings the maps from `old` to `new`.
    fn apply(&mut self, old: &Applied, new: &Applied) -> Result<ApplyStats, Self::Error>;

    /// How many org ids the maps have room for (id 0 included).
    fn org_capacity(&self) -> u32;

    /// How many address entries the maps have room for.
    fn cidr_capacity(&self) -> u32;

    /// How many API keys the maps have room for.
    fn key_capacity(&self) -> u32;
}

impl KernelMaps for Kernel {
    type Error = CountersError;

    fn usage(&self, id: u32, day: u64) -> Result<(DayCounters, i64), CountersError> {
        counters::usage(self, id, day)
    }

    fn each_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), CountersError> {
        counters::each_usage(self, max_id, day, f)
    }

    fn each_slot_usage(
        &self,
        max_id: u32,
        day: u64,
        f: &mut dyn FnMut(u32, DayCounters, i64),
    ) -> Result<(), CountersError> {
        counters::each_slot_usage(self, max_id, day, f)
    }

    fn holds_day(&self, max_id: u32, day: u64) -> Result<bool, CountersError> {
        counters::holds_day(self, max_id, day)
    }

    fn counted_on(&self, max_id: u32, day: u64) -> Result<bool, CountersError> {
        counters::counted_on(self, max_id, day)
    }

    fn prepare_day(&mut self, id: u32, day: u64) -> Result<(), CountersError> {
        counters::prepare_day(self, id, day)
    }

    fn prepare_day_all(
        &mut self,
        ids: &OrgIds,
        day: u64,
        how: Prepare,
        known: Option<&DaySnapshot<'_>>,
    ) -> Result<usize, CountersError> {
        counters::prepare_day_all(self, ids, day, how, known)
    }

    fn write_day(&mut self, id: u32, counters: DayCounters) -> Result<(), CountersError> {
        counters::write_day(self, id, counters)
    }

    fn reset_day(&mut self, id: u32, day: u64) -> Result<DayCounters, CountersError> {
        counters::reset_day(self, id, day)
    }

    fn clear_org(&mut self, id: u32) -> Result<(), CountersError> {
        counters::clear_org(self, id)
    }

    fn write_remote(&mut self, id: u32, day: u64, requests: u64) -> Result<(), CountersError> {
        counters::write_remote(self, id, day, requests)
    }

    fn write_clock(&mut self, clock: &Clock) -> Result<(), CountersError> {
        let map_err = |source| CountersError::Map {
            what: "CONFIG".into(),
            source,
        };
        let mut kc = self.config.get(&0, 0).map_err(map_err)?;
        kc.clock_offset_ns = clock.offset_ns();
        kc.day_len_ns = clock.day_len_ns;
        self.config.set(0, kc, 0).map_err(map_err)
    }

    fn faults(&self) -> Vec<(&'static str, u64)> {
        counters::faults(self)
    }

    fn tracer(&self) -> Result<u64, CountersError> {
        self.trace_on.get(&TRACE_PID, 0).map_err(trace_err)
    }

    fn clear_tracer(&mut self) -> Result<(), CountersError> {
        self.trace_on.set(TRACE_PID, 0, 0).map_err(trace_err)
    }

    fn read_applied(&self) -> Result<Applied, CountersError> {
        counters::read_applied(self)
    }

    fn apply(&mut self, old: &Applied, new: &Applied) -> Result<ApplyStats, CountersError> {
        counters::apply(self, old, new)
    }

    fn org_capacity(&self) -> u32 {
        Kernel::org_capacity(self)
    }

    fn cidr_capacity(&self) -> u32 {
        self.capacity.cidrs
    }

    fn key_capacity(&self) -> u32 {
        self.capacity.keys
    }
}

fn trace_err(source: aya::maps::MapError) -> CountersError {
    CountersError::Map {
        what: "TRACE_ON".into(),
        source,
    }
}
