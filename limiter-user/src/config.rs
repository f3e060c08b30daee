//! The config file (`/etc/limiter/limiter.toml`): parsing, defaults and validation.
//!
//! Every problem is reported as `FILE:LINE:COL: KEY: PROBLEM` so an operator (and `limiter reload`)
//! can point at the exact spot.
//!
//! Two parsers feed one validator. A small scanner handles the plain layout the documentation
//! shows (`[table]` headers, `[[orgs]]`, `key = "string" | 'string' | integer | [array]`,
//! comments), because the `toml` crate needs several seconds for a million orgs. Whenever the
//! file uses anything else (escapes, inline tables, dotted keys, floats, …) the scanner gives up
//! and the `toml` crate parses the whole file instead. Both produce the same position-tagged tree
//! and hand it, section by section in file order, to the same [`Builder`], so results and
//! messages do not depend on which parser ran.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

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
/// `sun_path` holds 108 bytes including the terminating NUL; longer socket paths fail at bind time.
const MAX_SOCKET_PATH: usize = 107;
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;
const MAX_ORG_NAME: usize = 64;
/// The report uses this name for traffic of unknown orgs, so no real org may take it.
const RESERVED_ORG_NAME: &str = "unmapped";

const ROOT_KEYS: &str = "api, limits, daemon, cluster, orgs";
const CLUSTER_KEYS: &str = "redis, host_id, sync_interval_ms";
const API_KEYS: &str = "ports, cgroup, media_get_prefixes, interfaces, netns";
const LIMITS_KEYS: &str =
    "daily_requests, concurrent_connections, concurrency_mode, quota_mode, day_start";
const DAEMON_KEYS: &str =
    "pin_dir, state_dir, log_format, control_socket, snapshot_interval_secs, metrics";
const ORG_KEYS: &str =
    "name, cidrs, daily_requests, concurrent_connections, concurrency_mode, quota_mode";

/// The whole validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub api: Api,
    pub limits: Limits,
    pub daemon: Daemon,
    /// One quota across many API hosts, shared through Redis; None: this host alone.
    pub cluster: Option<Cluster>,
    pub orgs: Vec<Org>,
}

/// `[api]`: which traffic is the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Api {
    pub ports: Vec<u16>,
    pub cgroup: PathBuf,
    pub media_get_prefixes: Vec<String>,
    pub interfaces: Vec<String>,
    /// Network namespace (a file such as `/run/netns/api`) the `interfaces` live in, when the API
    /// runs in another namespace than the daemon; None: the daemon's own.
    pub netns: Option<PathBuf>,
}

/// `[limits]`: the defaults every org gets unless it overrides them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub daily_requests: u64,
    pub concurrent_connections: u32,
    pub concurrency_mode: ConcurrencyMode,
    pub quota_mode: QuotaMode,
    /// UTC seconds after midnight at which the daily quota resets.
    pub day_start_secs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            daily_requests: DEFAULT_DAILY_REQUESTS,
            concurrent_connections: DEFAULT_CONCURRENT_CONNECTIONS,
            concurrency_mode: ConcurrencyMode::Observe,
            quota_mode: QuotaMode::Enforce,
            day_start_secs: 0,
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

    fn from_config(s: &str) -> Option<Self> {
        match s {
            "observe" => Some(ConcurrencyMode::Observe),
            "delay" => Some(ConcurrencyMode::Delay),
            "reject" => Some(ConcurrencyMode::Reject),
            _ => None,
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

    fn from_config(s: &str) -> Option<Self> {
        match s {
            "enforce" => Some(QuotaMode::Enforce),
            "dry-run" => Some(QuotaMode::DryRun),
            _ => None,
        }
    }
}

impl fmt::Display for QuotaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Log line format of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
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

/// `[daemon]`: where the daemon keeps its pins, state and socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Daemon {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub control_socket: PathBuf,
    pub snapshot_interval_secs: u64,
    /// Where to serve Prometheus metrics (`/metrics`); None: not served.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for Daemon {
    fn default() -> Self {
        let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        Daemon {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            control_socket: state_dir.join(CONTROL_SOCKET_NAME),
            state_dir,
            log_format: LogFormat::Text,
            snapshot_interval_secs: DEFAULT_SNAPSHOT_INTERVAL_SECS,
            metrics: None,
        }
    }
}

/// One `[[orgs]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub name: String,
    /// Normalised networks (host bits are rejected, bare addresses become /32 or /128).
    pub cidrs: Vec<IpNet>,
    pub daily_requests: Option<u64>,
    pub concurrent_connections: Option<u32>,
    pub concurrency_mode: Option<ConcurrencyMode>,
    pub quota_mode: Option<QuotaMode>,
    /// 1-based line of the org's `name` key, for messages.
    pub line: usize,
}

/// The limits that apply to one org after overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub daily_requests: u64,
    pub concurrent_connections: u32,
    pub concurrency_mode: ConcurrencyMode,
    pub quota_mode: QuotaMode,
}

/// Why a config could not be loaded. Everything but `Read` carries the file, line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("{}: cannot read the config: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid TOML, but a key is unknown, missing, of the wrong type or has a bad value.
    #[error("{}:{line}:{column}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The config file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. } => file,
        }
    }

    /// 1-based line of the problem (`None` when the file could not be read).
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }

    /// 1-based column (in characters) of the problem.
    pub fn column(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { column, .. } | ConfigError::Invalid { column, .. } => {
                Some(*column)
            }
        }
    }

    /// The key path, like `orgs[2].cidrs[0]` (`None` for read and syntax errors).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The problem alone, without file, position and key.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => source.to_string(),
            ConfigError::Syntax { message, .. } | ConfigError::Invalid { message, .. } => {
                message.clone()
            }
        }
    }
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

pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 250;

fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string())
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

    /// Validates config text; `file` is only used in messages.
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
        parse_text(text, file, max_orgs, true)
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

/// `FILE:LINE:COL` of `table.key` in a config file that validated, for messages about a valid
/// value (a reload refusing a restart-only change). A key left out points at its table, and a
/// table left out (or the whole file, when it cannot be read again) at 1:1.
pub fn locate(file: &Path, table: &str, key: Option<&str>) -> String {
    type Section = toml::Spanned<HashMap<String, toml::Spanned<toml::Value>>>;
    /// The tables a reload can refuse a change in, with the position of every key.
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Doc {
        api: Option<Section>,
        limits: Option<Section>,
        daemon: Option<Section>,
        cluster: Option<Section>,
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let doc: Doc = toml::from_str(&text).unwrap_or_default();
    let section = match table {
        "api" => doc.api,
        "limits" => doc.limits,
        "daemon" => doc.daemon,
        "cluster" => doc.cluster,
        _ => None,
    };
    let pos = section.map(|t| {
        key.and_then(|k| t.get_ref().get(k))
            .map_or(t.span().start, |v| v.span().start)
    });
    let (line, column) = Src { file, text: &text }.position(pos);
    format!("{}:{line}:{column}", file.display())
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

/// Parses with the fast scanner when `fast` and it understands the file, else with `toml`.
fn parse_text(text: &str, file: &Path, max_orgs: usize, fast: bool) -> Result<Config, ConfigError> {
    if fast {
        let mut builder = Builder::new(text, file, max_orgs);
        match scan::parse(text, &mut builder) {
            Ok(()) => return builder.finish(),
            Err(scan::Stop::Invalid(e)) => return Err(e),
            Err(scan::Stop::Unsupported) => {}
        }
    }
    let mut builder = Builder::new(text, file, max_orgs);
    tree::parse(text, &mut builder)?;
    builder.finish()
}

/// A value with the byte offset where it starts (`None` for tables TOML creates implicitly).
#[derive(Debug, PartialEq)]
struct Item<'a> {
    pos: Option<usize>,
    node: Node<'a>,
}

/// A TOML value, reduced to what the config needs to tell apart.
#[derive(Debug, PartialEq)]
enum Node<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Array(Vec<Item<'a>>),
    Table(Vec<Entry<'a>>),
    /// A table created by a dotted key or a `[a.b]` header; toml gives it no position.
    Implicit,
    /// Float, boolean or datetime: never valid here, kept only to name it in messages.
    Other(&'static str),
}

impl Node<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Node::Str(_) => "a string",
            Node::Int(_) => "an integer",
            Node::Array(_) => "an array",
            Node::Table(_) | Node::Implicit => "a table",
            Node::Other(kind) => kind,
        }
    }
}

/// `key = value` with the key's position.
#[derive(Debug, PartialEq)]
struct Entry<'a> {
    key: Cow<'a, str>,
    key_pos: Option<usize>,
    value: Item<'a>,
}

/// Where a key lives, rendered as `api.ports[0]`, `orgs[2].name`, …; built only for messages.
#[derive(Clone, Copy)]
struct KeyAt<'k> {
    scope: Scope,
    field: Option<&'k str>,
    index: Option<usize>,
}

#[derive(Clone, Copy)]
enum Scope {
    Root,
    Table(&'static str),
    Org(usize),
}

impl<'k> KeyAt<'k> {
    fn new(scope: Scope, field: &'k str) -> Self {
        KeyAt {
            scope,
            field: Some(field),
            index: None,
        }
    }

    fn org(index: usize) -> Self {
        KeyAt {
            scope: Scope::Org(index),
            field: None,
            index: None,
        }
    }

    fn at(self, index: usize) -> Self {
        KeyAt {
            index: Some(index),
            ..self
        }
    }
}

impl fmt::Display for KeyAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut dot = true;
        match self.scope {
            Scope::Root => dot = false,
            Scope::Table(table) => f.write_str(table)?,
            Scope::Org(i) => write!(f, "orgs[{i}]")?,
        }
        if let Some(field) = self.field {
            if dot {
                f.write_str(".")?;
            }
            f.write_str(field)?;
        }
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        Ok(())
    }
}

/// The text being parsed, to turn byte offsets into `FILE:LINE:COL`.
struct Src<'t> {
    file: &'t Path,
    text: &'t str,
}

