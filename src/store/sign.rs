//! Signing keys and image signatures in cosign's format.
//!
//! Keys are ECDSA P-256 (cosign's default) or Ed25519. Key files are PEM: the secret key is
//! PKCS#8 (`-----BEGIN PRIVATE KEY-----`; an OpenSSL `EC PRIVATE KEY` is read too) written with
//! mode 0600, the public key is SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`) in
//! `FILE.pub` — the file `cosign verify --key` and a containers-policy.json `sigstoreSigned`
//! entry take.
//!
//! A signature signs the exact bytes of a "simple signing" payload ([`SimpleSigning`]): the
//! manifest digest and the repository it was published to. ECDSA signatures are ASN.1 DER over
//! the payload's SHA-256 (RFC 6979 nonces, so the same key and payload give the same bytes);
//! Ed25519 signs the payload itself. How they are stored is in `store` (the `.sig` tag).

use crate::digest::Digest256;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// `critical.type` of a cosign signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {what} key file {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ECDSA P-256 or Ed25519 {kind} key in PEM ({reason}); make one with \
         `kiln keygen -o FILE`"
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

/// The kinds of keys kiln makes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA over NIST P-256 with SHA-256: cosign's default.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
        })
    }
}

/// A secret signing key.
#[derive(Clone)]
pub enum SigningKey {
    EcdsaP256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SigningKey({}, {})",
            self.key_type(),
            key_id(&self.verifying_key())
        )
    }
}

/// A public key that checks signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyingKey {
    EcdsaP256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl SigningKey {
    pub fn key_type(&self) -> KeyType {
        match self {
            SigningKey::EcdsaP256(_) => KeyType::EcdsaP256,
            SigningKey::Ed25519(_) => KeyType::Ed25519,
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        match self {
            SigningKey::EcdsaP256(k) => VerifyingKey::EcdsaP256(*k.verifying_key()),
            SigningKey::Ed25519(k) => VerifyingKey::Ed25519(k.verifying_key()),
        }
    }

    /// The signature of `payload`, as cosign stores it (before base64): DER for ECDSA, the 64
    /// bytes for Ed25519. Deterministic.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer as _;
        match self {
            SigningKey::EcdsaP256(k) => {
                let s: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(k, payload);
                s.to_der().as_bytes().to_vec()
            }
            SigningKey::Ed25519(k) => k.sign(payload).to_bytes().to_vec(),
        }
    }

    fn to_pkcs8_pem(&self) -> Result<String, String> {
        let pem = match self {
            SigningKey::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF),
            SigningKey::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map(|p| p.to_string()).map_err(|e| e.to_string())
    }
}

impl VerifyingKey {
    pub fn key_type(&self) -> KeyType {
        match self {
            VerifyingKey::EcdsaP256(_) => KeyType::EcdsaP256,
            VerifyingKey::Ed25519(_) => KeyType::Ed25519,
        }
    }

    /// Whether `signature` is this key's over `payload`. ECDSA signatures are taken in DER or
    /// as the fixed 64 bytes (both are what cosign accepts); Ed25519 is checked strictly
    /// (malleable and small-order forms are refused).
    pub fn verify(&self, payload: &[u8], signature: &[u8]) -> bool {
        match self {
            VerifyingKey::EcdsaP256(k) => {
                let sig = p256::ecdsa::Signature::from_der(signature)
                    .or_else(|_| p256::ecdsa::Signature::from_slice(signature));
                sig.is_ok_and(|s| p256::ecdsa::signature::Verifier::verify(k, payload, &s).is_ok())
            }
            VerifyingKey::Ed25519(k) => {
                let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
                    return false;
                };
                let s = ed25519_dalek::Signature::from_bytes(&bytes);
                k.verify_strict(payload, &s).is_ok()
            }
        }
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn to_der(&self) -> Vec<u8> {
        let der = match self {
            VerifyingKey::EcdsaP256(k) => k.to_public_key_der(),
            VerifyingKey::Ed25519(k) => k.to_public_key_der(),
        };
        // Encoding a valid key of a fixed algorithm cannot fail; an empty id would show it.
        der.map(|d| d.into_vec()).unwrap_or_default()
    }

