//! The test API server (`limiter-lab testbed serve`): a small HTTP/1.1 server written directly on
//! tokio (epoll based; blocking-I/O servers can lose kernel-injected responses)
//! that writes an access log the tests compare with the limiter's counters.
//!
//! Behind a load balancer it can read a PROXY protocol header (v1 or v2) at the start of each
//! connection, as nginx's `listen … proxy_protocol` does; the header's source address is then
//! the client the log names, next to the connection's peer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::http::{BodyKind, Parse, chunked_len, parse_request_head};
use super::sys;

/// Arguments of the hidden `limiter-lab testbed serve` command.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (repeatable); `[::]:PORT` is dual-stack (IPv4 clients arrive as
    /// IPv4-mapped addresses and are logged as plain IPv4).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Access log: one line per complete request, flushed immediately.
    #[arg(long)]
    pub log: PathBuf,
    /// Extra response body bytes after `ok <method> <path>\n`.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Every connection starts with a PROXY protocol header (v1 or v2); a connection without a
    /// valid one is logged as garbage and closed.
    #[arg(long)]
    pub proxy_protocol: bool,
}

/// The header whose value the log records as the request's API key.
pub const API_KEY_HEADER: &str = "X-API-Key";
/// Requests under this path are answered after [`SLOW_FOR`].
pub const SLOW_PREFIX: &str = "/slow/";
pub const SLOW_FOR: Duration = Duration::from_millis(1500);
/// Requests under this path are answered after [`HELD_FOR`]: in flight for as long as a test
/// needs a few steps (a report, a clock step, another request) to happen meanwhile.
pub const HELD_PREFIX: &str = "/held/";
pub const HELD_FOR: Duration = Duration::from_secs(6);
/// The header whose value the log records as the request's forwarded-for chain.
pub const FORWARDED_HEADER: &str = "X-Forwarded-For";

/// Largest chunked request body we buffer before calling the connection garbage.
const MAX_CHUNKED_BODY: usize = 64 << 20;
/// How much of a garbage stream we read (to count it) before closing.
const MAX_GARBAGE_DRAIN: usize = 1 << 20;
/// Idle time after which a garbage stream is considered finished.
const GARBAGE_IDLE: Duration = Duration::from_millis(500);

/// Entry point of `limiter-lab testbed serve`: binds, serves until SIGTERM/SIGINT.
pub fn serve_main(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async {
        let listeners = args
            .listen
            .iter()
            .map(|a| bind_listener(*a))
            .collect::<Result<Vec<_>>>()?;
        let log = AccessLog::open(&args.log)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tracing::info!(listen = ?args.listen, log = %args.log.display(), "test server ready");
        tokio::select! {
            r = serve_on(listeners, log, args.body_bytes, args.proxy_protocol) => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

/// Binds a non-blocking listening socket in the calling thread's netns (backlog 1024,
/// SO_REUSEADDR; `[::]` is dual-stack). Needs no tokio runtime, so it can run inside
/// `Testbed::in_server`/`in_client`.
pub fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("creating a TCP socket")?;
    sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
    if let SocketAddr::V6(a) = addr {
        if a.ip().is_unspecified() {
            sys::set_v6only(sock.as_raw_fd(), false).context("IPV6_V6ONLY=0")?;
        }
    }
    sock.bind(addr).with_context(|| format!("binding {addr}"))?;
    let fd = sock.into_raw_fd();
    // SAFETY: we own fd (from into_raw_fd); listen is a plain syscall. The std listener takes
    // ownership right after, also on the error path.
    let rc = unsafe { libc::listen(fd, 1024) };
    // SAFETY: fd is an owned, open TCP socket.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("listen on {addr}"));
    }
    listener.set_nonblocking(true).context("O_NONBLOCK")?;
    Ok(listener)
}

/// The append-only access log; each line goes out in one write on an O_APPEND file, so readers
/// never see half a line from a concurrent writer.
pub struct AccessLog {
    file: Mutex<File>,
}

impl AccessLog {
    /// Opens (creates) the log for appending.
    pub fn open(path: &Path) -> Result<Arc<AccessLog>> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening access log {}", path.display()))?;
        Ok(Arc::new(AccessLog {
            file: Mutex::new(file),
        }))
    }

    fn line(&self, line: &str) {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "writing the access log");
        }
    }

    /// Logs one complete request: `CLIENT METHOD PATH BODY`, then `peer=` when a PROXY header
    /// named another client than the peer, `xff=` and `key=` when the request carried
    /// [`FORWARDED_HEADER`] and [`API_KEY_HEADER`] (values percent-encoded).
    pub fn request(&self, r: &LoggedRequest<'_>) {
        let mut line = format!(
            "{} {} {} {}",
            r.origin.client.to_canonical(),
            r.method,
            r.path,
            r.body
        );
        r.origin.push_peer(&mut line);
        if let Some(v) = r.forwarded {
            line.push_str(&format!(" xff={}", encode_field(v)));
        }
        if let Some(v) = r.api_key {
            line.push_str(&format!(" key={}", encode_field(v)));
        }
        line.push('\n');
        self.line(&line);
    }

    /// Logs bytes that were not HTTP/1.x (or a PROXY connection without a valid header).
    pub fn garbage(&self, origin: Origin, bytes: usize) {
        let mut line = format!("{} GARBAGE - {bytes}", origin.client.to_canonical());
        origin.push_peer(&mut line);
        line.push('\n');
        self.line(&line);
    }
}

