//! Harness of the integration tests: a [`World`] is a private testbed (namespaces, cgroup, bpffs)
//! with the test API server (`limiter-lab testbed serve`) running in it and, once started, a real
//! `limiter run` daemon whose programs are attached to the testbed's cgroup. Dropping it stops the
//! daemon and removes everything, also when the test fails.
//!
//! The `limiter` binary must have the test hooks: `cargo build --all-targets` and `cargo test`
//! build it so (this crate's dev-dependency turns on `limiter-user/test-hooks`), as
//! `cargo xtask test` does; a plain `cargo build` does not.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use limiter_lab::testbed::{self, AccessEntry, ServeArgs, Testbed, TestbedOptions};
use serde_json::Value;

/// The API port of every world.
pub const API_PORT: u16 = 8080;
/// Where push receivers listen (client side).
pub const PUSH_PORT: u16 = 9090;
/// The TLS port of the peers in front of the API (nginx or HAProxy), on the server's addresses.
pub const TLS_PORT: u16 = 8443;
/// Where the peers in front of the API send its traffic: the API port on the loopback, so the
/// API sees every proxied connection from 127.0.0.1 (the `trusted_proxies` entry).
pub const PROXY_UPSTREAM: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), API_PORT);
/// How long to wait for counts that settle asynchronously (connection closes).
const SETTLE: Duration = Duration::from_secs(15);

pub struct World {
    pub tb: Testbed,
    /// The product binary `limiter` (daemon and CLI).
    pub exe: PathBuf,
    /// The lab binary `limiter-lab` (test server and push sender).
    pub lab: PathBuf,
    pub config: PathBuf,
    pub server_log: PathBuf,
    daemon_log: PathBuf,
    daemon: Option<Child>,
    /// Extra `[daemon]` lines for the next `write_config`.
    pub daemon_extra: String,
    /// Extra environment of the daemon (test hooks).
    pub daemon_env: Vec<(String, String)>,
}

/// Fails loudly rather than skipping: the integration tests are meaningless without root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the integration tests load eBPF programs and make namespaces: run them as root (cargo xtask test)"
    );
}

impl World {
    /// A testbed with `v4`/`v6` extra client addresses and the API server listening on
    /// `[::]:8080` (dual-stack, so IPv4 clients arrive IPv4-mapped) in the server netns and cgroup.
    pub fn new(name: &str, v4: usize, v6: usize) -> Result<World> {
        World::serve(name, v4, v6, false)
    }

    /// Like [`World::new`], with an API server that reads a PROXY protocol header at the start
    /// of every connection (as nginx's `listen … proxy_protocol` does) and logs its source as
    /// the client, next to the peer.
    pub fn with_proxy_protocol(name: &str, v4: usize, v6: usize) -> Result<World> {
        World::serve(name, v4, v6, true)
    }

