//! What the daemon writes into the kernel for `api.identify_by`: the API keys' digests under the
//! secret it keeps, the identification settings in CONFIG, and how reloads, a bad keys file and
//! a restart change them (read from the pinned maps).

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{World, require_root};
use limiter_common::{ID_ADDRESS, ID_API_KEY, ID_END, ID_FORWARDED, KernelConfig};
use limiter_user::{
    bpf,
    config::Config,
    pins::{Capacity, layout_dir},
    secret,
};

/// `[api]` lines that know orgs by key, then forwarded header, then address.
fn identify_api(keys: &Path) -> String {
    format!(
        "identify_by = [\"api_key\", \"forwarded\", \"address\"]\n\
         trusted_proxies = [\"10.200.0.0/16\"]\napi_keys_file = {:?}",
        keys.display().to_string()
    )
}

const ORGS: &str = "[[orgs]]\nname = \"acme\"\ncidrs = [\"10.201.0.0/24\"]\n\
                    [[orgs]]\nname = \"globex\"\n";

fn write_keys(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// This world's pinned map `name`.
fn pinned(w: &World, name: &str) -> Result<std::os::fd::OwnedFd> {
    let cfg = Config::load(&w.config)?;
    let path = layout_dir(&cfg.daemon.pin_dir, Capacity::for_config(&cfg)).join(name);
    bpf::obj_get(&path).with_context(|| format!("opening {}", path.display()))
}

/// API_KEYS as the kernel holds it: digest → org id.
fn api_keys(w: &World) -> Result<BTreeMap<u64, u32>> {
    let fd = pinned(w, "API_KEYS")?;
    let mut out = BTreeMap::new();
    bpf::lookup_batch::<u64, u32>(fd.as_fd(), 1 << 20, |k, v| {
        out.extend(k.iter().copied().zip(v.iter().copied()))
    })?;
    Ok(out)
}

fn kernel_config(w: &World) -> Result<KernelConfig> {
    let fd = pinned(w, "CONFIG")?;
    let mut out = None;
    bpf::lookup_batch::<u32, KernelConfig>(fd.as_fd(), 1, |_, v| out = v.first().copied())?;
    out.context("CONFIG has no entry")
}

fn state(w: &World) -> PathBuf {
    w.dir().join("state")
}

/// `(key, org id)` as the digests the kernel should hold under the kept secret.
fn expected(w: &World, keys: &[(&str, u32)]) -> Result<BTreeMap<u64, u32>> {
    let secret = secret::read(&state(w)).map_err(anyhow::Error::msg)?;
    Ok(keys
        .iter()
        .map(|(k, id)| (secret.digest(k.as_bytes()), *id))
        .collect())
}

#[test]
fn keys_reach_the_kernel_as_digests_and_follow_reloads_and_restarts() -> Result<()> {
    require_root();
    let mut w = World::new("apikeys", 0, 0)?;
    let keys = w.dir().join("api-keys");
    write_keys(&keys, "acme k-a1\nacme k-a2\nglobex k-g1\n", 0o600)?;
    w.write_config_with(&identify_api(&keys), "", ORGS)?;
    w.start_daemon()?;

    // The secret is kept root-only; the kernel holds its digests and the settings.
    let kept = std::fs::metadata(secret::path(&state(&w)))?;
    ensure!(kept.mode() & 0o7777 == 0o600 && kept.uid() == 0, "{kept:?}");
    let secret = secret::read(&state(&w)).map_err(anyhow::Error::msg)?;
    let (acme, globex) = (1, 2);
    let want = expected(&w, &[("k-a1", acme), ("k-a2", acme), ("k-g1", globex)])?;
    assert_eq!(api_keys(&w)?, want);
    let kc = kernel_config(&w)?;
    assert_eq!(kc.key_secret, secret.halves());
    assert_eq!(
        kc.identify_by,
        [ID_API_KEY, ID_FORWARDED, ID_ADDRESS, ID_END]
    );
    assert_eq!(&kc.key_header[..kc.key_header_len as usize], b"x-api-key");
    assert_eq!(
        &kc.fwd_header[..kc.fwd_header_len as usize],
        b"x-forwarded-for"
    );

    // A reload: a key leaves, another comes.
    write_keys(&keys, "acme k-a1\nglobex k-g1\nglobex k-g2\n", 0o600)?;
    let out = w.cli(&["reload"])?;
    ensure!(out.status.success(), "{out:?}");
    let want = expected(&w, &[("k-a1", acme), ("k-g1", globex), ("k-g2", globex)])?;
    assert_eq!(api_keys(&w)?, want);

    // A bad keys file, or one others can read, changes nothing.
    write_keys(&keys, "acme k-a1\ninitech k-i1\n", 0o600)?;
    let out = w.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{out:?}");
    ensure!(
        err.contains(&format!("{}:2:1: org: no org \"initech\"", keys.display())),
        "{err}"
    );
    write_keys(&keys, "acme k-a1\nglobex k-g1\n", 0o644)?;
    let out = w.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{out:?}");
    ensure!(
        err.contains(&format!("{} has mode 0644", keys.display())),
        "{err}"
    );
    let out = w.cli(&["check"])?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success(), "{printed}");
    ensure!(
        printed.contains("FAIL config") && printed.contains("has mode 0644"),
        "{printed}"
    );
    // (The maps' directory is found from the config, which needs a readable keys file.)
    write_keys(&keys, "acme k-a1\nglobex k-g1\nglobex k-g2\n", 0o600)?;
    assert_eq!(api_keys(&w)?, want, "the keys in force stay");

    // A restart keeps the secret: the pinned digests stay valid, none is written again.
    w.stop_daemon()?;
    w.start_daemon()?;
    w.wait_log_count("limiter started", 2)?;
    let log = w.daemon_log();
    let second = log
        .lines()
        .filter(|l| l.contains("limiter started"))
        .nth(1)
        .context("a second start")?;
    ensure!(second.contains("keys_written=0"), "{second}");
    assert_eq!(
        secret::read(&state(&w)).map_err(anyhow::Error::msg)?,
        secret
    );
    assert_eq!(api_keys(&w)?, want);
    Ok(())
}

