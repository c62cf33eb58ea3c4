//! The image store: publish kiln disk images to an OCI registry (distribution API v2) or an OCI
//! image layout directory, sign them, list them, and pull them back with verification.
//!
//! # What is stored
//!
//! An image is an OCI image manifest (`application/vnd.oci.image.manifest.v1+json`,
//! `artifactType: application/vnd.kiln.disk.v1`) with
//! - config: a small JSON blob `{"kilnVersion","recipe","format"}`, media type
//!   `application/vnd.kiln.image.config.v1+json`;
//! - one layer: the disk file as is (no compression), media type `application/vnd.kiln.disk.qcow2`
//!   or `application/vnd.kiln.disk.raw`, annotated with `org.opencontainers.image.title`;
//! - annotations `org.opencontainers.image.created` (RFC 3339 from SOURCE_DATE_EPOCH),
//!   `org.opencontainers.image.title`, `dev.kiln.version`, `dev.kiln.recipe.digest`,
//!   `dev.kiln.git.commit`, `dev.kiln.boot.report` (short JSON), when known.
//!
//! It is PUT under every tag. The manifest bytes are deterministic: same inputs, same digest.
//!
//! # Signatures and attestations
//!
//! Both are stored as cosign stores them (docs/signatures.md has every field). A signature signs
//! cosign's simple signing payload naming the manifest digest and the repository (keys and
//! payload: see [`sign`]); it is a layer of the manifest tagged `sha256-<manifest hex>.sig`.
//! Attestations (SBOM, provenance; see [`attest`]) are in-toto Statements in DSSE envelopes, one
//! layer each of the manifest tagged `sha256-<manifest hex>.att`. Both manifests name the image
//! as their `subject`, so registries with the OCI 1.1 referrers API list them under the image;
//! distribution 2.8 (Debian's `docker-registry`) has none, and the tags serve. Pull asks the
//! referrers API first and also reads the tag.
//!
//! Pull with a trusted key refuses: no signature, no valid signature by that key, a signature
//! over another manifest (the tag was moved) or for another repository, a signature in kiln's
//! old format (with the way out, `kiln sign`), and any blob or manifest whose bytes do not hash
//! to their digest. Without a key it checks digests only and warns.
//!
//! # Measured against distribution 2.8.2 (Debian `docker-registry`)
//!
//! It accepts OCI manifests with `artifactType`, `subject`, custom layer/config media types and
//! the empty config (unknown fields are kept: the manifest is stored byte for byte, so digests
//! hold). It has no referrers API (`GET /v2/<name>/referrers/<digest>` is a 404), hence the
//! `.sig` tag. It honours `Range` on blob GETs (206). Measured on loopback (release build,
//! 256 MiB blob, median of 5): pull 307 MiB/s including the sha256 check against `curl -o`
//! 393 MiB/s; publish 75 MiB/s (hash pass + 16 MiB chunked upload).
//!
//! Credentials: `StoreOptions::credentials`, else `KILN_REGISTRY_USER` and
//! `KILN_REGISTRY_PASSWORD` from the environment.

pub mod attest;
pub mod chunks;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod sign;

use crate::digest::Digest256;
use crate::disk::image::ImageFormat;
use crate::net::redact;
use layout::OciLayout;
pub use reference::{Location, Reference, ReferenceError};
use registry::{Credentials, FetchedManifest, OCI_MANIFEST, Registry};
use sha2::{Digest, Sha256};
pub use sign::{
    KeyError, KeyType, SigningKey, VerifyingKey, keygen, load_signing_key, load_verifying_key,
};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const ARTIFACT_DISK: &str = "application/vnd.kiln.disk.v1";
/// `artifactType` of the signature manifest (cosign's, when it stores signatures as referrers).
pub const ARTIFACT_SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// `artifactType` of kiln's signatures before they took cosign's format (refused, with help).
pub const ARTIFACT_OLD_SIGNATURE: &str = "application/vnd.kiln.signature.v1";
/// Media type of a signature layer: the simple signing payload.
pub const MEDIA_SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Config of a signature manifest: an (empty) image config, as cosign writes it.
pub const MEDIA_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.kiln.image.config.v1+json";
pub const MEDIA_DISK_QCOW2: &str = "application/vnd.kiln.disk.qcow2";
pub const MEDIA_DISK_RAW: &str = "application/vnd.kiln.disk.raw";
pub const MEDIA_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const ANN_CREATED: &str = "org.opencontainers.image.created";
pub const ANN_TITLE: &str = "org.opencontainers.image.title";
pub const ANN_VERSION: &str = "dev.kiln.version";
pub const ANN_RECIPE_DIGEST: &str = "dev.kiln.recipe.digest";
pub const ANN_GIT_COMMIT: &str = "dev.kiln.git.commit";
pub const ANN_BOOT_REPORT: &str = "dev.kiln.boot.report";
/// How agents run the image: the recipe's `deploy` section and the verify marker (short JSON).
pub const ANN_DEPLOY: &str = "dev.kiln.deploy";
/// The base64 signature of a simple signing layer.
pub const ANN_COSIGN_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// Most signatures one `.sig` manifest may carry before kiln refuses to read it.
const MAX_SIGNATURES: usize = 64;
/// Upload chunk size.
pub const CHUNK: usize = 16 << 20;
/// Largest signature payload kiln reads.
const MAX_SMALL_BLOB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot {what} {path}")]
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{method} {url} failed: {reason} (is the registry running and reachable?)")]
    Http {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{what}: {method} {url} answered HTTP {status}: {body}")]
    Status {
        method: String,
        url: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("not authorized at {url}: {reason}")]
    Unauthorized { url: String, reason: String },
    #[error("registry protocol error at {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error(
        "{what}: the registry stalled (sent nothing for {seconds:.1} s){kept}; try again later, \
         or raise KILN_STALL_TIMEOUT (seconds) if the registry is only slow"
    )]
    Stalled {
        what: String,
        seconds: f64,
        /// `; N bytes kept in …, run the pull again to resume`, or empty.
        kept: String,
    },
    #[error(
        "{what}: the registry sent more than the {limit} bytes the manifest declares; refused, \
         and the partial download {partial} removed. The registry is broken or its content was \
         tampered with: pull from another"
    )]
    Oversized {
        what: String,
        limit: u64,
        partial: PathBuf,
    },
    #[error(
        "{what} needs {needed} more bytes in {dir}, but only {available} are free; free some \
         space there or pull to another directory"
    )]
    NoSpace {
        what: String,
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{what} not found in {reference}")]
    NotFound { what: String, reference: String },
    #[error("{what}: expected digest {expected}, got {actual}; refusing it (corrupt or tampered)")]
    DigestMismatch {
        what: String,
        expected: Digest256,
        actual: Digest256,
    },
    #[error("{what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{reference} is not a kiln disk image: {reason}")]
    NotKilnImage { reference: String, reason: String },
    #[error(
        "{reference} was revoked: {reason} (tag {tag}; an operator removes the tag to undo it)"
    )]
    Revoked {
        reference: String,
        reason: String,
        tag: String,
    },
    #[error(
        "{reference} (manifest {digest}) has no signature; refusing it because a trusted key was given"
    )]
    Unsigned {
        reference: String,
        digest: Digest256,
    },
    #[error(
        "{reference} (manifest {digest}) has {count} signature(s), none of them a valid one by the \
         trusted key {trusted} (signed with another key, or altered); refusing it"
    )]
    BadSignature {
        reference: String,
        digest: Digest256,
        count: usize,
        trusted: Digest256,
    },
    #[error(
        "{reference} is signed in kiln's old signature format (dev.kiln.signature.v1), which is no \
         longer accepted: signatures are now cosign's; re-sign the image with `kiln sign \
         {reference} --key KEY` (the old ed25519 key files still work)"
    )]
    OldSignatureFormat { reference: String },
    #[error(
        "the {predicate_type} attestation on {reference} is signed by a trusted key but is about \
         {subjects:?}, not {digest}; refusing it"
    )]
    AttestationSubject {
        reference: String,
        predicate_type: String,
        digest: Digest256,
        subjects: Vec<String>,
    },
    #[error(
        "{reference} has two different {predicate_type} attestations signed by the trusted key; \
         refusing both (remove one from the sha256-<hex>.att manifest, or publish again)"
    )]
    ConflictingAttestations {
        reference: String,
        predicate_type: String,
    },
    #[error(
        "signature on {reference} is for manifest {signed}, but the registry served {actual} (the manifest changed after signing); refusing it"
    )]
    ManifestChanged {
        reference: String,
        signed: Digest256,
        actual: Digest256,
    },
    #[error(
        "signature on {reference} was made for repository {signed_for}, not {here}: a signed image \
         copied to another repository is refused; accept it with --signed-for {signed_for} if this \
         copy is trusted"
    )]
    OtherRepository {
        reference: String,
        signed_for: String,
        here: String,
    },
    #[error("malformed {what} in {reference}: {reason}")]
    Malformed {
        what: String,
        reference: String,
        reason: String,
    },
    #[error("OCI layout {dir}: {reason}")]
    Layout { dir: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Usage { what: String, reason: String },
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest256,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest (the fields kiln writes and reads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The config blob of a kiln image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    pub kiln_version: String,
    pub recipe: String,
    pub format: String,
}

/// The media type of a disk layer in `format`.
fn layer_media_type(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Qcow2 => MEDIA_DISK_QCOW2,
        ImageFormat::Raw => MEDIA_DISK_RAW,
    }
}

