//! Test clients: HTTP/1.1 requests from a chosen source address (each address stands for an
//! org), raw bytes, idle connections and resets, plus the push sender (`limiter-lab testbed push`)
//! that plays the API platform sending webhooks out to a customer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::http::{BodyKind, Parse, header, parse_chunked, parse_response_head};

/// Every client operation (connect, one request and its response) is bounded by this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Total bound of `limiter-lab testbed push`.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`send_raw`] waits for an answer after sending.
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between the writes of a multi-chunk body.
pub const CHUNK_PAUSE: Duration = Duration::from_millis(20);

/// One request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// More than 1: headers first, then the body in this many writes with [`CHUNK_PAUSE`]
    /// between them (TCP_NODELAY), so it crosses several TCP segments.
    pub body_chunks: usize,
}

impl Request {
    /// A request without a body.
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
            body_chunks: 1,
        }
    }
    /// `GET path`.
    pub fn get(path: impl Into<String>) -> Request {
        Request::new("GET", path)
    }
    /// `POST path` with a body.
    pub fn post(path: impl Into<String>, body: Vec<u8>) -> Request {
        Request {
            body,
            ..Request::new("POST", path)
        }
    }
    /// Sends the body in `n` separate writes.
    pub fn in_chunks(mut self, n: usize) -> Request {
        self.body_chunks = n;
        self
    }

    /// The request head as sent to `host` (`Content-Length` for bodies and body methods).
    pub fn head_bytes(&self, host: &str, keep_alive: bool) -> Vec<u8> {
        let mut h = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: limiter-testbed\r\n",
            self.method, self.path
        );
        let body_method = ["POST", "PUT", "PATCH"]
            .iter()
            .any(|m| self.method.eq_ignore_ascii_case(m));
        if !self.body.is_empty() || body_method {
            h.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        h.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        h.into_bytes()
    }
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A parsed response with its framing facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    pub response: Response,
    /// Bytes of `buf` used (1xx interim responses included).
    pub consumed: usize,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
}

/// Parses one response to a `method` request from the start of `buf`, skipping 1xx interim
/// responses. `eof`: the peer has closed, so a body without length ends at the buffer's end.
pub fn parse_response(buf: &[u8], method: &str, eof: bool) -> Parse<ParsedResponse> {
    let mut off = 0;
    loop {
        let head = match parse_response_head(&buf[off..]) {
            Parse::Done(h) => h,
            Parse::Partial => return Parse::Partial,
            Parse::Invalid(e) => return Parse::Invalid(e),
        };
        if (100..200).contains(&head.status) && head.status != 101 {
            off += head.len;
            continue;
        }
        let start = off + head.len;
        let kind = match head.body_kind(method) {
            Ok(k) => k,
            Err(e) => return Parse::Invalid(e),
        };
        let (body, end, until_close) = match kind {
            BodyKind::None => (Vec::new(), start, false),
            BodyKind::Length(n) => {
                let Some(end) = usize::try_from(n).ok().and_then(|n| start.checked_add(n)) else {
                    return Parse::Invalid("content-length too large".into());
                };
                if buf.len() < end {
                    return Parse::Partial;
                }
                (buf[start..end].to_vec(), end, false)
            }
            BodyKind::Chunked => match parse_chunked(&buf[start..]) {
                Parse::Done((b, used)) => (b, start + used, false),
                Parse::Partial => return Parse::Partial,
                Parse::Invalid(e) => return Parse::Invalid(e),
            },
            BodyKind::UntilClose => {
                if !eof {
                    return Parse::Partial;
                }
                (buf[start..].to_vec(), buf.len(), true)
            }
        };
        let keep_alive = head.keep_alive() && !until_close;
        return Parse::Done(ParsedResponse {
            response: Response {
                status: head.status,
                headers: head.headers,
                body,
            },
            consumed: end,
            keep_alive,
        });
    }
}

/// Opens a TCP connection from `src` (port 0) to `dst`, or from any address when `src` is None.
async fn connect_from(src: Option<IpAddr>, dst: SocketAddr) -> Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("creating a socket")?;
    if let Some(src) = src {
        sock.bind(SocketAddr::new(src, 0))
            .with_context(|| format!("binding the client socket to {src}"))?;
    }
    sock.connect(dst)
        .await
        .with_context(|| format!("connecting to {dst}"))
}

