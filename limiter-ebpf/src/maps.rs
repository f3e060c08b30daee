//! The maps, as limiter-common's [`map_layout!`](limiter_common::map_layout) declares them, and
//! the globals the daemon sets at load.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf, SockHash},
};
use limiter_common::{
    MAX_SOCKETS,
    layout::{self, MapSpec, built_in_entries},
};

type Key<M> = <M as MapSpec>::Key;
type Value<M> = <M as MapSpec>::Value;

/// One `#[map]` static per entry of the layout, typed and sized by the entry's [`MapSpec`].
macro_rules! ebpf_maps {
    ($(
        $(#[$doc:meta])*
        $name:ident: $kind:ident<$k:ty, $v:ty> = $entries:expr, $pin:ident;
    )*) => {
        $( ebpf_map!($(#[$doc])* $name: $kind); )*
    };
}

macro_rules! ebpf_map {
    ($(#[$doc:meta])* $name:ident: Array) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: Array<Value<layout::$name>> =
            Array::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: HashMap) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: HashMap<Key<layout::$name>, Value<layout::$name>> =
            HashMap::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: LazyHashMap) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: HashMap<Key<layout::$name>, Value<layout::$name>> =
            HashMap::with_max_entries(built_in_entries::<layout::$name>(), BPF_F_NO_PREALLOC);
    };
    ($(#[$doc:meta])* $name:ident: LpmTrie) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: LpmTrie<Key<layout::$name>, Value<layout::$name>> =
            LpmTrie::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: PerCpuArray) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: PerCpuArray<Value<layout::$name>> =
            PerCpuArray::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: ProgramArray) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: ProgramArray =
            ProgramArray::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: RingBuf) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: RingBuf =
            RingBuf::with_byte_size(built_in_entries::<layout::$name>(), 0);
    };
    ($(#[$doc:meta])* $name:ident: SkStorage) => {
        $(#[$doc])*
        #[btf_map]
        pub(crate) static $name: SkStorage<Value<layout::$name>> = SkStorage::new();
    };
    ($(#[$doc:meta])* $name:ident: SockHash) => {
        $(#[$doc])*
        #[map]
        pub(crate) static $name: SockHash<Key<layout::$name>> =
            SockHash::with_max_entries(built_in_entries::<layout::$name>(), 0);
    };
}

limiter_common::map_layout!(ebpf_maps);

/// Which cookie bits pick a socket's SOCK_SLOTS entry (set at load; the tests narrow it so
/// sockets share slots).
#[unsafe(no_mangle)]
pub(crate) static SOCK_SLOT_MASK: u32 = MAX_SOCKETS - 1;
/// Inbound sockets with state (the daemon lowers it only for tests).
#[unsafe(no_mangle)]
pub(crate) static SOCK_CAPACITY: u32 = MAX_SOCKETS;
/// This daemon start's programs (set at load, unique per start).
#[unsafe(no_mangle)]
pub(crate) static GENERATION: u64 = 0;
