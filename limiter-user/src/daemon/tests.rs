//! The control handlers and the reload, on a daemon whose kernel maps are the in-memory fake.

use std::path::PathBuf;

use limiter_common::day_index;

use super::{
    Daemon, KernelMaps, Plan,
    fake::{FakeMaps, config_text, events, logged},
};
use crate::{
    clock::Clock, config::Config, control::Response, counters::Applied, orgs::OrgIds,
    report::Report,
};

const D: u64 = 20_000;

struct World {
    dir: tempfile::TempDir,
    daemon: Daemon<FakeMaps>,
}

impl World {
    fn path(&self) -> PathBuf {
        self.dir.path().join("limiter.toml")
    }

    /// Writes `text` as the config file.
    fn write(&self, text: &str) {
        std::fs::write(self.path(), text).expect("writing the config");
    }

    fn requests(&self, id: u32) -> u64 {
        self.daemon
            .maps
            .usage(id, D)
            .map(|(d, _)| d.requests)
            .unwrap_or(u64::MAX)
    }
}

/// A daemon with `orgs` applied to fresh fake maps, `D` in force.
fn world(orgs: &[&str]) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = config_text(dir.path(), orgs, "");
    world_of(dir, &text)
}

/// A daemon started as `limiter run` starts, with `text` as its config file in `dir`.
fn world_of(dir: tempfile::TempDir, text: &str) -> World {
    let path = dir.path().join("limiter.toml");
    std::fs::write(&path, text).expect("writing the config");
    let cfg = Config::load(&path).expect("test config");
    let clock = Clock::new(0);
    let names = cfg.orgs.iter().map(|o| o.name.as_str());
    let ids = OrgIds::assign(names, None, 64).expect("distinct names");
    let mut plan = Plan::new(cfg, ids, &clock).expect("plan");
    plan.keep_new_secret();
    let mut maps = FakeMaps::default();
    plan.apply(&mut maps, &Applied::default()).expect("apply");
    let (settings, orgs) = plan.into_parts();
    let daemon = Daemon::new(&path, settings, orgs, clock, maps, D);
    World { dir, daemon }
}

fn error_of(r: &Response) -> &str {
    assert!(!r.ok, "expected an error, got {:?}", r.data);
    r.error.as_deref().unwrap_or_default()
}

#[test]
fn a_report_reads_the_day_in_force_of_one_org_or_all() {
    let mut w = world(&["acme", "initech"]);
    w.daemon.maps.count(1, D, 7);
    w.daemon.maps.count(2, D, 1);
    let r: Report = w
        .daemon
        .report(Some("acme"), None)
        .parse()
        .expect("a report");
    assert_eq!(r.day, w.daemon.clock.date(D));
    let got: Vec<(&str, u64, u64)> = r
        .orgs
        .iter()
        .map(|o| (o.org.as_str(), o.requests, o.remaining))
        .collect();
    assert_eq!(got, [("acme", 7, r.orgs[0].daily_limit - 7)]);
    let all: Report = w.daemon.report(None, None).parse().expect("a report");
    assert_eq!(all.orgs.len(), 2);
    let unknown = w.daemon.report(Some("nobody"), None);
    assert!(error_of(&unknown).starts_with("no org named \"nobody\" in "));
}

#[test]
fn a_past_day_is_reported_from_its_snapshot_or_not_at_all() {
    let w = world(&["acme"]);
    let long_ago = w.daemon.clock.date(D - 5);
    let r = w.daemon.report(None, Some(&long_ago));
    assert_eq!(error_of(&r), format!("no counts kept for {long_ago}"));
    let mut w = world(&["acme"]);
    w.daemon.maps.count(1, D, 4);
    let (maps, ids, clock) = (&w.daemon.maps, &w.daemon.orgs.ids, &w.daemon.clock);
    w.daemon.days.write_snapshot(maps, ids, clock, D);
    // The kernel's slot moves on: only the snapshot still says 4.
    w.daemon.maps.count(1, D, 100);
    // Three days on, the kernel no longer holds D: the report comes from its snapshot.
    let date = w.daemon.clock.date(D);
    w.daemon.days = super::days::Days::new(w.dir.path().join("state").as_path(), D + 3);
    let r: Report = w
        .daemon
        .report(None, Some(&date))
        .parse()
        .expect("a report");
    assert_eq!((r.day.as_str(), r.orgs[0].requests), (date.as_str(), 4));
}

