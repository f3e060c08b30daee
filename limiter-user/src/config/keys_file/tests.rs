//! The keys file: its lines, each error's position and message, its mode, the secret and what
//! the orgs need of it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::{Config, Source};
use crate::secret;

const CONFIG: &str = "/etc/limiter/limiter.toml";

/// A config of orgs `acme` (10.0.0.0/24), `globex` (no CIDRs) and whatever `orgs` adds, that
/// knows orgs by `identify_by`, with `keys` as its keys file (mode `mode`); the state directory
/// is in the same temporary directory.
struct Case {
    dir: tempfile::TempDir,
    keys: PathBuf,
}

impl Case {
    fn new(keys: &str, mode: u32) -> Case {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-keys");
        std::fs::write(&path, keys).expect("writing the keys file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        Case { dir, keys: path }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn text(&self, identify_by: &str, orgs: &str) -> String {
        format!(
            "[api]\nports = [1]\nidentify_by = {identify_by}\ntrusted_proxies = [\"10.9.0.0/16\"]\n\
             api_keys_file = \"{}\"\n[daemon]\nstate_dir = \"{}\"\n\
             [[orgs]]\nname = \"acme\"\ncidrs = [\"10.0.0.0/24\"]\n\
             [[orgs]]\nname = \"globex\"\n{orgs}",
            self.keys.display(),
            self.state().display()
        )
    }

    fn parse_with(&self, identify_by: &str, orgs: &str) -> Result<Config, ConfigError> {
        Config::parse(&self.text(identify_by, orgs), Path::new(CONFIG))
    }

    fn parse(&self) -> Result<Config, ConfigError> {
        self.parse_with("[\"api_key\", \"address\"]", "")
    }

    /// The error, with `KEYS` for the keys file's path.
    fn error(&self) -> String {
        let e = self.parse().expect_err("the keys file should be refused");
        e.to_string()
            .replace(&self.keys.display().to_string(), "KEYS")
    }
}

#[test]
fn lines_comments_and_many_keys_per_org() {
    let c = Case::new(
        "# ORG KEY\n\nacme k-1\r\n  acme\tk-2   \nglobex Zm9vYmFy!#$%&'*+\n# acme k-3\n",
        0o600,
    );
    let cfg = c.parse().expect("a valid keys file");
    let keys = cfg
        .keys
        .expect("keys are read when identify_by lists api_key");
    // No secret was kept yet: a new one, and why.
    let why = keys.secret_is_new.as_deref().expect("a new secret");
    assert!(why.contains("does not exist"), "{why}");
    let mut got: Vec<(u64, u32, u32)> = keys
        .entries
        .iter()
        .map(|e| (e.digest, e.org, e.line))
        .collect();
    let s = keys.secret;
    let mut want = vec![
        (s.digest(b"k-1"), 0, 3),
        (s.digest(b"k-2"), 0, 4),
        (s.digest(b"Zm9vYmFy!#$%&'*+"), 1, 5),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "sorted by digest");
    got.dedup_by_key(|e| e.0);
    assert_eq!(got.len(), 3);
    assert_eq!(cfg.orgs[1].name, "globex");
    assert!(
        cfg.orgs[1].cidrs.is_empty(),
        "globex is known by its key alone"
    );
}

#[test]
fn the_kept_secret_is_used_and_parsing_never_writes_it() {
    let c = Case::new("acme k-1\nglobex k-2\n", 0o600);
    c.parse().expect("valid");
    assert!(!secret::path(&c.state()).exists(), "a parse only reads");
    let kept = secret::KeySecret::generate().expect("random bytes");
    secret::write(&c.state(), &kept).expect("keeping the secret");
    let keys = c.parse().expect("valid").keys.expect("keys");
    assert_eq!((keys.secret, keys.secret_is_new), (kept, None));
    let first = keys.entries.iter().find(|e| e.line == 1).expect("line 1");
    assert_eq!(first.digest, kept.digest(b"k-1"));
}

#[test]
fn errors_name_file_line_column_and_field() {
    let long = "k".repeat(limiter_common::API_KEY_MAX + 1);
    let max = "k".repeat(limiter_common::API_KEY_MAX);
    let cases = [
        (
            "acme k-1\nnobody k-2\n".to_owned(),
            "KEYS:2:1: org: no org \"nobody\" in the config",
        ),
        (
            "acme\n".to_owned(),
            "KEYS:1:5: key: missing: each line is ORG KEY",
        ),
        (
            format!("acme {long}\n"),
            "KEYS:1:6: key: the key is 129 bytes long; the kernel looks up keys of at most 128 bytes",
        ),
        (
            "acme ab\u{7f}cd\n".to_owned(),
            "KEYS:1:8: key: byte 0x7f is not visible ASCII (keys are bytes 0x21 to 0x7e)",
        ),
        (
            "acme clé\n".to_owned(),
            "KEYS:1:8: key: byte 0xc3 is not visible ASCII (keys are bytes 0x21 to 0x7e)",
        ),
        (
            "acme k-1 # the first\n".to_owned(),
            "KEYS:1:10: key: unexpected text after the key (each line is ORG KEY; comments take a whole line)",
        ),
        (
            "acme k-1\nglobex k-2\n\nglobex k-1\n".to_owned(),
            "KEYS:4:8: key: this key is already listed at line 1 (org \"acme\")",
        ),
        (
            format!("acme {max}\nacme   {max}\n"),
            "KEYS:2:8: key: this key is already listed at line 1 (org \"acme\")",
        ),
    ];
    for (keys, want) in cases {
        let c = Case::new(&keys, 0o600);
        assert_eq!(c.error(), want, "{keys:?}");
    }
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    for mode in [0o640, 0o604, 0o644] {
        let c = Case::new("acme k-1\nglobex k-2\n", mode);
        let e = c.parse().expect_err("readable by others");
        let want = format!(
            "{CONFIG}:5:17: api.api_keys_file: KEYS has mode {mode:04o}: API keys must not be \
             readable by group or others (chmod 600 KEYS)"
        );
        assert_eq!(
            e.to_string().replace(&c.keys.display().to_string(), "KEYS"),
            want
        );
    }
    let c = Case::new("acme k-1\nglobex k-2\n", 0o400);
    assert!(c.parse().is_ok(), "read-only for the owner is fine");
    std::fs::remove_file(&c.keys).expect("rm");
    let e = c.parse().expect_err("missing").to_string();
    assert!(
        e.starts_with(&format!("{CONFIG}:5:17: api.api_keys_file: cannot read ")),
        "{e}"
    );
}

#[test]
fn two_keys_of_one_digest_are_named_by_their_lines() {
    let c = Case::new("acme k-1\nglobex k-2\n", 0o600);
    let orgs = c.parse().expect("valid").orgs;
    let e = clash(
        &c.keys,
        &orgs,
        KeyEntry {
            digest: 7,
            org: 0,
            line: 1,
        },
        KeyEntry {
            digest: 7,
            org: 1,
            line: 2,
        },
    );
    assert_eq!(
        e.to_string().replace(&c.keys.display().to_string(), "KEYS"),
        "KEYS:2:8: key: this key's digest equals that of the key at line 1 (org \"acme\"); \
         replace one of the two keys"
    );
    let sorted = [
        KeyEntry {
            digest: 1,
            org: 0,
            line: 9,
        },
        KeyEntry {
            digest: 1,
            org: 0,
            line: 12,
        },
        KeyEntry {
            digest: 2,
            org: 0,
            line: 3,
        },
        KeyEntry {
            digest: 2,
            org: 1,
            line: 5,
        },
    ];
    assert_eq!(
        first_clash(&sorted),
        Some((sorted[2], sorted[3])),
        "line 5 comes first"
    );
}

#[test]
fn every_org_needs_a_source_that_knows_it() {
    // globex has no CIDRs and no key.
    let c = Case::new("acme k-1\n", 0o600);
    let e = c
        .parse()
        .expect_err("globex cannot be identified")
        .to_string();
    assert_eq!(
        e.replace(&c.keys.display().to_string(), "KEYS"),
        format!(
            "{CONFIG}:12:8: orgs[1].cidrs: org \"globex\" lists no CIDRs and has no key in KEYS: \
             nothing identifies it"
        )
    );
    // Known by keys alone: every org needs one, CIDRs or not.
    let c = Case::new("globex k-1\n", 0o600);
    let e = c
        .parse_with("[\"api_key\"]", "")
        .expect_err("acme has no key")
        .to_string();
    assert_eq!(
        e.replace(&c.keys.display().to_string(), "KEYS"),
        format!(
            "{CONFIG}:9:8: orgs[0].name: org \"acme\" has no key in KEYS, and api.identify_by \
             knows orgs by their keys alone"
        )
    );
    let c = Case::new("globex k-1\nacme k-2\n", 0o600);
    let cfg = c.parse_with("[\"api_key\"]", "").expect("both have keys");
    assert_eq!(cfg.api.identify.by, [Source::ApiKey]);
    // The keys file is not read when api_key is not listed: globex then needs CIDRs.
    let e = c
        .parse_with("[\"forwarded\", \"address\"]", "")
        .expect_err("globex has no CIDRs")
        .to_string();
    assert_eq!(
        e,
        format!(
            "{CONFIG}:12:8: orgs[1].cidrs: must list at least one CIDR: api.identify_by does not \
             list \"api_key\", so nothing else identifies org \"globex\""
        )
    );
}

#[test]
fn orgs_file_lines_without_cidrs_are_known_by_their_keys() {
    let c = Case::new("acme k-1\nglobex k-2\ninitech k-3\n", 0o600);
    let orgs = c.dir.path().join("orgs");
    std::fs::write(&orgs, "initech daily_requests=5\numbrella\n").expect("orgs file");
    let text = c.text("[\"api_key\", \"address\"]", "").replace(
        "ports = [1]\n",
        &format!("ports = [1]\norgs_file = \"{}\"\n", orgs.display()),
    );
    let e = Config::parse(&text, Path::new(CONFIG)).expect_err("umbrella has no key");
    assert_eq!(
        e.to_string()
            .replace(&orgs.display().to_string(), "ORGS")
            .replace(&c.keys.display().to_string(), "KEYS"),
        "ORGS:2:1: cidrs: org \"umbrella\" lists no CIDRs and has no key in KEYS: nothing \
         identifies it"
    );
    std::fs::write(&orgs, "initech daily_requests=5\n").expect("orgs file");
    let cfg = Config::parse(&text, Path::new(CONFIG)).expect("valid");
    let initech = &cfg.orgs[2];
    assert_eq!((initech.name.as_str(), initech.cidrs.len()), ("initech", 0));
    assert_eq!(initech.daily_requests, Some(5));
    assert_eq!(cfg.key_count(), 3);
}
