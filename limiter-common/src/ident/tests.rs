extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use proptest::prelude::*;
use siphasher::sip::SipHasher13;

use super::*;

// ---------------------------------------------------------------------------------------------
// Captures, as the stream parser makes them

/// A linear capture: the value's first CAP bytes, and its whole length.
fn lin(value: &[u8]) -> ([u8; CAP], u32) {
    let mut buf = [0xa5u8; CAP];
    let n = value.len().min(CAP);
    buf[..n].copy_from_slice(&value[..n]);
    (buf, value.len() as u32)
}

/// A ring capture: byte i at i % CAP, so the last CAP bytes are kept.
fn ring(value: &[u8]) -> ([u8; CAP], u32) {
    let mut buf = [0x5au8; CAP];
    for (i, b) in value.iter().enumerate() {
        buf[i % CAP] = *b;
    }
    (buf, value.len() as u32)
}

fn key_of(ip: IpAddr) -> AddrKey {
    match ip {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

fn ip(s: &str) -> AddrKey {
    key_of(s.parse().unwrap())
}

/// The `IpAddr` an `AddrKey` stands for (IPv4-mapped keys as IPv4).
fn ip_of(k: AddrKey) -> IpAddr {
    let a = Ipv6Addr::from(k);
    match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    }
}

// ---------------------------------------------------------------------------------------------
// SipHash

#[test]
fn siphash_reference_vectors() {
    // SipHash-1-3 under the zero key, as another implementation (the `digest` crates'
    // sip_hash) publishes its output, a u64 in hex (the paper's vectors are of SipHash-2-4).
    let vectors: [(&[u8], u64); 2] = [
        (b"", 0xd1fb_a762_150c_532c),
        (b"siphash", 0x8264_ceec_cb16_bcbe),
    ];
    for (message, want) in vectors {
        let mut data = [0u8; CAP];
        data[..message.len()].copy_from_slice(message);
        assert_eq!(siphash13([0, 0], &data, message.len()), want, "{message:?}");
    }
    // Key 00..0f and message 00..(len-1) at every length, against `siphasher`.
    let k = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
    let mut data = [0u8; CAP];
    for (i, b) in data.iter_mut().enumerate() {
        *b = i as u8;
    }
    for len in 0..=CAP {
        assert_eq!(
            siphash13(k, &data, len),
            SipHasher13::new_with_keys(k[0], k[1]).hash(&data[..len]),
            "length {len}"
        );
    }
}

#[test]
fn siphash_of_a_longer_length_is_of_the_whole_buffer() {
    let data = [0x61u8; CAP];
    let k = [1, 2];
    assert_eq!(siphash13(k, &data, CAP + 1), siphash13(k, &data, CAP));
    assert_eq!(
        siphash13(k, &data, usize::MAX),
        SipHasher13::new_with_keys(1, 2).hash(&data)
    );
}

proptest! {
    #[test]
    fn siphash_equals_siphasher(
        k0 in any::<u64>(),
        k1 in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..=CAP),
        junk in any::<u8>(),
    ) {
        // Bytes past the length must not matter.
        let mut buf = [junk; CAP];
        buf[..data.len()].copy_from_slice(&data);
        prop_assert_eq!(
            siphash13([k0, k1], &buf, data.len()),
            SipHasher13::new_with_keys(k0, k1).hash(&data)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// API keys

fn key(kind: u8, value: &[u8]) -> Option<Vec<u8>> {
    let (buf, len) = lin(value);
    let mut out = [0u8; CAP];
    let n = api_key(kind, &buf, len, &mut out)?;
    assert!(n <= API_KEY_MAX);
    Some(out[..n].to_vec())
}

fn plain(value: &str) -> Option<String> {
    key(KEY_PLAIN, value.as_bytes()).map(|k| String::from_utf8(k).unwrap())
}

fn auth(value: &str) -> Option<String> {
    key(KEY_AUTHORIZATION, value.as_bytes()).map(|k| String::from_utf8(k).unwrap())
}

fn basic(credentials: &[u8]) -> String {
    format!("Basic {}", STANDARD.encode(credentials))
}

#[test]
fn valid_key_bytes_are_visible_ascii() {
    let valid: Vec<u8> = (0..=255u8).filter(|b| valid_key_byte(*b)).collect();
    let graphic: Vec<u8> = (0..=255u8).filter(|b| b.is_ascii_graphic()).collect();
    assert_eq!(valid, graphic);
}

#[test]
fn plain_key_is_the_trimmed_value() {
    assert_eq!(plain("k-123_abc").as_deref(), Some("k-123_abc"));
    assert_eq!(plain("k-123\r").as_deref(), Some("k-123"));
    assert_eq!(plain("k-123 \t \r\n").as_deref(), Some("k-123"));
    assert_eq!(plain("Bearer x"), None, "a space inside a plain key");
    assert_eq!(plain(""), None);
    assert_eq!(plain(" \t\r"), None);
    assert_eq!(key(KEY_PLAIN, b"ab\x01cd"), None);
    assert_eq!(key(KEY_PLAIN, b"ab\x7fcd"), None);
    assert_eq!(key(KEY_PLAIN, "clé".as_bytes()), None);
}

#[test]
fn plain_key_up_to_the_longest() {
    let longest = "k".repeat(API_KEY_MAX);
    assert_eq!(plain(&longest), Some(longest.clone()));
    // One byte more, and the capture is truncated: a longer key is no org's.
    assert_eq!(plain(&"k".repeat(API_KEY_MAX + 1)), None);
    assert_eq!(plain(&"k".repeat(2000)), None);
}

#[test]
fn bearer_token() {
    assert_eq!(auth("Bearer tok.en-1~+/=").as_deref(), Some("tok.en-1~+/="));
    assert_eq!(auth("bearer tok").as_deref(), Some("tok"));
    assert_eq!(auth("BEARER    tok  \r").as_deref(), Some("tok"));
    assert_eq!(auth("Bearertok"), None);
    assert_eq!(auth("Bearer"), None);
    assert_eq!(auth("Bearer \r"), None);
    assert_eq!(
        auth("Bearer\ttok"),
        None,
        "the scheme is followed by spaces"
    );
    assert_eq!(auth("Bearer to ken"), None);
    assert_eq!(key(KEY_AUTHORIZATION, b"Bearer to\x00ken"), None);
    let longest = "t".repeat(CAP - 7);
    assert_eq!(auth(&format!("Bearer {longest}")), Some(longest));
    assert_eq!(
        auth(&format!("Bearer {}", "t".repeat(CAP - 6))),
        None,
        "truncated"
    );
    assert_eq!(
        auth(&format!("Bearer {}", "t".repeat(500))),
        None,
        "truncated"
    );
}

#[test]
fn basic_user_name() {
    assert_eq!(auth(&basic(b"alice:secret")).as_deref(), Some("alice"));
    assert_eq!(auth(&basic(b"alice:")).as_deref(), Some("alice"));
    assert_eq!(auth(&basic(b"al:ice:pw")).as_deref(), Some("al"));
    assert_eq!(
        auth(&basic(b"alice:\x00\xff pw")).as_deref(),
        Some("alice"),
        "any password"
    );
    assert_eq!(
        auth(&format!("bAsIc  {} \r", STANDARD.encode("bob:pw"))).as_deref(),
        Some("bob")
    );
    // Every padding length, with and without the padding.
    for cred in ["a:", "ab:", "abc:", "abcd:x", "abcde:xy"] {
        assert_eq!(
            auth(&basic(cred.as_bytes())).as_deref(),
            cred.split(':').next()
        );
        let bare = format!("Basic {}", STANDARD_NO_PAD.encode(cred));
        assert_eq!(auth(&bare).as_deref(), cred.split(':').next(), "{bare}");
    }
}

#[test]
fn basic_without_a_usable_user() {
    assert_eq!(auth(&basic(b"alice")), None, "no ':'");
    assert_eq!(auth(&basic(b":pw")), None, "empty user");
    assert_eq!(auth(&basic(b"al ice:pw")), None, "space in the user");
    assert_eq!(auth(&basic("é:pw".as_bytes())), None, "not ASCII");
    assert_eq!(auth("Basic"), None);
    assert_eq!(auth("Basic "), None);
    assert_eq!(auth("Basicxyz"), None);
    assert_eq!(auth("Basic YWxpY2U6c2VjcmV0!"), None, "not base64");
    assert_eq!(auth("Basic YWxpY2U6c2VjcmV0 x"), None, "not base64");
    assert_eq!(auth("Basic YWxpY2U6cA=x"), None, "data after padding");
    assert_eq!(auth("Basic YWxpY2U6cA==="), None, "too much padding");
    assert_eq!(
        auth("Basic YWxpY2U6cA="),
        None,
        "padding short of a quantum"
    );
    assert_eq!(
        auth("Basic YWxpY2U6cAb"),
        Some("alice".into()),
        "unpadded, 3 chars left"
    );
    assert_eq!(auth("Basic YWxpY2U6c"), None, "one char left over");
    assert_eq!(auth("Digest username=\"alice\""), None);
    assert_eq!(auth("Negotiate YWxpY2U6c2VjcmV0"), None);
    assert_eq!(key(7, basic(b"alice:pw").as_bytes()), None, "unknown kind");
}

#[test]
fn basic_long_values() {
    // A long password: the user name is within the captured prefix.
    let long = [b"bob:".as_slice(), &[b'p'; 400]].concat();
    assert_eq!(auth(&basic(&long)).as_deref(), Some("bob"));
    // A user name whose ':' lies past the capture is not known.
    let long_user = [[b'u'; 100].as_slice(), b":pw"].concat();
    assert_eq!(auth(&basic(&long_user)), None);
    // The longest user name a capture can show: (CAP - 6) base64 chars hold this many bytes.
    let fit = (CAP - 6) / 4 * 3 - 1;
    let user = "u".repeat(fit);
    let cred = format!("{user}:{}", "p".repeat(300));
    assert_eq!(auth(&basic(cred.as_bytes())), Some(user));
}

/// Every byte of `value` pushed into a KeyText (as a kernel that follows the stream would).
fn key_streamed(kind: u8, value: &[u8]) -> Option<Vec<u8>> {
    let mut out = [0u8; CAP];
    let mut t = KeyText::new(kind);
    for b in value {
        t.push(*b, &mut out);
    }
    let n = t.finish(value.len() as u32)?;
    Some(out[..n].to_vec())
}

#[test]
fn keys_pushed_whole() {
    let longest = "k".repeat(API_KEY_MAX);
    // The line end pushed too: a key of API_KEY_MAX bytes still reads.
    let v = format!("{longest} \r\n");
    assert_eq!(
        key_streamed(KEY_PLAIN, v.as_bytes()),
        Some(longest.clone().into_bytes())
    );
    assert_eq!(
        key_streamed(KEY_PLAIN, format!("{longest}k").as_bytes()),
        None,
        "too long"
    );
    assert_eq!(
        key_streamed(KEY_PLAIN, "k".repeat(1000).as_bytes()),
        None,
        "too long"
    );
    let v = format!("Bearer {longest}\r");
    assert_eq!(
        key_streamed(KEY_AUTHORIZATION, v.as_bytes()),
        Some(longest.into_bytes())
    );
    // A Basic value is checked to its end: its padding, and base64 all along.
    let cred = format!("bob:{}", "p".repeat(400));
    let v = basic(cred.as_bytes());
    assert_eq!(
        key_streamed(KEY_AUTHORIZATION, v.as_bytes()),
        Some(b"bob".to_vec())
    );
    assert_eq!(
        key_streamed(KEY_AUTHORIZATION, format!("{v}=").as_bytes()),
        None
    );
    assert_eq!(
        key_streamed(KEY_AUTHORIZATION, format!("{v}!").as_bytes()),
        None
    );
    let user = "u".repeat(200);
    let v = basic(format!("{user}:pw").as_bytes());
    assert_eq!(
        key_streamed(KEY_AUTHORIZATION, v.as_bytes()),
        None,
        "user name too long"
    );
}

fn visible() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[!-~]{1,128}").unwrap()
}

proptest! {
    #[test]
    fn plain_keys_round_trip(k in visible(), ows in "[ \t]{0,3}\r?") {
        let v = format!("{k}{ows}");
        let want = if v.len() <= CAP { Some(k) } else { None };
        prop_assert_eq!(plain(&v), want);
    }

    #[test]
    fn bearer_round_trip(k in visible(), spaces in " {1,3}", scheme in "(?i:bearer)") {
        let v = format!("{scheme}{spaces}{k}\r");
        let want = if v.len() <= CAP { Some(k) } else { None };
        prop_assert_eq!(auth(&v), want);
    }

    #[test]
    fn basic_round_trip(
        user in "[!-9;-~]{1,60}",
        pw in proptest::collection::vec(any::<u8>(), 0..200),
        pad in any::<bool>(),
    ) {
        let cred = [user.as_bytes(), b":", &pw].concat();
        let enc = if pad { STANDARD.encode(&cred) } else { STANDARD_NO_PAD.encode(&cred) };
        let v = format!("Basic {enc}");
        // The ':' must be decoded from the captured prefix.
        let colon_chars = ((user.len() + 1) * 8).div_ceil(6);
        let want = if 6 + colon_chars <= CAP { Some(user) } else { None };
        prop_assert_eq!(auth(&v), want);
    }

    #[test]
    fn any_value_gives_visible_keys(
        kind in 0u8..3,
        v in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Some(k) = key(kind, &v) {
            prop_assert!(!k.is_empty() && k.len() <= API_KEY_MAX);
            prop_assert!(k.iter().all(|b| valid_key_byte(*b)));
        }
    }

    #[test]
    fn basic_garbage_never_panics(v in "Basic [A-Za-z0-9+/=: ]{0,200}") {
        if let Some(k) = auth(&v) {
            prop_assert!(k.bytes().all(valid_key_byte));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses

fn addr(s: &str) -> Option<AddrKey> {
    let (buf, len) = lin(s.as_bytes());
    assert!(len as usize <= CAP);
    parse_addr(&buf, 0, len as usize)
}

fn std_addr(s: &str) -> Option<AddrKey> {
    s.parse::<IpAddr>().ok().map(key_of)
}

#[test]
fn addresses_as_std_reads_them() {
    let cases = [
        "0.0.0.0",
        "255.255.255.255",
        "192.0.2.1",
        "01.2.3.4",
        "1.02.3.4",
        "1.2.3.00",
        "256.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "1..3.4",
        ".1.2.3",
        "1.2.3.4.",
        "1.2.3.4 ",
        " 1.2.3.4",
        "1.2.3.-4",
        "1.2.3.4444",
        "::",
        "::1",
        "1::",
        ":::",
        ":1",
        "1:",
        "1:2:3:4:5:6:7:8",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7",
        "1:2:3:4:5:6:7::",
        "::2:3:4:5:6:7:8",
        "1::2:3:4:5:6:7:8",
        "1::3:4:5:6:7:8",
        "1::2::3",
        "1:::2",
        "12345::",
        "0001:0db8:0000:0000:0000:0000:0000:0001",
        "2001:DB8::A",
        "2001:db8::g",
        "::ffff:192.0.2.1",
        "::192.0.2.1",
        "1:2:3:4:5:6:1.2.3.4",
        "1:2:3:4:5:6:7:1.2.3.4",
        "1:2:3:4:5::1.2.3.4",
        "1:2:3:4:5:6::1.2.3.4",
        "1.2.3.4::",
        "1:1.2.3.4",
        "::1.2.3",
        "::1.2.3.4.5",
        "::01.2.3.4",
        "::1.2.3.4:1",
        "::1a.2.3.4",
        "fe80::1%eth0",
        "[::1]",
        "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        "",
        ".",
        ":",
        "a",
    ];
    for s in cases {
        assert_eq!(addr(s), std_addr(s), "{s:?}");
    }
    assert_eq!(addr("192.0.2.1"), Some(v4_mapped([192, 0, 2, 1])));
    assert_eq!(
        addr("::ffff:192.0.2.1"),
        addr("192.0.2.1"),
        "IPv4-mapped text keys as IPv4"
    );
}

#[test]
fn addresses_anywhere_in_a_ring() {
    // Positions are value positions, taken modulo CAP: an address across the ring's end reads.
    let mut value = vec![b'x'; CAP - 5];
    value.extend_from_slice(b"2001:db8::7");
    let (buf, len) = ring(&value);
    assert_eq!(
        parse_addr(&buf, CAP - 5, len as usize),
        Some(ip("2001:db8::7"))
    );
}

/// Text forms of an IPv6 address std does not print: full, zero-padded, uppercase, IPv4 suffix.
fn ipv6_forms(a: Ipv6Addr, form: u8) -> String {
    let s = a.segments();
    match form {
        0 => a.to_string(),
        1 => s.map(|g| format!("{g:x}")).join(":"),
        2 => s.map(|g| format!("{g:04X}")).join(":"),
        _ => {
            let o = a.octets();
            let head: Vec<String> = s[..6].iter().map(|g| format!("{g:x}")).collect();
            let head = head.join(":");
            format!("{head}:{}.{}.{}.{}", o[12], o[13], o[14], o[15])
        }
    }
}

/// An IPv6 address with runs of zero groups, so that `::` shows up.
fn ipv6_with_zeros() -> impl Strategy<Value = Ipv6Addr> {
    (any::<[u16; 8]>(), any::<u8>()).prop_map(|(mut g, zeros)| {
        for (i, s) in g.iter_mut().enumerate() {
            if zeros & (1 << i) != 0 {
                *s = 0;
            }
        }
        Ipv6Addr::from(g)
    })
}

/// A valid address's text with one byte changed, dropped or added.
fn mutated(s: String, at: usize, op: u8, c: u8) -> String {
    let mut b = s.into_bytes();
    let at = at % (b.len() + 1);
    match op % 3 {
        0 if at < b.len() => b[at] = c,
        1 if at < b.len() => {
            b.remove(at);
        }
        _ => b.insert(at, c),
    }
    String::from_utf8_lossy(&b).into_owned()
}

proptest! {
    #[test]
    fn ipv4_text_parses(a in any::<Ipv4Addr>()) {
        prop_assert_eq!(addr(&a.to_string()), Some(v4_mapped(a.octets())));
    }

    #[test]
    fn ipv6_text_parses(a in ipv6_with_zeros(), form in 0u8..4) {
        let text = ipv6_forms(a, form);
        prop_assert_eq!(addr(&text), Some(a.octets()), "{}", text);
    }

    #[test]
    fn near_addresses_agree_with_std(
        a in ipv6_with_zeros(),
        v4 in any::<Ipv4Addr>(),
        which in 0u8..5,
        at in any::<usize>(),
        op in any::<u8>(),
        c in proptest::sample::select(b"0123456789abcdefABCDEFgx:.% []".to_vec()),
    ) {
        let text = if which == 4 { v4.to_string() } else { ipv6_forms(a, which) };
        let s = mutated(text, at, op, c);
        if s.len() <= CAP {
            prop_assert_eq!(addr(&s), std_addr(&s), "{:?}", s);
        }
    }

    #[test]
    fn random_text_agrees_with_std(s in "[0-9a-fA-F:.]{0,46}") {
        prop_assert_eq!(addr(&s), std_addr(&s), "{:?}", s);
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarded headers

/// 10.0.0.0/8 and fd00::/8 are the trusted proxies of these tests.
fn trusted(a: &AddrKey) -> bool {
    match ip_of(*a) {
        IpAddr::V4(v4) => v4.octets()[0] == 10,
        IpAddr::V6(v6) => v6.octets()[0] == 0xfd,
    }
}

fn fwd(kind: u8, value: &str) -> Option<IpAddr> {
    let (buf, len) = ring(value.as_bytes());
    forwarded_addr(kind, &buf, len, &trusted).map(ip_of)
}

fn xff(value: &str) -> Option<IpAddr> {
    fwd(FWD_X_FORWARDED_FOR, value)
}

fn forwarded(value: &str) -> Option<IpAddr> {
    fwd(FWD_FORWARDED, value)
}

fn some(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn xff_rightmost_untrusted() {
    assert_eq!(xff("203.0.113.9"), some("203.0.113.9"));
    assert_eq!(xff("203.0.113.9\r"), some("203.0.113.9"));
    assert_eq!(xff("198.51.100.1, 10.0.0.2"), some("198.51.100.1"));
    assert_eq!(xff("203.0.113.9, 10.0.0.3, 10.0.0.2"), some("203.0.113.9"));
    assert_eq!(xff("203.0.113.9,10.0.0.2"), some("203.0.113.9"));
    assert_eq!(xff("203.0.113.9 \t,\t 10.0.0.2 \r"), some("203.0.113.9"));
    assert_eq!(xff("2001:db8::1, fd00::2"), some("2001:db8::1"));
    assert_eq!(xff("::ffff:203.0.113.9"), some("203.0.113.9"));
}

#[test]
fn xff_spoofed_left_entries_are_not_believed() {
    // The client sent `X-Forwarded-For: 6.6.6.6` (or a trusted address, or junk); the proxy
    // appended the address it saw.
    assert_eq!(xff("6.6.6.6, 203.0.113.9"), some("203.0.113.9"));
    assert_eq!(xff("10.0.0.1, 203.0.113.9"), some("203.0.113.9"));
    assert_eq!(xff("junk, 203.0.113.9, 10.0.0.2"), some("203.0.113.9"));
    assert_eq!(
        xff("6.6.6.6, 7.7.7.7, 203.0.113.9, 10.0.0.2"),
        some("203.0.113.9")
    );
}

#[test]
fn xff_unreadable_entries() {
    assert_eq!(xff("203.0.113.9, junk"), None);
    assert_eq!(xff("203.0.113.9, junk, 10.0.0.2"), None);
    assert_eq!(xff("203.0.113.9,,10.0.0.2"), None);
    assert_eq!(xff("203.0.113.9, 10.0.0.2,"), None);
    assert_eq!(xff("203.0.113.9:80"), None);
    assert_eq!(xff("[2001:db8::1]"), None);
    assert_eq!(xff("203.0.113.9;10.0.0.2"), None);
    assert_eq!(xff(""), None);
    assert_eq!(xff(" \r"), None);
    assert_eq!(fwd(9, "203.0.113.9"), None, "unknown kind");
}

#[test]
fn xff_all_trusted() {
    // A whole value: its leftmost address (the client is itself at a trusted address).
    assert_eq!(xff("10.0.0.5, 10.0.0.2"), some("10.0.0.5"));
    let eight: Vec<String> = (1..=8).map(|i| format!("10.0.0.{i}")).collect();
    assert_eq!(xff(&eight.join(", ")), some("10.0.0.1"));
    // More than FWD_ENTRIES_MAX: not read.
    let nine: Vec<String> = (1..=9).map(|i| format!("10.0.0.{i}")).collect();
    assert_eq!(xff(&nine.join(",")), None);
    assert_eq!(xff(&format!("203.0.113.9, {}", eight.join(","))), None);
    assert_eq!(
        xff(&format!("203.0.113.9, {}", eight[..7].join(","))),
        some("203.0.113.9")
    );
}

#[test]
fn xff_truncated_keeps_its_tail() {
    let mut v = String::new();
    while v.len() < 2000 {
        v.push_str("198.51.100.77, ");
    }
    v.push_str("203.0.113.9");
    assert!(v.len() > 2000);
    assert_eq!(xff(&v), some("203.0.113.9"));
    assert_eq!(
        xff(&format!("{v}, 10.0.0.2, 10.1.2.3")),
        some("203.0.113.9")
    );

    // All the entries wholly in the tail are trusted: the cut one is not read.
    let tail = ", 10.0.0.2, 10.0.0.3";
    let v = format!("{}{tail}", "a".repeat(300));
    assert_eq!(xff(&v), None);
    // Even when the cut one reads as an address: `203.0.113.99` cut to `3.0.113.99`.
    let trusted_tail = ", 10.0.0.2, 10.0.0.3";
    let pad = " ".repeat(CAP - "3.0.113.99".len() - trusted_tail.len());
    let v = format!("198.51.100.1, 203.0.113.99{pad}{trusted_tail}");
    assert_eq!(&v[v.len() - CAP..v.len() - CAP + 10], "3.0.113.99");
    assert_eq!(xff(&v), None);
    // Cut right at a comma: the entry after it is whole.
    let pad = " ".repeat(CAP - ",203.0.113.99".len() - trusted_tail.len());
    let v = format!("198.51.100.1,203.0.113.99{pad}{trusted_tail}");
    assert_eq!(&v[v.len() - CAP..v.len() - CAP + 1], ",");
    assert_eq!(xff(&v), some("203.0.113.99"));
}

/// What forwarded_addr should give for an X-Forwarded-For value, the slow way: std's parser
/// over the entries wholly within the last CAP bytes.
fn xff_model(value: &str) -> Option<IpAddr> {
    let lo = value.len().saturating_sub(CAP);
    let entries: Vec<&str> = value.split(',').collect();
    let mut pos = value.len();
    let mut last = None;
    for (j, e) in entries.iter().rev().enumerate() {
        let start = pos - e.len();
        if start < lo || (start == lo && lo > 0) {
            // Partly outside (or maybe so: the byte before it is not captured).
            return None;
        }
        if j >= FWD_ENTRIES_MAX {
            return None;
        }
        let a: IpAddr = e.trim_matches([' ', '\t', '\r']).parse().ok()?;
        if !trusted(&key_of(a)) {
            return Some(a);
        }
        last = Some(a);
        pos = start.saturating_sub(1);
    }
    last
}

fn xff_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| format!("10.{a}.{b}.1")),
        ipv6_with_zeros().prop_map(|a| a.to_string()),
        any::<u16>().prop_map(|g| format!("fd00::{g:x}")),
        Just("unknown".to_string()),
        Just(String::new()),
    ]
}

proptest! {
    #[test]
    fn xff_agrees_with_the_model(
        entries in proptest::collection::vec((xff_entry(), "[ \t]{0,2}", "[ \t]{0,2}"), 1..14),
        end in "[ \t]{0,2}\r?",
        // Mostly readable lists; sometimes junk is kept.
        readable in any::<bool>(),
    ) {
        let parts: Vec<String> = entries
            .iter()
            .filter(|(e, _, _)| !readable || (!e.is_empty() && e != "unknown"))
            .map(|(e, l, r)| format!("{l}{e}{r}"))
            .collect();
        prop_assume!(!parts.is_empty());
        let v = format!("{}{end}", parts.join(","));
        prop_assert_eq!(xff(&v), xff_model(&v), "{:?}", v);
    }
}

#[test]
fn forwarded_steps_suffice() {
    // The longest walk: the ring full of short trusted entries, each read after the scan.
    for kind in [FWD_X_FORWARDED_FOR, FWD_FORWARDED] {
        let entry = if kind == FWD_FORWARDED {
            "for=10.0.0.1"
        } else {
            "10.0.0.1"
        };
        let mut v = String::new();
        while v.len() < 3 * CAP {
            v.push_str(entry);
            v.push(',');
        }
        v.push_str(entry);
        let (buf, len) = ring(v.as_bytes());
        let mut t = FwdText::new(kind);
        let mut steps = 0;
        while !t.step(&buf, len, &trusted) {
            steps += 1;
            assert!(steps < FWD_STEPS_MAX, "{kind}");
        }
        assert_eq!(t.result(), None, "more trusted entries than are read");
    }
}

#[test]
fn forwarded_for() {
    assert_eq!(
        forwarded("for=192.0.2.60;proto=http;by=203.0.113.43"),
        some("192.0.2.60")
    );
    assert_eq!(forwarded("proto=http;For=192.0.2.60"), some("192.0.2.60"));
    assert_eq!(forwarded("FOR=192.0.2.60\r"), some("192.0.2.60"));
    assert_eq!(forwarded("for=\"192.0.2.1\""), some("192.0.2.1"));
    assert_eq!(forwarded("for=\"192.0.2.1:4711\""), some("192.0.2.1"));
    assert_eq!(forwarded("for=\"[2001:db8::1]\""), some("2001:db8::1"));
    assert_eq!(
        forwarded("for=\"[2001:db8:cafe::17]:4711\""),
        some("2001:db8:cafe::17")
    );
    assert_eq!(
        forwarded("for=\"[2001:db8::1]:_p.o-r_t\""),
        some("2001:db8::1")
    );
    assert_eq!(forwarded("for=192.0.2.1 ; proto=https"), some("192.0.2.1"));
}

#[test]
fn forwarded_right_to_left() {
    assert_eq!(
        forwarded("for=198.51.100.7, for=10.0.0.2;proto=https"),
        some("198.51.100.7")
    );
    assert_eq!(
        forwarded("for=6.6.6.6, for=\"[2001:db8::9]\", for=10.0.0.3, for=\"[fd00::2]:80\""),
        some("2001:db8::9")
    );
    assert_eq!(
        forwarded("for=junk, for=198.51.100.7;by=10.0.0.1"),
        some("198.51.100.7")
    );
    assert_eq!(forwarded("for=10.0.0.5, for=10.0.0.2"), some("10.0.0.5"));
}

#[test]
fn forwarded_unreadable() {
    assert_eq!(forwarded("for=unknown"), None);
    assert_eq!(forwarded("for=_hidden"), None);
    assert_eq!(forwarded("for=\"_hidden\""), None);
    assert_eq!(forwarded("for=\"[_hidden]\""), None);
    assert_eq!(forwarded("for=198.51.100.7, for=unknown"), None);
    assert_eq!(forwarded("proto=https;by=10.0.0.1"), None, "no for=");
    assert_eq!(
        forwarded("for=198.51.100.7;for=198.51.100.8"),
        None,
        "two for="
    );
    assert_eq!(forwarded("for=2001:db8::1"), None, "IPv6 without brackets");
    assert_eq!(forwarded("for=\"[2001:db8::1]"), None);
    assert_eq!(forwarded("for=\"192.0.2.1"), None);
    assert_eq!(forwarded("for=\"192.0.2.1:\""), None);
    assert_eq!(forwarded("for=\"192.0.2.1:123456\""), None);
    assert_eq!(forwarded("for=\"192.0.2.1:80x\""), None);
    assert_eq!(forwarded("for=\"[2001:db8::1]x\""), None);
    assert_eq!(forwarded("for="), None);
    assert_eq!(forwarded("for=\"\""), None);
    assert_eq!(forwarded("fore=192.0.2.1"), None);
    assert_eq!(forwarded(""), None);
}

#[test]
fn forwarded_truncated() {
    let mut v = String::new();
    while v.len() < 1000 {
        v.push_str("for=198.51.100.77;proto=https, ");
    }
    v.push_str("for=\"[2001:db8::5]:443\";proto=https, for=10.9.8.7");
    assert_eq!(forwarded(&v), some("2001:db8::5"));
    let v = format!(
        "{}, for=10.0.0.2;proto=https, for=10.0.0.3",
        "x".repeat(500)
    );
    assert_eq!(forwarded(&v), None);
}

#[test]
fn x_real_ip() {
    let real = |v: &str| fwd(FWD_X_REAL_IP, v);
    assert_eq!(real("203.0.113.9"), some("203.0.113.9"));
    assert_eq!(real("203.0.113.9 \r"), some("203.0.113.9"));
    assert_eq!(real("2001:db8::1\r"), some("2001:db8::1"));
    // One address, trusted or not.
    assert_eq!(real("10.0.0.2"), some("10.0.0.2"));
    assert_eq!(real("203.0.113.9, 10.0.0.2"), None);
    assert_eq!(real("unknown"), None);
    assert_eq!(real(""), None);
    assert_eq!(
        real(&format!("{}203.0.113.9", " ".repeat(CAP))),
        None,
        "truncated"
    );
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

fn start(bytes: &[u8]) -> ProxyStart {
    let (buf, _) = lin(bytes);
    proxy_start(&buf, bytes.len().min(CAP))
}

#[test]
fn proxy_start_from_the_first_bytes() {
    assert_eq!(start(b""), ProxyStart::NeedMore);
    assert_eq!(start(b"P"), ProxyStart::NeedMore);
    assert_eq!(start(b"PROXY"), ProxyStart::NeedMore);
    assert_eq!(start(b"PROXY "), ProxyStart::V1);
    assert_eq!(start(b"PROXY TCP4 1.2.3.4"), ProxyStart::V1);
    assert_eq!(start(b"PROXYZ"), ProxyStart::NotProxy);
    assert_eq!(start(b"POST / HTTP/1.1\r\n"), ProxyStart::NotProxy);
    assert_eq!(start(b"GET / HTTP/1.1\r\n"), ProxyStart::NotProxy);
    assert_eq!(start(b"\x16\x03\x01"), ProxyStart::NotProxy);
    assert_eq!(start(&PROXY_V2_SIG[..1]), ProxyStart::NeedMore);
    assert_eq!(start(&PROXY_V2_SIG[..11]), ProxyStart::NeedMore);
    assert_eq!(start(&PROXY_V2_SIG), ProxyStart::V2);
    assert_eq!(
        start(&[&PROXY_V2_SIG[..], &[0x21, 0x11, 0, 12]].concat()),
        ProxyStart::V2
    );
    // Empty lines before an HTTP request look like the signature's start until a request byte.
    assert_eq!(start(b"\r\n\r\n"), ProxyStart::NeedMore);
    assert_eq!(start(b"\r\n\r\nGET / HTTP/1.1"), ProxyStart::NotProxy);
    let mut wrong = PROXY_V2_SIG;
    wrong[11] = b'X';
    assert_eq!(start(&wrong), ProxyStart::NotProxy);
}

fn v1(line: &str) -> ProxySource {
    let (buf, _) = lin(line.as_bytes());
    let got = proxy_v1_source(&buf, line.len());
    // ppp agrees whenever an address comes out.
    if let ProxySource::Addr(a) = got {
        assert_eq!(Some(a), ppp_v1(line.as_bytes()), "{line:?}");
    }
    got
}

/// ppp's source address of a v1 line (None: ppp fails, or no address).
fn ppp_v1(line: &[u8]) -> Option<AddrKey> {
    let h = ppp::v1::Header::try_from(line).ok()?;
    if h.header.len() != line.len() {
        return None;
    }
    match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(v4_mapped(a.source_address.octets())),
        ppp::v1::Addresses::Tcp6(a) => Some(a.source_address.octets()),
        ppp::v1::Addresses::Unknown => None,
    }
}

#[test]
fn proxy_v1_sources() {
    let a = ProxySource::Addr;
    assert_eq!(
        v1("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"),
        a(ip("192.0.2.1"))
    );
    assert_eq!(
        v1("PROXY TCP4 192.0.2.1 198.51.100.2 0 65535\r\n"),
        a(ip("192.0.2.1"))
    );
    assert_eq!(
        v1("PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n"),
        a(ip("2001:db8::1"))
    );
    assert_eq!(
        v1("PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"),
        a(ip("192.0.2.1"))
    );
    let g = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let longest = format!("PROXY TCP6 {g} {g} 65535 65535\r\n");
    assert!(longest.len() <= PROXY_V1_MAX);
    assert_eq!(v1(&longest), a(ip(g)));
    assert_eq!(v1("PROXY UNKNOWN\r\n"), ProxySource::Unknown);
    assert_eq!(
        v1(&format!("PROXY UNKNOWN {g} {g} 65535 65535\r\n")),
        ProxySource::Unknown
    );
}

#[test]
fn proxy_v1_malformed() {
    let bad = [
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 \r\n",
        "PROXY TCP4 192.0.2.1  198.51.100.2 56324 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 1\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 056324 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 +80 443\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 4a3\r\n",
        "PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n",
        "PROXY TCP4 192.0.2.1 2001:db8::1 56324 443\r\n",
        "PROXY TCP4 ::ffff:192.0.2.1 198.51.100.2 56324 443\r\n",
        "PROXY TCP6 192.0.2.1 2001:db8::2 56324 443\r\n",
        "PROXY TCP6 2001:db8::1 192.0.2.1 56324 443\r\n",
        "PROXY TCP4 192.0.2.256 198.51.100.2 56324 443\r\n",
        "PROXY tcp4 192.0.2.1 198.51.100.2 56324 443\r\n",
        "PROXY TCP5 192.0.2.1 198.51.100.2 56324 443\r\n",
        "PROXY  TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        "PROXY TCP4\r\n",
        "PROXY \r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY UNKNOWN a\rb\r\n",
        "proxy TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        "\r\n",
    ];
    for line in bad {
        assert_eq!(v1(line), ProxySource::Bad, "{line:?}");
    }
    let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(PROXY_V1_MAX - 16 + 1));
    assert_eq!(long.len(), PROXY_V1_MAX + 1);
    assert_eq!(v1(&long), ProxySource::Bad);
}

fn v1_line(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> String {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {src} {dst} {sport} {dport}\r\n")
}

fn same_family() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        (any::<Ipv4Addr>(), any::<Ipv4Addr>()).prop_map(|(a, b)| (a.into(), b.into())),
        (ipv6_with_zeros(), ipv6_with_zeros()).prop_map(|(a, b)| (a.into(), b.into())),
    ]
}

proptest! {
    #[test]
    fn proxy_v1_valid_lines(addrs in same_family(), sport in any::<u16>(), dport in any::<u16>()) {
        let line = v1_line(addrs.0, addrs.1, sport, dport);
        prop_assert_eq!(ppp_v1(line.as_bytes()), Some(key_of(addrs.0)));
        prop_assert_eq!(v1(&line), ProxySource::Addr(key_of(addrs.0)));
    }

    #[test]
    fn proxy_v1_mutated_lines(
        addrs in same_family(),
        sport in any::<u16>(),
        dport in any::<u16>(),
        at in any::<usize>(),
        op in any::<u8>(),
        c in proptest::sample::select(b"0123456789abcdef:. \r\nTCP46UNKOWX+-".to_vec()),
    ) {
        let line = mutated(v1_line(addrs.0, addrs.1, sport, dport), at, op, c);
        prop_assume!(line.len() <= CAP);
        // `v1` checks that an address comes out only where ppp finds the same.
        v1(&line);
    }

    #[test]
    fn proxy_v1_random_bytes(rest in proptest::collection::vec(any::<u8>(), 0..110)) {
        let line = [b"PROXY ".as_slice(), &rest].concat();
        prop_assume!(line.len() <= CAP);
        let (buf, _) = lin(&line);
        if let ProxySource::Addr(a) = proxy_v1_source(&buf, line.len()) {
            prop_assert_eq!(Some(a), ppp_v1(&line));
        }
    }
}

fn v2(header: &[u8]) -> ProxySource {
    let (buf, _) = lin(header);
    let n = header.len().min(CAP);
    let got = proxy_v2_source(&buf, n);
    if n >= PROXY_V2_FIXED {
        assert!(proxy_v2_len(&buf) >= PROXY_V2_FIXED);
    }
    // ppp agrees whenever an address comes out.
    if let ProxySource::Addr(a) = got {
        assert_eq!(Some(a), ppp_v2(header), "{header:x?}");
    }
    got
}

/// ppp's source address of a v2 PROXY header over a stream (None: ppp fails, or no address).
fn ppp_v2(header: &[u8]) -> Option<AddrKey> {
    use ppp::v2::{Addresses, Command, Header, Protocol};
    let h = Header::try_from(header).ok()?;
    if h.command != Command::Proxy || h.protocol != Protocol::Stream {
        return None;
    }
    match h.addresses {
        Addresses::IPv4(a) => Some(v4_mapped(a.source_address.octets())),
        Addresses::IPv6(a) => Some(a.source_address.octets()),
        _ => None,
    }
}

fn v2_build(
    command: ppp::v2::Command,
    protocol: ppp::v2::Protocol,
    addrs: ppp::v2::Addresses,
    tlvs: &[(u8, Vec<u8>)],
) -> Vec<u8> {
    let mut b = ppp::v2::Builder::with_addresses(ppp::v2::Version::Two | command, protocol, addrs);
    for (t, v) in tlvs {
        b = b.write_tlv(*t, v).unwrap();
    }
    b.build().unwrap()
}

fn v2_addresses(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> ppp::v2::Addresses {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ppp::v2::IPv4::new(s, d, sport, dport).into(),
        (IpAddr::V6(s), IpAddr::V6(d)) => ppp::v2::IPv6::new(s, d, sport, dport).into(),
        _ => unreachable!(),
    }
}

#[test]
fn proxy_v2_sources() {
    use ppp::v2::{Addresses, Command, Protocol, Unix};
    let v4 = v2_addresses(
        some("192.0.2.1").unwrap(),
        some("198.51.100.2").unwrap(),
        56324,
        443,
    );
    let v6 = v2_addresses(
        some("2001:db8::1").unwrap(),
        some("2001:db8::2").unwrap(),
        1,
        2,
    );
    let h = v2_build(Command::Proxy, Protocol::Stream, v4, &[]);
    assert_eq!(h.len(), 28);
    assert_eq!(proxy_v2_len(&lin(&h).0), 28);
    assert_eq!(v2(&h), ProxySource::Addr(ip("192.0.2.1")));
    let h = v2_build(Command::Proxy, Protocol::Stream, v6, &[]);
    assert_eq!(v2(&h), ProxySource::Addr(ip("2001:db8::1")));
    // TLVs after the addresses, the header longer than the capture.
    let tlvs = [
        (0x01, b"h2".to_vec()),
        (0x02, vec![b'a'; 200]),
        (0x04, vec![0; 3]),
    ];
    let h = v2_build(Command::Proxy, Protocol::Stream, v6, &tlvs);
    assert!(h.len() > CAP);
    assert_eq!(proxy_v2_len(&lin(&h).0), h.len());
    assert_eq!(v2(&h), ProxySource::Addr(ip("2001:db8::1")));
    // The source stays the peer's.
    assert_eq!(
        v2(&v2_build(Command::Local, Protocol::Stream, v4, &[])),
        ProxySource::Local
    );
    assert_eq!(
        v2(&v2_build(
            Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
            &[]
        )),
        ProxySource::Local
    );
    assert_eq!(
        v2(&v2_build(
            Command::Proxy,
            Protocol::Unspecified,
            Addresses::Unspecified,
            &[]
        )),
        ProxySource::Unknown
    );
    assert_eq!(
        v2(&v2_build(Command::Proxy, Protocol::Datagram, v4, &[])),
        ProxySource::Unknown
    );
    let unix = Unix::new([1; 108], [2; 108]);
    assert_eq!(
        v2(&v2_build(
            Command::Proxy,
            Protocol::Stream,
            unix.into(),
            &[]
        )),
        ProxySource::Unknown
    );
}

#[test]
fn proxy_v2_malformed() {
    let good = [
        &PROXY_V2_SIG[..],
        &[0x21, 0x11, 0, 12, 192, 0, 2, 1, 10, 0, 0, 1, 0, 80, 1, 187],
    ]
    .concat();
    assert_eq!(v2(&good), ProxySource::Addr(ip("192.0.2.1")));
    let with = |at: usize, b: u8| {
        let mut h = good.clone();
        h[at] = b;
        h
    };
    assert_eq!(v2(&with(12, 0x11)), ProxySource::Bad, "version 1");
    assert_eq!(v2(&with(12, 0x31)), ProxySource::Bad, "version 3");
    assert_eq!(v2(&with(12, 0x22)), ProxySource::Bad, "command 2");
    assert_eq!(v2(&with(13, 0x41)), ProxySource::Bad, "family 4");
    assert_eq!(v2(&with(13, 0x13)), ProxySource::Bad, "protocol 3");
    assert_eq!(v2(&with(15, 11)), ProxySource::Bad, "too short for AF_INET");
    assert_eq!(
        v2(&with(13, 0x21)),
        ProxySource::Bad,
        "too short for AF_INET6"
    );
    assert_eq!(
        v2(&with(13, 0x31)),
        ProxySource::Bad,
        "too short for AF_UNIX"
    );
    assert_eq!(v2(&with(3, 0)), ProxySource::Bad, "signature");
    assert_eq!(v2(&good[..15]), ProxySource::Bad, "no length");
    assert_eq!(v2(&good[..20]), ProxySource::Bad, "addresses cut");
    // LOCAL ignores the family and its block.
    let mut local = with(13, 0x41);
    local[12] = 0x20;
    assert_eq!(v2(&local), ProxySource::Local);
}

fn tlv() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..60))
}

