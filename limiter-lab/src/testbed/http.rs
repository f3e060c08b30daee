//! HTTP/1.x wire parsing shared by the test server and the test clients: pure functions on byte
//! buffers, so the tricky cases (partial input, chunked bodies, garbage) are unit-testable.

/// Outcome of parsing a buffer that may still grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// Parsed; the value says how many bytes were consumed where that matters.
    Done(T),
    /// Valid so far; more bytes are needed.
    Partial,
    /// Not HTTP/1.x (or not acceptable); the reason is for logs and errors.
    Invalid(String),
}

/// Largest request/response head we accept (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest response head we accept: the limiter pads a kernel 429 to the refused request's
/// length with a header, so a refused 1 MiB upload yields a 1 MiB head.
pub const MAX_RESPONSE_HEAD: usize = 16 << 20;
/// Longest method token we accept (keeps garbage detection quick).
const MAX_METHOD: usize = 32;
/// Most header lines per message.
const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// The x in HTTP/1.x.
    pub minor: u8,
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub minor: u8,
    pub headers: Vec<(String, String)>,
    pub len: usize,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Response without length: the body runs until the server closes.
    UntilClose,
}

/// The first value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Does any `name` header list `token` (comma separated, case-insensitive)?
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Persistent-connection rule shared by requests and responses (RFC 9112 §9.3).
fn keep_alive(minor: u8, headers: &[(String, String)]) -> bool {
    if has_token(headers, "connection", "close") {
        return false;
    }
    minor >= 1 || has_token(headers, "connection", "keep-alive")
}

/// Body framing from Transfer-Encoding / Content-Length, if either is present.
fn framing(headers: &[(String, String)]) -> Result<Option<BodyKind>, String> {
    let te: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(last) = te.last() {
        if last.eq_ignore_ascii_case("chunked") {
            return Ok(Some(BodyKind::Chunked));
        }
        return Err(format!("unsupported transfer-encoding {last:?}"));
    }
    let mut len: Option<u64> = None;
    for (_, v) in headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() || part.len() > 18 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("bad content-length {v:?}"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| format!("bad content-length {v:?}"))?;
            if len.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            len = Some(n);
        }
    }
    Ok(len.map(BodyKind::Length))
}

impl RequestHead {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    /// Whether the connection stays open after this request.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.minor, &self.headers)
    }
    /// Whether the client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.minor >= 1 && has_token(&self.headers, "expect", "100-continue")
    }
    /// Request body framing: chunked, by length, or none.
    pub fn body_kind(&self) -> Result<BodyKind, String> {
        Ok(framing(&self.headers)?.unwrap_or(BodyKind::None))
    }
}

impl ResponseHead {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    /// Whether the server keeps the connection open.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.minor, &self.headers)
    }
    /// Response body framing for a request made with `method` (RFC 9112 §6.3).
    pub fn body_kind(&self, method: &str) -> Result<BodyKind, String> {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(BodyKind::None);
        }
        Ok(framing(&self.headers)?.unwrap_or(BodyKind::UntilClose))
    }
}

/// RFC 9110 token characters (methods, header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible ASCII allowed in a request target.
fn is_target_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// The next line starting at `start`: (line without CR/LF, index after the LF).
fn next_line(buf: &[u8], start: usize) -> Option<(&[u8], usize)> {
    let rel = buf.get(start..)?.iter().position(|&b| b == b'\n')?;
    let mut line = &buf[start..start + rel];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    Some((line, start + rel + 1))
}

/// Could `buf` (no LF yet) still become a valid HTTP/1.x request line?
/// Lets the server call garbage (TLS, HTTP/2, random bytes) as soon as it sees it.
pub fn request_line_prefix_ok(buf: &[u8]) -> bool {
    let n = buf.len();
    let mut i = 0;
    while i < n && is_tchar(buf[i]) {
        i += 1;
    }
    if i > MAX_METHOD {
        return false;
    }
    if i == n {
        return true;
    }
    if i == 0 || buf[i] != b' ' {
        return false;
    }
    i += 1;
    let t0 = i;
    while i < n && is_target_char(buf[i]) {
        i += 1;
    }
    if i - t0 > MAX_HEAD {
        return false;
    }
    if i == n {
        return true;
    }
    if i == t0 || buf[i] != b' ' {
        return false;
    }
    let rest = &buf[i + 1..];
    const V: &[u8] = b"HTTP/1.";
    let k = rest.len().min(V.len());
    if rest[..k] != V[..k] {
        return false;
    }
    match &rest[k..] {
        [] => true,
        [d] => d.is_ascii_digit(),
        [d, b'\r'] => d.is_ascii_digit(),
        _ => false,
    }
}

/// Parses `METHOD SP TARGET SP HTTP/1.x`.
fn parse_request_line(line: &[u8]) -> Result<(String, String, u8), String> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(m), Some(t), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("request line is not METHOD SP TARGET SP VERSION".into());
    };
    if m.is_empty() || m.len() > MAX_METHOD || !m.iter().all(|&b| is_tchar(b)) {
        return Err("bad method".into());
    }
    if t.is_empty() || !t.iter().all(|&b| is_target_char(b)) {
        return Err("bad request target".into());
    }
    let minor = parse_version(v).ok_or("not HTTP/1.x")?;
    Ok((
        String::from_utf8_lossy(m).into_owned(),
        String::from_utf8_lossy(t).into_owned(),
        minor,
    ))
}