/// What the caller knows about the image being published.
#[derive(Debug, Clone, Default)]
pub struct PublishMeta {
    /// Recipe name (config `recipe`).
    pub recipe: String,
    /// `sha256:…` of the rendered recipe.
    pub recipe_digest: Option<String>,
    pub git_commit: Option<String>,
    /// Short JSON summary of the boot check.
    pub boot_report: Option<String>,
    /// SOURCE_DATE_EPOCH of the build (seconds); becomes `org.opencontainers.image.created`.
    pub source_date_epoch: u64,
    /// Tags in addition to the reference's own (which defaults to `latest`).
    pub extra_tags: Vec<String>,
    /// Layer title; default: the image file name.
    pub title: Option<String>,
    /// Format; default: detected from the file.
    pub format: Option<ImageFormat>,
    /// More manifest annotations (e.g. [`ANN_DEPLOY`]); they cannot replace the ones above.
    pub annotations: BTreeMap<String, String>,
}

/// How to reach the store.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Plain http even for non-loopback registries.
    pub insecure: bool,
    /// Credentials; when `None`, `KILN_REGISTRY_USER`/`KILN_REGISTRY_PASSWORD` are used if set.
    pub credentials: Option<Credentials>,
    /// How long the registry may send nothing; `None`: [`crate::net::stall_timeout`].
    pub stall_timeout: Option<Duration>,
    /// Repositories besides the one pulled from whose signatures a pull accepts (a trusted copy
    /// of images signed for another repository).
    pub signed_for: Vec<String>,
}

impl StoreOptions {
    fn stall(&self) -> Duration {
        self.stall_timeout.unwrap_or_else(crate::net::stall_timeout)
    }

    fn credentials(&self) -> Option<Credentials> {
        self.credentials.clone().or_else(|| {
            let username = std::env::var("KILN_REGISTRY_USER").ok()?;
            let password = std::env::var("KILN_REGISTRY_PASSWORD").unwrap_or_default();
            Some(Credentials { username, password })
        })
    }
}

/// What `publish` did (`kiln publish --json` prints it whole).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PublishReport {
    /// `host/repo:tag@sha256:…`
    pub reference: String,
    pub manifest_digest: Digest256,
    pub layer_digest: Digest256,
    pub signature_digest: Option<Digest256>,
    pub tags: Vec<String>,
    /// Size of the disk layer.
    pub bytes: u64,
    /// Bytes of the disk actually uploaded (0 when the registry had the blob already).
    pub uploaded: u64,
    /// The disk's chunks and their index, for delta pulls.
    pub chunks: chunks::ChunkReport,
    pub seconds: f64,
}

/// Signature status of a pulled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Verified with the trusted key (its id).
    Verified { key: Digest256, key_type: KeyType },
    /// Signed, but no trusted key was given to check it.
    Unchecked { signatures: usize },
    /// Signed only in kiln's old format, which is no longer accepted.
    OldFormat,
    /// No signature (only allowed without a trusted key).
    Missing,
}

impl std::fmt::Display for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureCheck::Verified { key, key_type } => {
                write!(f, "signature verified ({key_type} key {key})")
            }
            SignatureCheck::Unchecked { signatures } => {
                write!(f, "{signatures} signature(s), not checked (no --trust)")
            }
            SignatureCheck::OldFormat => f.write_str(
                "signed only in kiln's old format, no longer accepted (re-sign with `kiln sign`)",
            ),
            SignatureCheck::Missing => f.write_str("unsigned"),
        }
    }
}

/// As its one-line text, as `kiln pull --json` has always printed it.
impl serde::Serialize for SignatureCheck {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What `pull` did (`kiln pull --json` prints it whole, with the output file).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PullReport {
    pub reference: String,
    pub manifest_digest: Digest256,
    pub layer_digest: Digest256,
    pub format: String,
    pub signature: SignatureCheck,
    pub annotations: BTreeMap<String, String>,
    /// Size of the disk.
    pub bytes: u64,
    /// Bytes that came over the network this time.
    pub transferred: u64,
    /// Bytes already in `OUT.partial` that were kept.
    pub resumed_from: u64,
    /// For a pull with seeds: what was fetched, reused from the seeds and kept from before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<chunks::DeltaReport>,
    pub seconds: f64,
}

/// One tagged image, as `images()` lists it (and `kiln images --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    pub repository: String,
    pub tag: String,
    pub manifest_digest: Digest256,
    /// Disk layer size (0 if the manifest is not a kiln image).
    pub size: u64,
    pub created: Option<String>,
    pub format: Option<String>,
    /// A `sha256-<hex>.sig` tag exists for it.
    pub signed: bool,
}

fn io_err(what: &str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    }
}

/// The tag a signature is stored under: `sha256-<hex>.sig`.
pub fn signature_tag(manifest: &Digest256) -> String {
    format!("sha256-{}.sig", manifest.hex())
}

/// A tag of something attached to an image (`sha256-<hex>.sig`, `.att`, `.sbom`), not an
/// image: `kiln images` leaves them out.
fn is_attached_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-")
        .and_then(|t| {
            t.strip_suffix(".sig")
                .or_else(|| t.strip_suffix(".att"))
                .or_else(|| t.strip_suffix(".sbom"))
                .or_else(|| t.strip_suffix(".revoked"))
                .or_else(|| t.strip_suffix(".chunks"))
        })
        .is_some_and(|h| h.len() == 64)
}

/// A registry repository or a layout directory.
enum Target {
    Registry { reg: Registry, repo: String },
    Layout(OciLayout),
}

impl Target {
    fn open(r: &Reference, opts: &StoreOptions, create: bool) -> Result<Target, StoreError> {
        Ok(match &r.location {
            Location::Registry { host, repository } => Target::Registry {
                reg: Registry::with_stall_timeout(
                    host,
                    opts.insecure,
                    opts.credentials(),
                    opts.stall(),
                )?,
                repo: repository.clone(),
            },
            Location::Layout { dir } => Target::Layout(OciLayout::open(dir, create)?),
        })
    }

