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
        let (tb, exe, lab) = testbed_for(name, v4, v6)?;
        let server_log = tb.dir().join("access.log");
        let args = ServeArgs {
            listen: vec![SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                API_PORT,
            ))],
            log: server_log.clone(),
            body_bytes: 0,
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
