//! Unit tests of the config: positions, messages and limits.

use super::raw::parse_net;
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

#[track_caller]
fn expect_err(text: &str, line: usize, key: &str, needle: &str) -> ConfigError {
    let err = parse(text).expect_err("config should be rejected");
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
    let c = parse(EXAMPLE).unwrap();
    assert_eq!(c.api.ports, vec![8080]);
    assert_eq!(c.api.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
    assert_eq!(c.api.media_get_prefixes, vec!["/media/".to_owned()]);
    assert!(c.api.interfaces.is_empty());
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.daemon, DaemonSettings::default());
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
            pace_rate: 0,
        }
    );
}

#[test]
fn minimal_gets_defaults() {
    let c = parse("[api]\nports=[8080]").unwrap();
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
    let c = parse(text).unwrap();
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
    let err = parse("[api]\nports = [8080]\n\n[limits\n").unwrap_err();
    assert_eq!(err.line(), Some(4), "{err}");
    assert!(err.to_string().starts_with(&format!("{FILE}:4:")), "{err}");
    let err = parse("[api]\nports = [8080]\nports = [1]\n").unwrap_err();
    assert_eq!(err.line(), Some(3), "{err}");
    let err = parse("[api]\nports = [8080]\n[api]\n").unwrap_err();
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
    parse(
        "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\", \"10.1.0.0/16\"]\n",
    )
    .unwrap();
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
    parse("[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"192.0.2.0/24\"]\n[[orgs]]\nname = \"b\"\ncidrs = [\"::c000:200/120\", \"0.0.0.0/32\"]\n").unwrap();
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
    let err = Config::parse_with_max_orgs(&text, Path::new(FILE), 2).unwrap_err();
    assert_eq!((err.line(), err.key()), (Some(9), Some("orgs[2]")), "{err}");
    assert_eq!(MAX_CONFIG_ORGS, 4_194_303);
}