#[test]
fn a_reset_clears_one_org_or_every_org_and_unmapped() {
    let mut w = world(&["acme", "initech"]);
    w.daemon.maps.count(1, D, 7);
    w.daemon.maps.count(2, D, 3);
    w.daemon.maps.count(0, D, 2);
    let r = w.daemon.reset(Some("acme"), D);
    assert_eq!(
        r.parse::<serde_json::Value>().ok(),
        Some(serde_json::json!({"reset": ["acme"]}))
    );
    assert_eq!((w.requests(1), w.requests(2)), (0, 3));
    let r = w.daemon.reset(None, D);
    let want = serde_json::json!({"reset": ["unmapped", "acme", "initech"]});
    assert_eq!(r.parse::<serde_json::Value>().ok(), Some(want));
    assert_eq!((w.requests(0), w.requests(2)), (0, 0));
    assert_eq!(
        error_of(&w.daemon.reset(Some("nobody"), D)),
        "no org named \"nobody\""
    );
}

/// What a reload must leave alone when it fails.
fn in_force(d: &Daemon<FakeMaps>) -> (super::Settings, super::Orgs, Applied) {
    (d.settings.clone(), d.orgs.clone(), d.maps.applied.clone())
}

#[test]
fn a_reload_that_fails_keeps_the_old_config() {
    let mut w = world(&["acme"]);
    let before = in_force(&w.daemon);
    // A file that does not parse.
    w.write("[api]\nports = [8080\n");
    let e = w.daemon.reload().expect_err("a broken file");
    assert!(e.to_string().contains("limiter.toml:"), "{e}");
    assert!(in_force(&w.daemon) == before);
    // A map write failing midway: the maps are put back as they were.
    w.write(&config_text(
        w.dir.path(),
        &["acme", "initech", "newco"],
        "",
    ));
    w.daemon.maps.fail_apply = true;
    let e = w.daemon.reload().expect_err("the apply fails");
    assert!(
        e.to_string().contains("applying the new config failed"),
        "{e}"
    );
    assert!(in_force(&w.daemon) == before);
    // More addresses than the kernel's table holds.
    w.daemon.maps.cidr_capacity = 2;
    let e = w.daemon.reload().expect_err("too many CIDRs");
    assert!(e.to_string().contains("3 CIDRs do not fit"), "{e}");
    assert!(in_force(&w.daemon) == before);
}

#[test]
fn a_reload_refuses_restart_only_changes_and_names_them_all() {
    let mut w = world(&["acme"]);
    let before = in_force(&w.daemon);
    let extra = "interfaces = [\"eth0\"]\nnetns = \"/run/netns/api\"";
    w.write(&config_text(w.dir.path(), &["acme", "initech"], extra));
    let e = w
        .daemon
        .reload()
        .expect_err("restart-only changes")
        .to_string();
    // The position is the first changed key's (line 4 of the file).
    assert!(e.starts_with(&format!("{}:4:", w.path().display())), "{e}");
    assert!(
        e.contains(": api.interfaces: changed: takes effect on a restart"),
        "{e}"
    );
    assert!(e.ends_with("(also changed: api.netns)"), "{e}");
    assert!(in_force(&w.daemon) == before);
}