/// Runs `f` with [`REQUEST_TIMEOUT`], naming `what` on timeout.
async fn bounded<T>(
    what: impl FnOnce() -> String,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("{} timed out after {:?}", what(), REQUEST_TIMEOUT)),
    }
}

/// One client connection that can carry several requests in sequence.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
    open: bool,
}

impl HttpConn {
    /// Connects from `src` (None: kernel's choice) to `dst` within [`REQUEST_TIMEOUT`].
    pub async fn connect(src: Option<IpAddr>, dst: SocketAddr) -> Result<HttpConn> {
        bounded(|| format!("connecting to {dst}"), async {
            Ok(HttpConn::over(connect_from(src, dst).await?, dst))
        })
        .await
    }

    /// Connects a socket prepared elsewhere (e.g. `Testbed::server_socket`, which lives in the
    /// testbed cgroup so pushes from it are seen by the kernel programs).
    pub async fn connect_socket(sock: TcpSocket, dst: SocketAddr) -> Result<HttpConn> {
        bounded(|| format!("connecting to {dst}"), async {
            let s = sock
                .connect(dst)
                .await
                .with_context(|| format!("connecting to {dst}"))?;
            Ok(HttpConn::over(s, dst))
        })
        .await
    }

    fn over(stream: TcpStream, dst: SocketAddr) -> HttpConn {
        HttpConn {
            stream,
            buf: Vec::new(),
            host: dst.to_string(),
            open: true,
        }
    }

    /// False once the server asked to close (or closed); another request needs a new connection.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Local address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.stream.local_addr().context("local address")
    }

    /// Sends one request and reads its response, within [`REQUEST_TIMEOUT`].
    pub async fn send(&mut self, req: &Request, keep_alive: bool) -> Result<Response> {
        let host = self.host.clone();
        bounded(
            || format!("{} {} to {host}", req.method, req.path),
            self.send_inner(req, keep_alive),
        )
        .await
    }

    async fn send_inner(&mut self, req: &Request, keep_alive: bool) -> Result<Response> {
        if !self.open {
            bail!("the connection to {} is closed", self.host);
        }
        // A write error (the kernel answered early and reset) still lets us read its response.
        let write_err = self.write_request(req, keep_alive).await.err();
        let mut eof = false;
        loop {
            match parse_response(&self.buf, &req.method, eof) {
                Parse::Done(p) => {
                    self.buf.drain(..p.consumed);
                    if !p.keep_alive || !keep_alive {
                        self.open = false;
                    }
                    return Ok(p.response);
                }
                Parse::Invalid(e) => {
                    self.open = false;
                    bail!(
                        "bad response from {}: {e} ({:?})",
                        self.host,
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                    );
                }
                Parse::Partial if eof => {
                    self.open = false;
                    let why = match &write_err {
                        Some(e) => format!("; sending had failed: {e:#}"),
                        None => String::new(),
                    };
                    bail!(
                        "{} closed the connection after {} bytes, before a complete response{why}",
                        self.host,
                        self.buf.len()
                    );
                }
                Parse::Partial => {
                    let mut tmp = [0u8; 16 * 1024];
                    match self.stream.read(&mut tmp).await {
                        Ok(0) => eof = true,
                        Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => eof = true,
                        Err(e) => {
                            return Err(e).with_context(|| format!("reading from {}", self.host));
                        }
                    }
                }
            }
        }
    }

    async fn write_request(&mut self, req: &Request, keep_alive: bool) -> Result<()> {
        let head = req.head_bytes(&self.host, keep_alive);
        if req.body_chunks <= 1 || req.body.is_empty() {
            let mut all = head;
            all.extend_from_slice(&req.body);
            return self
                .stream
                .write_all(&all)
                .await
                .context("sending the request");
        }
        self.stream.set_nodelay(true).context("TCP_NODELAY")?;
        self.stream
            .write_all(&head)
            .await
            .context("sending the request head")?;
        let size = req.body.len().div_ceil(req.body_chunks);
        for piece in req.body.chunks(size.max(1)) {
            tokio::time::sleep(CHUNK_PAUSE).await;
            self.stream
                .write_all(piece)
                .await
                .context("sending a body chunk")?;
        }
        Ok(())
    }
}

