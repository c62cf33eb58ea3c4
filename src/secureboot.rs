//! UEFI Secure Boot with the project's own key: the RSA key and self-signed X.509 certificate
//! (`kiln keygen --secure-boot`), Authenticode signatures of PE images (systemd-boot, unified
//! kernel images) made in-process, and the authenticated variables — `PK`, `KEK` and `db` as
//! `.auth` files — that systemd-boot enrolls into firmware in setup mode. Signing is
//! deterministic: RSA PKCS#1 v1.5, no signing time, timestamps from SOURCE_DATE_EPOCH, so the
//! same image and key give the same bytes. One key serves as PK, KEK and db (docs/secure-boot.md
//! says how to use separate keys in production firmware).

use crate::der::{self, algorithm, context, integer, octet_string, oid, sequence, set_of};
use crate::pe::{PeError, authenticode_sha256, pad_for_signing, with_certificate_table};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const OID_SHA256: &str = "2.16.840.1.101.3.4.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_SHA256_RSA: &str = "1.2.840.113549.1.1.11";
const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_DATA: &str = "1.2.840.113549.1.7.1";
const OID_CONTENT_TYPE: &str = "1.2.840.113549.1.9.3";
const OID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const OID_SPC_INDIRECT_DATA: &str = "1.3.6.1.4.1.311.2.1.4";
const OID_SPC_PE_IMAGE_DATA: &str = "1.3.6.1.4.1.311.2.1.15";
const OID_SPC_SP_OPUS_INFO: &str = "1.3.6.1.4.1.311.2.1.12";
const OID_COMMON_NAME: &str = "2.5.4.3";
const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";
const OID_KEY_USAGE: &str = "2.5.29.15";
const OID_SUBJECT_KEY_ID: &str = "2.5.29.14";
const OID_EXT_KEY_USAGE: &str = "2.5.29.37";
const OID_CODE_SIGNING: &str = "1.3.6.1.5.5.7.3.3";

/// `WIN_CERT_TYPE_PKCS_SIGNED_DATA`, `WIN_CERT_TYPE_EFI_GUID`, revision 2.0.
const WIN_CERT_PKCS: u16 = 0x0002;
const WIN_CERT_EFI_GUID: u16 = 0x0ef1;
const WIN_CERT_REVISION: u16 = 0x0200;

/// `EFI_CERT_TYPE_PKCS7_GUID`, `EFI_CERT_X509_GUID`, `EFI_GLOBAL_VARIABLE`,
/// `EFI_IMAGE_SECURITY_DATABASE_GUID`.
const GUID_PKCS7: &str = "4aafd29d-68df-49ee-8aa9-347d375665a7";
const GUID_X509: &str = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072";
const GUID_GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
const GUID_DB: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// The owner GUID kiln writes into signature lists ("kiln" in the first bytes).
const GUID_OWNER: &str = "6b696c6e-0000-4000-8000-000000000001";

/// `NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS`.
const AUTH_ATTRIBUTES: u32 = 0x27;

/// Largest key or certificate file read.
const MAX_KEY_FILE: u64 = 64 << 10;

/// Why a Secure Boot key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SecureBootError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "{key} and {cert} do not belong together: the certificate's public key is not the key's; \
         give the certificate made with this key (kiln keygen --secure-boot writes both)"
    )]
    Mismatch { key: PathBuf, cert: PathBuf },
    #[error("{path} exists; kiln keygen does not overwrite keys (remove it or choose another -o)")]
    Exists { path: PathBuf },
    #[error("signing: {0}")]
    Sign(String),
    #[error(transparent)]
    Pe(#[from] PeError),
}

/// The project's Secure Boot key with its certificate.
pub struct SecureBootKey {
    key: RsaPrivateKey,
    /// The certificate, DER.
    cert: Vec<u8>,
    /// Its issuer Name and serial number (DER TLVs), for SignerInfo.
    issuer: Vec<u8>,
    serial: Vec<u8>,
}

