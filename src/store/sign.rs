//! ed25519 signing keys and kiln image signatures.
//!
//! Key files are PEM: the secret key is PKCS#8 (`-----BEGIN PRIVATE KEY-----`, RFC 8410) written
//! with mode 0600, the public key is SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`) in
//! `FILE.pub`. Both are what `openssl pkey` reads and writes for ed25519.
//!
//! A signature signs the exact bytes of a small JSON payload ([`SignaturePayload`]) naming the
//! manifest digest; the verifier checks the signature over those bytes with a trusted key, then
//! that the payload names the manifest it actually fetched.

use crate::digest::Digest256;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use ed25519_dalek::{Signer, pkcs8::spki::der::pem::LineEnding};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// `type` of a kiln signature payload.
pub const PAYLOAD_TYPE: &str = "dev.kiln.signature.v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {what} key file {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ed25519 {kind} key in PEM ({reason}); make one with `kiln keygen -o FILE`"
    )]
    Format {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "{path} already exists; remove it first or pick another name (keys are never overwritten)"
    )]
    Exists { path: PathBuf },
}

/// What a kiln signature signs (serialized with this field order, compact JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignaturePayload {
    /// Always [`PAYLOAD_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// `sha256:<hex>` of the image manifest bytes.
    pub manifest_digest: Digest256,
    /// Repository the image was published to (its path in the registry, or the layout's
    /// directory). A pull accepts the signature only from that repository, or from one it was
    /// told to accept signatures of (`--signed-for`).
    pub repository: String,
    /// Tags it was published under (informational).
    pub tags: Vec<String>,
    /// RFC 3339 time from SOURCE_DATE_EPOCH (informational).
    pub created: String,
}

/// Key id: `sha256:<hex>` of the 32 raw public key bytes.
pub fn key_id(key: &VerifyingKey) -> Digest256 {
    Digest256::of(key.as_bytes())
}

/// The public key file next to a secret key file: `FILE.pub`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Make a new signing key from the kernel's random source; write `path` (0600, PKCS#8 PEM) and
/// `path.pub` (SPKI PEM). Refuses to overwrite either file.
pub fn keygen(path: &Path) -> Result<VerifyingKey, KeyError> {
    let pub_path = public_key_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            return Err(KeyError::Exists { path: p.into() });
        }
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|source| KeyError::Io {
            what: "read random bytes for",
            path: path.into(),
            source,
        })?;
    let key = SigningKey::from_bytes(&seed);
    let fmt_err = |kind, e: String| KeyError::Format {
        path: path.into(),
        kind,
        reason: e,
    };
    let secret_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| fmt_err("secret", e.to_string()))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| fmt_err("public", e.to_string()))?;
    write_new(path, secret_pem.as_bytes(), 0o600)?;
    write_new(&pub_path, public_pem.as_bytes(), 0o644)?;
    Ok(key.verifying_key())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        what: "write",
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        what: "read",
        path: path.into(),
        source,
    })
}

/// Load a secret key written by [`keygen`] (or `openssl genpkey -algorithm ed25519`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_text(path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
        path: path.into(),
        kind: "secret",
        reason: e.to_string(),
    })
}

/// Load a public key (`FILE.pub`). A secret key file is accepted too (its public half is used).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_text(path)?;
    if text.contains("PRIVATE KEY") {
        return load_signing_key(path).map(|k| k.verifying_key());
    }
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Format {
        path: path.into(),
        kind: "public",
        reason: e.to_string(),
    })
}

/// Sign payload bytes.
pub fn sign(key: &SigningKey, payload: &[u8]) -> Signature {
    key.sign(payload)
}

/// Strict ed25519 verification (rejects malleable and small-order forms).
pub fn verify(key: &VerifyingKey, payload: &[u8], signature: &Signature) -> bool {
    key.verify_strict(payload, signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_pem_pair_that_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let vk = keygen(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sk = load_signing_key(&path).unwrap();
        assert_eq!(sk.verifying_key(), vk);
        assert_eq!(load_verifying_key(&public_key_path(&path)).unwrap(), vk);
        assert_eq!(load_verifying_key(&path).unwrap(), vk);
        let sig = sign(&sk, b"payload");
        assert!(verify(&vk, b"payload", &sig));
        assert!(!verify(&vk, b"payloaD", &sig));
        assert!(matches!(keygen(&path), Err(KeyError::Exists { .. })));
        std::fs::write(dir.path().join("junk"), "hello").unwrap();
        assert!(matches!(
            load_verifying_key(&dir.path().join("junk")),
            Err(KeyError::Format { .. })
        ));
    }
}
