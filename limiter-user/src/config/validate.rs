//! The one step from the file as written (`raw`) to the [`Config`] the daemon uses: defaults,
//! and the checks that need more than one value.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

use ipnet::IpNet;
use toml::Spanned;

use super::error::{Src, count_newlines};
use super::{
    Api, ApiKeys, CONTROL_SOCKET_NAME, Cluster, Config, ConfigError, DEFAULT_MEDIA_PREFIX,
    DEFAULT_SYNC_INTERVAL_MS, DaemonSettings, Identify, Limits, Org, RestartOnly, Source,
    default_cgroup, default_host_id,
};
use super::{keys_file, orgs_file, raw};
use crate::secret::{self, KeySecret};

/// `sun_path` holds 108 bytes including the terminating NUL; longer socket paths fail at bind time.
const MAX_SOCKET_PATH: usize = 107;

/// The validated config of `raw`, with at most `max_orgs` orgs (from `[[orgs]]` and the orgs
/// file together).
pub(super) fn config(
    src: &Src<'_>,
    raw: raw::Root,
    max_orgs: usize,
) -> Result<Config, ConfigError> {
    let Some(mut api_raw) = raw.api else {
        return Err(src.invalid(
            None,
            "api",
            "missing required table [api] (it must list the API ports)",
        ));
    };
    written_as_table(src, "api", Some(api_raw.span()))?;
    written_as_table(src, "limits", raw.limits.as_ref().map(Spanned::span))?;
    written_as_table(src, "daemon", raw.daemon.as_ref().map(Spanned::span))?;
    written_as_table(src, "cluster", raw.cluster.as_ref().map(Spanned::span))?;
    let orgs_file = api_raw.get_mut().0.orgs_file.take();
    let keys_file_at = api_raw
        .get_ref()
        .0
        .api_keys_file
        .as_ref()
        .map(|f| f.span().start);
    let mut api = api(src, api_raw)?;
    let limits = limits(src, raw.limits);
    let daemon = daemon(src, raw.daemon)?;
    let cluster = cluster(src, raw.cluster);
    let (mut orgs, mut positions) = orgs(src, raw.orgs, max_orgs)?;
    let toml_orgs = orgs.len();
    let file_path;
    let file_text;
    let mut sources = Sources {
        config: src,
        orgs_file: None,
        toml_orgs,
    };
    if let Some(file) = orgs_file {
        let at = file.span().start;
        file_path = file.into_inner().0;
        file_text = std::fs::read_to_string(&file_path).map_err(|e| {
            src.invalid(
                Some(at),
                "api.orgs_file",
                format!("cannot read {}: {e}", file_path.display()),
            )
        })?;
        let file_src = Src {
            file: &file_path,
            text: &file_text,
        };
        let listed = orgs_file::parse(&file_src)?;
        if let Some(&extra) = listed.names.get(max_orgs.saturating_sub(toml_orgs)) {
            return Err(file_src.invalid(
                Some(extra),
                "name",
                format!("too many orgs: at most {max_orgs} are allowed (with those of [[orgs]])"),
            ));
        }
        positions.cidrless.extend(
            listed
                .cidrless
                .into_iter()
                .map(|(i, at)| (toml_orgs + i, Loc::orgs_file(at))),
        );
        orgs.extend(listed.orgs);
        positions
            .names
            .extend(listed.names.into_iter().map(Loc::orgs_file));
        positions
            .cidrs
            .extend(listed.cidrs.into_iter().map(Loc::orgs_file));
        api.orgs_file = Some(file_path.clone());
        sources.orgs_file = Some(file_src);
    }
    check_unique_names(&sources, &orgs, &positions.names)?;
    check_overlaps(&sources, &orgs, &positions.cidrs)?;
    let (keys, has_key) = match &api.identify.api_keys_file {
        Some(path) if api.identify.uses(Source::ApiKey) => {
            let (secret, secret_is_new) = key_secret(src, keys_file_at, &daemon.state_dir)?;
            let read = keys_file::read(src, keys_file_at, path, &secret, &orgs)?;
            let keys = ApiKeys {
                secret,
                secret_is_new,
                entries: read.entries,
            };
            (Some(keys), read.has_key)
        }
        _ => (None, Vec::new()),
    };
    check_identifiable(&sources, &api.identify, &orgs, &positions, &has_key)?;
    Ok(Config {
        api,
        limits,
        daemon,
        cluster,
        orgs,
        keys,
    })
}

