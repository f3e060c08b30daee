//! `limiter reset`: clears today's counters of one org or all.

use std::process::ExitCode;

use limiter_user::control::Request;

use crate::{Cli, ResetArgs, client::ask};

pub fn reset(cli: &Cli, a: &ResetArgs) -> anyhow::Result<ExitCode> {
    let resp = ask(
        cli,
        &Request::Reset {
            org: if a.all { None } else { a.org.clone() },
        },
    )?;
    println!("reset: {}", resp.parse::<serde_json::Value>()?["reset"]);
    Ok(ExitCode::SUCCESS)
}
