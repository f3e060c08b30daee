//! The testbed: a private world for the demo, the bench and the integration tests, plus the test
//! HTTP server, clients and push sender that drive real traffic through it.
//!
//! A [`Testbed`] owns two network namespaces (`lt-<id>-s`, the API host, and `lt-<id>-c`, the
//! customers) joined by one veth pair, a cgroup v2 (`<cgroup2>/limiter-tb-<id>`, the one the
//! limiter's programs attach to), a private bpffs and a scratch directory
//! (`/tmp/limiter-tb-<id>`). Everything carries a per-instance id (`<pid>x<counter>`) so
//! testbeds run in parallel, and everything is removed on drop, also when a test fails;
//! [`cleanup_stale`] removes what crashed runs left behind. Traffic only ever goes to addresses
//! inside these namespaces.

mod client;
pub mod http;
mod peers;
mod server;
mod sys;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use client::{
    CHUNK_PAUSE, HttpConn, PUSH_TIMEOUT, ParsedResponse, PushArgs, RAW_GRACE, RAW_READ_TIMEOUT,
    REQUEST_TIMEOUT, Request, Response, exchange_raw, http_requests, open_idle, parse_response,
    push_main, push_on, reset, send_raw,
};
pub use peers::{
    CLIENT_TIMEOUT_SECS, Cert, Curl, CurlReply, curl_command, haproxy_conf, make_cert,
    nginx_tls_conf, parse_curl_output, write_private,
};
pub use server::{
    API_KEY_HEADER, AccessEntry, AccessLog, FORWARDED_HEADER, HELD_PREFIX, LoggedRequest, Origin,
    SLOW_PREFIX, ServeArgs, ServerHandle, bind_listener, parse_access_log, parse_proxy_header,
    proxy_v1_header, proxy_v2_header, read_access_log, serve, serve_in_thread, serve_main,
};

/// The hidden `limiter-lab testbed …` commands (helpers for the demo and the integration tests).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TestbedCommand {
    /// Run the test API server.
    Serve(ServeArgs),
    /// Push webhook POSTs to a receiver.
    Push(PushArgs),
}

/// Runs a `limiter-lab testbed …` command.
pub fn run_command(cmd: TestbedCommand) -> Result<()> {
    match cmd {
        TestbedCommand::Serve(a) => serve_main(a),
        TestbedCommand::Push(a) => push_main(a),
    }
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct TestbedOptions {
    /// A label (e.g. "demo" or the test name), recorded in the scratch dir's `owner` file.
    pub name: String,
    /// Extra client IPv4 addresses (10.a.b.10, .11, …), at most 200.
    pub clients_v4: usize,
    /// Extra client IPv6 addresses (fd00:a:b::10, ::11, …), at most 200.
    pub clients_v6: usize,
}

/// Which namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The API host (`lt-<id>-s`).
    Server,
    /// The customers (`lt-<id>-c`).
    Client,
}

const NETNS_DIR: &str = "/run/netns";
const TMP_PREFIX: &str = "/tmp/limiter-tb-";
const CGROUP_PREFIX: &str = "limiter-tb-";
/// Suffix of the sibling cgroup for client-side children (so they can be killed as a group
/// without being observed by the limiter's programs).
const CLIENT_CGROUP_SUFFIX: &str = "-c";
/// How long `new` waits for the veth link to carry traffic.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// A port nothing listens on in a fresh namespace: the RST proves reachability.
const PROBE_PORT: u16 = 9;

/// Per-process counter for unique ids.
static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Ids of this process's live testbeds (so `cleanup_stale` spares them).
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn live_ids() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every name derived from an id (shared by teardown and `cleanup_stale`).
#[derive(Debug, Clone)]
struct Names {
    id: String,
    dir: PathBuf,
    bpffs: PathBuf,
    cgroup: PathBuf,
    client_cgroup: PathBuf,
    ns_server: String,
    ns_client: String,
}

impl Names {
    fn new(id: &str, cgroup_root: &Path) -> Names {
        let dir = PathBuf::from(format!("{TMP_PREFIX}{id}"));
        Names {
            id: id.to_string(),
            bpffs: dir.join("bpffs"),
            dir,
            cgroup: cgroup_root.join(format!("{CGROUP_PREFIX}{id}")),
            client_cgroup: cgroup_root.join(format!("{CGROUP_PREFIX}{id}{CLIENT_CGROUP_SUFFIX}")),
            ns_server: format!("lt-{id}-s"),
            ns_client: format!("lt-{id}-c"),
        }
    }

