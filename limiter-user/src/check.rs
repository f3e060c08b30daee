//! `limiter check`: the config and the kernel's prerequisites, one line per check.

use std::path::Path;

use crate::{config::Config, loader};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const MIN_KERNEL: (u32, u32) = (6, 1);

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, result: Result<String, String>) -> Check {
    match result {
        Ok(detail) => Check {
            name,
            ok: true,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            detail,
        },
    }
}

fn fs_magic(path: &Path) -> Result<i64, String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: zeroed statfs is a valid out value; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(st.f_type as i64)
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs every check; the config check comes first and the others use its paths when it passed.
pub fn run(config_path: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let cfg = Config::load(config_path);
    out.push(check(
        "config",
        cfg.as_ref().map_err(|e| e.to_string()).map(|c| {
            let keys = match &c.keys {
                Some(k) => format!(", {} API keys", k.entries.len()),
                None => String::new(),
            };
            format!(
                "{}: {} orgs, ports {:?}{keys}",
                config_path.display(),
                c.orgs.len(),
                c.api.ports
            )
        }),
    ));
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    out.push(check(
        "privileges",
        if euid == 0 {
            Ok("running as root".into())
        } else {
            Err(format!(
                "running as uid {euid}: loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
            ))
        },
    ));
    let release = uname_release();
    out.push(check(
        "kernel",
        match kernel_version(&release) {
            Some(v) if v >= MIN_KERNEL => Ok(format!("{release} (>= 6.1)")),
            Some(_) => Err(format!("{release}: limiter needs Linux 6.1 or newer")),
            None => Err(format!("cannot read the kernel version ({release:?})")),
        },
    ));
    if let Ok(cfg) = &cfg {
        out.push(check(
            "cgroup v2",
            match fs_magic(&cfg.api.cgroup) {
                Ok(CGROUP2_SUPER_MAGIC) => Ok(format!(
                    "{} is a cgroup2 directory",
                    cfg.api.cgroup.display()
                )),
                Ok(_) => Err(format!(
                    "{} is not a cgroup2 directory (set api.cgroup to a cgroup v2 path)",
                    cfg.api.cgroup.display()
                )),
                Err(e) => Err(e),
            },
        ));
    }
    if let Ok(cfg) = &cfg {
        out.push(check(
            "bpffs",
            crate::pins::prepare(&cfg.daemon.pin_dir, crate::pins::Capacity::for_config(cfg))
                .map(|dir| format!("pins go to {}", dir.layout.display()))
                .map_err(|e| e.to_string()),
        ));
    }
    let programs = loader::load_object().and_then(|mut ebpf| loader::load_programs(&mut ebpf));
    out.push(check(
        "eBPF programs",
        programs
            .map(|()| "sock_ops, stream verdict, 429 writer, sk_msg and XDP load and verify".into())
            .map_err(|e| format!("the kernel refused the programs: {e}")),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("6.1.0").is_some_and(|v| v >= MIN_KERNEL));
        assert!(kernel_version("5.19.0").is_some_and(|v| v < MIN_KERNEL));
    }
}
