//! Attestations: in-toto Statements (v1) about an image, each in a DSSE envelope signed with a
//! kiln key, stored as cosign stores them — one `application/vnd.dsse.envelope.v1+json` layer
//! per attestation, annotated with its `predicateType`, in the manifest tagged
//! `sha256-<manifest hex>.att` whose `subject` is the image (so the referrers API lists it
//! too) — and read back and checked: the envelope's signature (DSSE's pre-authentication
//! encoding), then that the Statement names this manifest. `cosign verify-attestation --key`
//! reads the same layout.

use super::{
    Descriptor, Reference, StoreError, Target, attached_manifests, cosign_manifest, fetch_manifest,
    to_json,
};
use crate::digest::Digest256;
use crate::store::sign::{SigningKey, VerifyingKey};
use base64::Engine as _;
use std::collections::BTreeMap;

/// Media type of an attestation layer, and `artifactType` of the `.att` manifest.
pub const MEDIA_DSSE: &str = "application/vnd.dsse.envelope.v1+json";
/// The layer annotation naming the Statement's predicate type (cosign's).
pub const ANN_PREDICATE_TYPE: &str = "predicateType";
/// DSSE `payloadType` of an in-toto Statement.
pub const PAYLOAD_IN_TOTO: &str = "application/vnd.in-toto+json";
/// `_type` of an in-toto Statement v1.
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// Predicate type of an SPDX document (what `cosign verify-attestation --type spdxjson` asks).
pub const PREDICATE_SPDX: &str = "https://spdx.dev/Document";
/// Predicate type of SLSA provenance v1 (`--type slsaprovenance1`).
pub const PREDICATE_SLSA_V1: &str = "https://slsa.dev/provenance/v1";
/// Predicate type of kiln's boot attestation (docs/attestations.md): the verify stage's record,
/// signed with its verifier key, of each boot of a disk that reached the recipe's marker. Its
/// subject is the disk (the image's layer), which the verify stage knows; the manifest is made
/// later, by the publish stage.
pub const PREDICATE_BOOT: &str = "https://kiln.invalid/attestation/boot/v1";
/// Largest envelope kiln reads (an SBOM of a few thousand packages fits many times over).
pub const MAX_ENVELOPE: u64 = 16 << 20;
/// Most attestation layers one image may carry before kiln refuses to read them.
const MAX_ATTESTATIONS: usize = 64;

/// The tag attestations are stored under: `sha256-<hex>.att`.
pub fn attestation_tag(manifest: &Digest256) -> String {
    format!("sha256-{}.att", manifest.hex())
}

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the signature over [`pae`].
    pub sig: String,
}

/// DSSE's pre-authentication encoding: what is signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// `payload` of `payload_type`, signed with `key` (key id left empty, as cosign does).
    pub fn seal(key: &SigningKey, payload_type: &str, payload: &[u8]) -> Envelope {
        let b64 = base64::engine::general_purpose::STANDARD;
        Envelope {
            payload_type: payload_type.into(),
            payload: b64.encode(payload),
            signatures: vec![EnvelopeSignature {
                keyid: String::new(),
                sig: b64.encode(key.sign(&pae(payload_type, payload))),
            }],
        }
    }

    /// The payload, if one of the signatures is `key`'s over it.
    pub fn open(&self, key: &VerifyingKey) -> Option<Vec<u8>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64.decode(&self.payload).ok()?;
        let signed = pae(&self.payload_type, &payload);
        self.signatures
            .iter()
            .filter_map(|s| b64.decode(&s.sig).ok())
            .any(|sig| key.verify(&signed, &sig))
            .then_some(payload)
    }
}

/// An in-toto Statement v1.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub kind: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subject {
    pub name: String,
    /// Algorithm → hex (`sha256`).
    pub digest: BTreeMap<String, String>,
}

