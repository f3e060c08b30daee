//! The config file (`/etc/limiter/limiter.toml`): parsing, defaults and validation.
//!
//! The `toml` crate reads the file into the serde structs of `raw`, which declare every key
//! once and check each value on its own (with the value's span). `validate` then turns them
//! into the [`Config`] the daemon uses: defaults, and the checks that need several values.
//! Long org lists can come from an orgs file of one org per line (`orgs_file`), cheaper to read
//! than TOML tables and checked by the same rules.
//! Every problem is reported as `FILE:LINE:COL: KEY: PROBLEM` so an operator (and
//! `limiter reload`) can point at the exact spot.

mod error;
mod keys_file;
mod orgs_file;
mod raw;
mod restart;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

pub use error::ConfigError;
pub use restart::{Changed, Pos, RestartOnly, Sections};

/// Where `--config` points by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/limiter/limiter.toml";

/// Most orgs a config may define. The kernel's org maps are sized from the config at startup
/// (slot 0 counts `unmapped` traffic); this bounds their memory (about 400 bytes per org).
pub const MAX_CONFIG_ORGS: usize = (1 << 22) - 1;

/// Used when no cgroup2 filesystem is mounted; `limiter check` reports the missing mount.
const FALLBACK_CGROUP: &str = "/sys/fs/cgroup";
const DEFAULT_MEDIA_PREFIX: &str = "/media/";
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/limiter";
const DEFAULT_STATE_DIR: &str = "/var/lib/limiter";
const CONTROL_SOCKET_NAME: &str = "control.sock";
const DEFAULT_SNAPSHOT_INTERVAL_SECS: u64 = 60;
const DEFAULT_DAILY_REQUESTS: u64 = 2500;
const DEFAULT_CONCURRENT_CONNECTIONS: u32 = 3;
/// `limits.pace_rate`: a paced org's new connections a second. Enough for a client that
/// reconnects after each refusal to go on reaching its exempt media GETs, far too few to flood.
pub const DEFAULT_PACE_RATE: u32 = 10;
/// The highest `pace_rate` (one a microsecond).
pub const MAX_PACE_RATE: u32 = 1_000_000;
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 250;

/// The whole validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub api: Api,
    pub limits: Limits,
    pub daemon: DaemonSettings,
    /// One quota across many API hosts, shared through Redis; None: this host alone.
    pub cluster: RestartOnly<Option<Cluster>>,
    pub orgs: Vec<Org>,
    /// The API keys' digests, when `api.identify_by` lists `"api_key"`.
    pub keys: Option<ApiKeys>,
}

/// `[api]`: which traffic is the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Api {
    pub ports: Vec<u16>,
    pub cgroup: RestartOnly<PathBuf>,
    pub media_get_prefixes: Vec<String>,
    pub interfaces: RestartOnly<Vec<String>>,
    /// Network namespace (a file such as `/run/netns/api`) the `interfaces` live in, when the API
    /// runs in another namespace than the daemon; None: the daemon's own.
    pub netns: RestartOnly<Option<PathBuf>>,
    /// A file of orgs, one per line, read (and on reload re-read) beside `[[orgs]]`; its orgs
    /// are in [`Config::orgs`] after those of the config.
    pub orgs_file: Option<PathBuf>,
    /// How requests are attributed to orgs.
    pub identify: Identify,
}

/// Where an org can be known from (`api.identify_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    ApiKey,
    ProxyProtocol,
    Forwarded,
    Address,
}

impl Source {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::ApiKey => "api_key",
            Source::ProxyProtocol => "proxy_protocol",
            Source::Forwarded => "forwarded",
            Source::Address => "address",
        }
    }

    /// The kernel's `ID_*` value.
    pub fn kernel_id(self) -> u8 {
        match self {
            Source::ApiKey => limiter_common::ID_API_KEY,
            Source::ProxyProtocol => limiter_common::ID_PROXY_PROTOCOL,
            Source::Forwarded => limiter_common::ID_FORWARDED,
            Source::Address => limiter_common::ID_ADDRESS,
        }
    }

    /// Whether the source yields an address, looked up in the orgs' CIDRs.
    pub fn by_address(self) -> bool {
        self != Source::ApiKey
    }
}

/// The header a trusted proxy puts the client's address in (`api.forwarded_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    #[default]
    XForwardedFor,
    Forwarded,
    XRealIp,
}

impl ForwardedHeader {
    /// The header's name, lowercase (as the kernel compares it).
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
            ForwardedHeader::XRealIp => "x-real-ip",
        }
    }

    /// The kernel's `FWD_*` value.
    pub fn kernel_kind(self) -> u8 {
        match self {
            ForwardedHeader::XForwardedFor => limiter_common::FWD_X_FORWARDED_FOR,
            ForwardedHeader::Forwarded => limiter_common::FWD_FORWARDED,
            ForwardedHeader::XRealIp => limiter_common::FWD_X_REAL_IP,
        }
    }
}