    fn blob_exists(&self, d: &Digest256) -> Result<Option<u64>, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.blob_exists(repo, d),
            Target::Layout(l) => Ok(l.blob_exists(d)),
        }
    }

    fn put_blob(&self, d: &Digest256, r: &mut dyn Read) -> Result<u64, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.upload_blob(repo, d, r, CHUNK),
            Target::Layout(l) => l.put_blob(d, r),
        }
    }

    fn put_small_blob(&self, bytes: &[u8]) -> Result<Digest256, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.upload_small_blob(repo, bytes),
            Target::Layout(l) => l.put_small_blob(bytes),
        }
    }

    fn put_manifest(
        &self,
        tag: &str,
        bytes: &[u8],
        artifact_type: &str,
    ) -> Result<Digest256, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.put_manifest(repo, tag, bytes, OCI_MANIFEST),
            Target::Layout(l) => l.put_manifest(tag, bytes, OCI_MANIFEST, Some(artifact_type)),
        }
    }

    /// Manifest bytes and, from a registry, its claimed digest.
    fn get_manifest(&self, reference: &str) -> Result<Option<FetchedManifest>, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.get_manifest(repo, reference, OCI_MANIFEST),
            Target::Layout(l) => {
                Ok(l.get_manifest(reference)?
                    .map(|(bytes, media_type)| FetchedManifest {
                        bytes,
                        media_type,
                        digest: None,
                    }))
            }
        }
    }

    /// A reader of the blob from `from` on, the offset it really starts at, and the length
    /// the registry announces for it (`Content-Length`), if any.
    fn get_blob(&self, d: &Digest256, from: u64) -> Result<Fetched, StoreError> {
        match self {
            Target::Registry { reg, repo } => {
                let (r, start) = reg.get_blob(repo, d, from)?;
                Ok(Fetched {
                    announced: r.content_length(),
                    body: Box::new(r),
                    start,
                })
            }
            Target::Layout(l) => Ok(Fetched {
                body: Box::new(l.open_blob(d, from)?),
                start: from,
                announced: None,
            }),
        }
    }

    /// A reader of `len` bytes of blob `d` from byte `from`.
    fn get_range(&self, d: &Digest256, from: u64, len: u64) -> Result<Box<dyn Read>, StoreError> {
        match self {
            Target::Registry { reg, repo } => Ok(Box::new(reg.get_blob_range(repo, d, from, len)?)),
            Target::Layout(l) => Ok(Box::new(l.open_blob(d, from)?.take(len))),
        }
    }

    /// How messages name where a blob comes from.
    fn blob_source(&self, d: &Digest256) -> String {
        match self {
            Target::Registry { reg, repo } => {
                redact(&format!("{}/v2/{repo}/blobs/{d}", reg.base())).into_owned()
            }
            Target::Layout(l) => format!("{} blob {d}", l.dir().display()),
        }
    }

    /// The error for a failed read of blob `d`: the registry stalled, or the transfer broke.
    fn read_error(&self, what: &str, d: &Digest256, e: &io::Error) -> StoreError {
        match self {
            Target::Registry { reg, .. } => reg.body_error(what, &self.blob_source(d), e),
            Target::Layout(_) => StoreError::Io {
                what: format!("read {what}"),
                path: PathBuf::from(self.blob_source(d)),
                source: io::Error::new(e.kind(), e.to_string()),
            },
        }
    }

    fn tags(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Target::Registry { reg, repo } => reg.tags(repo),
            Target::Layout(l) => l.tags(),
        }
    }

    /// Read a small blob whole and check its digest.
    fn small_blob(&self, d: &Descriptor, what: &str) -> Result<Vec<u8>, StoreError> {
        self.small_blob_within(d, what, MAX_SMALL_BLOB)
    }

    /// Read a blob of at most `max` bytes whole and check its digest.
    fn small_blob_within(
        &self,
        d: &Descriptor,
        what: &str,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        if d.size > max {
            return Err(StoreError::SizeMismatch {
                what: format!("{what} {} (too large)", d.digest),
                expected: max,
                actual: d.size,
            });
        }
        let fetched = self.get_blob(&d.digest, 0)?;
        let mut bytes = Vec::new();
        fetched
            .body
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.read_error(what, &d.digest, &e))?;
        let actual = Digest256::of(&bytes);
        if actual != d.digest {
            return Err(StoreError::DigestMismatch {
                what: what.to_string(),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

/// A blob being fetched.
struct Fetched {
    body: Box<dyn Read>,
    /// Where `body` starts in the blob.
    start: u64,
    /// `Content-Length` as the registry announced it.
    announced: Option<u64>,
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Usage {
        what: "serialize JSON".into(),
        reason: e.to_string(),
    })
}

/// Make a new signing key: `path` (secret, 0600) and `path.pub`. See [`sign`].
pub fn keygen_files(path: &Path, kind: KeyType) -> Result<VerifyingKey, StoreError> {
    Ok(keygen(path, kind)?)
}

/// Publish a disk image file under `reference` (`host:port/repo:tag` or `oci:/dir:tag`), plus
/// `meta.extra_tags`; sign it when a key is given. The file is streamed twice (hash, upload);
/// the upload is re-hashed and refused if the file changed in between.
pub fn publish(
    image: &Path,
    reference: &str,
    meta: &PublishMeta,
    key: Option<&SigningKey>,
    opts: &StoreOptions,
) -> Result<PublishReport, StoreError> {
    let start = Instant::now();
    let r = Reference::parse(reference)?;
    if r.digest.is_some() {
        return Err(StoreError::Usage {
            what: format!("publish to {reference}"),
            reason: "a digest cannot be published to; give a tag".into(),
        });
    }
    let mut tags = vec![r.tag_or_latest().to_string()];
    for t in &meta.extra_tags {
        if !reference::valid_tag(t) {
            return Err(StoreError::Usage {
                what: format!("tag {t:?}"),
                reason: "tags are [A-Za-z0-9_][A-Za-z0-9._-]{0,127}".into(),
            });
        }
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let format = match meta.format {
        Some(f) => f,
        None => {
            let mut f = File::open(image).map_err(|e| io_err("open", image, e))?;
            ImageFormat::sniff(&mut f).map_err(|e| io_err("read", image, e))?
        }
    };
    let target = Target::open(&r, opts, true)?;
    if let Target::Registry { reg, .. } = &target {
        reg.ping()?;
    }
    // The digest and the chunks (for delta pulls) in one pass.
    let (chunk_list, size, layer_digest) = {
        let mut f = File::open(image).map_err(|e| io_err("open", image, e))?;
        chunks::split(&mut f).map_err(|e| io_err("read", image, e))?
    };
    let uploaded = match target.blob_exists(&layer_digest)? {
        Some(_) => 0,
        None => {
            let mut f = File::open(image).map_err(|e| io_err("open", image, e))?;
            let n = target.put_blob(&layer_digest, &mut f)?;
            if n != size {
                return Err(StoreError::SizeMismatch {
                    what: format!("{} (changed while uploading)", image.display()),
                    expected: size,
                    actual: n,
                });
            }
            n
        }
    };
    let version = env!("CARGO_PKG_VERSION").to_string();
    let config = to_json(&ImageConfig {
        kiln_version: version.clone(),
        recipe: meta.recipe.clone(),
        format: format.name().to_string(),
    })?;
    let config_digest = target.put_small_blob(&config)?;
    let title = meta.title.clone().unwrap_or_else(|| {
        image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("disk.{}", format.name()))
    });
    let created = crate::time::rfc3339(
        i64::try_from(meta.source_date_epoch)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
        crate::time::Precision::Seconds,
    );
    let mut annotations = BTreeMap::from([
        (ANN_CREATED.to_string(), created.clone()),
        (ANN_TITLE.to_string(), title.clone()),
        (ANN_VERSION.to_string(), version),
    ]);
    for (k, v) in [
        (ANN_RECIPE_DIGEST, &meta.recipe_digest),
        (ANN_GIT_COMMIT, &meta.git_commit),
        (ANN_BOOT_REPORT, &meta.boot_report),
    ] {
        if let Some(v) = v {
            annotations.insert(k.to_string(), v.clone());
        }
    }
    for (k, v) in &meta.annotations {
        annotations.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let manifest = OciManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_DISK.into()),
        config: Descriptor {
            media_type: MEDIA_CONFIG.into(),
            digest: config_digest,
            size: config.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: layer_media_type(format).into(),
            digest: layer_digest.clone(),
            size,
            artifact_type: None,
            annotations: BTreeMap::from([(ANN_TITLE.to_string(), title)]),
        }],
        subject: None,
        annotations,
    };
    let manifest_bytes = to_json(&manifest)?;
    let manifest_digest = Digest256::of(&manifest_bytes);
    // The chunks and their index first: an agent that sees the tag finds them.
    let chunks = chunks::publish(
        &target,
        &r,
        &tags,
        chunk_list,
        &manifest.layers[0],
        &manifest_descriptor(&manifest_bytes),
    )?;
    for tag in &tags {
        target.put_manifest(tag, &manifest_bytes, ARTIFACT_DISK)?;
    }
    let signature_digest = match key {
        None => None,
        Some(key) => Some(put_signature(
            &target,
            &r,
            key,
            &manifest_descriptor(&manifest_bytes),
            meta.source_date_epoch,
        )?),
    };
    Ok(PublishReport {
        reference: r.with_digest(&manifest_digest),
        manifest_digest,
        layer_digest,
        signature_digest,
        tags,
        bytes: size,
        uploaded,
        chunks,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The descriptor of an image manifest, as a signature's `subject`.
fn manifest_descriptor(bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: Digest256::of(bytes),
        size: bytes.len() as u64,
        artifact_type: Some(ARTIFACT_DISK.into()),
        annotations: BTreeMap::new(),
    }
}

/// The identity a signature names: `host[:port]/repository` in a registry (as cosign writes
/// it), the directory of a layout.
fn docker_reference(r: &Reference) -> String {
    match &r.location {
        Location::Registry { host, repository } => format!("{host}/{repository}"),
        Location::Layout { dir } => dir.display().to_string(),
    }
}

/// The repository part of a signed identity: what follows the host in a registry's
/// `host/path` (one registry reached by two names is one repository), a layout's directory.
fn repository_of(identity: &str) -> &str {
    match identity.split_once('/') {
        Some((host, path)) if !identity.starts_with('/') && !host.is_empty() => path,
        _ => identity,
    }
}

/// Sign `subject` with `key` and store the signature as cosign does: a layer of media type
/// [`MEDIA_SIMPLE_SIGNING`] holding the payload, its base64 signature in the
/// [`ANN_COSIGN_SIGNATURE`] annotation, in the manifest tagged `sha256-<hex>.sig`. Signatures
/// already there in that format (other keys) are kept; one in kiln's old format is replaced.
/// The manifest names the image as its `subject`, so a registry with the referrers API lists
/// it too. Returns the signature manifest's digest.
fn put_signature(
    target: &Target,
    r: &Reference,
    key: &SigningKey,
    subject: &Descriptor,
    timestamp: u64,
) -> Result<Digest256, StoreError> {
    let payload = to_json(&sign::SimpleSigning::new(
        docker_reference(r),
        subject.digest.clone(),
        timestamp,
    ))?;
    let signature = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(key.sign(&payload))
    };
    let payload_digest = target.put_small_blob(&payload)?;
    let layer = Descriptor {
        media_type: MEDIA_SIMPLE_SIGNING.into(),
        digest: payload_digest,
        size: payload.len() as u64,
        artifact_type: None,
        annotations: BTreeMap::from([(ANN_COSIGN_SIGNATURE.to_string(), signature)]),
    };
    let tag = signature_tag(&subject.digest);
    let mut layers: Vec<Descriptor> = match fetch_manifest(target, r, &tag) {
        Ok((_, _, m)) if m.artifact_type.as_deref() != Some(ARTIFACT_OLD_SIGNATURE) => m
            .layers
            .into_iter()
            .filter(|l| l.media_type == MEDIA_SIMPLE_SIGNING)
            .collect(),
        Ok(_) | Err(StoreError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    if !layers.contains(&layer) {
        layers.push(layer);
    }
    if layers.len() > MAX_SIGNATURES {
        return Err(StoreError::Usage {
            what: format!("sign {r}"),
            reason: format!(
                "{tag} already holds {} signatures; at most {MAX_SIGNATURES}",
                layers.len() - 1
            ),
        });
    }
    let m = cosign_manifest(target, ARTIFACT_SIGNATURE, layers, subject)?;
    target.put_manifest(&tag, &to_json(&m)?, ARTIFACT_SIGNATURE)
}

/// A manifest as cosign writes its `.sig` and `.att` manifests: an empty image config whose
/// `rootfs.diff_ids` are the layers (its blob uploaded here), the layers, and the image as
/// `subject` (for registries with the referrers API).
fn cosign_manifest(
    target: &Target,
    artifact_type: &str,
    layers: Vec<Descriptor>,
    subject: &Descriptor,
) -> Result<OciManifest, StoreError> {
    let config = to_json(&serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {
            "diff_ids": layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
            "type": "layers",
        },
    }))?;
    Ok(OciManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(artifact_type.into()),
        config: Descriptor {
            media_type: MEDIA_IMAGE_CONFIG.into(),
            digest: target.put_small_blob(&config)?,
            size: config.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        layers,
        subject: Some(subject.clone()),
        annotations: BTreeMap::new(),
    })
}

/// What [`sign_image`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignReport {
    /// The image, by digest.
    pub reference: String,
    pub manifest_digest: Digest256,
    /// The `sha256-<hex>.sig` manifest now holding the signature.
    pub signature_digest: Digest256,
    pub key: Digest256,
    pub key_type: KeyType,
}

