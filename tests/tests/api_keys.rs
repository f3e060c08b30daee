//! What the daemon does with `api.identify_by` against the real kernel programs: sources they
//! do not read are refused, those they read reach CONFIG (read from the pinned maps).

use std::{os::fd::AsFd as _, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{World, require_root};
use limiter_common::{ID_ADDRESS, ID_END, ID_PROXY_PROTOCOL, KernelConfig};
use limiter_user::{
    bpf,
    config::Config,
    pins::{Capacity, layout_dir},
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

fn kernel_config(w: &World) -> Result<KernelConfig> {
    let fd = pinned(w, "CONFIG")?;
    let mut out = None;
    bpf::lookup_batch::<u32, KernelConfig>(fd.as_fd(), 1, |_, v| out = v.first().copied())?;
    out.context("CONFIG has no entry")
}

/// Until the kernel programs read request headers, a config that lists `api_key` or `forwarded`
/// is refused by `limiter check` and at start, never run with the source ignored; the sources
/// they do read reach CONFIG and TRUSTED_PROXIES.
#[test]
fn header_sources_are_refused_and_proxy_protocol_reaches_the_kernel() -> Result<()> {
    require_root();
    let mut w = World::new("apikeys", 0, 0)?;
    let keys = w.dir().join("api-keys");
    write_keys(&keys, "acme k-a1\nacme k-a2\nglobex k-g1\n", 0o600)?;
    w.write_config_with(&identify_api(&keys), "", ORGS)?;
    let out = w.cli(&["check"])?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success(), "{printed}");
    ensure!(
        printed.contains("FAIL config")
            && printed.contains("api.identify_by lists \"api_key\"")
            && printed.contains("not read yet"),
        "{printed}"
    );
    ensure!(w.start_daemon().is_err(), "a start with api_key is refused");
    ensure!(
        w.daemon_log().contains("api.identify_by lists \"api_key\""),
        "{}",
        w.daemon_log()
    );

    w.write_config_with(
        "identify_by = [\"proxy_protocol\", \"address\"]\ntrusted_proxies = [\"10.200.0.0/16\"]",
        "",
        "[[orgs]]\nname = \"acme\"\ncidrs = [\"10.201.0.0/24\"]\n",
    )?;
    w.start_daemon()?;
    let kc = kernel_config(&w)?;
    assert_eq!(
        kc.identify_by,
        [ID_PROXY_PROTOCOL, ID_ADDRESS, ID_END, ID_END]
    );
    Ok(())
}
