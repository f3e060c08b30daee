//! `limiter check`: the config and the kernel's prerequisites, one line each.

use std::{path::Path, process::ExitCode};

pub fn check(config: &Path) -> ExitCode {
    let checks = limiter_user::check::run(config);
    for c in &checks {
        println!(
            "{} {:<14} {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if checks.iter().any(|c| !c.ok) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
