//! The HTTP/1.x request-line recogniser and the request classifier.
//!
//! The kernel sees only the first bytes of each inbound chunk ([`PEEK_LEN`]), so everything here
//! decides from a short prefix, never allocates, and loops only over fixed bounds (the verifier's
//! rule). `None`/[`Class::NotRequest`] means "these bytes do not start a request": the caller decides
//! whether that is a body segment or unparsed traffic.

use crate::maps::{Config, MAX_MEDIA_PREFIXES, MEDIA_PREFIX_MAX};

/// How many leading bytes of a chunk the kernel loads: the longest method, a space and the longest
/// media prefix.
pub const PEEK_LEN: usize = 8 + MEDIA_PREFIX_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Trace,
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Patch,
        Method::Options,
        Method::Connect,
        Method::Trace,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
        }
    }
}

/// The start of a request line: the method and where the request target begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Method,
    pub target: usize,
}

const fn word(b: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*b)
}

/// (method, token plus space as a little-endian word, mask of the bytes that matter)
const METHODS: [(Method, u64, u64); 9] = [
    (Method::Get, word(b"GET \0\0\0\0"), 0xffff_ffff),
    (Method::Put, word(b"PUT \0\0\0\0"), 0xffff_ffff),
    (Method::Post, word(b"POST \0\0\0"), 0xff_ffff_ffff),
    (Method::Head, word(b"HEAD \0\0\0"), 0xff_ffff_ffff),
    (Method::Patch, word(b"PATCH \0\0"), 0xffff_ffff_ffff),
    (Method::Trace, word(b"TRACE \0\0"), 0xffff_ffff_ffff),
    (Method::Delete, word(b"DELETE \0"), 0xff_ffff_ffff_ffff),
    (Method::Options, word(b"OPTIONS "), u64::MAX),
    (Method::Connect, word(b"CONNECT "), u64::MAX),
];

/// Recognises `METHOD SP target` at the start of `buf`.
///
/// The target must begin with `/` (origin form), `*` (`OPTIONS *`), `h`/`H` (absolute form) or, for
/// CONNECT, any visible byte (authority form). Anything else, including a chunk too short to hold
/// the first target byte, is not a request start.
#[inline(always)]
pub fn parse_request_line(buf: &[u8]) -> Option<RequestLine> {
    let mut head = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        if let Some(b) = buf.get(i) {
            head[i] = *b;
        }
        i += 1;
    }
    let w = u64::from_le_bytes(head);
    let mut m = 0;
    while m < METHODS.len() {
        let (method, token, mask) = METHODS[m];
        if w & mask == token {
            let target = (mask.count_ones() / 8) as usize;
            let first = *buf.get(target)?;
            let ok = match method {
                Method::Connect => first > b' ' && first < 0x7f,
                _ => matches!(first, b'/' | b'*' | b'h' | b'H'),
            };
            return if ok {
                Some(RequestLine { method, target })
            } else {
                None
            };
        }
        m += 1;
    }
    None
}

/// What an inbound chunk means for the org's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A request that uses quota.
    Counted(Method),
    /// A GET under a media prefix: exempt.
    ExemptMedia,
    /// These bytes do not start a request.
    NotRequest,
}