/// Sign an image already in the store (`kiln sign`): to add a key's signature, or to replace a
/// signature in kiln's old format. The manifest is fetched and checked against its digest
/// first; `timestamp` goes into the payload's `optional` part.
pub fn sign_image(
    reference: &str,
    key: &SigningKey,
    timestamp: u64,
    opts: &StoreOptions,
) -> Result<SignReport, StoreError> {
    let r = Reference::parse(reference)?;
    let target = Target::open(&r, opts, false)?;
    let (bytes, digest, _) = fetch_image(&target, &r)?;
    let signature_digest =
        put_signature(&target, &r, key, &manifest_descriptor(&bytes), timestamp)?;
    Ok(SignReport {
        reference: r.with_digest(&digest),
        manifest_digest: digest,
        signature_digest,
        key: sign::key_id(&key.verifying_key()),
        key_type: key.key_type(),
    })
}

/// Put the kiln image `reference` (pinned to its digest) under `tag` in its repository as
/// well — the same manifest, so its signature and attestations, which name the digest, hold
/// for it: a channel (`kiln promote`). Returns `repo:tag@sha256:…`.
pub fn tag_image(reference: &str, tag: &str, opts: &StoreOptions) -> Result<String, StoreError> {
    let r = Reference::parse(reference)?;
    if r.digest.is_none() {
        return Err(StoreError::Usage {
            what: format!("tag {r}"),
            reason: "give the image by digest (REPO@sha256:…): a tag can move between the \
                     checks and the tagging"
                .into(),
        });
    }
    if !reference::valid_tag(tag) {
        return Err(StoreError::Usage {
            what: format!("tag {r} as {tag:?}"),
            reason: "a tag is [A-Za-z0-9_][A-Za-z0-9._-]{0,127}".into(),
        });
    }
    let target = Target::open(&r, opts, false)?;
    let (bytes, digest, _) = fetch_image(&target, &r)?;
    target.put_manifest(tag, &bytes, ARTIFACT_DISK)?;
    Ok(Reference {
        tag: Some(tag.to_string()),
        ..r
    }
    .with_digest(&digest))
}

/// The kiln image manifest `reference` names, fetched and checked: its bytes, digest, and the
/// reference parsed.
fn fetch_image(
    target: &Target,
    r: &Reference,
) -> Result<(Vec<u8>, Digest256, OciManifest), StoreError> {
    let (bytes, digest, m) = fetch_manifest(target, r, &r.manifest_ref())?;
    if m.artifact_type.as_deref() != Some(ARTIFACT_DISK) {
        return Err(StoreError::NotKilnImage {
            reference: r.to_string(),
            reason: format!("artifactType {:?}", m.artifact_type),
        });
    }
    Ok((bytes, digest, m))
}

/// Attach `statements` (their subject: the image's manifest) to the image `reference`, each
/// in a DSSE envelope signed with `key`, and envelopes `sealed` elsewhere as they are, in the
/// `sha256-<hex>.att` manifest. Returns that manifest's digest.
pub fn attach(
    reference: &str,
    key: &SigningKey,
    statements: &[attest::Statement],
    sealed: &[attest::Sealed],
    opts: &StoreOptions,
) -> Result<Digest256, StoreError> {
    let r = Reference::parse(reference)?;
    let target = Target::open(&r, opts, false)?;
    let (bytes, digest, _) = fetch_image(&target, &r)?;
    if let Some(st) = statements.iter().find(|s| !s.names(&digest)) {
        return Err(StoreError::Usage {
            what: format!("attach a {} attestation to {r}", st.predicate_type),
            reason: format!("its statement is not about manifest {digest}"),
        });
    }
    attest::put_attestations(
        &target,
        &r,
        key,
        &manifest_descriptor(&bytes),
        statements,
        sealed,
    )
}

