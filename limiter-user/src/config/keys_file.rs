//! The API keys file (`api.api_keys_file`): one key per line, with the org it belongs to.
//!
//! ```text
//! # ORG KEY
//! acme   k_live_4f9a0c2e
//! acme   k_live_77d01b5a
//! globex 9c1e6f0d3b
//! ```
//!
//! Blank lines and lines starting with `#` are skipped. The file is read a line at a time, and of
//! each key only its digest under the secret is kept: a million keys never sit in memory, and
//! no message repeats a key. The file must be readable by its owner alone.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use limiter_common::API_KEY_MAX;

use super::error::Src;
use super::{ConfigError, KeyEntry, Org};
use crate::secret::KeySecret;

/// The keys of the file, sorted by digest, and which orgs (by index) have at least one.
pub(super) struct FileKeys {
    pub entries: Vec<KeyEntry>,
    pub has_key: Vec<bool>,
}

/// Reads the keys file at `path` (named by the config in `config` at byte `at`) under `secret`;
/// `orgs` are every org of the config. Stops at the first bad line.
pub(super) fn read(
    config: &Src<'_>,
    at: Option<usize>,
    path: &Path,
    secret: &KeySecret,
    orgs: &[Org],
) -> Result<FileKeys, ConfigError> {
    let setting = |message: String| config.invalid(at, "api.api_keys_file", message);
    let file =
        File::open(path).map_err(|e| setting(format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| setting(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(setting(format!("{} is not a regular file", path.display())));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(setting(format!(
            "{p} has mode {mode:04o}: API keys must not be readable by group or others \
             (chmod 600 {p})",
            p = path.display()
        )));
    }
    let index: foldhash::HashMap<&str, u32> = orgs
        .iter()
        .enumerate()
        .map(|(i, o)| (o.name.as_str(), i as u32))
        .collect();
    let mut out = FileKeys {
        entries: Vec::new(),
        has_key: vec![false; orgs.len()],
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::with_capacity(256);
    let mut line_no: u32 = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| setting(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        line_no = line_no.saturating_add(1);
        let line = trim_end(&buf);
        let bad = |offset: usize, key: &str, message: String| ConfigError::Invalid {
            file: path.to_path_buf(),
            line: line_no as usize,
            column: column(line, offset),
            key: key.to_owned(),
            message,
        };
        let mut fields = fields(line);
        let Some((org_at, org)) = fields.next() else {
            continue;
        };
        if org.starts_with(b"#") {
            continue;
        }
        let name = String::from_utf8_lossy(org);
        let Some(&org_index) = index.get(name.as_ref()) else {
            return Err(bad(
                org_at,
                "org",
                format!("no org \"{name}\" in the config"),
            ));
        };
        let Some((key_at, key)) = fields.next() else {
            return Err(bad(
                org_at + org.len(),
                "key",
                "missing: each line is ORG KEY".to_owned(),
            ));
        };
        if key.len() > API_KEY_MAX {
            return Err(bad(
                key_at,
                "key",
                format!(
                    "the key is {} bytes long; the kernel looks up keys of at most {API_KEY_MAX} bytes",
                    key.len()
                ),
            ));
        }
        if let Some(i) = key
            .iter()
            .position(|&c| !limiter_common::ident::valid_key_byte(c))
        {
            return Err(bad(
                key_at + i,
                "key",
                format!(
                    "byte 0x{:02x} is not visible ASCII (keys are bytes 0x21 to 0x7e)",
                    key[i]
                ),
            ));
        }
        if let Some((extra_at, _)) = fields.next() {
            return Err(bad(
                extra_at,
                "key",
                "unexpected text after the key (each line is ORG KEY; comments take a whole line)"
                    .to_owned(),
            ));
        }
        out.entries.push(KeyEntry {
            digest: secret.digest(key),
            org: org_index,
            line: line_no,
        });
        out.has_key[org_index as usize] = true;
    }
    out.entries.sort_unstable_by_key(|e| (e.digest, e.line));
    if let Some((earlier, later)) = first_clash(&out.entries) {
        return Err(clash(path, orgs, earlier, later));
    }
    Ok(out)
}

/// The line without its line end (`\n` or `\r\n`).
fn trim_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The fields of a line split at spaces and tabs, with their byte offsets.
fn fields(line: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let blank = |c: &u8| *c == b' ' || *c == b'\t';
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = line.get(pos..)?;
        let start = pos + rest.iter().position(|c| !blank(c))?;
        let len = line[start..]
            .iter()
            .position(blank)
            .unwrap_or(line.len() - start);
        pos = start + len;
        Some((start, &line[start..start + len]))
    })
}

/// The 1-based column (in characters) of byte `offset` of `line`.
fn column(line: &[u8], offset: usize) -> usize {
    let before = line.get(..offset).unwrap_or(line);
    1 + before.iter().filter(|&&c| c & 0xC0 != 0x80).count()
}

/// Of the entries with the same digest, the pair whose later line comes first in the file.
fn first_clash(sorted: &[KeyEntry]) -> Option<(KeyEntry, KeyEntry)> {
    sorted
        .windows(2)
        .filter(|w| w[0].digest == w[1].digest)
        .map(|w| (w[0], w[1]))
        .min_by_key(|(_, later)| later.line)
}

/// The error of two lines with one digest: the same key twice, or (astronomically rare) two keys
/// whose digests collide. Only this path looks at the keys again, by reading the two lines anew.
fn clash(path: &Path, orgs: &[Org], earlier: KeyEntry, later: KeyEntry) -> ConfigError {
    let (first, second) = (
        key_on_line(path, earlier.line),
        key_on_line(path, later.line),
    );
    let org = orgs
        .get(earlier.org as usize)
        .map_or("?", |o| o.name.as_str());
    let (column, message) = match (&first, &second) {
        (Some((a, _)), Some((b, col))) if a != b => (
            *col,
            format!(
                "this key's digest equals that of the key at line {} (org \"{org}\"); \
                 replace one of the two keys",
                earlier.line
            ),
        ),
        (_, second) => (
            second.as_ref().map_or(1, |(_, col)| *col),
            format!(
                "this key is already listed at line {} (org \"{org}\")",
                earlier.line
            ),
        ),
    };
    ConfigError::Invalid {
        file: path.to_path_buf(),
        line: later.line as usize,
        column,
        key: "key".to_owned(),
        message,
    }
}

/// The key on line `line` of the file, and its column.
fn key_on_line(path: &Path, line: u32) -> Option<(Vec<u8>, usize)> {
    let reader = BufReader::new(File::open(path).ok()?);
    let text = reader
        .split(b'\n')
        .nth(line.checked_sub(1)? as usize)?
        .ok()?;
    let text = trim_end(&text);
    let (at, key) = fields(text).nth(1)?;
    Some((key.to_vec(), column(text, at)))
}

#[cfg(test)]
mod tests;
