//! `cargo xtask …`: the project's build, test, package and demo entry points (the toolchain is
//! described in docs/development.md).

mod ebpf;
mod package;

use std::{
    env,
    ffi::OsString,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the eBPF build needs (Debian's rustc/cargo 1.96 with rust-src, and what
/// bpf-linker links against).
const TOOLCHAIN_PACKAGES: [&str; 7] = [
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages the tests, the demo, the benchmark and the Debian package (dpkg-shlibdeps)
/// use.
const TEST_PACKAGES: [&str; 9] = [
    "iproute2",
    "curl",
    "python3",
    "nginx",
    "wrk",
    "redis-server",
    "dpkg-dev",
    // The identity tests' peers: a load balancer with the PROXY protocol, and the certificates
    // and raw TLS client they use.
    "haproxy",
    "openssl",
];
const BPF_LINKER_INSTALL: &str = "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version ^0.13 --no-default-features --features llvm-22";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and demo the limiter")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install whatever is missing of the eBPF toolchain and the test tools (Debian packages,
    /// bpf-linker); does nothing when all is present.
    Setup,
    /// Build the eBPF object (target/bpf/bpfel-unknown-none/release/limiter) and print its path.
    BuildEbpf,
    /// Setup, then `cargo build --release` of the workspace (the `limiter` binary embeds the eBPF
    /// object).
    Build,
    /// Setup, build, run every test (LIMITER_BIN and LIMITER_LAB_BIN point the integration tests
    /// at the debug binaries, `limiter` with its test hooks), then, on a full run (no arguments),
    /// build and verify the Debian package, then `cargo fmt --check` and `cargo clippy -D warnings`.
    Test {
        /// Passed to `cargo test` (e.g. `-- -p integration-tests quota -- --nocapture`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Setup, `cargo build --release -p limiter-user`, then build the Debian package
    /// target/debian/limiter_<version>_<arch>.deb with dpkg-deb.
    Package {
        /// Then install it into a throwaway root with dpkg, check its files, modes, conffile and
        /// scripts, run its `limiter check` on the shipped config, and purge it (root).
        #[arg(long)]
        verify: bool,
    },
    /// Setup, `cargo build --release -p limiter-user -p limiter-lab`, then run `limiter demo`
    /// (which runs `limiter-lab demo`).
    Demo {
        /// Passed to `limiter demo`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Side-by-side benchmark (nginx + wrk, no limiter vs limiter, 429s, neighbors, scale) by
    /// `limiter-lab bench`; writes target/bench/bench.{json,md}.
    Bench {
        /// Short runs, under two minutes.
        #[arg(long)]
        quick: bool,
        /// Only the kernel-cost runs (bpf_stats), for tuning the programs.
        #[arg(long)]
        cost_only: bool,
        /// Only the neighbors scenario.
        #[arg(long)]
        neighbors_only: bool,
        /// Another `limiter` binary to alternate with in the kernel-cost runs.
        #[arg(long, value_name = "LIMITER")]
        against: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test { args } => test(&args),
        Cmd::Package { verify } => package(verify),
        Cmd::Demo { args } => demo(&args),
        Cmd::Bench {
            quick,
            cost_only,
            neighbors_only,
            against,
        } => bench(quick, cost_only, neighbors_only, against.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of xtask's manifest directory.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
}

/// The workspace's target directory (CARGO_TARGET_DIR when set).
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace().join(dir),
        None => workspace().join("target"),
    }
}

/// The host `cargo`: the one that runs xtask (rustup's stable), from PATH.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace());
    cmd
}

/// Prints what `cmd` runs, runs it with inherited stdio, and fails unless it exits 0.
fn run(cmd: &mut Command) -> Result<()> {
    println!("==> {}", ebpf::describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", ebpf::describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", ebpf::describe(cmd));
    }
    Ok(())
}

/// Test counts summed over every `test result:` line of a cargo test run.
#[derive(Default)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestCounts {
    /// Adds the counts of a line like `test result: ok. 6 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Like `run`, echoing stdout line by line while counting the test results in it.
fn run_counting(cmd: &mut Command, counts: &mut TestCounts) -> Result<()> {
    use std::io::BufRead as _;
    println!("==> {}", ebpf::describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", ebpf::describe(cmd)))?;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            counts.add_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed ({status})", ebpf::describe(cmd));
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn package_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("cannot run dpkg-query (this needs Debian)")?;
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout).trim() == "install ok installed")
}

