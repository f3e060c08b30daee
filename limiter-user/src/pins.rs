//! The pin directory: where maps and program links live in bpffs so the kernel keeps counting and
//! enforcing while the daemon restarts, and where a new daemon picks them up again.
//!
//! Layout: `<pin_dir>/<layout>/` with one file per org-side map (by name) and one per link
//! (`link_sock_ops`, `link_xdp_<iface>`). `<layout>` names the map layout (types and sizes), so a
//! build with another layout never reuses incompatible maps.
//!
//! The socket tables live apart in `<pin_dir>/v1-socks-<hash>/`: their sizes do not follow the
//! config, so every layout shares them, and a restart that resizes the org maps keeps the live
//! connections in them (see `limiter-ebpf`'s `forward`).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use limiter_common::{
    DAY_FORMAT, MAX_CIDRS, MAX_ORGS, MAX_SOCKETS, MIN_API_KEYS, SOCK_FORMAT,
    ident::KEY_DIGEST_FORMAT,
    layout::{MAPS, MapDef, Pin, Sizes},
};
use thiserror::Error;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "{path} is not on a bpffs mount: mount one (mount -t bpf bpf /sys/fs/bpf) or set daemon.pin_dir to a directory on bpffs"
    )]
    NotBpffs { path: String },
    #[error(
        "{path} is owned by uid {uid} with mode {mode:04o}: whoever can write there can swap limiter's pinned maps and programs; the pin directory must be owned by root and not writable by group or others (chown root {path} && chmod go-w {path})"
    )]
    Unsafe { path: String, uid: u32, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} does not match this build ({what}: pinned {pinned}, expected {expected}); remove it with `limiter unload`"
    )]
    Mismatch {
        path: String,
        what: &'static str,
        pinned: u32,
        expected: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How many orgs and address-table entries the maps hold: at least the defaults, more when the
/// config needs it (rounded up to a power of two, which leaves room for reloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Org slots, slot 0 (unmapped) included.
    pub orgs: u32,
    pub cidrs: u32,
    /// API key slots.
    pub keys: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            orgs: MAX_ORGS,
            cidrs: MAX_CIDRS,
            keys: MIN_API_KEYS,
        }
    }
}

impl Capacity {
    /// What `cfg`'s orgs, CIDRs and API keys need.
    pub fn for_config(cfg: &crate::config::Config) -> Self {
        Self::for_counts(cfg.orgs.len(), cfg.cidr_count()).with_keys(cfg.key_count())
    }

    pub fn for_counts(orgs: usize, cidrs: usize) -> Self {
        Capacity {
            orgs: up(orgs + 1, MAX_ORGS),
            cidrs: up(cidrs, MAX_CIDRS),
            keys: MIN_API_KEYS,
        }
    }

    /// This capacity with room for `keys` API keys.
    pub fn with_keys(self, keys: usize) -> Self {
        Capacity {
            keys: up(keys, MIN_API_KEYS),
            ..self
        }
    }
}

/// `n` rounded up to a power of two, at least `min`.
fn up(n: usize, min: u32) -> u32 {
    (n.max(1).next_power_of_two() as u32).max(min)
}

impl Capacity {
    /// The sizes the maps are made with: these, and the socket capacity.
    pub fn sizes(self) -> Sizes {
        Sizes {
            orgs: self.orgs,
            cidrs: self.cidrs,
            keys: self.keys,
            sockets: sock_capacity(),
        }
    }
}

/// A map as it is pinned: what must match for a pinned map to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapShape {
    pub const fn of(def: &MapDef, sizes: Sizes) -> Self {
        MapShape {
            name: def.name,
            key_size: def.key_size,
            value_size: def.value_size,
            max_entries: def.max_entries(sizes),
        }
    }
}

/// Every pinned map: the layout's and the shared socket tables.
pub fn expected_maps(cap: Capacity) -> Vec<MapShape> {
    let sizes = cap.sizes();
    MAPS.iter().map(|def| MapShape::of(def, sizes)).collect()
}

/// The maps pinned in `pin`'s directory, in the layout's order.
fn pinned_in(pin: Pin, cap: Capacity) -> Vec<MapShape> {
    let sizes = cap.sizes();
    MAPS.iter()
        .filter(|def| def.pin == pin)
        .map(|def| MapShape::of(def, sizes))
        .collect()
}

/// The maps of one layout (in its own directory): what the config's size decides, and what the
/// programs of that layout own.
pub fn layout_maps(cap: Capacity) -> Vec<MapShape> {
    pinned_in(Pin::Layout, cap)
}