    /// Removes everything these names refer to; returns what failed (best effort, all steps run).
    fn remove_all(&self) -> Vec<anyhow::Error> {
        let mut errs = Vec::new();
        // Processes first: they keep namespaces, cgroups and mounts busy.
        sys::kill_cgroup(&self.cgroup, Duration::from_secs(5));
        sys::kill_cgroup(&self.client_cgroup, Duration::from_secs(5));
        for ns in [&self.ns_server, &self.ns_client] {
            if let Err(e) = remove_netns(ns) {
                errs.push(e);
            }
        }
        for cg in [&self.cgroup, &self.client_cgroup] {
            if let Err(e) = sys::remove_cgroup(cg) {
                errs.push(e);
            }
        }
        // Rounds, because mounts can be stacked on one mount point.
        for _ in 0..16 {
            let mounts = sys::mounts_under(&self.dir);
            if mounts.is_empty() {
                break;
            }
            for m in mounts {
                if let Err(e) = sys::umount(&m) {
                    errs.push(e);
                }
            }
        }
        if self.dir.exists() {
            let left = sys::mounts_under(&self.dir);
            if !left.is_empty() {
                // Never recurse into a live bpffs: that would unpin someone's maps.
                errs.push(anyhow!(
                    "{} still has mounts {left:?}; not removing it",
                    self.dir.display()
                ));
            } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                // NotFound: a concurrent cleanup (another process) got there first.
                if e.kind() != std::io::ErrorKind::NotFound {
                    errs.push(anyhow!(e).context(format!("removing {}", self.dir.display())));
                }
            }
        }
        errs
    }
}

/// Deletes a named netns (`ip netns del`), falling back to doing by hand what it does.
fn remove_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    if run("ip", &["netns", "del", name]).is_ok() && !path.exists() {
        return Ok(());
    }
    let _ = sys::umount(&path);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("removing netns {name}"))),
    }
}

/// Runs a command, failing with its stderr.
fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n <ns> -batch -` with the given lines (one `ip` invocation per namespace).
fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    {
        let mut stdin = child.stdin.take().context("ip stdin")?;
        stdin
            .write_all(lines.join("\n").as_bytes())
            .context("writing ip commands")?;
        stdin.write_all(b"\n").context("writing ip commands")?;
    }
    let out = child.wait_with_output().context("waiting for ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch failed: {}\ncommands:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// The cgroup2 mount point (from mountinfo; `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split(' ').next() == Some("cgroup2") {
            if let Some(mp) = pre.split(' ').nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    bail!("no cgroup2 file system is mounted")
}

/// FNV-1a, to spread ids over the 10.a.b.0/24 address space.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `<pid>x<hex counter>` → pid, for ids of the expected shape only.
fn id_pid(id: &str) -> Option<u32> {
    let (pid, n) = id.split_once('x')?;
    let ok = !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok { pid.parse().ok() } else { None }
}

/// Was the testbed `id` made by a process that is gone (or by an earlier life of this pid)?
fn is_stale(id: &str) -> bool {
    let Some(pid) = id_pid(id) else { return false };
    if pid == std::process::id() {
        return !live_ids().contains(id);
    }
    if !sys::pid_alive(pid) {
        return true;
    }
    // The pid exists: stale only if it provably belongs to another process now.
    let owner = std::fs::read_to_string(format!("{TMP_PREFIX}{id}/owner")).unwrap_or_default();
    match owner
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(start) => sys::process_start_time(pid).is_some_and(|now| now != start),
        None => false,
    }
}

