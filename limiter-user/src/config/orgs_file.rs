//! The orgs file (`api.orgs_file`): one org per line, for org lists too long to read as TOML
//! tables quickly.
//!
//! ```text
//! # NAME [CIDR[,CIDR...]] [daily_requests=N] [concurrent_connections=N] [concurrency_mode=M] [quota_mode=Q] [pace_over_quota=B]
//! acme 192.0.2.0/24,2001:db8::/32 daily_requests=10000
//! globex daily_requests=500
//! ```
//!
//! An org without CIDRs (`globex`) is known by its API keys alone (`api.identify_by`).
//!
//! Each value goes through the same checks as in an `[[orgs]]` table (`raw`); what needs
//! several orgs (duplicates, overlaps) is checked by `validate` across both sources.

use super::error::Src;
use super::raw::{self, Cidr, Connections, DailyRequests, OrgName};
use super::{ConfigError, Org};

/// The keys a line may set after its CIDRs, in the order an unknown-key message lists them.
const KEYS: [&str; 5] = [
    "daily_requests",
    "concurrent_connections",
    "concurrency_mode",
    "quota_mode",
    "pace_over_quota",
];

/// The orgs of an orgs file, with the byte offsets of each name and of every CIDR (flat, org
/// after org) for messages.
pub(super) struct FileOrgs {
    pub orgs: Vec<Org>,
    pub names: Vec<usize>,
    pub cidrs: Vec<usize>,
    /// Orgs (index in the file) without CIDRs, with their name's byte offset.
    pub cidrless: Vec<(usize, usize)>,
}

/// Parses the orgs file in `src`; stops at the first bad line.
pub(super) fn parse(src: &Src<'_>) -> Result<FileOrgs, ConfigError> {
    let text = src.text;
    let mut out = FileOrgs {
        orgs: Vec::new(),
        names: Vec::new(),
        cidrs: Vec::new(),
        cidrless: Vec::new(),
    };
    let mut line_start = 0;
    for (index, line) in text.split('\n').enumerate() {
        let start = line_start;
        line_start += line.len() + 1;
        let mut tokens = line
            .split_ascii_whitespace()
            .take_while(|t| !t.starts_with('#'));
        let Some(name) = tokens.next() else { continue };
        let at = |token: &str| Some(start + (token.as_ptr() as usize - line.as_ptr() as usize));
        let mut org = Org {
            name: OrgName::new(name.to_owned())
                .map_err(|m| src.invalid(at(name), "name", m))?
                .0,
            cidrs: Vec::new(),
            daily_requests: None,
            concurrent_connections: None,
            concurrency_mode: None,
            quota_mode: None,
            pace_over_quota: None,
            line: index + 1,
        };
        let name_at = at(name).unwrap_or(start);
        out.names.push(name_at);
        let mut tokens = tokens.peekable();
        // CIDRs never hold '=': a first token with one is an option, and the org has no CIDRs.
        match tokens.next_if(|t| !t.contains('=')) {
            Some(cidrs) => {
                let mut offset = at(cidrs).unwrap_or(start);
                for (i, cidr) in cidrs.split(',').enumerate() {
                    let net =
                        Cidr::new(cidr).map_err(|m| src.invalid(Some(offset), cidr_key(i), m))?;
                    org.cidrs.push(net.0);
                    out.cidrs.push(offset);
                    offset += cidr.len() + 1;
                }
            }
            None => out.cidrless.push((out.orgs.len(), name_at)),
        }
        for option in tokens {
            set(src, &mut org, option, at(option).unwrap_or(start))?;
        }
        out.orgs.push(org);
    }
    Ok(out)
}

fn cidr_key(i: usize) -> String {
    format!("cidrs[{i}]")
}

/// Applies one `key=value` of a line to `org`; `at` is the option's byte offset.
fn set(src: &Src<'_>, org: &mut Org, option: &str, at: usize) -> Result<(), ConfigError> {
    let Some((key, value)) = option.split_once('=') else {
        return Err(src.invalid(
            Some(at),
            option,
            format!("expected key=value (one of: {})", KEYS.join(", ")),
        ));
    };
    let value_at = Some(at + key.len() + 1);
    let bad = |m: String| src.invalid(value_at, key, m);
    let was_set = match key {
        "daily_requests" => org
            .daily_requests
            .replace(
                int::<DailyRequests>(value, DailyRequests::new)
                    .map_err(bad)?
                    .0,
            )
            .is_some(),
        "concurrent_connections" => org
            .concurrent_connections
            .replace(int(value, Connections::new).map_err(bad)?.0 as u32)
            .is_some(),
        "concurrency_mode" => org
            .concurrency_mode
            .replace(raw::concurrency_mode(value).map_err(bad)?)
            .is_some(),
        "quota_mode" => org
            .quota_mode
            .replace(raw::quota_mode(value).map_err(bad)?)
            .is_some(),
        "pace_over_quota" => org
            .pace_over_quota
            .replace(match value {
                "true" => true,
                "false" => false,
                _ => return Err(bad(format!("{value:?} is not true or false"))),
            })
            .is_some(),
        _ => {
            return Err(src.invalid(
                Some(at),
                key,
                format!("unknown key (expected one of: {})", KEYS.join(", ")),
            ));
        }
    };
    if was_set {
        return Err(src.invalid(Some(at), key, "set twice on this line"));
    }
    Ok(())
}

/// A decimal integer checked by `new` (the bounds of the matching TOML key).
fn int<T>(value: &str, new: fn(i64) -> Result<T, String>) -> Result<T, String> {
    let digits = value.strip_prefix('-').unwrap_or(value);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("expected an integer, found \"{value}\""));
    }
    match value.parse::<i64>() {
        Ok(v) => new(v),
        Err(_) => Err(format!("{value} is too large")),
    }
}

#[cfg(test)]
mod tests;
