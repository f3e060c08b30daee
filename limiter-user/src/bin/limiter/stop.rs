//! `limiter stop` (the programs keep counting) and `limiter unload` (they detach).

use std::{path::Path, process::ExitCode};

use limiter_user::{
    config::Config,
    control::{self, Request},
};

use crate::{
    Cli,
    client::{ask, wait_gone},
};

pub fn stop(cli: &Cli) -> anyhow::Result<ExitCode> {
    ask(cli, &Request::Shutdown { unload: false })?;
    println!("stopped; the kernel programs keep counting and enforcing");
    Ok(ExitCode::SUCCESS)
}

pub fn unload(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    match control::call(
        &cfg.daemon.control_socket,
        &Request::Shutdown { unload: true },
    ) {
        Ok(resp) if resp.ok => {
            wait_gone(&cfg.daemon.control_socket);
            println!("daemon stopped and unloaded");
        }
        // No daemon: remove the pins ourselves.
        _ => {
            let removed = limiter_user::pins::unload(&cfg.daemon.pin_dir)?;
            println!(
                "removed {} pinned objects under {}",
                removed.len(),
                cfg.daemon.pin_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
