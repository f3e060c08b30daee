//! Writing the config into the kernel maps ([`tables`]) and reading the counters back
//! ([`days`]), through the handles the loader holds open.

mod days;
mod tables;

use std::os::fd::{AsFd as _, BorrowedFd};

use aya::{
    Pod,
    maps::{IterableMap, MapError},
};
use limiter_common::{FAULT_COUNT, FAULT_NAMES, layout::MapSpec};
use thiserror::Error;

pub use self::{days::*, tables::*};
use crate::loader::Kernel;

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

/// The kernel's fault counters by name.
pub fn faults(kernel: &Kernel) -> Vec<(&'static str, u64)> {
    (0..FAULT_COUNT)
        .filter_map(|i| {
            let name = FAULT_NAMES.get(i as usize)?;
            Some((*name, kernel.faults.get(&i, 0).unwrap_or(0)))
        })
        .collect()
}