impl Src<'_> {
    /// 1-based line and column (in characters) of a byte offset; 1:1 when unknown.
    fn position(&self, pos: Option<usize>) -> (usize, usize) {
        let Some(pos) = pos else { return (1, 1) };
        let bytes = self.text.as_bytes();
        let before = bytes.get(..pos).unwrap_or(bytes);
        let line = 1 + count_newlines(before);
        let line_start = before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        let in_line = before.get(line_start..).unwrap_or_default();
        let column = 1 + in_line.iter().filter(|&&c| c & 0xC0 != 0x80).count();
        (line, column)
    }

    fn line(&self, pos: Option<usize>) -> usize {
        self.position(pos).0
    }

    fn invalid(
        &self,
        pos: Option<usize>,
        key: impl fmt::Display,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.position(pos);
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn syntax(&self, e: &toml::de::Error) -> ConfigError {
        let (line, column) = self.position(e.span().map(|s| s.start));
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line,
            column,
            message: e.message().trim().replace('\n', "; "),
        }
    }

    fn wrong_type(&self, item: &Item<'_>, key: KeyAt<'_>, expected: &str) -> ConfigError {
        self.invalid(
            item.pos,
            key,
            format!("expected {expected}, found {}", item.node.kind()),
        )
    }

    fn unknown(&self, pos: Option<usize>, key: KeyAt<'_>, expected: &str) -> ConfigError {
        self.invalid(
            pos,
            key,
            format!("unknown key (expected one of: {expected})"),
        )
    }

    fn missing(&self, table_pos: Option<usize>, key: KeyAt<'_>) -> ConfigError {
        self.invalid(table_pos, key, "missing required key")
    }

    fn string<'a>(
        &self,
        item: Item<'a>,
        key: KeyAt<'_>,
    ) -> Result<(Cow<'a, str>, Option<usize>), ConfigError> {
        match item.node {
            Node::Str(s) => Ok((s, item.pos)),
            _ => Err(self.wrong_type(&item, key, "a string")),
        }
    }

    fn array<'a>(
        &self,
        item: Item<'a>,
        key: KeyAt<'_>,
    ) -> Result<(Vec<Item<'a>>, Option<usize>), ConfigError> {
        match item.node {
            Node::Array(items) => Ok((items, item.pos)),
            _ => Err(self.wrong_type(&item, key, "an array")),
        }
    }

    /// An integer within `min..=max`.
    fn uint(
        &self,
        item: &Item<'_>,
        key: KeyAt<'_>,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let Node::Int(v) = item.node else {
            return Err(self.wrong_type(item, key, "an integer"));
        };
        match u64::try_from(v) {
            Ok(v) if v < min => Err(self.invalid(item.pos, key, format!("must be at least {min}"))),
            Ok(v) if v > max => Err(self.invalid(item.pos, key, format!("must be at most {max}"))),
            Ok(v) => Ok(v),
            Err(_) => Err(self.invalid(item.pos, key, format!("must be at least {min}"))),
        }
    }

    fn daily_requests(&self, item: &Item<'_>, key: KeyAt<'_>) -> Result<u64, ConfigError> {
        self.uint(item, key, 1, u64::MAX)
    }

    fn concurrent_connections(&self, item: &Item<'_>, key: KeyAt<'_>) -> Result<u32, ConfigError> {
        let v = self.uint(item, key, 1, u64::from(u32::MAX))?;
        u32::try_from(v).map_err(|_| self.invalid(item.pos, key, "too large"))
    }

    fn concurrency_mode(
        &self,
        item: Item<'_>,
        key: KeyAt<'_>,
    ) -> Result<ConcurrencyMode, ConfigError> {
        let (s, pos) = self.string(item, key)?;
        ConcurrencyMode::from_config(&s).ok_or_else(|| {
            self.invalid(
                pos,
                key,
                format!("unknown mode \"{s}\" (expected \"observe\", \"delay\" or \"reject\")"),
            )
        })
    }

    fn quota_mode(&self, item: Item<'_>, key: KeyAt<'_>) -> Result<QuotaMode, ConfigError> {
        let (s, pos) = self.string(item, key)?;
        QuotaMode::from_config(&s).ok_or_else(|| {
            self.invalid(
                pos,
                key,
                format!("unknown mode \"{s}\" (expected \"enforce\" or \"dry-run\")"),
            )
        })
    }

    /// `"HH:MM"` (UTC) as seconds after midnight.
    fn day_start(&self, item: Item<'_>, key: KeyAt<'_>) -> Result<u32, ConfigError> {
        let (s, pos) = self.string(item, key)?;
        parse_hh_mm(&s).ok_or_else(|| {
            self.invalid(
                pos,
                key,
                format!(
                    "\"{s}\" is not a time of day; \
                     expected \"HH:MM\" from \"00:00\" to \"23:59\" (UTC)"
                ),
            )
        })
    }

    /// An absolute path: the daemon runs from anywhere, so relative paths would be surprises.
    fn abs_path(
        &self,
        item: Item<'_>,
        key: KeyAt<'_>,
    ) -> Result<(PathBuf, Option<usize>), ConfigError> {
        let (s, pos) = self.string(item, key)?;
        if !s.starts_with('/') || s.contains('\0') {
            return Err(self.invalid(pos, key, format!("\"{s}\" is not an absolute path")));
        }
        Ok((PathBuf::from(s.into_owned()), pos))
    }
}

/// Seconds after midnight of exactly `HH:MM` (two digits each), 00:00 to 23:59.
fn parse_hh_mm(s: &str) -> Option<u32> {
    let digit = |c: u8| c.is_ascii_digit().then(|| u32::from(c - b'0'));
    let [h1, h2, b':', m1, m2] = *s.as_bytes() else {
        return None;
    };
    let hours = digit(h1)? * 10 + digit(h2)?;
    let minutes = digit(m1)? * 10 + digit(m2)?;
    (hours < 24 && minutes < 60).then_some(hours * 3600 + minutes * 60)
}

fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&c| c == b'\n').count()
}

/// Line numbers of increasing offsets without rescanning the text from the start each time.
struct LineCursor<'t> {
    bytes: &'t [u8],
    pos: usize,
    line: usize,
}

impl LineCursor<'_> {
    fn line_at(&mut self, pos: usize) -> usize {
        let pos = pos.min(self.bytes.len());
        if pos >= self.pos {
            self.line += count_newlines(self.bytes.get(self.pos..pos).unwrap_or_default());
        } else {
            self.line -= count_newlines(self.bytes.get(pos..self.pos).unwrap_or_default());
        }
        self.pos = pos;
        self.line
    }
}

/// Collects the config section by section (in file order) and checks what needs the whole file.
struct Builder<'t> {
    src: Src<'t>,
    lines: LineCursor<'t>,
    max_orgs: usize,
    api: Option<Api>,
    /// Whether `api.cgroup` was given (else detected in `finish`, only when needed).
    cgroup_given: bool,
    limits: Option<Limits>,
    daemon: Option<Daemon>,
    cluster: Option<Cluster>,
    /// Position of `daemon.state_dir` / `daemon.control_socket`, for the socket length check.
    state_dir_pos: Option<usize>,
    control_socket_pos: Option<usize>,
    control_socket_given: bool,
    orgs: Vec<Org>,
    /// Position of each org's name, parallel to `orgs`.
    name_pos: Vec<usize>,
    /// Position of every CIDR, org after org; kept flat so a million orgs cost two allocations.
    cidr_pos: Vec<usize>,
}

impl<'t> Builder<'t> {
    fn new(text: &'t str, file: &'t Path, max_orgs: usize) -> Self {
        Builder {
            src: Src { file, text },
            lines: LineCursor {
                bytes: text.as_bytes(),
                pos: 0,
                line: 1,
            },
            max_orgs,
            api: None,
            cgroup_given: false,
            limits: None,
            daemon: None,
            cluster: None,
            state_dir_pos: None,
            control_socket_pos: None,
            control_socket_given: false,
            orgs: Vec::new(),
            name_pos: Vec::new(),
            cidr_pos: Vec::new(),
        }
    }

    /// A top-level key other than the `[[orgs]]` entries.
    fn section(
        &mut self,
        key: &str,
        key_pos: Option<usize>,
        value: Item<'t>,
    ) -> Result<(), ConfigError> {
        let at = KeyAt::new(Scope::Root, key);
        let name = match key {
            "api" => "api",
            "limits" => "limits",
            "daemon" => "daemon",
            "cluster" => "cluster",
            "orgs" => {
                let (items, _) = match value.node {
                    Node::Array(_) => self.src.array(value, at)?,
                    _ => {
                        return Err(self.src.wrong_type(
                            &value,
                            at,
                            "an array of tables ([[orgs]])",
                        ));
                    }
                };
                return items.into_iter().try_for_each(|item| self.org(item));
            }
            _ => return Err(self.src.unknown(key_pos, at, ROOT_KEYS)),
        };
        let (entries, pos) = match value.node {
            Node::Table(entries) => (entries, value.pos),
            Node::Implicit => {
                return Err(self.src.invalid(
                    key_pos,
                    at,
                    format!(
                        "write this as a [{name}] table, \
                         not with dotted keys or [{name}.…] headers"
                    ),
                ));
            }
            _ => return Err(self.src.wrong_type(&value, at, "a table")),
        };
        match name {
            "api" => self.api(pos, entries),
            "limits" => self.limits(entries),
            "cluster" => self.cluster(pos, entries),
            _ => self.daemon(entries),
        }
    }

