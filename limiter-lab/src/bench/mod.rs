//! `limiter-lab bench` (run by `cargo xtask bench`): side-by-side measurements in one run, on this
//! machine, of what limiter costs and what it saves (the targets are in
//! docs/performance.md).
//!
//! nginx (Debian's, one worker) serves in the testbed's server namespace and cgroup; wrk drives
//! it from the client namespace. Every comparison alternates its two sides (A B A B …) so drift
//! cancels out, and reports the median with min–max of each side and the ratio of the medians.
//! Every run's status codes are checked against what its row claims (refusals or none), so a
//! limit that does not fire fails the bench instead of printing a ratio.

mod neighbors;
pub(crate) mod nginx;
mod wrk;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_user::control::{self, Request as Ctl};
use serde::Serialize;

use crate::testbed::{self, Side, Testbed, TestbedOptions};
use wrk::WrkRun;

const PORT: u16 = 8080;
/// The org of the comparisons' and scale runs' client.
const BENCH_ORG: &str = "bench";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Short runs (under two minutes in all), for checks.
    #[arg(long)]
    pub quick: bool,
    /// Only the kernel-cost runs (bpf_stats), for tuning the programs: no comparisons and no
    /// scale rows.
    #[arg(long)]
    pub cost_only: bool,
    /// Only the neighbors scenario (both request shapes), written to bench-neighbors.md.
    #[arg(long)]
    pub neighbors_only: bool,
    /// Another `limiter` binary (an earlier build): each kernel-cost run alternates it with this
    /// build's, so that two builds are compared within the same minutes (the host's load moves
    /// single costs by a third from one minute to the next).
    #[arg(long, value_name = "LIMITER")]
    pub against: Option<PathBuf>,
    /// Where bench.json and bench.md go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side2 {
    /// nginx alone.
    Nginx,
    /// nginx with limiter's programs attached (quota left).
    Limiter,
    /// limiter with the org over quota: the kernel answers 429.
    KernelRefuses,
}

#[derive(Debug, Clone)]
struct Load {
    path: &'static str,
    conns: u32,
    keep_alive: bool,
    /// Pad the request past the 429's length (so the kernel can answer keep-alive).
    padded: bool,
    /// What each request looks like.
    shape: Shape,
}

impl Load {
    /// The load in a few words, for the kernel-cost lines.
    fn describe(&self) -> String {
        format!(
            "{:?}, {} conns{}",
            self.shape,
            self.conns,
            if self.keep_alive { ", keep-alive" } else { "" }
        )
    }
}

/// Request shapes of the kernel-cost runs (wrk Lua scripts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// wrk's own minimal GET (about 40 bytes).
    Plain,
    /// wrk's GET of the load's path with the headers an API integration sends (User-Agent,
    /// Accept, a bearer token): about 210 bytes.
    ApiHeaders,
    /// A typical API GET: a query and the headers an integration sends, about 200 bytes.
    ApiGet,
    /// Ten API GETs in one write (pipelining).
    Pipelined10,
    /// A POST with a 64 KiB body: many chunks per request.
    Post64k,
    /// An API GET of about 400 bytes carrying [`BENCH_KEY`] in `X-API-Key` (the
    /// `identify_by = ["api_key"]` rows: one key lookup per request).
    ApiKey400,
    /// A PROXY v2 header, then a GET, on each connection (the `identify_by =
    /// ["proxy_protocol"]` rows, one request per connection, against [`nginx::PROXY_PORT`]).
    ProxyV2,
}

/// The bench org's API key among the [`BENCH_KEYS`] of the keys file.
const BENCH_KEY: &str = "bk-5d41402abc4b2a76b9719d911017c592";
/// Keys in the api_key rows' keys file (one of them the bench org's).
const BENCH_KEYS: usize = 100_000;
/// The client a PROXY header of the [`Shape::ProxyV2`] load names (the bench org has it).
const PROXIED_CLIENT: &str = "198.51.100.10";
/// The CIDR of [`PROXIED_CLIENT`] in the bench org.
const PROXIED_NET: &str = "198.51.100.0/24";

/// `bytes` as a Lua string literal (decimal escapes, which every Lua reads).
fn lua_bytes(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for b in bytes {
        s.push_str(&format!("\\{b:03}"));
    }
    s.push('"');
    s
}

/// The PROXY v2 header of [`Shape::ProxyV2`]: [`PROXIED_CLIENT`] to the API's proxy port.
fn bench_proxy_header() -> Result<Vec<u8>> {
    let src: std::net::IpAddr = PROXIED_CLIENT.parse()?;
    testbed::proxy_v2_header(
        SocketAddr::new(src, 40000),
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), nginx::PROXY_PORT)),
    )
}

impl Shape {
    /// The wrk script of the shape, if it needs one.
    fn script(self) -> Option<String> {
        match self {
            Shape::ApiKey400 => Some(format!(
                r#"wrk.path = "/api/v1/items?page=2&per_page=50&fields=id,name,updated_at"
wrk.headers["User-Agent"] = "acme-sync/2.3 (+https://acme.example/integrations)"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["X-API-Key"] = "{BENCH_KEY}"
wrk.headers["X-Request-Id"] = "5f0c6e1a-8b2d-4c3e-9f7a-1d2e3f4a5b6c"
wrk.headers["Traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
"#
            )),
            Shape::ProxyV2 => bench_proxy_header().ok().map(|h| {
                // wrk checks the script's first request with its HTTP parser, which a PROXY
                // header fails: that one check gets the plain GET.
                format!(
                    "local proxy = {}\ninit = function(args)\n  req = proxy .. wrk.format()\nend\n\
                     local checked = false\nrequest = function()\n  if not checked then\n    \
                     checked = true\n    return wrk.format()\n  end\n  return req\nend\n",
                    lua_bytes(&h)
                )
            }),
            other => other.static_script().map(str::to_string),
        }
    }

    /// The `identified_by` source a limiter run of the shape must show, if any.
    fn identity(self) -> Option<&'static str> {
        match self {
            Shape::ApiKey400 => Some("api_key"),
            Shape::ProxyV2 => Some("proxy_protocol"),
            _ => None,
        }
    }

    /// The port the shape's load goes to.
    fn port(self) -> u16 {
        if self == Shape::ProxyV2 {
            nginx::PROXY_PORT
        } else {
            PORT
        }
    }