/// Who sent a connection's bytes: the client (a trusted PROXY header's source, else the peer)
/// and the TCP peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub client: IpAddr,
    pub peer: IpAddr,
}

impl Origin {
    /// A connection without a PROXY header: the peer is the client.
    pub fn direct(peer: IpAddr) -> Origin {
        Origin { client: peer, peer }
    }

    fn push_peer(&self, line: &mut String) {
        if self.client.to_canonical() != self.peer.to_canonical() {
            line.push_str(&format!(" peer={}", self.peer.to_canonical()));
        }
    }
}

/// One request as the access log records it.
#[derive(Debug, Clone, Copy)]
pub struct LoggedRequest<'a> {
    pub origin: Origin,
    pub method: &'a str,
    pub path: &'a str,
    pub body: usize,
    pub forwarded: Option<&'a str>,
    pub api_key: Option<&'a str>,
}

/// Percent-encodes what would break a whitespace-separated log field.
fn encode_field(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes [`encode_field`].
fn decode_field(v: &str) -> Result<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .with_context(|| format!("a cut %-escape in {v:?}"))?;
            out.push(
                u8::from_str_radix(hex, 16).with_context(|| format!("bad %-escape in {v:?}"))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("{v:?} is not UTF-8 once decoded"))
}

/// The PROXY protocol v2 signature.
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The PROXY protocol v1 prefix.
const PROXY_V1_PREFIX: &[u8] = b"PROXY ";
/// Longest PROXY v1 line (the protocol's own limit).
const PROXY_V1_MAX: usize = 107;
/// Longest PROXY v2 header we wait for (16-byte fixed part and a 16-bit length).
const PROXY_V2_MAX: usize = 16 + 65535;

/// A PROXY protocol v1 line naming `src` as the client of a connection to `dst` (both of one
/// family).
pub fn proxy_v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY protocol v2 header (PROXY command, TCP) naming `src` as the client of a connection to
/// `dst` (both of one family).
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Result<Vec<u8>> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .context("building a PROXY v2 header")
}

