//! Building the eBPF object (`limiter-ebpf`), shared by `cargo xtask build-ebpf` and
//! `limiter-user/build.rs` (which pulls this file in with `#[path]`), so there is one copy of the
//! command. Plain `std` only: the build script has no dependencies.
//!
//! The object is built by Debian's toolchain (`/usr/bin/cargo`, `/usr/bin/rustc` 1.96, LLVM 22)
//! with `-Z build-std=core` and linked by bpf-linker 0.13 (built against the same LLVM), never by
//! rustup's toolchains: see docs/development.md, "Toolchain".

// Each user of this file needs a different part of it.
#![allow(dead_code)]

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    io,
    os::{fd::AsFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Debian's cargo and rustc (packages `cargo-web`, `rustc-web`).
pub const CARGO: &str = "/usr/bin/cargo";
pub const RUSTC: &str = "/usr/bin/rustc";
/// Where `rust-web-src` puts the sources that `-Z build-std=core` compiles.
pub const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
pub const TARGET: &str = "bpfel-unknown-none";
/// `-C target-cpu=v3`: BPF atomics whose fetched value can be used; debuginfo + `--btf`: BTF, needed
/// by BTF-defined maps.
pub const RUSTFLAGS: [&str; 6] = [
    "-C",
    "target-cpu=v3",
    "-C",
    "debuginfo=2",
    "-C",
    "link-arg=--btf",
];
/// The bpf-linker release that links LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13";
pub const SETUP_HINT: &str = "the eBPF toolchain is missing: run `cargo xtask setup`";

/// The nested build's own target dir: it must not share the outer cargo's (its lock would deadlock
/// a build script).
pub fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("bpf")
}

/// Where the build leaves the object.
pub fn object_path(workspace: &Path) -> PathBuf {
    target_dir(workspace)
        .join(TARGET)
        .join("release")
        .join("limiter")
}

/// Files whose change must rebuild the object (directories are scanned recursively by cargo).
pub fn inputs(workspace: &Path) -> Vec<PathBuf> {
    vec![
        workspace.join("Cargo.toml"),
        workspace.join("limiter-ebpf").join("Cargo.toml"),
        workspace.join("limiter-ebpf").join("src"),
        workspace.join("limiter-common").join("Cargo.toml"),
        workspace.join("limiter-common").join("src"),
    ]
}

/// `$CARGO_HOME/bin`, where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home).join("bin")),
        _ => env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(".cargo").join("bin")),
    }
}

