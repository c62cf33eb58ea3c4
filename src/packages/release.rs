//! `InRelease`: the OpenPGP clearsigned file that anchors trust in a Debian suite. This module
//! checks its signature against a keyring (rpgp, pure Rust) and parses the fields of the signed
//! text only — never text outside the signature — into a [`Release`] with the SHA256 of every
//! index. Pure: bytes in, verdict out.

use super::index::parse_stanzas;
use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey};
use pgp::types::KeyDetails;
use std::collections::BTreeMap;

/// The Debian archive keyring shipped with kiln (a copy of Debian's
/// `/usr/share/keyrings/debian-archive-keyring.gpg`), so kiln works on any host.
pub const DEBIAN_ARCHIVE_KEYRING: &[u8] = include_bytes!("debian-archive-keyring.gpg");

/// Why a keyring or an `InRelease` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the keyring holds no usable OpenPGP public key ({0})")]
    Keyring(String),
    #[error("not an OpenPGP clearsigned message: {0}")]
    NotSigned(String),
    #[error("{0}")]
    BadSignature(String),
    #[error("malformed Release fields: {0}")]
    Malformed(String),
}

/// A set of trusted OpenPGP public keys (primary keys and their bound subkeys).
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<SignedPublicKey>,
}

impl Keyring {
    /// Parse a keyring: binary (`.gpg`) or ASCII-armored (`.asc`), one or more keys. Keys whose
    /// binding signatures do not verify are dropped.
    pub fn from_bytes(bytes: &[u8]) -> Result<Keyring, ReleaseError> {
        let parsed: Vec<pgp::errors::Result<SignedPublicKey>> = if bytes.starts_with(b"-----") {
            let (keys, _) = SignedPublicKey::from_armor_many(bytes)
                .map_err(|e| ReleaseError::Keyring(e.to_string()))?;
            keys.collect()
        } else {
            SignedPublicKey::from_bytes_many(bytes)
                .map_err(|e| ReleaseError::Keyring(e.to_string()))?
                .collect()
        };
        let mut keys = Vec::new();
        let mut last_error = String::from("empty keyring");
        for key in parsed {
            match key {
                Ok(mut key) => {
                    // The primary key is the trust anchor; a subkey counts only if the primary
                    // key's binding signature on it verifies. (User-ID certifications by other
                    // keys are not checked: they say nothing about the archive.)
                    let primary = key.primary_key.clone();
                    key.public_subkeys
                        .retain(|sub| match sub.verify_bindings(&primary) {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::debug!(
                                    "dropping an unbound subkey of {}: {e}",
                                    primary.fingerprint()
                                );
                                false
                            }
                        });
                    keys.push(key);
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        if keys.is_empty() {
            return Err(ReleaseError::Keyring(last_error));
        }
        Ok(Keyring { keys })
    }

    /// The keyring shipped with kiln.
    pub fn debian() -> Result<Keyring, ReleaseError> {
        Self::from_bytes(DEBIAN_ARCHIVE_KEYRING)
    }

    /// Fingerprints of the primary keys, upper-case hex.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| hex::encode_upper(k.fingerprint().as_bytes()))
            .collect()
    }
}

/// Verify a clearsigned `InRelease` and return the text its signatures cover (LF line endings).
///
/// Accepted when at least one signature verifies with a key of the keyring and no signature
/// issued by a keyring key fails (a failing one means the text was altered). Signatures by
/// unknown keys are ignored, as apt does.
pub fn verify_clearsigned(bytes: &[u8], keyring: &Keyring) -> Result<String, ReleaseError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ReleaseError::NotSigned(format!("not UTF-8 text ({e})")))?;
    let (msg, _) = CleartextSignedMessage::from_string(text)
        .map_err(|e| ReleaseError::NotSigned(e.to_string()))?;
    let signed = msg.signed_text();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for sig in msg.signatures() {
        let mut matched_key = false;
        let mut verified = false;
        for key in &keyring.keys {
            let primary = sig.verify(&key.primary_key, signed.as_bytes());
            if primary.is_ok() {
                verified = true;
            }
            matched_key |= issued_by(sig, &key.primary_key);
            for sub in &key.public_subkeys {
                matched_key |= issued_by(sig, &sub.key);
                if !verified && sig.verify(&sub.key, signed.as_bytes()).is_ok() {
                    verified = true;
                }
            }
            if verified {
                good.push(hex::encode_upper(key.fingerprint().as_bytes()));
                break;
            }
        }
        if !verified && matched_key {
            bad.push(
                sig.issuer_fingerprint()
                    .first()
                    .map(|f| hex::encode_upper(f.as_bytes()))
                    .or_else(|| sig.issuer_key_id().first().map(|k| format!("{k:?}")))
                    .unwrap_or_else(|| "?".into()),
            );
        }
    }
    if !bad.is_empty() {
        return Err(ReleaseError::BadSignature(format!(
            "BAD signature by trusted key {} (the signed text was altered or corrupted)",
            bad.join(", ")
        )));
    }
    if good.is_empty() {
        return Err(ReleaseError::BadSignature(format!(
            "none of its {} signature(s) is by a key in the keyring",
            msg.signatures().len()
        )));
    }
    tracing::debug!(keys = ?good, "InRelease signature verified");
    Ok(signed.replace("\r\n", "\n"))
}