proptest! {
    #[test]
    fn proxy_v2_valid_headers(
        addrs in same_family(),
        sport in any::<u16>(),
        dport in any::<u16>(),
        tlvs in proptest::collection::vec(tlv(), 0..4),
        local in any::<bool>(),
    ) {
        use ppp::v2::{Command, Protocol};
        let command = if local { Command::Local } else { Command::Proxy };
        let h = v2_build(command, Protocol::Stream, v2_addresses(addrs.0, addrs.1, sport, dport), &tlvs);
        let (buf, _) = lin(&h);
        prop_assert_eq!(proxy_v2_len(&buf), h.len());
        let want = if local { ProxySource::Local } else { ProxySource::Addr(key_of(addrs.0)) };
        prop_assert_eq!(v2(&h), want);
    }

    #[test]
    fn proxy_v2_random_bytes(
        fixed in any::<[u8; 4]>(),
        rest in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        // `v2` checks that an address comes out only where ppp finds the same.
        let h = [&PROXY_V2_SIG[..], &fixed, &rest].concat();
        if let ProxySource::Local = v2(&h) {
            prop_assert_eq!(fixed[0], 0x20);
        }
    }

    #[test]
    fn proxy_v2_plausible_bytes(
        fam in proptest::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31, 0x10, 0x20]),
        cmd in proptest::sample::select(vec![0x20u8, 0x21]),
        len in 0u16..300,
        rest in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let h = [&PROXY_V2_SIG[..], &[cmd, fam], &len.to_be_bytes(), &rest].concat();
        let got = v2(&h);
        let ppp_ok = ppp::v2::Header::try_from(&h[..]).is_ok();
        if ppp_ok && cmd == 0x21 && (fam == 0x11 || fam == 0x21) {
            prop_assert!(matches!(got, ProxySource::Addr(_)), "{:?}", got);
        }
    }
}

