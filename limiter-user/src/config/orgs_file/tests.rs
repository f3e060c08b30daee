//! The orgs file: its lines, each error's position and message, and that it gives the same
//! orgs as `[[orgs]]` tables.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use proptest::prelude::*;

use crate::config::{ConcurrencyMode, Config, ConfigError, Org, QuotaMode};

const CONFIG: &str = "/etc/limiter/limiter.toml";

/// Writes `orgs` as the orgs file of a config made of `[api]` and then `rest`.
fn load(rest: &str, orgs: &str) -> (tempfile::TempDir, PathBuf, Result<Config, ConfigError>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orgs");
    std::fs::write(&path, orgs).expect("write orgs file");
    let text = format!(
        "[api]\nports = [1]\norgs_file = \"{}\"\n{rest}",
        path.display()
    );
    let cfg = Config::parse(&text, Path::new(CONFIG));
    (dir, path, cfg)
}

/// The error of an orgs file that must be refused, as displayed, with `FILE` for its path.
fn error(rest: &str, orgs: &str) -> String {
    let (_dir, path, cfg) = load(rest, orgs);
    let err = cfg.expect_err("the orgs file should be refused");
    err.to_string().replace(&path.display().to_string(), "FILE")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

#[test]
fn lines_comments_and_options() {
    let orgs = "# name cidrs options\n\
                \n\
                acme 192.0.2.0/24,2001:db8::1 daily_requests=10000   # big\r\n\
                \t  beta 10.0.0.1 concurrent_connections=7 concurrency_mode=reject quota_mode=dry-run pace_over_quota=true\n\
                gamma 10.1.0.0/16";
    let (_dir, path, cfg) = load("", orgs);
    let cfg = cfg.expect("valid orgs file");
    assert_eq!(cfg.api.orgs_file.as_deref(), Some(path.as_path()));
    let expected = vec![
        Org {
            name: "acme".into(),
            cidrs: vec![net("192.0.2.0/24"), net("2001:db8::1/128")],
            daily_requests: Some(10000),
            concurrent_connections: None,
            concurrency_mode: None,
            quota_mode: None,
            pace_over_quota: None,
            line: 3,
        },
        Org {
            name: "beta".into(),
            cidrs: vec![net("10.0.0.1/32")],
            daily_requests: None,
            concurrent_connections: Some(7),
            concurrency_mode: Some(ConcurrencyMode::Reject),
            quota_mode: Some(QuotaMode::DryRun),
            pace_over_quota: Some(true),
            line: 4,
        },
        Org {
            name: "gamma".into(),
            cidrs: vec![net("10.1.0.0/16")],
            daily_requests: None,
            concurrent_connections: None,
            concurrency_mode: None,
            quota_mode: None,
            pace_over_quota: None,
            line: 5,
        },
    ];
    assert_eq!(cfg.orgs, expected);
}

#[test]
fn orgs_of_both_sources_are_merged() {
    let toml = "[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n";
    let (_dir, _path, cfg) = load(toml, "b 11.0.0.0/8\n");
    let names: Vec<String> = cfg
        .expect("valid")
        .orgs
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn empty_file_has_no_orgs() {
    let (_dir, _path, cfg) = load("", "# none yet\n\n");
    assert!(cfg.expect("valid").orgs.is_empty());
}

#[test]
fn errors_name_file_line_column_and_key() {
    let cases = [
        (
            "ok 10.0.0.0/8\na/b 11.0.0.0/8\n",
            "FILE:2:1: name: \"a/b\" is not a valid org name (1 to 64 characters of A-Z a-z 0-9 . _ -)",
        ),
        (
            "  unmapped 10.0.0.0/8\n",
            "FILE:1:3: name: \"unmapped\" is reserved for traffic of unknown orgs",
        ),
        (
            "acme\n",
            "FILE:1:1: cidrs: must list at least one CIDR: api.identify_by does not list \"api_key\", so nothing else identifies org \"acme\"",
        ),
        (
            "acme 10.0.0.0/8,10.1.0.1/16\n",
            "FILE:1:17: cidrs[1]: 10.1.0.1/16 has host bits set; did you mean 10.1.0.0/16?",
        ),
        (
            "acme 10.0.0.0/8,\n",
            "FILE:1:17: cidrs[1]: \"\" is not an IPv4 or IPv6 CIDR (like \"192.0.2.0/24\" or \"2001:db8::/32\")",
        ),
        (
            "acme 10.0.0.0/8 daily\n",
            "FILE:1:17: daily: expected key=value (one of: daily_requests, concurrent_connections, concurrency_mode, quota_mode, pace_over_quota)",
        ),
        (
            "acme 10.0.0.0/8 daily=5\n",
            "FILE:1:17: daily: unknown key (expected one of: daily_requests, concurrent_connections, concurrency_mode, quota_mode, pace_over_quota)",
        ),
        (
            "acme 10.0.0.0/8 daily_requests=0\n",
            "FILE:1:32: daily_requests: must be at least 1",
        ),
        (
            "acme 10.0.0.0/8 daily_requests=ten\n",
            "FILE:1:32: daily_requests: expected an integer, found \"ten\"",
        ),
        (
            "acme 10.0.0.0/8 concurrent_connections=4294967296\n",
            "FILE:1:40: concurrent_connections: must be at most 4294967295",
        ),
        (
            "acme 10.0.0.0/8 concurrency_mode=fast\n",
            "FILE:1:34: concurrency_mode: unknown mode \"fast\" (expected \"observe\", \"delay\" or \"reject\")",
        ),
        (
            "acme 10.0.0.0/8 quota_mode=soft\n",
            "FILE:1:28: quota_mode: unknown mode \"soft\" (expected \"enforce\" or \"dry-run\")",
        ),
        (
            "acme 10.0.0.0/8 quota_mode=enforce quota_mode=dry-run\n",
            "FILE:1:36: quota_mode: set twice on this line",
        ),
        (
            "acme 10.0.0.0/8\n# gap\nacme 11.0.0.0/8\n",
            "FILE:3:1: name: org name \"acme\" is already used at line 1",
        ),
        (
            "acme 10.0.0.0/8,11.0.0.0/8,10.0.0.0/8\n",
            "FILE:1:28: cidrs[2]: 10.0.0.0/8 is listed twice (first at line 1)",
        ),
        (
            "big 10.0.0.0/8\nsmall 12.0.0.0/8,10.1.0.0/16\n",
            "FILE:2:18: cidrs[1]: 10.1.0.0/16 (org \"small\") overlaps 10.0.0.0/8 of org \"big\" (line 1)",
        ),
    ];
    for (orgs, expected) in cases {
        assert_eq!(error("", orgs), expected, "orgs file {orgs:?}");
    }
}

#[test]
fn duplicates_across_the_config_and_the_file() {
    let toml = "[[orgs]]\nname = \"acme\"\ncidrs = [\"10.0.0.0/8\"]\n";
    assert_eq!(
        error(toml, "beta 11.0.0.0/8\nacme 12.0.0.0/8\n"),
        format!("FILE:2:1: name: org name \"acme\" is already used by orgs[0] ({CONFIG}:5)")
    );
    assert_eq!(
        error(toml, "beta 11.0.0.0/8\nsub 10.9.0.0/16\n"),
        format!(
            "FILE:2:5: cidrs[0]: 10.9.0.0/16 (org \"sub\") overlaps 10.0.0.0/8 \
             of org \"acme\" ({CONFIG}:6)"
        )
    );
    assert_eq!(
        error(toml, "same 10.0.0.0/8\n"),
        format!(
            "FILE:1:6: cidrs[0]: 10.0.0.0/8 (org \"same\") is the same network as 10.0.0.0/8 \
             of org \"acme\" ({CONFIG}:6)"
        )
    );
}

#[test]
fn unreadable_or_relative_path() {
    let text = "[api]\nports = [1]\norgs_file = \"/nonexistent/limiter/orgs\"\n";
    let err = Config::parse(text, Path::new(CONFIG)).expect_err("missing file");
    assert_eq!(
        err.to_string(),
        format!(
            "{CONFIG}:3:13: api.orgs_file: cannot read /nonexistent/limiter/orgs: \
             No such file or directory (os error 2)"
        )
    );
    let text = "[api]\nports = [1]\norgs_file = \"orgs\"\n";
    let err = Config::parse(text, Path::new(CONFIG)).expect_err("relative path");
    assert_eq!(
        err.to_string(),
        format!("{CONFIG}:3:13: api.orgs_file: \"orgs\" is not an absolute path")
    );
}

#[test]
fn too_many_orgs_counts_both_sources() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orgs");
    std::fs::write(&path, "b 11.0.0.0/8\nc 12.0.0.0/8\n").expect("write");
    let text = format!(
        "[api]\nports = [1]\norgs_file = \"{}\"\n[[orgs]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n",
        path.display()
    );
    assert!(Config::parse_with_max_orgs(&text, Path::new(CONFIG), 3).is_ok());
    let err = Config::parse_with_max_orgs(&text, Path::new(CONFIG), 2).expect_err("3 > 2");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2:1: name: too many orgs: at most 2 are allowed (with those of [[orgs]])",
            path.display()
        )
    );
}