fn missing_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &package in packages {
        if !package_installed(package)? {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Installs whatever is missing (as root), or says what is missing and how to install it.
fn setup() -> Result<()> {
    let all: Vec<&str> = TOOLCHAIN_PACKAGES
        .iter()
        .chain(&TEST_PACKAGES)
        .copied()
        .collect();
    println!(
        "==> checking Debian packages ({}) and bpf-linker {}",
        all.join(" "),
        ebpf::BPF_LINKER_VERSION
    );
    let missing = missing_packages(&all)?;
    let linker = ebpf::check_bpf_linker();
    if missing.is_empty()
        && let Ok(version) = &linker
    {
        println!(
            "setup: all {} packages and {version} are present; nothing to do",
            all.len()
        );
        return Ok(());
    }
    if !missing.is_empty() {
        println!("setup: missing Debian packages: {}", missing.join(" "));
    }
    if let Err(problem) = &linker {
        println!("setup: {problem}");
    }
    if !is_root() {
        let mut how = String::new();
        if !missing.is_empty() {
            how += &format!(
                "\n  apt-get update && apt-get install -y {}",
                missing.join(" ")
            );
        }
        if linker.is_err() {
            how += &format!("\n  {BPF_LINKER_INSTALL}");
        }
        bail!(
            "installing what is missing needs root: run `cargo xtask setup` as root, or run:{how}"
        );
    }

    if !missing.is_empty() {
        install_packages(&missing)?;
    }
    if linker.is_err() {
        run(ebpf::clean_command("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
            ])
            .args(["--features", "llvm-22"])
            .stdin(Stdio::null()))?;
    }

    let still_missing = missing_packages(&all)?;
    if !still_missing.is_empty() {
        bail!(
            "still missing after installing: {}",
            still_missing.join(" ")
        );
    }
    let version = ebpf::check_bpf_linker().map_err(anyhow::Error::msg)?;
    println!(
        "setup: done; all {} packages and {version} are present",
        all.len()
    );
    Ok(())
}

/// `apt-get update` then `apt-get install -y`, non-interactively. Services that the packages
/// (nginx, redis-server) would start are kept from starting with a policy-rc.d, unless the system
/// already has one: the tests start their own instances.
fn install_packages(packages: &[&str]) -> Result<()> {
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    let own_policy = !Path::new(POLICY).exists();
    if own_policy {
        std::fs::write(
            POLICY,
            "#!/bin/sh\n# written by cargo xtask setup while installing\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY}"))?;
        std::fs::set_permissions(POLICY, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .stdin(Stdio::null());
        cmd
    };
    let result =
        run(&mut apt(&["update"])).and_then(|()| run(apt(&["install", "-y"]).args(packages)));
    if own_policy {
        let _ = std::fs::remove_file(POLICY);
    }
    result
}

/// Fails (pointing at `cargo xtask setup`) unless the eBPF toolchain is complete.
fn check_toolchain() -> Result<()> {
    let mut problems = ebpf::toolchain_problems();
    let missing = missing_packages(&TOOLCHAIN_PACKAGES)?;
    if !missing.is_empty() {
        problems.push(format!("missing Debian packages: {}", missing.join(" ")));
    }
    if !problems.is_empty() {
        bail!("{}\n  - {}", ebpf::SETUP_HINT, problems.join("\n  - "));
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    check_toolchain()?;
    let cmd = ebpf::build_command(workspace());
    println!("==> {}", ebpf::describe(&cmd));
    let object = ebpf::build(workspace(), false).map_err(anyhow::Error::msg)?;
    println!("eBPF object: {}", object.display());
    Ok(())
}

fn build() -> Result<()> {
    setup()?;
    run(cargo().args(["build", "--release"]))?;
    println!(
        "built: {}",
        target_dir().join("release").join("limiter").display()
    );
    Ok(())
}

fn package(verify: bool) -> Result<()> {
    setup()?;
    run(cargo().args(["build", "--release", "-p", "limiter-user"]))?;
    let deb = package::build(workspace(), &target_dir())?;
    println!("built: {}", deb.display());
    if verify {
        package::verify(&deb, &target_dir().join("debian"))?;
    }
    Ok(())
}

/// `cargo build --release` of the product binary and the lab binary (without the tests, so
/// `limiter` has no test hooks).
fn build_release_with_lab() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "limiter-user",
        "-p",
        "limiter-lab",
    ]))
}