    fn cluster(&mut self, pos: Option<usize>, entries: Vec<Entry<'t>>) -> Result<(), ConfigError> {
        let src = &self.src;
        let mut redis = None;
        let mut host_id = None;
        let mut sync_interval_ms = DEFAULT_SYNC_INTERVAL_MS;
        for Entry {
            key,
            key_pos,
            value,
        } in entries
        {
            let at = KeyAt::new(Scope::Table("cluster"), &key);
            match &*key {
                "redis" => {
                    let (url, vpos) = src.string(value, at)?;
                    if ![
                        "redis://",
                        "rediss://",
                        "valkey://",
                        "valkeys://",
                        "redis+unix://",
                    ]
                    .iter()
                    .any(|p| url.starts_with(p))
                    {
                        return Err(src.invalid(
                            vpos,
                            at,
                            format!(
                                "{:?} is not a Redis URL (redis://host:port)",
                                crate::sync::redact_url(&url)
                            ),
                        ));
                    }
                    redis = Some(url.into_owned());
                }
                "host_id" => {
                    let (id, vpos) = src.string(value, at)?;
                    if id.is_empty() || id.len() > 128 || id.contains(char::is_whitespace) {
                        return Err(src.invalid(
                            vpos,
                            at,
                            "must be 1..=128 characters without whitespace".to_string(),
                        ));
                    }
                    host_id = Some(id.into_owned());
                }
                "sync_interval_ms" => sync_interval_ms = src.uint(&value, at, 10, 60_000)?,
                _ => return Err(src.unknown(key_pos, at, CLUSTER_KEYS)),
            }
        }
        let redis =
            redis.ok_or_else(|| src.missing(pos, KeyAt::new(Scope::Table("cluster"), "redis")))?;
        self.cluster = Some(Cluster {
            redis,
            host_id: host_id.unwrap_or_else(default_host_id),
            sync_interval_ms,
        });
        Ok(())
    }

    fn api(&mut self, pos: Option<usize>, entries: Vec<Entry<'t>>) -> Result<(), ConfigError> {
        let src = &self.src;
        let mut ports = None;
        let mut cgroup = None;
        let mut prefixes = None;
        let mut interfaces = None;
        let mut netns = None;
        for Entry {
            key,
            key_pos,
            value,
        } in entries
        {
            let at = KeyAt::new(Scope::Table("api"), &key);
            match &*key {
                "ports" => ports = Some(ports_of(src, value, at)?),
                "cgroup" => cgroup = Some(src.abs_path(value, at)?.0),
                "media_get_prefixes" => prefixes = Some(prefixes_of(src, value, at)?),
                "interfaces" => interfaces = Some(interfaces_of(src, value, at)?),
                "netns" => netns = Some(src.abs_path(value, at)?.0),
                _ => return Err(src.unknown(key_pos, at, API_KEYS)),
            }
        }
        let ports =
            ports.ok_or_else(|| src.missing(pos, KeyAt::new(Scope::Table("api"), "ports")))?;
        self.cgroup_given = cgroup.is_some();
        self.api = Some(Api {
            ports,
            cgroup: cgroup.unwrap_or_default(),
            media_get_prefixes: prefixes.unwrap_or_else(|| vec![DEFAULT_MEDIA_PREFIX.to_owned()]),
            interfaces: interfaces.unwrap_or_default(),
            netns,
        });
        Ok(())
    }

    fn limits(&mut self, entries: Vec<Entry<'t>>) -> Result<(), ConfigError> {
        let src = &self.src;
        let mut limits = Limits::default();
        for Entry {
            key,
            key_pos,
            value,
        } in entries
        {
            let at = KeyAt::new(Scope::Table("limits"), &key);
            match &*key {
                "daily_requests" => limits.daily_requests = src.daily_requests(&value, at)?,
                "concurrent_connections" => {
                    limits.concurrent_connections = src.concurrent_connections(&value, at)?;
                }
                "concurrency_mode" => limits.concurrency_mode = src.concurrency_mode(value, at)?,
                "quota_mode" => limits.quota_mode = src.quota_mode(value, at)?,
                "day_start" => limits.day_start_secs = src.day_start(value, at)?,
                _ => return Err(src.unknown(key_pos, at, LIMITS_KEYS)),
            }
        }
        self.limits = Some(limits);
        Ok(())
    }

    fn daemon(&mut self, entries: Vec<Entry<'t>>) -> Result<(), ConfigError> {
        let src = &self.src;
        let mut daemon = Daemon::default();
        for Entry {
            key,
            key_pos,
            value,
        } in entries
        {
            let at = KeyAt::new(Scope::Table("daemon"), &key);
            match &*key {
                "pin_dir" => daemon.pin_dir = src.abs_path(value, at)?.0,
                "state_dir" => {
                    (daemon.state_dir, self.state_dir_pos) = src.abs_path(value, at)?;
                }
                "control_socket" => {
                    (daemon.control_socket, self.control_socket_pos) = src.abs_path(value, at)?;
                    self.control_socket_given = true;
                }
                "log_format" => {
                    let (s, pos) = src.string(value, at)?;
                    daemon.log_format = match &*s {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        _ => {
                            return Err(src.invalid(
                                pos,
                                at,
                                format!(
                                    "unknown log format \"{s}\" (expected \"text\" or \"json\")"
                                ),
                            ));
                        }
                    };
                }
                "snapshot_interval_secs" => {
                    daemon.snapshot_interval_secs = src.uint(&value, at, 1, u64::MAX)?;
                }
                "metrics" => {
                    let (s, pos) = src.string(value, at)?;
                    daemon.metrics = Some(s.parse().map_err(|_| {
                        src.invalid(
                            pos,
                            at,
                            format!("{s:?} is not an address:port (e.g. \"127.0.0.1:9464\")"),
                        )
                    })?);
                }
                _ => return Err(src.unknown(key_pos, at, DAEMON_KEYS)),
            }
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    /// One `[[orgs]]` entry given as a value (from the `toml` parser).
    fn org(&mut self, item: Item<'t>) -> Result<(), ConfigError> {
        match item.node {
            Node::Table(mut entries) => self.org_table(item.pos, &mut entries),
            _ => Err(self
                .src
                .wrong_type(&item, KeyAt::org(self.orgs.len()), "a table")),
        }
    }

    /// One `[[orgs]]` entry; drains `entries` so the scanner can reuse the buffer.
    fn org_table(
        &mut self,
        pos: Option<usize>,
        entries: &mut Vec<Entry<'t>>,
    ) -> Result<(), ConfigError> {
        let index = self.orgs.len();
        if index >= self.max_orgs {
            return Err(self.src.invalid(
                pos,
                KeyAt::org(index),
                format!("too many orgs: at most {} are allowed", self.max_orgs),
            ));
        }
        let src = &self.src;
        let scope = Scope::Org(index);
        let mut name = None;
        let mut cidrs = None;
        let mut org = Org {
            name: String::new(),
            cidrs: Vec::new(),
            daily_requests: None,
            concurrent_connections: None,
            concurrency_mode: None,
            quota_mode: None,
            line: 0,
        };
        for Entry {
            key,
            key_pos,
            value,
        } in entries.drain(..)
        {
            let at = KeyAt::new(scope, &key);
            match &*key {
                "name" => {
                    let (s, value_pos) = src.string(value, at)?;
                    check_org_name(src, &s, value_pos, at)?;
                    name = Some((s.into_owned(), key_pos.or(value_pos), value_pos.or(key_pos)));
                }
                "cidrs" => {
                    let (items, array_pos) = src.array(value, at)?;
                    if items.is_empty() {
                        return Err(src.invalid(array_pos, at, "must list at least one CIDR"));
                    }
                    let mut nets = Vec::with_capacity(items.len());
                    for (i, item) in items.into_iter().enumerate() {
                        let at = at.at(i);
                        let (s, item_pos) = src.string(item, at)?;
                        nets.push(parse_cidr(src, &s, item_pos, at)?);
                        self.cidr_pos.push(item_pos.unwrap_or(0));
                    }
                    cidrs = Some(nets);
                }
                "daily_requests" => org.daily_requests = Some(src.daily_requests(&value, at)?),
                "concurrent_connections" => {
                    org.concurrent_connections = Some(src.concurrent_connections(&value, at)?);
                }
                "concurrency_mode" => org.concurrency_mode = Some(src.concurrency_mode(value, at)?),
                "quota_mode" => org.quota_mode = Some(src.quota_mode(value, at)?),
                _ => return Err(src.unknown(key_pos, at, ORG_KEYS)),
            }
        }
        let (name, key_pos, value_pos) =
            name.ok_or_else(|| src.missing(pos, KeyAt::new(scope, "name")))?;
        org.cidrs = cidrs.ok_or_else(|| src.missing(pos, KeyAt::new(scope, "cidrs")))?;
        org.name = name;
        org.line = self.lines.line_at(key_pos.unwrap_or(0));
        self.name_pos.push(value_pos.unwrap_or(0));
        self.orgs.push(org);
        Ok(())
    }

    /// Fills defaults and runs the checks that need every org.
    fn finish(self) -> Result<Config, ConfigError> {
        let src = &self.src;
        let mut api = self.api.ok_or_else(|| {
            src.invalid(
                None,
                "api",
                "missing required table [api] (it must list the API ports)",
            )
        })?;
        if !self.cgroup_given {
            api.cgroup = default_cgroup();
        }
        let mut daemon = self.daemon.unwrap_or_default();
        if !self.control_socket_given {
            daemon.control_socket = daemon.state_dir.join(CONTROL_SOCKET_NAME);
        }
        if daemon.control_socket.as_os_str().len() > MAX_SOCKET_PATH {
            let (pos, key) = if self.control_socket_given {
                (self.control_socket_pos, "daemon.control_socket")
            } else {
                (self.state_dir_pos, "daemon.state_dir")
            };
            return Err(src.invalid(
                pos,
                key,
                format!(
                    "the control socket path {} is longer than {MAX_SOCKET_PATH} bytes; \
                     set a shorter daemon.control_socket",
                    daemon.control_socket.display()
                ),
            ));
        }
        check_unique_names(src, &self.orgs, &self.name_pos)?;
        check_overlaps(src, &self.orgs, &self.cidr_pos)?;
        Ok(Config {
            api,
            limits: self.limits.unwrap_or_default(),
            daemon,
            cluster: self.cluster,
            orgs: self.orgs,
        })
    }
}

fn ports_of(src: &Src<'_>, value: Item<'_>, at: KeyAt<'_>) -> Result<Vec<u16>, ConfigError> {
    let (items, pos) = src.array(value, at)?;
    if items.is_empty() {
        return Err(src.invalid(pos, at, "must list at least one port"));
    }
    let max = limiter_common::MAX_API_PORTS as usize;
    if items.len() > max {
        return Err(src.invalid(pos, at, format!("at most {max} ports are supported")));
    }
    let mut ports: Vec<u16> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = at.at(i);
        let Node::Int(v) = item.node else {
            return Err(src.wrong_type(item, at, "an integer"));
        };
        let port = match u16::try_from(v) {
            Ok(0) => {
                return Err(src.invalid(
                    item.pos,
                    at,
                    "port 0 is not allowed (ports are 1 to 65535)",
                ));
            }
            Ok(port) => port,
            Err(_) => {
                return Err(src.invalid(
                    item.pos,
                    at,
                    format!("{v} is not a port (ports are 1 to 65535)"),
                ));
            }
        };
        if let Some(first) = ports.iter().position(|&p| p == port) {
            let first_at = KeyAt {
                index: Some(first),
                ..at
            };
            return Err(src.invalid(
                item.pos,
                at,
                format!("port {port} is listed twice (also {first_at})"),
            ));
        }
        ports.push(port);
    }
    Ok(ports)
}

fn prefixes_of(src: &Src<'_>, value: Item<'_>, at: KeyAt<'_>) -> Result<Vec<String>, ConfigError> {
    use limiter_common::{MAX_MEDIA_PREFIXES, MEDIA_PREFIX_MAX};
    let (items, pos) = src.array(value, at)?;
    if items.len() > MAX_MEDIA_PREFIXES {
        return Err(src.invalid(
            pos,
            at,
            format!("at most {MAX_MEDIA_PREFIXES} prefixes are supported (the kernel's limit)"),
        ));
    }
    let mut prefixes: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = at.at(i);
        let (s, pos) = src.string(item, at)?;
        let visible = s.bytes().all(|c| c.is_ascii_graphic());
        if !s.starts_with('/') || s.len() > MEDIA_PREFIX_MAX || !visible {
            return Err(src.invalid(
                pos,
                at,
                format!(
                    "\"{s}\" is not a valid prefix: it must start with '/' and be \
                     1 to {MEDIA_PREFIX_MAX} bytes of visible ASCII without spaces"
                ),
            ));
        }
        reject_repeat(src, &prefixes, &s, pos, at)?;
        prefixes.push(s.into_owned());
    }
    Ok(prefixes)
}

