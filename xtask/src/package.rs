//! `cargo xtask package`: the Debian package, built with `dpkg-deb --build` from a staging tree,
//! and its check (`cargo xtask package --verify`, also a step of `cargo xtask test`): the
//! package is installed into a throwaway root with dpkg itself, its files, modes, conffile and
//! maintainer scripts are checked, the installed `limiter check` runs on the shipped config,
//! and the package is purged again.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

/// The package's name, and the name of its files under /usr/share/doc.
const NAME: &str = "limiter";
/// The shipped config, a conffile: an upgrade never overwrites the operator's edits.
const CONFFILE: &str = "/etc/limiter/limiter.toml";
/// The unit refers to the hand-installed binary; the package's is in /usr/bin.
const UNIT_EXEC_BY_HAND: &str = "ExecStart=/usr/local/bin/limiter ";
const UNIT_EXEC_PACKAGED: &str = "ExecStart=/usr/bin/limiter ";

/// What goes where: (source relative to the workspace, path in the package, mode).
const FILES: [(&str, &str, u32); 15] = [
    (
        "packaging/limiter.service",
        "lib/systemd/system/limiter.service",
        0o644,
    ),
    ("packaging/limiter.toml", "etc/limiter/limiter.toml", 0o644),
    (
        "packaging/api-after-limiter.conf",
        "usr/share/doc/limiter/api-after-limiter.conf",
        0o644,
    ),
    (
        "packaging/limiter.toml",
        "usr/share/doc/limiter/examples/limiter.toml",
        0o644,
    ),
    (
        "packaging/limiter.service",
        "usr/share/doc/limiter/limiter.service.example",
        0o644,
    ),
    // The README's links point into docs/: the same layout beside it.
    ("README.md", "usr/share/doc/limiter/README.md", 0o644),
    (
        "docs/architecture.md",
        "usr/share/doc/limiter/docs/architecture.md",
        0o644,
    ),
    ("docs/cli.md", "usr/share/doc/limiter/docs/cli.md", 0o644),
    (
        "docs/configuration.md",
        "usr/share/doc/limiter/docs/configuration.md",
        0o644,
    ),
    (
        "docs/development.md",
        "usr/share/doc/limiter/docs/development.md",
        0o644,
    ),
    (
        "docs/operations.md",
        "usr/share/doc/limiter/docs/operations.md",
        0o644,
    ),
    (
        "docs/operator-guide.md",
        "usr/share/doc/limiter/docs/operator-guide.md",
        0o644,
    ),
    (
        "docs/performance.md",
        "usr/share/doc/limiter/docs/performance.md",
        0o644,
    ),
    (
        "docs/semantics.md",
        "usr/share/doc/limiter/docs/semantics.md",
        0o644,
    ),
    ("LICENSE-NOTE", "usr/share/doc/limiter/copyright", 0o644),
];
const SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];

