//! Real peers in front of the test API server, as an API platform deploys them: a TLS
//! certificate made for the server's addresses, nginx terminating TLS and proxying over an
//! upstream keep-alive pool with `X-Forwarded-For`, HAProxy terminating TLS in TCP mode with
//! `send-proxy-v2`, and the clients that talk to them (curl, `openssl s_client`).
//!
//! Every peer runs in the server netns and writes only under the testbed's scratch dir; the
//! testbed kills it on drop. The configs are plain functions, so `nginx -t` and `haproxy -c`
//! check them in host tests, and the operator docs show the same text.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Side, Testbed};

/// How long a peer may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one curl or s_client run, in seconds (passed to the tools themselves).
pub const CLIENT_TIMEOUT_SECS: u32 = 30;
/// What curl prints after each transfer, around the status code.
const CURL_MARK: &str = "@@limiter-curl-status ";

/// A self-signed certificate and its key (PEM), and both in one file for HAProxy's `crt`.
#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// Makes a self-signed P-256 certificate valid for `ips` (subjectAltName IP entries) with the
/// openssl CLI, under `dir` (`<name>.crt`, `.key`, `.pem`). The key is readable by root only.
pub fn make_cert(dir: &Path, name: &str, ips: &[IpAddr]) -> Result<Cert> {
    if ips.is_empty() {
        bail!("a certificate needs at least one address");
    }
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let bundle = dir.join(format!("{name}.pem"));
    let san = ips
        .iter()
        .map(|ip| format!("IP:{ip}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=limiter-testbed", "-addext"])
        .arg(format!("subjectAltName={san}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .context("running openssl req (is openssl installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
    pem.extend(std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?);
    write_private(&bundle, &pem)?;
    Ok(Cert { cert, key, bundle })
}

/// Writes a file readable by its owner only (keys, key lists).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// `listen` directives' address: `[v6]:port` or `v4:port`.
fn listen_addr(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// nginx terminating TLS on `listen` and proxying every request to `upstream` over a pool of
/// kept-alive upstream connections (so many clients' requests share them), adding the client
/// to `X-Forwarded-For`. Files go under `dir` (prefix `nginx-tls`).
pub fn nginx_tls_conf(
    dir: &Path,
    listen: &[SocketAddr],
    cert: &Cert,
    upstream: SocketAddr,
) -> String {
    let d = dir.display();
    let listens: String = listen
        .iter()
        .map(|a| format!("    listen {} ssl;\n", listen_addr(a)))
        .collect();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx-tls.pid;\n\
         error_log {d}/nginx-tls-error.log;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log {d}/nginx-tls-access.log;\n\
         client_body_temp_path {d}/nginx-tls-body;\n  proxy_temp_path {d}/nginx-tls-proxy;\n\
         fastcgi_temp_path {d}/nginx-tls-fcgi;\n  uwsgi_temp_path {d}/nginx-tls-uwsgi;\n\
         scgi_temp_path {d}/nginx-tls-scgi;\n\
         {conf}}}\n",
        conf = nginx_tls_http_block(&listens, cert, upstream),
    )
}

/// The part of [`nginx_tls_conf`] an operator puts in `http { }` (the operator guide shows it).
fn nginx_tls_http_block(listens: &str, cert: &Cert, upstream: SocketAddr) -> String {
    format!(
        "  upstream api {{\n    server {up};\n    keepalive 8;\n  }}\n\
         server {{\n{listens}\
             ssl_certificate {crt};\n    ssl_certificate_key {key};\n\
             location / {{\n\
               proxy_pass http://api;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             }}\n  }}\n",
        up = listen_addr(&upstream),
        crt = cert.cert.display(),
        key = cert.key.display(),
    )
}

/// HAProxy terminating TLS on `bind` in TCP mode and passing each connection to `upstream` with
/// a PROXY protocol v2 header naming the client.
pub fn haproxy_conf(bind: &[SocketAddr], cert: &Cert, upstream: SocketAddr) -> String {
    let binds: String = bind
        .iter()
        .map(|a| {
            format!(
                "  bind {} ssl crt {}\n",
                listen_addr(a),
                cert.bundle.display()
            )
        })
        .collect();
    format!(
        "global\n  maxconn 1024\n\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n\
         frontend tls\n{binds}  default_backend api\n\n\
         backend api\n  server api {} send-proxy-v2\n",
        listen_addr(&upstream)
    )
}

impl Testbed {
    /// Starts nginx ([`nginx_tls_conf`]) in the server netns; returns once it listens on `port`
    /// (every address of the server side, IPv4 and IPv6).
    pub fn start_nginx_tls(&self, port: u16, cert: &Cert, upstream: SocketAddr) -> Result<()> {
        let listen = [
            SocketAddr::from((self.server_v4(), port)),
            SocketAddr::from((self.server_v6(), port)),
        ];
        let conf = self.dir().join("nginx-tls.conf");
        std::fs::write(&conf, nginx_tls_conf(self.dir(), &listen, cert, upstream))
            .context("writing nginx's config")?;
        let mut cmd = Command::new("nginx");
        cmd.args(["-e", "stderr", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.spawn_in_server(cmd)?;
        self.wait_listening(Side::Server, port, START_TIMEOUT)
            .with_context(|| {
                format!(
                    "nginx (TLS) did not start: {}",
                    std::fs::read_to_string(self.dir().join("nginx-tls-error.log"))
                        .unwrap_or_default()
                )
            })
    }

    /// Starts HAProxy ([`haproxy_conf`]) in the server netns in the foreground; returns once it
    /// listens on `port`.
    pub fn start_haproxy(&self, port: u16, cert: &Cert, upstream: SocketAddr) -> Result<()> {
        let bind = [
            SocketAddr::from((self.server_v4(), port)),
            SocketAddr::from((self.server_v6(), port)),
        ];
        let conf = self.dir().join("haproxy.cfg");
        std::fs::write(&conf, haproxy_conf(&bind, cert, upstream))
            .context("writing HAProxy's config")?;
        let log = std::fs::File::create(self.dir().join("haproxy.log"))?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.spawn_in_server(cmd)
            .context("starting haproxy (cargo xtask setup installs it)")?;
        self.wait_listening(Side::Server, port, START_TIMEOUT)
            .with_context(|| {
                format!(
                    "haproxy did not start: {}",
                    std::fs::read_to_string(self.dir().join("haproxy.log")).unwrap_or_default()
                )
            })
    }

    /// Runs curl ([`curl_command`]) in the client netns and returns one reply per URL.
    pub fn curl(&self, c: &Curl) -> Result<Vec<CurlReply>> {
        let mut cmd = curl_command(c);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_in_client(cmd)?;
        let out = child.wait_with_output().context("waiting for curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let replies = parse_curl_output(&text).with_context(|| {
            format!(
                "curl from {} ({}): {}",
                c.src,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if replies.len() != c.urls.len() {
            bail!(
                "curl from {} answered {} of {} URLs ({}): {}",
                c.src,
                replies.len(),
                c.urls.len(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(replies)
    }

    /// Sends `bytes` over TLS to `to` from `src` with `openssl s_client` in the client netns
    /// (verifying `ca`), and returns what came back: up to the end of the first complete
    /// response, or until the server closed (bounded by [`CLIENT_TIMEOUT_SECS`]).
    pub fn tls_raw(&self, src: IpAddr, to: SocketAddr, ca: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
        use std::io::Read as _;
        let mut cmd = Command::new("timeout");
        cmd.arg(CLIENT_TIMEOUT_SECS.to_string())
            .args([
                "openssl",
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(ca)
            .arg("-connect")
            .arg(listen_addr(&to))
            .arg("-bind")
            .arg(listen_addr(&SocketAddr::new(src, 0)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn_in_client(cmd)?;
        // Stdin stays open until the answer is read: s_client ends the session at its EOF.
        let mut stdin = child.stdin.take().context("s_client's stdin")?;
        stdin.write_all(bytes).context("writing to s_client")?;
        let mut stdout = child.stdout.take().context("s_client's stdout")?;
        let mut out = Vec::new();
        let mut tmp = [0u8; 16 * 1024];
        loop {
            match stdout.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&tmp[..n]),
            }
            if matches!(
                super::parse_response(&out, "GET", false),
                super::http::Parse::Done(_)
            ) {
                break;
            }
        }
        drop(stdin);
        // SIGTERM, which `timeout` passes on to s_client (SIGKILL would orphan it).
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().context("waiting for s_client")?;
        if out.is_empty() && !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "openssl s_client from {src} to {to} ({status}): {}",
                err.trim()
            );
        }
        Ok(out)
    }
}

/// One curl run: HTTPS GETs of `urls` in order, from `src`, with `headers`, trusting `ca`. One
/// curl process reuses its connection between URLs (keep-alive) unless the server closes it.
#[derive(Debug, Clone)]
pub struct Curl {
    pub src: IpAddr,
    pub urls: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub ca: PathBuf,
}

/// What curl got for one URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurlReply {
    /// 0 when the transfer failed.
    pub status: u16,
    pub body: String,
}

/// The curl command line for `c`: after each transfer's body it prints a line with
/// [`CURL_MARK`] and the status code, which [`parse_curl_output`] reads.
pub fn curl_command(c: &Curl) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time"])
        .arg(CLIENT_TIMEOUT_SECS.to_string())
        .arg("--cacert")
        .arg(&c.ca)
        .arg("--interface")
        .arg(c.src.to_string())
        .arg("-w")
        .arg(format!("\\n{CURL_MARK}%{{http_code}}\\n"));
    for (k, v) in &c.headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.args(&c.urls);
    cmd
}

/// Splits curl's output (see [`curl_command`]) into one reply per transfer.
pub fn parse_curl_output(text: &str) -> Result<Vec<CurlReply>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(CURL_MARK) {
        // The body ends with the newline -w adds before the mark.
        let body = rest[..i].strip_suffix('\n').unwrap_or(&rest[..i]);
        let after = &rest[i + CURL_MARK.len()..];
        let end = after.find('\n').unwrap_or(after.len());
        let status = after[..end]
            .trim()
            .parse()
            .with_context(|| format!("bad status {:?} in curl's output", &after[..end]))?;
        out.push(CurlReply {
            status,
            body: body.to_string(),
        });
        rest = after.get(end + 1..).unwrap_or_default();
    }
    if !rest.trim().is_empty() {
        bail!("curl printed {rest:?} after its last transfer");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(dir: &Path) -> Cert {
        Cert {
            cert: dir.join("c.crt"),
            key: dir.join("c.key"),
            bundle: dir.join("c.pem"),
        }
    }

    #[test]
    fn curl_output() {
        let text = format!(
            "ok GET /a\n\n{CURL_MARK}200\n{{\"detail\":\"acme has used its 3 API calls for today\"}}\n{CURL_MARK}429\n\n{CURL_MARK}000\n"
        );
        let r = parse_curl_output(&text).expect("parses");
        assert_eq!(
            r,
            [
                CurlReply {
                    status: 200,
                    body: "ok GET /a\n".into()
                },
                CurlReply {
                    status: 429,
                    body: "{\"detail\":\"acme has used its 3 API calls for today\"}".into()
                },
                CurlReply {
                    status: 0,
                    body: String::new()
                },
            ]
        );
        assert!(parse_curl_output("").expect("empty").is_empty());
        assert!(parse_curl_output("half a body").is_err());
        assert!(parse_curl_output(&format!("{CURL_MARK}abc\n")).is_err());
    }

    #[test]
    fn curl_command_line() {
        let c = Curl {
            src: "10.1.2.10".parse().expect("ip"),
            urls: vec![
                "https://10.1.2.1:8443/a".into(),
                "https://10.1.2.1:8443/b".into(),
            ],
            headers: vec![("X-API-Key".into(), "k1".into())],
            ca: "/tmp/ca.crt".into(),
        };
        let args: Vec<String> = curl_command(&c)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.windows(2).any(|w| w == ["--interface", "10.1.2.10"]));
        assert!(args.windows(2).any(|w| w == ["--cacert", "/tmp/ca.crt"]));
        assert!(args.windows(2).any(|w| w == ["-H", "X-API-Key: k1"]));
        assert_eq!(&args[args.len() - 2..], &c.urls[..]);
    }

    /// nginx accepts the TLS terminator's config (`nginx -t` with a real certificate).
    #[test]
    fn nginx_accepts_the_tls_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = make_cert(dir.path(), "c", &["127.0.0.1".parse().expect("ip")]).expect("cert");
        let conf = nginx_tls_conf(
            dir.path(),
            &["127.0.0.1:18443".parse().expect("addr")],
            &c,
            "127.0.0.1:8080".parse().expect("addr"),
        );
        for line in [
            "keepalive 8;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        ] {
            assert!(conf.contains(line), "{line} missing from {conf}");
        }
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("writing");
        crate::bench::nginx::tests::assert_nginx_accepts(&path);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&c.bundle).expect("bundle").permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key bundle is readable by others");
    }

    /// HAProxy accepts its config (`haproxy -c`; needs the haproxy that `cargo xtask setup`
    /// installs).
    #[test]
    fn haproxy_accepts_the_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = make_cert(dir.path(), "c", &["::1".parse().expect("ip")]).expect("cert");
        let conf = haproxy_conf(
            &["[::1]:18444".parse().expect("addr")],
            &c,
            "127.0.0.1:8080".parse().expect("addr"),
        );
        assert!(conf.contains("mode tcp"), "{conf}");
        assert!(conf.contains("send-proxy-v2"), "{conf}");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, conf).expect("writing");
        let out = Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .expect("running haproxy -c (is haproxy installed?)");
        assert!(
            out.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A config that names a missing certificate is refused: the check above means something.
        let missing = haproxy_conf(
            &["[::1]:18444".parse().expect("addr")],
            &cert(&dir.path().join("nope")),
            "127.0.0.1:8080".parse().expect("addr"),
        );
        std::fs::write(&path, missing).expect("writing");
        let out = Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .expect("running haproxy -c");
        assert!(!out.status.success());
    }
}