/// The default of `api.api_key_header`.
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";

/// How requests are attributed to orgs: `api.identify_by` and the settings of its sources. All
/// of it is written into the kernel's maps, so a reload applies every change.
#[derive(Debug, Clone, PartialEq)]
pub struct Identify {
    /// Tried in this order (at least one, each once).
    pub by: Vec<Source>,
    /// Peers whose PROXY protocol and forwarded headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    pub forwarded_header: ForwardedHeader,
    /// The API key header's name, lowercase; `authorization` takes the Bearer token or the
    /// Basic user name.
    pub api_key_header: String,
    /// `ORG KEY` lines; read when `by` lists [`Source::ApiKey`].
    pub api_keys_file: Option<PathBuf>,
}

impl Default for Identify {
    fn default() -> Self {
        Identify {
            by: vec![Source::Address],
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            api_key_header: DEFAULT_API_KEY_HEADER.to_owned(),
            api_keys_file: None,
        }
    }
}

impl Identify {
    pub fn uses(&self, source: Source) -> bool {
        self.by.contains(&source)
    }

    /// Whether some source is looked up in the orgs' CIDRs.
    pub fn by_address(&self) -> bool {
        self.by.iter().any(|s| s.by_address())
    }

    /// Whether the key header is `Authorization` (Bearer token or Basic user name).
    pub fn key_is_authorization(&self) -> bool {
        self.api_key_header == "authorization"
    }
}

/// The keys of `api.api_keys_file` as the kernel holds them: digests under a secret, never the
/// keys themselves.
#[derive(Clone, PartialEq)]
pub struct ApiKeys {
    /// The digests' key.
    pub secret: crate::secret::KeySecret,
    /// Why the secret is a new one rather than the one kept in the state directory (None: it
    /// was read from there). The daemon keeps a new one before using it.
    pub secret_is_new: Option<String>,
    /// One entry per key, sorted by digest (each digest once).
    pub entries: Vec<KeyEntry>,
}

/// How many keys, not a million digests.
impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("secret", &self.secret)
            .field("secret_is_new", &self.secret_is_new)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// One line of the keys file, without its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEntry {
    pub digest: u64,
    /// Index of the org in [`Config::orgs`].
    pub org: u32,
    /// 1-based line in the keys file.
    pub line: u32,
}

/// `[limits]`: the defaults every org gets unless it overrides them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub daily_requests: u64,
    pub concurrent_connections: u32,
    pub concurrency_mode: ConcurrencyMode,
    pub quota_mode: QuotaMode,
    /// UTC seconds after midnight at which the daily quota resets. It moves the quota day
    /// itself, so only a restart (which closes the running day) applies it.
    pub day_start_secs: RestartOnly<u32>,
    /// Whether an org out of its daily quota has its new connections paced at the XDP gate.
    pub pace_over_quota: bool,
    /// The paced org's new connections a second.
    pub pace_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            daily_requests: DEFAULT_DAILY_REQUESTS,
            concurrent_connections: DEFAULT_CONCURRENT_CONNECTIONS,
            concurrency_mode: ConcurrencyMode::Observe,
            quota_mode: QuotaMode::Enforce,
            day_start_secs: RestartOnly::default(),
            pace_over_quota: false,
            pace_rate: DEFAULT_PACE_RATE,
        }
    }
}

/// What happens when an org opens more connections than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConcurrencyMode {
    Observe,
    Delay,
    Reject,
}

impl ConcurrencyMode {
    /// The spelling used in the config file and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            ConcurrencyMode::Observe => "observe",
            ConcurrencyMode::Delay => "delay",
            ConcurrencyMode::Reject => "reject",
        }
    }
}

impl fmt::Display for ConcurrencyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an exhausted quota refuses requests or only counts what would have been refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaMode {
    Enforce,
    DryRun,
}

impl QuotaMode {
    /// The spelling used in the config file and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaMode::Enforce => "enforce",
            QuotaMode::DryRun => "dry-run",
        }
    }
}