proptest! {
    /// The kernel's byte-at-a-time digest equals the whole one (and so `siphasher`'s).
    #[test]
    fn key_hash_equals_siphash(
        k in any::<[u64; 2]>(),
        data in proptest::collection::vec(any::<u8>(), 0..=CAP),
    ) {
        let mut h = KeyHash::new(k);
        let mut h2 = h;
        for b in &data {
            h.take(*b);
            h2.take(*b);
        }
        let mut buf = [0u8; CAP];
        buf[..data.len()].copy_from_slice(&data);
        prop_assert_eq!(h.finish(), siphash13(k, &buf, data.len()));
        let mut reference = SipHasher13::new_with_keys(k[0], k[1]);
        std::hash::Hasher::write(&mut reference, &data);
        prop_assert_eq!(h2.finish(), std::hash::Hasher::finish(&reference));
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel's streaming reader of forwarded headers, against the ring reader.

fn fwd_stream(kind: u8, value: &str) -> Option<IpAddr> {
    forwarded_stream(kind, value.as_bytes(), &trusted).map(ip_of)
}

fn forwarded_element() -> impl Strategy<Value = String> {
    let node = prop_oneof![
        any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| format!("10.{a}.{b}.1")),
        any::<Ipv4Addr>().prop_map(|a| format!("\"{a}:4711\"")),
        ipv6_with_zeros().prop_map(|a| format!("\"[{a}]\"")),
        any::<u16>().prop_map(|g| format!("\"[fd00::{g:x}]:_p-1\"")),
        Just("unknown".to_string()),
        Just("_hidden".to_string()),
        Just("\"[::1\"".to_string()),
        Just(String::new()),
    ];
    let pair = prop_oneof![
        (prop_oneof![Just("for"), Just("For"), Just("FOR")], node)
            .prop_map(|(k, v)| format!("{k}={v}")),
        Just("proto=https".to_string()),
        Just("by=10.0.0.1".to_string()),
        Just("host=\"a;b\"".to_string()),
        Just("for =1.2.3.4".to_string()),
        Just("for= 1.2.3.4".to_string()),
    ];
    proptest::collection::vec((pair, "[ \t]{0,1}"), 1..4).prop_map(|ps| {
        ps.iter()
            .map(|(p, b)| format!("{b}{p}{b}"))
            .collect::<Vec<_>>()
            .join(";")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// X-Forwarded-For values of at most CAP bytes: the streaming reader agrees with the ring
    /// reader (and so with the model above).
    #[test]
    fn xff_stream_agrees_with_the_ring(
        entries in proptest::collection::vec((xff_entry(), "[ \t]{0,2}", "[ \t]{0,2}"), 1..14),
        end in "[ \t]{0,2}\r?",
    ) {
        let parts: Vec<String> = entries.iter().map(|(e, l, r)| format!("{l}{e}{r}")).collect();
        let v = format!("{}{end}", parts.join(","));
        prop_assume!(v.len() <= CAP);
        for kind in [FWD_X_FORWARDED_FOR, FWD_X_REAL_IP] {
            prop_assert_eq!(fwd_stream(kind, &v), fwd(kind, &v), "{} {:?}", kind, v);
        }
    }

    /// Forwarded values of at most CAP bytes, likewise.
    #[test]
    fn forwarded_stream_agrees_with_the_ring(
        elements in proptest::collection::vec((forwarded_element(), "[ \t]{0,1}"), 1..6),
        end in "[ \t]{0,2}\r?",
    ) {
        let v = format!(
            "{}{end}",
            elements.iter().map(|(e, b)| format!("{b}{e}")).collect::<Vec<_>>().join(",")
        );
        prop_assume!(v.len() <= CAP);
        prop_assert_eq!(fwd_stream(FWD_FORWARDED, &v), fwd(FWD_FORWARDED, &v), "{:?}", v);
    }

    /// Any bytes of the headers' alphabet: the two readers agree on every kind.
    #[test]
    fn stream_and_ring_agree_on_any_bytes(
        v in proptest::collection::vec(prop_oneof![
            Just(b','), Just(b';'), Just(b' '), Just(b'"'), Just(b'['), Just(b']'), Just(b':'),
            Just(b'.'), Just(b'='), Just(b'f'), Just(b'o'), Just(b'r'), Just(b'1'), Just(b'0'),
            Just(b'd'), Just(b'_'), Just(b'\r'), Just(b'\t'),
        ], 0..=CAP),
    ) {
        let s = String::from_utf8(v).unwrap_or_default();
        for kind in [FWD_X_FORWARDED_FOR, FWD_FORWARDED, FWD_X_REAL_IP] {
            prop_assert_eq!(fwd_stream(kind, &s), fwd(kind, &s), "{} {:?}", kind, s);
        }
    }
}

#[test]
fn forwarded_stream_reads_several_lines_as_one_list() {
    // HAProxy's `option forwardfor` adds its line after the client's forged one.
    let mut f = FwdStream::new(FWD_X_FORWARDED_FOR);
    for line in ["6.6.6.6", "198.51.100.7, 10.0.0.2"] {
        for &b in line.as_bytes() {
            f.push(b, &trusted);
        }
        f.line_end(&trusted);
    }
    assert_eq!(f.result().map(ip_of), some("198.51.100.7"));
    // Longer than CAP: read whole (the ring would have lost the left).
    let long = format!("{}, 198.51.100.8, 10.0.0.3", "10.1.1.1, ".repeat(20));
    assert!(long.len() > CAP);
    assert_eq!(fwd_stream(FWD_X_FORWARDED_FOR, &long), some("198.51.100.8"));
}

/// The run path takes a key's bytes, and the blanks before a plain key, and only those (without
/// this, the property below would hold for a `take_run` that never takes).
#[test]
fn key_text_takes_runs_of_key_bytes() {
    let w = |b: &[u8; 8]| u64::from_le_bytes(*b);
    let mut t = KeyText::new(KEY_PLAIN);
    let mut h = KeyHash::new([1, 2]);
    assert_eq!(
        t.take_run(w(b" \tabc\r\nx"), 8, &mut h),
        5,
        "blanks, then the key"
    );
    assert_eq!(t.take_run(w(b"abcd-._~"), 8, &mut h), 8);
    assert_eq!(
        t.take_run(w(b"abcd-._~"), 3, &mut h),
        3,
        "no further than the window"
    );
    assert_eq!(t.take_run(w(b"abc def\r"), 8, &mut h), 3);
    assert_eq!(t.take_run(w(b"abcdefg\x7f"), 8, &mut h), 7);
    assert_eq!(
        t.take_run(w(b" abcdefg"), 8, &mut h),
        0,
        "a blank after the key"
    );
    let mut t = KeyText::new(KEY_PLAIN);
    assert_eq!(
        t.take_run(w(b"        "), 8, &mut h),
        0,
        "blanks alone go byte by byte"
    );
    assert_eq!(t.take_run(w(b"  \x01abcde"), 8, &mut h), 0);
    let mut t = KeyText::new(KEY_AUTHORIZATION);
    assert_eq!(
        t.take_run(w(b"Bearer t"), 8, &mut h),
        0,
        "not in the scheme"
    );
    t.push(b'B', &mut h);
    assert_eq!(
        t.take_run(w(b"earer to"), 8, &mut h),
        0,
        "not in the scheme"
    );
}

proptest! {
    /// Words at any alignment digest as their bytes do.
    #[test]
    fn key_hash_words_equal_bytes(
        k in any::<[u64; 2]>(),
        head in proptest::collection::vec(any::<u8>(), 0..8),
        words in proptest::collection::vec((any::<u64>(), 1usize..=8), 0..8),
    ) {
        let (mut a, mut b) = (KeyHash::new(k), KeyHash::new(k));
        for &x in &head {
            a.take(x);
            b.take(x);
        }
        for &(w, k) in &words {
            a.take_bytes(w, k);
            for &x in &w.to_le_bytes()[..k] {
                b.take(x);
            }
        }
        prop_assert_eq!(a.finish(), b.finish());
    }

    /// A run taken at once reads as its bytes pushed one by one; and the byte after it (when
    /// the word has one) is one `push` would not take as a key byte.
    #[test]
    fn key_text_runs_equal_bytes(
        kind in prop_oneof![Just(KEY_PLAIN), Just(KEY_AUTHORIZATION)],
        lead in prop_oneof![Just(""), Just("k"), Just("Bearer t"), Just("Basic d"), Just(" "), Just("k "), Just("\t")],
        bytes in proptest::collection::vec(prop_oneof![
            Just(b' '), Just(b'\t'), Just(b'\r'), Just(0x7f), Just(0x80), Just(b'a'), Just(b'~'), Just(b'!'), any::<u8>()
        ], 8),
        avail in 1usize..=8,
    ) {
        let w = u64::from_le_bytes(bytes.as_slice().try_into().unwrap());
        let (mut t1, mut t2) = (KeyText::new(kind), KeyText::new(kind));
        let (mut h1, mut h2) = (KeyHash::new([1, 2]), KeyHash::new([1, 2]));
        for &b in lead.as_bytes() {
            t1.push(b, &mut h1);
            t2.push(b, &mut h2);
        }
        let k = t1.take_run(w, avail, &mut h1);
        prop_assert!(k <= avail);
        for &b in &bytes[..k] {
            t2.push(b, &mut h2);
        }
        prop_assert_eq!(t1, t2);
        prop_assert_eq!(t1.finish(t1.seen), t2.finish(t2.seen));
        prop_assert_eq!(h1.finish(), h2.finish());
        if k > 0 && k < avail {
            let before = t2.n;
            t2.push(bytes[k], &mut h2);
            prop_assert!(t2.n == before, "the run stopped at a key byte");
        }
    }
}
