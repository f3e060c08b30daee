//! Org ids and the address table.
//!
//! The kernel knows orgs only by a small integer id (an index into the org maps); this module
//! assigns those ids (stable across reloads, so counts stay with their org) and turns CIDRs into
//! keys of the address trie.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use ipnet::IpNet;
use limiter_common::{AddrKey, UNMAPPED_ORG, v4_mapped};

use crate::config::{Config, EffectiveLimits};

/// The name reports use for traffic of no org (id 0).
pub const UNMAPPED_NAME: &str = "unmapped";

/// Which org name owns which kernel id.
///
/// Compact, because the daemon keeps it for its whole life: with a million orgs a map of owned
/// names cost about 100 bytes per org; this costs the name's bytes plus about 14.
#[derive(Clone, Default)]
pub struct OrgIds {
    /// Every name, back to back in id order.
    text: String,
    /// `ends[id]`: where id's name ends in `text` (it starts where id - 1's ends). Id 0
    /// (unmapped) and freed ids have empty names.
    ends: Vec<u32>,
    /// The ids, found by the hash of their name.
    index: HashTable<u32>,
}

/// A fixed seed: the index is never shared or persisted, and a fixed one keeps runs alike.
fn name_hash(name: &str) -> u64 {
    foldhash::fast::FixedState::with_seed(0x006c_696d_6974_6572).hash_one(name)
}

impl PartialEq for OrgIds {
    /// The same names with the same ids (freed ids past the last do not matter).
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for OrgIds {
    /// The first few orgs: a million names are no help in a message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgIds")
            .field("len", &self.len())
            .field("max_id", &self.max_id())
            .field("first", &self.iter().take(8).collect::<Vec<_>>())
            .finish()
    }
}

impl Eq for OrgIds {}

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
        // slots[id]: the name given id; built first, so the text is laid out in id order.
        let mut slots: Vec<Option<&str>> = Vec::with_capacity(wanted.len() + 1);
        slots.push(None);
        let mut kept = vec![false; wanted.len()];
        if let Some(prev) = previous {
            slots.resize(prev.ends.len().max(1), None);
            for (i, name) in wanted.iter().enumerate() {
                if let Some(id) = prev.id(name) {
                    let slot = &mut slots[id as usize];
                    if slot.is_some() {
                        return Err(OrgIdError::Duplicate(name.to_string()));
                    }
                    *slot = Some(name);
                    kept[i] = true;
                }
            }
        }
        // Slots of removed orgs, lowest first; used only once fresh slots run out.
        let mut reusable: Vec<usize> = (1..slots.len())
            .rev()
            .filter(|&id| slots[id].is_none())
            .collect();
        for (name, kept) in wanted.iter().zip(kept) {
            if kept {
                continue;
            }
            if (slots.len() as u32) < capacity {
                slots.push(Some(name));
            } else {
                let id = reusable.pop().ok_or(OrgIdError::Full { capacity })?;
                slots[id] = Some(name);
            }
        }
        Self::from_slots(&slots)
    }

    /// The table of `slots[id]` = name; two ids with one name are an error.
    fn from_slots(slots: &[Option<&str>]) -> Result<Self, OrgIdError> {
        let mut ids = OrgIds {
            text: String::with_capacity(slots.iter().flatten().map(|n| n.len()).sum()),
            ends: Vec::with_capacity(slots.len().max(1)),
            index: HashTable::with_capacity(slots.len()),
        };
        ids.ends.push(0);
        for (id, name) in slots.iter().enumerate().skip(1) {
            if let Some(name) = name {
                let hash = name_hash(name);
                if ids.find(hash, name).is_some() {
                    return Err(OrgIdError::Duplicate(name.to_string()));
                }
                ids.text.push_str(name);
                let text = &ids.text;
                let ends = &ids.ends;
                ids.index.insert_unique(hash, id as u32, |&other| {
                    name_hash(span(text, ends, other as usize).unwrap_or(""))
                });
            }
            ids.ends.push(ids.text.len() as u32);
        }
        Ok(ids)
    }

    /// The ids already in the kernel (read back from its maps after a restart).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (u32, &'a str)>,
    ) -> Result<Self, OrgIdError> {
        let mut slots: Vec<Option<&str>> = vec![None];
        for (id, name) in pairs {
            if id == UNMAPPED_ORG {
                continue;
            }
            if slots.len() <= id as usize {
                slots.resize(id as usize + 1, None);
            }
            slots[id as usize] = Some(name);
        }
        Self::from_slots(&slots)
    }

    fn find(&self, hash: u64, name: &str) -> Option<u32> {
        self.index
            .find(hash, |&id| {
                span(&self.text, &self.ends, id as usize).is_some_and(|n| n == name)
            })
            .copied()
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.find(name_hash(name), name)
    }

    /// The id of `name`, the `index`-th org of the config: on a first start that is id
    /// `index + 1`, found without hashing; otherwise looked up.
    pub fn id_at(&self, index: usize, name: &str) -> Option<u32> {
        match span(&self.text, &self.ends, index + 1) {
            Some(n) if n == name => Some(index as u32 + 1),
            _ => self.id(name),
        }
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        if id == UNMAPPED_ORG {
            return Some(UNMAPPED_NAME);
        }
        span(&self.text, &self.ends, id as usize)
    }

    /// The highest id in use (0 when there are no orgs).
    pub fn max_id(&self) -> u32 {
        self.ends.len().saturating_sub(1) as u32
    }

    /// How many orgs have ids.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// (id, name) of every org, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        (1..self.ends.len()).filter_map(|id| Some((id as u32, span(&self.text, &self.ends, id)?)))
    }
}

