//! `limiter reload`: the daemon re-reads its config and says what changed.

use std::process::ExitCode;

use limiter_user::control::Request;

use crate::{Cli, client::ask};

pub fn reload(cli: &Cli) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}
