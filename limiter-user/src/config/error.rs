//! Config errors, and how byte offsets and serde's messages become `FILE:LINE:COL: KEY: PROBLEM`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Pos;

/// Why a config could not be loaded. Everything but `Read` carries the file, line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("{}: cannot read the config: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid TOML, but a key is unknown, missing, of the wrong type or has a bad value.
    #[error("{}:{line}:{column}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The config file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. } => file,
        }
    }

    /// 1-based line of the problem (`None` when the file could not be read).
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }

    /// 1-based column (in characters) of the problem.
    pub fn column(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { column, .. } | ConfigError::Invalid { column, .. } => {
                Some(*column)
            }
        }
    }

    /// The key path, like `orgs[2].cidrs[0]` (`None` for read and syntax errors).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The problem alone, without file, position and key.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => source.to_string(),
            ConfigError::Syntax { message, .. } | ConfigError::Invalid { message, .. } => {
                message.clone()
            }
        }
    }
}

/// The text being parsed, to turn byte offsets into `FILE:LINE:COL`.
#[derive(Clone, Copy)]
pub(super) struct Src<'t> {
    pub file: &'t Path,
    pub text: &'t str,
}

impl Src<'_> {
    /// 1-based line and column (in characters) of a byte offset; 1:1 when unknown.
    pub fn pos(&self, offset: Option<usize>) -> Pos {
        let Some(offset) = offset else {
            return Pos::default();
        };
        let bytes = self.text.as_bytes();
        let before = bytes.get(..offset).unwrap_or(bytes);
        let line = 1 + count_newlines(before);
        let line_start = before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        let in_line = before.get(line_start..).unwrap_or_default();
        let column = 1 + in_line.iter().filter(|&&c| c & 0xC0 != 0x80).count();
        Pos { line, column }
    }

    pub fn invalid(
        &self,
        offset: Option<usize>,
        key: impl fmt::Display,
        message: impl Into<String>,
    ) -> ConfigError {
        let Pos { line, column } = self.pos(offset);
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A TOML syntax error.
    pub fn syntax(&self, e: &toml::de::Error) -> ConfigError {
        let Pos { line, column } = self.pos(e.span().map(|s| s.start));
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line,
            column,
            message: e.message().trim().replace('\n', "; "),
        }
    }

    /// An error from reading the text into the serde structs: the key comes from serde's path,
    /// the position from toml's span, and serde's wording is put the way this file words it.
    pub fn deserialize(&self, e: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = key_path(e.path());
        let inner = e.inner();
        let start = inner.span().map(|s| s.start);
        let message = inner.message().trim();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let expected = rest.split_once(", expected").map_or("", |(_, e)| e);
            let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect::<Vec<_>>();
            let message = format!("unknown key (expected one of: {})", names.join(", "));
            return self.invalid(start, key, message);
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|f| f.strip_suffix('`'))
        {
            let key = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
            return self.invalid(start, key, "missing required key");
        }
        if let Some((found, expected)) = message
            .strip_prefix("invalid type: ")
            .and_then(|m| m.split_once(", expected "))
        {
            let found = self.kind(found, start);
            let expected = match expected {
                "a sequence" if key == "orgs" => "an array of tables ([[orgs]])",
                "a sequence" => "an array",
                "a string" => "a string",
                e if e.starts_with("struct ") => "a table",
                _ => "an integer",
            };
            return self.invalid(start, key, format!("expected {expected}, found {found}"));
        }
        self.invalid(start, key, message)
    }

    /// What serde's "invalid type" names, in this file's words; toml hands a date or time over
    /// as a map, told apart from a table by its first character.
    fn kind(&self, unexpected: &str, start: Option<usize>) -> &'static str {
        let first = start.and_then(|s| self.text.as_bytes().get(s)).copied();
        match unexpected.split([' ', '`', '"']).next().unwrap_or_default() {
            "string" => "a string",
            "integer" => "an integer",
            "floating" => "a float",
            "boolean" => "a boolean",
            "sequence" => "an array",
            "map" if first.is_some_and(|c| c.is_ascii_digit()) => "a date or time",
            _ => "a table",
        }
    }
}

/// serde's path as this file writes keys (`orgs[2].cidrs[0]`), without `Spanned`'s own fields.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

pub(super) fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&c| c == b'\n').count()
}
