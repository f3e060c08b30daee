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

    /// An error from reading the text into the serde structs: the position comes from toml's
    /// span, the key from what stands there, and serde's wording is put the way this file
    /// words it.
    pub fn deserialize(&self, e: &toml::de::Error) -> ConfigError {
        let start = e.span().map(|s| s.start);
        let key = start.map(|s| key_at(self.text, s)).unwrap_or_default();
        let message = e.message().trim();
        // A date or time reaches a table's struct as a map with toml's private key.
        if message.starts_with("unknown field `$__toml_private_datetime`") {
            return self.invalid(start, key, "expected a table, found a date or time");
        }
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let expected = rest.split_once(", expected").map_or("", |(_, e)| e);
            let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            let message = format!("unknown key (expected one of: {})", names.join(", "));
            return self.invalid(start, key, message);
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|f| f.strip_suffix('`'))
        {
            return self.invalid(start, format!("{key}.{field}"), "missing required key");
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
                "a boolean" => "true or false",
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

/// The key path (`orgs[2].cidrs[0]`) of the key or value that starts at byte `offset`, the
/// deepest when several do. Only errors need it, so it parses the text again rather than
/// have every value carry its path.
fn key_at(text: &str, offset: usize) -> String {
    use toml::de::{DeTable, DeValue};
    type Node<'i> = toml::Spanned<DeValue<'i>>;
    fn visit(node: &Node<'_>, offset: usize, path: &mut String, best: &mut String) {
        if node.span().start == offset {
            best.clone_from(path);
        }
        let len = path.len();
        match node.get_ref() {
            DeValue::Table(table) => {
                for (key, child) in table {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key.get_ref());
                    if key.span().start == offset {
                        best.clone_from(path);
                    }
                    visit(child, offset, path, best);
                    path.truncate(len);
                }
            }
            DeValue::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    path.push_str(&format!("[{i}]"));
                    visit(child, offset, path, best);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
    let mut best = String::new();
    if let Ok(root) = DeTable::parse(text) {
        let root = toml::Spanned::new(root.span(), DeValue::Table(root.into_inner()));
        visit(&root, offset, &mut String::new(), &mut best);
    }
    best
}

pub(super) fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&c| c == b'\n').count()
}