    fn to_public_key_pem(&self) -> Result<String, String> {
        match self {
            VerifyingKey::EcdsaP256(k) => k.to_public_key_pem(LineEnding::LF),
            VerifyingKey::Ed25519(k) => k.to_public_key_pem(LineEnding::LF),
        }
        .map_err(|e| e.to_string())
    }
}

/// What a signature signs: cosign's "simple signing" payload. Serialized in this field order as
/// compact JSON, the layout cosign writes and containers/image reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimpleSigning {
    pub critical: Critical,
    /// Informational (`creator`, `timestamp`); nothing is decided on it.
    #[serde(default)]
    pub optional: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The part of the payload a verifier must understand: unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Critical {
    pub identity: Identity,
    pub image: SignedImage,
    /// Always [`PAYLOAD_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The repository the image was published to: `host[:port]/path` in a registry, the
    /// directory of an OCI layout.
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedImage {
    /// `sha256:<hex>` of the image manifest bytes.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: Digest256,
}

impl SimpleSigning {
    /// The payload for `manifest` published to `docker_reference`, made at `timestamp`
    /// (seconds since the epoch; SOURCE_DATE_EPOCH, so it is reproducible).
    pub fn new(docker_reference: String, manifest: Digest256, timestamp: u64) -> SimpleSigning {
        let mut optional = serde_json::Map::new();
        optional.insert(
            "creator".into(),
            format!("kiln {}", env!("CARGO_PKG_VERSION")).into(),
        );
        optional.insert("timestamp".into(), timestamp.into());
        SimpleSigning {
            critical: Critical {
                identity: Identity { docker_reference },
                image: SignedImage {
                    docker_manifest_digest: manifest,
                },
                kind: PAYLOAD_TYPE.into(),
            },
            optional: Some(optional),
        }
    }
}

/// Key id: `sha256:<hex>` of the public key's SubjectPublicKeyInfo DER.
pub fn key_id(key: &VerifyingKey) -> Digest256 {
    Digest256::of(&key.to_der())
}

/// The public key file next to a secret key file: `FILE.pub`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Make a new signing key of `kind` from the kernel's random source; write `path` (0600,
/// PKCS#8 PEM) and `path.pub` (SPKI PEM). Refuses to overwrite either file.
pub fn keygen(path: &Path, kind: KeyType) -> Result<VerifyingKey, KeyError> {
    let pub_path = public_key_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            return Err(KeyError::Exists { path: p.into() });
        }
    }
    let fmt_err = |kind, reason: String| KeyError::Format {
        path: path.into(),
        kind,
        reason,
    };
    let key = loop {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| KeyError::Io {
                what: "read random bytes for",
                path: path.into(),
                source,
            })?;
        match kind {
            KeyType::Ed25519 => {
                break SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed));
            }
            // A scalar of zero or past the group order (odds about 2^-32) is drawn again.
            KeyType::EcdsaP256 => {
                if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&seed) {
                    break SigningKey::EcdsaP256(k);
                }
            }
        }
    };
    let secret_pem = key.to_pkcs8_pem().map_err(|e| fmt_err("secret", e))?;
    let public = key.verifying_key();
    let public_pem = public
        .to_public_key_pem()
        .map_err(|e| fmt_err("public", e))?;
    write_new(path, secret_pem.as_bytes(), 0o600)?;
    write_new(&pub_path, public_pem.as_bytes(), 0o644)?;
    Ok(public)
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
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_string(&mut text))
        .map_err(|source| KeyError::Io {
            what: "read",
            path: path.into(),
            source,
        })?;
    Ok(text)
}

