//! The `limiter` binary: daemon and CLI (docs/cli.md), one file per command. The demo, the bench
//! and the test world are the lab's (`limiter-lab`); `limiter demo` only runs it.

mod check;
mod client;
#[cfg(feature = "test-hooks")]
mod debug;
mod demo;
mod reload;
mod report;
mod reset;
mod run;
mod stop;
mod trace;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use limiter_user::config;

#[derive(Parser, Debug)]
#[command(
    name = "limiter",
    version,
    about = "Kernel-level API limiter: per-organization daily quotas and concurrency, counted and enforced by eBPF"
)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config).
    Run,
    /// Validate the config and the kernel's prerequisites.
    Check,
    /// Today's usage per org.
    Report(ReportArgs),
    /// Make the running daemon re-read its config.
    Reload,
    /// Clear today's counters of one org or of all.
    Reset(ResetArgs),
    /// Stream the kernel's verdict on each request until Ctrl-C (needs root).
    Trace(TraceArgs),
    /// Stop the running daemon; the kernel programs keep counting and enforcing.
    Stop,
    /// Stop the daemon if it runs and remove everything it pinned: the programs detach.
    Unload,
    /// Self-contained demo in private namespaces (needs root).
    ///
    /// Runs `limiter-lab demo`, which `cargo xtask demo` builds next to this binary.
    Demo,
    #[cfg(feature = "test-hooks")]
    #[command(hide = true, subcommand)]
    Debug(DebugCommand),
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Only this org.
    #[arg(long)]
    org: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A past day (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_day)]
    day: Option<String>,
}

/// `--day` must be a date before it is sent anywhere: the daemon makes a file name of it.
fn parse_day(s: &str) -> Result<String, String> {
    limiter_user::snapshot::check_date(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
struct TraceArgs {
    /// Only this org's requests (`-`: traffic of no org).
    #[arg(long)]
    org: Option<String>,
    /// JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct ResetArgs {
    #[arg(long)]
    org: Option<String>,
    #[arg(long)]
    all: bool,
}

/// Test hooks (builds with the `test-hooks` feature only).
#[cfg(feature = "test-hooks")]
#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// Step the daemon's and the kernel's quota clock by SECS, forward or back (negative); tests of
    /// rollover and clock steps.
    AdvanceClock {
        #[arg(allow_negative_numbers = true)]
        secs: i64,
        /// Move only the kernel's clock, as an NTP step reaches the kernel before the daemon's
        /// next tick; the daemon follows once a later advance-clock moves its clock as far.
        #[arg(long)]
        kernel_only: bool,
    },
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run => run::run(&cli.config),
        Command::Check => Ok(check::check(&cli.config)),
        Command::Report(a) => report::report(cli, a),
        Command::Reload => reload::reload(cli),
        Command::Reset(a) => reset::reset(cli, a),
        Command::Trace(a) => trace::trace(&cli.config, a),
        Command::Stop => stop::stop(cli),
        Command::Unload => stop::unload(&cli.config),
        Command::Demo => demo::demo(),
        #[cfg(feature = "test-hooks")]
        Command::Debug(d) => debug::debug(cli, d),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("limiter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