/// The secret kept in `state_dir`, or a new one (with why the kept one cannot serve) that the
/// daemon keeps before it uses it. Only reads: `limiter check` changes nothing.
fn key_secret(
    src: &Src<'_>,
    at: Option<usize>,
    state_dir: &std::path::Path,
) -> Result<(KeySecret, Option<String>), ConfigError> {
    match secret::read(state_dir) {
        Ok(s) => Ok((s, None)),
        Err(why) => KeySecret::generate().map(|s| (s, Some(why))).map_err(|e| {
            src.invalid(
                at,
                "api.api_keys_file",
                format!("cannot make a secret for the keys' digests: {e}"),
            )
        }),
    }
}

/// Every org must be identifiable by some source of `identify_by`: by its CIDRs where a source
/// yields an address, by its keys where `api_key` is listed. `has_key[i]`: org `i` has a key.
fn check_identifiable(
    sources: &Sources<'_, '_>,
    identify: &Identify,
    orgs: &[Org],
    positions: &OrgPositions,
    has_key: &[bool],
) -> Result<(), ConfigError> {
    let keyed = |i: usize| has_key.get(i).copied().unwrap_or(false);
    let keys_file = identify
        .api_keys_file
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    let by_key = identify.uses(Source::ApiKey);
    if identify.by_address() {
        for &(i, at) in &positions.cidrless {
            if keyed(i) {
                continue;
            }
            let name = orgs.get(i).map_or("", |o| o.name.as_str());
            let message = if by_key {
                format!(
                    "org \"{name}\" lists no CIDRs and has no key in {keys_file}: nothing identifies it"
                )
            } else {
                format!(
                    "must list at least one CIDR: api.identify_by does not list \"api_key\", so \
                     nothing else identifies org \"{name}\""
                )
            };
            return Err(sources.invalid(Some(at), sources.key(i, "cidrs"), message));
        }
        return Ok(());
    }
    for (i, org) in orgs.iter().enumerate() {
        if !keyed(i) {
            return Err(sources.invalid(
                positions.names.get(i).copied(),
                sources.key(i, "name"),
                format!(
                    "org \"{}\" has no key in {keys_file}, and api.identify_by knows orgs by \
                     their keys alone",
                    org.name
                ),
            ));
        }
    }
    Ok(())
}

/// `[api]`, `[limits]`, `[daemon]` and `[cluster]` are tables with a header (or inline): one
/// built from dotted keys has no place to point at for its keys left out.
fn written_as_table(
    src: &Src<'_>,
    name: &str,
    span: Option<Range<usize>>,
) -> Result<(), ConfigError> {
    let Some(span) = span else { return Ok(()) };
    match src.text.as_bytes().get(span.start) {
        Some(b'[' | b'{') => Ok(()),
        _ => Err(src.invalid(
            Some(span.start),
            name,
            format!("write this as a [{name}] table, not with dotted keys or [{name}.…] headers"),
        )),
    }
}

/// A restart-only value, placed where the file sets it, else at its table, else at 1:1.
fn restart_only<T>(
    src: &Src<'_>,
    value: T,
    at: Option<Range<usize>>,
    table: Option<&Range<usize>>,
) -> RestartOnly<T> {
    let start = at.map(|s| s.start).or(table.map(|t| t.start));
    RestartOnly::new(value, src.pos(start))
}

/// The value and span of an optional `Spanned` key.
fn split<T>(v: Option<Spanned<T>>) -> (Option<T>, Option<Range<usize>>) {
    match v {
        Some(v) => {
            let span = v.span();
            (Some(v.into_inner()), Some(span))
        }
        None => (None, None),
    }
}