/// An error when `s` already stands in `list` (the same key's earlier entries).
fn reject_repeat(
    src: &Src<'_>,
    list: &[String],
    s: &str,
    pos: Option<usize>,
    at: KeyAt<'_>,
) -> Result<(), ConfigError> {
    match list.iter().position(|x| x == s) {
        None => Ok(()),
        Some(first) => {
            let first_at = KeyAt {
                index: Some(first),
                ..at
            };
            Err(src.invalid(
                pos,
                at,
                format!("\"{s}\" is listed twice (also {first_at})"),
            ))
        }
    }
}

fn interfaces_of(
    src: &Src<'_>,
    value: Item<'_>,
    at: KeyAt<'_>,
) -> Result<Vec<String>, ConfigError> {
    let (items, _) = src.array(value, at)?;
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = at.at(i);
        let (s, pos) = src.string(item, at)?;
        let bad_char = s
            .bytes()
            .any(|c| c == b'/' || c == b'\0' || c.is_ascii_whitespace());
        if s.is_empty() || s.len() > MAX_IFNAME || bad_char || s == "." || s == ".." {
            return Err(src.invalid(
                pos,
                at,
                format!(
                    "\"{s}\" is not an interface name (1 to {MAX_IFNAME} bytes, no '/' or spaces)"
                ),
            ));
        }
        reject_repeat(src, &names, &s, pos, at)?;
        names.push(s.into_owned());
    }
    Ok(names)
}

fn check_org_name(
    src: &Src<'_>,
    name: &str,
    pos: Option<usize>,
    at: KeyAt<'_>,
) -> Result<(), ConfigError> {
    let allowed = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_ORG_NAME || !name.bytes().all(allowed) {
        return Err(src.invalid(
            pos,
            at,
            format!(
                "\"{name}\" is not a valid org name \
                 (1 to {MAX_ORG_NAME} characters of A-Z a-z 0-9 . _ -)"
            ),
        ));
    }
    if name == RESERVED_ORG_NAME {
        return Err(src.invalid(
            pos,
            at,
            format!("\"{RESERVED_ORG_NAME}\" is reserved for traffic of unknown orgs"),
        ));
    }
    Ok(())
}

/// A CIDR or a bare address (/32, /128); host bits are refused because they usually hide a typo.
fn parse_cidr(
    src: &Src<'_>,
    s: &str,
    pos: Option<usize>,
    at: KeyAt<'_>,
) -> Result<IpNet, ConfigError> {
    let Some(net) = parse_net(s) else {
        return Err(src.invalid(
            pos,
            at,
            format!(
                "\"{s}\" is not an IPv4 or IPv6 CIDR (like \"192.0.2.0/24\" or \"2001:db8::/32\")"
            ),
        ));
    };
    let network = net.trunc();
    if network != net {
        return Err(src.invalid(
            pos,
            at,
            format!("{s} has host bits set; did you mean {network}?"),
        ));
    }
    Ok(network)
}

/// `addr/len` or `addr`. Done by hand because ipnet's parser boxes closures on every call, which
/// shows with a million orgs.
fn parse_net(s: &str) -> Option<IpNet> {
    let Some((addr, len)) = s.split_once('/') else {
        return s.parse::<IpAddr>().ok().map(IpNet::from);
    };
    let digits_only = !len.is_empty() && len.len() <= 3 && len.bytes().all(|c| c.is_ascii_digit());
    let len = len.parse::<u8>().ok().filter(|_| digits_only)?;
    IpNet::new(addr.parse::<IpAddr>().ok()?, len).ok()
}

fn check_unique_names(src: &Src<'_>, orgs: &[Org], name_pos: &[usize]) -> Result<(), ConfigError> {
    // foldhash: SipHash cost a third of the time it takes to load a million orgs.
    let mut seen: foldhash::HashMap<&str, usize> =
        HashMap::with_capacity_and_hasher(orgs.len(), Default::default());
    for (i, org) in orgs.iter().enumerate() {
        if let Some(&first) = seen.get(org.name.as_str()) {
            let line = orgs.get(first).map_or(0, |o| o.line);
            return Err(src.invalid(
                name_pos.get(i).copied(),
                KeyAt::new(Scope::Org(i), "name"),
                format!(
                    "org name \"{}\" is already used by orgs[{first}] (line {line})",
                    org.name
                ),
            ));
        }
        seen.insert(&org.name, i);
    }
    Ok(())
}

/// One CIDR in a single address space where IPv4 `a.b.c.d/n` is `::ffff:a.b.c.d/(96+n)`, so IPv4
/// nets and IPv4-mapped IPv6 nets are compared like any other pair.
#[derive(Clone, Copy)]
struct NetRange {
    start: u128,
    prefix: u8,
    v6: bool,
    org: u32,
    /// Index into the flat list of all CIDRs (file order).
    cidr: u32,
}

impl NetRange {
    fn end(&self) -> u128 {
        match 128u32.checked_sub(u32::from(self.prefix)) {
            Some(host_bits @ 1..128) => self.start | ((1u128 << host_bits) - 1),
            Some(0) => self.start,
            _ => u128::MAX,
        }
    }
}

/// Two orgs may not claim overlapping addresses, and one org may not list a CIDR twice.
///
/// CIDRs either nest or are disjoint, so after sorting by (start, size) every CIDR that overlaps an
/// earlier one lies inside the widest CIDR still open: one pass, O(n log n). Of the conflicts found
/// it reports the one whose later CIDR comes first in the file.
fn check_overlaps(src: &Src<'_>, orgs: &[Org], cidr_pos: &[usize]) -> Result<(), ConfigError> {
    let total: usize = orgs.iter().map(|o| o.cidrs.len()).sum();
    let mut ranges = Vec::with_capacity(total);
    for (org, o) in orgs.iter().enumerate() {
        for net in &o.cidrs {
            let (start, prefix, v6) = match net {
                IpNet::V4(n) => (
                    (0xffffu128 << 32) | u128::from(u32::from(n.network())),
                    96 + n.prefix_len(),
                    false,
                ),
                IpNet::V6(n) => (u128::from(n.network()), n.prefix_len(), true),
            };
            ranges.push(NetRange {
                start,
                prefix,
                v6,
                org: org as u32,
                cidr: ranges.len() as u32,
            });
        }
    }
    ranges.sort_unstable_by_key(|r| (r.start, r.prefix, r.cidr));

    // (later, earlier) CIDR of the conflict to report.
    let mut worst: Option<(NetRange, NetRange)> = None;
    let mut note = |a: NetRange, b: NetRange| {
        let (earlier, later) = if a.cidr < b.cidr { (a, b) } else { (b, a) };
        if worst.is_none_or(|(w, _)| later.cidr < w.cidr) {
            worst = Some((later, earlier));
        }
    };
    let mut open: Option<NetRange> = None;
    let mut prev: Option<NetRange> = None;
    for &r in &ranges {
        let same = |p: NetRange| {
            p.org == r.org && p.start == r.start && p.prefix == r.prefix && p.v6 == r.v6
        };
        if let Some(p) = prev.filter(|&p| same(p)) {
            note(p, r);
        }
        match open {
            Some(o) if r.start <= o.end() => {
                if o.org != r.org {
                    note(o, r);
                }
            }
            _ => open = Some(r),
        }
        prev = Some(r);
    }
    let Some((later, earlier)) = worst else {
        return Ok(());
    };

    // Map flat CIDR indices back to (org, index in org); only on error, so a linear walk is fine.
    let locate = |r: NetRange| {
        let org = r.org as usize;
        let first: usize = orgs.iter().take(org).map(|o| o.cidrs.len()).sum();
        let index = r.cidr as usize - first;
        let o = orgs.get(org);
        let net = o.and_then(|o| o.cidrs.get(index)).copied();
        let name = o.map_or("", |o| o.name.as_str());
        (org, index, net, name)
    };
    let (later_org, later_index, later_net, later_name) = locate(later);
    let (_, _, earlier_net, earlier_name) = locate(earlier);
    let (Some(later_net), Some(earlier_net)) = (later_net, earlier_net) else {
        return Ok(());
    };
    let earlier_line = src.line(cidr_pos.get(earlier.cidr as usize).copied());
    let message = if later.org == earlier.org {
        format!("{later_net} is listed twice (first at line {earlier_line})")
    } else if later.start == earlier.start && later.prefix == earlier.prefix {
        format!(
            "{later_net} (org \"{later_name}\") is the same network as {earlier_net} \
             of org \"{earlier_name}\" (line {earlier_line})"
        )
    } else {
        format!(
            "{later_net} (org \"{later_name}\") overlaps {earlier_net} \
             of org \"{earlier_name}\" (line {earlier_line})"
        )
    };
    Err(src.invalid(
        cidr_pos.get(later.cidr as usize).copied(),
        KeyAt::new(Scope::Org(later_org), "cidrs").at(later_index),
        message,
    ))
}