    fn static_script(self) -> Option<&'static str> {
        const API_HEADERS: &str = r#"wrk.path = "/api/v1/items?page=2&per_page=50"
wrk.headers["User-Agent"] = "acme-sync/2.3 (+https://acme.example/integrations)"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Bearer 7f3c9e0a1b2d4c6e8f0a1b2c3d4e5f60"
"#;
        match self {
            Shape::Plain => None,
            Shape::ApiHeaders => Some(
                r#"wrk.headers["User-Agent"] = "acme-sync/2.3 (+https://acme.example/integrations)"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Bearer 7f3c9e0a1b2d4c6e8f0a1b2c3d4e5f60"
"#,
            ),
            Shape::ApiGet => Some(API_HEADERS),
            Shape::Pipelined10 => Some(concat!(
                r#"wrk.path = "/api/v1/items?page=2&per_page=50"
wrk.headers["User-Agent"] = "acme-sync/2.3 (+https://acme.example/integrations)"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Bearer 7f3c9e0a1b2d4c6e8f0a1b2c3d4e5f60"
"#,
                r#"init = function(args)
  local r = {}
  for i = 1, 10 do r[i] = wrk.format() end
  req = table.concat(r)
end
request = function() return req end
"#
            )),
            Shape::Post64k => Some(
                r#"wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
"#,
            ),
            Shape::ApiKey400 | Shape::ProxyV2 => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub a: String,
    pub b: String,
    pub a_median: f64,
    pub a_min: f64,
    pub a_max: f64,
    pub b_median: f64,
    pub b_min: f64,
    pub b_max: f64,
    /// b / a of the medians.
    pub ratio: f64,
}

impl Row {
    /// The row as a line of the Markdown table (also what the run prints as it goes).
    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {:.0} ({:.0}–{:.0}) | {} | {:.0} ({:.0}–{:.0}) | {:.3} |\n",
            self.scenario,
            self.a,
            self.a_median,
            self.a_min,
            self.a_max,
            self.b,
            self.b_median,
            self.b_min,
            self.b_max,
            self.ratio
        )
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct KernelCost {
    /// The verdict per passing request (64 connections, keep-alive and one per request).
    pub verdict_ns_per_run: f64,
    pub verdict_runs: u64,
    pub sock_ops_ns_per_run: f64,
    pub sock_ops_runs: u64,
    /// The verdict per passing keep-alive request while `limiter trace` reads every verdict.
    pub traced_ns_per_run: f64,
    pub traced_runs: u64,
    /// The verdict per refused keep-alive request, the tail-called 429 writer included.
    pub refused_ns_per_run: f64,
    pub refused_runs: u64,
    /// The verdict per passing typical API GET (about 200 bytes, one head per chunk).
    pub api_get_ns_per_run: f64,
    /// The verdict per chunk of ten pipelined API GETs.
    pub pipelined10_ns_per_run: f64,
    /// The verdict per chunk of 64 KiB POSTs (most chunks are body).
    pub post64k_ns_per_run: f64,
    pub post64k_runs: u64,
    /// The verdict per passing 400-byte API GET identified by its key (`identify_by =
    /// ["api_key"]`, a keys file of [`BENCH_KEYS`] keys).
    pub api_key_ns_per_run: f64,
    pub api_key_runs: u64,
    /// The verdict per chunk of connections that each send a PROXY v2 header and one GET
    /// (`identify_by = ["proxy_protocol"]`).
    pub proxy_v2_ns_per_run: f64,
    pub proxy_v2_runs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    pub orgs: usize,
    /// Median (min, max) over every start of this size: the first and one per ratio run.
    pub load_secs: f64,
    pub load_min_secs: f64,
    pub load_max_secs: f64,
    pub map_memory_mib: f64,
    pub daemon_rss_mib: f64,
    pub passing_ratio: f64,
    pub note: String,
}

impl ScaleRow {
    fn failed(orgs: usize, note: String) -> Self {
        ScaleRow {
            orgs,
            load_secs: 0.0,
            load_min_secs: 0.0,
            load_max_secs: 0.0,
            map_memory_mib: 0.0,
            daemon_rss_mib: 0.0,
            passing_ratio: 0.0,
            note,
        }
    }
}

/// How a keys file of `keys` API keys loads.
#[derive(Debug, Clone, Serialize)]
pub struct KeyScaleRow {
    pub keys: usize,
    /// Median (min, max) over the starts, each until the daemon answers.
    pub load_secs: f64,
    pub load_min_secs: f64,
    pub load_max_secs: f64,
    pub map_memory_mib: f64,
    pub daemon_rss_mib: f64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub machine: String,
    pub kernel: String,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub runs_per_side: usize,
    pub rows: Vec<Row>,
    pub kernel_cost: KernelCost,
    pub scale: Vec<ScaleRow>,
    /// API keys files by size (not run with `--cost-only`).
    pub key_scale: Vec<KeyScaleRow>,
    /// Runs that could not run, and why (an identity source this build's daemon refuses).
    pub notes: Vec<String>,
    /// Not run with `--cost-only`: one per request shape.
    pub neighbors: Vec<neighbors::Neighbors>,
}

fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let m = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (m, s[0], s[s.len() - 1])
}

/// What a run's status codes must show for its row to mean what the row claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Nothing refused.
    Pass,
    /// Nearly everything refused (at least 90 %: a limit lets its first requests through).
    Refuse,
}

/// Fails when `run`'s status codes do not match `expect`.
fn check(what: &str, run: &WrkRun, expect: Expect) -> Result<()> {
    match expect {
        Expect::Pass => ensure!(
            run.refused == 0,
            "{what}: {} of {} responses had a status of 400 or more; this run should refuse nothing",
            run.refused,
            run.requests
        ),
        Expect::Refuse => ensure!(
            run.requests > 0 && run.refused * 10 >= run.requests * 9,
            "{what}: only {} of {} responses had a status of 400 or more; the limit this run claims did not refuse",
            run.refused,
            run.requests
        ),
    }
    Ok(())
}