/// Removes leftovers of testbeds whose creating process no longer exists: netns, cgroups (their
/// processes killed), bpffs mounts and scratch dirs. Live testbeds (of any process) are left
/// alone. Returns the ids cleaned; an error lists what could not be removed.
pub fn cleanup_stale() -> Result<Vec<String>> {
    // One sweeper at a time across processes (parallel test binaries all sweep at start).
    let _lock = sys::lock_dir(Path::new("/tmp"))?;
    let mut ids = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_prefix("lt-")
                .and_then(|r| r.strip_suffix("-s").or_else(|| r.strip_suffix("-c")))
            {
                ids.insert(id.to_string());
            }
        }
    }
    let cg_root = cgroup2_mount().ok();
    if let Some(root) = &cg_root {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = name.strip_prefix(CGROUP_PREFIX) {
                    ids.insert(
                        rest.strip_suffix(CLIENT_CGROUP_SUFFIX)
                            .unwrap_or(rest)
                            .to_string(),
                    );
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/tmp") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("limiter-tb-") {
                ids.insert(id.to_string());
            }
        }
    }
    for m in sys::mounts_under(Path::new("/tmp")) {
        if let Some(rest) = m.to_string_lossy().strip_prefix(TMP_PREFIX) {
            if let Some(id) = rest.split('/').next() {
                ids.insert(id.to_string());
            }
        }
    }
    let cg_root = cg_root.unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"));
    let mut cleaned = Vec::new();
    let mut errs = Vec::new();
    for id in ids
        .into_iter()
        .filter(|id| id_pid(id).is_some() && is_stale(id))
    {
        let e = Names::new(&id, &cg_root).remove_all();
        if e.is_empty() {
            tracing::info!(id = %id, "removed a stale testbed");
        }
        errs.extend(e);
        cleaned.push(id);
    }
    if !errs.is_empty() {
        bail!(
            "cleaning stale testbeds: {}",
            errs.iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(cleaned)
}

/// Finds the product binary `limiter` (the daemon and CLI the lab drives): `$LIMITER_BIN`, or a
/// `limiter` next to the current executable or one directory up (cargo puts test binaries in
/// `target/<profile>/deps/`).
pub fn limiter_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LIMITER_BIN") {
        return Ok(PathBuf::from(p));
    }
    near_current_exe("limiter").context("build it (cargo build), or set LIMITER_BIN")
}

/// Finds the lab binary `limiter-lab`, which runs the helpers (`limiter-lab testbed serve|push`)
/// inside a testbed: `$LIMITER_LAB_BIN`, the current executable if it is `limiter-lab`, the one
/// next to [`limiter_exe`], or one near the current executable.
pub fn lab_exe() -> Result<PathBuf> {
    const NAME: &str = "limiter-lab";
    if let Some(p) = std::env::var_os("LIMITER_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    if exe.file_name().is_some_and(|n| n == NAME) {
        return Ok(exe);
    }
    if let Some(beside) = limiter_exe().ok().map(|l| l.with_file_name(NAME))
        && beside.is_file()
    {
        return Ok(beside);
    }
    near_current_exe(NAME).context("build it (cargo build -p limiter-lab), or set LIMITER_LAB_BIN")
}

/// A file `name` next to the current executable or one directory up.
fn near_current_exe(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the current executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    bail!("no `{name}` binary found near {}", exe.display())
}

/// `limiter-lab testbed serve …` as a command for [`Testbed::spawn_in_server`].
pub fn serve_command(exe: &Path, args: &ServeArgs) -> Command {
    let mut c = Command::new(exe);
    c.args(["testbed", "serve"]);
    for l in &args.listen {
        c.arg("--listen").arg(l.to_string());
    }
    c.arg("--log")
        .arg(&args.log)
        .arg("--body-bytes")
        .arg(args.body_bytes.to_string());
    if args.proxy_protocol {
        c.arg("--proxy-protocol");
    }
    c
}

/// `limiter-lab testbed push …` as a command for [`Testbed::spawn_in_server`].
pub fn push_command(exe: &Path, args: &PushArgs) -> Command {
    let mut c = Command::new(exe);
    c.args([
        "testbed",
        "push",
        "--to",
        &args.to.to_string(),
        "--count",
        &args.count.to_string(),
    ]);
    c.args([
        "--path",
        &args.path,
        "--body-bytes",
        &args.body_bytes.to_string(),
    ]);
    c
}

