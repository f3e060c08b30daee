//! PLACEHOLDER: replaced by the `ident` branch (pure parsers of API keys, forwarded headers and
//! PROXY headers).

use crate::AddrKey;

pub const CAP: usize = 128;
pub const PROXY_V1_MAX: usize = 107;
pub const PROXY_V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

pub enum ProxySource {
    Local,
    Unknown,
    Addr(AddrKey),
    Bad,
}

#[inline(always)]
pub fn siphash24(_k: [u64; 2], _data: &[u8; CAP], _len: usize) -> u64 {
    0
}

#[inline(always)]
pub fn api_key(_kind: u8, _value: &[u8; CAP], _len: u32, _out: &mut [u8; CAP]) -> Option<usize> {
    None
}

#[inline(always)]
pub fn forwarded_addr(
    _kind: u8,
    _ring: &[u8; CAP],
    _len: u32,
    _trusted: &impl Fn(&AddrKey) -> bool,
) -> Option<AddrKey> {
    None
}

#[inline(always)]
pub fn proxy_v2_len(buf: &[u8; CAP]) -> usize {
    16 + ((buf[14] as usize) << 8 | buf[15] as usize)
}

#[inline(always)]
pub fn proxy_v1_source(_buf: &[u8; CAP], _n: usize) -> ProxySource {
    ProxySource::Unknown
}

#[inline(always)]
pub fn proxy_v2_source(_buf: &[u8; CAP], _n: usize) -> ProxySource {
    ProxySource::Unknown
}