fn api(src: &Src<'_>, raw: Spanned<raw::Table<raw::Api>>) -> Result<Api, ConfigError> {
    let table = raw.span();
    let raw = raw.into_inner().0;
    let ports = ports(src, raw.ports)?;
    let media_get_prefixes = match raw.media_get_prefixes {
        Some(list) => prefixes(src, list)?,
        None => vec![DEFAULT_MEDIA_PREFIX.to_owned()],
    };
    let (cgroup, cgroup_at) = split(raw.cgroup);
    let cgroup = cgroup.map_or_else(default_cgroup, |p| p.0);
    let (interfaces, interfaces_at) = split(raw.interfaces);
    let interfaces = match interfaces {
        Some(list) => unique(src, "api.interfaces", list, |i| &i.0)?,
        None => Vec::new(),
    };
    let (netns, netns_at) = split(raw.netns);
    let identify = identify(
        src,
        &table,
        raw.identify_by,
        raw.trusted_proxies,
        raw.api_keys_file,
    )?;
    let identify = Identify {
        forwarded_header: raw.forwarded_header.unwrap_or_default(),
        api_key_header: raw.api_key_header.map_or(identify.api_key_header, |h| h.0),
        ..identify
    };
    Ok(Api {
        ports,
        cgroup: restart_only(src, cgroup, cgroup_at, Some(&table)),
        media_get_prefixes,
        interfaces: restart_only(src, interfaces, interfaces_at, Some(&table)),
        netns: restart_only(src, netns.map(|p| p.0), netns_at, Some(&table)),
        orgs_file: None,
        identify,
    })
}

/// `api.identify_by` with the settings its sources need: trusted proxies for the PROXY protocol
/// and forwarded headers, a keys file for API keys.
fn identify(
    src: &Src<'_>,
    table: &Range<usize>,
    by: Option<Spanned<Vec<Spanned<Source>>>>,
    trusted: Option<Spanned<Vec<Spanned<raw::Cidr>>>>,
    keys_file: Option<Spanned<raw::AbsPath>>,
) -> Result<Identify, ConfigError> {
    let mut out = Identify {
        api_keys_file: keys_file.map(|f| f.into_inner().0),
        ..Identify::default()
    };
    let mut listed: Vec<(Source, usize)> = vec![(Source::Address, table.start)];
    if let Some(by) = by {
        let at = by.span().start;
        let items = by.into_inner();
        if items.is_empty() {
            return Err(src.invalid(
                Some(at),
                "api.identify_by",
                "must list at least one source (\"api_key\", \"proxy_protocol\", \"forwarded\" \
                 or \"address\")",
            ));
        }
        listed.clear();
        for (i, item) in items.iter().enumerate() {
            let source = *item.get_ref();
            if let Some(first) = listed.iter().position(|(s, _)| *s == source) {
                return Err(src.invalid(
                    Some(item.span().start),
                    format!("api.identify_by[{i}]"),
                    format!(
                        "\"{}\" is listed twice (also api.identify_by[{first}])",
                        source.as_str()
                    ),
                ));
            }
            listed.push((source, item.span().start));
        }
    }
    if let Some(list) = trusted {
        use limiter_common::MAX_TRUSTED_PROXIES;
        if list.get_ref().len() > MAX_TRUSTED_PROXIES as usize {
            return Err(src.invalid(
                Some(list.span().start),
                "api.trusted_proxies",
                format!("at most {MAX_TRUSTED_PROXIES} CIDRs are supported (the kernel's table)"),
            ));
        }
        for (i, item) in list.get_ref().iter().enumerate() {
            let net = item.get_ref().0;
            if let Some(first) = out.trusted_proxies.iter().position(|n| *n == net) {
                return Err(src.invalid(
                    Some(item.span().start),
                    format!("api.trusted_proxies[{i}]"),
                    format!("{net} is listed twice (also api.trusted_proxies[{first}])"),
                ));
            }
            out.trusted_proxies.push(net);
        }
    }
    for (i, &(source, at)) in listed.iter().enumerate() {
        let key = format!("api.identify_by[{i}]");
        let proxied = matches!(source, Source::ProxyProtocol | Source::Forwarded);
        if proxied && out.trusted_proxies.is_empty() {
            return Err(src.invalid(
                Some(at),
                key,
                format!(
                    "\"{}\" believes headers only from api.trusted_proxies: list the CIDRs of \
                     the proxies or load balancers in front of the API there",
                    source.as_str()
                ),
            ));
        }
        if source == Source::ApiKey && out.api_keys_file.is_none() {
            return Err(src.invalid(
                Some(at),
                key,
                "\"api_key\" needs api.api_keys_file, the file of \"ORG KEY\" lines",
            ));
        }
    }
    out.by = listed.into_iter().map(|(s, _)| s).collect();
    Ok(out)
}