impl fmt::Display for QuotaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Log line format of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[daemon]`: where the daemon keeps its pins, state and socket. All of it is opened, bound or
/// scheduled at startup, so a reload changes none of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSettings {
    pub pin_dir: RestartOnly<PathBuf>,
    pub state_dir: RestartOnly<PathBuf>,
    pub log_format: RestartOnly<LogFormat>,
    pub control_socket: RestartOnly<PathBuf>,
    pub snapshot_interval_secs: RestartOnly<u64>,
    /// Where to serve Prometheus metrics (`/metrics`); None: not served.
    pub metrics: RestartOnly<Option<std::net::SocketAddr>>,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        DaemonSettings {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR).into(),
            control_socket: state_dir.join(CONTROL_SOCKET_NAME).into(),
            state_dir: state_dir.into(),
            log_format: RestartOnly::default(),
            snapshot_interval_secs: DEFAULT_SNAPSHOT_INTERVAL_SECS.into(),
            metrics: RestartOnly::default(),
        }
    }
}

/// One `[[orgs]]` entry or one line of the orgs file.
#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub name: String,
    /// Normalised networks (host bits are rejected, bare addresses become /32 or /128).
    pub cidrs: Vec<IpNet>,
    pub daily_requests: Option<u64>,
    pub concurrent_connections: Option<u32>,
    pub concurrency_mode: Option<ConcurrencyMode>,
    pub quota_mode: Option<QuotaMode>,
    pub pace_over_quota: Option<bool>,
    /// 1-based line of the org's `name` key (or its line in the orgs file), for messages.
    pub line: usize,
}

/// The limits that apply to one org after overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub daily_requests: u64,
    pub concurrent_connections: u32,
    pub concurrency_mode: ConcurrencyMode,
    pub quota_mode: QuotaMode,
    /// New connections a second while out of quota; 0: not paced (off, or no interface for
    /// the XDP gate).
    pub pace_rate: u32,
}

/// `[cluster]`: hosts share each org's daily count through Redis (or Valkey).
#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    pub redis: String,
    /// This host's name in the shared counters (default: the hostname).
    pub host_id: String,
    /// How often local counts are sent and platform totals read (default 250 ms).
    pub sync_interval_ms: u64,
}

/// The URL's password never reaches a log line through `{:?}`.
impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &crate::sync::redact_url(&self.redis))
            .field("host_id", &self.host_id)
            .field("sync_interval_ms", &self.sync_interval_ms)
            .finish()
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `file` is only used in messages. The orgs file the text names
    /// (`api.orgs_file`) is read from disk.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Config::parse_with_max_orgs(text, file, MAX_CONFIG_ORGS)
    }

    /// Like [`Config::parse`], for callers that size the kernel's org table themselves and so
    /// accept more than [`MAX_CONFIG_ORGS`] orgs (benchmarks with a million orgs).
    pub fn parse_with_max_orgs(
        text: &str,
        file: &Path,
        max_orgs: usize,
    ) -> Result<Config, ConfigError> {
        let src = error::Src { file, text };
        let raw = raw::read(&src)?;
        validate::config(&src, raw, max_orgs)
    }

    /// How many API keys the keys file lists (entries of the kernel's key table).
    pub fn key_count(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.entries.len())
    }

    /// How many CIDRs the orgs list in all (entries of the kernel's address tables).
    pub fn cidr_count(&self) -> usize {
        self.orgs.iter().map(|o| o.cidrs.len()).sum()
    }

    /// The limits of an org without overrides.
    pub fn default_limits(&self) -> EffectiveLimits {
        EffectiveLimits {
            daily_requests: self.limits.daily_requests,
            concurrent_connections: self.limits.concurrent_connections,
            concurrency_mode: self.limits.concurrency_mode,
            quota_mode: self.limits.quota_mode,
            pace_rate: self.pace_rate(self.limits.pace_over_quota),
        }
    }

    /// The pace for an org whose `pace_over_quota` is `on`: none without an interface for the
    /// gate (refusals would then close connections for nothing).
    fn pace_rate(&self, on: bool) -> u32 {
        if on && !self.api.interfaces.is_empty() {
            self.limits.pace_rate
        } else {
            0
        }
    }

    /// The limits of `org` after its overrides.
    pub fn limits_for(&self, org: &Org) -> EffectiveLimits {
        EffectiveLimits {
            daily_requests: org.daily_requests.unwrap_or(self.limits.daily_requests),
            concurrent_connections: org
                .concurrent_connections
                .unwrap_or(self.limits.concurrent_connections),
            concurrency_mode: org.concurrency_mode.unwrap_or(self.limits.concurrency_mode),
            quota_mode: org.quota_mode.unwrap_or(self.limits.quota_mode),
            pace_rate: self.pace_rate(org.pace_over_quota.unwrap_or(self.limits.pace_over_quota)),
        }
    }
}

/// The default of `api.cgroup`: where the cgroup2 filesystem is mounted, or `/sys/fs/cgroup`.
pub fn default_cgroup() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| cgroup2_mount(&mounts))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_CGROUP))
}

fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

/// The first mount point of type `cgroup2` in a `/proc/self/mounts` text.
fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let _device = fields.next()?;
        let mount_point = fields.next()?;
        (fields.next()? == "cgroup2").then(|| unescape_mount_field(mount_point))
    })
}

/// The kernel writes space, tab, newline and backslash in mount points as `\ooo` octal escapes.
fn unescape_mount_field(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter().try_fold(0u32, |acc, &c| {
                (b'0'..=b'7')
                    .contains(&c)
                    .then(|| acc * 8 + u32::from(c - b'0'))
            })
        });
        match (bytes[i], octal.and_then(|v| u8::try_from(v).ok())) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}