/// Sends `reqs` from `src` to `dst` and returns their responses in order.
///
/// `keep_alive`: sequentially on one connection (a new one only if the server closes it, as
/// any client would, e.g. after a `Connection: close` 429); otherwise one connection per request
/// with `Connection: close`. Each request (including its connect) is bounded by
/// [`REQUEST_TIMEOUT`]. Fails at the first request without a complete response.
pub async fn http_requests(
    src: IpAddr,
    dst: SocketAddr,
    reqs: &[Request],
    keep_alive: bool,
) -> Result<Vec<Response>> {
    let mut out = Vec::with_capacity(reqs.len());
    let mut conn: Option<HttpConn> = None;
    for (i, req) in reqs.iter().enumerate() {
        let what = || {
            format!(
                "request #{} ({} {}) from {src} to {dst}",
                i + 1,
                req.method,
                req.path
            )
        };
        let resp = bounded(what, async {
            let reuse = keep_alive && conn.as_ref().is_some_and(HttpConn::is_open);
            if !reuse {
                conn = Some(HttpConn::over(connect_from(Some(src), dst).await?, dst));
            }
            let c = conn.as_mut().context("no connection")?;
            c.send_inner(req, keep_alive).await
        })
        .await
        .with_context(what)?;
        out.push(resp);
    }
    Ok(out)
}

/// Connects from `src`, writes `bytes`, half-closes, and returns whatever comes back until EOF,
/// a reset or [`RAW_READ_TIMEOUT`] (for garbage, TLS-looking bytes and hand-made requests).
pub async fn send_raw(src: IpAddr, dst: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    raw(src, dst, bytes, true).await
}

/// How long [`exchange_raw`] keeps listening after a complete `Connection: close` response, to
/// catch anything that should not have followed it.
pub const RAW_GRACE: Duration = Duration::from_millis(300);

/// Connects from `src`, writes `bytes` and reads like an HTTP client: until the first response is
/// complete and says `Connection: close` (then [`RAW_GRACE`] more, to catch stray bytes), EOF, a
/// reset or [`RAW_READ_TIMEOUT`]. Unlike [`send_raw`] it never half-closes first: an app that
/// sees the client's FIN may close before the kernel's 429 has left (docs/semantics.md, Known
/// limits).
pub async fn exchange_raw(src: IpAddr, dst: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    raw(src, dst, bytes, false).await
}

async fn raw(src: IpAddr, dst: SocketAddr, bytes: &[u8], half_close: bool) -> Result<Vec<u8>> {
    let mut s = bounded(
        || format!("connecting from {src} to {dst}"),
        connect_from(Some(src), dst),
    )
    .await?;
    let _ = s.set_nodelay(true);
    // Errors while writing are not fatal: the answer (or the close) is what the caller wants.
    let sent = bounded(|| "sending raw bytes".into(), async {
        Ok(s.write_all(bytes).await?)
    })
    .await;
    if half_close && sent.is_ok() {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut deadline = tokio::time::Instant::now() + RAW_READ_TIMEOUT;
    let mut closing = half_close;
    let mut tmp = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&tmp[..n]),
            _ => break,
        }
        if !closing
            && let Parse::Done(r) = parse_response(&out, "GET", false)
            && !r.keep_alive
        {
            closing = true;
            deadline = deadline.min(tokio::time::Instant::now() + RAW_GRACE);
        }
    }
    Ok(out)
}

/// An established connection from `src` to `dst` that sends nothing (concurrency tests).
pub async fn open_idle(src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    bounded(
        || format!("connecting from {src} to {dst}"),
        connect_from(Some(src), dst),
    )
    .await
}

/// Closes with RST (SO_LINGER 0) instead of FIN.
pub fn reset(stream: TcpStream) -> Result<()> {
    stream.set_zero_linger().context("SO_LINGER 0")?;
    drop(stream);
    Ok(())
}

/// Arguments of the hidden `limiter-lab testbed push` command.
#[derive(clap::Args, Debug, Clone)]
pub struct PushArgs {
    /// The customer's webhook receiver.
    #[arg(long)]
    pub to: SocketAddr,
    /// Number of POSTs, all on one keep-alive connection.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Path of the POSTs.
    #[arg(long, default_value = "/hooks/event")]
    pub path: String,
    /// Body size of each POST.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// Entry point of `limiter-lab testbed push`: `count` POSTs over one connection, each must get 200;
/// bounded by [`PUSH_TIMEOUT`] in total.
pub fn push_main(args: PushArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async {
        let work = async {
            let mut conn = HttpConn::connect(None, args.to).await?;
            push_on(&mut conn, args.count, &args.path, args.body_bytes).await
        };
        match tokio::time::timeout(PUSH_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!(
                "pushing to {} took longer than {:?}",
                args.to,
                PUSH_TIMEOUT
            )),
        }
    })
    .with_context(|| format!("push to {}", args.to))?;
    println!("pushed {} POST {} to {}", args.count, args.path, args.to);
    Ok(())
}