fn issued_by(sig: &pgp::packet::Signature, key: &impl KeyDetails) -> bool {
    let fp = key.fingerprint();
    let id = key.legacy_key_id();
    sig.issuer_fingerprint().iter().any(|f| **f == fp)
        || sig.issuer_key_id().iter().any(|k| **k == id)
}

/// One file listed in a Release: size and SHA256 (lower-case hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseFile {
    pub size: u64,
    pub sha256: String,
}

/// The signed fields of a Release file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub origin: Option<String>,
    pub suite: Option<String>,
    pub codename: Option<String>,
    /// `Date`, seconds since the epoch.
    pub date: Option<i64>,
    /// `Valid-Until`, seconds since the epoch.
    pub valid_until: Option<i64>,
    pub components: Vec<String>,
    pub architectures: Vec<String>,
    pub acquire_by_hash: bool,
    /// Path relative to `dists/<suite>/` → size and hash.
    pub sha256: BTreeMap<String, ReleaseFile>,
}

impl Release {
    /// Parse the (already verified) text of a Release file.
    pub fn parse(text: &str) -> Result<Release, ReleaseError> {
        let stanzas = parse_stanzas(text).map_err(|e| ReleaseError::Malformed(e.to_string()))?;
        let stanza = stanzas
            .first()
            .ok_or_else(|| ReleaseError::Malformed("no fields".into()))?;
        let words = |f: &str| -> Vec<String> {
            stanza
                .get(f)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let date = |f: &str| -> Result<Option<i64>, ReleaseError> {
            match stanza.get(f) {
                None => Ok(None),
                Some(v) => parse_date(v)
                    .map(Some)
                    .ok_or_else(|| ReleaseError::Malformed(format!("{f}: unreadable date {v:?}"))),
            }
        };
        let mut sha256 = BTreeMap::new();
        for line in stanza.get("SHA256").unwrap_or("").lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [hash, size, path] = parts[..] else {
                return Err(ReleaseError::Malformed(format!(
                    "SHA256 line {line:?} is not `<hash> <size> <path>`"
                )));
            };
            let size = size
                .parse()
                .map_err(|_| ReleaseError::Malformed(format!("SHA256 line {line:?}: bad size")))?;
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReleaseError::Malformed(format!(
                    "SHA256 line {line:?}: bad hash"
                )));
            }
            sha256.insert(
                path.to_string(),
                ReleaseFile {
                    size,
                    sha256: hash.to_ascii_lowercase(),
                },
            );
        }
        if sha256.is_empty() {
            return Err(ReleaseError::Malformed(
                "no SHA256 field: kiln needs SHA256 hashes of the indices".into(),
            ));
        }
        Ok(Release {
            origin: stanza.get("Origin").map(str::to_string),
            suite: stanza.get("Suite").map(str::to_string),
            codename: stanza.get("Codename").map(str::to_string),
            date: date("Date")?,
            valid_until: date("Valid-Until")?,
            components: words("Components"),
            architectures: words("Architectures"),
            acquire_by_hash: stanza
                .get("Acquire-By-Hash")
                .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
            sha256,
        })
    }
}

