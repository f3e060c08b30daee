//! limiter's lab: what tests, shows and measures limiter, kept out of the product binary.
//!
//! `testbed` (a private world of namespaces, cgroup and bpffs, with the test HTTP server, clients
//! and push sender; the integration tests build on it), `demo` (`limiter-lab demo`, which
//! `limiter demo` runs) and `bench` (`cargo xtask bench`). The daemon they drive is always the
//! product binary `limiter`, run as a separate process.

pub mod bench;
pub mod demo;
pub mod testbed;