/// Reads a PROXY protocol header (v1 or v2) at the start of `buf`: the source address it names
/// (None for the LOCAL command, v1's UNKNOWN and non-IP families: keep the peer) and its length
/// in bytes. TLVs are skipped (they count in the length).
pub fn parse_proxy_header(buf: &[u8]) -> Parse<(Option<IpAddr>, usize)> {
    let n = buf.len().min(PROXY_V2_SIGNATURE.len());
    if buf[..n] == PROXY_V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Parse::Partial;
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if buf.len() < len {
            return if len <= PROXY_V2_MAX {
                Parse::Partial
            } else {
                Parse::Invalid("PROXY v2 header too long".into())
            };
        }
        return match ppp::v2::Header::try_from(&buf[..len]) {
            Ok(h) => {
                let src = match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => Some(IpAddr::V4(a.source_address)),
                    (_, ppp::v2::Addresses::IPv6(a)) => Some(IpAddr::V6(a.source_address)),
                    _ => None,
                };
                Parse::Done((src, h.len()))
            }
            Err(e) => Parse::Invalid(format!("bad PROXY v2 header: {e}")),
        };
    }
    let n = buf.len().min(PROXY_V1_PREFIX.len());
    if buf[..n] != PROXY_V1_PREFIX[..n] {
        return Parse::Invalid("no PROXY header".into());
    }
    let Some(cr) = buf.iter().position(|&b| b == b'\r') else {
        return if buf.len() < PROXY_V1_MAX {
            Parse::Partial
        } else {
            Parse::Invalid("PROXY v1 line too long".into())
        };
    };
    if buf.len() < cr + 2 {
        return Parse::Partial;
    }
    match ppp::v1::Header::try_from(&buf[..cr + 2]) {
        Ok(h) => {
            let src = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                ppp::v1::Addresses::Unknown => None,
            };
            Parse::Done((src, cr + 2))
        }
        Err(e) => Parse::Invalid(format!("bad PROXY v1 line: {e}")),
    }
}

/// Serves on already-bound listeners (e.g. from `Testbed::server_listeners`) until cancelled.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    log: &Path,
    body_bytes: usize,
) -> Result<()> {
    let log = AccessLog::open(log)?;
    serve_on(listeners, log, body_bytes, false).await
}

async fn serve_on(
    listeners: Vec<std::net::TcpListener>,
    log: Arc<AccessLog>,
    body_bytes: usize,
    proxy_protocol: bool,
) -> Result<()> {
    if listeners.is_empty() {
        bail!("no listeners");
    }
    let filler: Arc<[u8]> = vec![b'x'; body_bytes].into();
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        l.set_nonblocking(true)
            .context("O_NONBLOCK on a listener")?;
        let l = TcpListener::from_std(l).context("registering a listener with tokio")?;
        let (log, filler) = (log.clone(), filler.clone());
        tasks.spawn(accept_loop(l, log, filler, proxy_protocol));
    }
    while let Some(r) = tasks.join_next().await {
        r.context("accept loop panicked")?;
    }
    Ok(())
}

/// Accepts forever; transient errors (EMFILE, aborted connections) only pause briefly.
async fn accept_loop(l: TcpListener, log: Arc<AccessLog>, filler: Arc<[u8]>, proxy_protocol: bool) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                tokio::spawn(handle_conn(
                    s,
                    peer.ip(),
                    log.clone(),
                    filler.clone(),
                    proxy_protocol,
                ));
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads more bytes into `buf`; Ok(0) at EOF.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut tmp = [0u8; 16 * 1024];
    let n = s.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