/// Waits for a wrk started by [`Bench::wrk_command`] and reads its summary.
fn wait_wrk(child: Child) -> Result<WrkRun> {
    let out = child.wait_with_output().context("waiting for wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    wrk::parse(&text)
        .with_context(|| format!("no summary in wrk's output ({}): {text}", out.status))
}

struct Bench {
    tb: Testbed,
    exe: PathBuf,
    /// `--against`: the build each kernel-cost run is compared with.
    against: Option<PathBuf>,
    secs: f64,
    reps: usize,
    daemon: Option<Child>,
    socket: PathBuf,
}

impl Bench {
    /// The config up to the orgs, with `daily` as the default quota.
    fn config_head(&self, daily: u64) -> String {
        format!(
            "[api]\nports = [{PORT}]\ncgroup = {cg:?}\n\n[limits]\ndaily_requests = {daily}\nconcurrent_connections = 100000\n\n\
             [daemon]\npin_dir = {pin:?}\nstate_dir = {state:?}\nsnapshot_interval_secs = 3600\n\n",
            cg = self.tb.cgroup().display().to_string(),
            pin = self.tb.bpffs().join("limiter").display().to_string(),
            state = self.tb.dir().join("state").display().to_string(),
        )
    }

    fn config(&self, daily: u64, extra_orgs: usize) -> Result<PathBuf> {
        let client_net = {
            let [a, b, c, _] = self.tb.server_v4().octets();
            format!("{a}.{b}.{c}.0/24")
        };
        let mut head = self.config_head(daily);
        if extra_orgs > 0 {
            // Filler orgs for the scale runs, one /32 each in 100.64.0.0/10, in an orgs file:
            // how an operator keeps a list this long.
            let mut list = String::with_capacity(extra_orgs * 24);
            for i in 0..extra_orgs {
                let o = (0x6440_0000u32 + i as u32).to_be_bytes();
                list.push_str(&format!("o{i} {}.{}.{}.{}/32\n", o[0], o[1], o[2], o[3]));
            }
            let orgs = self.tb.dir().join(format!("bench-{extra_orgs}.orgs"));
            std::fs::write(&orgs, list)?;
            head = head.replacen(
                "[api]\n",
                &format!("[api]\norgs_file = {:?}\n", orgs.display().to_string()),
                1,
            );
        }
        let text = format!("{head}[[orgs]]\nname = \"{BENCH_ORG}\"\ncidrs = [\"{client_net}\"]\n");
        let path = self
            .tb
            .dir()
            .join(format!("bench-{daily}-{extra_orgs}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The passing config of an identity row: `identify_by = ["api_key"]` with a keys file of
    /// `keys` keys (mode 0600; the first one [`BENCH_KEY`]), or `["proxy_protocol"]` on
    /// [`nginx::PROXY_PORT`] with the client namespace as the trusted proxy and [`PROXIED_NET`]
    /// in the bench org.
    fn identity_config(&self, shape: Shape, keys: usize) -> Result<PathBuf> {
        let [a, b, c, _] = self.tb.server_v4().octets();
        let client_net = format!("{a}.{b}.{c}.0/24");
        let head = self.config_head(1_000_000_000_000);
        let (api, cidrs) = match shape {
            Shape::ApiKey400 => {
                let path = self.tb.dir().join(format!("bench-api-keys-{keys}"));
                let mut text = String::with_capacity(keys * 48);
                text.push_str(&format!("{BENCH_ORG} {BENCH_KEY}\n"));
                for i in 1..keys {
                    text.push_str(&format!("{BENCH_ORG} bk-{i:032x}\n"));
                }
                testbed::write_private(&path, text.as_bytes())?;
                (
                    format!(
                        "identify_by = [\"api_key\"]\napi_key_header = \"X-API-Key\"\napi_keys_file = {:?}\n",
                        path.display().to_string()
                    ),
                    format!("[{client_net:?}]"),
                )
            }
            Shape::ProxyV2 => (
                format!("identify_by = [\"proxy_protocol\"]\ntrusted_proxies = [{client_net:?}]\n"),
                format!("[{client_net:?}, {PROXIED_NET:?}]"),
            ),
            other => bail!("{other:?} has no identity config"),
        };
        let head = head
            .replacen(
                &format!("ports = [{PORT}]"),
                &format!("ports = [{}]", shape.port()),
                1,
            )
            .replacen("[api]\n", &format!("[api]\n{api}"), 1);
        let text = format!("{head}[[orgs]]\nname = \"{BENCH_ORG}\"\ncidrs = {cidrs}\n");
        let path = self.tb.dir().join(format!("bench-{shape:?}-{keys}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// How many of the bench org's requests today the daemon reports as identified by
    /// `source`.
    fn identified_by(&self, source: &str) -> Result<u64> {
        let r = control::call(
            &self.socket,
            &Ctl::Report {
                org: Some(BENCH_ORG.into()),
                day: None,
            },
        )?;
        let data = r
            .data
            .filter(|_| r.ok)
            .with_context(|| format!("no report: {:?}", r.error))?;
        let report: serde_json::Value = serde_json::from_str(data.get())?;
        let org = report["orgs"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["org"] == BENCH_ORG))
            .with_context(|| format!("no {BENCH_ORG} in the report: {report}"))?;
        org["identified_by"][source]
            .as_u64()
            .with_context(|| format!("no identified_by.{source} in {org}"))
    }

    /// Starts the daemon and waits until it answers a report of `org`; returns the time that
    /// took.
    fn start(&mut self, config: &Path, org: &str) -> Result<Duration> {
        self.stop();
        let started = Instant::now();
        let log = std::fs::File::create(self.tb.dir().join("bench-daemon.log"))?;
        let child = Command::new(&self.exe)
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = control::call(
                &self.socket,
                &Ctl::Report {
                    org: Some(org.into()),
                    day: None,
                },
            )
            .is_ok_and(|r| r.ok);
            if ok {
                return Ok(started.elapsed());
            }
            if let Some(c) = self.daemon.as_mut()
                && let Some(st) = c.try_wait()?
            {
                let log = std::fs::read_to_string(self.tb.dir().join("bench-daemon.log"))
                    .unwrap_or_default();
                bail!("the daemon exited ({st}): {log}");
            }
            if Instant::now() > deadline {
                bail!("the daemon did not come up");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon and removes its pins: no limiter program stays attached.
    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = control::call(&self.socket, &Ctl::Shutdown { unload: true });
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = limiter_user::pins::unload(&self.tb.bpffs().join("limiter"));
    }

    /// wrk (one thread) for `load` against `server`, for `secs` whole seconds, to run in the
    /// client namespace; with `latency`, its summary has the percentiles.
    fn wrk_command(&self, server: Ipv4Addr, load: &Load, secs: f64, latency: bool) -> Command {
        let url = format!("http://{server}:{}{}", load.shape.port(), load.path);
        let mut cmd = Command::new("wrk");
        cmd.args(["-t1", "--timeout", "5s"])
            .arg(format!("-c{}", load.conns))
            .arg(format!("-d{}s", secs.ceil()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if latency {
            cmd.arg("--latency");
        }
        if !load.keep_alive {
            cmd.args(["-H", "Connection: close"]);
        }
        if load.padded {
            cmd.args(["-H", &format!("X-Pad: {}", "p".repeat(700))]);
        }
        if let Some(script) = load.shape.script() {
            let path = self.tb.dir().join(format!("{:?}.lua", load.shape));
            // A failed write shows as wrk's own error about the missing script.
            let _ = std::fs::write(&path, script);
            cmd.arg("-s").arg(path);
        }
        cmd.arg(&url);
        cmd
    }

    fn wrk(&self, load: &Load) -> Result<WrkRun> {
        let cmd = self.wrk_command(self.tb.server_v4(), load, self.secs, false);
        wait_wrk(self.tb.spawn_in_client(cmd)?)
    }

    /// The status code of one GET of `path` to `server` from the client namespace (the route to
    /// `server` picks the client address), with an optional extra header.
    fn status(&self, server: Ipv4Addr, path: &str, header: Option<(&str, &str)>) -> Result<u16> {
        let extra = header.map_or(String::new(), |(k, v)| format!("{k}: {v}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {server}:{PORT}\r\n{extra}Connection: close\r\n\r\n"
        );
        let line = self.tb.try_in_client(move || -> std::io::Result<String> {
            let timeout = Duration::from_secs(5);
            let mut s = TcpStream::connect_timeout(&SocketAddr::from((server, PORT)), timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(request.as_bytes())?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        })?;
        let line = line.with_context(|| format!("GET {path} from the client namespace"))?;
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("GET {path}: no status line in the answer {line:?}"))
    }

    /// Proves that [`nginx::LIMITED`]'s limits run: two requests under a fresh probe key, the
    /// second of which its one-a-minute zone must refuse.
    fn probe_limited(&self) -> Result<()> {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let key = format!("p{}", PROBES.fetch_add(1, Ordering::Relaxed));
        let header = Some((nginx::PROBE_HEADER, key.as_str()));
        let server = self.tb.server_v4();
        let first = self.status(server, nginx::LIMITED, header)?;
        let second = self.status(server, nginx::LIMITED, header)?;
        ensure!(
            (first, second) == (200, 429),
            "nginx's limits on {} do not run: a probe key's two requests got {first} and {second}, not 200 and 429",
            nginx::LIMITED
        );
        Ok(())
    }

    /// One run of `side` under `load`, checked against what the row claims; returns its req/s.
    fn side(
        &mut self,
        side: Side2,
        load: &Load,
        pass_cfg: &Path,
        refuse_cfg: &Path,
    ) -> Result<f64> {
        match side {
            Side2::Nginx => self.stop(),
            Side2::Limiter => {
                self.start(pass_cfg, BENCH_ORG)?;
            }
            Side2::KernelRefuses => {
                self.start(refuse_cfg, BENCH_ORG)?;
            }
        }
        let run = self.wrk(load)?;
        let what = format!("{} on {}", side_name(side, load), load.path);
        if side == Side2::Limiter
            && let Some(source) = load.shape.identity()
        {
            let n = self.identified_by(source)?;
            ensure!(
                n > 0,
                "{what}: the daemon reports no request identified by {source}; this row would not measure what it claims"
            );
        }
        let refuses = side == Side2::KernelRefuses
            || (side == Side2::Nginx && [nginx::REFUSE, nginx::RETURN_429].contains(&load.path));
        if refuses {
            check(&what, &run, Expect::Refuse)?;
            let status = self.status(self.tb.server_v4(), load.path, None)?;
            ensure!(
                status == 429,
                "{what}: the next request got {status}, not 429"
            );
        } else {
            check(&what, &run, Expect::Pass)?;
        }
        if side == Side2::Nginx && load.path == nginx::LIMITED {
            self.probe_limited()?;
        }
        Ok(run.rps)
    }

    fn compare(
        &mut self,
        scenario: &str,
        (a, la): (Side2, Load),
        (b, lb): (Side2, Load),
        cfgs: (&Path, &Path),
    ) -> Result<Row> {
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        for _ in 0..self.reps {
            va.push(self.side(a, &la, cfgs.0, cfgs.1)?);
            vb.push(self.side(b, &lb, cfgs.0, cfgs.1)?);
        }
        let (am, amin, amax) = median_min_max(&va);
        let (bm, bmin, bmax) = median_min_max(&vb);
        let row = Row {
            scenario: scenario.to_string(),
            a: side_name(a, &la).to_string(),
            b: side_name(b, &lb).to_string(),
            a_median: am,
            a_min: amin,
            a_max: amax,
            b_median: bm,
            b_min: bmin,
            b_max: bmax,
            ratio: if am > 0.0 { bm / am } else { 0.0 },
        };
        print!("{}", row.markdown());
        Ok(row)
    }
}

/// How a side is named in the table.
fn side_name(side: Side2, load: &Load) -> &'static str {
    match side {
        Side2::Nginx if load.path == nginx::LIMITED => "nginx limit_req+limit_conn",
        Side2::Nginx if load.path == nginx::REFUSE => "nginx limit_req's 429",
        Side2::Nginx if load.path == nginx::RETURN_429 => "nginx's own 429",
        Side2::Nginx => "no limiter",
        Side2::Limiter => "limiter",
        Side2::KernelRefuses => "kernel 429",
    }
}

impl Bench {
    /// One run of `load` with bpf_stats on, for the programs' own cost (apart from the
    /// comparisons, which run without the stats' clock reads).
    fn cost_run(&mut self, cfg: &Path, load: &Load) -> Result<KernelCost> {
        if let Some(other) = self.against.clone() {
            return self.cost_against(&other, cfg, load);
        }
        self.start(cfg, BENCH_ORG)?;
        // Read before the programs are unloaded.
        let k = self.measure_cost(load);
        self.stop();
        k
    }

    /// [`Bench::cost_run`] with `--against`: single runs of the other build and of this one,
    /// in turn, [`COST_REPEATS`] times; this build's median run, and both medians printed.
    fn cost_against(&mut self, other: &Path, cfg: &Path, load: &Load) -> Result<KernelCost> {
        let mine = self.exe.clone();
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..COST_REPEATS {
            for (exe, out) in [(other, &mut theirs), (mine.as_path(), &mut ours)] {
                self.exe = exe.to_path_buf();
                let run = self.start(cfg, BENCH_ORG).and_then(|_| self.one_cost(load));
                self.stop();
                self.exe.clone_from(&mine);
                out.push(run?);
            }
        }
        let (t, o) = (median_cost(theirs), median_cost(ours));
        println!(
            "against ({}): verdict {:.0} ns, this build {:.0} ns ({:.2}x)",
            load.describe(),
            t.verdict_ns_per_run,
            o.verdict_ns_per_run,
            o.verdict_ns_per_run / t.verdict_ns_per_run.max(1.0)
        );
        Ok(o)
    }

    /// [`COST_REPEATS`] runs of `load` under the programs loaded now: the cost of the run with
    /// the median verdict cost (the host's other guests move single runs by a third).
    fn measure_cost(&self, load: &Load) -> Result<KernelCost> {
        let runs = (0..COST_REPEATS)
            .map(|_| self.one_cost(load))
            .collect::<Result<Vec<_>>>()?;
        let mut each: Vec<f64> = runs.iter().map(|k| k.verdict_ns_per_run).collect();
        each.sort_by(f64::total_cmp);
        let each: Vec<String> = each.iter().map(|ns| format!("{ns:.0}")).collect();
        println!(
            "cost runs ({}): verdict ns per run {}",
            load.describe(),
            each.join(" / ")
        );
        Ok(median_cost(runs))
    }

    /// One run of `load`: the programs' cost over it, from bpf_stats read before and after.
    fn one_cost(&self, load: &Load) -> Result<KernelCost> {
        let before = StatsReading::now();
        self.wrk(load)?;
        Ok(StatsReading::now().since(&before))
    }

    /// [`Bench::cost_run`] with `limiter trace` reading (its output discarded): the verdict's
    /// cost with tracing on.
    fn traced_cost_run(&mut self, cfg: &Path, load: &Load) -> Result<KernelCost> {
        self.start(cfg, BENCH_ORG)?;
        let mut tracer = Command::new(&self.exe)
            .args(["trace", "--json", "--config"])
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting limiter trace")?;
        let mut stderr = std::io::BufReader::new(tracer.stderr.take().context("trace stderr")?);
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut first)?;
        let traced = if first.starts_with("tracing") {
            self.measure_cost(load)
        } else {
            Err(anyhow::anyhow!("limiter trace did not start: {first}"))
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
        let _ = tracer.wait();
        self.stop();
        traced
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Records that `what` could not run (its first error line is the daemon's or the check's).
fn not_run(notes: &mut Vec<String>, what: &str, e: &anyhow::Error) {
    let why = format!("{e:#}");
    let note = format!("{what}: {}", why.lines().next().unwrap_or_default());
    println!("not run: {note}");
    notes.push(note);
}

/// `starts` starts of the daemon with a keys file of `keys` keys: load time, and the memory of
/// the last start.
fn key_scale_row(b: &mut Bench, keys: usize, starts: usize) -> Result<KeyScaleRow> {
    let cfg = b.identity_config(Shape::ApiKey400, keys)?;
    let mut loads = Vec::new();
    let (mut mem, mut rss) = (0.0, 0.0);
    for _ in 0..starts.max(1) {
        loads.push(b.start(&cfg, BENCH_ORG)?.as_secs_f64());
        (mem, rss) = memory_of(b.daemon.as_ref().map(|c| c.id()).unwrap_or(0));
        b.stop();
    }
    let (load, load_min, load_max) = median_min_max(&loads);
    println!(
        "keys {keys:>9}: load {load:.2} s ({load_min:.2}–{load_max:.2} over {} starts), map memory {mem:.1} MiB, daemon RSS {rss:.1} MiB",
        loads.len()
    );
    Ok(KeyScaleRow {
        keys,
        load_secs: load,
        load_min_secs: load_min,
        load_max_secs: load_max,
        map_memory_mib: mem,
        daemon_rss_mib: rss,
        note: String::new(),
    })
}

/// The run with the median verdict cost.
fn median_cost(mut runs: Vec<KernelCost>) -> KernelCost {
    runs.sort_by(|a, b| a.verdict_ns_per_run.total_cmp(&b.verdict_ns_per_run));
    runs.swap_remove(runs.len() / 2)
}

/// Runs of each kernel-cost measurement; the median run's cost is reported.
const COST_REPEATS: usize = 3;

/// The bpf_stats totals of the verdict and sock_ops programs loaded now.
#[derive(Clone, Copy, Default)]
struct StatsReading {
    verdict_ns: f64,
    verdict_runs: u64,
    sock_ops_ns: f64,
    sock_ops_runs: u64,
}

impl StatsReading {
    fn now() -> Self {
        let mut r = StatsReading::default();
        for p in aya::programs::loaded_programs().flatten() {
            let name = p.name_as_str().unwrap_or_default().to_string();
            let (t, n) = (p.run_time().as_nanos() as f64, p.run_count());
            if name.starts_with("limiter_verdict") {
                r.verdict_runs += n;
                r.verdict_ns += t;
            } else if name.starts_with("limiter_sock_op") {
                r.sock_ops_runs += n;
                r.sock_ops_ns += t;
            }
        }
        r
    }

    /// The programs' cost per run between `before` and this reading.
    fn since(&self, before: &StatsReading) -> KernelCost {
        let per = |ns: f64, runs: u64| if runs > 0 { ns / runs as f64 } else { 0.0 };
        let verdict_runs = self.verdict_runs.saturating_sub(before.verdict_runs);
        let sock_ops_runs = self.sock_ops_runs.saturating_sub(before.sock_ops_runs);
        KernelCost {
            verdict_ns_per_run: per(self.verdict_ns - before.verdict_ns, verdict_runs),
            verdict_runs,
            sock_ops_ns_per_run: per(self.sock_ops_ns - before.sock_ops_ns, sock_ops_runs),
            sock_ops_runs,
            ..KernelCost::default()
        }
    }
}

/// Sum of `memlock` over the BPF map fds a process holds, and its RSS, in MiB.
fn memory_of(pid: u32) -> (f64, f64) {
    let mut memlock = 0u64;
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            if info.contains("map_type:") {
                memlock += info
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (memlock as f64 / 1048576.0, rss_kib / 1024.0)
}

fn markdown(r: &Results) -> String {
    let mut s = format!(
        "Machine: {} · kernel {} · {} s per run, {} runs per side{}\n\n\
         | scenario | A | A req/s (min–max) | B | B req/s (min–max) | B/A |\n|---|---|---|---|---|---|\n",
        r.machine,
        r.kernel,
        r.seconds_per_run,
        r.runs_per_side,
        if r.quick { " (--quick)" } else { "" }
    );
    for row in &r.rows {
        s.push_str(&row.markdown());
    }
    s.push_str(&format!(
        "\nKernel cost (bpf_stats, separate runs): verdict {:.0} ns per passing request over {} runs; \
         verdict with the 429 writer {:.0} ns per refused request over {} runs; sock_ops {:.0} ns per run over {} runs; \
         verdict while `limiter trace` reads {:.0} ns per passing keep-alive request over {} runs. \
         By request shape: API GET (~200 B) {:.0} ns per request; ten pipelined API GETs {:.0} ns per chunk; 64 KiB POST {:.0} ns per chunk over {} chunks. \
         By identity: a 400-byte API GET identified by its API key ({} keys) {}; \
         a PROXY v2 header and a GET per connection {}.\n\n\
         | orgs | load (s), median (min–max) | map memory (MiB) | daemon RSS (MiB) | passing req/s vs no limiter | note |\n|---|---|---|---|---|---|\n",
        r.kernel_cost.verdict_ns_per_run,
        r.kernel_cost.verdict_runs,
        r.kernel_cost.refused_ns_per_run,
        r.kernel_cost.refused_runs,
        r.kernel_cost.sock_ops_ns_per_run,
        r.kernel_cost.sock_ops_runs,
        r.kernel_cost.traced_ns_per_run,
        r.kernel_cost.traced_runs,
        r.kernel_cost.api_get_ns_per_run,
        r.kernel_cost.pipelined10_ns_per_run,
        r.kernel_cost.post64k_ns_per_run,
        r.kernel_cost.post64k_runs,
        BENCH_KEYS,
        per_run(
            r.kernel_cost.api_key_ns_per_run,
            r.kernel_cost.api_key_runs,
            "request"
        ),
        per_run(
            r.kernel_cost.proxy_v2_ns_per_run,
            r.kernel_cost.proxy_v2_runs,
            "chunk"
        ),
    ));
    for x in &r.scale {
        s.push_str(&format!(
            "| {} | {:.2} ({:.2}–{:.2}) | {:.1} | {:.1} | {:.3} | {} |\n",
            x.orgs,
            x.load_secs,
            x.load_min_secs,
            x.load_max_secs,
            x.map_memory_mib,
            x.daemon_rss_mib,
            x.passing_ratio,
            x.note
        ));
    }
    if !r.key_scale.is_empty() {
        s.push_str(
            "\n| API keys | load (s), median (min–max) | map memory (MiB) | daemon RSS (MiB) | note |\n|---|---|---|---|---|\n",
        );
    }
    for k in &r.key_scale {
        s.push_str(&format!(
            "| {} | {:.2} ({:.2}–{:.2}) | {:.1} | {:.1} | {} |\n",
            k.keys,
            k.load_secs,
            k.load_min_secs,
            k.load_max_secs,
            k.map_memory_mib,
            k.daemon_rss_mib,
            k.note
        ));
    }
    for note in &r.notes {
        s.push_str(&format!("\nNot run: {note}\n"));
    }
    for n in &r.neighbors {
        s.push('\n');
        s.push_str(&n.markdown());
    }
    s
}

/// Runs every scenario and writes `bench.json` and `bench.md` under `args.out`.
pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and makes network namespaces: run it as root");
    }
    for tool in ["nginx", "wrk"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!("{tool} is missing: `cargo xtask setup` installs it");
        }
    }
    let (secs, reps) = if args.quick { (1.0, 2) } else { (4.0, 5) };
    let _ = testbed::cleanup_stale();
    let tb = Testbed::new(TestbedOptions {
        name: "bench".into(),
        // The neighbors scenario's flooder and well-behaved org.
        clients_v4: 2,
        clients_v6: 0,
    })?;
    // Connection-per-request runs churn through ports fast: give the client every port, and let
    // the server reuse TIME_WAIT pairs, so the runs measure limiter, not port exhaustion.
    for (side, key, value) in [
        (Side::Client, "net.ipv4.ip_local_port_range", "1024 65535"),
        (Side::Server, "net.ipv4.tcp_max_tw_buckets", "1048576"),
        (Side::Client, "net.ipv4.tcp_tw_reuse", "1"),
    ] {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                tb.netns(side),
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])
            .status();
    }
    let addrs = neighbors::setup(&tb)?;
    let conf = nginx::write(tb.dir(), addrs.flooder).context("writing nginx's config")?;
    let mut nginx = Command::new("nginx");
    nginx
        .args(["-e", "stderr", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    tb.spawn_in_server(nginx)?;
    if let Err(e) = tb.wait_listening(Side::Server, PORT, Duration::from_secs(10)) {
        let log = std::fs::read_to_string(tb.dir().join("nginx-error.log")).unwrap_or_default();
        bail!("{e}; nginx said: {log}");
    }
    let socket = tb.dir().join("state").join("control.sock");
    let mut b = Bench {
        exe: testbed::limiter_exe()?,
        against: args.against.clone(),
        tb,
        secs,
        reps,
        daemon: None,
        socket,
    };
    let pass = b.config(1_000_000_000_000, 0)?;
    let refuse = b.config(1, 0)?;
    let cfgs = (pass.as_path(), refuse.as_path());
    let l = |path, conns, keep_alive, padded| Load {
        path,
        conns,
        keep_alive,
        padded,
        shape: Shape::Plain,
    };
    println!(
        "== limiter bench: nginx in a namespace and cgroup, wrk from another; {secs} s per run, {reps} runs per side, alternating\n"
    );
    let passing = |conns, keep_alive| {
        (
            (Side2::Nginx, l(nginx::RETURN_200, conns, keep_alive, false)),
            (
                Side2::Limiter,
                l(nginx::RETURN_200, conns, keep_alive, false),
            ),
        )
    };
    // A kernel 429 can stay keep-alive only when the request is at least as long as it.
    let refused = |nginx_path, keep_alive| {
        (
            (Side2::Nginx, l(nginx_path, 64, keep_alive, keep_alive)),
            (
                Side2::KernelRefuses,
                l(nginx::RETURN_200, 64, keep_alive, keep_alive),
            ),
        )
    };
    let comparisons = [
        ("passing, keep-alive, 1 conn", passing(1, true)),
        ("passing, keep-alive, 64 conns", passing(64, true)),
        ("passing, conn per request, 1 conn", passing(1, false)),
        ("passing, conn per request, 64 conns", passing(64, false)),
        (
            "429s, keep-alive, 64 conns",
            refused(nginx::RETURN_429, true),
        ),
        ("429s, keep-alive, 64 conns", refused(nginx::REFUSE, true)),
        (
            "429s, conn per request, 64 conns",
            refused(nginx::RETURN_429, false),
        ),
        (
            "429s, conn per request, 64 conns",
            refused(nginx::REFUSE, false),
        ),
        (
            "per-client limiting, keep-alive, 64 conns",
            (
                (Side2::Nginx, l(nginx::LIMITED, 64, true, false)),
                (Side2::Limiter, l(nginx::STATIC, 64, true, false)),
            ),
        ),
    ];
    let mut rows = Vec::new();
    let mut neighbors = Vec::new();
    let mut notes = Vec::new();
    if !args.cost_only {
        if !args.neighbors_only {
            for (scenario, (side_a, side_b)) in comparisons {
                rows.push(b.compare(scenario, side_a, side_b, cfgs)?);
            }
            // Passing traffic with the org known by another source than the address.
            for (scenario, shape, keep_alive) in [
                (
                    "passing, identify_by api_key (400 B GET), keep-alive, 64 conns",
                    Shape::ApiKey400,
                    true,
                ),
                (
                    "passing, identify_by proxy_protocol (v2), conn per request, 64 conns",
                    Shape::ProxyV2,
                    false,
                ),
            ] {
                let cfg = b.identity_config(shape, BENCH_KEYS)?;
                let load = Load {
                    shape,
                    ..l(nginx::RETURN_200, 64, keep_alive, false)
                };
                // A source this build's daemon refuses leaves a note, not a failed bench.
                match b.compare(
                    scenario,
                    (Side2::Nginx, load.clone()),
                    (Side2::Limiter, load),
                    (&cfg, &cfg),
                ) {
                    Ok(row) => rows.push(row),
                    Err(e) => not_run(&mut notes, scenario, &e),
                }
            }
        }
        for shape in [Shape::Plain, Shape::ApiHeaders] {
            let n = neighbors::run(&mut b, &addrs, shape)?;
            println!("\n{}", n.markdown());
            neighbors.push(n);
        }
    }
    if args.neighbors_only {
        b.stop();
        let md: String = neighbors.iter().map(|n| n.markdown() + "\n").collect();
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("bench-neighbors.md"), &md)?;
        println!("wrote {}", args.out.join("bench-neighbors.md").display());
        return Ok(ExitCode::SUCCESS);
    }
    // The programs' own cost, from bpf_stats (run_time_ns / run_cnt), in runs of their own.
    let kernel_cost = {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let keep = b.cost_run(&pass, &l(nginx::RETURN_200, 64, true, false))?;
        let close = b.cost_run(&pass, &l(nginx::RETURN_200, 64, false, false))?;
        let refused = b.cost_run(&refuse, &l(nginx::RETURN_200, 64, true, true))?;
        let traced = b.traced_cost_run(&pass, &l(nginx::RETURN_200, 64, true, false))?;
        // The stream parser's cost by request shape (keep-alive, passing).
        let shaped = |b: &mut Bench, shape| {
            let load = Load {
                shape,
                ..l(nginx::RETURN_200, 64, true, false)
            };
            b.cost_run(&pass, &load)
        };
        let post64k = shaped(&mut b, Shape::Post64k)?;
        let mut identity_cost = |b: &mut Bench, shape, keys, keep_alive, what: &str| {
            let load = Load {
                shape,
                ..l(nginx::RETURN_200, 64, keep_alive, false)
            };
            match b
                .identity_config(shape, keys)
                .and_then(|cfg| b.cost_run(&cfg, &load))
            {
                Ok(k) => k,
                Err(e) => {
                    not_run(&mut notes, what, &e);
                    KernelCost::default()
                }
            }
        };
        let api_key = identity_cost(
            &mut b,
            Shape::ApiKey400,
            BENCH_KEYS,
            true,
            "kernel cost, identify_by api_key",
        );
        let proxy_v2 = identity_cost(
            &mut b,
            Shape::ProxyV2,
            0,
            false,
            "kernel cost, identify_by proxy_protocol",
        );
        let runs = keep.verdict_runs + close.verdict_runs;
        let avg = |a: f64, an: u64, b: f64, bn: u64| {
            if an + bn == 0 {
                0.0
            } else {
                (a * an as f64 + b * bn as f64) / (an + bn) as f64
            }
        };
        KernelCost {
            verdict_ns_per_run: avg(
                keep.verdict_ns_per_run,
                keep.verdict_runs,
                close.verdict_ns_per_run,
                close.verdict_runs,
            ),
            verdict_runs: runs,
            sock_ops_ns_per_run: avg(
                keep.sock_ops_ns_per_run,
                keep.sock_ops_runs,
                close.sock_ops_ns_per_run,
                close.sock_ops_runs,
            ),
            sock_ops_runs: keep.sock_ops_runs + close.sock_ops_runs,
            refused_ns_per_run: refused.verdict_ns_per_run,
            refused_runs: refused.verdict_runs,
            traced_ns_per_run: traced.verdict_ns_per_run,
            traced_runs: traced.verdict_runs,
            api_get_ns_per_run: shaped(&mut b, Shape::ApiGet)?.verdict_ns_per_run,
            pipelined10_ns_per_run: shaped(&mut b, Shape::Pipelined10)?.verdict_ns_per_run,
            post64k_ns_per_run: post64k.verdict_ns_per_run,
            post64k_runs: post64k.verdict_runs,
            api_key_ns_per_run: api_key.verdict_ns_per_run,
            api_key_runs: api_key.verdict_runs,
            proxy_v2_ns_per_run: proxy_v2.verdict_ns_per_run,
            proxy_v2_runs: proxy_v2.verdict_runs,
        }
    };
    println!(
        "kernel cost: verdict {:.0} ns per passing request, {:.0} ns per refused request (429 writer included), sock_ops {:.0} ns per run",
        kernel_cost.verdict_ns_per_run,
        kernel_cost.refused_ns_per_run,
        kernel_cost.sock_ops_ns_per_run
    );
    println!(
        "kernel cost with `limiter trace` reading: verdict {:.0} ns per passing keep-alive request (tracing off: {:.0})",
        kernel_cost.traced_ns_per_run, kernel_cost.verdict_ns_per_run
    );
    println!(
        "kernel cost by request shape: API GET (~200 B) {:.0} ns per request; 10 pipelined API GETs {:.0} ns per chunk ({:.0} ns per request); 64 KiB POST {:.0} ns per chunk over {} chunks",
        kernel_cost.api_get_ns_per_run,
        kernel_cost.pipelined10_ns_per_run,
        kernel_cost.pipelined10_ns_per_run / 10.0,
        kernel_cost.post64k_ns_per_run,
        kernel_cost.post64k_runs
    );

    println!(
        "kernel cost by identity: 400-byte API GET with a key lookup ({BENCH_KEYS} keys) {} (target < 500 ns); PROXY v2 header and a GET per connection {}",
        per_run(
            kernel_cost.api_key_ns_per_run,
            kernel_cost.api_key_runs,
            "request"
        ),
        per_run(
            kernel_cost.proxy_v2_ns_per_run,
            kernel_cost.proxy_v2_runs,
            "chunk"
        ),
    );

    let mut scale = Vec::new();
    let sizes: &[usize] = if args.cost_only {
        &[]
    } else if args.quick {
        &[10, 10_000]
    } else {
        &[10, 10_000, 1_000_000]
    };
    for &orgs in sizes {
        let cfg = match b.config(1_000_000_000_000, orgs.saturating_sub(1)) {
            Ok(c) => c,
            Err(e) => {
                scale.push(ScaleRow::failed(orgs, e.to_string()));
                continue;
            }
        };
        match b.start(&cfg, BENCH_ORG) {
            Ok(took) => {
                let pid = b.daemon.as_ref().map(|c| c.id()).unwrap_or(0);
                let (mem, rss) = memory_of(pid);
                let load = l(nginx::RETURN_200, 64, true, false);
                let (mut va, mut vb) = (Vec::new(), Vec::new());
                let mut loads = vec![took.as_secs_f64()];
                for _ in 0..reps {
                    loads.push(b.start(&cfg, BENCH_ORG)?.as_secs_f64());
                    vb.push(b.wrk(&load)?.rps);
                    b.stop();
                    va.push(b.wrk(&load)?.rps);
                }
                let ratio = median_min_max(&vb).0 / median_min_max(&va).0.max(1.0);
                let (load, load_min, load_max) = median_min_max(&loads);
                println!(
                    "scale {orgs:>9} orgs: load {load:.2} s ({load_min:.2}–{load_max:.2} over {} starts), map memory {mem:.1} MiB, daemon RSS {rss:.1} MiB, passing ratio {ratio:.3}",
                    loads.len()
                );
                scale.push(ScaleRow {
                    orgs,
                    load_secs: load,
                    load_min_secs: load_min,
                    load_max_secs: load_max,
                    map_memory_mib: mem,
                    daemon_rss_mib: rss,
                    passing_ratio: ratio,
                    note: String::new(),
                });
            }
            Err(e) => {
                let first = e.to_string().lines().last().unwrap_or_default().to_string();
                println!("scale {orgs:>9} orgs: not loaded: {first}");
                scale.push(ScaleRow::failed(orgs, first));
            }
        }
        b.stop();
    }
    // API keys files by size: how long the daemon takes to load one, and what it holds.
    let mut key_scale = Vec::new();
    let key_sizes: &[usize] = if args.cost_only {
        &[]
    } else if args.quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 1_000_000]
    };
    for &keys in key_sizes {
        key_scale.push(match key_scale_row(&mut b, keys, reps.min(3)) {
            Ok(row) => row,
            Err(e) => {
                let first = format!("{e:#}")
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string();
                KeyScaleRow {
                    keys,
                    load_secs: 0.0,
                    load_min_secs: 0.0,
                    load_max_secs: 0.0,
                    map_memory_mib: 0.0,
                    daemon_rss_mib: 0.0,
                    note: first,
                }
            }
        });
        b.stop();
    }
    let results = Results {
        machine: format!(
            "{} cores, {:.0} GiB",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::fs::read_to_string("/proc/meminfo")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1048576.0
        ),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        quick: args.quick,
        seconds_per_run: secs,
        runs_per_side: reps,
        rows,
        kernel_cost,
        scale,
        key_scale,
        neighbors,
        notes,
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    let md = markdown(&results);
    std::fs::write(args.out.join("bench.md"), &md)?;
    println!(
        "\n{md}\nwritten: {}/bench.json, bench.md",
        args.out.display()
    );
    drop(b);
    Ok(ExitCode::SUCCESS)
}

/// A cost per run, or "not run" when nothing ran (never a 0 ns that was not measured).
fn per_run(ns: f64, runs: u64, unit: &str) -> String {
    if runs == 0 {
        "not run".to_owned()
    } else {
        format!("{ns:.0} ns per {unit} over {runs} runs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(requests: u64, refused: u64) -> WrkRun {
        WrkRun {
            rps: requests as f64,
            requests,
            refused,
            p99_us: None,
        }
    }

    #[test]
    fn status_checks() {
        assert!(check("x", &run(100, 0), Expect::Pass).is_ok());
        let e = check("nginx on /x", &run(100, 1), Expect::Pass).unwrap_err();
        assert!(e.to_string().contains("nginx on /x: 1 of 100"), "{e}");
        assert!(check("x", &run(100, 95), Expect::Refuse).is_ok());
        assert!(check("x", &run(100, 50), Expect::Refuse).is_err());
        assert!(check("x", &run(0, 0), Expect::Refuse).is_err());
    }

    /// The api_key rows' head is the 400 bytes the cost target speaks of (wrk's request line,
    /// its Host header for a testbed address, the script's headers and the blank line).
    #[test]
    fn api_key_head_is_400_bytes() {
        let script = Shape::ApiKey400.script().expect("a script");
        let path = script
            .lines()
            .find_map(|l| l.strip_prefix("wrk.path = "))
            .expect("a path")
            .trim_matches('"');
        let mut len = format!("GET {path} HTTP/1.1\r\nHost: 10.123.234.1:{PORT}\r\n").len() + 2;
        for l in script
            .lines()
            .filter_map(|l| l.strip_prefix("wrk.headers[\""))
        {
            let (k, v) = l.split_once("\"] = ").expect("a header");
            len += format!("{k}: {}\r\n", v.trim_matches('"')).len();
        }
        assert!((380..=420).contains(&len), "the head is {len} bytes");
        assert!(script.contains(BENCH_KEY));
    }

    /// The PROXY load's Lua string is exactly the header the test server's parser reads.
    #[test]
    fn proxy_script_carries_the_header() {
        let h = bench_proxy_header().expect("header");
        let script = Shape::ProxyV2.script().expect("a script");
        let lit = lua_bytes(&h);
        assert!(script.contains(&lit));
        let decoded: Vec<u8> = lit
            .trim_matches('"')
            .split('\\')
            .filter(|d| !d.is_empty())
            .map(|d| d.parse::<u8>().expect("a decimal escape"))
            .collect();
        assert_eq!(decoded, h);
        assert_eq!(
            testbed::parse_proxy_header(&decoded),
            testbed::http::Parse::Done((Some(PROXIED_CLIENT.parse().expect("ip")), h.len()))
        );
        assert_eq!(Shape::ProxyV2.port(), nginx::PROXY_PORT);
        assert_eq!(Shape::ApiKey400.identity(), Some("api_key"));
    }

    #[test]
    fn medians() {
        assert_eq!(median_min_max(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_min_max(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
