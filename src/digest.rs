//! Content digests: the `sha256:<hex>` [`Digest256`] that names blobs, layers and records, and
//! whole-file hashing ([`hash_file`]); the SHA-1 that SPDX requires of files ([`sha1_hex`]).

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// A `sha256:<hex>` content digest.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Digest256(String);

impl Digest256 {
    /// Parse `sha256:<64 hex>`.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Digest256(text.to_string()))
    }

    pub fn from_sha256(hash: &[u8]) -> Self {
        Digest256(format!("sha256:{}", hex::encode(hash)))
    }

    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(&Sha256::digest(bytes))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hex SHA-1 of a byte slice: only where a format demands one (SPDX files), never to name
/// content.
pub fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(sha1::Sha1::digest(bytes))
}

/// SHA256 and length of a whole file.
pub fn hash_file(file: &mut File) -> io::Result<(Digest256, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((Digest256::from_sha256(&hasher.finalize()), len))
}