/// Does the target at `buf[target..]` start with `prefix`? The whole prefix must be present.
#[inline(always)]
pub fn has_prefix(buf: &[u8], target: usize, prefix: &[u8; MEDIA_PREFIX_MAX], len: usize) -> bool {
    if len == 0 || len > MEDIA_PREFIX_MAX {
        return false;
    }
    let mut i = 0;
    while i < MEDIA_PREFIX_MAX {
        if i >= len {
            return true;
        }
        match buf.get(target + i) {
            Some(b) if *b == prefix[i] => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Classifies the first bytes of an inbound chunk against the configured media prefixes.
#[inline(always)]
pub fn classify(buf: &[u8], config: &Config) -> Class {
    let Some(line) = parse_request_line(buf) else {
        return Class::NotRequest;
    };
    if line.method != Method::Get {
        return Class::Counted(line.method);
    }
    let mut p = 0;
    while p < MAX_MEDIA_PREFIXES {
        if p >= config.media_prefix_count as usize {
            break;
        }
        if has_prefix(
            buf,
            line.target,
            &config.media_prefixes[p],
            config.media_prefix_len[p] as usize,
        ) {
            return Class::ExemptMedia;
        }
        p += 1;
    }
    Class::Counted(Method::Get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(prefixes: &[&str]) -> Config {
        let mut c = Config::empty();
        for p in prefixes {
            assert!(c.push_media_prefix(p.as_bytes()));
        }
        c
    }

    #[test]
    fn recognises_every_method() {
        for m in Method::ALL {
            let line = format_line(m.as_str(), "/x");
            assert_eq!(
                parse_request_line(line.as_bytes()),
                Some(RequestLine {
                    method: m,
                    target: m.as_str().len() + 1
                }),
                "{line}"
            );
        }
    }

    fn format_line(m: &str, t: &str) -> String {
        let mut s = std::string::String::new();
        s.push_str(m);
        s.push(' ');
        s.push_str(t);
        s.push_str(" HTTP/1.1\r\n");
        s
    }

    extern crate std;
    use std::string::String;

    #[test]
    fn rejects_non_requests() {
        for bad in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"get /",
            b"GETX /",
            b"GET  /",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"POST\t/",
            b"{\"json\":1}",
            b"\r\nGET / HTTP/1.1",
            b"CONNECT  x",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
            assert_eq!(classify(bad, &config(&["/media/"])), Class::NotRequest);
        }
    }

    #[test]
    fn accepts_target_forms() {
        assert!(parse_request_line(b"OPTIONS * HTTP/1.1").is_some());
        assert!(parse_request_line(b"GET http://h/ HTTP/1.1").is_some());
        assert!(parse_request_line(b"CONNECT example.com:443 HTTP/1.1").is_some());
        assert!(parse_request_line(b"GET /").is_some());
    }

    #[test]
    fn media_gets_are_exempt_only_for_get_and_whole_prefix() {
        let c = config(&["/media/", "/files/dl/"]);
        assert_eq!(
            classify(b"GET /media/a.png HTTP/1.1", &c),
            Class::ExemptMedia
        );
        assert_eq!(classify(b"GET /files/dl/x", &c), Class::ExemptMedia);
        assert_eq!(classify(b"GET /media", &c), Class::Counted(Method::Get));
        assert_eq!(classify(b"GET /mediax/", &c), Class::Counted(Method::Get));
        assert_eq!(
            classify(b"HEAD /media/a.png HTTP/1.1", &c),
            Class::Counted(Method::Head)
        );
        assert_eq!(
            classify(b"POST /media/a.png HTTP/1.1", &c),
            Class::Counted(Method::Post)
        );
        assert_eq!(
            classify(b"GET /api/media/ HTTP/1.1", &c),
            Class::Counted(Method::Get)
        );
        assert_eq!(
            classify(b"GET /media/", &config(&[])),
            Class::Counted(Method::Get)
        );
    }

    #[test]
    fn longest_prefix_fits_the_peek() {
        let long: String = core::iter::once('/')
            .chain(core::iter::repeat_n('m', 63))
            .collect();
        let c = config(&[&long]);
        let line = format_line("GET", &long);
        assert_eq!(
            classify(&line.as_bytes()[..PEEK_LEN.min(line.len())], &c),
            Class::ExemptMedia
        );
        let mut c2 = Config::empty();
        assert!(!c2.push_media_prefix(&[b'/'; MEDIA_PREFIX_MAX + 1]));
    }

    proptest! {
        /// Never panics and never reads past the slice, whatever the bytes.
        #[test]
        fn classify_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let c = config(&["/media/", "/m"]);
            let _ = classify(&bytes, &c);
            let _ = parse_request_line(&bytes);
        }

        /// Any well-formed request line is recognised, with its method and target offset.
        #[test]
        fn well_formed_lines_parse(m in 0usize..9, path in "/[a-zA-Z0-9/._~-]{0,80}") {
            let method = Method::ALL[m];
            let line = format_line(method.as_str(), &path);
            let got = parse_request_line(line.as_bytes());
            prop_assert_eq!(got, Some(RequestLine { method, target: method.as_str().len() + 1 }));
        }

        /// Truncating a request to the kernel's peek never changes its class.
        #[test]
        fn peek_window_is_enough(path in "/(media/)?[a-z0-9/]{0,100}") {
            let c = config(&["/media/"]);
            let line = format_line("GET", &path);
            let full = classify(line.as_bytes(), &c);
            let cut = &line.as_bytes()[..PEEK_LEN.min(line.len())];
            prop_assert_eq!(classify(cut, &c), full);
            let want = if path.starts_with("/media/") { Class::ExemptMedia } else { Class::Counted(Method::Get) };
            prop_assert_eq!(full, want);
        }

        /// Lowercase or mangled methods never count as requests.
        #[test]
        fn lowercase_methods_rejected(m in 0usize..9, path in "/[a-z]{0,10}") {
            let line = format_line(&Method::ALL[m].as_str().to_ascii_lowercase(), &path);
            prop_assert_eq!(parse_request_line(line.as_bytes()), None);
        }
    }
}