    fn serve(name: &str, v4: usize, v6: usize, proxy_protocol: bool) -> Result<World> {
        let (tb, exe, lab) = testbed_for(name, v4, v6)?;
        let server_log = tb.dir().join("access.log");
        let args = ServeArgs {
            listen: vec![SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                API_PORT,
            ))],
            log: server_log.clone(),
            body_bytes: 0,
            proxy_protocol,
        };
        tb.spawn_in_server(testbed::serve_command(&lab, &args))?;
        World::serving(tb, exe, lab, server_log)
    }

    /// Waits for the API server to listen, then wraps the testbed.
    fn serving(tb: Testbed, exe: PathBuf, lab: PathBuf, server_log: PathBuf) -> Result<World> {
        tb.wait_listening(testbed::Side::Server, API_PORT, Duration::from_secs(10))?;
        Ok(World {
            config: tb.dir().join("limiter.toml"),
            daemon_log: tb.dir().join("daemon.log"),
            tb,
            exe,
            lab,
            server_log,
            daemon: None,
            daemon_extra: String::new(),
            daemon_env: Vec::new(),
        })
    }

    /// A testbed like [`World::new`] whose API server is Debian's nginx (epoll, one worker)
    /// answering `200 ok` on port 8080, IPv4 and IPv6, with its access log at `server_log`.
    pub fn with_nginx(name: &str, v4: usize, v6: usize) -> Result<World> {
        let (tb, exe, lab) = testbed_for(name, v4, v6)?;
        let dir = tb.dir().to_path_buf();
        let server_log = dir.join("nginx-access.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/nginx-error.log;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  log_format plain '$remote_addr $request_method $uri $request_length';\n\
                 access_log {log} plain;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 client_max_body_size 10m;\n  keepalive_requests 100000;\n\
                 server {{\n    listen {API_PORT};\n    listen [::]:{API_PORT};\n\
                 location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
                d = dir.display(),
                log = server_log.display(),
            ),
        )?;
        let mut cmd = Command::new("nginx");
        cmd.args(["-e", "stderr", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        tb.spawn_in_server(cmd)?;
        World::serving(tb, exe, lab, server_log)
    }

    /// Lines of nginx's access log (`client method uri length`).
    pub fn nginx_entries(&self) -> Result<Vec<String>> {
        Ok(std::fs::read_to_string(&self.server_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Writes the config: the testbed's cgroup and bpffs, port 8080, `/media/` exempt, then
    /// `limits` (extra `[limits]` lines) and `orgs` (`[[orgs]]` tables).
    pub fn write_config(&self, limits: &str, orgs: &str) -> Result<()> {
        self.write_config_with("", limits, orgs)
    }

    /// Like `write_config`, with extra `[api]` lines.
    pub fn write_config_with(&self, api: &str, limits: &str, orgs: &str) -> Result<()> {
        let state = self.tb.dir().join("state");
        let text = format!(
            "[api]\nports = [{API_PORT}]\ncgroup = {cg:?}\nmedia_get_prefixes = [\"/media/\"]\n{api}\n\n\
             [limits]\n{limits}\n\n\
             [daemon]\npin_dir = {pin:?}\nstate_dir = {state:?}\nlog_format = \"text\"\n{extra}\n\n{orgs}\n",
            extra = self.daemon_extra,
            cg = self.tb.cgroup().display().to_string(),
            pin = self.tb.bpffs().join("limiter").display().to_string(),
            state = state.display().to_string(),
        );
        std::fs::write(&self.config, text).context("writing the config")
    }

    /// Starts `limiter run` and waits until it answers.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.spawn_daemon()?;
        self.wait_daemon()
    }

    /// Starts `limiter run` without waiting for it (a test hook may hold it mid-start).
    pub fn spawn_daemon(&mut self) -> Result<()> {
        // Appended: a restarted daemon's lines follow the earlier ones.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)?;
        let child = Command::new(&self.exe)
            .env("LIMITER_TEST_HOOKS", "1")
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting limiter run")?;
        self.daemon = Some(child);
        Ok(())
    }

    /// Waits until the daemon started by [`World::spawn_daemon`] answers.
    pub fn wait_daemon(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["report", "--json"])?.status.success() {
                return Ok(());
            }
            if let Some(c) = self.daemon.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("limiter run exited with {status}:\n{}", self.daemon_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "limiter run did not answer within 20 s:\n{}",
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon with SIGKILL (no shutdown work at all) and waits for it.
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(mut c) = self.daemon.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
        Ok(())
    }

    /// Runs `limiter ARGS --config <this world's config>`.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.exe)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .context("running the limiter CLI")
    }

    /// `limiter report --json`, parsed.
    pub fn report(&self) -> Result<Value> {
        let out = self.cli(&["report", "--json"])?;
        if !out.status.success() {
            bail!(
                "limiter report failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing the report")
    }

    /// One org's entry of the report (`unmapped` gives the unmapped object).
    pub fn org(&self, name: &str) -> Result<Value> {
        let r = self.report()?;
        if name == "unmapped" {
            return Ok(r["unmapped"].clone());
        }
        r["orgs"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["org"] == name).cloned())
            .with_context(|| format!("no org {name} in the report: {r}"))
    }

    /// Polls the report until `cond` holds for `org` (for counts that settle asynchronously,
    /// such as a connection's close); returns the last entry, or fails with it.
    pub fn wait_org(&self, name: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let o = self.org(name)?;
            if cond(&o) {
                return Ok(o);
            }
            if Instant::now() > deadline {
                bail!("org {name} never reached the expected state; last: {o}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    /// What the API server logged.
    pub fn server_entries(&self) -> Result<Vec<AccessEntry>> {
        testbed::read_access_log(&self.server_log)
    }

    /// The API address (IPv4).
    pub fn api4(&self) -> SocketAddr {
        SocketAddr::from((self.tb.server_v4(), API_PORT))
    }

    /// The API address (IPv6).
    pub fn api6(&self) -> SocketAddr {
        SocketAddr::from((self.tb.server_v6(), API_PORT))
    }

    /// Runs `f` on a tokio runtime inside the client netns.
    pub fn client<F, Fut, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<R>>,
        R: Send,
    {
        self.tb.in_client(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("client runtime")?;
            rt.block_on(f())
        })
    }

    /// Entries of the server's access log from `ip`.
    pub fn served_from(&self, ip: IpAddr) -> Result<Vec<AccessEntry>> {
        Ok(self
            .server_entries()?
            .into_iter()
            .filter(|e| e.client == ip)
            .collect())
    }

    pub fn dir(&self) -> &Path {
        self.tb.dir()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.stop_daemon();
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.daemon_log());
        }
    }
}

/// A fresh testbed (stale ones of crashed runs removed first), the `limiter` binary (checked for
/// the test hooks) and the `limiter-lab` binary.
fn testbed_for(name: &str, v4: usize, v6: usize) -> Result<(Testbed, PathBuf, PathBuf)> {
    require_root();
    let exe = hooked_limiter()?;
    let lab = testbed::lab_exe()?;
    let _ = testbed::cleanup_stale();
    let tb = Testbed::new(TestbedOptions {
        name: name.to_string(),
        clients_v4: v4,
        clients_v6: v6,
    })?;
    Ok((tb, exe, lab))
}

/// The `limiter` binary, once it is known to have the test hooks (its hidden `debug` command):
/// without them the tests that need a hook would fail far from the cause.
pub fn hooked_limiter() -> Result<PathBuf> {
    let exe = testbed::limiter_exe()?;
    let out = Command::new(&exe)
        .args(["debug", "--help"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "{} was built without the test hooks: build it with `cargo build --all-targets` \
             (or `cargo build -p limiter-user --features test-hooks`), as `cargo xtask test` does",
            exe.display()
        );
    }
    Ok(exe)
}

// Peers in front of the API: TLS terminators, load balancers and their clients.

impl World {
    /// A certificate for the server's addresses (IPv4 and IPv6), made by the test.
    pub fn tls_cert(&self) -> Result<testbed::Cert> {
        testbed::make_cert(
            self.dir(),
            "api",
            &[self.tb.server_v4().into(), self.tb.server_v6().into()],
        )
    }

    /// nginx terminating TLS on [`TLS_PORT`] and proxying to [`PROXY_UPSTREAM`] over an
    /// upstream keep-alive pool, adding `X-Forwarded-For`; returns the certificate to trust.
    pub fn start_nginx_tls(&self) -> Result<testbed::Cert> {
        let cert = self.tls_cert()?;
        self.tb.start_nginx_tls(TLS_PORT, &cert, PROXY_UPSTREAM)?;
        Ok(cert)
    }

    /// HAProxy terminating TLS on [`TLS_PORT`] in TCP mode, sending each connection to
    /// [`PROXY_UPSTREAM`] with a PROXY v2 header; returns the certificate to trust.
    pub fn start_haproxy(&self) -> Result<testbed::Cert> {
        let cert = self.tls_cert()?;
        self.tb.start_haproxy(TLS_PORT, &cert, PROXY_UPSTREAM)?;
        Ok(cert)
    }

    /// `https://<server v4>:<TLS_PORT><path>`.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}:{TLS_PORT}{path}", self.tb.server_v4())
    }

    /// The peers' TLS address (IPv4).
    pub fn tls4(&self) -> SocketAddr {
        SocketAddr::from((self.tb.server_v4(), TLS_PORT))
    }

    /// Writes the API keys file (`ORG KEY` lines, mode 0600); returns its path.
    pub fn write_api_keys(&self, keys: &[(&str, &str)]) -> Result<PathBuf> {
        let path = self.dir().join("api-keys");
        let text: String = std::iter::once("# org key\n".to_string())
            .chain(keys.iter().map(|(org, key)| format!("{org} {key}\n")))
            .collect();
        testbed::write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    /// `count` HTTPS GETs of `/<tag>/<i>` from `src` through the TLS peer, one curl process
    /// (keep-alive), each with `headers`.
    pub fn curl(
        &self,
        src: IpAddr,
        tag: &str,
        count: usize,
        headers: &[(&str, &str)],
    ) -> testbed::Curl {
        testbed::Curl {
            src,
            urls: (0..count)
                .map(|i| self.https_url(&format!("/{tag}/{i}")))
                .collect(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ca: self.dir().join("api.crt"),
        }
    }

    /// Runs the curl clients at the same time (each in its own process in the client netns);
    /// returns each one's replies, in the order given.
    pub fn curl_all(&self, runs: &[testbed::Curl]) -> Result<Vec<Vec<testbed::CurlReply>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = runs.iter().map(|c| s.spawn(|| self.tb.curl(c))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a curl thread panicked"))?
                })
                .collect()
        })
    }
}