#[test]
fn a_reload_applies_the_differences() {
    let mut w = world(&["acme", "initech"]);
    w.daemon.maps.count(2, D, 3);
    // Left over in the slot of the id the new org gets: the reload must clear it.
    w.daemon.maps.count(3, D, 9);
    let acme = w.daemon.orgs.ids.id("acme").expect("acme has an id");
    w.write(&config_text(w.dir.path(), &["acme", "newco"], "").replace(
        "name = \"acme\"\ncidrs = [\"10.0.0.0/24\"]",
        "name = \"acme\"\ncidrs = [\"10.0.0.0/24\"]\ndaily_requests = 9",
    ));
    let (summary, lines) = logged(|| w.daemon.reload());
    let want = serde_json::json!({"added": ["newco"], "removed": ["initech"], "changed": ["acme"]});
    assert_eq!(summary.ok(), Some(want));
    // The removed org's counts of today end with it; the reload line lists what changed.
    let removed = events(&lines, "org_removed");
    assert_eq!(removed.len(), 1);
    assert_eq!(
        (removed[0]["org"].as_str(), removed[0]["requests"].as_u64()),
        (Some("initech"), Some(3))
    );
    let reload = events(&lines, "reload");
    assert_eq!(reload.len(), 1);
    assert_eq!(reload[0]["limits_written"], 2);
    let ids = &w.daemon.orgs.ids;
    assert_eq!(ids.id("acme"), Some(acme), "an org that stays keeps its id");
    let newco = ids.id("newco").expect("newco has an id");
    assert_ne!(
        newco, 2,
        "a new org does not take a removed org's id while others are free"
    );
    assert_eq!(w.daemon.orgs.limits.get(acme).daily_requests, 9);
    let mut written: Vec<u32> = w
        .daemon
        .maps
        .applied
        .limits
        .iter()
        .map(|(id, _)| *id)
        .collect();
    written.sort_unstable();
    assert_eq!(written, [1, newco]);
    // The new org's slots start empty.
    assert_eq!(newco, 3, "the first free id");
    assert_eq!(w.daemon.maps.slot(day_index(newco, D)).requests, 0);
}

#[test]
fn a_dead_tracer_s_flag_is_cleared_and_a_live_one_s_kept() {
    let mut w = world(&["acme"]);
    w.daemon.maps.tracer = 4242;
    w.daemon.clear_dead_tracer(|pid| pid == 4242);
    assert_eq!(w.daemon.maps.tracer, 4242);
    w.daemon.clear_dead_tracer(|_| false);
    assert_eq!(w.daemon.maps.tracer, 0);
}

#[test]
fn a_reload_rereads_the_orgs_file() {
    let mut w = world(&["acme"]);
    let orgs = w.dir.path().join("orgs");
    let extra = format!("orgs_file = \"{}\"", orgs.display());
    std::fs::write(&orgs, "newco 10.9.0.0/24\n").expect("writing the orgs file");
    w.write(&config_text(w.dir.path(), &["acme"], &extra));
    let summary = w.daemon.reload().expect("orgs file applied");
    let want = serde_json::json!({"added": ["newco"], "removed": [], "changed": []});
    assert_eq!(summary, want);
    // A bad orgs file changes nothing, and the error points into it.
    let before = in_force(&w.daemon);
    std::fs::write(&orgs, "newco 10.9.0.0/24\nacme 10.8.0.0/24\n").expect("writing");
    let e = w.daemon.reload().expect_err("acme is in both").to_string();
    assert!(
        e.starts_with(&format!("{}:2:1: name: ", orgs.display())),
        "{e}"
    );
    assert!(in_force(&w.daemon) == before);
    // The same config with a changed orgs file: the file is read again.
    std::fs::write(&orgs, "newco 10.9.0.0/24 daily_requests=9\n").expect("writing");
    let summary = w.daemon.reload().expect("orgs file applied");
    let want = serde_json::json!({"added": [], "removed": [], "changed": ["newco"]});
    assert_eq!(summary, want);
}

/// A daemon that knows `acme` and `initech` by their keys first, with `keys` as its keys file.
fn keyed_world(keys: &str) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("api-keys");
    write_keys(&file, keys, 0o600);
    let extra = format!(
        "identify_by = [\"api_key\", \"address\"]\napi_keys_file = \"{}\"",
        file.display()
    );
    let text = config_text(dir.path(), &["acme", "initech"], &extra);
    world_of(dir, &text)
}