/// Parse a secret key: PKCS#8 Ed25519 or P-256, or SEC1 (`EC PRIVATE KEY`) P-256.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    if text.contains("ENCRYPTED") {
        return Err(
            "an encrypted key (such as cosign's own key files) cannot be read; give a \
                    PKCS#8 PEM key without a password"
                .into(),
        );
    }
    if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
        return Ok(SigningKey::Ed25519(k));
    }
    if text.contains("BEGIN EC PRIVATE KEY") {
        return p256::SecretKey::from_sec1_pem(text)
            .map(|k| SigningKey::EcdsaP256(k.into()))
            .map_err(|e| format!("SEC1 P-256: {e}"));
    }
    p256::ecdsa::SigningKey::from_pkcs8_pem(text)
        .map(SigningKey::EcdsaP256)
        .map_err(|e| e.to_string())
}

/// Parse a public key: SubjectPublicKeyInfo PEM of an Ed25519 or P-256 key.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(text) {
        return Ok(VerifyingKey::Ed25519(k));
    }
    p256::ecdsa::VerifyingKey::from_public_key_pem(text)
        .map(VerifyingKey::EcdsaP256)
        .map_err(|e| e.to_string())
}

/// Load a secret key written by [`keygen`] (or `openssl genpkey`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    parse_signing_key(&read_text(path)?).map_err(|reason| KeyError::Format {
        path: path.into(),
        kind: "secret",
        reason,
    })
}

/// Load a public key (`FILE.pub`). A secret key file is accepted too (its public half is used).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_text(path)?;
    if text.contains("PRIVATE KEY") {
        return load_signing_key(path).map(|k| k.verifying_key());
    }
    parse_verifying_key(&text).map_err(|reason| KeyError::Format {
        path: path.into(),
        kind: "public",
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_pem_pairs_that_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [KeyType::EcdsaP256, KeyType::Ed25519] {
            let path = dir.path().join(kind.to_string());
            let vk = keygen(&path, kind).unwrap();
            assert_eq!(vk.key_type(), kind);
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let sk = load_signing_key(&path).unwrap();
            assert_eq!(sk.verifying_key(), vk);
            assert_eq!(load_verifying_key(&public_key_path(&path)).unwrap(), vk);
            assert_eq!(load_verifying_key(&path).unwrap(), vk);
            let sig = sk.sign(b"payload");
            assert_eq!(sig, sk.sign(b"payload"), "signatures are deterministic");
            assert!(vk.verify(b"payload", &sig));
            assert!(!vk.verify(b"payloaD", &sig));
            let mut flipped = sig.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            assert!(!vk.verify(b"payload", &flipped));
            assert!(matches!(keygen(&path, kind), Err(KeyError::Exists { .. })));
        }
        let a = load_verifying_key(&dir.path().join("ed25519.pub")).unwrap();
        let b = load_signing_key(&dir.path().join("ecdsa-p256")).unwrap();
        assert!(!a.verify(b"payload", &b.sign(b"payload")));
        std::fs::write(dir.path().join("junk"), "hello").unwrap();
        assert!(matches!(
            load_verifying_key(&dir.path().join("junk")),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn payload_is_cosigns_layout() {
        let d = Digest256::of(b"m");
        let p = SimpleSigning::new("127.0.0.1:5000/app".into(), d.clone(), 7);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            format!(
                "{{\"critical\":{{\"identity\":{{\"docker-reference\":\"127.0.0.1:5000/app\"}},\
                 \"image\":{{\"docker-manifest-digest\":\"{d}\"}},\"type\":\"{PAYLOAD_TYPE}\"}},\
                 \"optional\":{{\"creator\":\"kiln {}\",\"timestamp\":7}}}}",
                env!("CARGO_PKG_VERSION")
            )
        );
        let extra = json.replace("\"type\"", "\"extra\":1,\"type\"");
        assert!(serde_json::from_str::<SimpleSigning>(&extra).is_err());
    }
}
