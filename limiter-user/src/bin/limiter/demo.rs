//! `limiter demo`: runs the lab's demo, which is not compiled into the product.

use std::{
    os::unix::process::CommandExt as _,
    process::{self, ExitCode},
};

use anyhow::{Context as _, bail};

/// The lab binary that holds the demo: `limiter-lab` next to this executable.
const LAB: &str = "limiter-lab";

/// Runs `limiter-lab demo` in place of this process, pointed at this `limiter` as the daemon, so
/// that no test world is compiled into the product.
pub fn demo() -> anyhow::Result<ExitCode> {
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