/// `HTTP/1.0` or `HTTP/1.1` → minor version.
fn parse_version(v: &[u8]) -> Option<u8> {
    match v {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if d.is_ascii_digit() => Some(d - b'0'),
        _ => None,
    }
}

/// Parses header lines from `pos` up to and including the blank line.
fn parse_headers(buf: &[u8], mut pos: usize, max: usize) -> Parse<(Vec<(String, String)>, usize)> {
    let mut headers = Vec::new();
    loop {
        if pos > max {
            return Parse::Invalid("head too large".into());
        }
        let Some((line, next)) = next_line(buf, pos) else {
            if buf.len() > max {
                return Parse::Invalid("head too large".into());
            }
            return Parse::Partial;
        };
        pos = next;
        if line.is_empty() {
            return Parse::Done((headers, pos));
        }
        if matches!(line[0], b' ' | b'\t') {
            return Parse::Invalid("obsolete header line folding".into());
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Parse::Invalid("header line without ':'".into());
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Parse::Invalid("bad header name".into());
        }
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim_matches([' ', '\t'])
            .to_string();
        headers.push((String::from_utf8_lossy(name).into_owned(), value));
        if headers.len() > MAX_HEADERS {
            return Parse::Invalid("too many headers".into());
        }
    }
}

/// Parses a request head at the start of `buf`.
pub fn parse_request_head(buf: &[u8]) -> Parse<RequestHead> {
    let Some((first, pos)) = next_line(buf, 0) else {
        return if request_line_prefix_ok(buf) {
            Parse::Partial
        } else {
            Parse::Invalid("not an HTTP/1.x request line".into())
        };
    };
    let (method, target, minor) = match parse_request_line(first) {
        Ok(v) => v,
        Err(e) => return Parse::Invalid(e),
    };
    match parse_headers(buf, pos, MAX_HEAD) {
        Parse::Done((headers, len)) => Parse::Done(RequestHead {
            method,
            target,
            minor,
            headers,
            len,
        }),
        Parse::Partial => Parse::Partial,
        Parse::Invalid(e) => Parse::Invalid(e),
    }
}

/// Parses a response head at the start of `buf`.
pub fn parse_response_head(buf: &[u8]) -> Parse<ResponseHead> {
    let Some((first, pos)) = next_line(buf, 0) else {
        const V: &[u8] = b"HTTP/1.";
        let k = buf.len().min(V.len());
        return if buf[..k] == V[..k] && buf.len() <= MAX_RESPONSE_HEAD {
            Parse::Partial
        } else {
            Parse::Invalid("not an HTTP/1.x status line".into())
        };
    };
    let mut parts = first.splitn(3, |&b| b == b' ');
    let Some(minor) = parts.next().and_then(parse_version) else {
        return Parse::Invalid("not an HTTP/1.x status line".into());
    };
    let status = match parts.next() {
        Some(s) if s.len() == 3 && s.iter().all(u8::is_ascii_digit) => {
            s.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'))
        }
        _ => return Parse::Invalid("bad status code".into()),
    };
    let reason = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    match parse_headers(buf, pos, MAX_RESPONSE_HEAD) {
        Parse::Done((headers, len)) => Parse::Done(ResponseHead {
            status,
            reason,
            minor,
            headers,
            len,
        }),
        Parse::Partial => Parse::Partial,
        Parse::Invalid(e) => Parse::Invalid(e),
    }
}

/// Decodes a complete chunked body at the start of `buf`: (body, bytes consumed incl. trailers).
pub fn parse_chunked(buf: &[u8]) -> Parse<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    match chunked(buf, Some(&mut body)) {
        Parse::Done((_, used)) => Parse::Done((body, used)),
        Parse::Partial => Parse::Partial,
        Parse::Invalid(e) => Parse::Invalid(e),
    }
}

/// Like [`parse_chunked`] but only measures: (decoded body length, bytes consumed).
pub fn chunked_len(buf: &[u8]) -> Parse<(usize, usize)> {
    chunked(buf, None)
}

