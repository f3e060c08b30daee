//! The nginx the bench measures against: one worker, no access log, one server with a location
//! per kind of row.
//!
//! nginx runs `return` in its rewrite phase, before `limit_req` and `limit_conn` (preaccess), so
//! a location that claims a limit serves a static file (`try_files`, content phase) instead.

use std::{net::Ipv4Addr, path::Path};

use super::PORT;

/// The same server behind `listen … proxy_protocol`: every connection starts with a PROXY
/// header (the `identify_by = ["proxy_protocol"]` rows).
pub const PROXY_PORT: u16 = 8081;

/// The static file every limited location serves (under `<dir>/www`).
pub const FILE: &str = "ok.txt";

/// Passing rows: both sides are the same nginx, so the cheapest answer will do.
pub const RETURN_200: &str = "/";
/// The same file without limits: the limiter side of rows whose nginx side serves the file.
pub const STATIC: &str = "/static/ok.txt";
/// The file behind `limit_req` + `limit_conn` set far above the load (nothing is refused), and
/// a probe zone keyed by the [`PROBE_HEADER`] (absent in the measured load, so not accounted).
pub const LIMITED: &str = "/limited/ok.txt";
/// The file behind a `limit_req` of one request a minute per client address: nearly every
/// request gets limit_req's 429.
pub const REFUSE: &str = "/refuse/ok.txt";
/// nginx's own static 429 (`return 429`).
pub const RETURN_429: &str = "/nginx429";
/// The neighbors' API with nginx refusing the flooder: a `limit_req` keyed by the flooder's
/// address only (one request a second) beside the generous per-address one of [`LIMITED`].
pub const NEIGHBORS: &str = "/neighbors/ok.txt";
/// A request with this header is accounted in the probe zone of [`LIMITED`] (one a minute per
/// value): its second request must get a 429, which proves the location's limits run.
pub const PROBE_HEADER: &str = "X-Bench-Probe";

/// The config; `flooder` is the neighbors scenario's flooding client.
pub fn conf(dir: &Path, flooder: Ipv4Addr) -> String {
    let body = r#"{"type":"https://iana.org/assignments/http-problem-types#quota-exceeded","title":"Too Many Requests","status":429,"detail":"bench has used its 1 API calls for today","violated-policies":["daily"]}"#;
    let probe_var = format!(
        "$http_{}",
        PROBE_HEADER.to_ascii_lowercase().replace('-', "_")
    );
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         # Refusals as 429 (not the default 503), and not written to the error log one by one.\n\
         limit_req_status 429;\n  limit_conn_status 429;\n  limit_req_log_level info;\n  limit_conn_log_level info;\n\
         limit_req_zone $binary_remote_addr zone=perip:10m rate=10000000r/s;\n\
         limit_conn_zone $binary_remote_addr zone=perconn:10m;\n\
         limit_req_zone {probe_var} zone=probe:1m rate=1r/m;\n\
         limit_req_zone $binary_remote_addr zone=refuse:1m rate=1r/m;\n\
         map $remote_addr $flooder {{ \"{flooder}\" $binary_remote_addr; default \"\"; }}\n\
         limit_req_zone $flooder zone=flooder:1m rate=1r/s;\n\
         server {{\n    listen {PORT};\n    listen {PROXY_PORT} proxy_protocol;\n    root {d}/www;\n\
         location / {{ return 200 \"ok\\n\"; }}\n\
         location /static/ {{ try_files /{FILE} =404; }}\n\
         location /limited/ {{ limit_req zone=perip burst=10000000 nodelay; limit_req zone=probe; \
         limit_conn perconn 60000; try_files /{FILE} =404; }}\n\
         location /refuse/ {{ limit_req zone=refuse; try_files /{FILE} =404; }}\n\
         location /neighbors/ {{ limit_req zone=perip burst=10000000 nodelay; limit_req zone=flooder; \
         try_files /{FILE} =404; }}\n\
         location /nginx429 {{ default_type application/problem+json; add_header Retry-After 3600 always; \
         add_header RateLimit-Policy '\"daily\";q=1;w=86400' always; add_header RateLimit '\"daily\";r=0;t=3600' always; \
         return 429 '{body}'; }}\n  }}\n}}\n",
        d = dir.display(),
    )
}

/// Writes the config and the static file; returns the config's path.
pub fn write(dir: &Path, flooder: Ipv4Addr) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www").join(FILE), "ok\n")?;
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf(dir, flooder))?;
    Ok(conf_path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The body of the `location` whose prefix starts `path`.
    fn location<'a>(conf: &'a str, path: &str) -> &'a str {
        let prefix = &path[..path[1..].find('/').map_or(path.len(), |i| i + 2)];
        let start = conf
            .find(&format!("location {prefix} {{"))
            .unwrap_or_else(|| panic!("no location {prefix} in {conf}"));
        let body = &conf[start..];
        &body[..body.find("}\n").expect("the location ends")]
    }

    /// A location that claims a limit must not answer in the rewrite phase (`return`), which
    /// runs before limit_req and limit_conn and so would never let them refuse.
    #[test]
    fn limited_locations_answer_after_their_limits() {
        let conf = conf(Path::new("/tmp/bench"), Ipv4Addr::new(10, 1, 2, 10));
        for path in [LIMITED, REFUSE, NEIGHBORS] {
            let block = location(&conf, path);
            assert!(block.contains("limit_req zone="), "{block}");
            assert!(block.contains("try_files"), "{block}");
            assert!(!block.contains("return"), "{block}");
        }
        assert!(location(&conf, LIMITED).contains("limit_conn "));
        assert!(location(&conf, NEIGHBORS).contains("zone=flooder"));
        assert!(conf.contains("\"10.1.2.10\" $binary_remote_addr"));
        assert!(conf.contains(&format!("listen {PROXY_PORT} proxy_protocol;")));
    }

    /// Asserts that nginx itself accepts the config at `path` (`nginx -t`; needs the nginx that
    /// `cargo xtask setup` installs).
    pub(crate) fn assert_nginx_accepts(path: &std::path::Path) {
        let out = std::process::Command::new("nginx")
            .args(["-t", "-q", "-e", "stderr", "-c"])
            .arg(path)
            .output()
            .expect("running nginx -t (is nginx installed?)");
        assert!(
            out.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// nginx itself accepts the config (`nginx -t`; needs the nginx that `cargo xtask setup`
    /// installs).
    #[test]
    fn nginx_accepts_the_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write(dir.path(), Ipv4Addr::new(10, 1, 2, 10)).expect("writing");
        assert_nginx_accepts(&path);
    }
}