/// One org as the proptest writes it.
#[derive(Debug, Clone)]
struct Listed {
    cidrs: Vec<IpNet>,
    daily_requests: Option<u64>,
    concurrent_connections: Option<u32>,
    concurrency_mode: Option<&'static str>,
    quota_mode: Option<&'static str>,
}

fn listed() -> impl Strategy<Value = Listed> {
    (
        prop::collection::vec(any::<bool>(), 1..4),
        // TOML integers stop at i64::MAX; so do the orgs file's.
        proptest::option::of(1u64..=i64::MAX as u64),
        proptest::option::of(1u32..=u32::MAX),
        proptest::option::of(prop::sample::select(vec!["observe", "delay", "reject"])),
        proptest::option::of(prop::sample::select(vec!["enforce", "dry-run"])),
    )
        .prop_map(|(v6, daily, conns, mode, quota)| Listed {
            // Placeholders: distinct networks are given once the org's index is known.
            cidrs: v6
                .into_iter()
                .map(|v6| if v6 { net("::/128") } else { net("0.0.0.0/32") })
                .collect(),
            daily_requests: daily,
            concurrent_connections: conns,
            concurrency_mode: mode,
            quota_mode: quota,
        })
}

/// Gives every CIDR of `orgs` its own network, so the list is valid.
fn distinct(mut orgs: Vec<Listed>) -> Vec<Listed> {
    let mut n: u32 = 0;
    for org in &mut orgs {
        for cidr in &mut org.cidrs {
            n += 1;
            *cidr = match cidr {
                IpNet::V4(_) => net(&format!("10.{}.{}.0/24", n >> 8, n & 0xff)),
                IpNet::V6(_) => net(&format!("2001:db8:{n:x}::/48")),
            };
        }
    }
    orgs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A list written as an orgs file and as `[[orgs]]` tables gives the same orgs (but for the
    /// line each was written on).
    #[test]
    fn same_orgs_as_toml_tables(orgs in prop::collection::vec(listed(), 0..20).prop_map(distinct)) {
        let mut file = String::new();
        let mut toml = String::from("[api]\nports = [1]\n");
        for (i, org) in orgs.iter().enumerate() {
            let cidrs: Vec<String> = org.cidrs.iter().map(ToString::to_string).collect();
            write!(file, "org-{i} {}", cidrs.join(",")).unwrap();
            write!(toml, "[[orgs]]\nname = \"org-{i}\"\ncidrs = {cidrs:?}\n").unwrap();
            if let Some(v) = org.daily_requests {
                write!(file, " daily_requests={v}").unwrap();
                writeln!(toml, "daily_requests = {v}").unwrap();
            }
            if let Some(v) = org.concurrent_connections {
                write!(file, " concurrent_connections={v}").unwrap();
                writeln!(toml, "concurrent_connections = {v}").unwrap();
            }
            if let Some(v) = org.concurrency_mode {
                write!(file, " concurrency_mode={v}").unwrap();
                writeln!(toml, "concurrency_mode = \"{v}\"").unwrap();
            }
            if let Some(v) = org.quota_mode {
                write!(file, " quota_mode={v}").unwrap();
                writeln!(toml, "quota_mode = \"{v}\"").unwrap();
            }
            file.push('\n');
        }
        let without_lines = |c: Config| {
            c.orgs.into_iter().map(|o| Org { line: 0, ..o }).collect::<Vec<_>>()
        };
        let from_toml = Config::parse(&toml, Path::new(CONFIG));
        let (_dir, _path, from_file) = load("", &file);
        match (from_toml, from_file) {
            (Ok(t), Ok(f)) => prop_assert_eq!(without_lines(t), without_lines(f)),
            (t, f) => prop_assert!(false, "toml: {:?}\nfile: {:?}", t.err(), f.err()),
        }
    }
}