/// The name of `id` in an [`OrgIds`] text; None for id 0, freed ids and ids past the end.
fn span<'t>(text: &'t str, ends: &[u32], id: usize) -> Option<&'t str> {
    let end = *ends.get(id)? as usize;
    let start = match id {
        0 => return None,
        _ => *ends.get(id - 1)? as usize,
    };
    text.get(start..end).filter(|n| !n.is_empty())
}

/// The limits of every org, for the daemon's lifetime: only orgs that differ from `[limits]`
/// are stored, so a million orgs on the defaults cost nothing here.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgLimitTable {
    default: EffectiveLimits,
    /// (id, limits), sorted by id.
    overrides: Vec<(u32, EffectiveLimits)>,
}

impl OrgLimitTable {
    pub fn new(cfg: &Config, ids: &OrgIds) -> Self {
        let default = cfg.default_limits();
        let mut overrides: Vec<(u32, EffectiveLimits)> = cfg
            .orgs
            .iter()
            .enumerate()
            .filter_map(|(index, org)| {
                let l = cfg.limits_for(org);
                (l != default).then(|| Some((ids.id_at(index, &org.name)?, l)))?
            })
            .collect();
        overrides.sort_unstable_by_key(|(id, _)| *id);
        OrgLimitTable { default, overrides }
    }

    /// The limits of org `id` (the defaults for an id of no org).
    pub fn get(&self, id: u32) -> EffectiveLimits {
        match self.overrides.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(at) => self.overrides[at].1,
            Err(_) => self.default,
        }
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
    fn the_compact_table_finds_every_name_by_id_and_back() {
        let names: Vec<String> = (0..20_000).map(|i| format!("org-{i}")).collect();
        let a = OrgIds::assign(names.iter().map(String::as_str), None, 30_000).unwrap();
        assert_eq!((a.len(), a.max_id()), (20_000, 20_000));
        for (i, n) in names.iter().enumerate() {
            assert_eq!(a.id(n), Some(i as u32 + 1));
            assert_eq!(a.name(i as u32 + 1), Some(n.as_str()));
        }
        assert_eq!(a.id("org-20000"), None);
        assert_eq!(a.name(20_001), None);
        // Drop every other org: their ids are freed, the rest keep theirs.
        let kept = names.iter().step_by(2).map(String::as_str);
        let b = OrgIds::assign(kept, Some(&a), 30_000).unwrap();
        assert_eq!((b.len(), b.max_id()), (10_000, 20_000));
        assert_eq!((b.id("org-2"), b.id("org-3")), (Some(3), None));
        assert_eq!(b.name(4), None);
        // What the kernel reads back is the same table.
        let pairs: Vec<(u32, &str)> = b.iter().collect();
        assert_eq!(OrgIds::from_pairs(pairs.iter().copied()).unwrap(), b);
        assert_ne!(b, a);
        assert_eq!(
            OrgIds::from_pairs([(1, "x"), (2, "x")]),
            Err(OrgIdError::Duplicate("x".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn reassignment_keeps_ids_and_finds_every_name(
            first in proptest::collection::hash_set("[a-z]{1,6}", 0..40),
            second in proptest::collection::hash_set("[a-z]{1,6}", 0..40),
        ) {
            let a = OrgIds::assign(first.iter().map(String::as_str), None, 100).unwrap();
            let b = OrgIds::assign(second.iter().map(String::as_str), Some(&a), 100).unwrap();
            for n in &second {
                let id = b.id(n).unwrap();
                proptest::prop_assert_eq!(b.name(id), Some(n.as_str()));
                if first.contains(n) {
                    proptest::prop_assert_eq!(a.id(n), Some(id));
                }
            }
            for n in first.difference(&second) {
                proptest::prop_assert_eq!(b.id(n), None);
            }
            let listed: std::collections::HashSet<String> =
                b.iter().map(|(_, n)| n.to_string()).collect();
            proptest::prop_assert_eq!(listed, second);
        }
    }

    #[test]
    fn only_orgs_off_the_defaults_are_stored() {
        let cfg = Config::parse(
            "[api]\nports = [8080]\n[limits]\ndaily_requests = 100\n\
             [[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.1\"]\n\
             [[orgs]]\nname = \"b\"\ncidrs = [\"10.0.0.2\"]\nquota_mode = \"dry-run\"\n\
             [[orgs]]\nname = \"c\"\ncidrs = [\"10.0.0.3\"]\ndaily_requests = 100\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let ids = OrgIds::assign(cfg.orgs.iter().map(|o| o.name.as_str()), None, 10).unwrap();
        let t = OrgLimitTable::new(&cfg, &ids);
        // "c" overrides with the default value: nothing to store.
        assert_eq!(t.overrides.len(), 1);
        assert_eq!(t.get(1), cfg.default_limits());
        assert_eq!(t.get(2).quota_mode, crate::config::QuotaMode::DryRun);
        assert_eq!(t.get(2).daily_requests, 100);
        assert_eq!(t.get(3), cfg.limits_for(&cfg.orgs[2]));
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