/// Sends `count` POSTs of `body_bytes` on `conn` (keep-alive); each must be answered 200.
pub async fn push_on(
    conn: &mut HttpConn,
    count: usize,
    path: &str,
    body_bytes: usize,
) -> Result<()> {
    let req = Request::post(path, vec![b'x'; body_bytes]);
    for i in 0..count {
        if !conn.is_open() {
            bail!("the receiver closed the connection after {i} of {count} pushes");
        }
        let r = conn
            .send(&req, true)
            .await
            .with_context(|| format!("push {} of {count}", i + 1))?;
        if r.status != 200 {
            bail!(
                "push {} of {count}: status {} ({})",
                i + 1,
                r.status,
                r.text().trim_end()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(p: Parse<ParsedResponse>) -> ParsedResponse {
        match p {
            Parse::Done(r) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn request_bytes() {
        let r = Request::get("/a");
        assert_eq!(
            String::from_utf8(r.head_bytes("10.0.0.1:8080", true)).expect("utf8"),
            "GET /a HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: limiter-testbed\r\nConnection: keep-alive\r\n\r\n"
        );
        let r = Request::post("/p", b"abc".to_vec()).in_chunks(3);
        let h = String::from_utf8(r.head_bytes("[fd00::1]:80", false)).expect("utf8");
        assert!(
            h.contains("Content-Length: 3\r\n") && h.ends_with("Connection: close\r\n\r\n"),
            "{h}"
        );
        assert_eq!(r.body_chunks, 3);
        assert!(
            String::from_utf8(Request::post("/e", vec![]).head_bytes("h", true))
                .expect("utf8")
                .contains("Content-Length: 0")
        );
        // Our own server parses what we send.
        let mut raw = r.head_bytes("h", true);
        raw.extend_from_slice(&r.body);
        let Parse::Done(h) = super::super::http::parse_request_head(&raw) else {
            panic!("unparsable")
        };
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.body_kind()),
            ("POST", "/p", Ok(BodyKind::Length(3)))
        );
    }

    #[test]
    fn responses() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\nHTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}";
        let a = done(parse_response(raw, "GET", false));
        assert_eq!(
            (a.response.status, a.response.body.as_slice(), a.keep_alive),
            (200, &b"ok\n"[..], true)
        );
        let b = done(parse_response(&raw[a.consumed..], "GET", false));
        assert_eq!(
            (b.response.status, b.response.body.as_slice(), b.keep_alive),
            (429, &b"{}"[..], false)
        );
        assert_eq!(b.response.header("connection"), Some("close"));
        for cut in 0..a.consumed {
            assert_eq!(
                parse_response(&raw[..cut], "GET", false),
                Parse::Partial,
                "cut {cut}"
            );
        }
        // Interim 100 Continue, chunked body.
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let c = done(parse_response(raw, "POST", false));
        assert_eq!(
            (c.response.status, c.response.body.as_slice(), c.consumed),
            (201, &b"abc"[..], raw.len())
        );
        // No length: body runs to EOF.
        let raw = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(parse_response(raw, "GET", false), Parse::Partial);
        let d = done(parse_response(raw, "GET", true));
        assert_eq!(
            (d.response.body.as_slice(), d.keep_alive),
            (&b"until close"[..], false)
        );
        // HEAD has no body even with Content-Length.
        let e = done(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            "HEAD",
            false,
        ));
        assert!(e.response.body.is_empty());
        // A kernel 429 padded to a large refused request's length.
        let mut raw = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 5\r\nX-Pad: ".to_vec();
        raw.extend(std::iter::repeat_n(b' ', 200_000));
        raw.extend_from_slice(b"\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}");
        let f = done(parse_response(&raw, "POST", false));
        assert_eq!(
            (
                f.response.status,
                f.response.header("retry-after"),
                f.keep_alive
            ),
            (429, Some("5"), false)
        );
        assert_eq!(f.response.header("x-pad"), Some(""));
        assert!(matches!(
            parse_response(b"\x15\x03\x03\x00\x02\x02\x28", "GET", false),
            Parse::Invalid(_)
        ));
    }
}