/// The inherited PATH, with `$CARGO_HOME/bin` appended when it is not on it already.
pub fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `name` on [`search_path`].
pub fn find_program(name: &str) -> Option<PathBuf> {
    env::split_paths(&search_path())
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

/// `Ok(version line)` when bpf-linker is found and is a 0.13 release, else why not.
pub fn check_bpf_linker() -> Result<String, String> {
    let Some(linker) = find_program("bpf-linker") else {
        return Err("bpf-linker is not on PATH nor in $CARGO_HOME/bin".to_owned());
    };
    let output = Command::new(&linker)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --version`: {e}", linker.display()))?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let wanted = format!("{BPF_LINKER_VERSION}.");
    if output.status.success() && version.split_whitespace().any(|w| w.starts_with(&wanted)) {
        Ok(version)
    } else {
        Err(format!(
            "{} is `{version}`, not bpf-linker {BPF_LINKER_VERSION} (the one that links LLVM 22)",
            linker.display()
        ))
    }
}

/// Everything the nested build needs that is missing (empty when it can run).
pub fn toolchain_problems() -> Vec<String> {
    let mut problems = Vec::new();
    for (path, package) in [
        (CARGO, "cargo-web"),
        (RUSTC, "rustc-web"),
        (RUST_SRC, "rust-web-src"),
    ] {
        if !Path::new(path).exists() {
            problems.push(format!("{path} is missing (Debian package {package})"));
        }
    }
    if let Err(problem) = check_bpf_linker() {
        problems.push(problem);
    }
    problems
}

/// Whether `key` is inherited from an outer cargo/rustup/clippy/make and must not reach the nested
/// cargo (it would change its toolchain, flags, target dir, profile or jobserver). The user's own
/// cargo settings that are about where and how to download (home, network, registries, colours)
/// stay.
fn is_inherited_build_var(key: &str) -> bool {
    const KEEP: [&str; 6] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    if key.starts_with("CARGO") || key.starts_with("__CARGO") {
        return !KEEP.iter().any(|keep| key.starts_with(keep));
    }
    matches!(
        key,
        "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "RUSTC"
            | "RUSTDOC"
            | "RUSTC_WRAPPER"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "RUSTC_LINKER"
            | "RUSTC_BOOTSTRAP"
            | "RUSTUP_TOOLCHAIN"
            | "CLIPPY_ARGS"
            | "CLIPPY_CONF_DIR"
            | "MAKEFLAGS"
            | "MFLAGS"
            | "TARGET"
            | "HOST"
            | "OUT_DIR"
            | "OPT_LEVEL"
            | "PROFILE"
            | "DEBUG"
            | "NUM_JOBS"
    )
}

/// A `Command` for `program` without the inherited build variables (the way aya-build does it), and
/// with `$CARGO_HOME/bin` on PATH.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(is_inherited_build_var) {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PATH", search_path());
    cmd
}

/// The nested build:
/// `cd limiter-ebpf && RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_ENCODED_RUSTFLAGS=…
///  /usr/bin/cargo build --release --target bpfel-unknown-none -Z build-std=core --target-dir …`.
pub fn build_command(workspace: &Path) -> Command {
    let mut cmd = clean_command(CARGO);
    cmd.current_dir(workspace.join("limiter-ebpf"))
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(target_dir(workspace))
        .stdin(Stdio::null());
    cmd
}

/// Runs the nested build and returns the object's path. Its stderr is inherited; with
/// `stdout_to_stderr` (a build script, whose stdout is read by cargo) so is its stdout.
pub fn build(workspace: &Path, stdout_to_stderr: bool) -> Result<PathBuf, String> {
    let problems = toolchain_problems();
    if !problems.is_empty() {
        return Err(format!("{SETUP_HINT}\n  - {}", problems.join("\n  - ")));
    }
    let mut cmd = build_command(workspace);
    if stdout_to_stderr {
        let stderr = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate stderr: {e}"))?;
        cmd.stdout(Stdio::from(stderr));
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}\n{SETUP_HINT}", describe(&cmd)))?;
    if !status.success() {
        return Err(format!(
            "the eBPF build failed ({status})\n  command: {}",
            describe(&cmd)
        ));
    }
    let object = object_path(workspace);
    if !object.is_file() {
        return Err(format!(
            "the eBPF build succeeded but left no object at {}",
            object.display()
        ));
    }
    Ok(object)
}

/// A shell-like rendering of what `cmd` runs: `(cd DIR && VAR=value … program args…)`. Only the
/// variables it sets are shown, not the ones it removes or the PATH.
pub fn describe(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value
            && key != "PATH"
        {
            let _ = write!(line, "{}={} ", key.to_string_lossy(), quote(value));
        }
    }
    line.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", quote(dir.as_os_str())),
        None => line,
    }
}

/// Quotes `s` for a POSIX shell when needed (`$'…'` for control characters such as `\x1f`).
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else if s.chars().any(|c| c.is_ascii_control()) {
        let mut quoted = String::from("$'");
        for c in s.chars() {
            match c {
                '\'' | '\\' => {
                    quoted.push('\\');
                    quoted.push(c);
                }
                c if c.is_ascii_control() => {
                    let _ = write!(quoted, "\\x{:02x}", c as u32);
                }
                c => quoted.push(c),
            }
        }
        quoted.push('\'');
        quoted
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