impl std::fmt::Debug for SecureBootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureBootKey")
            .field("cert_sha256", &hex::encode(Sha256::digest(&self.cert)))
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, reason: impl Into<String>) -> SecureBootError {
    SecureBootError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_small(path: &Path) -> Result<String, SecureBootError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| file_error(path, e.to_string()))?;
    let mut text = String::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| file_error(path, e.to_string()))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(file_error(
            path,
            "larger than 64 KiB: not a key or certificate",
        ));
    }
    Ok(text)
}

/// The DER inside the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// One TLV at the start of `der`: (tag, the whole TLV, what follows).
fn next_tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    der::split_tlv(der).map(|t| (t.tag, t.whole, t.rest))
}

/// (issuer Name, serial INTEGER, SubjectPublicKeyInfo) of a certificate, as DER TLVs.
fn certificate_fields(cert: &[u8]) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let (_, cert_tlv, _) = next_tlv(cert)?;
    let (_, tbs, _) = next_tlv(der::content_of(cert_tlv)?)?;
    let mut rest = der::content_of(tbs)?;
    let (tag, _, after) = next_tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    let (_, serial, rest) = next_tlv(rest)?;
    let (_, _sigalg, rest) = next_tlv(rest)?;
    let (_, issuer, rest) = next_tlv(rest)?;
    let (_, _validity, rest) = next_tlv(rest)?;
    let (_, _subject, rest) = next_tlv(rest)?;
    let (_, spki, _) = next_tlv(rest)?;
    Some((issuer.to_vec(), serial.to_vec(), spki.to_vec()))
}

/// A self-signed certificate for `key`: CN `common_name`, valid from 2000 to 9999 (firmware
/// does not check time), a CA (so it may serve as PK and KEK too) with the code-signing purpose.
fn self_signed(
    key: &RsaPrivateKey,
    common_name: &str,
    serial: &[u8],
) -> Result<Vec<u8>, SecureBootError> {
    let spki = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| SecureBootError::Sign(e.to_string()))?;
    let spki = spki.as_bytes();
    let name = sequence(&[&set_of(&[&sequence(&[
        &oid(OID_COMMON_NAME),
        &der::utf8_string(common_name),
    ])])]);
    let key_id = {
        // The SHA-1 of the public key bits, as RFC 5280 suggests (here SHA-256, cut to 20).
        let d = Sha256::digest(spki);
        d[..20].to_vec()
    };
    let extension = |id: &str, critical: bool, value: Vec<u8>| {
        if critical {
            sequence(&[&oid(id), &der::boolean(true), &octet_string(&value)])
        } else {
            sequence(&[&oid(id), &octet_string(&value)])
        }
    };
    let extensions = sequence(&[
        &extension(
            OID_BASIC_CONSTRAINTS,
            true,
            sequence(&[&der::boolean(true)]),
        ),
        // digitalSignature (bit 0) and keyCertSign (bit 5): 0b1000_0100, 2 unused bits.
        &extension(OID_KEY_USAGE, true, der::tlv(0x03, &[0x02, 0x84])),
        &extension(
            OID_EXT_KEY_USAGE,
            false,
            sequence(&[&oid(OID_CODE_SIGNING)]),
        ),
        &extension(OID_SUBJECT_KEY_ID, false, octet_string(&key_id)),
    ]);
    let tbs = sequence(&[
        &context(0, &[&integer(&[2])]),
        &integer(serial),
        &algorithm(OID_SHA256_RSA),
        &name,
        &sequence(&[
            &der::utc_time("000101000000Z"),
            &der::generalized_time("99991231235959Z"),
        ]),
        &name,
        spki,
        &context(3, &[&extensions]),
    ]);
    let signature = sign_digest(key, &Sha256::digest(&tbs))?;
    Ok(sequence(&[
        &tbs,
        &algorithm(OID_SHA256_RSA),
        &der::bit_string(&signature),
    ]))
}

fn sign_digest(key: &RsaPrivateKey, digest: &[u8]) -> Result<Vec<u8>, SecureBootError> {
    key.sign(Pkcs1v15Sign::new::<rsa::sha2::Sha256>(), digest)
        .map_err(|e| SecureBootError::Sign(e.to_string()))
}

