//! Which settings a reload may apply: the ones not wrapped in [`RestartOnly`].

use std::ops::Deref;
use std::path::Path;

use super::{Api, Cluster, Config, ConfigError, DaemonSettings, Limits};

/// 1-based line and column (in characters) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Default for Pos {
    fn default() -> Self {
        Pos { line: 1, column: 1 }
    }
}

/// A setting that is opened, bound or scheduled at startup, so a running daemon cannot change
/// it: a reload that changes it is refused. Compares by value alone; `at` is where the file
/// sets it (its table's header when the key is left out, 1:1 when the table is).
#[derive(Debug, Clone, Default)]
pub struct RestartOnly<T> {
    value: T,
    at: Pos,
}

impl<T> RestartOnly<T> {
    pub fn new(value: T, at: Pos) -> Self {
        RestartOnly { value, at }
    }

    /// Where the config file sets this value.
    pub fn at(&self) -> Pos {
        self.at
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> From<T> for RestartOnly<T> {
    fn from(value: T) -> Self {
        RestartOnly::new(value, Pos::default())
    }
}

impl<T> Deref for RestartOnly<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for RestartOnly<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for RestartOnly<T> {}

/// Lets a setting be compared with a plain value: `cfg.limits.day_start_secs == 0`.
impl<T: PartialEq> PartialEq<T> for RestartOnly<T> {
    fn eq(&self, other: &T) -> bool {
        self.value == *other
    }
}

impl<T: AsRef<U>, U: ?Sized> AsRef<U> for RestartOnly<T> {
    fn as_ref(&self) -> &U {
        self.value.as_ref()
    }
}

/// A restart-only setting that differs between two configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    /// Its key path, like `limits.day_start` (`cluster` for the whole table).
    pub key: &'static str,
    /// Where the new config sets it.
    pub at: Pos,
}

/// What a reload compares: every table but the orgs (a running daemon keeps no org list).
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    pub api: &'a Api,
    pub limits: &'a Limits,
    pub daemon: &'a DaemonSettings,
    pub cluster: &'a RestartOnly<Option<Cluster>>,
}

impl Config {
    /// The tables a reload compares.
    pub fn sections(&self) -> Sections<'_> {
        Sections {
            api: &self.api,
            limits: &self.limits,
            daemon: &self.daemon,
            cluster: &self.cluster,
        }
    }
}

impl Sections<'_> {
    /// The restart-only settings `new` changes, in the order of the configuration reference.
    pub fn restart_only_changes(&self, new: &Sections) -> Vec<Changed> {
        fn diff<T: PartialEq>(
            key: &'static str,
            old: &RestartOnly<T>,
            new: &RestartOnly<T>,
        ) -> Option<Changed> {
            (old != new).then_some(Changed { key, at: new.at })
        }
        let (o, n) = (self, new);
        [
            diff("api.cgroup", &o.api.cgroup, &n.api.cgroup),
            diff("api.interfaces", &o.api.interfaces, &n.api.interfaces),
            diff("api.netns", &o.api.netns, &n.api.netns),
            diff(
                "limits.day_start",
                &o.limits.day_start_secs,
                &n.limits.day_start_secs,
            ),
            diff("daemon.pin_dir", &o.daemon.pin_dir, &n.daemon.pin_dir),
            diff("daemon.state_dir", &o.daemon.state_dir, &n.daemon.state_dir),
            diff(
                "daemon.control_socket",
                &o.daemon.control_socket,
                &n.daemon.control_socket,
            ),
            diff(
                "daemon.log_format",
                &o.daemon.log_format,
                &n.daemon.log_format,
            ),
            diff(
                "daemon.snapshot_interval_secs",
                &o.daemon.snapshot_interval_secs,
                &n.daemon.snapshot_interval_secs,
            ),
            diff("daemon.metrics", &o.daemon.metrics, &n.daemon.metrics),
            diff("cluster", o.cluster, n.cluster),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Refuses a reload to `new` (read from `file`) that changes a restart-only setting: the
    /// error names the first one and where `new` sets it, and lists the others after it.
    pub fn check_reload(&self, new: &Sections, file: &Path) -> Result<(), ConfigError> {
        let changed = self.restart_only_changes(new);
        let Some((first, rest)) = changed.split_first() else {
            return Ok(());
        };
        let also = if rest.is_empty() {
            String::new()
        } else {
            let keys: Vec<&str> = rest.iter().map(|c| c.key).collect();
            format!(" (also changed: {})", keys.join(", "))
        };
        Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            line: first.at.line,
            column: first.at.column,
            key: first.key.to_owned(),
            message: format!(
                "changed: takes effect on a restart (`systemctl restart limiter`), not a reload{also}"
            ),
        })
    }
}
