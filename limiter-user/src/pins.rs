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
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use limiter_common::{
    API_SOCKS_FACTOR, AddrKey, Config, DAY_SLOTS, DayCounters, EVENTS_BYTES, FAULT_COUNT,
    MAX_API_PORTS, MAX_CIDRS, MAX_ORGS, MAX_SOCKETS, OrgLimits, RemoteCount, SOCK_FORMAT, SockSlot,
    SockState, names,
    reply::Scratch,
    stream::{MEDIA_MATCH_ENTRIES, WALK_SLOTS, WalkSlot},
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
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            orgs: MAX_ORGS,
            cidrs: MAX_CIDRS,
        }
    }
}

impl Capacity {
    /// What `cfg`'s orgs and CIDRs need.
    pub fn for_config(cfg: &crate::config::Config) -> Self {
        Self::for_counts(cfg.orgs.len(), cfg.cidr_count())
    }

    pub fn for_counts(orgs: usize, cidrs: usize) -> Self {
        let up = |n: usize, min: u32| (n.max(1).next_power_of_two() as u32).max(min);
        Capacity {
            orgs: up(orgs + 1, MAX_ORGS),
            cidrs: up(cidrs, MAX_CIDRS),
        }
    }
}

/// (name, key size, value size, max entries) of a pinned map.
pub type MapShape = (&'static str, u32, u32, u32);

/// Every pinned map: the layout's and the shared socket tables.
pub fn expected_maps(cap: Capacity) -> Vec<MapShape> {
    let mut all = layout_maps(cap);
    all.extend(socket_maps());
    all
}

/// The maps of one layout (in its own directory): what the config's size decides, and what the
/// programs of that layout own.
pub fn layout_maps(cap: Capacity) -> Vec<MapShape> {
    let sz = |n: usize| n as u32;
    vec![
        (names::CONFIG, 4, sz(size_of::<Config>()), 1),
        (names::API_PORTS, 2, 1, MAX_API_PORTS),
        (
            names::ORG_BY_ADDR,
            sz(4 + size_of::<AddrKey>()),
            4,
            cap.cidrs,
        ),
        (names::ORG_BY_HOST, sz(size_of::<AddrKey>()), 4, cap.cidrs),
        (names::ORG_LIMITS, 4, sz(size_of::<OrgLimits>()), cap.orgs),
        (names::ORG_CONNS, 4, 8, cap.orgs),
        (
            names::ORG_DAYS,
            4,
            sz(size_of::<DayCounters>()),
            cap.orgs * DAY_SLOTS,
        ),
        (
            names::ORG_REMOTE,
            4,
            sz(size_of::<RemoteCount>()),
            cap.orgs * DAY_SLOTS,
        ),
        (names::EVENTS, 0, 0, EVENTS_BYTES),
        (names::FAULTS, 4, 8, FAULT_COUNT),
        (names::SCRATCH, 4, sz(size_of::<Scratch>()), 1),
        (names::MEDIA_MATCH, 4, 1, MEDIA_MATCH_ENTRIES),
        (names::WALK, 4, sz(size_of::<WalkSlot>()), WALK_SLOTS),
        (names::REFUSE, 4, 4, 1),
    ]
}

/// The socket tables, shared by every layout.
pub fn socket_maps() -> Vec<MapShape> {
    let cap = sock_capacity();
    vec![
        (names::SOCK_STATE, 8, size_of::<SockState>() as u32, cap),
        (
            names::SOCK_SLOTS,
            4,
            size_of::<SockSlot>() as u32,
            MAX_SOCKETS,
        ),
        (names::SOCK_COUNT, 4, 8, 1),
        (names::API_SOCKS, 8, 4, cap * API_SOCKS_FACTOR),
        (names::PUSH_SOCKS, 8, 4, MAX_SOCKETS),
        (names::SOCK_GEN, 4, 8, 1),
        (names::VERDICT_NEXT, 4, 4, 1),
        (names::PUSH_NEXT, 4, 4, 1),
    ]
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
    for (name, k, v, m) in maps {
        eat(name.as_bytes());
        eat(&k.to_le_bytes());
        eat(&v.to_le_bytes());
        eat(&m.to_le_bytes());
    }
    for x in extra {
        eat(&x.to_le_bytes());
    }
    h as u32
}

/// A short name for the map layout: a hash of the layout's maps' names and sizes.
pub fn layout_version(cap: Capacity) -> String {
    format!("v1-{:08x}", shape_hash(&layout_maps(cap), &[]))
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
    for &(name, key, value, max) in maps {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for (what, pinned, expected) in [
            ("key size", info.key_size(), key),
            ("value size", info.value_size(), value),
            ("max entries", info.max_entries(), max),
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

fn bpf(cmd: libc::c_int, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: the bpf syscall with a zero-padded attribute buffer of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (BPF_OBJ_GET), for link updates aya does not offer for every link type.
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_int = 7;
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Points an existing bpf_link at a new program, atomically (BPF_LINK_UPDATE): an upgraded daemon
/// swaps programs without a moment in which nothing is attached.
pub fn link_update(link: &OwnedFd, prog: &impl AsRawFd) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_int = 29;
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Elements per BPF_MAP_*_BATCH syscall.
const BATCH_CHUNK: usize = 16_384;

/// The `batch` attribute of BPF_MAP_{LOOKUP,UPDATE}_BATCH.
fn batch_attr(
    map: &OwnedFd,
    in_batch: Option<&u32>,
    out_batch: Option<&mut u32>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> [u8; 128] {
    let mut attr = [0u8; 128];
    if let Some(t) = in_batch {
        attr[..8].copy_from_slice(&(t as *const u32 as u64).to_ne_bytes());
    }
    if let Some(t) = out_batch {
        attr[8..16].copy_from_slice(&(t as *mut u32 as u64).to_ne_bytes());
    }
    attr[16..24].copy_from_slice(&(keys as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(values as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&(count as u32).to_ne_bytes());
    attr[36..40].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr
}

/// How many elements the kernel says a batch command did.
fn batch_done(attr: &[u8; 128]) -> usize {
    let mut did = [0u8; 4];
    did.copy_from_slice(&attr[32..36]);
    u32::from_ne_bytes(did) as usize
}

/// Writes many elements with one syscall per chunk (BPF_MAP_UPDATE_BATCH): loading a million
/// orgs element by element costs seconds in syscalls alone. `keys` and `values` hold `count`
/// packed elements each.
pub fn update_batch(
    map: &OwnedFd,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
    if count == 0 {
        return Ok(());
    }
    let (ksz, vsz) = (keys.len() / count, values.len() / count);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(BATCH_CHUNK);
        let (k, v) = (keys[done * ksz..].as_ptr(), values[done * vsz..].as_ptr());
        let mut attr = batch_attr(map, None, None, k, v, n);
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        let did = batch_done(&attr);
        if did == 0 {
            return Err(std::io::Error::other("batch update made no progress"));
        }
        done += did;
    }
    Ok(())
}

/// Reads up to `max` elements of a map (BPF_MAP_LOOKUP_BATCH; an array in index order) a chunk
/// per syscall, handing each chunk's packed keys and values to `each`, and returns how many there
/// were. One lookup per element cost seconds of syscalls per snapshot, report, cluster sync or
/// restart with a million orgs; keeping only what the caller needs keeps memory at one chunk.
pub fn lookup_batch_chunks(
    map: &OwnedFd,
    key_size: usize,
    value_size: usize,
    max: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> std::io::Result<usize> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;
    let mut kbuf = vec![0u8; BATCH_CHUNK * key_size];
    let mut vbuf = vec![0u8; BATCH_CHUNK * value_size];
    // The kernel's position token (an array index or a hash bucket), handed back each call.
    let (mut token, mut next) = (0u32, 0u32);
    let mut total = 0;
    while total < max {
        let n = (max - total).min(BATCH_CHUNK);
        let in_batch = (total > 0).then_some(&token);
        let mut attr = batch_attr(
            map,
            in_batch,
            Some(&mut next),
            kbuf.as_mut_ptr(),
            vbuf.as_mut_ptr(),
            n,
        );
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let did = batch_done(&attr);
        // ENOENT: the end of the map; what this call read still counts.
        let end = match r {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        each(&kbuf[..did * key_size], &vbuf[..did * value_size]);
        total += did;
        if end {
            break;
        }
        if did == 0 {
            return Err(std::io::Error::other("batch lookup made no progress"));
        }
        token = next;
    }
    Ok(total)
}

/// The cgroup id (the cgroup directory's inode) a pinned cgroup link is attached to.
pub fn link_cgroup_id(link: &OwnedFd) -> std::io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
    let mut info = [0u8; 64];
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned) { struct { u64 cgroup_id; ... } } }
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    Ok(u64::from_ne_bytes(id))
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
    }
}
