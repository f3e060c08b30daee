//! The file as written: one serde struct per table, every key declared once.
//!
//! Each value is checked here on its own, inside toml's deserializer, so the error carries the
//! value's span; what needs several values (defaults, duplicates, overlaps) is left to
//! `validate`. Values whose position a later check needs are [`Spanned`].

use ipnet::IpNet;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use toml::Spanned;

use super::error::Src;
use super::{ConcurrencyMode, ConfigError, ForwardedHeader, LogFormat, QuotaMode, Source};

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;
const MAX_ORG_NAME: usize = 64;
/// The report uses this name for traffic of unknown orgs, so no real org may take it.
const RESERVED_ORG_NAME: &str = crate::orgs::UNMAPPED_NAME;

/// Parses `src` into the raw structs: TOML syntax first, then the keys and their values.
pub(super) fn read(src: &Src<'_>) -> Result<Root, ConfigError> {
    let de = toml::de::Deserializer::parse(src.text).map_err(|e| src.syntax(&e))?;
    Root::deserialize(de).map_err(|e| src.deserialize(&e))
}

/// The whole file. In every struct here, the field order is the order an unknown-key message
/// lists the keys in.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Root {
    pub api: Option<Spanned<Table<Api>>>,
    pub limits: Option<Spanned<Table<Limits>>>,
    pub daemon: Option<Spanned<Table<Daemon>>>,
    pub cluster: Option<Spanned<Table<Cluster>>>,
    #[serde(default)]
    pub orgs: Vec<Spanned<Table<Org>>>,
}

/// `[api]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Api {
    pub ports: Spanned<Vec<Spanned<Port>>>,
    pub cgroup: Option<Spanned<AbsPath>>,
    pub media_get_prefixes: Option<Spanned<Vec<Spanned<Prefix>>>>,
    pub interfaces: Option<Spanned<Vec<Spanned<Interface>>>>,
    pub netns: Option<Spanned<AbsPath>>,
    pub orgs_file: Option<Spanned<AbsPath>>,
    pub identify_by: Option<Spanned<Vec<Spanned<Source>>>>,
    pub trusted_proxies: Option<Spanned<Vec<Spanned<Cidr>>>>,
    pub forwarded_header: Option<ForwardedHeader>,
    pub api_key_header: Option<HeaderName>,
    pub api_keys_file: Option<Spanned<AbsPath>>,
}

/// `[limits]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub daily_requests: Option<DailyRequests>,
    pub concurrent_connections: Option<Connections>,
    pub concurrency_mode: Option<ConcurrencyMode>,
    pub quota_mode: Option<QuotaMode>,
    pub day_start: Option<Spanned<DayStart>>,
    pub pace_over_quota: Option<bool>,
    pub pace_rate: Option<PaceRate>,
}

/// `[daemon]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Daemon {
    pub pin_dir: Option<Spanned<AbsPath>>,
    pub state_dir: Option<Spanned<AbsPath>>,
    pub log_format: Option<Spanned<LogFormat>>,
    pub control_socket: Option<Spanned<AbsPath>>,
    pub snapshot_interval_secs: Option<Spanned<Int<1, { u64::MAX }>>>,
    pub metrics: Option<Spanned<Listen>>,
}

/// `[cluster]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Cluster {
    pub redis: RedisUrl,
    pub host_id: Option<HostId>,
    pub sync_interval_ms: Option<Int<10, 60_000>>,
}

/// One `[[orgs]]` entry.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Org {
    pub name: Spanned<OrgName>,
    pub cidrs: Option<Spanned<Vec<Spanned<Cidr>>>>,
    pub daily_requests: Option<DailyRequests>,
    pub concurrent_connections: Option<Connections>,
    pub concurrency_mode: Option<ConcurrencyMode>,
    pub quota_mode: Option<QuotaMode>,
    pub pace_over_quota: Option<bool>,
}

/// Reads a string and converts it with `f`, whose error becomes the key's problem. The
/// conversion runs inside toml's deserializer so the error gets the value's own span (an array
/// element's, not the array's).
fn from_str<'de, D, T>(d: D, f: fn(String) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Str<T>(fn(String) -> Result<T, String>);
    impl<'de, T> Visitor<'de> for Str<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            self.0(v.to_owned()).map_err(E::custom)
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
            self.0(v).map_err(E::custom)
        }
    }
    d.deserialize_string(Str(f))
}

/// Like [`from_str`], for an integer.
fn from_int<'de, D, T>(d: D, f: fn(i64) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Int<T>(fn(i64) -> Result<T, String>);
    impl<'de, T> Visitor<'de> for Int<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            self.0(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            match i64::try_from(v) {
                Ok(v) => self.visit_i64(v),
                Err(_) => Err(E::custom(format!("{v} is too large"))),
            }
        }
    }
    d.deserialize_i64(Int(f))
}

