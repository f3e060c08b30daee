//! Test hooks: settings through which the integration tests reach what they cannot wait for (a
//! day change, a daemon away for days, sockets that share a slot, socket tables that fill, a
//! daemon held at one point of its start).
//!
//! They exist only in builds with the `test-hooks` feature (the integration tests' build), and
//! there only when the daemon runs with `LIMITER_TEST_HOOKS=1`. Without the feature every hook
//! is a constant: [`enabled`] is false, [`value`] is `None`, [`pause`] does nothing, so the
//! product binary reads no test setting.

/// The variable that turns the hooks on (in a build with the `test-hooks` feature).
pub const ENABLE: &str = "LIMITER_TEST_HOOKS";

/// Whether test hooks are on.
#[cfg(feature = "test-hooks")]
pub fn enabled() -> bool {
    std::env::var_os(ENABLE).is_some()
}

/// Whether test hooks are on: never, in a build without the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
pub const fn enabled() -> bool {
    false
}

/// The hook variable `name`, parsed, when hooks are on and it parses.
#[cfg(feature = "test-hooks")]
pub fn value<T: std::str::FromStr>(name: &str) -> Option<T> {
    if !enabled() {
        return None;
    }
    std::env::var(name).ok()?.parse().ok()
}

/// The hook variable `name`: never set, in a build without the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn value<T: std::str::FromStr>(_name: &str) -> Option<T> {
    None
}

/// When the hook variable `name` names a file: creates it and waits until the test removes it
/// (at most a minute), so that a test can act at this exact point of the daemon's work. While
/// the file's directory does not exist the hook does nothing: a test arms it by creating the
/// directory.
#[cfg(feature = "test-hooks")]
pub fn pause(name: &str) {
    let Some(path) = value::<std::path::PathBuf>(name) else {
        return;
    };
    if std::fs::write(&path, b"paused\n").is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A pause point: nothing, in a build without the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause(_name: &str) {}