/// Parsing through the `toml` crate: any valid TOML, slower.
mod tree {
    use super::*;
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use toml::Spanned;

    /// Parses `text` and feeds the sections to `builder` in file order (`[[orgs]]` entries may
    /// be interleaved with other tables; toml groups them, the scanner does not).
    pub(super) fn parse<'t>(text: &'t str, builder: &mut Builder<'t>) -> Result<(), ConfigError> {
        let root: Node<'static> = toml::from_str(text).map_err(|e| builder.src.syntax(&e))?;
        let Node::Table(entries) = root else {
            return Err(builder.src.invalid(None, "(document)", "expected a table"));
        };
        enum Unit<'a> {
            Section(Entry<'a>),
            Org(Item<'a>),
        }
        let mut units = Vec::new();
        for entry in entries {
            match entry {
                Entry {
                    key,
                    value:
                        Item {
                            node: Node::Array(items),
                            ..
                        },
                    ..
                } if key == "orgs" => {
                    units.extend(
                        items
                            .into_iter()
                            .map(|item| (item.pos.unwrap_or(0), Unit::Org(item))),
                    );
                }
                entry => {
                    let pos = entry.value.pos.or(entry.key_pos).unwrap_or(0);
                    units.push((pos, Unit::Section(entry)));
                }
            }
        }
        units.sort_by_key(|(pos, _)| *pos);
        for (_, unit) in units {
            match unit {
                Unit::Section(e) => builder.section(&e.key, e.key_pos, e.value)?,
                Unit::Org(item) => builder.org(item)?,
            }
        }
        Ok(())
    }

    fn item(value: Spanned<Node<'static>>) -> Item<'static> {
        Item {
            pos: Some(value.span().start),
            node: value.into_inner(),
        }
    }

    impl<'de> Deserialize<'de> for Node<'static> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(NodeVisitor)
        }
    }

    struct NodeVisitor;

    impl<'de> Visitor<'de> for NodeVisitor {
        type Value = Node<'static>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any TOML value")
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Node::Other("a boolean"))
        }

        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Node::Int(v))
        }

        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(i64::try_from(v).map_or(Node::Other("an integer"), Node::Int))
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Node::Other("a float"))
        }

        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Node::Str(Cow::Owned(v.to_owned())))
        }

        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Node::Str(Cow::Owned(v)))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(value) = seq.next_element::<Spanned<Node<'static>>>()? {
                items.push(item(value));
            }
            Ok(Node::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
            loop {
                // Table keys always carry a span; toml's datetimes arrive as a one-key map whose
                // key does not, which is how they are told apart.
                let key = match map.next_key::<Spanned<String>>() {
                    Ok(Some(key)) => key,
                    Ok(None) => break,
                    Err(_) if entries.is_empty() => return Ok(Node::Other("a date or time")),
                    Err(e) => return Err(e),
                };
                // Implicit tables have no span, which `Spanned` cannot represent.
                let value = match map.next_value::<Spanned<Node<'static>>>() {
                    Ok(value) => item(value),
                    Err(_) => Item {
                        pos: None,
                        node: Node::Implicit,
                    },
                };
                let key_pos = Some(key.span().start);
                entries.push(Entry {
                    key: Cow::Owned(key.into_inner()),
                    key_pos,
                    value,
                });
            }
            Ok(Node::Table(entries))
        }
    }
}

/// The fast path: a scanner for the plain TOML subset the documentation uses.
///
/// It only accepts what is certainly valid TOML with the same meaning, and stops with
/// [`Stop::Unsupported`] on anything else so the `toml` crate decides. Values get the same
/// positions toml gives them (the opening quote or bracket, the first digit; `[` of a header).
mod scan {
    use super::*;

    pub(super) enum Stop {
        /// Not in the subset: parse the file with the `toml` crate instead.
        Unsupported,
        /// The file is in the subset and this is what is wrong with it.
        Invalid(ConfigError),
    }

    impl From<ConfigError> for Stop {
        fn from(e: ConfigError) -> Self {
            Stop::Invalid(e)
        }
    }

    type Res<T> = Result<T, Stop>;

    #[derive(Clone, Copy)]
    enum Current {
        Root,
        /// A `[name]` table whose header starts at the offset.
        Section(&'static str, usize),
        /// An `[[orgs]]` entry whose header starts at the offset.
        Org(usize),
    }

    struct Scanner<'t> {
        text: &'t str,
        bytes: &'t [u8],
        i: usize,
    }

