//! `limiter trace`: the kernel's verdict on each request, streamed until Ctrl-C or SIGTERM.

use std::{path::Path, process::ExitCode};

use limiter_user::{config::Config, pins::Capacity, trace::Tracer};

use crate::TraceArgs;

pub fn trace(config: &Path, a: &TraceArgs) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let mut tracer = Tracer::start(&cfg.daemon.pin_dir, Capacity::for_config(&cfg))?;
    eprintln!("tracing (pid {}); Ctrl-C stops", std::process::id());
    let lost = tracer.run(a.org.as_deref(), a.json, &mut std::io::stdout().lock())?;
    // Tracing off before the last words.
    drop(tracer);
    if lost > 0 {
        eprintln!("{lost} records lost: the trace buffer was full");
    }
    Ok(ExitCode::SUCCESS)
}