fn ports(src: &Src<'_>, raw: Spanned<Vec<Spanned<raw::Port>>>) -> Result<Vec<u16>, ConfigError> {
    let start = raw.span().start;
    let items = raw.into_inner();
    if items.is_empty() {
        return Err(src.invalid(Some(start), "api.ports", "must list at least one port"));
    }
    let max = limiter_common::MAX_API_PORTS as usize;
    if items.len() > max {
        return Err(src.invalid(
            Some(start),
            "api.ports",
            format!("at most {max} ports are supported"),
        ));
    }
    let mut ports: Vec<u16> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let port = item.get_ref().0;
        if let Some(first) = ports.iter().position(|&p| p == port) {
            return Err(src.invalid(
                Some(item.span().start),
                format!("api.ports[{i}]"),
                format!("port {port} is listed twice (also api.ports[{first}])"),
            ));
        }
        ports.push(port);
    }
    Ok(ports)
}

fn prefixes(
    src: &Src<'_>,
    raw: Spanned<Vec<Spanned<raw::Prefix>>>,
) -> Result<Vec<String>, ConfigError> {
    use limiter_common::MAX_MEDIA_PREFIXES;
    if raw.get_ref().len() > MAX_MEDIA_PREFIXES {
        return Err(src.invalid(
            Some(raw.span().start),
            "api.media_get_prefixes",
            format!("at most {MAX_MEDIA_PREFIXES} prefixes are supported (the kernel's limit)"),
        ));
    }
    unique(src, "api.media_get_prefixes", raw.into_inner(), |p| &p.0)
}

/// The strings of a list that may not repeat an entry.
fn unique<T>(
    src: &Src<'_>,
    key: &str,
    items: Vec<Spanned<T>>,
    text: impl Fn(&T) -> &String,
) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let s = text(item.get_ref());
        if let Some(first) = out.iter().position(|x| x == s) {
            return Err(src.invalid(
                Some(item.span().start),
                format!("{key}[{i}]"),
                format!("\"{s}\" is listed twice (also {key}[{first}])"),
            ));
        }
        out.push(s.clone());
    }
    Ok(out)
}

fn limits(src: &Src<'_>, raw: Option<Spanned<raw::Table<raw::Limits>>>) -> Limits {
    let mut limits = Limits::default();
    let Some(raw) = raw else { return limits };
    let table = raw.span();
    let raw = raw.into_inner().0;
    if let Some(v) = raw.daily_requests {
        limits.daily_requests = v.0;
    }
    if let Some(v) = raw.concurrent_connections {
        limits.concurrent_connections = v.0 as u32;
    }
    limits.concurrency_mode = raw.concurrency_mode.unwrap_or(limits.concurrency_mode);
    limits.quota_mode = raw.quota_mode.unwrap_or(limits.quota_mode);
    limits.pace_over_quota = raw.pace_over_quota.unwrap_or(limits.pace_over_quota);
    if let Some(v) = raw.pace_rate {
        limits.pace_rate = v.0 as u32;
    }
    let (day_start, at) = split(raw.day_start);
    limits.day_start_secs = restart_only(src, day_start.map_or(0, |d| d.0), at, Some(&table));
    limits
}