    pub(super) fn parse<'t>(text: &'t str, builder: &mut Builder<'t>) -> Res<()> {
        let mut s = Scanner {
            text,
            bytes: text.as_bytes(),
            i: 0,
        };
        let mut current = Current::Root;
        let mut entries: Vec<Entry<'t>> = Vec::new();
        let mut seen = [false; 3];
        loop {
            s.skip_blanks();
            match s.peek() {
                None => break,
                Some(b'\n' | b'\r') => s.newline()?,
                Some(b'#') => s.comment_to_eol()?,
                Some(b'[') => {
                    let next = s.header(&mut seen)?;
                    flush(builder, current, &mut entries)?;
                    current = next;
                }
                Some(c) if is_bare(c) => {
                    if matches!(current, Current::Root) {
                        return Err(Stop::Unsupported);
                    }
                    let entry = s.key_value()?;
                    if entries.iter().any(|e| e.key == entry.key) {
                        return Err(Stop::Unsupported);
                    }
                    entries.push(entry);
                }
                Some(_) => return Err(Stop::Unsupported),
            }
        }
        flush(builder, current, &mut entries)
    }

    fn flush<'t>(
        builder: &mut Builder<'t>,
        current: Current,
        entries: &mut Vec<Entry<'t>>,
    ) -> Res<()> {
        match current {
            Current::Root => Ok(()),
            Current::Section(name, pos) => {
                let table = Item {
                    pos: Some(pos),
                    node: Node::Table(std::mem::take(entries)),
                };
                Ok(builder.section(name, Some(pos + 1), table)?)
            }
            Current::Org(pos) => Ok(builder.org_table(Some(pos), entries)?),
        }
    }

    fn is_bare(c: u8) -> bool {
        c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
    }

    impl<'t> Scanner<'t> {
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.i).copied()
        }

        fn skip_blanks(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t')) {
                self.i += 1;
            }
        }

        /// `\n` or `\r\n` (or the end of the text).
        fn newline(&mut self) -> Res<()> {
            match self.peek() {
                None => Ok(()),
                Some(b'\n') => {
                    self.i += 1;
                    Ok(())
                }
                Some(b'\r') if self.bytes.get(self.i + 1) == Some(&b'\n') => {
                    self.i += 2;
                    Ok(())
                }
                Some(_) => Err(Stop::Unsupported),
            }
        }

        /// At `#`: the comment, then the end of the line.
        fn comment_to_eol(&mut self) -> Res<()> {
            self.i += 1;
            while let Some(c) = self.peek() {
                match c {
                    b'\n' | b'\r' => break,
                    b'\t' => {}
                    0..0x20 | 0x7f => return Err(Stop::Unsupported),
                    _ => {}
                }
                self.i += 1;
            }
            self.newline()
        }

        /// After a value or header: blanks, maybe a comment, the end of the line.
        fn end_of_line(&mut self) -> Res<()> {
            self.skip_blanks();
            match self.peek() {
                Some(b'#') => self.comment_to_eol(),
                _ => self.newline(),
            }
        }

        /// Blanks, newlines and comments between array elements.
        fn skip_trivia(&mut self) -> Res<()> {
            loop {
                self.skip_blanks();
                match self.peek() {
                    Some(b'\n' | b'\r') => self.newline()?,
                    Some(b'#') => self.comment_to_eol()?,
                    _ => return Ok(()),
                }
            }
        }

        fn header(&mut self, seen: &mut [bool; 3]) -> Res<Current> {
            let pos = self.i;
            let rest = self.bytes.get(pos..).unwrap_or_default();
            let (current, len) = if rest.starts_with(b"[[orgs]]") {
                (Current::Org(pos), 8)
            } else {
                let (name, slot) = if rest.starts_with(b"[api]") {
                    ("api", 0)
                } else if rest.starts_with(b"[limits]") {
                    ("limits", 1)
                } else if rest.starts_with(b"[daemon]") {
                    ("daemon", 2)
                } else {
                    return Err(Stop::Unsupported);
                };
                // A table defined twice is a TOML error: let toml say so.
                if std::mem::replace(&mut seen[slot], true) {
                    return Err(Stop::Unsupported);
                }
                (Current::Section(name, pos), name.len() + 2)
            };
            self.i += len;
            self.end_of_line()?;
            Ok(current)
        }

        fn key_value(&mut self) -> Res<Entry<'t>> {
            let key_pos = self.i;
            while self.peek().is_some_and(is_bare) {
                self.i += 1;
            }
            let key = self.text.get(key_pos..self.i).ok_or(Stop::Unsupported)?;
            self.skip_blanks();
            if self.peek() != Some(b'=') {
                return Err(Stop::Unsupported);
            }
            self.i += 1;
            self.skip_blanks();
            let value = self.value(true)?;
            self.end_of_line()?;
            Ok(Entry {
                key: Cow::Borrowed(key),
                key_pos: Some(key_pos),
                value,
            })
        }

        fn value(&mut self, array_allowed: bool) -> Res<Item<'t>> {
            match self.peek() {
                Some(q @ (b'"' | b'\'')) => self.string(q),
                Some(b'0'..=b'9') => self.integer(),
                Some(b'[') if array_allowed => self.array(),
                _ => Err(Stop::Unsupported),
            }
        }

        /// A one-line basic string without escapes, or a one-line literal string.
        fn string(&mut self, quote: u8) -> Res<Item<'t>> {
            let pos = self.i;
            if self.bytes.get(pos + 1..pos + 3) == Some(&[quote, quote][..]) {
                return Err(Stop::Unsupported);
            }
            let mut end = pos + 1;
            loop {
                match self.bytes.get(end).copied() {
                    Some(c) if c == quote => break,
                    Some(b'\\') if quote == b'"' => return Err(Stop::Unsupported),
                    Some(b'\t') => {}
                    Some(0..0x20 | 0x7f) | None => return Err(Stop::Unsupported),
                    Some(_) => {}
                }
                end += 1;
            }
            let s = self.text.get(pos + 1..end).ok_or(Stop::Unsupported)?;
            self.i = end + 1;
            Ok(Item {
                pos: Some(pos),
                node: Node::Str(Cow::Borrowed(s)),
            })
        }

        /// A plain decimal integer (no sign, underscores or leading zeros).
        fn integer(&mut self) -> Res<Item<'t>> {
            let pos = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            let digits = self.text.get(pos..self.i).ok_or(Stop::Unsupported)?;
            let ends_value = matches!(
                self.peek(),
                None | Some(b' ' | b'\t' | b'\r' | b'\n' | b'#' | b',' | b']')
            );
            if !ends_value || (digits.len() > 1 && digits.starts_with('0')) {
                return Err(Stop::Unsupported);
            }
            let v = digits.parse::<i64>().map_err(|_| Stop::Unsupported)?;
            Ok(Item {
                pos: Some(pos),
                node: Node::Int(v),
            })
        }

        /// An array of strings and integers, possibly over several lines.
        fn array(&mut self) -> Res<Item<'t>> {
            let pos = self.i;
            self.i += 1;
            let mut items = Vec::new();
            loop {
                self.skip_trivia()?;
                if self.peek() == Some(b']') {
                    break;
                }
                items.push(self.value(false)?);
                self.skip_trivia()?;
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b']') => break,
                    _ => return Err(Stop::Unsupported),
                }
            }
            self.i += 1;
            Ok(Item {
                pos: Some(pos),
                node: Node::Array(items),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fmt::Write as _;

    const FILE: &str = "/etc/limiter/limiter.toml";

    const EXAMPLE: &str = r#"[api]
ports = [8080]
cgroup = "/sys/fs/cgroup/unified"
media_get_prefixes = ["/media/"]
interfaces = []

[limits]
daily_requests = 2500
concurrent_connections = 3
concurrency_mode = "observe"
quota_mode = "enforce"
day_start = "00:00"

[daemon]
pin_dir = "/sys/fs/bpf/limiter"
state_dir = "/var/lib/limiter"
log_format = "text"
snapshot_interval_secs = 60

[[orgs]]
name = "acme"
cidrs = ["192.0.2.0/24", "2001:db8:1::/48"]
daily_requests = 10000
concurrent_connections = 5
concurrency_mode = "reject"
quota_mode = "dry-run"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE))
    }

    /// Parses with both parsers and checks they agree, so every test covers both.
    fn parse_both(text: &str) -> Result<Config, ConfigError> {
        let fast = parse_text(text, Path::new(FILE), MAX_CONFIG_ORGS, true);
        let slow = parse_text(text, Path::new(FILE), MAX_CONFIG_ORGS, false);
        match (&fast, &slow) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "parsers disagree on {text}"),
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "parsers disagree on {text}")
            }
            _ => panic!("parsers disagree on {text}: {fast:?} vs {slow:?}"),
        }
        fast
    }

    /// Whether the fast scanner handles `text` itself.
    fn scanner_accepts(text: &str) -> bool {
        let mut builder = Builder::new(text, Path::new(FILE), usize::MAX);
        !matches!(
            scan::parse(text, &mut builder),
            Err(scan::Stop::Unsupported)
        )
    }

    #[track_caller]
    fn expect_err(text: &str, line: usize, key: &str, needle: &str) -> ConfigError {
        let err = parse_both(text).expect_err("config should be rejected");
        let shown = err.to_string();
        assert_eq!(err.line(), Some(line), "{shown}");
        assert_eq!(err.key(), Some(key), "{shown}");
        assert!(shown.starts_with(&format!("{FILE}:{line}:")), "{shown}");
        assert!(shown.contains(&format!(": {key}: ")), "{shown}");
        assert!(shown.contains(needle), "{shown} lacks {needle:?}");
        err
    }

    #[test]
    fn full_example() {
        assert!(scanner_accepts(EXAMPLE));
        let c = parse_both(EXAMPLE).unwrap();
        assert_eq!(c.api.ports, vec![8080]);
        assert_eq!(c.api.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(c.api.media_get_prefixes, vec!["/media/".to_owned()]);
        assert!(c.api.interfaces.is_empty());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.daemon, Daemon::default());
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("/var/lib/limiter/control.sock")
        );
        assert_eq!(c.orgs.len(), 1);
        let acme = &c.orgs[0];
        assert_eq!(acme.name, "acme");
        assert_eq!(acme.line, 21);
        assert_eq!(
            acme.cidrs,
            vec![
                "192.0.2.0/24".parse::<IpNet>().unwrap(),
                "2001:db8:1::/48".parse().unwrap()
            ]
        );
        assert_eq!(
            c.limits_for(acme),
            EffectiveLimits {
                daily_requests: 10000,
                concurrent_connections: 5,
                concurrency_mode: ConcurrencyMode::Reject,
                quota_mode: QuotaMode::DryRun,
            }
        );
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = parse_both("[api]\nports=[8080]").unwrap();
        assert_eq!(c.api.ports, vec![8080]);
        assert_eq!(c.api.cgroup, default_cgroup());
        assert_eq!(c.api.media_get_prefixes, vec!["/media/".to_owned()]);
        assert!(c.api.interfaces.is_empty());
        assert_eq!(c.limits.daily_requests, 2500);
        assert_eq!(c.limits.concurrent_connections, 3);
        assert_eq!(c.limits.concurrency_mode, ConcurrencyMode::Observe);
        assert_eq!(c.limits.quota_mode, QuotaMode::Enforce);
        assert_eq!(c.limits.day_start_secs, 0);
        assert_eq!(c.daemon.pin_dir, PathBuf::from("/sys/fs/bpf/limiter"));
        assert_eq!(c.daemon.state_dir, PathBuf::from("/var/lib/limiter"));
        assert_eq!(c.daemon.log_format, LogFormat::Text);
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("/var/lib/limiter/control.sock")
        );
        assert_eq!(c.daemon.snapshot_interval_secs, 60);
        assert!(c.orgs.is_empty());
    }

    #[test]
    fn overrides_and_derived_defaults() {
        let text = "[api]\nports = [80, 443]\ninterfaces = [\"eth0\"]\n[limits]\nday_start = \"07:30\"\n\
                    concurrency_mode = \"delay\"\n[daemon]\nstate_dir = \"/run/limiter\"\nlog_format = \"json\"\n\
                    [[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.1\", \"2001:db8::1\"]\n";
        let c = parse_both(text).unwrap();
        assert_eq!(c.api.ports, vec![80, 443]);
        assert_eq!(c.api.interfaces, vec!["eth0".to_owned()]);
        assert_eq!(c.limits.day_start_secs, 7 * 3600 + 30 * 60);
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("/run/limiter/control.sock")
        );
        assert_eq!(c.daemon.log_format, LogFormat::Json);
        assert_eq!(c.orgs[0].cidrs[0], "10.0.0.1/32".parse::<IpNet>().unwrap());
        assert_eq!(
            c.orgs[0].cidrs[1],
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
        let l = c.limits_for(&c.orgs[0]);
        assert_eq!((l.daily_requests, l.concurrent_connections), (2500, 3));
        assert_eq!(l.concurrency_mode, ConcurrencyMode::Delay);
    }

    #[test]
    fn display_of_modes() {
        assert_eq!(ConcurrencyMode::Observe.to_string(), "observe");
        assert_eq!(ConcurrencyMode::Delay.to_string(), "delay");
        assert_eq!(ConcurrencyMode::Reject.to_string(), "reject");
        assert_eq!(QuotaMode::Enforce.to_string(), "enforce");
        assert_eq!(QuotaMode::DryRun.to_string(), "dry-run");
        assert_eq!(LogFormat::Text.to_string(), "text");
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[test]
    fn unknown_key_in_api() {
        expect_err(
            "[api]\nports = [8080]\nport = 1\n",
            3,
            "api.port",
            "unknown key",
        );
    }

    #[test]
    fn unknown_key_in_limits() {
        expect_err(
            "[api]\nports = [8080]\n\n[limits]\ndaily = 5\n",
            5,
            "limits.daily",
            "unknown key",
        );
    }

    #[test]
    fn unknown_key_in_org() {
        let text = "[api]\nports = [8080]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\
                    [[orgs]]\nname = \"b\"\ncidr = [\"11.0.0.0/8\"]\n";
        expect_err(text, 8, "orgs[1].cidr", "unknown key");
    }

    #[test]
    fn unknown_top_level_table() {
        expect_err(
            "[api]\nports = [8080]\n[apis]\nx = 1\n",
            3,
            "apis",
            "unknown key",
        );
        expect_err(
            "[api]\nports = [8080]\n[api.extra]\nx = 1\n",
            3,
            "api.extra",
            "unknown key",
        );
    }

    #[test]
    fn wrong_type() {
        expect_err(
            "[api]\nports = [8080]\n[limits]\ndaily_requests = \"many\"\n",
            4,
            "limits.daily_requests",
            "expected an integer, found a string",
        );
        expect_err(
            "[api]\nports = 8080\n",
            2,
            "api.ports",
            "expected an array, found an integer",
        );
        expect_err(
            "[api]\nports = [8080, \"x\"]\n",
            2,
            "api.ports[1]",
            "expected an integer",
        );
        expect_err(
            "[api]\nports = [8080]\n[limits]\nday_start = 07:00:00\n",
            4,
            "limits.day_start",
            "found a date or time",
        );
        expect_err(
            "[api]\nports = [8080]\n[daemon]\nsnapshot_interval_secs = 1.5\n",
            4,
            "daemon.snapshot_interval_secs",
            "found a float",
        );
        expect_err("api = 1\n", 1, "api", "expected a table");
    }

    #[test]
    fn missing_ports() {
        expect_err(
            "# config\n[api]\ncgroup = \"/sys/fs/cgroup\"\n",
            2,
            "api.ports",
            "missing required key",
        );
        expect_err(
            "[limits]\ndaily_requests = 5\n",
            1,
            "api",
            "missing required table",
        );
        expect_err("[api]\nports = []\n", 2, "api.ports", "at least one port");
    }

    #[test]
    fn missing_org_keys() {
        expect_err(
            "[api]\nports = [1]\n\n[[orgs]]\ncidrs = [\"10.0.0.0/8\"]\n",
            4,
            "orgs[0].name",
            "missing required key",
        );
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"x\"\ncidrs = []\n",
            5,
            "orgs[0].cidrs",
            "at least one CIDR",
        );
    }

    #[test]
    fn port_zero() {
        expect_err("[api]\nports = [8080,\n  0]\n", 3, "api.ports[1]", "port 0");
        expect_err("[api]\nports = [70000]\n", 2, "api.ports[0]", "not a port");
    }

    #[test]
    fn duplicate_port() {
        expect_err(
            "[api]\nports = [8080, 443, 8080]\n",
            2,
            "api.ports[2]",
            "port 8080 is listed twice (also api.ports[0])",
        );
    }

    #[test]
    fn bad_prefix() {
        expect_err(
            "[api]\nports = [1]\nmedia_get_prefixes = [\"/ok/\", \"media/\"]\n",
            3,
            "api.media_get_prefixes[1]",
            "not a valid prefix",
        );
        expect_err(
            "[api]\nports = [1]\nmedia_get_prefixes = [\"/a b/\"]\n",
            3,
            "api.media_get_prefixes[0]",
            "not a valid prefix",
        );
        let long = format!(
            "[api]\nports = [1]\nmedia_get_prefixes = [\"/{}\"]\n",
            "a".repeat(64)
        );
        expect_err(&long, 3, "api.media_get_prefixes[0]", "not a valid prefix");
        expect_err(
            "[api]\nports = [1]\nmedia_get_prefixes = [\"/a/\", \"/a/\"]\n",
            3,
            "api.media_get_prefixes[1]",
            "listed twice",
        );
        let many = format!(
            "[api]\nports = [1]\nmedia_get_prefixes = [{}]\n",
            (0..9)
                .map(|i| format!("\"/{i}/\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        expect_err(&many, 3, "api.media_get_prefixes", "at most 8");
    }

    #[test]
    fn bad_day_start() {
        expect_err(
            "[api]\nports = [1]\n[limits]\nday_start = \"24:00\"\n",
            4,
            "limits.day_start",
            "not a time of day",
        );
        expect_err(
            "[api]\nports = [1]\n[limits]\nquota_mode = \"enforce\"\nday_start = \"7:5x\"\n",
            5,
            "limits.day_start",
            "not a time of day",
        );
        expect_err(
            "[api]\nports = [1]\n[limits]\nday_start = \"12:60\"\n",
            4,
            "limits.day_start",
            "not a time of day",
        );
    }

    #[test]
    fn bad_modes_and_paths() {
        expect_err(
            "[api]\nports = [1]\n[limits]\nconcurrency_mode = \"block\"\n",
            4,
            "limits.concurrency_mode",
            "unknown mode",
        );
        expect_err(
            "[api]\nports = [1]\n[limits]\nquota_mode = \"dryrun\"\n",
            4,
            "limits.quota_mode",
            "unknown mode",
        );
        expect_err(
            "[api]\nports = [1]\n[daemon]\nlog_format = \"xml\"\n",
            4,
            "daemon.log_format",
            "unknown log format",
        );
        expect_err(
            "[api]\nports = [1]\n[daemon]\npin_dir = \"bpf/limiter\"\n",
            4,
            "daemon.pin_dir",
            "absolute path",
        );
        expect_err(
            "[api]\nports = [1]\n[limits]\ndaily_requests = 0\n",
            4,
            "limits.daily_requests",
            "at least 1",
        );
        expect_err(
            "[api]\nports = [1]\n[limits]\nconcurrent_connections = 4294967296\n",
            4,
            "limits.concurrent_connections",
            "at most 4294967295",
        );
        let long = format!(
            "[api]\nports = [1]\n[daemon]\nstate_dir = \"/{}\"\n",
            "s".repeat(100)
        );
        expect_err(&long, 4, "daemon.state_dir", "longer than 107 bytes");
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse_both("[api]\nports = [8080]\n\n[limits\n").unwrap_err();
        assert_eq!(err.line(), Some(4), "{err}");
        assert!(err.to_string().starts_with(&format!("{FILE}:4:")), "{err}");
        let err = parse_both("[api]\nports = [8080]\nports = [1]\n").unwrap_err();
        assert_eq!(err.line(), Some(3), "{err}");
        let err = parse_both("[api]\nports = [8080]\n[api]\n").unwrap_err();
        assert_eq!(err.line(), Some(3), "{err}");
    }

    #[test]
    fn bad_cidr() {
        let text = "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n";
        expect_err(text, 7, "orgs[0].cidrs[1]", "not an IPv4 or IPv6 CIDR");
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"acme.example\"]\n",
            5,
            "orgs[0].cidrs[0]",
            "not an IPv4 or IPv6 CIDR",
        );
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\", 5]\n",
            5,
            "orgs[0].cidrs[1]",
            "expected a string",
        );
    }

    #[test]
    fn cidr_syntax() {
        for bad in [
            "10.0.0.0/+8",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/8/8",
            " 10.0.0.0/8",
            "10.0.0.0/0008",
            "010.0.0.0/8",
        ] {
            assert_eq!(parse_net(bad), None, "{bad}");
        }
        assert_eq!(parse_net("10.0.0.0/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(
            parse_net("::ffff:10.0.0.0/104"),
            "::ffff:10.0.0.0/104".parse().ok()
        );
        assert_eq!(parse_net("192.0.2.7"), "192.0.2.7/32".parse().ok());
        assert_eq!(parse_net("2001:db8::/0"), "2001:db8::/0".parse().ok());
    }

    #[test]
    fn host_bits_set() {
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"192.0.2.1/24\"]\n",
            5,
            "orgs[0].cidrs[0]",
            "did you mean 192.0.2.0/24?",
        );
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"2001:db8::1/32\"]\n",
            5,
            "orgs[0].cidrs[0]",
            "did you mean 2001:db8::/32?",
        );
    }

    #[test]
    fn duplicate_org_name() {
        let text = "[api]\nports = [1]\n[[orgs]]\nname = \"acme\"\ncidrs = [\"10.0.0.0/8\"]\n\
                    [[orgs]]\nname = \"acme\"\ncidrs = [\"11.0.0.0/8\"]\n";
        expect_err(text, 7, "orgs[1].name", "already used by orgs[0] (line 4)");
    }

    #[test]
    fn bad_org_name() {
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"unmapped\"\ncidrs = [\"10.0.0.0/8\"]\n",
            4,
            "orgs[0].name",
            "reserved",
        );
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a b\"\ncidrs = [\"10.0.0.0/8\"]\n",
            4,
            "orgs[0].name",
            "not a valid org name",
        );
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"\"\ncidrs = [\"10.0.0.0/8\"]\n",
            4,
            "orgs[0].name",
            "not a valid org name",
        );
    }

    #[test]
    fn same_cidr_twice() {
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\",\n \"10.0.0.0/8\"]\n",
            6,
            "orgs[0].cidrs[1]",
            "listed twice (first at line 5)",
        );
        // Nested CIDRs of one org are harmless.
        parse_both("[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\", \"10.1.0.0/16\"]\n").unwrap();
    }

    #[test]
    fn overlap_ipv4() {
        let text = "[api]\nports = [1]\n\n\n\n\n[[orgs]]\nname = \"acme\"\ncidrs = [\"10.1.0.0/16\"]\n\n\n[[orgs]]\nname = \"big\"\ncidrs = [\"10.0.0.0/8\"]\n";
        let err = expect_err(
            text,
            14,
            "orgs[1].cidrs[0]",
            "10.0.0.0/8 (org \"big\") overlaps 10.1.0.0/16 of org \"acme\" (line 9)",
        );
        assert_eq!(err.column(), Some(10));
        expect_err(
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n[[orgs]]\nname = \"b\"\ncidrs = [\"10.0.0.0/8\"]\n",
            8,
            "orgs[1].cidrs[0]",
            "same network",
        );
    }

    #[test]
    fn overlap_ipv6() {
        let text = "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"2001:db8::/32\"]\n[[orgs]]\nname = \"b\"\ncidrs = [\"192.0.2.0/24\", \"2001:db8:1::/48\"]\n";
        expect_err(
            text,
            8,
            "orgs[1].cidrs[1]",
            "2001:db8:1::/48 (org \"b\") overlaps 2001:db8::/32 of org \"a\" (line 5)",
        );
    }

    #[test]
    fn overlap_ipv4_mapped() {
        let text = "[api]\nports = [1]\n[[orgs]]\nname = \"v4\"\ncidrs = [\"192.0.2.0/24\"]\n[[orgs]]\nname = \"mapped\"\ncidrs = [\"::ffff:192.0.2.128/121\"]\n";
        expect_err(
            text,
            8,
            "orgs[1].cidrs[0]",
            "overlaps 192.0.2.0/24 of org \"v4\"",
        );
        let text = "[api]\nports = [1]\n[[orgs]]\nname = \"all6\"\ncidrs = [\"::/0\"]\n[[orgs]]\nname = \"v4\"\ncidrs = [\"10.0.0.0/8\"]\n";
        expect_err(text, 8, "orgs[1].cidrs[0]", "overlaps ::/0 of org \"all6\"");
        // An IPv6 net outside ::ffff:0:0/96 with the same low bits is no overlap.
        parse_both("[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"192.0.2.0/24\"]\n[[orgs]]\nname = \"b\"\ncidrs = [\"::c000:200/120\", \"0.0.0.0/32\"]\n").unwrap();
    }

    #[test]
    fn too_many_orgs() {
        let mut text = String::from("[api]\nports = [1]\n");
        for i in 0..3 {
            let _ = write!(
                text,
                "[[orgs]]\nname = \"o{i}\"\ncidrs = [\"10.0.{i}.0/24\"]\n"
            );
        }
        let err = parse_text(&text, Path::new(FILE), 2, true).unwrap_err();
        assert_eq!((err.line(), err.key()), (Some(9), Some("orgs[2]")), "{err}");
        let err = parse_text(&text, Path::new(FILE), 2, false).unwrap_err();
        assert_eq!((err.line(), err.key()), (Some(9), Some("orgs[2]")), "{err}");
        assert_eq!(MAX_CONFIG_ORGS, 4_194_303);
    }

    #[test]
    fn scanner_and_toml_agree_on_unusual_syntax() {
        let variants = [
            // Falls back to toml (escapes, inline tables, dotted keys, literal multi-line, …).
            "[api]\nports = [8080]\ncgroup = \"/sys/fs/cgroup/\\u0075nified\"\n",
            "api = { ports = [8080] }\norgs = [{ name = \"a\", cidrs = [\"10.0.0.0/8\"] }, { name = \"b\", cidrs = [\"10.1.0.0/16\"] }]\n",
            "api.ports = [8080]\n",
            "[ api ]\nports = [ 8_080 ]\n",
            "[api]\nports = [8080]\n[[orgs]]\nname = 'a'\ncidrs = ['''10.0.0.0/8''']\n",
            "\u{feff}[api]\nports = [8080]\n",
            // Handled by the scanner.
            "[api]\r\nports = [8080] # main\r\n\r\n[[orgs]]\r\nname = 'x.y-z_1'\r\ncidrs = [\r\n  \"10.0.0.0/8\", # a\r\n  '11.0.0.0/8',\r\n]\r\n",
            "\t# leading comment\n[[orgs]]\nname=\"a\"\ncidrs=[\"10.0.0.0/8\"]\n[api]\nports=[1,2,]\n[[orgs]]\nname=\"b\"\ncidrs=[\"11.0.0.0/8\"]\n",
            "[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n[api]\nports = [0]\n[[orgs]]\nname = \"a\"\ncidrs = [\"12.0.0.0/8\"]\n",
        ];
        for text in variants {
            let _ = parse_both(text);
        }
        assert!(!scanner_accepts(variants[0]));
        assert!(scanner_accepts(variants[6]));
        assert!(scanner_accepts(variants[7]));
        let c = parse_both(variants[7]).unwrap();
        assert_eq!(c.api.ports, vec![1, 2]);
        assert_eq!(
            c.orgs.iter().map(|o| o.line).collect::<Vec<_>>(),
            vec![3, 8]
        );
        let c = parse_both(variants[1]).unwrap_err();
        assert_eq!(c.key(), Some("orgs[1].cidrs[0]"));
    }

    #[test]
    fn valid_keys_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limiter.toml");
        std::fs::write(
            &path,
            "[api]\nports = [1]\n\n[limits]\ndaily_requests = 5\nday_start = \"06:00\"\n",
        )
        .unwrap();
        let at = |t, k| locate(&path, t, k);
        let file = path.display().to_string();
        assert_eq!(at("limits", Some("day_start")), format!("{file}:6:13"));
        assert_eq!(at("api", Some("ports")), format!("{file}:2:9"));
        // A key left out points at its table's header; a table left out at the start.
        assert_eq!(
            at("limits", Some("concurrency_mode")),
            format!("{file}:4:1")
        );
        assert_eq!(at("daemon", Some("metrics")), format!("{file}:1:1"));
    }

    #[test]
    fn read_error_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
        assert_eq!(err.line(), None);
        let path = dir.path().join("limiter.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(Config::load(&path).unwrap().orgs[0].name, "acme");
        std::fs::write(&path, "[api]\nports = [0]\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2:10: api.ports[0]: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn cgroup2_mount_parsing() {
        let mounts = "sysfs /sys sysfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/my\\040dir cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/my dir"))
        );
        assert_eq!(cgroup2_mount("sysfs /sys sysfs rw 0 0\n"), None);
    }

    /// A config of `n` orgs with one /24 each.
    fn many_orgs(n: usize) -> String {
        let mut text = String::with_capacity(n * 60);
        text.push_str("[api]\nports = [8080]\n");
        for i in 0..n {
            let _ = write!(
                text,
                "\n[[orgs]]\nname = \"org{i}\"\ncidrs = [\"{}.{}.{}.0/24\"]\n",
                1 + (i >> 16),
                (i >> 8) & 255,
                i & 255
            );
        }
        text
    }

    #[test]
    fn parses_200k_orgs() {
        let text = many_orgs(200_000);
        let c = Config::parse_with_max_orgs(&text, Path::new(FILE), usize::MAX).unwrap();
        assert_eq!(c.orgs.len(), 200_000);
        assert_eq!(c.orgs[199_999].name, "org199999");
        assert_eq!(c.orgs[199_999].line, 3 + 199_999 * 4 + 2);
        assert_eq!(parse(&text).map(|c| c.orgs.len()).ok(), Some(200_000));
    }

    /// Renders orgs (name, CIDRs) as a config.
    fn render(orgs: &[(String, Vec<String>)]) -> String {
        let mut text = String::from("[api]\nports = [8080]\n");
        for (name, cidrs) in orgs {
            let list = cidrs
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = write!(text, "[[orgs]]\nname = \"{name}\"\ncidrs = [{list}]\n");
        }
        text
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn disjoint_24s_validate_and_contained_cidr_fails(
            nets in proptest::collection::btree_set((1u8..=223, any::<u8>(), any::<u8>()), 1..40),
            pick in any::<proptest::sample::Index>(),
            prefix in 24u8..=32,
            host in any::<u8>(),
            mapped in any::<bool>(),
            into_existing in any::<bool>(),
        ) {
            let nets: Vec<_> = nets.into_iter().collect();
            let mut orgs: Vec<(String, Vec<String>)> = nets
                .iter()
                .enumerate()
                .map(|(i, (a, b, c))| (format!("org{i}"), vec![format!("{a}.{b}.{c}.0/24")]))
                .collect();
            let c = parse_both(&render(&orgs)).unwrap();
            prop_assert_eq!(c.orgs.len(), nets.len());

            let victim = pick.index(nets.len());
            let (a, b, c) = nets[victim];
            let addr = std::net::Ipv4Addr::new(a, b, c, host);
            let inner = ipnet::Ipv4Net::new(addr, prefix).unwrap().trunc();
            let inner = if mapped {
                let v6 = inner.network().to_ipv6_mapped();
                format!("{v6}/{}", 96 + inner.prefix_len())
            } else {
                inner.to_string()
            };
            // Into another existing org when there is one, else into a new org.
            let intruder = if into_existing && nets.len() > 1 {
                (victim + 1) % nets.len()
            } else {
                orgs.push(("intruder".to_owned(), Vec::new()));
                orgs.len() - 1
            };
            orgs[intruder].1.push(inner);
            let err = parse_both(&render(&orgs)).unwrap_err();
            let shown = err.to_string();
            let victim_name = &orgs[victim].0;
            let intruder_name = &orgs[intruder].0;
            prop_assert!(shown.contains(&format!("\"{victim_name}\"")), "{}", shown);
            prop_assert!(shown.contains(&format!("\"{intruder_name}\"")), "{}", shown);
            let later = victim.max(intruder);
            let key_prefix = format!("orgs[{later}].cidrs[");
            prop_assert!(err.key().is_some_and(|k| k.starts_with(&key_prefix)), "{}", shown);
        }

        #[test]
        fn scanner_matches_toml_on_reformatted_configs(
            spaces in proptest::collection::vec(
                prop_oneof![Just(""), Just(" "), Just("\t"), Just("  ")],
                8,
            ),
            comment in any::<bool>(),
            crlf in any::<bool>(),
            trailing_comma in any::<bool>(),
            multiline in any::<bool>(),
            port in 0i64..70000,
            day in "[0-9]{2}:[0-9]{2}",
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let c = if comment { " # note" } else { "" };
            let sep = if multiline { format!(",{nl}  ") } else { ", ".to_owned() };
            let tc = if trailing_comma { "," } else { "" };
            let s = &spaces;
            let text = format!(
                "{}[api]{c}{nl}{}ports{}={}[{port}{sep}8080{tc}]{c}{nl}{nl}\
                 [limits]{nl}day_start = \"{day}\"{nl}\
                 [[orgs]]{nl}name{}={}\"a\"{nl}\
                 cidrs = [\"10.0.0.0/8\"{sep}'2001:db8::/32'{tc}]{c}{nl}\
                 [[orgs]]{nl}{}name = \"b\"{nl}cidrs = [\"10.{}.0.0/16\"]{nl}",
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], port % 256
            );
            prop_assert!(scanner_accepts(&text), "{}", text);
            let _ = parse_both(&text);
        }
    }
}
