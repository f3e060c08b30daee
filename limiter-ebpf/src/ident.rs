//! The kernel's tables behind [`Resolve`]: API key digests, the address tables and the trusted
//! proxies, and the counts a request of another org than its chunk's takes at once.

use aya_ebpf::maps::lpm_trie::Key;
use limiter_common::{AddrKey, KernelConfig, UNMAPPED_ORG, stream::Resolve};

use crate::{
    addr::org_of,
    atomic::add,
    days::{Counter, add_by, count, day_counters},
    maps::{API_KEYS, ORG_LIMITS, TRUSTED_PROXIES},
    quota::daily_verdict,
    shared::today,
};

pub(crate) struct KernelResolve<'a> {
    pub(crate) cfg: &'a KernelConfig,
}

/// Whether `addr` is one of the trusted proxies.
#[inline(always)]
pub(crate) fn trusted(addr: &AddrKey) -> bool {
    TRUSTED_PROXIES.get(&Key::new(128, *addr)).is_some()
}

impl Resolve for KernelResolve<'_> {
    #[inline(always)]
    fn key_org(&self, digest: u64) -> Option<u32> {
        // SAFETY: read-only lookup of a plain value.
        unsafe { API_KEYS.get(&digest) }.copied()
    }

    #[inline(always)]
    fn addr_org(&self, addr: &AddrKey) -> u32 {
        org_of(*addr)
    }

    #[inline(always)]
    fn trusted(&self, addr: &AddrKey) -> bool {
        trusted(addr)
    }

    #[inline(always)]
    fn count_now(&self, org: u32, via: u8, media: bool) -> bool {
        let day = today(self.cfg);
        let Some(slot) = day_counters(org, day) else {
            return true;
        };
        add_by(slot, via, 1);
        if media {
            // SAFETY: valid map value.
            add(unsafe { &raw mut (*slot).exempt_media_gets }, 1);
            return true;
        }
        daily_verdict(org, day, slot, ORG_LIMITS.get(org), 1).is_none()
    }

    #[inline(always)]
    fn unknown_key(&self) {
        count(UNMAPPED_ORG, self.cfg, Counter::UnknownKey);
    }
}
