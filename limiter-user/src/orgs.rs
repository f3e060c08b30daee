//! Org ids and the address table.
//!
//! The kernel knows orgs only by a small integer id (an index into the org maps); this module
//! assigns those ids (stable across reloads, so counts stay with their org) and turns CIDRs into
//! keys of the address trie.

use std::sync::Arc;

use ipnet::IpNet;
use limiter_common::{AddrKey, UNMAPPED_ORG, v4_mapped};

/// The name reports use for traffic of no org (id 0).
pub const UNMAPPED_NAME: &str = "unmapped";

/// Which org name owns which kernel id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgIds {
    /// foldhash and one shared allocation per name: SipHash and a second copy of every name were
    /// most of the cost of building this for a million orgs.
    by_name: foldhash::HashMap<Arc<str>, u32>,
    /// Index = id; slot 0 (unmapped) and freed slots are None.
    names: Vec<Option<Arc<str>>>,
}

impl OrgIds {
    /// Assigns ids to `names`, keeping the id of every name `previous` already had. Slots of removed
    /// orgs are reused only once fresh ones run out, so a new org does not inherit a removed org's
    /// counts of the same day.
    pub fn assign<'a>(
        names: impl IntoIterator<Item = &'a str>,
        previous: Option<&OrgIds>,
        capacity: u32,
    ) -> Result<Self, OrgIdError> {
        let wanted: Vec<&str> = names.into_iter().collect();
        let mut ids = OrgIds {
            by_name: foldhash::HashMap::with_capacity_and_hasher(wanted.len(), Default::default()),
            names: Vec::with_capacity(wanted.len() + 1),
        };
        ids.names.push(None);
        if let Some(prev) = previous {
            ids.names.resize(prev.names.len(), None);
            for name in &wanted {
                if let Some((name, &id)) = prev.by_name.get_key_value(*name) {
                    ids.names[id as usize] = Some(name.clone());
                    ids.by_name.insert(name.clone(), id);
                }
            }
        }
        // Slots of removed orgs, lowest first; used only once fresh slots run out.
        let mut reusable: Vec<usize> = (1..ids.names.len())
            .rev()
            .filter(|&id| ids.names[id].is_none())
            .collect();
        for name in wanted {
            if previous.is_some() && ids.by_name.contains_key(name) {
                continue;
            }
            let id = if (ids.names.len() as u32) < capacity {
                ids.names.push(None);
                ids.names.len() - 1
            } else {
                reusable.pop().ok_or(OrgIdError::Full { capacity })?
            };
            let name: Arc<str> = Arc::from(name);
            if ids.by_name.insert(name.clone(), id as u32).is_some() {
                return Err(OrgIdError::Duplicate(name.to_string()));
            }
            ids.names[id] = Some(name);
        }
        Ok(ids)
    }

    /// The ids already in the kernel (read back from its maps after a restart).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, String)>) -> Self {
        let mut ids = OrgIds {
            by_name: foldhash::HashMap::default(),
            names: vec![None],
        };
        for (id, name) in pairs {
            if id == UNMAPPED_ORG {
                continue;
            }
            if ids.names.len() <= id as usize {
                ids.names.resize(id as usize + 1, None);
            }
            let name: Arc<str> = Arc::from(name);
            ids.by_name.insert(name.clone(), id);
            ids.names[id as usize] = Some(name);
        }
        ids
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The id of `name`, the `index`-th org of the config: on a first start that is id
    /// `index + 1`, found without hashing; otherwise looked up.
    pub fn id_at(&self, index: usize, name: &str) -> Option<u32> {
        match self.names.get(index + 1) {
            Some(Some(n)) if **n == *name => Some(index as u32 + 1),
            _ => self.id(name),
        }
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        if id == UNMAPPED_ORG {
            return Some(UNMAPPED_NAME);
        }
        self.names.get(id as usize)?.as_deref()
    }

    /// The highest id in use (0 when there are no orgs).
    pub fn max_id(&self) -> u32 {
        self.names.len().saturating_sub(1) as u32
    }

    /// (id, name) of every org, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(id, n)| Some((id as u32, n.as_deref()?)))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrgIdError {
    #[error(
        "more orgs than the kernel maps hold ({capacity} slots, slot 0 is for unmapped traffic)"
    )]
    Full { capacity: u32 },
    #[error("org {0:?} is listed twice")]
    Duplicate(String),
}

/// The LPM trie key of a CIDR: IPv4 nets become IPv4-mapped IPv6 nets (prefix + 96), so one trie
/// serves both families and an IPv4 client on a dual-stack socket matches its IPv4 org.
pub fn lpm_key(net: &IpNet) -> (u32, AddrKey) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.prefix_len()) + 96,
            v4_mapped(n.network().octets()),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_across_reassignment() {
        let a = OrgIds::assign(["a", "b", "c"], None, 100).unwrap();
        assert_eq!(
            (a.id("a"), a.id("b"), a.id("c")),
            (Some(1), Some(2), Some(3))
        );
        let b = OrgIds::assign(["c", "d", "a"], Some(&a), 100).unwrap();
        assert_eq!(b.id("a"), Some(1));
        assert_eq!(b.id("c"), Some(3));
        // "b"'s slot is not handed to the newcomer while fresh slots remain.
        assert_eq!(b.id("d"), Some(4));
        assert_eq!(b.name(2), None);
        assert_eq!(b.name(0), Some(UNMAPPED_NAME));
        // The positional guess never overrides the real id.
        assert_eq!(
            (b.id_at(0, "c"), b.id_at(1, "d"), b.id_at(2, "a")),
            (Some(3), Some(4), Some(1))
        );
        assert_eq!(a.id_at(1, "b"), Some(2));
        assert_eq!(a.id_at(7, "zz"), None);
        assert_eq!(
            OrgIds::assign(["a", "a"], None, 10),
            Err(OrgIdError::Duplicate("a".into()))
        );
    }

    #[test]
    fn full_capacity_reuses_stale_slots_then_fails() {
        let a = OrgIds::assign(["a", "b"], None, 3).unwrap();
        let b = OrgIds::assign(["a", "x"], Some(&a), 3).unwrap();
        assert_eq!(b.id("x"), Some(2));
        assert_eq!(
            OrgIds::assign(["a", "x", "y"], Some(&b), 3),
            Err(OrgIdError::Full { capacity: 3 })
        );
    }

    #[test]
    fn lpm_keys_map_v4_into_v6() {
        let (len, key) = lpm_key(&"192.0.2.0/24".parse().unwrap());
        assert_eq!(len, 120);
        assert_eq!(&key[10..], &[0xff, 0xff, 192, 0, 2, 0]);
        let (len, key) = lpm_key(&"2001:db8::/32".parse().unwrap());
        assert_eq!(len, 32);
        assert_eq!(&key[..4], &[0x20, 0x01, 0x0d, 0xb8]);
    }
}