/// Media type (and `artifactType`) of a plain SPDX JSON document attached to an image.
pub const MEDIA_SPDX: &str = "application/spdx+json";

/// The tag a plain SBOM is stored under: `sha256-<hex>.sbom` (cosign's `attach sbom` scheme).
pub fn sbom_tag(manifest: &Digest256) -> String {
    format!("sha256-{}.sbom", manifest.hex())
}

/// Attach `spdx` (an SPDX JSON document) to the image `reference` as a plain artifact: one
/// [`MEDIA_SPDX`] layer, the image as `subject` (a referrer where the registry has the API),
/// tagged `sha256-<hex>.sbom`. Unsigned: the signed copy is the SBOM attestation. Returns the
/// manifest's digest.
pub fn attach_sbom(
    reference: &str,
    spdx: &[u8],
    opts: &StoreOptions,
) -> Result<Digest256, StoreError> {
    let r = Reference::parse(reference)?;
    let target = Target::open(&r, opts, false)?;
    let (bytes, digest, _) = fetch_image(&target, &r)?;
    let empty = target.put_small_blob(b"{}")?;
    let m = OciManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(MEDIA_SPDX.into()),
        config: Descriptor {
            media_type: MEDIA_EMPTY.into(),
            digest: empty,
            size: 2,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: MEDIA_SPDX.into(),
            digest: target.put_small_blob(spdx)?,
            size: spdx.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }],
        subject: Some(manifest_descriptor(&bytes)),
        annotations: BTreeMap::new(),
    };
    target.put_manifest(&sbom_tag(&digest), &to_json(&m)?, MEDIA_SPDX)
}

/// `artifactType` of a revocation (`kiln revoke`).
pub const ARTIFACT_REVOCATION: &str = "application/vnd.kiln.revocation.v1+json";
/// Annotation of a revocation manifest: why.
pub const ANN_REVOKED_REASON: &str = "dev.kiln.revoked.reason";
/// Annotation of a revocation manifest: who and when.
pub const ANN_REVOKED_BY: &str = "dev.kiln.revoked.by";

/// The tag a revocation is stored under: `sha256-<hex>.revoked`.
pub fn revocation_tag(manifest: &Digest256) -> String {
    format!("sha256-{}.revoked", manifest.hex())
}

/// Revoke the image `reference` (by digest): a manifest with the image as `subject` (a
/// referrer where the registry has the API) and the reason and author as annotations, tagged
/// `sha256-<hex>.revoked`. From then on [`pull`] and [`verify_image`] refuse the digest.
/// Returns the image, by digest.
pub fn revoke_image(
    reference: &str,
    reason: &str,
    by: &str,
    opts: &StoreOptions,
) -> Result<String, StoreError> {
    let r = Reference::parse(reference)?;
    if r.digest.is_none() {
        return Err(StoreError::Usage {
            what: format!("revoke {r}"),
            reason: "give the image by digest (REPO@sha256:…): a tag names whatever it points \
                     at now"
                .into(),
        });
    }
    let target = Target::open(&r, opts, false)?;
    let (bytes, digest, _) = fetch_image(&target, &r)?;
    let empty = target.put_small_blob(b"{}")?;
    let m = OciManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_REVOCATION.into()),
        config: Descriptor {
            media_type: MEDIA_EMPTY.into(),
            digest: empty.clone(),
            size: 2,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: MEDIA_EMPTY.into(),
            digest: empty,
            size: 2,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }],
        subject: Some(manifest_descriptor(&bytes)),
        annotations: BTreeMap::from([
            (ANN_REVOKED_REASON.to_string(), reason.to_string()),
            (ANN_REVOKED_BY.to_string(), by.to_string()),
        ]),
    };
    target.put_manifest(&revocation_tag(&digest), &to_json(&m)?, ARTIFACT_REVOCATION)?;
    Ok(r.with_digest(&digest))
}

/// The reason stored with the revocation of the image `reference` (by digest) in its
/// registry or layout; `None` when it is not revoked.
pub fn revocation(reference: &str, opts: &StoreOptions) -> Result<Option<String>, StoreError> {
    let r = Reference::parse(reference)?;
    let Some(digest) = r.digest.clone() else {
        return Err(StoreError::Usage {
            what: format!("look up the revocation of {r}"),
            reason: "give the image by digest".into(),
        });
    };
    let target = Target::open(&r, opts, false)?;
    match check_revoked(&target, &r, &digest) {
        Ok(()) => Ok(None),
        Err(StoreError::Revoked { reason, .. }) => Ok(Some(reason)),
        Err(e) => Err(e),
    }
}

/// Refuse `digest` when a revocation is stored for it in `target`.
fn check_revoked(target: &Target, r: &Reference, digest: &Digest256) -> Result<(), StoreError> {
    let tag = revocation_tag(digest);
    let Some(found) = target.get_manifest(&tag)? else {
        return Ok(());
    };
    let reason = serde_json::from_slice::<OciManifest>(&found.bytes)
        .ok()
        .and_then(|m| m.annotations.get(ANN_REVOKED_REASON).cloned())
        .unwrap_or_else(|| "no reason given".into());
    Err(StoreError::Revoked {
        reference: r.with_digest(digest),
        reason,
        tag,
    })
}

/// The name a Statement gives the image published at `reference`: its repository, as the
/// signature's `docker-reference`.
pub fn subject_name(reference: &str) -> Result<String, StoreError> {
    Ok(docker_reference(&Reference::parse(reference)?))
}

/// What `kiln verify` can require of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Requirement {
    /// A signature by the trusted key (cosign's format).
    Signature,
    /// An SPDX SBOM attestation signed by the trusted key.
    Sbom,
    /// A SLSA provenance v1 attestation signed by the trusted key.
    Provenance,
    /// A boot attestation of the image's disk, every boot passed, signed by a trusted verifier
    /// key.
    Boot,
}

impl Requirement {
    pub const ALL: [Requirement; 4] = [
        Requirement::Signature,
        Requirement::Sbom,
        Requirement::Provenance,
        Requirement::Boot,
    ];

    fn predicate_type(self) -> Option<&'static str> {
        match self {
            Requirement::Signature => None,
            Requirement::Sbom => Some(attest::PREDICATE_SPDX),
            Requirement::Provenance => Some(attest::PREDICATE_SLSA_V1),
            Requirement::Boot => Some(attest::PREDICATE_BOOT),
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Requirement::Signature => "signature",
            Requirement::Sbom => "sbom",
            Requirement::Provenance => "provenance",
            Requirement::Boot => "boot",
        })
    }
}

/// One thing `kiln verify` looked at.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub what: Requirement,
    /// `verified`, `missing`, `unverified` (there, but not validly signed by the key) or
    /// `refused` (signed, but wrong: another manifest, another repository, a conflict).
    pub status: &'static str,
    /// What was found, or why it failed.
    pub detail: String,
    pub required: bool,
}

/// What `kiln verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub reference: String,
    pub manifest_digest: Digest256,
    pub key: Digest256,
    pub checks: Vec<Check>,
    /// Every required check verified.
    pub ok: bool,
    /// The verified SBOM document (for `kiln sbom`), not printed with the report.
    #[serde(skip)]
    pub sbom: Option<serde_json::Value>,
}