fn write_keys(file: &std::path::Path, keys: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(file, keys).expect("writing the keys file");
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The secret the daemon keeps, from its state directory.
fn kept_secret(w: &World) -> crate::secret::KeySecret {
    crate::secret::read(&w.dir.path().join("state")).expect("the daemon kept its secret")
}

/// (digest, org id) of `(key, org)` under the kept secret, sorted as the maps hold them.
fn digests(w: &World, keys: &[(&str, &str)]) -> Vec<(u64, u32)> {
    let secret = kept_secret(w);
    let ids = &w.daemon.orgs.ids;
    let mut out: Vec<(u64, u32)> = keys
        .iter()
        .map(|(key, org)| (secret.digest(key.as_bytes()), ids.id(org).expect("an org")))
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn keys_reach_the_maps_under_the_kept_secret() {
    let w = keyed_world("acme k-a1\nacme k-a2\ninitech k-i1\n");
    let applied = &w.daemon.maps.applied;
    let want = digests(
        &w,
        &[("k-a1", "acme"), ("k-a2", "acme"), ("k-i1", "initech")],
    );
    assert_eq!(applied.keys, want);
    let kc = applied.kernel_config.expect("CONFIG written");
    assert_eq!(kc.key_secret, kept_secret(&w).halves());
    assert_eq!(
        kc.identify_by[..2],
        [limiter_common::ID_API_KEY, limiter_common::ID_ADDRESS]
    );
    assert_eq!(&kc.key_header[..kc.key_header_len as usize], b"x-api-key");
}

#[test]
fn a_reload_replaces_the_keys_and_a_bad_keys_file_changes_nothing() {
    let mut w = keyed_world("acme k-a1\nacme k-a2\ninitech k-i1\n");
    let file = w.dir.path().join("api-keys");
    write_keys(&file, "acme k-a1\ninitech k-i1\ninitech k-i2\n", 0o600);
    let (summary, lines) = logged(|| w.daemon.reload());
    let want = serde_json::json!({"added": [], "removed": [], "changed": ["acme", "initech"]});
    assert_eq!(summary.ok(), Some(want));
    let reload = events(&lines, "reload");
    assert_eq!(
        (
            reload[0]["keys_written"].as_u64(),
            reload[0]["keys_removed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let want = digests(
        &w,
        &[("k-a1", "acme"), ("k-i1", "initech"), ("k-i2", "initech")],
    );
    assert_eq!(w.daemon.maps.applied.keys, want, "k-a2 is gone, k-i2 is in");
    // The same file again: the same secret, nothing to write.
    let (_, lines) = logged(|| w.daemon.reload());
    let reload = events(&lines, "reload");
    assert_eq!(
        (
            reload[0]["keys_written"].as_u64(),
            reload[0]["keys_removed"].as_u64()
        ),
        (Some(0), Some(0))
    );

    let before = in_force(&w.daemon);
    // An unknown org: the error points into the keys file, the old keys stay.
    write_keys(&file, "acme k-a1\nnobody k-x\n", 0o600);
    let e = w.daemon.reload().expect_err("an unknown org").to_string();
    assert!(
        e.starts_with(&format!("{}:2:1: org: no org \"nobody\"", file.display())),
        "{e}"
    );
    assert!(in_force(&w.daemon) == before);
    // A file others can read.
    write_keys(&file, "acme k-a1\ninitech k-i1\n", 0o644);
    let e = w.daemon.reload().expect_err("mode 0644").to_string();
    assert!(
        e.contains(&format!("{} has mode 0644", file.display())),
        "{e}"
    );
    assert!(in_force(&w.daemon) == before);
    // More keys than the kernel's table holds.
    write_keys(&file, "acme k-a1\ninitech k-i1\ninitech k-i2\n", 0o600);
    w.daemon.maps.key_capacity = 2;
    let e = w.daemon.reload().expect_err("too many keys").to_string();
    assert!(
        e.contains("3 API keys do not fit the kernel's key table (2): restart"),
        "{e}"
    );
    assert!(in_force(&w.daemon) == before);
}

#[test]
fn a_lost_secret_is_replaced_and_every_digest_rewritten() {
    let mut w = keyed_world("acme k-a1\ninitech k-i1\n");
    let old = kept_secret(&w);
    std::fs::remove_file(crate::secret::path(&w.dir.path().join("state"))).expect("rm");
    let (summary, lines) = logged(|| w.daemon.reload());
    summary.expect("the reload makes a new secret");
    let new = kept_secret(&w);
    assert_ne!(new, old);
    assert_eq!(events(&lines, "key_secret").len(), 1);
    let reload = events(&lines, "reload");
    assert_eq!(
        (
            reload[0]["keys_written"].as_u64(),
            reload[0]["keys_removed"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let applied = &w.daemon.maps.applied;
    assert_eq!(
        applied.keys,
        digests(&w, &[("k-a1", "acme"), ("k-i1", "initech")])
    );
    assert_eq!(
        applied.kernel_config.map(|kc| kc.key_secret),
        Some(new.halves())
    );
}
