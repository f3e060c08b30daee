//! Test hooks: settings through which the integration tests reach what they cannot wait for (a
//! day change, a daemon away for days, sockets that share a slot). All of them are ignored unless
//! the daemon runs with `LIMITER_TEST_HOOKS=1`.

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
