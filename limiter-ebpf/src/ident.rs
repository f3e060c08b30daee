//! Trusted proxies: the peers whose PROXY headers are believed.

use aya_ebpf::maps::lpm_trie::Key;
use limiter_common::AddrKey;

use crate::maps::TRUSTED_PROXIES;

/// Whether `addr` is one of `api.trusted_proxies`.
#[inline(always)]
pub(crate) fn trusted(addr: &AddrKey) -> bool {
    TRUSTED_PROXIES.get(&Key::new(128, *addr)).is_some()
}