fn daemon(
    src: &Src<'_>,
    raw: Option<Spanned<raw::Table<raw::Daemon>>>,
) -> Result<DaemonSettings, ConfigError> {
    let defaults = DaemonSettings::default();
    let Some(raw) = raw else { return Ok(defaults) };
    let table = raw.span();
    let raw = raw.into_inner().0;
    let t = Some(&table);
    let path = |v: Option<Spanned<raw::AbsPath>>, default: &PathBuf| {
        let (v, at) = split(v);
        restart_only(src, v.map_or_else(|| default.clone(), |p| p.0), at, t)
    };
    let socket_given = raw.control_socket.is_some();
    let state_dir_at = raw.state_dir.as_ref().map(|s| s.span().start);
    let socket_at = raw.control_socket.as_ref().map(|s| s.span().start);
    let state_dir = path(raw.state_dir, &defaults.state_dir);
    let default_socket = state_dir.join(CONTROL_SOCKET_NAME);
    let control_socket = path(raw.control_socket, &default_socket);
    if control_socket.as_os_str().len() > MAX_SOCKET_PATH {
        let (at, key) = if socket_given {
            (socket_at, "daemon.control_socket")
        } else {
            (state_dir_at, "daemon.state_dir")
        };
        return Err(src.invalid(
            at,
            key,
            format!(
                "the control socket path {} is longer than {MAX_SOCKET_PATH} bytes; \
                 set a shorter daemon.control_socket",
                control_socket.display()
            ),
        ));
    }
    let (log_format, log_at) = split(raw.log_format);
    let (interval, interval_at) = split(raw.snapshot_interval_secs);
    let (metrics, metrics_at) = split(raw.metrics);
    Ok(DaemonSettings {
        pin_dir: path(raw.pin_dir, &defaults.pin_dir),
        state_dir,
        log_format: restart_only(src, log_format.unwrap_or_default(), log_at, t),
        control_socket,
        snapshot_interval_secs: restart_only(
            src,
            interval.map_or(*defaults.snapshot_interval_secs, |i| i.0),
            interval_at,
            t,
        ),
        metrics: restart_only(src, metrics.map(|m| m.0), metrics_at, t),
    })
}

fn cluster(
    src: &Src<'_>,
    raw: Option<Spanned<raw::Table<raw::Cluster>>>,
) -> RestartOnly<Option<Cluster>> {
    let (raw, at) = split(raw);
    let cluster = raw.map(|raw::Table(c)| Cluster {
        redis: c.redis.0,
        host_id: c.host_id.map_or_else(default_host_id, |h| h.0),
        sync_interval_ms: c.sync_interval_ms.map_or(DEFAULT_SYNC_INTERVAL_MS, |i| i.0),
    });
    restart_only(src, cluster, at, None)
}

/// Where each org's name and every CIDR (flat, org after org) is written, for messages.
struct OrgPositions {
    names: Vec<Loc>,
    cidrs: Vec<Loc>,
    /// Orgs that list no CIDRs, with where to point at (their `cidrs`, else their name).
    cidrless: Vec<(usize, Loc)>,
}

/// A byte offset in the config or in the orgs file.
#[derive(Clone, Copy)]
struct Loc {
    in_orgs_file: bool,
    offset: usize,
}

impl Loc {
    fn config(offset: usize) -> Loc {
        Loc {
            in_orgs_file: false,
            offset,
        }
    }

    fn orgs_file(offset: usize) -> Loc {
        Loc {
            in_orgs_file: true,
            offset,
        }
    }
}

/// The texts orgs come from: the `[[orgs]]` tables of the config first, then the orgs file.
struct Sources<'a, 't> {
    config: &'a Src<'t>,
    orgs_file: Option<Src<'t>>,
    /// How many orgs the config's `[[orgs]]` list; the orgs file's follow.
    toml_orgs: usize,
}

impl Sources<'_, '_> {
    fn src(&self, loc: Loc) -> &Src<'_> {
        match &self.orgs_file {
            Some(file) if loc.in_orgs_file => file,
            _ => self.config,
        }
    }

    /// The key of `field` of org `org`: a key path in the config, the field alone in the orgs
    /// file (whose position already names the org).
    fn key(&self, org: usize, field: &str) -> String {
        if org < self.toml_orgs {
            format!("orgs[{org}].{field}")
        } else {
            field.to_owned()
        }
    }

    /// `line N` when `earlier` is in the same file as `later`, else `FILE:N`.
    fn line_of(&self, earlier: Loc, later: Loc) -> String {
        let src = self.src(earlier);
        let line = src.pos(Some(earlier.offset)).line;
        if earlier.in_orgs_file == later.in_orgs_file {
            format!("line {line}")
        } else {
            format!("{}:{line}", src.file.display())
        }
    }

    fn invalid(&self, loc: Option<Loc>, key: String, message: String) -> ConfigError {
        match loc {
            Some(loc) => self.src(loc).invalid(Some(loc.offset), key, message),
            None => self.config.invalid(None, key, message),
        }
    }
}