/// Check the image `reference` with `key`: its signature, and its SBOM and provenance
/// attestations; and with `verifiers` its boot attestation. Everything is looked at; `require`
/// says what must hold for `ok`.
pub fn verify_image(
    reference: &str,
    key: &VerifyingKey,
    verifiers: &[VerifyingKey],
    require: &[Requirement],
    opts: &StoreOptions,
) -> Result<VerifyReport, StoreError> {
    let r = Reference::parse(reference)?;
    let target = Target::open(&r, opts, false)?;
    let (_, digest, m) = fetch_image(&target, &r)?;
    check_revoked(&target, &r, &digest)?;
    let disk = m.layers.first().map(|l| l.digest.clone());
    let mut checks = Vec::new();
    let mut sbom = None;
    for what in Requirement::ALL {
        let (status, detail) = match what.predicate_type() {
            None => match check_signature(&target, &r, &digest, Some(key), &opts.signed_for) {
                Ok(SignatureCheck::Verified { key_type, .. }) => (
                    "verified",
                    format!("cosign signature by the {key_type} key"),
                ),
                Ok(s) => ("unverified", s.to_string()),
                Err(StoreError::Unsigned { .. }) => ("missing", "no signature".to_string()),
                Err(e @ StoreError::BadSignature { .. }) => ("unverified", e.to_string()),
                Err(
                    e @ (StoreError::ManifestChanged { .. }
                    | StoreError::OtherRepository { .. }
                    | StoreError::OldSignatureFormat { .. }),
                ) => ("refused", e.to_string()),
                Err(e) => return Err(e),
            },
            Some(_) if what == Requirement::Boot && verifiers.is_empty() => (
                "unverified",
                "no verifier key given to check boot attestations with".to_string(),
            ),
            Some(predicate_type) => {
                let (subject, keys) = match what {
                    Requirement::Boot => (disk.as_ref().unwrap_or(&digest), verifiers),
                    _ => (&digest, std::slice::from_ref(key)),
                };
                match attest::attested(&target, &r, &digest, subject, keys, predicate_type) {
                    Ok(attest::Attested::One(st)) if what == Requirement::Boot => {
                        match boot_failure(&st.predicate) {
                            None => ("verified", summary(what, &st.predicate)),
                            Some(why) => ("refused", why),
                        }
                    }
                    Ok(attest::Attested::One(st)) => {
                        let detail = summary(what, &st.predicate);
                        if what == Requirement::Sbom {
                            sbom = Some(st.predicate);
                        }
                        ("verified", detail)
                    }
                    Ok(attest::Attested::Missing) => {
                        ("missing", format!("no {predicate_type} attestation"))
                    }
                    Ok(attest::Attested::Unverified { layers }) => (
                        "unverified",
                        format!(
                            "{layers} {predicate_type} attestation(s), none validly signed by \
                             the trusted key"
                        ),
                    ),
                    // A registry that serves a bad envelope fails this check, not the others.
                    Err(
                        e @ (StoreError::AttestationSubject { .. }
                        | StoreError::ConflictingAttestations { .. }
                        | StoreError::Malformed { .. }
                        | StoreError::SizeMismatch { .. }
                        | StoreError::DigestMismatch { .. }),
                    ) => ("refused", e.to_string()),
                    Err(e) => return Err(e),
                }
            }
        };
        checks.push(Check {
            what,
            status,
            detail,
            required: require.contains(&what),
        });
    }
    let ok = checks.iter().all(|c| !c.required || c.status == "verified");
    Ok(VerifyReport {
        reference: r.with_digest(&digest),
        manifest_digest: digest,
        key: sign::key_id(key),
        checks,
        ok,
        sbom,
    })
}

/// One line about a verified predicate.
fn summary(what: Requirement, predicate: &serde_json::Value) -> String {
    match what {
        Requirement::Sbom => {
            let packages = predicate["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    p["SPDXID"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("SPDXRef-deb-"))
                })
                .count();
            let files = predicate["files"].as_array().map_or(0, Vec::len);
            format!(
                "SPDX {}: {packages} Debian package(s), {files} file(s) kiln wrote",
                predicate["spdxVersion"].as_str().unwrap_or("?"),
            )
        }
        Requirement::Provenance => format!(
            "built by {} ({}), {} resolved dependencies",
            predicate["runDetails"]["builder"]["id"]
                .as_str()
                .unwrap_or("?"),
            predicate["buildDefinition"]["buildType"]
                .as_str()
                .unwrap_or("?"),
            predicate["buildDefinition"]["resolvedDependencies"]
                .as_array()
                .map_or(0, Vec::len)
        ),
        Requirement::Boot => {
            let boots: Vec<String> = predicate["boots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{} ({}, {:.1} s to the marker)",
                        b["profile"].as_str().unwrap_or("?"),
                        b["accelerator"].as_str().unwrap_or("?"),
                        b["timeToMarker"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            format!(
                "booted to {:?} by {}: {}",
                predicate["marker"].as_str().unwrap_or(""),
                predicate["verifier"]["id"].as_str().unwrap_or("?"),
                boots.join(", ")
            )
        }
        Requirement::Signature => String::new(),
    }
}

/// Why a signed boot attestation does not vouch for the image: no boot, or one that did not
/// pass, or no marker.
fn boot_failure(predicate: &serde_json::Value) -> Option<String> {
    let boots = predicate["boots"].as_array().filter(|b| !b.is_empty());
    let Some(boots) = boots else {
        return Some("the boot attestation lists no boot".into());
    };
    if predicate["marker"].as_str().is_none_or(str::is_empty) {
        return Some("the boot attestation names no marker".into());
    }
    boots
        .iter()
        .find(|b| b["result"] != "passed")
        .map(|b| format!("the {} boot did not pass", b["profile"]))
}

/// Fetch and check a manifest: its bytes must hash to the digest asked for (if any) and to the
/// registry's `Docker-Content-Digest` (if sent).
fn fetch_manifest(
    target: &Target,
    r: &Reference,
    reference: &str,
) -> Result<(Vec<u8>, Digest256, OciManifest), StoreError> {
    let FetchedManifest {
        bytes,
        digest: claimed,
        ..
    } = target
        .get_manifest(reference)?
        .ok_or_else(|| StoreError::NotFound {
            what: format!("manifest {reference}"),
            reference: r.to_string(),
        })?;
    let digest = Digest256::of(&bytes);
    let expected = match Digest256::parse(reference) {
        Some(d) => Some(d),
        None => claimed.as_deref().and_then(Digest256::parse),
    };
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(StoreError::DigestMismatch {
            what: format!("manifest {reference} of {r}"),
            expected,
            actual: digest,
        });
    }
    let m: OciManifest = serde_json::from_slice(&bytes).map_err(|e| StoreError::Malformed {
        what: format!("manifest {reference}"),
        reference: r.to_string(),
        reason: e.to_string(),
    })?;
    if m.schema_version != 2 || m.media_type.as_deref().is_some_and(|t| t != OCI_MANIFEST) {
        return Err(StoreError::Malformed {
            what: format!("manifest {reference}"),
            reference: r.to_string(),
            reason: format!(
                "schemaVersion {} mediaType {:?}; expected 2 and {OCI_MANIFEST}",
                m.schema_version, m.media_type
            ),
        });
    }
    Ok((bytes, digest, m))
}

