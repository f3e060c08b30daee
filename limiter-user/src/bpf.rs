//! The bpf(2) commands aya does not offer: batch reads and writes of a map, opening a pinned
//! object, swapping a link's program, and the cgroup of a cgroup link.
//!
//! The attributes are the kernel's `union bpf_attr` as aya-obj generates it, filled through its
//! typed members.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::Pod;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info};

/// Elements per BPF_MAP_*_BATCH syscall.
const BATCH_CHUNK: usize = 16_384;

/// An all-zero attribute: the kernel wants every byte past the command's members zero. Members
/// are then set field by field: assigning a whole struct to a union member may copy its padding,
/// which is not zero.
fn zeroed<T: Copy>() -> T {
    // SAFETY: only used for the plain C structs and unions of the UAPI, for which zero is valid.
    unsafe { std::mem::zeroed() }
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a whole bpf_attr of the size passed, and every pointer in it points at a
    // buffer that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (BPF_OBJ_GET), for link updates aya does not offer for every link type.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    let mut attr = zeroed::<bpf_attr>();
    // SAFETY: the BPF_OBJ_* member of an all-zero attribute (valid as any member).
    let obj = unsafe { &mut attr.__bindgen_anon_4 };
    obj.pathname = c.as_ptr() as u64;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Points an existing bpf_link at a new program, atomically (BPF_LINK_UPDATE): an upgraded daemon
/// swaps programs without a moment in which nothing is attached.
pub fn link_update(link: &OwnedFd, prog: &impl AsRawFd) -> io::Result<()> {
    let mut attr = zeroed::<bpf_attr>();
    // SAFETY: as in `obj_get`, the BPF_LINK_UPDATE member.
    let update = unsafe { &mut attr.link_update };
    update.link_fd = link.as_raw_fd() as u32;
    update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The cgroup id (the cgroup directory's inode) a pinned cgroup link is attached to.
pub fn link_cgroup_id(link: &OwnedFd) -> io::Result<u64> {
    let mut info = zeroed::<bpf_link_info>();
    let mut attr = zeroed::<bpf_attr>();
    // SAFETY: as in `obj_get`, the BPF_OBJ_GET_INFO_BY_FD member.
    let get = unsafe { &mut attr.info };
    get.bpf_fd = link.as_raw_fd() as u32;
    get.info_len = size_of::<bpf_link_info>() as u32;
    get.info = &raw mut info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // SAFETY: the kernel filled the cgroup member of a cgroup link's info.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// The batch member of BPF_MAP_{LOOKUP,UPDATE}_BATCH's attribute.
fn batch_attr<K, V>(
    map: BorrowedFd<'_>,
    in_batch: Option<&u32>,
    out_batch: Option<&mut u32>,
    keys: *const K,
    values: *const V,
    count: usize,
) -> bpf_attr {
    let mut attr = zeroed::<bpf_attr>();
    // SAFETY: as in `obj_get`, the batch member.
    let batch = unsafe { &mut attr.batch };
    batch.in_batch = in_batch.map_or(0, |t| t as *const u32 as u64);
    batch.out_batch = out_batch.map_or(0, |t| t as *mut u32 as u64);
    batch.keys = keys as u64;
    batch.values = values as u64;
    batch.count = count as u32;
    batch.map_fd = map.as_raw_fd() as u32;
    attr
}

/// How many elements the kernel says a batch command did.
fn batch_done(attr: &bpf_attr) -> usize {
    // SAFETY: the batch member is the one the batch commands fill.
    unsafe { attr.batch.count as usize }
}

/// Writes `keys[i]` → `values[i]` with one syscall per chunk (BPF_MAP_UPDATE_BATCH): loading a
/// million orgs element by element costs seconds in syscalls alone.
pub fn update_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    let count = keys.len().min(values.len());
    let mut done = 0;
    while done < count {
        let n = (count - done).min(BATCH_CHUNK);
        let (k, v) = (keys[done..].as_ptr(), values[done..].as_ptr());
        let mut attr = batch_attr(map, None, None, k, v, n);
        sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)?;
        let did = batch_done(&attr);
        if did == 0 {
            return Err(io::Error::other("batch update made no progress"));
        }
        done += did;
    }
    Ok(())
}

/// Removes `keys` with one syscall per chunk (BPF_MAP_DELETE_BATCH). A key that is not there
/// ends the batch with ENOENT (what came before it is removed).
pub fn delete_batch<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(BATCH_CHUNK);
        let k = keys[done..].as_ptr();
        let mut attr = batch_attr::<K, u8>(map, None, None, k, std::ptr::null(), n);
        sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr)?;
        let did = batch_done(&attr);
        if did == 0 {
            return Err(io::Error::other("batch delete made no progress"));
        }
        done += did;
    }
    Ok(())
}

/// Reads up to `max` elements of a map (BPF_MAP_LOOKUP_BATCH; an array in index order) a chunk
/// per syscall, handing each chunk's keys and values to `each`, and returns how many there were.
/// One lookup per element cost seconds of syscalls per snapshot, report, cluster sync or restart
/// with a million orgs; keeping only what the caller needs keeps memory at one chunk.
pub fn lookup_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    max: usize,
    mut each: impl FnMut(&[K], &[V]),
) -> io::Result<usize> {
    let mut keys: Vec<K> = vec![zeroed_pod(); BATCH_CHUNK.min(max)];
    let mut values: Vec<V> = vec![zeroed_pod(); BATCH_CHUNK.min(max)];
    // The kernel's position token (an array index or a hash bucket), handed back each call.
    let (mut token, mut next) = (0u32, 0u32);
    let mut total = 0;
    while total < max {
        let n = (max - total).min(keys.len());
        let in_batch = (total > 0).then_some(&token);
        let (k, v) = (keys.as_mut_ptr(), values.as_mut_ptr());
        let mut attr = batch_attr(map, in_batch, Some(&mut next), k, v, n);
        let r = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        let did = batch_done(&attr).min(n);
        // ENOENT: the end of the map; what this call read still counts.
        let end = match r {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        each(&keys[..did], &values[..did]);
        total += did;
        if end {
            break;
        }
        if did == 0 {
            return Err(io::Error::other("batch lookup made no progress"));
        }
        token = next;
    }
    Ok(total)
}

/// A zero value of a map's key or value type.
fn zeroed_pod<T: Pod>() -> T {
    // SAFETY: `Pod` types are valid for any bytes, zeros included.
    unsafe { std::mem::zeroed() }
}