/// The statuses of every curl reply, counted.
pub fn statuses(replies: &[Vec<testbed::CurlReply>]) -> std::collections::BTreeMap<u16, u64> {
    let mut m = std::collections::BTreeMap::new();
    for r in replies.iter().flatten() {
        *m.entry(r.status).or_insert(0) += 1;
    }
    m
}

/// `[[orgs]]` table text without CIDRs (an org known by another source than its address).
pub fn org_without_cidrs(name: &str, extra: &str) -> String {
    format!("[[orgs]]\nname = {name:?}\n{extra}\n")
}

/// The request count of `source` (`address`, `proxy_protocol`, `forwarded`, `api_key`) in a
/// report entry's `identified_by`.
pub fn identified_by(v: &Value, source: &str) -> u64 {
    v["identified_by"][source]
        .as_u64()
        .unwrap_or_else(|| panic!("identified_by.{source} missing or not a number in {v}"))
}

/// `[[orgs]]` table text.
pub fn org_toml(name: &str, cidrs: &[String], extra: &str) -> String {
    format!("[[orgs]]\nname = {name:?}\ncidrs = {cidrs:?}\n{extra}\n")
}

/// A number from a report entry (panics with the entry when missing).
pub fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// The single-address CIDR of `ip`.
pub fn cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// `count` GETs of `path0`, `path1`, …
pub fn gets(path: &str, count: usize) -> Vec<testbed::Request> {
    (0..count)
        .map(|i| testbed::Request::get(format!("{path}{i}")))
        .collect()
}

