//! The `limiter-lab` binary: the demo, and the helpers the demo, the bench and the integration
//! tests run inside a testbed (the test API server, the push sender). It runs the product binary
//! `limiter` found next to it (or `$LIMITER_BIN`) as the daemon.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use limiter_lab::{bench, demo, testbed};

#[derive(Parser, Debug)]
#[command(
    name = "limiter-lab",
    version,
    about = "limiter's lab: the self-contained demo, the bench and the test world's helpers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Self-contained demo in private namespaces (needs root).
    Demo,
    /// Side-by-side performance measurements (run by `cargo xtask bench`; needs root, nginx, wrk).
    #[command(hide = true)]
    Bench(bench::BenchArgs),
    #[command(hide = true, subcommand)]
    Testbed(testbed::TestbedCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo::run(),
        Command::Bench(a) => bench::run(&a),
        Command::Testbed(cmd) => testbed::run_command(cmd).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("limiter-lab: {e:#}");
        ExitCode::FAILURE
    })
}
