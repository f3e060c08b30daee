//! Test hooks: settings through which the integration tests reach what they cannot wait for (a
//! day change, a daemon away for days, sockets that share a slot, socket tables that fill, a
//! daemon held at one point of its start). All of them are ignored unless the daemon runs with
//! `LIMITER_TEST_HOOKS=1`.

/// The variable that turns the hooks on.
pub const ENABLE: &str = "LIMITER_TEST_HOOKS";

/// Whether test hooks are on.
pub fn enabled() -> bool {
    std::env::var_os(ENABLE).is_some()
}

/// The hook variable `name`, parsed, when hooks are on and it parses.
pub fn value<T: std::str::FromStr>(name: &str) -> Option<T> {
    if !enabled() {
        return None;
    }
    std::env::var(name).ok()?.parse().ok()
}

/// When the hook variable `name` names a file: creates it and waits until the test removes it
/// (at most a minute), so that a test can act at this exact point of the daemon's work. While
/// the file's directory does not exist the hook does nothing: a test arms it by creating the
/// directory.
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
