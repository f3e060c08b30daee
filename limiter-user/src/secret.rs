//! The API keys' secret: the SipHash-1-3 key under which API_KEYS holds digests of the keys, so
//! that no client can craft a key that lands on another org's digest.
//!
//! It is made once (16 random bytes) and kept in the state directory, readable by root alone, so
//! a restarted daemon finds the digests pinned in the kernel still valid. A missing, malformed or
//! exposed file is replaced by a new secret, and every digest is rewritten under it.

use std::{
    fmt,
    fs::{DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use siphasher::sip::SipHasher13;

/// The secret's file in the state directory.
pub const SECRET_FILE: &str = "api-key-secret";

/// 16 secret bytes as SipHash's two keys (little-endian halves). Its `Debug` shows nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeySecret {
    halves: [u64; 2],
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(..)")
    }
}

impl KeySecret {
    /// The secret of 16 bytes: `k0` and `k1` are their little-endian halves.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let (lo, hi) = bytes.split_at(8);
        let half = |b: &[u8]| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            u64::from_le_bytes(word)
        };
        KeySecret {
            halves: [half(lo), half(hi)],
        }
    }

    /// A new secret from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match n {
                n if n > 0 => filled += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(Self::from_bytes(bytes))
    }

    /// `[k0, k1]`, as `KernelConfig::key_secret` holds them.
    pub fn halves(&self) -> [u64; 2] {
        self.halves
    }

    /// The digest API_KEYS keys `key` by (the kernel computes the same over the request's key).
    pub fn digest(&self, key: &[u8]) -> u64 {
        SipHasher13::new_with_keys(self.halves[0], self.halves[1]).hash(key)
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.halves[0].to_le_bytes());
        out[8..].copy_from_slice(&self.halves[1].to_le_bytes());
        out
    }

    /// The file's text: 32 lowercase hex digits and a newline.
    fn to_text(self) -> String {
        let mut s: String = self.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }

    fn from_text(text: &str) -> Option<Self> {
        let hex = text.strip_suffix('\n').unwrap_or(text).as_bytes();
        if hex.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            bytes[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(Self::from_bytes(bytes))
    }
}

/// Where the secret of `state_dir` is kept.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(SECRET_FILE)
}

/// Reads the secret kept in `state_dir` (never writes). The error says why it cannot be used:
/// missing, unreadable, malformed, or readable by others than its owner, root.
pub fn read(state_dir: &Path) -> Result<KeySecret, String> {
    let p = path(state_dir);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{} does not exist", p.display()));
        }
        Err(e) => return Err(format!("{}: {e}", p.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", p.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:04o}: others may have read it",
            p.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 64), &mut text)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    KeySecret::from_text(&text)
        .ok_or_else(|| format!("{} is malformed (expected 32 hex digits)", p.display()))
}

/// Keeps `secret` in `state_dir` (created, mode 0700, when missing) as a file of mode 0600,
/// replaced atomically.
pub fn write(state_dir: &Path, secret: &KeySecret) -> std::io::Result<PathBuf> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let target = path(state_dir);
    let tmp = state_dir.join(format!(".{SECRET_FILE}.tmp"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(secret.to_text().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_digest_is_siphash_1_3_keyed_by_the_little_endian_halves() {
        // Another implementation's published SipHash-1-3 of "siphash" under the zero key.
        assert_eq!(
            KeySecret::from_bytes([0; 16]).digest(b"siphash"),
            0x8264_ceec_cb16_bcbe
        );
        let secret = KeySecret::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            secret.halves(),
            [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908]
        );
        assert_ne!(secret.digest(b"key-a"), secret.digest(b"key-b"));
    }

    /// The daemon's digest of a key is the one the kernel computes over a request's key
    /// (limiter-common's, which the eBPF side runs), at every length a key may have.
    #[test]
    fn the_digest_is_the_kernels() {
        use limiter_common::ident::{CAP, KeyHash, siphash13};
        let secret = KeySecret::from_bytes(std::array::from_fn(|i| (i * 37 + 5) as u8));
        let mut data = [0u8; CAP];
        for (i, b) in data.iter_mut().enumerate() {
            *b = b'!' + (i % 90) as u8;
        }
        for len in 0..=CAP {
            let mut streamed = KeyHash::new(secret.halves());
            for b in &data[..len] {
                streamed.take(*b);
            }
            let want = secret.digest(&data[..len]);
            assert_eq!(siphash13(secret.halves(), &data, len), want, "length {len}");
            assert_eq!(streamed.finish(), want, "length {len}");
        }
    }

    #[test]
    fn a_written_secret_reads_back_and_is_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(read(&state).unwrap_err().contains("does not exist"));
        let secret = KeySecret::generate().unwrap();
        let p = write(&state, &secret).unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&state).unwrap(), secret);
        assert_eq!(format!("{secret:?}"), "KeySecret(..)");
        // Another secret replaces it.
        let other = KeySecret::generate().unwrap();
        assert_ne!(other, secret);
        write(&state, &other).unwrap();
        assert_eq!(read(&state).unwrap(), other);
    }

    #[test]
    fn a_malformed_or_exposed_secret_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &KeySecret::generate().unwrap()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let why = read(dir.path()).unwrap_err();
        assert!(
            why.contains("mode 0644") && why.contains("others may have read it"),
            "{why}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "not hex at all, and not 32 digits\n").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("malformed"));
    }
}
