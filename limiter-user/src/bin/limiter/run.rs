//! `limiter run`: the daemon in the foreground.

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use limiter_user::{config::Config, daemon, logging};

pub fn run(config: &Path) -> anyhow::Result<ExitCode> {
    daemon::tune_allocator();
    let started = std::time::Instant::now();
    let cfg = Config::load(config)?;
    let parse_ms = started.elapsed().as_millis() as u64;
    logging::init(*cfg.daemon.log_format);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(daemon::run(config, cfg, parse_ms))?;
    Ok(ExitCode::SUCCESS)
}
