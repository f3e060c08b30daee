//! Peer addresses, and the org that owns one.

use aya_ebpf::maps::lpm_trie::Key;
use limiter_common::{AddrKey, UNMAPPED_ORG, v4_mapped};

use crate::maps::{ORG_BY_ADDR, ORG_BY_HOST};

const AF_INET: u32 = 2;

const AF_INET6: u32 = 10;

/// The org owning an address (IPv4 as IPv4-mapped IPv6), or the unmapped slot.
#[inline(always)]
pub(crate) fn org_of(addr: AddrKey) -> u32 {
    // SAFETY: read-only lookup of a plain value.
    if let Some(org) = unsafe { ORG_BY_HOST.get(&addr) } {
        return *org;
    }
    let key = Key::new(128, addr);
    ORG_BY_ADDR.get(&key).copied().unwrap_or(UNMAPPED_ORG)
}

/// Reads the peer address of a context (`bpf_sock_ops`, `__sk_buff`, `sk_msg_md`) field by field
/// with volatile loads: the verifier rejects context loads through a computed pointer, which
/// copying the `remote_ip6` array produces.
macro_rules! peer_addr {
    ($ctx:expr) => {{
        let ctx = $ctx;
        // SAFETY: `ctx` is the program's context pointer; these are plain u32 fields.
        unsafe {
            use core::ptr::read_volatile as rv;
            let family = rv(&raw const (*ctx).family);
            let ip4 = rv(&raw const (*ctx).remote_ip4);
            let ip6 = [
                rv(&raw const (*ctx).remote_ip6[0]),
                rv(&raw const (*ctx).remote_ip6[1]),
                rv(&raw const (*ctx).remote_ip6[2]),
                rv(&raw const (*ctx).remote_ip6[3]),
            ];
            $crate::addr::addr_key(family, ip4, ip6)
        }
    }};
}
pub(crate) use peer_addr;

#[inline(always)]
pub(crate) fn addr_key(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<AddrKey> {
    match family {
        AF_INET => Some(v4_mapped(ip4.to_ne_bytes())),
        AF_INET6 => {
            let mut k = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let b = ip6[i].to_ne_bytes();
                k[i * 4] = b[0];
                k[i * 4 + 1] = b[1];
                k[i * 4 + 2] = b[2];
                k[i * 4 + 3] = b[3];
                i += 1;
            }
            Some(k)
        }
        _ => None,
    }
}