#[test]
fn unusual_syntax() {
    let variants = [
        // Escapes, inline tables, dotted keys, spaces in headers, literal strings, a BOM.
        "[api]\nports = [8080]\ncgroup = \"/sys/fs/cgroup/\\u0075nified\"\n",
        "api = { ports = [8080] }\norgs = [{ name = \"a\", cidrs = [\"10.0.0.0/8\"] }, { name = \"b\", cidrs = [\"10.1.0.0/16\"] }]\n",
        "api.ports = [8080]\n",
        "[ api ]\nports = [ 8_080 ]\n",
        "[api]\nports = [8080]\n[[orgs]]\nname = 'a'\ncidrs = ['''10.0.0.0/8''']\n",
        "\u{feff}[api]\nports = [8080]\n",
        // CRLF, comments, trailing commas, orgs before and after other tables.
        "[api]\r\nports = [8080] # main\r\n\r\n[[orgs]]\r\nname = 'x.y-z_1'\r\ncidrs = [\r\n  \"10.0.0.0/8\", # a\r\n  '11.0.0.0/8',\r\n]\r\n",
        "\t# leading comment\n[[orgs]]\nname=\"a\"\ncidrs=[\"10.0.0.0/8\"]\n[api]\nports=[1,2,]\n[[orgs]]\nname=\"b\"\ncidrs=[\"11.0.0.0/8\"]\n",
        "[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n[api]\nports = [0]\n[[orgs]]\nname = \"a\"\ncidrs = [\"12.0.0.0/8\"]\n",
    ];
    let c = parse(variants[0]).unwrap();
    assert_eq!(*c.api.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
    let err = parse(variants[1]).unwrap_err();
    assert_eq!(err.key(), Some("orgs[1].cidrs[0]"));
    let err = parse(variants[2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{FILE}:1:1: api: write this as a [api] table, not with dotted keys or [api.…] headers"
        )
    );
    assert_eq!(parse(variants[3]).unwrap().api.ports, vec![8080]);
    let c = parse(variants[4]).unwrap();
    assert_eq!(
        c.orgs[0].cidrs,
        vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    assert_eq!(parse(variants[5]).unwrap().api.ports, vec![8080]);
    let c = parse(variants[6]).unwrap();
    assert_eq!(c.orgs[0].name, "x.y-z_1");
    assert_eq!(c.orgs[0].cidrs.len(), 2);
    let c = parse(variants[7]).unwrap();
    assert_eq!(c.api.ports, vec![1, 2]);
    assert_eq!(
        c.orgs.iter().map(|o| o.line).collect::<Vec<_>>(),
        vec![3, 8]
    );
    let err = parse(variants[8]).unwrap_err();
    assert_eq!(
        (err.line(), err.key()),
        (Some(5), Some("api.ports[0]")),
        "{err}"
    );
}

#[test]
fn valid_keys_are_located() {
    let c = parse(
        "[api]\nports = [1]\n\n[limits]\ndaily_requests = 5\nday_start = \"06:00\"\n\
         [daemon]\nmetrics = \"127.0.0.1:9464\"\n",
    )
    .unwrap();
    let at = |p: Pos| (p.line, p.column);
    assert_eq!(at(c.limits.day_start_secs.at()), (6, 13));
    assert_eq!(at(c.daemon.metrics.at()), (8, 11));
    // A key left out points at its table's header; a table left out at the start.
    assert_eq!(at(c.daemon.pin_dir.at()), (7, 1));
    let c = parse("# limiter\n\n[api]\nports = [1]\n").unwrap();
    assert_eq!(at(c.api.cgroup.at()), (3, 1));
    assert_eq!(at(c.limits.day_start_secs.at()), (1, 1));
    assert_eq!(at(c.cluster.at()), (1, 1));
}

/// Keys inside tables, inside arrays and inside arrays of tables are named and placed exactly.
#[test]
fn nested_key_positions() {
    let err = expect_err(
        "[api]\nports = [1]\n[daemon]\nmetrics = \"9464\"\n",
        4,
        "daemon.metrics",
        "\"9464\" is not an address:port (e.g. \"127.0.0.1:9464\")",
    );
    assert_eq!(err.column(), Some(11));
    let err = expect_err(
        "[api]\nports = [1, 2,\n         70000]\n",
        3,
        "api.ports[2]",
        "70000 is not a port (ports are 1 to 65535)",
    );
    assert_eq!(err.column(), Some(10));
    let err = expect_err(
        "[api]\nports = [1]\ninterfaces = [\"eth0\", \"a/b\"]\n",
        3,
        "api.interfaces[1]",
        "\"a/b\" is not an interface name",
    );
    assert_eq!(err.column(), Some(23));
    let err = expect_err(
        "[api]\nports = [1]\n[cluster]\nredis = \"redis://h:6379\"\nsync_interval_ms = 5\n",
        5,
        "cluster.sync_interval_ms",
        "must be at least 10",
    );
    assert_eq!(err.column(), Some(20));
    let err = expect_err(
        "[api]\nports = [1]\n[cluster]\nredis = \"http://user:secret@h\"\n",
        4,
        "cluster.redis",
        "is not a Redis URL (redis://host:port)",
    );
    assert!(!err.to_string().contains("secret"), "{err}");
    let err = expect_err(
        "[api]\nports = [1]\n[cluster]\nhost_id = \"a\"\n",
        3,
        "cluster.redis",
        "missing required key",
    );
    assert_eq!(err.column(), Some(1));
}

/// `[[orgs]]` entries are counted from 0 in file order, wherever other tables stand between.
#[test]
fn arrays_of_tables() {
    let text = "[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\n[api]\nports = [1]\n\n\
                [[orgs]]\nname = \"b\"\ncidrs = [\"11.0.0.0/8\"]\n[limits]\ndaily_requests = 9\n\
                [[orgs]]\nname = \"c\"\n  daily_requests = 0\ncidrs = [\"12.0.0.0/8\"]\n";
    let err = expect_err(text, 15, "orgs[2].daily_requests", "must be at least 1");
    assert_eq!(err.column(), Some(20));
    let c = parse(&text.replace("daily_requests = 0", "daily_requests = 7")).unwrap();
    let names: Vec<_> = c.orgs.iter().map(|o| (o.name.as_str(), o.line)).collect();
    assert_eq!(names, vec![("a", 2), ("b", 9), ("c", 14)]);
    assert_eq!(c.orgs[2].daily_requests, Some(7));
    assert_eq!(c.limits.daily_requests, 9);
    let err = expect_err(
        "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n  [[orgs]]\nname = \"b\"\n",
        7,
        "orgs[1].cidrs",
        "must list at least one CIDR",
    );
    assert_eq!(err.column(), Some(8));
    expect_err(
        "orgs = 1\n",
        1,
        "orgs",
        "expected an array of tables ([[orgs]]), found an integer",
    );
    expect_err(
        "orgs = [1]\n",
        1,
        "orgs[0]",
        "expected a table, found an integer",
    );
}

#[test]
fn unknown_keys_name_the_known_ones() {
    let cases = [
        (
            "[api]\nports = [1]\n bogus = 1\n",
            3,
            2,
            "api.bogus",
            "ports, cgroup, media_get_prefixes, interfaces, netns, orgs_file, identify_by, trusted_proxies, forwarded_header, api_key_header, api_keys_file",
        ),
        (
            "[api]\nports = [1]\n[apis]\n",
            3,
            2,
            "apis",
            "api, limits, daemon, cluster, orgs",
        ),
        (
            "[api]\nports = [1]\n[limits]\nday = 1\n",
            4,
            1,
            "limits.day",
            "daily_requests, concurrent_connections, concurrency_mode, quota_mode, day_start, pace_over_quota, pace_rate",
        ),
        (
            "[api]\nports = [1]\n[daemon]\nsocket = 1\n",
            4,
            1,
            "daemon.socket",
            "pin_dir, state_dir, log_format, control_socket, snapshot_interval_secs, metrics",
        ),
        (
            "[api]\nports = [1]\n[cluster]\nredis = \"redis://h\"\nurl = 1\n",
            5,
            1,
            "cluster.url",
            "redis, host_id, sync_interval_ms",
        ),
        (
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\nmode = 1\n",
            6,
            1,
            "orgs[0].mode",
            "name, cidrs, daily_requests, concurrent_connections, concurrency_mode, quota_mode, pace_over_quota",
        ),
    ];
    for (text, line, column, key, known) in cases {
        let err = parse(text).expect_err(text);
        assert_eq!(
            err.to_string(),
            format!("{FILE}:{line}:{column}: {key}: unknown key (expected one of: {known})")
        );
    }
}

#[test]
fn wrong_types_say_what_was_found() {
    let cases = [
        (
            "[api]\nports = [1]\n[daemon]\npin_dir = 5\n",
            "daemon.pin_dir",
            "expected a string, found an integer",
        ),
        (
            "[api]\nports = [[1]]\n",
            "api.ports[0]",
            "expected an integer, found an array",
        ),
        (
            "[api]\nports = [1]\n[limits]\nquota_mode = true\n",
            "limits.quota_mode",
            "expected a string, found a boolean",
        ),
        (
            "[api]\nports = [1]\ncgroup = { a = 1 }\n",
            "api.cgroup",
            "expected a string, found a table",
        ),
        (
            "[api]\nports = [1]\n[cluster]\nredis = 1979-05-27\n",
            "cluster.redis",
            "expected a string, found a date or time",
        ),
        (
            "limits = []\n[api]\nports = [1]\n",
            "limits",
            "expected a table, found an array",
        ),
        (
            "limits = 07:00:00\n[api]\nports = [1]\n",
            "limits",
            "expected a table, found a date or time",
        ),
        (
            "[api]\nports = [18446744073709551615]\n",
            "api.ports[0]",
            "18446744073709551615 is too large",
        ),
        (
            "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = \"10.0.0.0/8\"\n",
            "orgs[0].cidrs",
            "expected an array, found a string",
        ),
    ];
    for (text, key, message) in cases {
        let err = parse(text).expect_err(text);
        assert_eq!(
            (err.key(), err.message().as_str()),
            (Some(key), message),
            "{text}"
        );
    }
}

#[test]
fn duplicate_org_names_point_at_the_second() {
    let text = "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\
                [[orgs]]\nname = \"b\"\ncidrs = [\"11.0.0.0/8\"]\n\
                [[orgs]]\nname   = \"b\"\ncidrs = [\"12.0.0.0/8\"]\n";
    let err = parse(text).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{FILE}:10:10: orgs[2].name: org name \"b\" is already used by orgs[1] (line 7)")
    );
}

