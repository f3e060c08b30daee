//! `limiter report`: a day's usage per org, as a table or JSON.

use std::process::ExitCode;

use limiter_user::{control::Request, report::Report};

use crate::{Cli, ReportArgs, client::ask};

pub fn report(cli: &Cli, a: &ReportArgs) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}