/// The manifests attached to the image manifest `digest`: those the referrers API lists with
/// `artifact_type` (where the registry has it), and the one tagged `tag`; each once.
fn attached_manifests(
    target: &Target,
    r: &Reference,
    digest: &Digest256,
    artifact_type: &str,
    tag: &str,
) -> Result<Vec<OciManifest>, StoreError> {
    let mut refs: Vec<String> = Vec::new();
    if let Target::Registry { reg, repo } = target
        && let Some(list) = reg.referrers(repo, digest, artifact_type)?
    {
        refs.extend(list.into_iter().map(|d| d.digest.to_string()));
    }
    refs.push(tag.to_string());
    let mut out: Vec<OciManifest> = Vec::new();
    for reference in refs {
        match fetch_manifest(target, r, &reference) {
            Ok((_, _, m)) if !out.contains(&m) => out.push(m),
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The signature manifests for an image manifest (kiln's old format included, so that it can
/// be named).
fn find_signatures(
    target: &Target,
    r: &Reference,
    digest: &Digest256,
) -> Result<Vec<OciManifest>, StoreError> {
    let mut out = attached_manifests(
        target,
        r,
        digest,
        ARTIFACT_SIGNATURE,
        &signature_tag(digest),
    )?;
    out.retain(|m| {
        let kind = m.artifact_type.as_deref();
        kind == Some(ARTIFACT_SIGNATURE)
            || kind == Some(ARTIFACT_OLD_SIGNATURE)
            || m.layers
                .iter()
                .any(|l| l.media_type == MEDIA_SIMPLE_SIGNING)
    });
    Ok(out)
}

/// Check an image's signatures against `trust`: a signature counts when the trusted key made
/// it over its payload, the payload names this manifest, and it names this repository (or
/// one in `signed_for`). Without a key: report how many signatures are there.
fn check_signature(
    target: &Target,
    r: &Reference,
    digest: &Digest256,
    trust: Option<&VerifyingKey>,
    signed_for: &[String],
) -> Result<SignatureCheck, StoreError> {
    use base64::Engine as _;
    let manifests = find_signatures(target, r, digest)?;
    let malformed = |reason: String| StoreError::Malformed {
        what: format!("signature for {digest}"),
        reference: r.to_string(),
        reason,
    };
    let layers: Vec<&Descriptor> = manifests
        .iter()
        .flat_map(|m| &m.layers)
        .filter(|l| l.media_type == MEDIA_SIMPLE_SIGNING)
        .collect();
    if layers.len() > MAX_SIGNATURES {
        return Err(malformed(format!(
            "{} signatures; at most {MAX_SIGNATURES} are read",
            layers.len()
        )));
    }
    let old_format = manifests
        .iter()
        .any(|m| m.artifact_type.as_deref() == Some(ARTIFACT_OLD_SIGNATURE));
    let Some(trust) = trust else {
        return Ok(match layers.len() {
            0 if old_format => SignatureCheck::OldFormat,
            0 => SignatureCheck::Missing,
            n => SignatureCheck::Unchecked { signatures: n },
        });
    };
    let key = sign::key_id(trust);
    let mut first_error: Option<StoreError> = None;
    for layer in &layers {
        let Some(signature) = layer
            .annotations
            .get(ANN_COSIGN_SIGNATURE)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        else {
            first_error.get_or_insert(malformed(format!(
                "layer {} has no base64 {ANN_COSIGN_SIGNATURE} annotation",
                layer.digest
            )));
            continue;
        };
        let payload = target.small_blob(layer, "signature payload")?;
        if !trust.verify(&payload, &signature) {
            continue;
        }
        // Signed by the trusted key: from here on, what it says is what the key holder meant.
        let p: sign::SimpleSigning = serde_json::from_slice(&payload)
            .map_err(|e| malformed(format!("payload {}: {e}", layer.digest)))?;
        if p.critical.kind != sign::PAYLOAD_TYPE {
            return Err(malformed(format!("payload type {:?}", p.critical.kind)));
        }
        if &p.critical.image.docker_manifest_digest != digest {
            first_error.get_or_insert(StoreError::ManifestChanged {
                reference: r.to_string(),
                signed: p.critical.image.docker_manifest_digest,
                actual: digest.clone(),
            });
            continue;
        }
        let signed = p.critical.identity.docker_reference;
        let here = docker_reference(r);
        let accepted = repository_of(&signed) == repository_of(&here)
            || signed_for
                .iter()
                .any(|s| s == &signed || s.as_str() == repository_of(&signed));
        if !accepted {
            first_error.get_or_insert(StoreError::OtherRepository {
                reference: r.to_string(),
                signed_for: signed,
                here,
            });
            continue;
        }
        return Ok(SignatureCheck::Verified {
            key,
            key_type: trust.key_type(),
        });
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if layers.is_empty() {
        return Err(if old_format {
            StoreError::OldSignatureFormat {
                reference: r.to_string(),
            }
        } else {
            StoreError::Unsigned {
                reference: r.to_string(),
                digest: digest.clone(),
            }
        });
    }
    Err(StoreError::BadSignature {
        reference: r.to_string(),
        digest: digest.clone(),
        count: layers.len(),
        trusted: key,
    })
}

/// `OUT.partial`.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Pull an image to `out`. Verifies the manifest digest, the signature when `trust` is given
/// (refusing unsigned images), and the disk's sha256. Downloads into `OUT.partial` and resumes
/// from it with a Range request after an interruption; `out` appears only when complete.
pub fn pull(
    reference: &str,
    out: &Path,
    trust: Option<&VerifyingKey>,
    opts: &StoreOptions,
) -> Result<PullReport, StoreError> {
    pull_seeded(reference, out, trust, &[], opts)
}

/// [`pull`], rebuilding the disk from the chunks of `seeds` (images already here) and fetching
/// only the other chunks when the image has a chunk index ([`chunks`]); without seeds or an
/// index, the whole layer is downloaded.
pub fn pull_seeded(
    reference: &str,
    out: &Path,
    trust: Option<&VerifyingKey>,
    seeds: &[PathBuf],
    opts: &StoreOptions,
) -> Result<PullReport, StoreError> {
    let start = Instant::now();
    let r = Reference::parse(reference)?;
    let target = Target::open(&r, opts, false)?;
    let (_, manifest_digest, m) = fetch_manifest(&target, &r, &r.manifest_ref())?;
    check_revoked(&target, &r, &manifest_digest)?;
    let not_kiln = |reason: String| StoreError::NotKilnImage {
        reference: r.to_string(),
        reason,
    };
    if m.artifact_type.as_deref() != Some(ARTIFACT_DISK) && m.config.media_type != MEDIA_CONFIG {
        return Err(not_kiln(format!(
            "artifactType {:?}, config {}",
            m.artifact_type, m.config.media_type
        )));
    }
    let layer = match m.layers.as_slice() {
        [l] if l.media_type == MEDIA_DISK_QCOW2 || l.media_type == MEDIA_DISK_RAW => l.clone(),
        _ => return Err(not_kiln("expected exactly one disk layer".into())),
    };
    let signature = check_signature(&target, &r, &manifest_digest, trust, &opts.signed_for)?;
    match &signature {
        SignatureCheck::Missing => {
            tracing::warn!(reference = %r, "image is not signed; only digests were checked")
        }
        SignatureCheck::Unchecked { signatures } => tracing::warn!(
            reference = %r, signatures,
            "image is signed but no trusted key was given; signature not checked"
        ),
        SignatureCheck::OldFormat => tracing::warn!(
            reference = %r,
            "image is signed only in kiln's old format, which `kiln pull --trust` and agents \
             refuse; re-sign it with `kiln sign`"
        ),
        SignatureCheck::Verified { .. } => {}
    }
    let config_bytes = target.small_blob(&m.config, "image config")?;
    let format = serde_json::from_slice::<ImageConfig>(&config_bytes)
        .map(|c| c.format)
        .unwrap_or_else(|_| {
            layer
                .media_type
                .rsplit('.')
                .next()
                .unwrap_or("raw")
                .to_string()
        });
    let index = match seeds.is_empty() {
        true => None,
        false => {
            let index = chunks::fetch_index(&target, &r, &manifest_digest, &layer)?;
            if index.is_none() {
                tracing::warn!(reference = %r, "the image has no chunk index; pulling the whole disk");
            }
            index
        }
    };
    let (transferred, resumed_from, delta) = match index {
        Some(index) => {
            let d = chunks::assemble(&target, &index, seeds, &partial_path(out), out)?;
            (d.fetched_bytes, d.resumed_bytes, Some(d))
        }
        None => {
            let (t, k) = download(&target, &layer, out)?;
            (t, k, None)
        }
    };
    Ok(PullReport {
        reference: r.with_digest(&manifest_digest),
        manifest_digest,
        layer_digest: layer.digest,
        format,
        signature,
        annotations: m.annotations,
        bytes: layer.size,
        transferred,
        resumed_from,
        delta,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Download a blob into `OUT.partial` (resuming), verify, rename to `out`.
/// Returns (bytes transferred, bytes kept from a previous attempt). Never writes more than the
/// descriptor's size, and refuses to start when the destination lacks the space for it.
fn download(target: &Target, layer: &Descriptor, out: &Path) -> Result<(u64, u64), StoreError> {
    let partial = partial_path(out);
    let what = format!("disk blob {}", layer.digest);
    // What a previous attempt left is reused (if it is not longer than the blob).
    let kept = fs::metadata(&partial)
        .map(|m| m.len())
        .ok()
        .filter(|&n| n <= layer.size)
        .unwrap_or(0);
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let needed = layer.size - kept;
    match free_space(&dir) {
        Ok(available) if available < needed => {
            return Err(StoreError::NoSpace {
                what: format!("pulling {what}"),
                dir,
                needed,
                available,
            });
        }
        Ok(_) => {}
        // Unknown (an unusual filesystem): the write itself reports a full disk.
        Err(e) => tracing::debug!(dir = %dir.display(), "statvfs failed: {e}"),
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .map_err(|e| io_err("open", &partial, e))?;
    let mut have = file
        .metadata()
        .map_err(|e| io_err("stat", &partial, e))?
        .len();
    if have > layer.size {
        have = 0;
    }
    // Hash what is already there.
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = have;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = registry::read_full(&mut file, &mut buf[..want])
            .map_err(|e| io_err("read", &partial, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut transferred = 0u64;
    let mut resumed_from = have;
    if have < layer.size {
        let Fetched {
            mut body,
            start: begin,
            announced,
        } = target.get_blob(&layer.digest, have)?;
        if begin != have {
            // The server ignored the Range: start over.
            hasher = Sha256::new();
            resumed_from = 0;
            have = 0;
        }
        if announced.is_some_and(|n| begin.saturating_add(n) > layer.size) {
            // Refused before a byte is written.
            return break_too_long(&partial, layer, &what);
        }
        file.set_len(have)
            .map_err(|e| io_err("truncate", &partial, e))?;
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(have))
            .map_err(|e| io_err("seek in", &partial, e))?;
        let mut flushed = have;
        let hashing = HashThread::start(hasher);
        loop {
            // Whole buffers: one write and one hash update per MiB, not per network chunk.
            let mut buf = hashing.buffer();
            // Never more than the blob has left, plus one byte to notice a longer answer.
            let want = (layer.size - have).saturating_add(1).min(buf.len() as u64) as usize;
            let n = match registry::read_full(&mut body, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // Keep what was received for the next attempt to resume from.
                    let _ = file.sync_data();
                    let resume = format!(
                        "; {have} bytes kept in {}, run the pull again to resume",
                        partial.display()
                    );
                    return Err(match target.read_error(&what, &layer.digest, &e) {
                        StoreError::Stalled { what, seconds, .. } => StoreError::Stalled {
                            what,
                            seconds,
                            kept: resume,
                        },
                        _ => StoreError::Http {
                            method: "GET".into(),
                            url: target.blob_source(&layer.digest),
                            reason: format!("transfer broke off after {have} bytes ({e}){resume}"),
                        },
                    });
                }
            };
            if have + n as u64 > layer.size {
                return break_too_long(&partial, layer, &what);
            }
            file.write_all(&buf[..n])
                .map_err(|e| io_err("write", &partial, e))?;
            hashing.update(buf, n);
            have += n as u64;
            transferred += n as u64;
            if have - flushed >= WRITE_BEHIND {
                start_writeback(&file, flushed, have - flushed);
                flushed = have;
            }
        }
        hasher = hashing.finish();
    }
    if have != layer.size {
        return Err(StoreError::Http {
            method: "GET".into(),
            url: target.blob_source(&layer.digest),
            reason: format!(
                "transfer ended after {have} of {} bytes; kept in {}, run the pull again to resume",
                layer.size,
                partial.display()
            ),
        });
    }
    let actual = Digest256::from_sha256(&hasher.finalize());
    if actual != layer.digest {
        let _ = fs::remove_file(&partial);
        return Err(StoreError::DigestMismatch {
            what: format!("disk blob (downloaded to {})", partial.display()),
            expected: layer.digest.clone(),
            actual,
        });
    }
    file.sync_all().map_err(|e| io_err("sync", &partial, e))?;
    drop(file);
    fs::rename(&partial, out).map_err(|e| io_err("rename into place", out, e))?;
    Ok((transferred, resumed_from))
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`.
fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in the path"))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated and lives
    // through the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// SHA-256 on a thread of its own, so that hashing a download overlaps receiving and writing
/// it. Buffers go to the thread and come back for reuse; at most a few are in flight.
struct HashThread {
    to_hash: Option<std::sync::mpsc::SyncSender<(Vec<u8>, usize)>>,
    returned: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<Sha256>>,
}

impl HashThread {
    const BUFFER: usize = 1 << 20;

    fn start(mut hasher: Sha256) -> HashThread {
        let (to_hash, rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(3);
        let (back, returned) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for (buf, n) in rx {
                hasher.update(&buf[..n]);
                let _ = back.send(buf);
            }
            hasher
        });
        HashThread {
            to_hash: Some(to_hash),
            returned,
            thread: Some(thread),
        }
    }

    /// A buffer to fill: one the thread is done with, else a new one.
    fn buffer(&self) -> Vec<u8> {
        self.returned
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; Self::BUFFER])
    }

    /// Hash the first `n` bytes of `buf` (after everything sent before).
    fn update(&self, buf: Vec<u8>, n: usize) {
        if let Some(tx) = &self.to_hash {
            // The thread only stops when this sender is gone.
            let _ = tx.send((buf, n));
        }
    }

    /// The hasher, having taken in everything sent.
    fn finish(mut self) -> Sha256 {
        self.to_hash = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(h)) => h,
            // The thread cannot panic short of running out of memory; hashing nothing then
            // makes the digest check fail, which is the safe outcome.
            _ => Sha256::new(),
        }
    }
}

/// Bytes written between two write-behind kicks during a download.
const WRITE_BEHIND: u64 = 16 << 20;

/// Start writing `len` bytes at `offset` of `file` back to disk without waiting, so that the
/// final `sync_all` of a large download finds little left to flush. Advisory: errors are
/// ignored (the final sync reports real ones).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is open for the call.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn break_too_long<T>(partial: &Path, layer: &Descriptor, what: &str) -> Result<T, StoreError> {
    let _ = fs::remove_file(partial);
    Err(StoreError::Oversized {
        what: what.to_string(),
        limit: layer.size,
        partial: partial.to_path_buf(),
    })
}

/// List images: `host:port` (every repository in the catalog), `host:port/repo` or `oci:/dir`.
/// Signature tags (`sha256-….sig`) are not listed; `signed` says whether one exists.
pub fn images(target: &str, opts: &StoreOptions) -> Result<Vec<ImageInfo>, StoreError> {
    let repos: Vec<(Reference, Option<String>)> = if !target.starts_with("oci:")
        && !target.contains('/')
    {
        let reg =
            Registry::with_stall_timeout(target, opts.insecure, opts.credentials(), opts.stall())?;
        reg.catalog()?
            .into_iter()
            .map(|repo| Reference::parse(&format!("{target}/{repo}")).map(|r| (r, Some(repo))))
            .collect::<Result<_, _>>()?
    } else {
        let r = Reference::parse(target)?;
        let name = match &r.location {
            Location::Registry { repository, .. } => Some(repository.clone()),
            Location::Layout { .. } => None,
        };
        vec![(r, name)]
    };
    let mut out = Vec::new();
    for (r, name) in repos {
        let t = Target::open(&r, opts, false)?;
        let tags = t.tags()?;
        let repository = name.unwrap_or_else(|| r.to_string());
        for tag in tags.iter().filter(|t| !is_attached_tag(t)) {
            let Some(FetchedManifest { bytes, .. }) = t.get_manifest(tag)? else {
                continue;
            };
            let digest = Digest256::of(&bytes);
            let m: Option<OciManifest> = serde_json::from_slice(&bytes).ok();
            let layer = m.as_ref().and_then(|m| match m.layers.as_slice() {
                [l] if l.media_type == MEDIA_DISK_QCOW2 || l.media_type == MEDIA_DISK_RAW => {
                    Some(l.clone())
                }
                _ => None,
            });
            out.push(ImageInfo {
                repository: repository.clone(),
                tag: tag.clone(),
                size: layer.as_ref().map_or(0, |l| l.size),
                format: layer
                    .as_ref()
                    .and_then(|l| l.media_type.rsplit('.').next().map(str::to_string)),
                created: m
                    .as_ref()
                    .and_then(|m| m.annotations.get(ANN_CREATED).cloned()),
                signed: tags.contains(&signature_tag(&digest)),
                manifest_digest: digest,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_tags() {
        let d = Digest256::of(b"x");
        let t = signature_tag(&d);
        assert!(is_attached_tag(&t));
        assert!(is_attached_tag(&attest::attestation_tag(&d)));
        assert!(is_attached_tag(&sbom_tag(&d)));
        assert!(!is_attached_tag("latest"));
        assert!(!is_attached_tag("sha256-abc.att"));
        assert!(reference::valid_tag(&t));
    }
}
