//! `limiter debug …`: test hooks (builds with the `test-hooks` feature only).

use std::process::ExitCode;

use limiter_user::control::Request;

use crate::{Cli, DebugCommand, client::ask};

pub fn debug(cli: &Cli, d: &DebugCommand) -> anyhow::Result<ExitCode> {
    match d {
        DebugCommand::AdvanceClock { secs, kernel_only } => {
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