/// One connection: its PROXY header if one is expected, then a loop of request → log line →
/// response, until close or garbage.
async fn handle_conn(
    mut s: TcpStream,
    peer: IpAddr,
    log: Arc<AccessLog>,
    filler: Arc<[u8]>,
    proxy_protocol: bool,
) {
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut origin = Origin::direct(peer);
    if proxy_protocol {
        loop {
            match parse_proxy_header(&buf) {
                Parse::Done((src, len)) => {
                    buf.drain(..len);
                    origin.client = src.unwrap_or(peer);
                    break;
                }
                Parse::Partial => match read_more(&mut s, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                Parse::Invalid(_) => return garbage(s, buf.len(), origin, &log).await,
            }
        }
    }
    let peer = origin;
    loop {
        // Read a request head (tolerating stray CRLFs between requests).
        let head = loop {
            let skip = buf
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            buf.drain(..skip);
            match parse_request_head(&buf) {
                Parse::Done(h) => break h,
                Parse::Partial => match read_more(&mut s, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                Parse::Invalid(_) => return garbage(s, buf.len(), peer, &log).await,
            }
        };
        let Ok(kind) = head.body_kind() else {
            return garbage(s, buf.len(), peer, &log).await;
        };
        buf.drain(..head.len);
        if head.expects_continue()
            && kind != BodyKind::None
            && buf.is_empty()
            && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
        {
            return;
        }
        let body_len = match kind {
            BodyKind::None | BodyKind::UntilClose => 0,
            BodyKind::Length(n) => {
                let Ok(n) = usize::try_from(n) else {
                    return garbage(s, buf.len(), peer, &log).await;
                };
                let mut remaining = n;
                let take = remaining.min(buf.len());
                buf.drain(..take);
                remaining -= take;
                let mut tmp = vec![0u8; 64 * 1024];
                while remaining > 0 {
                    let got = match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => k,
                    };
                    let used = got.min(remaining);
                    remaining -= used;
                    buf.extend_from_slice(&tmp[used..got]);
                }
                n
            }
            BodyKind::Chunked => loop {
                match chunked_len(&buf) {
                    Parse::Done((len, used)) => {
                        buf.drain(..used);
                        break len;
                    }
                    Parse::Partial if buf.len() <= MAX_CHUNKED_BODY => {
                        match read_more(&mut s, &mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                    _ => return garbage(s, buf.len(), peer, &log).await,
                }
            },
        };
        // Log before answering, so a client holding the response finds its line in the log.
        log.request(&LoggedRequest {
            origin: peer,
            method: &head.method,
            path: &head.target,
            body: body_len,
            forwarded: head.header(FORWARDED_HEADER),
            api_key: head.header(API_KEY_HEADER),
        });
        if head.target.starts_with(SLOW_PREFIX) {
            // A request that keeps the app busy (concurrency tests: requests in flight).
            tokio::time::sleep(SLOW_FOR).await;
        } else if head.target.starts_with(HELD_PREFIX) {
            tokio::time::sleep(HELD_FOR).await;
        }
        let keep = head.keep_alive();
        let mut body = format!("ok {} {}\n", head.method, head.target).into_bytes();
        body.extend_from_slice(&filler);
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            body.len(),
            if keep { "keep-alive" } else { "close" }
        )
        .into_bytes();
        if !head.method.eq_ignore_ascii_case("HEAD") {
            out.extend_from_slice(&body);
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
        if !keep {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// Counts the rest of a non-HTTP stream (bounded in bytes and idle time), logs it, closes.
async fn garbage(mut s: TcpStream, already: usize, peer: Origin, log: &AccessLog) {
    let mut n = already;
    let mut tmp = [0u8; 16 * 1024];
    while n < MAX_GARBAGE_DRAIN {
        match tokio::time::timeout(GARBAGE_IDLE, s.read(&mut tmp)).await {
            Ok(Ok(k)) if k > 0 => n += k,
            _ => break,
        }
    }
    log.garbage(peer, n);
    let _ = s.shutdown().await;
}

/// A test server running on its own tokio runtime in a background thread; stops on drop.
pub struct ServerHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// Runs the test server on `listeners` in a background thread (for tests that serve from their
/// own process rather than a spawned `limiter-lab testbed serve`). Use listeners from `Testbed::server_listeners` to
/// have the server's sockets in the testbed cgroup.
pub fn serve_in_thread(
    listeners: Vec<std::net::TcpListener>,
    log: &Path,
    body_bytes: usize,
) -> Result<ServerHandle> {
    let log = AccessLog::open(log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the server runtime")?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("testbed-server".into())
        .spawn(move || {
            let r = rt.block_on(async move {
                tokio::select! {
                    r = serve_on(listeners, log, body_bytes, false) => r,
                    _ = rx => Ok(()),
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
            r
        })
        .context("spawning the server thread")?;
    Ok(ServerHandle {
        stop: Some(tx),
        thread: Some(thread),
    })
}

impl ServerHandle {
    /// Stops the server and reports whether it had failed.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => match t.join() {
                Ok(r) => r,
                Err(_) => bail!("server thread panicked"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "test server");
        }
    }
}

/// One access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// The client's address (IPv4-mapped IPv6 already shown as IPv4): the source of the
    /// connection's PROXY header, or its peer.
    pub client: IpAddr,
    /// The connection's TCP peer (the load balancer behind a PROXY header).
    pub peer: IpAddr,
    /// The request's [`FORWARDED_HEADER`] value.
    pub forwarded: Option<String>,
    /// The request's [`API_KEY_HEADER`] value.
    pub api_key: Option<String>,
    /// The request method, or `GARBAGE` for bytes that were not HTTP.
    pub method: String,
    /// The request target, `-` for garbage.
    pub path: String,
    /// Request body bytes received (decoded), or the garbage byte count.
    pub body: usize,
}

impl AccessEntry {
    /// Whether this line records non-HTTP bytes.
    pub fn is_garbage(&self) -> bool {
        self.method == "GARBAGE"
    }
}

/// Reads the access log written by the test server (safe while it runs: an unfinished last
/// line is ignored).
pub fn read_access_log(path: &Path) -> Result<Vec<AccessEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading access log {}", path.display()))?;
    parse_access_log(&text).with_context(|| format!("in {}", path.display()))
}

/// Parses access-log text; see [`read_access_log`].
pub fn parse_access_log(text: &str) -> Result<Vec<AccessEntry>> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (&[client, method, path, body], extra) = f.split_at(f.len().min(4)) else {
            bail!("line {}: expected at least 4 fields, got {:?}", i + 1, line);
        };
        let client: IpAddr = client
            .parse()
            .with_context(|| format!("line {}: bad client address {client:?}", i + 1))?;
        let body: usize = body
            .parse()
            .with_context(|| format!("line {}: bad byte count {body:?}", i + 1))?;
        let client = client.to_canonical();
        let mut entry = AccessEntry {
            client,
            peer: client,
            method: method.to_string(),
            path: path.to_string(),
            body,
            forwarded: None,
            api_key: None,
        };
        for field in extra {
            match field.split_once('=') {
                Some(("peer", v)) => {
                    entry.peer = v
                        .parse::<IpAddr>()
                        .with_context(|| format!("line {}: bad peer {v:?}", i + 1))?
                        .to_canonical();
                }
                Some(("xff", v)) => {
                    entry.forwarded =
                        Some(decode_field(v).with_context(|| format!("line {}", i + 1))?)
                }
                Some(("key", v)) => {
                    entry.api_key =
                        Some(decode_field(v).with_context(|| format!("line {}", i + 1))?)
                }
                _ => bail!("line {}: unknown field {field:?}", i + 1),
            }
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_parse() {
        let text = "10.1.2.10 GET /a 0\n::ffff:10.1.2.11 POST /b?x=1 5000\n\nfd00:1:2::10 GARBAGE - 517\n\
                    192.0.2.9 GET /c 0 peer=::ffff:127.0.0.1 xff=192.0.2.9,%20127.0.0.1 key=k%25ey\n10.1.2.1 GE";
        let e = parse_access_log(text).expect("parses");
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[0],
            AccessEntry {
                client: "10.1.2.10".parse().expect("ip"),
                peer: "10.1.2.10".parse().expect("ip"),
                method: "GET".into(),
                path: "/a".into(),
                body: 0,
                forwarded: None,
                api_key: None,
            }
        );
        assert_eq!(e[1].client, "10.1.2.11".parse::<IpAddr>().expect("ip"));
        assert_eq!(e[1].peer, e[1].client);
        assert_eq!(e[1].path, "/b?x=1");
        assert_eq!(e[1].body, 5000);
        assert!(e[2].is_garbage());
        assert_eq!(e[2].body, 517);
        assert_eq!(e[3].client, "192.0.2.9".parse::<IpAddr>().expect("ip"));
        assert_eq!(e[3].peer, "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(e[3].forwarded.as_deref(), Some("192.0.2.9, 127.0.0.1"));
        assert_eq!(e[3].api_key.as_deref(), Some("k%ey"));
        assert!(parse_access_log("10.0.0.1 GET /\n").is_err());
        assert!(parse_access_log("nope GET / 1\n").is_err());
        assert!(parse_access_log("10.0.0.1 GET / 1 who=me\n").is_err());
        assert!(parse_access_log("10.0.0.1 GET / 1 key=%4\n").is_err());
        assert!(parse_access_log("").expect("empty").is_empty());
    }

    #[test]
    fn access_log_writer_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let log = AccessLog::open(&p).expect("open");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let mut r = LoggedRequest {
            origin: Origin::direct(ip("::ffff:192.0.2.7")),
            method: "GET",
            path: "/x",
            body: 0,
            forwarded: None,
            api_key: None,
        };
        log.request(&r);
        log.garbage(Origin::direct(ip("2001:db8::1")), 9);
        r.origin = Origin {
            client: ip("198.51.100.4"),
            peer: ip("::ffff:127.0.0.1"),
        };
        r.forwarded = Some("198.51.100.4, 10.0.0.1");
        r.api_key = Some("key one");
        log.request(&r);
        log.garbage(r.origin, 3);
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "192.0.2.7 GET /x 0\n2001:db8::1 GARBAGE - 9\n\
             198.51.100.4 GET /x 0 peer=127.0.0.1 xff=198.51.100.4,%2010.0.0.1 key=key%20one\n\
             198.51.100.4 GARBAGE - 3 peer=127.0.0.1\n"
        );
        let e = read_access_log(&p).expect("parse");
        assert_eq!(e.len(), 4);
        assert_eq!(e[2].forwarded.as_deref(), r.forwarded);
        assert_eq!(e[2].api_key.as_deref(), r.api_key);
        assert_eq!(e[3].peer, ip("127.0.0.1"));
    }

    #[test]
    fn proxy_headers() {
        use ppp::v2;
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let rest = b"GET / HTTP/1.1\r\n\r\n";
        // v1, IPv4 and IPv6, then the request.
        let v1 = b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 8080\r\n";
        let buf = [&v1[..], rest].concat();
        assert_eq!(
            parse_proxy_header(&buf),
            Parse::Done((Some(ip("192.0.2.1")), v1.len()))
        );
        let v1_6 = b"PROXY TCP6 2001:db8::7 ::1 5555 8080\r\n";
        assert_eq!(
            parse_proxy_header(v1_6),
            Parse::Done((Some(ip("2001:db8::7")), v1_6.len()))
        );
        assert_eq!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n"),
            Parse::Done((None, 15))
        );
        // Every cut of a header is partial.
        for cut in 0..v1.len() {
            assert_eq!(parse_proxy_header(&v1[..cut]), Parse::Partial, "cut {cut}");
        }
        // v2 with a TLV, and LOCAL.
        let v2 = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "[2001:db8::9]:4000".parse::<SocketAddr>().expect("addr"),
                "[::1]:8080".parse::<SocketAddr>().expect("addr"),
            ),
        )
        .write_tlv(v2::Type::NoOp, b"xyz")
        .expect("tlv")
        .build()
        .expect("v2");
        let buf = [&v2[..], rest].concat();
        assert_eq!(
            parse_proxy_header(&buf),
            Parse::Done((Some(ip("2001:db8::9")), v2.len()))
        );
        for cut in 0..v2.len() {
            assert_eq!(parse_proxy_header(&v2[..cut]), Parse::Partial, "cut {cut}");
        }
        let local = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .expect("local");
        assert_eq!(parse_proxy_header(&local), Parse::Done((None, 16)));
        // The builders' headers read back.
        let (src, dst) = (
            "192.0.2.5:1234".parse::<SocketAddr>().expect("addr"),
            "10.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
        );
        for h in [
            proxy_v1_header(src, dst),
            proxy_v2_header(src, dst).expect("v2"),
        ] {
            assert_eq!(
                parse_proxy_header(&h),
                Parse::Done((Some(src.ip()), h.len()))
            );
        }
        // Not a header.
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 nope\r\n",
            b"\x16\x03\x01",
        ] {
            assert!(
                matches!(parse_proxy_header(bad), Parse::Invalid(_)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_proxy_header(&[b'P'; 200][..]),
            Parse::Invalid(_)
        ));
    }
}