/// The messages the README shows, word for word.
#[test]
fn readme_messages() {
    let shown = |text: &str| parse(text).unwrap_err().to_string();
    assert_eq!(
        shown("[api]\nports = [0]\n"),
        format!("{FILE}:2:10: api.ports[0]: port 0 is not allowed (ports are 1 to 65535)")
    );
    let overlap = "[api]\nports = [8080]\n\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\n\
                   [[orgs]]\nname = \"b\"\ncidrs = [\"10.1.0.0/16\"]\n";
    assert_eq!(
        shown(overlap),
        format!(
            "{FILE}:10:10: orgs[1].cidrs[0]: 10.1.0.0/16 (org \"b\") overlaps 10.0.0.0/8 of org \"a\" (line 6)"
        )
    );
    assert!(shown("[api]\nports = [1]\nbogus = 1\n").ends_with(
        ": api.bogus: unknown key (expected one of: ports, cgroup, media_get_prefixes, interfaces, netns, orgs_file, identify_by, trusted_proxies, forwarded_header, api_key_header, api_keys_file)"
    ));
    let twice = "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\
                 [[orgs]]\nname = \"a\"\ncidrs = [\"11.0.0.0/8\"]\n";
    assert!(
        shown(twice)
            .ends_with(": orgs[1].name: org name \"a\" is already used by orgs[0] (line 4)")
    );
    let host_bits = "[api]\nports = [1]\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.1/8\"]\n";
    assert!(
        shown(host_bits).ends_with(
            ": orgs[0].cidrs[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        )
    );
    assert!(
        shown("[api]\nports = [1]\n[limits]\nday_start = \"24:00\"\n")
            .contains(": limits.day_start: \"24:00\" is not a time of day; ")
    );
}

/// A reload refuses what only a restart applies, naming the first change where the new file
/// sets it, and lets everything else through.
#[test]
fn reload_refuses_restart_only_changes() {
    let base = "[api]\nports = [8080]\n\n[limits]\ndaily_requests = 5\n";
    let old = parse(base).unwrap();
    let file = Path::new(FILE);
    let reloadable = parse(
        "[api]\nports = [80, 443]\nmedia_get_prefixes = []\n[limits]\ndaily_requests = 6\n\
         concurrency_mode = \"reject\"\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    old.sections()
        .check_reload(&reloadable.sections(), file)
        .unwrap();

    let mut text = base.to_owned();
    for _ in 0..10 {
        text.insert(0, '\n');
    }
    text.push_str("day_start = \"06:00\"\n");
    let new = parse(&text).unwrap();
    let err = old
        .sections()
        .check_reload(&new.sections(), file)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{FILE}:16:13: limits.day_start: changed: takes effect on a restart \
             (`systemctl restart limiter`), not a reload"
        )
    );

    // state_dir moves the default control socket with it; cluster is one setting.
    let moved = parse(&format!(
        "{base}[daemon]\nstate_dir = \"/run/limiter\"\n[cluster]\nredis = \"redis://h:6379\"\n"
    ))
    .unwrap();
    let keys: Vec<_> = old
        .sections()
        .restart_only_changes(&moved.sections())
        .iter()
        .map(|c| (c.key, c.at.line, c.at.column))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("daemon.state_dir", 7, 13),
            ("daemon.control_socket", 6, 1),
            ("cluster", 8, 1),
        ]
    );
    let err = old
        .sections()
        .check_reload(&moved.sections(), file)
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("not a reload (also changed: daemon.control_socket, cluster)"),
        "{err}"
    );
    for key in [
        "cgroup = \"/sys/fs/cgroup/x\"",
        "interfaces = [\"lo\"]",
        "netns = \"/run/netns/a\"",
    ] {
        let new = parse(&base.replace("[limits]", &format!("{key}\n[limits]"))).unwrap();
        let changed = old.sections().restart_only_changes(&new.sections());
        assert_eq!(changed.len(), 1, "{key}");
        assert_eq!(changed[0].at.line, 4, "{key}");
    }
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
        let c = parse(&render(&orgs)).unwrap();
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
        let err = parse(&render(&orgs)).unwrap_err();
        let shown = err.to_string();
        let victim_name = &orgs[victim].0;
        let intruder_name = &orgs[intruder].0;
        prop_assert!(shown.contains(&format!("\"{victim_name}\"")), "{}", shown);
        prop_assert!(shown.contains(&format!("\"{intruder_name}\"")), "{}", shown);
        let later = victim.max(intruder);
        let key_prefix = format!("orgs[{later}].cidrs[");
        prop_assert!(err.key().is_some_and(|k| k.starts_with(&key_prefix)), "{}", shown);
    }

    /// However a config is laid out (blanks, comments, CRLF, trailing commas, arrays over
    /// several lines), it means what its plainest layout means.
    #[test]
    fn reformatted_configs_parse_alike(
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
        second in 1u8..=255,
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
             [[orgs]]{nl}{}name = \"b\"{nl}cidrs = [\"{second}.{}.0.0/16\"]{nl}",
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], port % 256
        );
        let plain = format!(
            "[api]\nports = [{port}, 8080]\n[limits]\nday_start = \"{day}\"\n\
             [[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n\
             [[orgs]]\nname = \"b\"\ncidrs = [\"{second}.{}.0.0/16\"]\n",
            port % 256
        );
        match (parse(&text), parse(&plain)) {
            (Ok(mut a), Ok(mut b)) => {
                for org in a.orgs.iter_mut().chain(b.orgs.iter_mut()) {
                    org.line = 0;
                }
                prop_assert_eq!(a, b);
            }
            (Err(a), Err(b)) => {
                // The same problem at the same key; lines quoted in the message may differ.
                let problem = |e: &ConfigError| e.message().split(" (line").next().map(str::to_owned);
                prop_assert_eq!((a.key(), problem(&a)), (b.key(), problem(&b)));
            }
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
    }
}

