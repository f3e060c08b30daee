//! The `limiter` binary: daemon and CLI (docs/cli.md). The demo, the bench and the test world are
//! the lab's (`limiter-lab`); `limiter demo` only runs it.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{self, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use limiter_user::{
    check,
    config::{self, Config},
    control::{self, Request, Response},
    daemon, logging,
    report::Report,
};

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

/// The daemon's control socket per the config. A config that no longer validates (the case of a
/// failing reload) is read leniently, so the daemon still gets the request and reports the error
/// itself.
fn control_socket(cli: &Cli) -> anyhow::Result<PathBuf> {
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

fn ask(cli: &Cli, req: &Request) -> anyhow::Result<Response> {
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
fn wait_gone(socket: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The lab binary that holds the demo: `limiter-lab` next to this executable.
const LAB: &str = "limiter-lab";

/// Runs `limiter-lab demo` in place of this process, pointed at this `limiter` as the daemon, so
/// that no test world is compiled into the product.
fn demo() -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the limiter executable")?;
    let lab = exe.with_file_name(LAB);
    if !lab.is_file() {
        bail!(
            "the demo is in the lab binary `{LAB}`, which is not next to {}: run `cargo xtask demo` \
             in a source checkout (it builds both binaries and runs the demo)",
            exe.display()
        );
    }
    let error = process::Command::new(&lab)
        .arg("demo")
        .env("LIMITER_BIN", &exe)
        .exec();
    Err(error).with_context(|| format!("running {}", lab.display()))
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

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run => {
            daemon::tune_allocator();
            let started = std::time::Instant::now();
            let cfg = Config::load(&cli.config)?;
            let parse_ms = started.elapsed().as_millis() as u64;
            logging::init(*cfg.daemon.log_format);
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(daemon::run(&cli.config, cfg, parse_ms))?;
        }
        Command::Check => {
            let checks = check::run(&cli.config);
            for c in &checks {
                println!(
                    "{} {:<14} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
            if checks.iter().any(|c| !c.ok) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Report(a) => {
            let resp = ask(
                cli,
                &Request::Report {
                    org: a.org.clone(),
                    day: a.day.clone(),
                },
            )?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resp.parse::<serde_json::Value>()?)?
                );
            } else {
                let report: Report = resp.parse()?;
                print!("{}", report.table());
            }
        }
        Command::Reload => {
            let data: serde_json::Value = ask(cli, &Request::Reload)?.parse()?;
            for key in ["added", "removed", "changed"] {
                let list = data[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                println!("{key:<8} {}", if list.is_empty() { "-" } else { &list });
            }
        }
        Command::Reset(a) => {
            let resp = ask(
                cli,
                &Request::Reset {
                    org: if a.all { None } else { a.org.clone() },
                },
            )?;
            println!("reset: {}", resp.parse::<serde_json::Value>()?["reset"]);
        }
        Command::Stop => {
            ask(cli, &Request::Shutdown { unload: false })?;
            println!("stopped; the kernel programs keep counting and enforcing");
        }
        Command::Unload => {
            let cfg = Config::load(&cli.config)?;
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
        }
        Command::Demo => return demo(),
        #[cfg(feature = "test-hooks")]
        Command::Debug(DebugCommand::AdvanceClock { secs, kernel_only }) => {
            let resp = ask(
                cli,
                &Request::AdvanceClock {
                    secs: *secs,
                    kernel_only: *kernel_only,
                },
            )?;
            println!("{}", resp.parse::<serde_json::Value>()?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