/// The socket tables, shared by every layout.
pub fn socket_maps() -> Vec<MapShape> {
    pinned_in(Pin::Sockets, Capacity::default())
}

/// A short hash of map shapes and extra words.
fn shape_hash(maps: &[MapShape], extra: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    for m in maps {
        eat(m.name.as_bytes());
        eat(&m.key_size.to_le_bytes());
        eat(&m.value_size.to_le_bytes());
        eat(&m.max_entries.to_le_bytes());
    }
    for x in extra {
        eat(&x.to_le_bytes());
    }
    h as u32
}

/// A short name for the map layout: a hash of the layout's maps' names and sizes, and of what
/// their values mean (the day counters' fields, the API keys' digest).
pub fn layout_version(cap: Capacity) -> String {
    format!(
        "v1-{:08x}",
        shape_hash(&layout_maps(cap), &[DAY_FORMAT, KEY_DIGEST_FORMAT])
    )
}

/// The name of the shared socket tables' directory. Sockets sit in the slot their cookie picks
/// under the mask they were admitted with, and their state means what [`SOCK_FORMAT`] says: a
/// program with another mask or format must not take over those maps.
pub fn socket_version() -> String {
    let extra = [sock_slot_mask(), sock_capacity(), SOCK_FORMAT];
    format!("v1-socks-{:08x}", shape_hash(&socket_maps(), &extra))
}

/// How many inbound sockets get state: [`MAX_SOCKETS`], unless a test asks for fewer with
/// `LIMITER_TEST_SOCK_CAPACITY=n` (only with `LIMITER_TEST_HOOKS`) so that a few dozen idle
/// connections fill the tables.
pub fn sock_capacity() -> u32 {
    crate::hooks::value::<u32>("LIMITER_TEST_SOCK_CAPACITY")
        .filter(|n| (4..=MAX_SOCKETS).contains(n))
        .unwrap_or(MAX_SOCKETS)
}

/// Which socket-cookie bits pick a socket's slot: all slots, unless a test asks for fewer with
/// `LIMITER_TEST_SOCK_SLOTS=n` (a power of two; only with `LIMITER_TEST_HOOKS`) so that sockets
/// share slots and the fallback table is used.
pub fn sock_slot_mask() -> u32 {
    crate::hooks::value::<u32>("LIMITER_TEST_SOCK_SLOTS")
        .filter(|n| n.is_power_of_two() && *n <= MAX_SOCKETS)
        .map_or(MAX_SOCKETS - 1, |n| n - 1)
}

/// The directory of this build's pins under `pin_dir`.
pub fn layout_dir(pin_dir: &Path, cap: Capacity) -> PathBuf {
    pin_dir.join(layout_version(cap))
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: zeroed statfs is a valid out value; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Where one daemon's pins go.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// `<pin_dir>/<layout>`: the org-side maps and the links.
    pub layout: PathBuf,
    /// The shared socket tables.
    pub socks: PathBuf,
}

/// Makes sure `pin_dir` and this build's directories exist on bpffs. `/sys/fs/bpf` itself is
/// mounted when it is not yet (as after a reboot on systems that do not mount it).
pub fn prepare(pin_dir: &Path, cap: Capacity) -> Result<Dirs, PinError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(sys_bpf) && fs_magic(sys_bpf).is_ok_and(|m| m != BPF_FS_MAGIC) {
        let (src, dst, ty) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: plain mount(2) with NUL-terminated strings.
        if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) } != 0
        {
            return Err(io(sys_bpf)(std::io::Error::last_os_error()));
        }
    }
    let dirs = Dirs {
        layout: layout_dir(pin_dir, cap),
        socks: pin_dir.join(socket_version()),
    };
    for existing in [pin_dir, dirs.layout.as_path(), dirs.socks.as_path()] {
        check_owner(existing)?;
    }
    for dir in [&dirs.layout, &dirs.socks] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if fs_magic(dir).map_err(io(dir))? != BPF_FS_MAGIC {
            return Err(PinError::NotBpffs {
                path: pin_dir.display().to_string(),
            });
        }
    }
    Ok(dirs)
}

/// Whether a directory with this owner and mode may hold the pins: root's, and writable by root
/// alone.
pub fn safe_owner(uid: u32, mode: u32) -> bool {
    uid == 0 && mode & 0o022 == 0
}