/// Chunked decoder; re-run from the start as the buffer grows (cost is per chunk, not per byte).
fn chunked(buf: &[u8], mut sink: Option<&mut Vec<u8>>) -> Parse<(usize, usize)> {
    let mut pos = 0;
    let mut total = 0usize;
    loop {
        let Some((line, next)) = next_line(buf, pos) else {
            return if buf.len() - pos > 1024 {
                Parse::Invalid("chunk size line too long".into())
            } else {
                Parse::Partial
            };
        };
        let size_part = line.split(|&b| b == b';').next().unwrap_or_default();
        let hex = String::from_utf8_lossy(size_part);
        let hex = hex.trim_matches([' ', '\t']);
        if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Parse::Invalid(format!("bad chunk size {hex:?}"));
        }
        let Ok(size) = usize::from_str_radix(hex, 16) else {
            return Parse::Invalid(format!("bad chunk size {hex:?}"));
        };
        pos = next;
        if size == 0 {
            // Trailer section, ended by an empty line.
            loop {
                let Some((l, n)) = next_line(buf, pos) else {
                    return if buf.len() - pos > MAX_HEAD {
                        Parse::Invalid("trailers too large".into())
                    } else {
                        Parse::Partial
                    };
                };
                pos = n;
                if l.is_empty() {
                    return Parse::Done((total, pos));
                }
            }
        }
        let Some(end) = pos.checked_add(size) else {
            return Parse::Invalid("chunk size overflow".into());
        };
        if buf.len() < end {
            return Parse::Partial;
        }
        if let Some(s) = sink.as_deref_mut() {
            s.extend_from_slice(&buf[pos..end]);
        }
        total += size;
        pos = end;
        match buf.get(pos..) {
            Some([b'\n', ..]) => pos += 1,
            Some([b'\r', b'\n', ..]) => pos += 2,
            Some([] | [b'\r']) | None => return Parse::Partial,
            Some(_) => return Parse::Invalid("chunk data not followed by CRLF".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: &[u8]) -> RequestHead {
        match parse_request_head(b) {
            Parse::Done(h) => h,
            other => panic!("expected a head, got {other:?}"),
        }
    }

    #[test]
    fn request_head_basic() {
        let raw = b"GET /media/a.png?x=1 HTTP/1.1\r\nHost: h\r\nX-A:  v  \r\n\r\nrest";
        let h = req(raw);
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/media/a.png?x=1");
        assert_eq!(h.minor, 1);
        assert_eq!(h.header("x-a"), Some("v"));
        assert_eq!(h.len, raw.len() - 4);
        assert!(h.keep_alive());
        assert_eq!(h.body_kind(), Ok(BodyKind::None));
    }

    #[test]
    fn request_head_bare_lf_and_framing() {
        let h = req(b"POST /x HTTP/1.0\nContent-Length: 12\nConnection: keep-alive\n\n");
        assert_eq!(h.body_kind(), Ok(BodyKind::Length(12)));
        assert!(h.keep_alive());
        let h = req(b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n");
        assert_eq!(h.body_kind(), Ok(BodyKind::Chunked));
        assert!(!h.keep_alive());
        assert!(h.expects_continue());
        let h = req(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(h.body_kind().is_err());
        let h = req(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive());
    }

    #[test]
    fn request_head_partial_and_garbage() {
        for p in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /a",
            b"GET /a ",
            b"GET /a HTTP/1",
            b"GET /a HTTP/1.1",
            b"GET /a HTTP/1.1\r",
            b"GET /a HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(
                parse_request_head(p),
                Parse::Partial,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        let tls = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01];
        let bad: [&[u8]; 8] = [
            &tls,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /a HTTP/2",
            b"GET  /a HTTP/1.1\r\n",
            b"GET /a\tb HTTP/1.1",
            b"hello world\r\n",
            b"GET /a HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET /a HTTP/1.1\r\n folded\r\n\r\n",
        ];
        for b in bad {
            assert!(
                matches!(parse_request_head(b), Parse::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        assert!(matches!(parse_request_head(&[b'A'; 40]), Parse::Invalid(_)));
    }

    #[test]
    fn response_head() {
        let raw = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let Parse::Done(h) = parse_response_head(raw) else {
            panic!("no head")
        };
        assert_eq!(h.status, 429);
        assert_eq!(h.reason, "Too Many Requests");
        assert_eq!(h.body_kind("GET"), Ok(BodyKind::Length(5)));
        assert_eq!(h.body_kind("HEAD"), Ok(BodyKind::None));
        assert!(!h.keep_alive());
        assert_eq!(&raw[h.len..], b"hello");
        let Parse::Done(h) = parse_response_head(b"HTTP/1.0 200\r\n\r\n") else {
            panic!("no head")
        };
        assert_eq!(h.status, 200);
        assert_eq!(h.body_kind("GET"), Ok(BodyKind::UntilClose));
        assert_eq!(parse_response_head(b"HTTP/1.1 2"), Parse::Partial);
        assert_eq!(parse_response_head(b"HTT"), Parse::Partial);
        assert!(matches!(
            parse_response_head(b"SSH-2.0\r\n"),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 20x OK\r\n\r\n"),
            Parse::Invalid(_)
        ));
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let Parse::Done((body, used)) = parse_chunked(raw) else {
            panic!("not done")
        };
        assert_eq!(body, b"hello world");
        assert_eq!(&raw[used..], b"NEXT");
        assert_eq!(chunked_len(raw), Parse::Done((11, used)));
        for cut in 0..raw.len() - 4 {
            assert_eq!(chunked_len(&raw[..cut]), Parse::Partial, "cut at {cut}");
        }
        assert_eq!(chunked_len(b"0\n\n"), Parse::Done((0, 3)));
        assert!(matches!(chunked_len(b"zz\r\n"), Parse::Invalid(_)));
        assert!(matches!(chunked_len(b"2\r\nabX"), Parse::Invalid(_)));
    }
}