/// The whole message of a config that must be refused.
#[track_caller]
fn error_text(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn identification_defaults_to_the_address() {
    let c = parse("[api]\nports = [1]\n").unwrap();
    assert_eq!(c.api.identify, Identify::default());
    assert_eq!(c.api.identify.by, [Source::Address]);
    assert_eq!(c.api.identify.api_key_header, "x-api-key");
    assert_eq!(
        c.api.identify.forwarded_header,
        ForwardedHeader::XForwardedFor
    );
    assert!(c.keys.is_none());
}

#[test]
fn identification_settings() {
    let c = parse(
        "[api]\nports = [1]\nidentify_by = [\"proxy_protocol\", \"forwarded\", \"address\"]\n\
         trusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]\n\
         forwarded_header = \"FORWARDED\"\napi_key_header = \"Authorization\"\n",
    )
    .unwrap();
    let id = &c.api.identify;
    assert_eq!(
        id.by,
        [Source::ProxyProtocol, Source::Forwarded, Source::Address]
    );
    let nets: Vec<String> = id.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);
    assert_eq!(id.forwarded_header, ForwardedHeader::Forwarded);
    assert_eq!(id.api_key_header, "authorization");
    assert!(id.key_is_authorization());
    let c = parse("[api]\nports = [1]\napi_key_header = \"X-Tenant-Token\"\n").unwrap();
    assert_eq!(c.api.identify.api_key_header, "x-tenant-token");
    assert!(!c.api.identify.key_is_authorization());
}

