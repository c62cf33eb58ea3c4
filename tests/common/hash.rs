//! SHA-256 for tests: of files through coreutils' `sha256sum` (the check a user would run, and
//! an opinion independent of kiln's own hashing), of bytes in process.

use std::path::Path;
use std::process::Command;

/// Hex SHA-256 of the file at `path`, by `sha256sum`; panics with its stderr if it fails.
pub fn sha256(path: &Path) -> String {
    super::run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

/// [`sha256`] in the form kiln and OCI write digests: `sha256:<hex>`.
pub fn sha256_digest(path: &Path) -> String {
    format!("sha256:{}", sha256(path))
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
