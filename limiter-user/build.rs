//! Builds the eBPF object and hands its path to the daemon as `LIMITER_EBPF_OBJ`, which embeds it
//! (`aya::include_bytes_aligned!(env!("LIMITER_EBPF_OBJ"))`), so `limiter` is a single file.
//!
//! The nested build is the one `cargo xtask build-ebpf` runs (one copy, in xtask/src/ebpf.rs): Debian's
//! cargo/rustc with bpf-linker, in its own target dir (target/bpf). Setting `LIMITER_EBPF_OBJ` to an
//! existing object skips the build and embeds that file instead.

#[path = "../xtask/src/ebpf.rs"]
mod ebpf;

use std::{
    env,
    path::{Path, PathBuf},
    process::ExitCode,
};

const OBJ_VAR: &str = "LIMITER_EBPF_OBJ";

fn main() -> ExitCode {
    match run() {
        Ok(object) => {
            println!("cargo::rustc-env={OBJ_VAR}={}", object.display());
            ExitCode::SUCCESS
        }
        Err(message) => {
            // Cargo prints these as errors even without -v; stderr (shown on failure) has the
            // nested build's output.
            for line in message.lines() {
                println!("cargo::error={}", line.trim());
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<PathBuf, String> {
    println!("cargo::rerun-if-env-changed={OBJ_VAR}");
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or("limiter-user has no parent directory")?
        .to_path_buf();

    if let Some(given) = env::var_os(OBJ_VAR).filter(|v| !v.is_empty()) {
        let object = workspace.join(&given); // relative to the workspace root; absolute stays so
        let object = object
            .canonicalize()
            .map_err(|e| format!("{OBJ_VAR}={}: cannot use it: {e}", given.to_string_lossy()))?;
        if !object.is_file() {
            return Err(format!("{OBJ_VAR}={} is not a file", object.display()));
        }
        println!("cargo::rerun-if-changed={}", object.display());
        return Ok(object);
    }

    for input in ebpf::inputs(&workspace) {
        println!("cargo::rerun-if-changed={}", input.display());
    }
    eprintln!(
        "building the eBPF object: {}",
        ebpf::describe(&ebpf::build_command(&workspace))
    );
    ebpf::build(&workspace, true)
}