#[test]
fn identification_errors_name_line_column_and_key() {
    let t = |rest: &str| format!("[api]\nports = [1]\n{rest}");
    let long = "x".repeat(limiter_common::HEADER_NAME_MAX + 1);
    let cases = [
        (
            t("identify_by = [\"address\", \"cookie\"]\n"),
            "3:27: api.identify_by[1]: unknown source \"cookie\" (expected \"api_key\", \"proxy_protocol\", \"forwarded\" or \"address\")",
        ),
        (
            t("identify_by = [\"address\", \"address\"]\n"),
            "3:27: api.identify_by[1]: \"address\" is listed twice (also api.identify_by[0])",
        ),
        (
            t("identify_by = []\n"),
            "3:15: api.identify_by: must list at least one source (\"api_key\", \"proxy_protocol\", \"forwarded\" or \"address\")",
        ),
        (
            t("identify_by = [\"address\", \"proxy_protocol\"]\n"),
            "3:27: api.identify_by[1]: \"proxy_protocol\" believes headers only from api.trusted_proxies: list the CIDRs of the proxies or load balancers in front of the API there",
        ),
        (
            t("identify_by = [\"forwarded\"]\ntrusted_proxies = []\n"),
            "3:16: api.identify_by[0]: \"forwarded\" believes headers only from api.trusted_proxies: list the CIDRs of the proxies or load balancers in front of the API there",
        ),
        (
            t("identify_by = [\"api_key\"]\n"),
            "3:16: api.identify_by[0]: \"api_key\" needs api.api_keys_file, the file of \"ORG KEY\" lines",
        ),
        (
            t("trusted_proxies = [\"10.0.0.1/8\"]\n"),
            "3:20: api.trusted_proxies[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            t("trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n"),
            "3:34: api.trusted_proxies[1]: 10.0.0.0/8 is listed twice (also api.trusted_proxies[0])",
        ),
        (
            t("forwarded_header = \"X-Client-IP\"\n"),
            "3:20: api.forwarded_header: unknown header \"X-Client-IP\" (expected \"X-Forwarded-For\", \"Forwarded\" or \"X-Real-IP\")",
        ),
        (
            t("api_key_header = \"X API Key\"\n"),
            "3:18: api.api_key_header: \"X API Key\" is not a header name (1 to 32 bytes of letters, digits and !#$%&'*+-.^_`|~)",
        ),
        (
            t(&format!("api_key_header = \"{long}\"\n")),
            &format!(
                "3:18: api.api_key_header: \"{long}\" is not a header name (1 to 32 bytes of letters, digits and !#$%&'*+-.^_`|~)"
            ),
        ),
        (
            t("api_keys_file = \"keys\"\n"),
            "3:17: api.api_keys_file: \"keys\" is not an absolute path",
        ),
        (
            "[api]\nports = [1]\n[[orgs]]\nname = \"x\"\n".to_owned(),
            "4:8: orgs[0].cidrs: must list at least one CIDR: api.identify_by does not list \"api_key\", so nothing else identifies org \"x\"",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(error_text(&text), format!("{FILE}:{want}"), "{text}");
    }
    let many: Vec<String> = (0..=limiter_common::MAX_TRUSTED_PROXIES)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    assert_eq!(
        error_text(&t(&format!("trusted_proxies = [{}]\n", many.join(", ")))),
        format!(
            "{FILE}:3:19: api.trusted_proxies: at most {} CIDRs are supported (the kernel's table)",
            limiter_common::MAX_TRUSTED_PROXIES
        )
    );
}

/// Pacing is opt-in, per org or for all, and needs the gate's interfaces to mean anything.
#[test]
fn pacing_over_quota() {
    let base = "[api]\nports = [1]\ninterfaces = [\"eth0\"]\n[limits]\n";
    let orgs = "[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.1\"]\n\
                [[orgs]]\nname = \"b\"\ncidrs = [\"10.0.0.2\"]\npace_over_quota = true\n";
    let c = parse(&format!("{base}{orgs}")).unwrap();
    assert!(!c.limits.pace_over_quota);
    assert_eq!(c.limits.pace_rate, DEFAULT_PACE_RATE);
    assert_eq!(c.limits_for(&c.orgs[0]).pace_rate, 0);
    assert_eq!(c.limits_for(&c.orgs[1]).pace_rate, DEFAULT_PACE_RATE);
    let c = parse(&format!(
        "{base}pace_over_quota = true\npace_rate = 3\n{}",
        orgs.replace("pace_over_quota = true", "pace_over_quota = false")
    ))
    .unwrap();
    assert_eq!(c.limits_for(&c.orgs[0]).pace_rate, 3);
    assert_eq!(c.limits_for(&c.orgs[1]).pace_rate, 0);
    // No interface, no gate: nothing is paced.
    let c =
        parse(&format!("{base}pace_over_quota = true\n").replace("interfaces = [\"eth0\"]\n", ""))
            .unwrap();
    assert_eq!(c.default_limits().pace_rate, 0);
    expect_err(
        &format!("{base}pace_rate = 0\n"),
        5,
        "limits.pace_rate",
        "must be at least 1",
    );
    expect_err(
        &format!("{base}pace_over_quota = \"yes\"\n"),
        5,
        "limits.pace_over_quota",
        "expected true or false, found a string",
    );
}
