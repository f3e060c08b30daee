//! HTTP/1.x request-line recognition from a short prefix (the push counter peeks at the first bytes
//! of an outbound message) and the word-at-a-time byte mask the stream parser scans with.
//!
//! Nothing here allocates, and loops run over fixed bounds (the verifier's rule).

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

/// Bit 7 of every byte of `w` that equals `c`, and no other bit (exact: no carry crosses bytes).
#[inline(always)]
pub const fn byte_eq_mask(w: u64, c: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let v = w ^ (0x0101_0101_0101_0101u64 * c as u64);
    !(((v & LOW7) + LOW7) | v) & 0x8080_8080_8080_8080
}

/// Index of the lowest marked byte of a [`byte_eq_mask`] result (which has one), without
/// branches (BPF has no count-trailing-zeros instruction): the lowest mark, moved to bit 0 of
/// its byte, multiplied so that the byte's index lands in the top byte.
#[inline(always)]
pub const fn first_marked(m: u64) -> usize {
    let lowest = (m & m.wrapping_neg()) >> 7;
    (lowest.wrapping_mul(0x0001_0203_0405_0607) >> 56) as usize
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::string::String;

    fn format_line(m: &str, t: &str) -> String {
        let mut s = String::new();
        s.push_str(m);
        s.push(' ');
        s.push_str(t);
        s.push_str(" HTTP/1.1\r\n");
        s
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
    fn byte_masks_are_exact() {
        for c in [0u8, b'\r', b'\n', 0x7f, 0x80, 0xff] {
            for b in 0..=255u8 {
                let w = u64::from_le_bytes([b, c, b, 0, c, 0xff, 0x80, b]);
                let m = byte_eq_mask(w, c);
                for (i, x) in w.to_le_bytes().iter().enumerate() {
                    assert_eq!(m >> (8 * i + 7) & 1 == 1, *x == c, "c {c} b {b} byte {i}");
                }
                assert_eq!(m & !0x8080_8080_8080_8080, 0);
            }
        }
    }

    proptest! {
        /// Never panics and never reads past the slice, whatever the bytes.
        #[test]
        fn parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
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

        /// Lowercase or mangled methods never count as requests.
        #[test]
        fn lowercase_methods_rejected(m in 0usize..9, path in "/[a-z]{0,10}") {
            let line = format_line(&Method::ALL[m].as_str().to_ascii_lowercase(), &path);
            prop_assert_eq!(parse_request_line(line.as_bytes()), None);
        }
    }
}