fn orgs(
    src: &Src<'_>,
    raw: Vec<Spanned<raw::Table<raw::Org>>>,
    max_orgs: usize,
) -> Result<(Vec<Org>, OrgPositions), ConfigError> {
    if let Some(extra) = raw.get(max_orgs) {
        return Err(src.invalid(
            Some(extra.span().start),
            format!("orgs[{max_orgs}]"),
            format!("too many orgs: at most {max_orgs} are allowed"),
        ));
    }
    let mut lines = LineCursor {
        bytes: src.text.as_bytes(),
        pos: 0,
        line: 1,
    };
    let mut positions = OrgPositions {
        names: Vec::with_capacity(raw.len()),
        cidrs: Vec::with_capacity(raw.len()),
        cidrless: Vec::new(),
    };
    let mut orgs = Vec::with_capacity(raw.len());
    for (index, org) in raw.into_iter().enumerate() {
        let org = org.into_inner().0;
        let name_at = org.name.span().start;
        let (cidrs, cidrs_at) = split(org.cidrs);
        let cidrs = cidrs.unwrap_or_default();
        if cidrs.is_empty() {
            let at = cidrs_at.map_or(name_at, |s| s.start);
            positions.cidrless.push((index, Loc::config(at)));
        }
        positions.names.push(Loc::config(name_at));
        positions
            .cidrs
            .extend(cidrs.iter().map(|c| Loc::config(c.span().start)));
        orgs.push(Org {
            name: org.name.into_inner().0,
            cidrs: cidrs.into_iter().map(|c| c.into_inner().0).collect(),
            daily_requests: org.daily_requests.map(|v| v.0),
            concurrent_connections: org.concurrent_connections.map(|v| v.0 as u32),
            concurrency_mode: org.concurrency_mode,
            quota_mode: org.quota_mode,
            pace_over_quota: org.pace_over_quota,
            line: lines.line_at(name_at),
        });
    }
    Ok((orgs, positions))
}

fn check_unique_names(
    sources: &Sources<'_, '_>,
    orgs: &[Org],
    name_pos: &[Loc],
) -> Result<(), ConfigError> {
    // foldhash: SipHash cost a third of the time it takes to load a million orgs.
    let mut seen: foldhash::HashMap<&str, usize> =
        HashMap::with_capacity_and_hasher(orgs.len(), Default::default());
    for (i, org) in orgs.iter().enumerate() {
        if let Some(&first) = seen.get(org.name.as_str()) {
            let (Some(&at), Some(&first_at)) = (name_pos.get(i), name_pos.get(first)) else {
                break;
            };
            let line = sources.line_of(first_at, at);
            let by = if first < sources.toml_orgs {
                format!("by orgs[{first}] ({line})")
            } else {
                format!("at {line}")
            };
            return Err(sources.invalid(
                Some(at),
                sources.key(i, "name"),
                format!("org name \"{}\" is already used {by}", org.name),
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
fn check_overlaps(
    sources: &Sources<'_, '_>,
    orgs: &[Org],
    cidr_pos: &[Loc],
) -> Result<(), ConfigError> {
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
    match worst {
        Some((later, earlier)) => overlap_error(sources, orgs, cidr_pos, later, earlier),
        None => Ok(()),
    }
}

/// The message about `later` overlapping (or repeating) `earlier`.
fn overlap_error(
    sources: &Sources<'_, '_>,
    orgs: &[Org],
    cidr_pos: &[Loc],
    later: NetRange,
    earlier: NetRange,
) -> Result<(), ConfigError> {
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
    let (Some(&later_at), Some(&earlier_at)) = (
        cidr_pos.get(later.cidr as usize),
        cidr_pos.get(earlier.cidr as usize),
    ) else {
        return Ok(());
    };
    let earlier_line = sources.line_of(earlier_at, later_at);
    let message = if later.org == earlier.org {
        format!("{later_net} is listed twice (first at {earlier_line})")
    } else if later.start == earlier.start && later.prefix == earlier.prefix {
        format!(
            "{later_net} (org \"{later_name}\") is the same network as {earlier_net} \
             of org \"{earlier_name}\" ({earlier_line})"
        )
    } else {
        format!(
            "{later_net} (org \"{later_name}\") overlaps {earlier_net} \
             of org \"{earlier_name}\" ({earlier_line})"
        )
    };
    Err(sources.invalid(
        Some(later_at),
        sources.key(later_org, &format!("cidrs[{later_index}]")),
        message,
    ))
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