/// Write a new 2048-bit RSA key (`path`, PKCS#8 PEM, mode 0600) and its self-signed certificate
/// (`path` with `.crt`), named `common_name`. Neither file may exist.
pub fn keygen(path: &Path, common_name: &str) -> Result<SecureBootKey, SecureBootError> {
    let cert_path = cert_path_of(path);
    for p in [path, cert_path.as_path()] {
        if p.exists() {
            return Err(SecureBootError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    let mut rng = rand_core::OsRng;
    let key =
        RsaPrivateKey::new(&mut rng, 2048).map_err(|e| SecureBootError::Sign(e.to_string()))?;
    let mut serial = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rng, &mut serial);
    serial[0] &= 0x7f;
    let cert = self_signed(&key, common_name, &serial)?;
    let key_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| SecureBootError::Sign(e.to_string()))?;
    write_new(path, key_pem.as_bytes(), 0o600)?;
    write_new(&cert_path, pem("CERTIFICATE", &cert).as_bytes(), 0o644)?;
    SecureBootKey::from_parts(key, cert)
        .ok_or_else(|| file_error(&cert_path, "unreadable certificate"))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SecureBootError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_error(path, e.to_string()))?;
    f.write_all(bytes)
        .map_err(|e| file_error(path, e.to_string()))
}

/// Where the certificate of the key at `path` is: `<path>.crt`.
pub fn cert_path_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".crt");
    PathBuf::from(name)
}

impl SecureBootKey {
    fn from_parts(key: RsaPrivateKey, cert: Vec<u8>) -> Option<SecureBootKey> {
        let (issuer, serial, spki) = certificate_fields(&cert)?;
        let ours = key.to_public_key().to_public_key_der().ok()?;
        if ours.as_bytes() != spki.as_slice() {
            return None;
        }
        Some(SecureBootKey {
            key,
            cert,
            issuer,
            serial,
        })
    }