fn run(cmd: &mut Command) -> Result<String> {
    let what = super::ebpf::describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// The version of limiter-user's manifest (the binary's `--version`).
fn version(workspace: &Path) -> Result<String> {
    let manifest = workspace.join("limiter-user/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.strip_prefix("version")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("{}: no version", manifest.display()))
}

/// `Depends:` for the binary, from dpkg-shlibdeps (which wants to run beside a debian/control).
fn depends(binary: &Path, scratch: &Path) -> Result<String> {
    let dir = scratch.join("shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(dir.join("debian/control"), "")?;
    let out = run(Command::new("dpkg-shlibdeps")
        .current_dir(&dir)
        .args(["-O", "-e"])
        .arg(binary))
    .context("working out the package's Depends (dpkg-shlibdeps is in dpkg-dev)")?;
    let _ = fs::remove_dir_all(&dir);
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .filter(|d| d.contains("libc6"))
        .with_context(|| format!("dpkg-shlibdeps printed no libc6 dependency: {out}"))
}

/// Stages and builds the package from an already built release binary; returns its path.
pub fn build(workspace: &Path, target: &Path) -> Result<PathBuf> {
    let binary = target.join("release").join(NAME);
    ensure!(
        binary.is_file(),
        "no release binary at {}",
        binary.display()
    );
    let version = version(workspace)?;
    let arch = run(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out_dir = target.join("debian");
    let stage = out_dir.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    // A file's place in the tree, its directories created 0755 whatever the umask.
    let place = |rel: &str| -> Result<PathBuf> {
        let dest = stage.join(rel);
        let mut dir = dest.parent().map(Path::to_path_buf);
        fs::create_dir_all(dir.as_deref().unwrap_or(&stage))?;
        while let Some(d) = dir.filter(|d| d.starts_with(&stage)) {
            set_mode(&d, 0o755)?;
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(dest)
    };

    let bin = place("usr/bin/limiter")?;
    fs::copy(&binary, &bin).with_context(|| format!("copying {}", binary.display()))?;
    // The release binary carries debug sections of its dependencies; the package does not.
    run(Command::new("strip").arg("--strip-debug").arg(&bin))?;
    set_mode(&bin, 0o755)?;
    for (src, rel, mode) in FILES {
        let dest = place(rel)?;
        let text = if src == "LICENSE-NOTE" {
            copyright()
        } else {
            fs::read_to_string(workspace.join(src)).with_context(|| format!("reading {src}"))?
        };
        let text = if rel.starts_with("lib/systemd/") {
            ensure!(
                text.contains(UNIT_EXEC_BY_HAND),
                "{src}: no `{UNIT_EXEC_BY_HAND}` line to point at /usr/bin"
            );
            text.replace(UNIT_EXEC_BY_HAND, UNIT_EXEC_PACKAGED)
        } else {
            text
        };
        fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
        set_mode(&dest, mode)?;
    }

    let control_dir = stage.join("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    set_mode(&control_dir, 0o755)?;
    for script in SCRIPTS {
        let dest = control_dir.join(script);
        fs::copy(workspace.join("packaging/debian").join(script), &dest)
            .with_context(|| format!("copying packaging/debian/{script}"))?;
        set_mode(&dest, 0o755)?;
    }
    fs::write(control_dir.join("conffiles"), format!("{CONFFILE}\n"))?;
    set_mode(&control_dir.join("conffiles"), 0o644)?;
    let depends = depends(&bin, &out_dir)?;
    let installed_kib = run(Command::new("du")
        .args(["-sk", "--exclude=DEBIAN"])
        .arg(&stage))?
    .split_whitespace()
    .next()
    .unwrap_or("0")
    .to_string();
    let control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: limiter maintainers <root@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: net\n\
         Priority: optional\n\
         Description: per-organization API limits enforced in the Linux kernel (eBPF)\n \
         limiter counts every inbound HTTP/1.x request per customer organization in the\n \
         kernel of each API host and answers with HTTP 429 once an organization has used\n \
         its daily quota, without a gateway and without changing the application.\n \
         .\n \
         Edit /etc/limiter/limiter.toml, run `limiter check`, then\n \
         `systemctl enable --now limiter`.\n"
    );
    fs::write(control_dir.join("control"), control)?;
    set_mode(&control_dir.join("control"), 0o644)?;
    // md5sums of everything but the conffile (dpkg keeps the conffile's own).
    let mut sums = String::new();
    for (rel, _) in data_files(&stage)? {
        if format!("/{rel}") == CONFFILE {
            continue;
        }
        sums += &run(Command::new("md5sum").arg(&rel).current_dir(&stage))?;
    }
    fs::write(control_dir.join("md5sums"), sums)?;
    set_mode(&control_dir.join("md5sums"), 0o644)?;

    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

/// The files of the staged tree (DEBIAN excluded), relative, sorted.
fn data_files(stage: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut dirs = vec![stage.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(stage)?.to_string_lossy().into_owned();
            if rel == "DEBIAN" {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push((rel, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: limiter\n\n\
     Files: *\n\
     Copyright: the limiter authors\n\
     License: MIT or Apache-2.0\n \
     On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.\n"
        .to_string()
}

/// A throwaway root for dpkg, removed on drop (also when a check fails).
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(fs::symlink_metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Installs `deb` into a throwaway root with dpkg, checks what it put there, runs the installed
/// `limiter check` on the shipped config, purges the package and checks that nothing stays.
pub fn verify(deb: &Path, scratch: &Path) -> Result<()> {
    let fields = run(Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .args(["Package", "Depends"]))?;
    ensure!(
        fields.contains(&format!("Package: {NAME}")) && fields.contains("libc6 ("),
        "control fields: {fields}"
    );

    fs::create_dir_all(scratch)?;
    let root = Root(scratch.join(format!("root-{}", std::process::id())));
    let _ = fs::remove_dir_all(&root.0);
    let admin = root.0.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(d))?;
    }
    fs::write(admin.join("status"), "")?;
    fs::write(admin.join("available"), "")?;
    // dpkg --root with chrootless scripts: the maintainer scripts run on this system's shell
    // with DPKG_ROOT set, so postinst works on the throwaway root. The root has no libc6, hence
    // --force-depends.
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.0.display()))
            .arg("--log=/dev/null")
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args);
        cmd
    };
    run(dpkg(&["--install"]).arg(deb))?;

    let at = |p: &str| root.0.join(p.trim_start_matches('/'));
    let bin = at("/usr/bin/limiter");
    for (path, mode) in [
        ("/usr/bin/limiter", 0o755),
        ("/lib/systemd/system/limiter.service", 0o644),
        (CONFFILE, 0o644),
        ("/usr/share/doc/limiter/api-after-limiter.conf", 0o644),
        ("/usr/share/doc/limiter/README.md", 0o644),
        ("/usr/share/doc/limiter/docs/operator-guide.md", 0o644),
        ("/usr/share/doc/limiter/docs/configuration.md", 0o644),
        ("/usr/share/doc/limiter/copyright", 0o644),
        ("/var/lib/limiter", 0o700),
    ] {
        let got = mode_of(&at(path))?;
        ensure!(got == mode, "{path}: mode {got:o}, expected {mode:o}");
    }
    let unit = fs::read_to_string(at("/lib/systemd/system/limiter.service"))?;
    for line in [
        UNIT_EXEC_PACKAGED.trim_end(),
        "Type=notify",
        "StateDirectoryMode=0700",
    ] {
        ensure!(
            unit.contains(line),
            "the installed unit lacks {line:?}:\n{unit}"
        );
    }
    let dropin = fs::read_to_string(at("/usr/share/doc/limiter/api-after-limiter.conf"))?;
    ensure!(
        dropin.contains("After=limiter.service") && dropin.contains("Wants=limiter.service"),
        "the drop-in does not order the API after limiter:\n{dropin}"
    );
    let status = run(&mut dpkg(&["--status", NAME]))?;
    ensure!(
        status.contains("Status: install ok installed")
            && status
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{CONFFILE} "))),
        "dpkg does not list {CONFFILE} as a conffile:\n{status}"
    );
    let version = run(Command::new(&bin).arg("--version"))?;
    ensure!(version.starts_with("limiter "), "{version}");
    // The product carries no test hooks: its `debug` commands exist only with `test-hooks`.
    let hooks = Command::new(&bin)
        .args(["debug", "--help"])
        .stdin(Stdio::null())
        .output()
        .context("running the installed limiter")?;
    ensure!(
        !hooks.status.success(),
        "the packaged limiter was built with the test hooks (it has a `debug` command)"
    );

    // `limiter check` mounts bpffs and creates its pin directory: in a mount namespace of its
    // own, on a private bpffs, so the check leaves nothing behind on this host.
    let check = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t bpf bpf /sys/fs/bpf && exec \"$0\" check --config \"$1\"")
        .arg(&bin)
        .arg(at(CONFFILE))
        .stdin(Stdio::null())
        .output()
        .context("running the installed limiter check")?;
    let report = String::from_utf8_lossy(&check.stdout);
    println!("installed `limiter check` on the shipped config:\n{report}");
    for name in ["config", "privileges", "bpffs", "eBPF programs"] {
        ensure!(
            report
                .lines()
                .any(|l| l.starts_with("ok ") && l[4..].trim_start().starts_with(name)),
            "`limiter check` did not pass {name:?}:\n{report}{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    run(&mut dpkg(&["--purge", NAME]))?;
    for gone in [
        "/usr/bin/limiter",
        CONFFILE,
        "/lib/systemd/system/limiter.service",
        "/var/lib/limiter",
    ] {
        ensure!(!at(gone).exists(), "{gone} is still there after a purge");
    }
    println!(
        "package: {} installs, checks and purges cleanly",
        deb.display()
    );
    Ok(())
}