/// A private world; see the module docs. Dropping it removes everything it made.
pub struct Testbed {
    names: Names,
    label: String,
    server_v4: Ipv4Addr,
    server_v6: Ipv6Addr,
    client_v4: Ipv4Addr,
    client_v6: Ipv6Addr,
    clients_v4: Vec<Ipv4Addr>,
    clients_v6: Vec<Ipv6Addr>,
    ns_server_fd: Option<File>,
    ns_client_fd: Option<File>,
    server_procs: CString,
    client_procs: CString,
    children: Mutex<Vec<sys::Tracked>>,
    torn_down: bool,
}

impl Testbed {
    /// Builds the world and returns once both sides reach each other over IPv4 and IPv6 from
    /// every client address. On error, whatever was built is removed again.
    pub fn new(opts: TestbedOptions) -> Result<Testbed> {
        if opts.clients_v4 > 200 || opts.clients_v6 > 200 {
            bail!("at most 200 extra client addresses per family");
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 0x1000;
        let id = format!("{}x{n:x}", std::process::id());
        let cg_root = cgroup2_mount()?;
        let names = Names::new(&id, &cg_root);
        let h = fnv(&id);
        let (a, b) = (2 + (h % 250) as u8, (h >> 16) as u8);
        let server_procs = sys::cpath(&names.cgroup.join("cgroup.procs"))?;
        let client_procs = sys::cpath(&names.client_cgroup.join("cgroup.procs"))?;
        live_ids().insert(id.clone());
        let v6 = |last: u16| Ipv6Addr::new(0xfd00, a.into(), b.into(), 0, 0, 0, 0, last);
        let mut tb = Testbed {
            names,
            label: opts.name.clone(),
            server_v4: Ipv4Addr::new(10, a, b, 1),
            server_v6: v6(1),
            client_v4: Ipv4Addr::new(10, a, b, 2),
            client_v6: v6(2),
            clients_v4: (0..opts.clients_v4)
                .map(|i| Ipv4Addr::new(10, a, b, 10 + i as u8))
                .collect(),
            clients_v6: (0..opts.clients_v6).map(|i| v6(0x10 + i as u16)).collect(),
            ns_server_fd: None,
            ns_client_fd: None,
            server_procs,
            client_procs,
            children: Mutex::new(Vec::new()),
            torn_down: false,
        };
        // On error `tb` is dropped here, which removes the partial world.
        tb.build()
            .with_context(|| format!("building testbed {id} ({})", opts.name))?;
        Ok(tb)
    }

    fn build(&mut self) -> Result<()> {
        let n = self.names.clone();
        // Leftovers with our id can only be from an earlier life of this pid.
        for e in n.remove_all() {
            tracing::debug!(error = %e, "removing leftovers");
        }
        std::fs::create_dir(&n.dir).with_context(|| format!("creating {}", n.dir.display()))?;
        let start = sys::process_start_time(std::process::id()).unwrap_or(0);
        std::fs::write(
            n.dir.join("owner"),
            format!("{} {start} {}\n", std::process::id(), self.label),
        )
        .context("writing the owner file")?;
        std::fs::create_dir(&n.bpffs).with_context(|| format!("creating {}", n.bpffs.display()))?;
        sys::mount_bpffs(&n.bpffs)?;
        for cg in [&n.cgroup, &n.client_cgroup] {
            std::fs::create_dir(cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        }
        run("ip", &["netns", "add", &n.ns_server])?;
        run("ip", &["netns", "add", &n.ns_client])?;
        let open = |ns: &str| {
            File::open(Path::new(NETNS_DIR).join(ns)).with_context(|| format!("opening netns {ns}"))
        };
        self.ns_server_fd = Some(open(&n.ns_server)?);
        self.ns_client_fd = Some(open(&n.ns_client)?);

        let (vs, vc) = (self.veth(Side::Server), self.veth(Side::Client));
        let [_, _, a, b] = self.server_v4.octets();
        let mac_s = format!("02:74:62:{a:02x}:{b:02x}:01");
        let mac_c = format!("02:74:62:{a:02x}:{b:02x}:02");
        // The pair is created inside the namespaces, so its names never touch the host.
        let link = format!(
            "link add {vs} address {mac_s} type veth peer name {vc} address {mac_c} netns {}",
            n.ns_client
        );
        ip_batch(&n.ns_server, &[link])?;
        let mut s = vec![
            "link set lo up".to_string(),
            format!("addr add {}/24 dev {vs}", self.server_v4),
            format!("addr add {}/64 dev {vs} nodad", self.server_v6),
            format!("link set {vs} up"),
        ];
        let mut c = vec![
            "link set lo up".to_string(),
            format!("addr add {}/24 dev {vc}", self.client_v4),
            format!("addr add {}/64 dev {vc} nodad", self.client_v6),
        ];
        c.extend(
            self.clients_v4
                .iter()
                .map(|a| format!("addr add {a}/24 dev {vc}")),
        );
        c.extend(
            self.clients_v6
                .iter()
                .map(|a| format!("addr add {a}/64 dev {vc} nodad")),
        );
        c.push(format!("link set {vc} up"));
        // Permanent neighbour entries: no ARP/ND on the path, so the world is usable at once
        // (a fresh IPv6 address's first neighbour solicitation was seen to cost a 1 s retry).
        let client_addrs: Vec<IpAddr> = [IpAddr::from(self.client_v4), self.client_v6.into()]
            .into_iter()
            .chain(self.clients_v4.iter().map(|&a| a.into()))
            .chain(self.clients_v6.iter().map(|&a| a.into()))
            .collect();
        s.extend(
            client_addrs
                .iter()
                .map(|a| format!("neigh replace {a} lladdr {mac_c} dev {vs} nud permanent")),
        );
        for a in [IpAddr::from(self.server_v4), self.server_v6.into()] {
            c.push(format!(
                "neigh replace {a} lladdr {mac_s} dev {vc} nud permanent"
            ));
        }
        ip_batch(&n.ns_server, &s)?;
        ip_batch(&n.ns_client, &c)?;
        self.wait_ready()
    }

    /// Polls TCP connects from every client address to a closed server port until each gets
    /// its RST (proves both directions work), bounded by [`READY_TIMEOUT`].
    fn wait_ready(&self) -> Result<()> {
        let mut pairs: Vec<(IpAddr, SocketAddr)> = vec![
            (
                self.client_v4.into(),
                SocketAddr::new(self.server_v4.into(), PROBE_PORT),
            ),
            (
                self.client_v6.into(),
                SocketAddr::new(self.server_v6.into(), PROBE_PORT),
            ),
        ];
        pairs.extend(self.clients_v4.iter().map(|a| {
            (
                IpAddr::from(*a),
                SocketAddr::new(self.server_v4.into(), PROBE_PORT),
            )
        }));
        pairs.extend(self.clients_v6.iter().map(|a| {
            (
                IpAddr::from(*a),
                SocketAddr::new(self.server_v6.into(), PROBE_PORT),
            )
        }));
        self.try_in_client(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("probe runtime")?;
            rt.block_on(async {
                let deadline = Instant::now() + READY_TIMEOUT;
                for (src, dst) in pairs {
                    loop {
                        let last = match probe(src, dst).await {
                            Ok(()) => break,
                            Err(e) => e,
                        };
                        if Instant::now() > deadline {
                            bail!("{src} cannot reach {dst} after {READY_TIMEOUT:?}: {last}");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(())
            })
        })?
    }

    /// The unique short id (also part of every name).
    pub fn id(&self) -> &str {
        &self.names.id
    }
    /// The label given in [`TestbedOptions::name`].
    pub fn name(&self) -> &str {
        &self.label
    }
    /// The API host's IPv4 address (server netns).
    pub fn server_v4(&self) -> Ipv4Addr {
        self.server_v4
    }
    /// The API host's IPv6 address (server netns).
    pub fn server_v6(&self) -> Ipv6Addr {
        self.server_v6
    }
    /// The client netns's own IPv4 address (10.a.b.2), used when no source is chosen.
    pub fn client_primary_v4(&self) -> Ipv4Addr {
        self.client_v4
    }
    /// The client netns's own IPv6 address (fd00:a:b::2).
    pub fn client_primary_v6(&self) -> Ipv6Addr {
        self.client_v6
    }
    /// The extra client IPv4 addresses (10.a.b.10, …), one per simulated org/client.
    pub fn clients_v4(&self) -> &[Ipv4Addr] {
        &self.clients_v4
    }
    /// The extra client IPv6 addresses (fd00:a:b::10, …).
    pub fn clients_v6(&self) -> &[Ipv6Addr] {
        &self.clients_v6
    }
    /// The testbed's cgroup v2 (for the limiter's `api.cgroup`).
    pub fn cgroup(&self) -> &Path {
        &self.names.cgroup
    }
    /// A private bpffs mount (for the limiter's `daemon.pin_dir` or a directory below it).
    pub fn bpffs(&self) -> &Path {
        &self.names.bpffs
    }
    /// Scratch directory for configs, logs and state.
    pub fn dir(&self) -> &Path {
        &self.names.dir
    }
    /// Name of a side's end of the veth pair (inside that side's namespace).
    pub fn veth(&self, side: Side) -> String {
        match side {
            Side::Server => format!("lt{}s", self.names.id),
            Side::Client => format!("lt{}c", self.names.id),
        }
    }

    /// The `[api]` lines that put the daemon's XDP SYN gate on the server's end of the veth
    /// pair, where the clients' SYNs arrive (`concurrency_mode = "delay"`, `pace_over_quota`).
    pub fn gate_config(&self) -> String {
        format!(
            "interfaces = [{:?}]\nnetns = {:?}\n",
            self.veth(Side::Server),
            self.netns_path(Side::Server).display().to_string()
        )
    }

    /// Path of a side's network namespace file (for `setns`, or the daemon's `api.netns`).
    pub fn netns_path(&self, side: Side) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns(side))
    }

    /// Name of a side's network namespace (for `ip netns exec`).
    pub fn netns(&self, side: Side) -> &str {
        match side {
            Side::Server => &self.names.ns_server,
            Side::Client => &self.names.ns_client,
        }
    }

    fn ns_file(&self, side: Side) -> Result<&File> {
        match side {
            Side::Server => self.ns_server_fd.as_ref(),
            Side::Client => self.ns_client_fd.as_ref(),
        }
        .context("the testbed's namespaces are gone")
    }

    fn procs(&self, side: Side) -> &CString {
        match side {
            Side::Server => &self.server_procs,
            Side::Client => &self.client_procs,
        }
    }

    /// Runs `cmd` in the server netns and in the testbed cgroup (joined before exec, so all
    /// its sockets are observed). The child is killed when the testbed is dropped.
    pub fn spawn_in_server(&self, cmd: Command) -> Result<Child> {
        self.spawn_in(Side::Server, cmd)
    }

    /// Runs `cmd` in the client netns (not in the testbed cgroup, so the limiter does not
    /// observe it). The child is killed when the testbed is dropped.
    pub fn spawn_in_client(&self, cmd: Command) -> Result<Child> {
        self.spawn_in(Side::Client, cmd)
    }

    fn spawn_in(&self, side: Side, mut cmd: Command) -> Result<Child> {
        let ns = self.ns_file(side)?.as_raw_fd();
        let procs = self.procs(side).clone();
        let what = format!("{:?}", cmd.get_program());
        // SAFETY: the closure runs between fork and exec and only makes raw system calls on
        // data prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if wrote != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {what} in the {side:?} netns of testbed {}",
                self.id()
            )
        })?;
        match sys::Tracked::open(child.id()) {
            Ok(t) => self
                .children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        Ok(child)
    }

