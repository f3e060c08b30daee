//! limiter's user side: the daemon and the CLI of the `limiter` binary.
//!
//! One module per concern: `config` (the TOML file), `clock` (quota days), `orgs` (org ids and address table), `loader`
//! (the kernel programs and maps), `counters` (reading and writing usage), `report` (the usage
//! report), `control` (the CLI ↔ daemon socket), `daemon` (`limiter run`), `notify` (systemd readiness), `metrics` (Prometheus), `sync` (the cluster's Redis), `snapshot` (day files), `secret` (the API keys' digest key), `trace` (`limiter trace`), `pins` (bpffs), `bpf` (the bpf(2) commands aya lacks), `logging` (text/JSON
//! log lines), `check` (`limiter check`) and `hooks` (test hooks, compiled in only with the
//! `test-hooks` feature). The test world, the demo and the bench live in the `limiter-lab` crate.

pub mod bpf;
pub mod check;
pub mod clock;
pub mod config;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod hooks;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod orgs;
pub mod pins;
pub mod report;
pub mod secret;
pub mod snapshot;
pub mod sync;
pub mod trace;