/// Refuses an existing pin directory that someone other than root could write to; a missing
/// one is created by root.
fn check_owner(path: &Path) -> Result<(), PinError> {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(path) {
        Ok(m) if safe_owner(m.uid(), m.mode()) => Ok(()),
        Ok(m) => Err(PinError::Unsafe {
            path: path.display().to_string(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Checks every map of `maps` already pinned in `dir` against this build; true when any was
/// pinned (the daemon resumes from the kernel's state rather than starting fresh).
pub fn check_existing(dir: &Path, maps: &[MapShape]) -> Result<bool, PinError> {
    let mut any = false;
    for m in maps {
        let path = dir.join(m.name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for (what, pinned, expected) in [
            ("key size", info.key_size(), m.key_size),
            ("value size", info.value_size(), m.value_size),
            ("max entries", info.max_entries(), m.max_entries),
        ] {
            if pinned != expected {
                return Err(PinError::Mismatch {
                    path: path.display().to_string(),
                    what,
                    pinned,
                    expected,
                });
            }
        }
    }
    Ok(any)
}

/// Removes every pin directory under `pin_dir` except `keep` (another layout: an older build, or
/// other capacities): their programs must not keep running beside the new ones.
pub fn unload_others(pin_dir: &Path, keep: &[&Path]) -> Result<Vec<String>, PinError> {
    unload_matching(pin_dir, |d| !keep.contains(&d))
}

/// Moves the links pinned by other layouts under `pin_dir` into `dir` where `dir` has none of
/// that name, so that they are updated in place to this layout's programs (an atomic swap: no
/// moment with neither or both attached) rather than detached and attached anew.
pub fn adopt_links(pin_dir: &Path, dir: &Path) -> Result<(), PinError> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let other = entry.path();
        if other == dir || !other.is_dir() || !entry.file_name().to_string_lossy().starts_with('v')
        {
            continue;
        }
        for f in std::fs::read_dir(&other).map_err(io(&other))?.flatten() {
            let name = f.file_name();
            let to = dir.join(&name);
            if name.to_string_lossy().starts_with("link_") && !to.exists() {
                std::fs::rename(f.path(), &to).map_err(io(&f.path()))?;
            }
        }
    }
    Ok(())
}

/// Removes every pin directory (maps and links): the programs detach once nothing holds them.
pub fn unload(pin_dir: &Path) -> Result<Vec<String>, PinError> {
    unload_matching(pin_dir, |_| true)
}

fn unload_matching(
    pin_dir: &Path,
    remove: impl Fn(&Path) -> bool,
) -> Result<Vec<String>, PinError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || !entry.file_name().to_string_lossy().starts_with('v') || !remove(&dir) {
            continue;
        }
        for f in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            std::fs::remove_file(f.path()).map_err(io(&f.path()))?;
            removed.push(f.path().display().to_string());
        }
        std::fs::remove_dir(&dir).map_err(io(&dir))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_may_write_the_pin_directory() {
        assert!(safe_owner(0, 0o40700));
        assert!(safe_owner(0, 0o40755));
        assert!(safe_owner(0, 0o41700));
        assert!(!safe_owner(1000, 0o40700), "not root's");
        assert!(!safe_owner(0, 0o40775), "group-writable");
        assert!(!safe_owner(0, 0o40757), "world-writable");
        assert!(!safe_owner(0, 0o41777), "sticky does not help");
    }

    #[test]
    fn layout_version_is_stable_and_short() {
        let cap = Capacity::default();
        assert_eq!(layout_version(cap), layout_version(cap));
        assert!(layout_version(cap).starts_with("v1-") && layout_version(cap).len() == 11);
        assert!(socket_version().starts_with("v1-socks-"));
        assert_ne!(
            layout_version(cap),
            layout_version(Capacity::for_counts(1_000_000, 1_000_000))
        );
    }

    #[test]
    fn capacity_grows_in_powers_of_two() {
        assert_eq!(Capacity::for_counts(10, 10), Capacity::default());
        let c = Capacity::for_counts(1_000_000, 1_000_000);
        assert_eq!((c.orgs, c.cidrs), (1 << 20, 1 << 20));
        assert_eq!(Capacity::for_counts(65_535, 10).orgs, 65_536);
        assert_eq!(Capacity::for_counts(65_536, 10).orgs, 131_072);
        let base = Capacity::for_counts(10, 10);
        assert_eq!(base.with_keys(0).keys, MIN_API_KEYS);
        assert_eq!(base.with_keys(MIN_API_KEYS as usize).keys, MIN_API_KEYS);
        assert_eq!(
            base.with_keys(MIN_API_KEYS as usize + 1).keys,
            2 * MIN_API_KEYS
        );
        assert_eq!(base.with_keys(1_000_000).keys, 1 << 20);
    }
}