/// Implements `Deserialize` for `$t` by reading a string (`str`) or an integer (`int`) and
/// converting it with `$f`.
macro_rules! deserialize_via {
    ($t:ty, str, $f:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_str(d, $f)
            }
        }
    };
    ($t:ty, int, $f:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_int(d, $f)
            }
        }
    };
}

/// A TOML table, with a header or inline. Only a map will do: serde would also fill a struct
/// from an array.
pub(super) struct Table<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Map<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Map<T> {
            type Value = Table<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct table")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        d.deserialize_map(Map(PhantomData))
    }
}

/// An integer within `MIN..=MAX`.
#[derive(Clone, Copy)]
pub(super) struct Int<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> Int<MIN, MAX> {
    /// `v` if it lies within the bounds.
    pub fn new(v: i64) -> Result<Self, String> {
        match u64::try_from(v) {
            Ok(v) if v > MAX => Err(format!("must be at most {MAX}")),
            Ok(v) if v >= MIN => Ok(Int(v)),
            _ => Err(format!("must be at least {MIN}")),
        }
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_int(d, Self::new)
    }
}

pub(super) type DailyRequests = Int<1, { u64::MAX }>;
pub(super) type Connections = Int<1, { u32::MAX as u64 }>;
/// `pace_rate`: new connections a second.
pub(super) type PaceRate = Int<1, { super::MAX_PACE_RATE as u64 }>;

/// A TCP port, 1 to 65535.
pub(super) struct Port(pub u16);

deserialize_via!(Port, int, |v| match u16::try_from(v) {
    Ok(0) => Err("port 0 is not allowed (ports are 1 to 65535)".to_owned()),
    Ok(port) => Ok(Port(port)),
    Err(_) => Err(format!("{v} is not a port (ports are 1 to 65535)")),
});

/// An absolute path: the daemon runs from anywhere, so relative paths would be surprises.
pub(super) struct AbsPath(pub PathBuf);

deserialize_via!(AbsPath, str, |s| {
    if !s.starts_with('/') || s.contains('\0') {
        return Err(format!("\"{s}\" is not an absolute path"));
    }
    Ok(AbsPath(PathBuf::from(s)))
});

/// A media prefix the kernel can compare: `/…`, visible ASCII, at most `MEDIA_PREFIX_MAX` bytes.
#[derive(PartialEq)]
pub(super) struct Prefix(pub String);

deserialize_via!(Prefix, str, |s| {
    use limiter_common::MEDIA_PREFIX_MAX;
    let visible = s.bytes().all(|c| c.is_ascii_graphic());
    if !s.starts_with('/') || s.len() > MEDIA_PREFIX_MAX || !visible {
        return Err(format!(
            "\"{s}\" is not a valid prefix: it must start with '/' and be \
             1 to {MEDIA_PREFIX_MAX} bytes of visible ASCII without spaces"
        ));
    }
    Ok(Prefix(s))
});

/// A network interface name.
#[derive(PartialEq)]
pub(super) struct Interface(pub String);

deserialize_via!(Interface, str, |s| {
    let bad_char = s
        .bytes()
        .any(|c| c == b'/' || c == b'\0' || c.is_ascii_whitespace());
    if s.is_empty() || s.len() > MAX_IFNAME || bad_char || s == "." || s == ".." {
        return Err(format!(
            "\"{s}\" is not an interface name (1 to {MAX_IFNAME} bytes, no '/' or spaces)"
        ));
    }
    Ok(Interface(s))
});

/// `"HH:MM"` (UTC) as seconds after midnight.
pub(super) struct DayStart(pub u32);

deserialize_via!(DayStart, str, |s| {
    parse_hh_mm(&s).map(DayStart).ok_or_else(|| {
        format!(
            "\"{s}\" is not a time of day; expected \"HH:MM\" from \"00:00\" to \"23:59\" (UTC)"
        )
    })
});

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

deserialize_via!(ConcurrencyMode, str, |s| concurrency_mode(&s));

pub(super) fn concurrency_mode(s: &str) -> Result<ConcurrencyMode, String> {
    match s {
        "observe" => Ok(ConcurrencyMode::Observe),
        "delay" => Ok(ConcurrencyMode::Delay),
        "reject" => Ok(ConcurrencyMode::Reject),
        _ => Err(format!(
            "unknown mode \"{s}\" (expected \"observe\", \"delay\" or \"reject\")"
        )),
    }
}

deserialize_via!(QuotaMode, str, |s| quota_mode(&s));

pub(super) fn quota_mode(s: &str) -> Result<QuotaMode, String> {
    match s {
        "enforce" => Ok(QuotaMode::Enforce),
        "dry-run" => Ok(QuotaMode::DryRun),
        _ => Err(format!(
            "unknown mode \"{s}\" (expected \"enforce\" or \"dry-run\")"
        )),
    }
}

deserialize_via!(LogFormat, str, |s| match s.as_str() {
    "text" => Ok(LogFormat::Text),
    "json" => Ok(LogFormat::Json),
    _ => Err(format!(
        "unknown log format \"{s}\" (expected \"text\" or \"json\")"
    )),
});