    /// Runs `f` on a fresh thread inside the client netns and returns its result (a network
    /// namespace is per thread; `f` may build its own tokio current-thread runtime). Panics if
    /// the thread cannot enter the namespace (never runs `f` outside it); see
    /// [`Testbed::try_in_client`].
    pub fn in_client<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> R {
        match self.try_in_client(f) {
            Ok(r) => r,
            Err(e) => panic!("testbed {}: {e:#}", self.id()),
        }
    }

    /// Like [`Testbed::in_client`], for the server netns. Note: the thread is NOT in the
    /// testbed cgroup (joining would move the whole process); use [`Testbed::server_listeners`]
    /// or [`Testbed::server_socket`] for sockets the limiter must observe.
    pub fn in_server<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> R {
        match self.try_in_server(f) {
            Ok(r) => r,
            Err(e) => panic!("testbed {}: {e:#}", self.id()),
        }
    }

    /// [`Testbed::in_client`] that reports failure to enter the namespace as an error.
    pub fn try_in_client<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> Result<R> {
        self.in_ns(Side::Client, f)
    }

    /// [`Testbed::in_server`] that reports failure to enter the namespace as an error.
    pub fn try_in_server<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> Result<R> {
        self.in_ns(Side::Server, f)
    }

    fn in_ns<F: FnOnce() -> R + Send, R: Send>(&self, side: Side, f: F) -> Result<R> {
        let ns = self.ns_file(side)?;
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("tb-{}-{side:?}", self.id()))
                .spawn_scoped(s, move || -> Result<R> {
                    sys::setns_net(ns).with_context(|| format!("entering the {side:?} netns"))?;
                    Ok(f())
                })
                .context("spawning a namespace thread")?;
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Listening sockets (non-blocking, backlog 1024, `[::]` dual-stack) in the server netns
    /// that belong to the testbed cgroup, made by a forked helper, so an in-process server (e.g.
    /// [`serve_in_thread`]) is observed by the limiter like a spawned one.
    pub fn server_listeners(&self, addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>> {
        self.listeners_in(Side::Server, addrs)
    }

    /// Listening sockets in the client netns (e.g. a webhook receiver), not in the testbed cgroup.
    pub fn client_listeners(&self, addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>> {
        self.listeners_in(Side::Client, addrs)
    }

    fn listeners_in(&self, side: Side, addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>> {
        let specs: Vec<sys::SockSpec> = addrs
            .iter()
            .map(|&addr| sys::SockSpec { addr, listen: true })
            .collect();
        let fds = sys::sockets_in(self.ns_file(side)?, self.procs(side), &specs)
            .with_context(|| format!("listening on {addrs:?} in the {side:?} netns"))?;
        Ok(fds
            .into_iter()
            .map(|fd: OwnedFd| std::net::TcpListener::from(fd))
            .collect())
    }

    /// An unconnected TCP socket in the server netns that belongs to the testbed cgroup, for
    /// outbound connections the limiter must see (pushes; see [`HttpConn::connect_socket`]).
    pub fn server_socket(&self, ipv6: bool) -> Result<tokio::net::TcpSocket> {
        let addr = if ipv6 {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        };
        let mut fds = sys::sockets_in(
            self.ns_file(Side::Server)?,
            &self.server_procs,
            &[sys::SockSpec {
                addr,
                listen: false,
            }],
        )?;
        let fd = fds.pop().context("no socket")?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// Waits until something listens on TCP `port` in a side's netns (reads that netns's
    /// /proc/net/tcp{,6}, so no probe connection disturbs the limiter's counters).
    pub fn wait_listening(&self, side: Side, port: u16, timeout: Duration) -> Result<()> {
        self.in_ns(side, || {
            let deadline = Instant::now() + timeout;
            loop {
                if listening(port) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("nothing listens on port {port} in the {side:?} netns after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })?
    }

    /// Tears everything down now and reports what could not be removed (drop does the same
    /// silently, logging failures).
    pub fn close(mut self) -> Result<()> {
        let errs = self.teardown();
        if errs.is_empty() {
            return Ok(());
        }
        bail!(
            "tearing down testbed {}: {}",
            self.id(),
            errs.iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    fn teardown(&mut self) -> Vec<anyhow::Error> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errs = Vec::new();
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &children {
            c.kill();
        }
        for c in &children {
            if !c.wait_exit(Duration::from_secs(5)) {
                errs.push(anyhow!("child {} did not exit after SIGKILL", c.pid));
            }
        }
        self.ns_server_fd = None;
        self.ns_client_fd = None;
        errs.extend(self.names.remove_all());
        live_ids().remove(&self.names.id);
        errs
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for e in self.teardown() {
            tracing::warn!(error = %format!("{e:#}"), "testbed cleanup");
        }
    }
}

/// One readiness probe: a connect that is refused (RST) or accepted proves the path works.
async fn probe(src: IpAddr, dst: SocketAddr) -> std::io::Result<()> {
    let sock = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_millis(500), sock.connect(dst)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Is there a TCP socket in LISTEN state on `port` in this thread's netns?
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let mut cols = l.split_whitespace();
                    let local = cols.nth(1).unwrap_or_default();
                    let state = cols.nth(1).unwrap_or_default();
                    state == "0A" && local.ends_with(&want)
                })
            })
        })
}

#[cfg(test)]
mod tests;