// Fault injection: waiting on conditions, background traffic, Redis, a full disk and the
// daemon's process.

/// Polls `probe` every 50 ms until it yields a value; fails after `within` with `what` and the
/// last state `probe` described (`Err` from `probe` ends the wait at once).
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let last = match probe()? {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl World {
    /// The pid of the running daemon.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Waits until the daemon's log has `line` at least `times` times.
    pub fn wait_log_count(&self, line: &str, times: usize) -> Result<String> {
        wait_for(
            &format!("{times}× {line:?} in the daemon log"),
            SETTLE * 2,
            || {
                let log = self.daemon_log();
                Ok(if log.matches(line).count() >= times {
                    Ok(log)
                } else {
                    Err(log)
                })
            },
        )
    }

    /// Waits until the daemon's log has `line`.
    pub fn wait_log(&self, line: &str) -> Result<String> {
        self.wait_log_count(line, 1)
    }

    /// Where the snapshot of `date` goes.
    pub fn snapshot_path(&self, date: &str) -> PathBuf {
        self.dir().join("state/days").join(format!("{date}.json"))
    }

    /// The snapshot of `date` as it is on disk: None when missing, an error when it does not
    /// parse (a torn file).
    pub fn snapshot(&self, date: &str) -> Result<Option<Value>> {
        let path = self.snapshot_path(date);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .with_context(|| format!("{} does not parse", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| path.display().to_string()),
        }
    }

    /// Waits until the snapshot of `date` has `requests` for `org`.
    pub fn wait_snapshot(&self, date: &str, org: &str, requests: u64) -> Result<Value> {
        wait_for(
            &format!("the snapshot of {date} with {requests} requests of {org}"),
            SETTLE * 2,
            || {
                let snap = self.snapshot(date)?.unwrap_or_default();
                Ok(
                    if snap["orgs"][org]["requests"].as_u64() == Some(requests) {
                        Ok(snap)
                    } else {
                        Err(snap.to_string())
                    },
                )
            },
        )
    }

    /// Today's date as the daemon reports it.
    pub fn today(&self) -> Result<String> {
        Ok(self.report()?["day"]
            .as_str()
            .context("no day in the report")?
            .to_string())
    }
}

/// What background traffic got: the status of every request, in order.
#[derive(Debug, Default)]
pub struct Tally {
    pub statuses: Vec<u16>,
}

impl Tally {
    pub fn count(&self, status: u16) -> usize {
        self.statuses.iter().filter(|s| **s == status).count()
    }
}

/// The progress of background traffic, seen from the test's thread.
pub struct Load {
    answered: std::sync::atomic::AtomicU64,
    failed: std::sync::Mutex<Option<String>>,
    stop: std::sync::atomic::AtomicBool,
}

impl Load {
    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` more requests than now were answered: the request path works at this
    /// moment. Fails when one request went unanswered.
    pub fn wait_more(&self, n: u64) -> Result<()> {
        let want = self.answered() + n;
        wait_for(&format!("{n} more answered requests"), SETTLE * 2, || {
            if let Some(e) = self
                .failed
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone()
            {
                bail!("a request of the background traffic failed: {e}");
            }
            let now = self.answered();
            Ok(if now >= want {
                Ok(())
            } else {
                Err(format!("{now} answered"))
            })
        })
    }
}

/// Runs `body` while GETs go from `src` to the API, one connection each, from a thread in the
/// client netns. The traffic stops when `body` returns (or panics), or after `max` requests;
/// every request must get an answer. Returns `body`'s result and what the requests got.
pub fn under_traffic<R>(
    w: &World,
    src: IpAddr,
    max: usize,
    body: impl FnOnce(&Load) -> Result<R>,
) -> Result<(R, Tally)> {
    use std::sync::atomic::Ordering;
    let load = Load {
        answered: 0.into(),
        failed: std::sync::Mutex::new(None),
        stop: false.into(),
    };
    let api = match src {
        IpAddr::V4(_) => w.api4(),
        IpAddr::V6(_) => w.api6(),
    };
    /// Stops the traffic however `body` ends.
    struct Stop<'a>(&'a Load);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.stop.store(true, Ordering::SeqCst);
        }
    }
    std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            w.client(|| async {
                let mut tally = Tally::default();
                for i in 0..max {
                    if load.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let req = [testbed::Request::get(format!("/load/{i}"))];
                    match testbed::http_requests(src, api, &req, false).await {
                        Ok(r) => tally.statuses.extend(r.iter().map(|r| r.status)),
                        Err(e) => {
                            if let Ok(mut f) = load.failed.lock() {
                                *f = Some(format!("{e:#}"));
                            }
                            return Err(e);
                        }
                    }
                    load.answered.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(tally)
            })
        });
        let out = {
            let _stop = Stop(&load);
            body(&load)
        };
        let tally = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?;
        Ok((out?, tally?))
    })
}

/// A redis-server on a loopback port, without persistence (a restart loses its data), that
/// can be killed, paused (SIGSTOP) and resumed; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts one on `port`, or on a free port.
    pub fn start(port: Option<u16>) -> Result<Redis> {
        let port = match port {
            Some(p) => p,
            None => std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
        };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (cargo xtask setup installs it)")?;
        let redis = Redis {
            port,
            child: Some(child),
        };
        wait_for(&format!("redis-server listening on {port}"), SETTLE, || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string()))
        })?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: i32) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .context("redis-server is not running")?
            .id();
        // SAFETY: signalling our own child, which has not been reaped.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            bail!(
                "signalling redis-server: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tmpfs of a fixed size mounted on a directory (created if needed), unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_kib: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let c = |s: &str| std::ffi::CString::new(s).context("a NUL in a mount argument");
        let target = c(&path.display().to_string())?;
        let (fstype, data) = (c("tmpfs")?, c(&format!("size={size_kib}k,mode=0700"))?);
        // SAFETY: every pointer is a valid C string that outlives the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting a tmpfs on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Fills the free space with the file `name`; returns its path. Removing it frees the
    /// space again.
    pub fn fill(&self, name: &str) -> Result<PathBuf> {
        use std::io::Write as _;
        let path = self.path.join(name);
        let mut f = std::fs::File::create(&path)?;
        let block = vec![0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("filling the tmpfs"),
            }
        }
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.path.display().to_string()) {
            // Detached: unmounted even while the daemon still has a file open on it.
            // SAFETY: a valid C string.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// Raises this process's soft limit of open files to at least `want` (within the hard limit);
/// the daemons it starts inherit it.
pub fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= want {
            return Ok(());
        }
        if lim.rlim_max < want {
            bail!(
                "RLIMIT_NOFILE's hard limit {} is below {want}",
                lim.rlim_max
            );
        }
        lim.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How many files a process has open.
pub fn open_fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}
