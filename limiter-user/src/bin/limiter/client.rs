//! Talking to the running daemon over its control socket.

use std::path::{Path, PathBuf};

use anyhow::bail;
use limiter_user::{
    config::Config,
    control::{self, Request, Response},
};

use crate::Cli;

/// The daemon's control socket per the config. A config that no longer validates (the case of a
/// failing reload) is read leniently, so the daemon still gets the request and reports the error
/// itself.
pub fn control_socket(cli: &Cli) -> anyhow::Result<PathBuf> {
    match Config::load(&cli.config) {
        Ok(cfg) => Ok(cfg.daemon.control_socket.into_inner()),
        Err(e) => {
            let text = std::fs::read_to_string(&cli.config).map_err(|_| e)?;
            let value: toml::Value = toml::from_str(&text).unwrap_or(toml::Value::Integer(0));
            let daemon = value.get("daemon");
            let socket = daemon
                .and_then(|d| d.get("control_socket"))
                .and_then(|v| v.as_str())
                .map(PathBuf::from);
            let state = daemon
                .and_then(|d| d.get("state_dir"))
                .and_then(|v| v.as_str())
                .unwrap_or("/var/lib/limiter");
            Ok(socket.unwrap_or_else(|| PathBuf::from(state).join("control.sock")))
        }
    }
}

pub fn ask(cli: &Cli, req: &Request) -> anyhow::Result<Response> {
    let resp = control::call(&control_socket(cli)?, req)?;
    if !resp.ok {
        bail!(
            "{}",
            resp.error.unwrap_or_else(|| "the daemon refused".into())
        );
    }
    Ok(resp)
}

/// Waits (up to 10 s) for a stopping daemon to remove its control socket.
pub fn wait_gone(socket: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