    /// Load a key (PKCS#8 or PKCS#1 PEM: `kiln keygen --secure-boot`, `openssl req -newkey`)
    /// and its certificate (PEM).
    pub fn load(key_path: &Path, cert_path: &Path) -> Result<SecureBootKey, SecureBootError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let text = read_small(key_path)?;
        let key = RsaPrivateKey::from_pkcs8_pem(&text)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(&text))
            .map_err(|e| file_error(key_path, format!("not an RSA private key in PEM ({e})")))?;
        let cert_text = read_small(cert_path)?;
        let cert = pem_block(&cert_text, "CERTIFICATE")
            .ok_or_else(|| file_error(cert_path, "no PEM CERTIFICATE block"))?;
        let fields = certificate_fields(&cert)
            .ok_or_else(|| file_error(cert_path, "not an X.509 certificate"))?;
        let ours = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| SecureBootError::Sign(e.to_string()))?;
        if ours.as_bytes() != fields.2.as_slice() {
            return Err(SecureBootError::Mismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        Ok(SecureBootKey {
            key,
            cert,
            issuer: fields.0,
            serial: fields.1,
        })
    }

    /// The certificate, DER.
    pub fn certificate(&self) -> &[u8] {
        &self.cert
    }

    /// The certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }

    /// `sha256:<hex>` of the certificate: names the key in cache keys and reports.
    pub fn fingerprint(&self) -> crate::digest::Digest256 {
        crate::digest::Digest256::of(&self.cert)
    }

    pub fn public_key(&self) -> RsaPublicKey {
        self.key.to_public_key()
    }

    /// A PKCS#7 SignedData over `content` of `content_type` (a DER TLV whose content octets are
    /// hashed), with authenticated attributes when `attributes` (Authenticode requires them;
    /// UEFI variables are signed without), `content` detached when `detach`.
    fn signed_data(
        &self,
        content_type: &str,
        content: &[u8],
        attributes: bool,
        detach: bool,
    ) -> Result<Vec<u8>, SecureBootError> {
        let hashed = if detach {
            content
        } else {
            der::content_of(content).ok_or_else(|| SecureBootError::Sign("bad content".into()))?
        };
        let digest = Sha256::digest(hashed);
        let (signed_attrs, signature) = if attributes {
            let attrs = [
                sequence(&[&oid(OID_CONTENT_TYPE), &set_of(&[&oid(content_type)])]),
                sequence(&[&oid(OID_SPC_SP_OPUS_INFO), &set_of(&[&sequence(&[])])]),
                sequence(&[&oid(OID_MESSAGE_DIGEST), &set_of(&[&octet_string(&digest)])]),
            ];
            let refs: Vec<&[u8]> = attrs.iter().map(Vec::as_slice).collect();
            let as_set = set_of(&refs);
            let signature = sign_digest(&self.key, &Sha256::digest(&as_set))?;
            // The same SET, tagged [0] IMPLICIT in the SignerInfo.
            let mut tagged = as_set;
            tagged[0] = 0xa0;
            (Some(tagged), signature)
        } else {
            (None, sign_digest(&self.key, &digest)?)
        };
        let mut signer_parts: Vec<&[u8]> = Vec::new();
        let version = integer(&[1]);
        let issuer_serial = sequence(&[&self.issuer, &self.serial]);
        let sha256 = algorithm(OID_SHA256);
        let rsa = algorithm(OID_RSA);
        let sig = octet_string(&signature);
        signer_parts.push(&version);
        signer_parts.push(&issuer_serial);
        signer_parts.push(&sha256);
        if let Some(a) = &signed_attrs {
            signer_parts.push(a);
        }
        signer_parts.push(&rsa);
        signer_parts.push(&sig);
        let signer = sequence(&signer_parts);
        let inner = if detach {
            sequence(&[&oid(content_type)])
        } else {
            sequence(&[&oid(content_type), &context(0, &[content])])
        };
        Ok(sequence(&[
            &integer(&[1]),
            &set_of(&[&sha256]),
            &inner,
            &context(0, &[&self.cert]),
            &set_of(&[&signer]),
        ]))
    }

    /// `image` (a PE/COFF EFI binary) signed with Authenticode, replacing a signature it had.
    pub fn sign_pe(&self, image: &[u8], what: &str) -> Result<Vec<u8>, SecureBootError> {
        let padded = pad_for_signing(image, what)?;
        let digest = authenticode_sha256(&padded, what)?;
        // SpcIndirectDataContent: a PE image (flags empty, file "<<<Obsolete>>>") and its digest.
        let obsolete: Vec<u8> = "<<<Obsolete>>>"
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .collect();
        let pe_image_data = sequence(&[
            &der::tlv(0x03, &[0x00]),
            &context(0, &[&context(2, &[&der::tlv(0x80, &obsolete)])]),
        ]);
        let indirect = sequence(&[
            &sequence(&[&oid(OID_SPC_PE_IMAGE_DATA), &pe_image_data]),
            &sequence(&[&algorithm(OID_SHA256), &octet_string(&digest)]),
        ]);
        let signed = self.signed_data(OID_SPC_INDIRECT_DATA, &indirect, true, false)?;
        let content_info = sequence(&[&oid(OID_SIGNED_DATA), &context(0, &[&signed])]);
        // WIN_CERTIFICATE: length, revision 2.0, PKCS#7 signed data; padded to 8 bytes.
        let mut table = Vec::new();
        let length = (8 + content_info.len()).next_multiple_of(8);
        table.extend_from_slice(&(length as u32).to_le_bytes());
        table.extend_from_slice(&WIN_CERT_REVISION.to_le_bytes());
        table.extend_from_slice(&WIN_CERT_PKCS.to_le_bytes());
        table.extend_from_slice(&content_info);
        table.resize(length, 0);
        Ok(with_certificate_table(&padded, &table, what)?)
    }

    /// `EFI_SIGNATURE_LIST` holding this certificate.
    pub fn signature_list(&self) -> Vec<u8> {
        let size = 16 + self.cert.len();
        let mut out = guid_bytes(GUID_X509).to_vec();
        out.extend_from_slice(&((28 + size) as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out.extend_from_slice(&guid_bytes(GUID_OWNER));
        out.extend_from_slice(&self.cert);
        out
    }

    /// The `.auth` file (`EFI_VARIABLE_AUTHENTICATION_2` followed by the data) that sets the
    /// Secure Boot variable `name` (`PK`, `KEK` or `db`) to this certificate, signed by this key
    /// at `epoch` (seconds since 1970, UTC).
    pub fn auth_variable(&self, name: &str, epoch: i64) -> Result<Vec<u8>, SecureBootError> {
        let vendor = if name == "db" || name == "dbx" {
            GUID_DB
        } else {
            GUID_GLOBAL
        };
        let data = self.signature_list();
        let time = efi_time(epoch);
        let mut signed = Vec::new();
        for unit in name.encode_utf16() {
            signed.extend_from_slice(&unit.to_le_bytes());
        }
        signed.extend_from_slice(&guid_bytes(vendor));
        signed.extend_from_slice(&AUTH_ATTRIBUTES.to_le_bytes());
        signed.extend_from_slice(&time);
        signed.extend_from_slice(&data);
        let pkcs7 = self.signed_data(OID_DATA, &signed, false, true)?;
        let mut out = time.to_vec();
        out.extend_from_slice(&((24 + pkcs7.len()) as u32).to_le_bytes());
        out.extend_from_slice(&WIN_CERT_REVISION.to_le_bytes());
        out.extend_from_slice(&WIN_CERT_EFI_GUID.to_le_bytes());
        out.extend_from_slice(&guid_bytes(GUID_PKCS7));
        out.extend_from_slice(&pkcs7);
        out.extend_from_slice(&data);
        Ok(out)
    }
}

/// A GUID in its EFI (mixed-endian) byte order.
fn guid_bytes(text: &str) -> [u8; 16] {
    let u = uuid::Uuid::parse_str(text).unwrap_or_default();
    u.to_bytes_le()
}

/// `EFI_TIME` of `epoch` (UTC, no nanoseconds, time zone and daylight zero as the
/// authenticated-variable rules require).
fn efi_time(epoch: i64) -> [u8; 16] {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    let (y, m, d) = crate::time::civil_from_days(days);
    let mut t = [0u8; 16];
    t[..2].copy_from_slice(&(y as u16).to_le_bytes());
    t[2] = m as u8;
    t[3] = d as u8;
    t[4] = (secs / 3600) as u8;
    t[5] = (secs / 60 % 60) as u8;
    t[6] = (secs % 60) as u8;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_signs_pe_images_and_variables_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.key");
        let key = keygen(&path, "kiln test db").unwrap();
        assert!(matches!(
            keygen(&path, "again"),
            Err(SecureBootError::Exists { .. })
        ));
        let loaded = SecureBootKey::load(&path, &cert_path_of(&path)).unwrap();
        assert_eq!(loaded.certificate(), key.certificate());
        let image = crate::pe::tests::tiny_pe(0x400);
        let a = key.sign_pe(&image, "tiny").unwrap();
        let b = loaded.sign_pe(&image, "tiny").unwrap();
        assert_eq!(a, b, "same image and key, same bytes");
        // Signing again replaces the signature; the digest is the unsigned image's.
        assert_eq!(key.sign_pe(&a, "tiny").unwrap(), a);
        let pe = crate::pe::Pe::parse(&a, "signed").unwrap();
        assert!(pe.certificates.is_some());
        let auth = key.auth_variable("db", 1_700_000_000).unwrap();
        assert_eq!(&auth[..2], &2023u16.to_le_bytes());
        assert!(auth.ends_with(&key.signature_list()));
        // Another key's certificate does not load with this key.
        let other = dir.path().join("other.key");
        keygen(&other, "other").unwrap();
        assert!(matches!(
            SecureBootKey::load(&path, &cert_path_of(&other)),
            Err(SecureBootError::Mismatch { .. })
        ));
    }
}
