//! Thin wrappers over the Linux system calls the testbed needs (setns, pidfds, bpffs mounts, and
//! sockets created by a short-lived forked helper inside the server netns and cgroup).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Converts a path for libc calls.
pub(super) fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// Moves the calling thread into the network namespace behind `ns` (net ns is per thread).
pub(super) fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid, open fd.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A process we started, tracked by pidfd so a recycled pid can never be signalled by mistake.
pub(super) struct Tracked {
    pub pid: u32,
    pidfd: OwnedFd,
}

impl Tracked {
    pub fn open(pid: u32) -> Result<Tracked> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("pidfd_open");
        }
        // SAFETY: the kernel just handed us this fd and nobody else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Tracked { pid, pidfd })
    }

    /// SIGKILL; a process that already exited (or was reaped) is fine.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal on our own pidfd; null siginfo is allowed.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Waits until the process has exited (pidfd becomes readable), then reaps it if it is our
    /// child and nobody reaped it yet. Returns false on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return false;
        }
        // SAFETY: zeroed siginfo is a valid out-parameter; WNOHANG never blocks; ECHILD (not our
        // child, or already reaped by the owner of the Child) is ignored.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            );
        }
        true
    }
}

/// Mounts a fresh bpffs instance (each `mount -t bpf` is a new, private superblock).
pub(super) fn mount_bpffs(dir: &Path) -> Result<()> {
    let target = cpath(dir)?;
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mount -t bpf bpf {}", dir.display()));
    }
    Ok(())
}

/// Unmounts `dir`; falls back to a lazy unmount when it is busy. Not mounted counts as success.
pub(super) fn umount(dir: &Path) -> Result<()> {
    let target = cpath(dir)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => {
            // SAFETY: valid C string.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
                    .with_context(|| format!("umount {} (first attempt: {err})", dir.display()))
            }
        }
    }
}

/// Mount points (from /proc/self/mountinfo) equal to or below `prefix`, deepest first.
pub(super) fn mounts_under(prefix: &Path) -> Vec<std::path::PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<std::path::PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(std::path::PathBuf::from)
        .filter(|p| p.starts_with(prefix))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Start time (clock ticks since boot) of a live process, to tell a pid from its reuse.
pub(super) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields we want follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come field 3 (state) onwards; starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Does a process with this pid exist (zombies included)?
pub(super) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Writes "1" to `<cgroup>/cgroup.kill` and waits (bounded) until the cgroup is empty.
pub(super) fn kill_cgroup(cgroup: &Path, timeout: Duration) {
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::read_to_string(cgroup.join("cgroup.events")) {
            Ok(ev) if ev.lines().any(|l| l.trim() == "populated 1") => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return,
        }
    }
}

/// Removes a cgroup directory, killing its members first; retries while the kernel still
/// holds exiting tasks (EBUSY).
pub(super) fn remove_cgroup(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    kill_cgroup(cgroup, Duration::from_secs(5));
    let mut last = None;
    for _ in 0..100 {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("rmdir {}", cgroup.display())),
        None => Ok(()),
    }
}

/// One socket for [`sockets_in`] to create.
#[derive(Clone, Copy, Debug)]
pub(super) struct SockSpec {
    /// Local address; port 0 and an unspecified IP with `listen == false` mean "do not bind".
    pub addr: SocketAddr,
    /// Bind and listen (backlog 1024).
    pub listen: bool,
}

/// Most sockets one helper call may create (one SCM_RIGHTS message).
const MAX_SOCKS: usize = 16;

/// Converts a std address into a sockaddr for the raw syscalls.
fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Prepared, allocation-free description of one socket for the forked child.
struct RawSpec {
    family: libc::c_int,
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    bind: bool,
    listen: bool,
    dual_stack: bool,
}

/// Status message the helper child sends back: ok flag, errno, failing step.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HelperStatus {
    ok: i32,
    errno: i32,
    step: i32,
    index: i32,
}

/// Creates TCP sockets that live in the netns `netns` and belong to the cgroup whose
/// `cgroup.procs` is `procs`, without moving this (multi-threaded) process.
///
/// Why: a socket's cgroup is fixed at creation from the creating task, and writing to
/// `cgroup.procs` moves a whole process. A forked helper that only performs raw system calls
/// (async-signal-safe) joins the cgroup and netns, creates the sockets and passes them back
/// over a Unix socket with SCM_RIGHTS, then exits. Accepted sockets inherit the listener's
/// cgroup, so an in-process server on these listeners is observed by cgroup programs.
/// All sockets are non-blocking and close-on-exec.
pub(super) fn sockets_in(netns: &File, procs: &CStr, specs: &[SockSpec]) -> Result<Vec<OwnedFd>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    if specs.len() > MAX_SOCKS {
        bail!("at most {MAX_SOCKS} sockets per call");
    }
    let raw: Vec<RawSpec> = specs
        .iter()
        .map(|s| {
            let (addr, len) = to_sockaddr(&s.addr);
            let family = if s.addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            let bind = s.listen || s.addr.port() != 0 || !s.addr.ip().is_unspecified();
            let dual_stack = matches!(s.addr, SocketAddr::V6(a) if a.ip().is_unspecified());
            RawSpec {
                family,
                addr,
                len,
                bind,
                listen: s.listen,
                dual_stack,
            }
        })
        .collect();

    let mut pair = [0 as RawFd; 2];
    // SAFETY: valid out array of two ints.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error()).context("socketpair");
    }
    // SAFETY: socketpair returned two fresh fds that we now own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };

    // Everything the child touches is prepared above; the child only makes raw syscalls.
    let netns_fd = netns.as_raw_fd();
    let child_fd = theirs.as_raw_fd();
    // SAFETY: fork in a multi-threaded process is sound as long as the child only calls
    // async-signal-safe functions before _exit, which `helper_child` guarantees.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: see above; never returns.
        unsafe { helper_child(netns_fd, procs, &raw, child_fd) }
    }
    drop(theirs);
    let result = receive_fds(&ours, raw.len());
    // Reap the helper (it exits right after sending).
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

