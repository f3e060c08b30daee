//! limiter's user side: the daemon, the CLI and the self-contained demo.
//!
//! One module per concern: `config` (the TOML file), `clock` (quota days), `orgs` (org ids and address table), `loader`
//! (the kernel programs and maps), `counters` (reading and writing usage), `report` (the usage
//! report), `control` (the CLI ↔ daemon socket), `daemon` (`limiter run`), `notify` (systemd readiness), `metrics` (Prometheus), `sync` (the cluster's Redis), `snapshot` (day files), `pins` (bpffs), `bpf` (the bpf(2) commands aya lacks), `logging` (text/JSON
//! log lines), `check` (`limiter check`), `hooks` (test hooks), `testbed` (namespaces, cgroup, bpffs, test HTTP server and
//! clients, for the demo and the integration tests) and `demo` (`limiter demo`).

pub mod bench;
pub mod bpf;
pub mod check;
pub mod clock;
pub mod config;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod demo;
pub mod hooks;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod orgs;
pub mod pins;
pub mod report;
pub mod snapshot;
pub mod sync;
pub mod testbed;