impl Statement {
    /// A Statement about the image manifest `manifest` published as `name`.
    pub fn new(
        name: &str,
        manifest: &Digest256,
        predicate_type: &str,
        predicate: serde_json::Value,
    ) -> Statement {
        Statement {
            kind: STATEMENT_V1.into(),
            subject: vec![Subject {
                name: name.into(),
                digest: BTreeMap::from([("sha256".to_string(), manifest.hex().to_string())]),
            }],
            predicate_type: predicate_type.into(),
            predicate,
        }
    }

    /// Whether a subject is the manifest `digest`.
    pub fn names(&self, digest: &Digest256) -> bool {
        self.subject
            .iter()
            .any(|s| s.digest.get("sha256").map(String::as_str) == Some(digest.hex()))
    }
}

/// An envelope sealed elsewhere (the verify stage's boot attestation), stored as it is.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub predicate_type: String,
    /// The envelope's JSON bytes.
    pub envelope: Vec<u8>,
}

/// Sign `statements` with `key` and store them, and the `sealed` envelopes as they are, with the
/// image `subject`: each a layer of the `.att` manifest. Layers already there with another
/// predicate type are kept (another key's); one of the same type is replaced. Returns the
/// manifest's digest.
pub(super) fn put_attestations(
    target: &Target,
    r: &Reference,
    key: &SigningKey,
    subject: &Descriptor,
    statements: &[Statement],
    sealed: &[Sealed],
) -> Result<Digest256, StoreError> {
    let mut envelopes: Vec<(String, Vec<u8>)> = Vec::new();
    for st in statements {
        let envelope = to_json(&Envelope::seal(key, PAYLOAD_IN_TOTO, &to_json(st)?))?;
        envelopes.push((st.predicate_type.clone(), envelope));
    }
    envelopes.extend(
        sealed
            .iter()
            .map(|s| (s.predicate_type.clone(), s.envelope.clone())),
    );
    let mut new_layers = Vec::new();
    for (predicate_type, envelope) in &envelopes {
        new_layers.push(Descriptor {
            media_type: MEDIA_DSSE.into(),
            digest: target.put_small_blob(envelope)?,
            size: envelope.len() as u64,
            artifact_type: None,
            // cosign requires its signature annotation on every layer, empty for an envelope
            // (the signature is inside).
            annotations: BTreeMap::from([
                (ANN_PREDICATE_TYPE.to_string(), predicate_type.clone()),
                (super::ANN_COSIGN_SIGNATURE.to_string(), String::new()),
            ]),
        });
    }
    let tag = attestation_tag(&subject.digest);
    let kept: Vec<Descriptor> = match fetch_manifest(target, r, &tag) {
        Ok((_, _, m)) => m
            .layers
            .into_iter()
            .filter(|l| {
                l.media_type == MEDIA_DSSE
                    && !statements
                        .iter()
                        .any(|s| l.annotations.get(ANN_PREDICATE_TYPE) == Some(&s.predicate_type))
            })
            .collect(),
        Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut layers = kept;
    layers.extend(new_layers);
    layers.truncate(MAX_ATTESTATIONS);
    let m = cosign_manifest(target, MEDIA_DSSE, layers, subject)?;
    target.put_manifest(&tag, &to_json(&m)?, MEDIA_DSSE)
}

/// What was found about one predicate type.
#[derive(Debug, Clone, PartialEq)]
pub enum Attested {
    /// Exactly one Statement of this type signed by the key, about this manifest.
    One(Statement),
    /// None signed by the key (the count of layers of this type that were there).
    Unverified { layers: usize },
    /// Absent.
    Missing,
}

/// The attestations of `predicate_type` on the manifest `digest`, checked with `keys` (one
/// must have signed it), about `subject` (the manifest, or for a boot attestation the disk). A
/// Statement signed by a key about something else, two that disagree, or a malformed envelope
/// are refused with the reason.
pub(super) fn attested(
    target: &Target,
    r: &Reference,
    digest: &Digest256,
    subject: &Digest256,
    keys: &[VerifyingKey],
    predicate_type: &str,
) -> Result<Attested, StoreError> {
    let malformed = |reason: String| StoreError::Malformed {
        what: format!("{predicate_type} attestation for {digest}"),
        reference: r.to_string(),
        reason,
    };
    let layers = attestation_layers(target, r, digest)?;
    let layers: Vec<&Descriptor> = layers
        .iter()
        .filter(|l| {
            l.annotations.get(ANN_PREDICATE_TYPE).map(String::as_str) == Some(predicate_type)
        })
        .collect();
    let mut found: Option<Statement> = None;
    for layer in &layers {
        let bytes = target.small_blob_within(layer, "attestation envelope", MAX_ENVELOPE)?;
        let envelope: Envelope = serde_json::from_slice(&bytes)
            .map_err(|e| malformed(format!("envelope {}: {e}", layer.digest)))?;
        if envelope.payload_type != PAYLOAD_IN_TOTO {
            return Err(malformed(format!(
                "payloadType {:?}, expected {PAYLOAD_IN_TOTO}",
                envelope.payload_type
            )));
        }
        let Some(payload) = keys.iter().find_map(|k| envelope.open(k)) else {
            continue;
        };
        let st: Statement = serde_json::from_slice(&payload)
            .map_err(|e| malformed(format!("statement in {}: {e}", layer.digest)))?;
        if st.predicate_type != predicate_type {
            return Err(malformed(format!(
                "the layer says {predicate_type} but its statement is {}",
                st.predicate_type
            )));
        }
        if !st.names(subject) {
            return Err(StoreError::AttestationSubject {
                reference: r.to_string(),
                predicate_type: predicate_type.into(),
                digest: subject.clone(),
                subjects: st
                    .subject
                    .iter()
                    .map(|s| s.digest.get("sha256").cloned().unwrap_or_default())
                    .collect(),
            });
        }
        match &found {
            Some(f) if f != &st => {
                return Err(StoreError::ConflictingAttestations {
                    reference: r.to_string(),
                    predicate_type: predicate_type.into(),
                });
            }
            _ => found = Some(st),
        }
    }
    Ok(match found {
        Some(st) => Attested::One(st),
        None if layers.is_empty() => Attested::Missing,
        None => Attested::Unverified {
            layers: layers.len(),
        },
    })
}

/// Every attestation layer of the image: from the referrers API and the `.att` tag.
fn attestation_layers(
    target: &Target,
    r: &Reference,
    digest: &Digest256,
) -> Result<Vec<Descriptor>, StoreError> {
    let mut layers: Vec<Descriptor> = Vec::new();
    for m in attached_manifests(target, r, digest, MEDIA_DSSE, &attestation_tag(digest))? {
        for l in m.layers.into_iter().filter(|l| l.media_type == MEDIA_DSSE) {
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
    }
    if layers.len() > MAX_ATTESTATIONS {
        return Err(StoreError::Malformed {
            what: format!("attestations for {digest}"),
            reference: r.to_string(),
            reason: format!(
                "{} layers; at most {MAX_ATTESTATIONS} are read",
                layers.len()
            ),
        });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_open_only_with_their_key_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [
            crate::store::KeyType::EcdsaP256,
            crate::store::KeyType::Ed25519,
        ] {
            let path = dir.path().join(kind.to_string());
            let vk = crate::store::keygen(&path, kind).unwrap();
            let sk = crate::store::load_signing_key(&path).unwrap();
            let e = Envelope::seal(&sk, PAYLOAD_IN_TOTO, b"{\"a\":1}");
            assert_eq!(e.open(&vk).as_deref(), Some(&b"{\"a\":1}"[..]));
            let mut other = e.clone();
            other.payload_type = "text/plain".into();
            assert_eq!(other.open(&vk), None, "the type is signed too");
            let mut other = e.clone();
            other.payload = base64::engine::general_purpose::STANDARD.encode(b"{\"a\":2}");
            assert_eq!(other.open(&vk), None);
        }
        assert_eq!(pae("t", b"ab"), b"DSSEv1 1 t 2 ab".to_vec());
    }
}