/// Parse an RFC 2822 date as used in Release files (`Sat, 11 Jul 2026 10:16:37 UTC`, also
/// `+0000` offsets) into seconds since the epoch.
pub fn parse_date(text: &str) -> Option<i64> {
    let text = text.trim();
    let text = match text.split_once(',') {
        Some((_, rest)) => rest.trim(),
        None => text,
    };
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [day, month, year, time, ref zone @ ..] = parts[..] else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m.eq_ignore_ascii_case(month))? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, s) = match hms[..] {
        [h, m, s] => (h, m, s),
        [h, m] => (h, m, 0),
        _ => return None,
    };
    let offset = match zone.first().copied() {
        None | Some("UTC") | Some("GMT") | Some("Z") => 0,
        Some(z) if (z.starts_with('+') || z.starts_with('-')) && z.len() == 5 && z.is_ascii() => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let hh: i64 = z[1..3].parse().ok()?;
            let mm: i64 = z[3..5].parse().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
        Some(_) => return None,
    };
    if !(1..=31).contains(&day) || !(1..=9999).contains(&year) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(
        crate::time::days_from_civil(year, month, day) * crate::time::SECS_PER_DAY
            + h * 3600
            + m * 60
            + s
            - offset,
    )
}

/// Format seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (for messages).
pub fn format_date(secs: i64) -> String {
    let c = crate::time::Civil::from_epoch(secs);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            parse_date("Sat, 11 Jul 2026 10:16:37 UTC"),
            Some(1783764997)
        );
        assert_eq!(
            parse_date("Sat, 10 Jun 2023 08:53:33 +0100"),
            Some(1686383613)
        );
        assert_eq!(parse_date("29 Feb 2024 00:00:00 UTC"), Some(1709164800));
        assert_eq!(parse_date("Sat, 11 Foo 2026 10:16:37 UTC"), None);
        assert_eq!(parse_date("garbage"), None);
        assert_eq!(parse_date("1 Jan 99999999999999999 00:00:00 UTC"), None);
        assert_eq!(parse_date("1 Jan 2026 00:00:00 +0é0"), None);
        assert_eq!(format_date(1783764997), "2026-07-11 10:16:37 UTC");
        assert_eq!(format_date(1709164800), "2024-02-29 00:00:00 UTC");
        assert_eq!(format_date(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn shipped_keyring_loads() {
        let ring = Keyring::debian().unwrap();
        let fps = ring.fingerprints();
        assert!(
            fps.contains(&"B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8".to_string()),
            "{fps:?}"
        );
        assert!(
            fps.contains(&"4D64FEC119C2029067D6E791F8D2585B8783D481".to_string()),
            "{fps:?}"
        );
        assert!(Keyring::from_bytes(b"").is_err());
        assert!(Keyring::from_bytes(b"not a key").is_err());
    }

    #[test]
    fn release_fields() {
        let text = "Origin: Debian\nCodename: bookworm\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n\
                    Acquire-By-Hash: yes\nComponents: main contrib\nSHA256:\n \
                    9e0b5aabb2465b3d2e7a7fe27f9913846277833f7a2826e7767acccff5b588c5  8790396 \
                    main/binary-amd64/Packages.xz\n";
        let r = Release::parse(text).unwrap();
        assert_eq!(r.codename.as_deref(), Some("bookworm"));
        assert!(r.acquire_by_hash);
        assert_eq!(r.components, ["main", "contrib"]);
        assert_eq!(r.sha256["main/binary-amd64/Packages.xz"].size, 8790396);
        assert!(Release::parse("Origin: Debian\n").is_err());
        assert!(Release::parse("SHA256:\n zz 1 x\n").is_err());
    }

    #[test]
    fn unsigned_text_is_refused() {
        let ring = Keyring::debian().unwrap();
        let err = verify_clearsigned(b"Origin: Debian\n", &ring).unwrap_err();
        assert!(matches!(err, ReleaseError::NotSigned(_)), "{err}");
    }
}