/// The daemon's start with a million keys (10 orgs x 100,000): the startup line's phase times
/// and the daemon's peak RSS. A measurement: `cargo test --release -p integration-tests --test
/// api_keys -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement with a million keys"]
fn a_million_keys_start() -> Result<()> {
    require_root();
    let mut w = World::new("apikeys1m", 0, 0)?;
    let keys = w.dir().join("api-keys");
    {
        use std::io::Write as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&keys)?;
        let mut out = std::io::BufWriter::new(file);
        for i in 0..1_000_000u64 {
            writeln!(
                out,
                "org-{} sk_live_{:032x}",
                i % 10,
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            )?;
        }
        out.flush()?;
    }
    let orgs: String = (0..10)
        .map(|o| format!("[[orgs]]\nname = \"org-{o}\"\n"))
        .collect();
    let api = format!(
        "identify_by = [\"api_key\"]\napi_keys_file = {:?}",
        keys.display().to_string()
    );
    w.write_config_with(&api, "", &orgs)?;
    let started = std::time::Instant::now();
    w.start_daemon()?;
    let answered = started.elapsed();
    let pid = w.daemon_pid().context("a daemon")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(String::new(), |v| v.trim().to_string())
    };
    let log = w.daemon_log();
    let line = log
        .lines()
        .find(|l| l.contains("limiter started"))
        .unwrap_or_default();
    eprintln!(
        "a million keys: first answer after {:.2} s; peak RSS {}, RSS now {}\n{line}",
        answered.as_secs_f64(),
        field("VmHWM:"),
        field("VmRSS:")
    );
    assert_eq!(api_keys(&w)?.len(), 1_000_000);
    Ok(())
}