fn demo(args: &[OsString]) -> Result<()> {
    setup()?;
    build_release_with_lab()?;
    let mut cmd = Command::new(target_dir().join("release").join("limiter"));
    cmd.arg("demo").args(args);
    println!("==> {}", ebpf::describe(&cmd));
    // Only returns on failure; otherwise the demo's exit code is ours.
    let error = cmd.exec();
    Err(error).with_context(|| format!("cannot run {}", ebpf::describe(&cmd)))
}

fn bench(quick: bool, cost_only: bool, neighbors_only: bool, against: Option<&Path>) -> Result<()> {
    setup()?;
    build_release_with_lab()?;
    let mut cmd = Command::new(target_dir().join("release").join("limiter-lab"));
    cmd.arg("bench")
        .arg("--out")
        .arg(target_dir().join("bench"));
    if quick {
        cmd.arg("--quick");
    }
    if cost_only {
        cmd.arg("--cost-only");
    }
    if neighbors_only {
        cmd.arg("--neighbors-only");
    }
    if let Some(other) = against {
        cmd.arg("--against").arg(other);
    }
    run(&mut cmd)
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

impl Outcome {
    fn of(result: &Result<()>) -> Self {
        if result.is_ok() {
            Self::Ok
        } else {
            Self::Failed
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "FAILED",
            Self::Skipped => "skipped",
        }
    }
}

fn test(args: &[OsString]) -> Result<()> {
    setup()?;
    let limiter_bin = target_dir().join("debug").join("limiter");
    let lab_bin = target_dir().join("debug").join("limiter-lab");

    // Everything the tests need, the `limiter` and `limiter-lab` binaries included (default
    // members: not limiter-ebpf, which only builds for bpfel via build.rs). With the test targets
    // in the build, integration-tests' dev-dependency gives `limiter` its test hooks.
    let built = run(cargo().args(["build", "--all-targets"]));
    let mut counts = TestCounts::default();
    let missing = [&limiter_bin, &lab_bin].into_iter().find(|b| !b.is_file());
    let tests = match (&built, missing) {
        (Ok(()), Some(bin)) => Err(anyhow::anyhow!("no binary at {}", bin.display())),
        (Ok(()), None) => run_counting(
            cargo()
                .env("LIMITER_BIN", &limiter_bin)
                .env("LIMITER_LAB_BIN", &lab_bin)
                .args(["test", "--no-fail-fast"])
                .args(args),
            &mut counts,
        ),
        (Err(_), _) => Ok(()),
    };
    // The package on a full run only: a filtered run is about the tests it names.
    let packaged = if args.is_empty() {
        Some(package(true))
    } else {
        println!("==> package: skipped (arguments given; `cargo xtask package --verify` runs it)");
        None
    };
    // Style checks come after the tests, so they never hide a test failure, but still fail the run.
    let fmt = run(cargo().args(["fmt", "--all", "--check"]));
    let clippy = run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]));

    let mut steps = vec![
        ("build", Outcome::of(&built)),
        (
            "tests",
            if built.is_ok() {
                Outcome::of(&tests)
            } else {
                Outcome::Skipped
            },
        ),
    ];
    if let Some(packaged) = &packaged {
        if let Err(e) = packaged {
            eprintln!("xtask: package: {e:#}");
        }
        steps.push(("package", Outcome::of(packaged)));
    }
    steps.extend([("fmt", Outcome::of(&fmt)), ("clippy", Outcome::of(&clippy))]);
    let all_ok = steps.iter().all(|(_, outcome)| *outcome == Outcome::Ok);
    let summary: Vec<String> = steps
        .iter()
        .map(|(step, outcome)| format!("{step} {}", outcome.word()))
        .collect();
    println!();
    println!(
        "cargo xtask test: {} ({})",
        if all_ok { "PASSED" } else { "FAILED" },
        summary.join(", ")
    );
    // The plain closing line CI reads.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    if all_ok {
        Ok(())
    } else {
        let failed: Vec<&str> = steps
            .iter()
            .filter(|(_, outcome)| *outcome != Outcome::Ok)
            .map(|(step, _)| *step)
            .collect();
        bail!("failed or skipped: {}", failed.join(", "))
    }
}