deserialize_via!(Source, str, |s| match s.as_str() {
    "api_key" => Ok(Source::ApiKey),
    "proxy_protocol" => Ok(Source::ProxyProtocol),
    "forwarded" => Ok(Source::Forwarded),
    "address" => Ok(Source::Address),
    _ => Err(format!(
        "unknown source \"{s}\" (expected \"api_key\", \"proxy_protocol\", \"forwarded\" or \"address\")"
    )),
});

deserialize_via!(
    ForwardedHeader,
    str,
    |s| match s.to_ascii_lowercase().as_str() {
        "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
        "forwarded" => Ok(ForwardedHeader::Forwarded),
        "x-real-ip" => Ok(ForwardedHeader::XRealIp),
        _ => Err(format!(
            "unknown header \"{s}\" (expected \"X-Forwarded-For\", \"Forwarded\" or \"X-Real-IP\")"
        )),
    }
);

/// A header name the kernel can compare: an HTTP token of at most `HEADER_NAME_MAX` bytes,
/// lowercase.
pub(super) struct HeaderName(pub String);

deserialize_via!(HeaderName, str, |s| {
    use limiter_common::HEADER_NAME_MAX;
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if s.is_empty() || s.len() > HEADER_NAME_MAX || !s.bytes().all(tchar) {
        return Err(format!(
            "\"{s}\" is not a header name (1 to {HEADER_NAME_MAX} bytes of letters, digits \
             and !#$%&'*+-.^_`|~)"
        ));
    }
    Ok(HeaderName(s.to_ascii_lowercase()))
});

/// `daemon.metrics`: an address and port to listen on.
pub(super) struct Listen(pub SocketAddr);

deserialize_via!(Listen, str, |s| s.parse().map(Listen).map_err(|_| format!(
    "{s:?} is not an address:port (e.g. \"127.0.0.1:9464\")"
)));

/// `cluster.redis`: a Redis or Valkey URL (its password never reaches a message).
pub(super) struct RedisUrl(pub String);

deserialize_via!(RedisUrl, str, |url| {
    const SCHEMES: [&str; 5] = [
        "redis://",
        "rediss://",
        "valkey://",
        "valkeys://",
        "redis+unix://",
    ];
    if !SCHEMES.iter().any(|p| url.starts_with(p)) {
        return Err(format!(
            "{:?} is not a Redis URL (redis://host:port)",
            crate::sync::redact_url(&url)
        ));
    }
    Ok(RedisUrl(url))
});

/// `cluster.host_id`: this host's name in the shared counters.
pub(super) struct HostId(pub String);

deserialize_via!(HostId, str, |id| {
    if id.is_empty() || id.len() > 128 || id.contains(char::is_whitespace) {
        return Err("must be 1..=128 characters without whitespace".to_owned());
    }
    Ok(HostId(id))
});

/// An org's name: what the report, the logs and the metrics call it.
pub(super) struct OrgName(pub String);

deserialize_via!(OrgName, str, OrgName::new);

impl OrgName {
    /// `name` if it is a name an org may have.
    pub fn new(name: String) -> Result<Self, String> {
        let allowed = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
        if name.is_empty() || name.len() > MAX_ORG_NAME || !name.bytes().all(allowed) {
            return Err(format!(
                "\"{name}\" is not a valid org name \
             (1 to {MAX_ORG_NAME} characters of A-Z a-z 0-9 . _ -)"
            ));
        }
        if name == RESERVED_ORG_NAME {
            return Err(format!(
                "\"{RESERVED_ORG_NAME}\" is reserved for traffic of unknown orgs"
            ));
        }
        Ok(OrgName(name))
    }
}

/// A CIDR or a bare address (/32, /128); host bits are refused because they usually hide a typo.
pub(super) struct Cidr(pub IpNet);

deserialize_via!(Cidr, str, |s| Cidr::new(&s));

impl Cidr {
    /// The network `s` names, if it is one without host bits.
    pub fn new(s: &str) -> Result<Self, String> {
        let Some(net) = parse_net(s) else {
            return Err(format!(
                "\"{s}\" is not an IPv4 or IPv6 CIDR (like \"192.0.2.0/24\" or \"2001:db8::/32\")"
            ));
        };
        let network = net.trunc();
        if network != net {
            return Err(format!("{s} has host bits set; did you mean {network}?"));
        }
        Ok(Cidr(network))
    }
}

/// `addr/len` or `addr`. Done by hand because ipnet's parser boxes closures on every call, which
/// shows with a million orgs.
pub(super) fn parse_net(s: &str) -> Option<IpNet> {
    let Some((addr, len)) = s.split_once('/') else {
        return s.parse::<IpAddr>().ok().map(IpNet::from);
    };
    let digits_only = !len.is_empty() && len.len() <= 3 && len.bytes().all(|c| c.is_ascii_digit());
    let len = len.parse::<u8>().ok().filter(|_| digits_only)?;
    IpNet::new(addr.parse::<IpAddr>().ok()?, len).ok()
}