/// The forked helper's body: join netns and cgroup, create sockets, send them, exit.
///
/// SAFETY: must only be called in a freshly forked child; uses raw syscalls only.
unsafe fn helper_child(netns_fd: RawFd, procs: &CStr, specs: &[RawSpec], chan: RawFd) -> ! {
    unsafe {
        let fail = |step: i32, index: i32| -> ! {
            let st = HelperStatus {
                ok: 0,
                errno: *libc::__errno_location(),
                step,
                index,
            };
            libc::send(
                chan,
                &st as *const _ as *const libc::c_void,
                std::mem::size_of::<HelperStatus>(),
                0,
            );
            libc::_exit(1)
        };
        if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
            fail(1, -1);
        }
        let pfd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if pfd < 0 {
            fail(2, -1);
        }
        if libc::write(pfd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
            fail(3, -1);
        }
        libc::close(pfd);
        let mut fds = [0 as libc::c_int; MAX_SOCKS];
        for (i, s) in specs.iter().enumerate() {
            let fd = libc::socket(
                s.family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                fail(4, i as i32);
            }
            let one: libc::c_int = 1;
            let zero: libc::c_int = 0;
            let isz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                isz,
            );
            if s.dual_stack
                && libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    &zero as *const _ as *const libc::c_void,
                    isz,
                ) != 0
            {
                fail(5, i as i32);
            }
            if s.bind && libc::bind(fd, &s.addr as *const _ as *const libc::sockaddr, s.len) != 0 {
                fail(6, i as i32);
            }
            if s.listen && libc::listen(fd, 1024) != 0 {
                fail(7, i as i32);
            }
            fds[i] = fd;
        }
        let st = HelperStatus {
            ok: 1,
            errno: 0,
            step: 0,
            index: 0,
        };
        let mut iov = libc::iovec {
            iov_base: &st as *const _ as *mut libc::c_void,
            iov_len: std::mem::size_of::<HelperStatus>(),
        };
        // Big enough for MAX_SOCKS fds; u64 for cmsghdr alignment.
        let mut cbuf = [0u64; 32];
        let payload = (specs.len() * std::mem::size_of::<libc::c_int>()) as u32;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg) as *mut libc::c_int,
            specs.len(),
        );
        if libc::sendmsg(chan, &msg, 0) < 0 {
            libc::_exit(2);
        }
        libc::_exit(0)
    }
}

/// Receives the helper's status and, on success, `n` file descriptors.
fn receive_fds(chan: &OwnedFd, n: usize) -> Result<Vec<OwnedFd>> {
    let mut st = HelperStatus::default();
    let mut iov = libc::iovec {
        iov_base: &mut st as *mut _ as *mut libc::c_void,
        iov_len: std::mem::size_of::<HelperStatus>(),
    };
    let mut cbuf = [0u64; 32];
    // SAFETY: zeroed msghdr is valid; we fill in buffers that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msg points at valid buffers; MSG_CMSG_CLOEXEC keeps the fds close-on-exec.
    let got = unsafe { libc::recvmsg(chan.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error()).context("receiving sockets from the helper");
    }
    let mut fds = Vec::with_capacity(n);
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if got as usize != std::mem::size_of::<HelperStatus>() {
        bail!("socket helper exited without reporting (got {got} bytes)");
    }
    if st.ok != 1 {
        let step = match st.step {
            1 => "setns into the server netns",
            2 => "open cgroup.procs",
            3 => "join the cgroup",
            4 => "socket()",
            5 => "IPV6_V6ONLY=0",
            6 => "bind()",
            7 => "listen()",
            _ => "unknown step",
        };
        let err = io::Error::from_raw_os_error(st.errno);
        if st.index >= 0 {
            bail!(
                "socket helper: {step} for socket #{} failed: {err}",
                st.index
            );
        }
        bail!("socket helper: {step} failed: {err}");
    }
    if fds.len() != n {
        bail!("socket helper sent {} sockets, expected {n}", fds.len());
    }
    Ok(fds)
}

/// Sets IPV6_V6ONLY on a socket (false = dual stack: IPv4 clients arrive as mapped addresses).
pub(super) fn set_v6only(fd: RawFd, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    // SAFETY: valid fd and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exclusive flock on a directory, released on drop. Locking a directory that always exists
/// (rather than a lock file) leaves nothing behind.
pub(super) fn lock_dir(dir: &Path) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on an fd we own; blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("locking {}", dir.display()));
    }
    Ok(f)
}
