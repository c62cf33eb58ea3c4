//! The publish stage on NATS: after `verify` completed, push the verified disk to the image store
//! (an OCI registry or an OCI layout directory, see [`crate::store`]), sign it, and announce it on
//! `kiln.image.published.<repository>` for the agents.
//!
//! Where to: the worker's [`PublishTarget`] (`--publish-to REGISTRY|oci:DIR`) and the recipe's
//! `publish: {repository, tags}`. The repository is a path in the target registry; a leading
//! registry host written in the recipe (`registry.example:5000/team/web`) is replaced by the
//! worker's target, so one recipe publishes wherever its workers are configured to. For an OCI
//! layout the directory is the repository. Without `publish:` in the recipe, or without a target
//! on the worker, the stage completes with `{"skipped": "<why>"}` in its outputs.
//!
//! With a signing key it also attaches, as signed in-toto attestations (`sha256-<hex>.att`), the
//! image's SBOM (SPDX 2.3, [`crate::sbom`]) and its SLSA provenance ([`crate::provenance`]).
//!
//! Redelivery is cheap and harmless: the manifest bytes, the signature and the attestations are
//! deterministic (same disk, recipe and SOURCE_DATE_EPOCH → same digests), and the store skips
//! a blob the registry already has, so a second run pushes no disk bytes (`uploaded: 0`).

use super::verify::{VERIFIED, VerifiedBoot, verified_key};
use super::{Artifacts, Handover, Need, StageEnv, StageError, StageRun, StageWork};
use crate::bus::{self, CacheStatus, EventTime, ImagePublished, VERSION};
use crate::digest::Digest256;
use crate::pipeline::records::StageRecords;
use crate::store::attest::{self, Statement};
use crate::store::{self, PublishMeta, StoreError, StoreOptions};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct PublishStage;

/// Where a worker publishes verified images.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    /// `host:port` of a registry, or `oci:/dir` for an OCI image layout directory.
    pub to: String,
    /// The ed25519 signing key (`kiln keygen`); without one images are pushed unsigned.
    pub key: Option<PathBuf>,
    /// Credentials and plain-http choice for the registry.
    pub store: StoreOptions,
}

/// What the publish stage did.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PublishOut {
    /// Nothing to do, and why.
    Skipped { skipped: String },
    /// Pushed (and signed when the worker has a key).
    Pushed(Box<Pushed>),
}

/// A pushed image.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest: Digest256,
    pub layer: Digest256,
    pub signature: Option<Digest256>,
    pub tags: Vec<String>,
    pub bytes: u64,
    /// Bytes uploaded (0 when the registry had the disk already).
    pub uploaded: u64,
    /// The disk's chunk index for delta pulls: how many chunks, the bytes in the images the tags
    /// pointed at, the new bytes.
    pub chunks: crate::store::chunks::ChunkReport,
    pub seconds: f64,
    /// The `sha256-<hex>.att` manifest holding the signed SBOM and provenance (when signed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestations: Option<Digest256>,
    /// Seconds spent making, signing and pushing the attestations (`seconds` is the image's).
    pub attestation_seconds: f64,
    /// Packages the SBOM lists (`None`: no SBOM, see `sbom_skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sbom_packages: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sbom_skipped: Option<String>,
    /// The announcement for the agents.
    #[serde(skip)]
    pub message: Box<ImagePublished>,
}

impl StageWork for PublishStage {
    const STAGE: bus::Stage = bus::Stage::Publish;
    type Output = PublishOut;

    fn needs(env: &StageEnv, h: &Handover) -> Vec<Need> {
        match &h.build {
            Some(b) if publishes(env, b) => b
                .disk
                .iter()
                .map(|d| d.image.clone())
                .chain(b.boot_attestation.clone())
                .chain(b.rootfs.as_ref().and_then(|r| r.installed.clone()))
                .map(Need::Blob)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<PublishOut, StageError> {
        let build = h.artifacts()?;
        let id = h.request.id.clone().unwrap_or_default();
        let disk = if publishes(run.env, build) {
            check_verified(run.records, build)?;
            // The bytes to sign and push are checked against their digest now.
            let image = &build.disk()?.image;
            super::intact(run.env, image)?;
            run.env.blobs.path(image)
        } else {
            PathBuf::new()
        };
        let suite = suite_of(run.env, build);
        // The verify stage's signed boot attestation, as it is.
        let boot_attestation = match build.boot_attestation.as_ref() {
            Some(d) if publishes(run.env, build) => {
                let path = run.env.blobs.path(d);
                Some(std::fs::read(&path).map_err(super::io(format!(
                    "reading the boot attestation {}",
                    path.display()
                )))?)
            }
            _ => None,
        };
        let origin = Origin {
            request: &h.request,
            commit: h.commit.as_deref(),
            mirror: &run.env.archive.mirror,
            suite: &suite,
            boot_attestation,
        };
        let out = publish_build(run.env, &id, build, &origin, &disk)?;
        // A redelivered message pushes nothing: the registry had it all.
        if let PublishOut::Pushed(p) = &out
            && p.uploaded == 0
        {
            run.set_cache(CacheStatus::Hit);
        }
        Ok(out)
    }

    fn apply(_h: &mut Handover, _out: &PublishOut) {}

    fn announcement(out: &PublishOut) -> Option<Box<ImagePublished>> {
        match out {
            PublishOut::Pushed(p) => Some(p.message.clone()),
            PublishOut::Skipped { .. } => None,
        }
    }
}

/// Whether this build's disk is to be pushed: the recipe says where and this host has a target.
fn publishes(env: &StageEnv, build: &Artifacts) -> bool {
    build.loaded.recipe.publish.is_some() && env.publish.is_some()
}

/// Every boot the build reports must be one the verify stage recorded itself: this image, this
/// recipe's marker, this profile.
fn check_verified(records: &dyn StageRecords, build: &Artifacts) -> Result<(), StageError> {
    let disk = build.disk()?;
    let expect = &build.loaded.recipe.verify.expect;
    for boot in &build.boots {
        let key = verified_key(&disk.image, expect, &boot.profile);
        let recorded = records
            .get(VERIFIED, &key)
            .and_then(|r| serde_json::from_value::<VerifiedBoot>(r).ok())
            .is_some_and(|r| r.image == disk.image);
        if !recorded {
            return Err(StageError::NotVerified {
                profile: boot.profile.clone(),
                image: disk.image.clone(),
            });
        }
    }
    Ok(())
}

/// The repository path in the target: the recipe's repository without a leading registry host.
pub fn repository_path(repository: &str) -> &str {
    match repository.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => repository,
    }
}

/// `(reference to publish to, repository as announced)` for `target` and the recipe's
/// repository and first tag.
pub fn publish_reference(target: &str, repository: &str, tag: &str) -> (String, String) {
    if let Some(dir) = target.strip_prefix("oci:") {
        let repo = format!("oci:{dir}");
        (format!("{repo}:{tag}"), repo)
    } else {
        let repo = format!(
            "{}/{}",
            target.trim_end_matches('/'),
            repository_path(repository)
        );
        (format!("{repo}:{tag}"), repo)
    }
}

/// The annotations and boot report a published image carries.
fn meta(build: &Artifacts, commit: Option<&str>, extra_tags: Vec<String>) -> PublishMeta {
    let recipe = &build.loaded.recipe;
    let boots: Vec<Value> = build
        .boots
        .iter()
        .map(|b| {
            json!({
                "profile": b.profile, "accel": b.accel,
                "time_to_marker": b.time_to_marker, "marker_line": b.marker_line,
            })
        })
        .collect();
    let deploy = recipe.deploy.clone().unwrap_or_default();
    let deploy = json!({
        "health_serial": deploy.health_serial,
        "health_port": deploy.health_port,
        "health_timeout": deploy.health_timeout,
        "memory_mib": deploy.memory_mib,
        "cpus": deploy.cpus,
        "verify_marker": recipe.verify.expect,
        "application": recipe.name,
    });
    let format = build.disk.as_ref().map(|d| d.format.as_str()).unwrap_or("");
    let version = recipe.version.clone().unwrap_or_default();
    let title = if version.is_empty() {
        format!("{}.{format}", recipe.name)
    } else {
        format!("{}-{version}.{format}", recipe.name)
    };
    PublishMeta {
        recipe: recipe.name.clone(),
        recipe_digest: Some(build.loaded.inputs.to_string()),
        git_commit: commit.map(str::to_string),
        boot_report: Some(json!({ "boots": boots }).to_string()),
        source_date_epoch: u64::try_from(build.loaded.source_date_epoch).unwrap_or(0),
        extra_tags,
        title: Some(title),
        format: None,
        annotations: BTreeMap::from([(store::ANN_DEPLOY.to_string(), deploy.to_string())]),
    }
}

/// Where a build came from: what its provenance names.
pub struct Origin<'a> {
    pub request: &'a bus::BuildRequest,
    /// The git commit of a git recipe.
    pub commit: Option<&'a str>,
    /// The Debian mirror and suite its packages came from.
    pub mirror: &'a str,
    pub suite: &'a str,
    /// The verify stage's boot attestation (a DSSE envelope's bytes), attached as it is.
    pub boot_attestation: Option<Vec<u8>>,
}

/// A Debian image's installed packages, as the rootfs stage recorded them (matched in the
/// verified index). `Err`: why there is no list.
fn installed_packages(
    env: &StageEnv,
    build: &Artifacts,
) -> Result<Vec<crate::sbom::SbomPackage>, String> {
    let list = build
        .rootfs
        .as_ref()
        .and_then(|r| r.installed.as_ref())
        .ok_or("the rootfs stage recorded no installed packages for the image")?;
    let path = env.blobs.path(list);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("cannot read the installed packages {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("the installed packages {}: {e}", path.display()))
}

/// The Debian suite a build's packages came from.
pub fn suite_of(env: &StageEnv, build: &Artifacts) -> String {
    build
        .loaded
        .recipe
        .rootfs
        .suite
        .clone()
        .unwrap_or_else(|| env.archive.suite.clone())
}

/// The build's SBOM (SPDX 2.3) and how many packages it lists. `Err`: why there is none.
/// Published with the image, and written beside the image `kiln build` delivers.
pub fn sbom_document(
    env: &StageEnv,
    build: &Artifacts,
    mirror: &str,
    suite: &str,
) -> Result<(serde_json::Value, usize), String> {
    let disk = build.disk().map_err(|e| e.to_string())?;
    let recipe = &build.loaded.recipe;
    let packages = if build.is_debian() {
        installed_packages(env, build)?
    } else {
        build
            .packages()
            .map_err(|e| e.to_string())?
            .fetched(false)
            .into_iter()
            .map(crate::sbom::SbomPackage::fetched)
            .collect()
    };
    let count = packages.len();
    let doc = crate::sbom::spdx(&crate::sbom::SbomInput {
        name: &recipe.name,
        version: recipe.version.as_deref().unwrap_or(""),
        image: &disk.image,
        source_date_epoch: build.loaded.source_date_epoch,
        mirror,
        suite,
        packages,
        generated: build
            .rootfs
            .as_ref()
            .map(|r| r.generated.as_slice())
            .unwrap_or_default(),
    });
    Ok((doc, count))
}

/// The in-toto Statements published with an image: its SBOM (`Err`: why there is none) and
/// its provenance.
fn statements(
    env: &StageEnv,
    build: &Artifacts,
    origin: &Origin<'_>,
    name: &str,
    manifest: &Digest256,
) -> Result<(Vec<Statement>, Result<usize, String>), StageError> {
    let mut out = Vec::new();
    let sbom = sbom_document(env, build, origin.mirror, origin.suite).map(|(doc, count)| {
        out.push(Statement::new(name, manifest, attest::PREDICATE_SPDX, doc));
        count
    });
    let builder = crate::pipeline::worker::host_name();
    let provenance = crate::provenance::slsa(&crate::provenance::ProvenanceInput {
        request: origin.request,
        commit: origin.commit,
        build,
        mirror: origin.mirror,
        suite: origin.suite,
        builder: &builder,
    });
    out.push(Statement::new(
        name,
        manifest,
        attest::PREDICATE_SLSA_V1,
        provenance,
    ));
    Ok((out, sbom))
}

/// Push the build's verified disk (its blob must be local) to `target`, sign it and attach its
/// signed SBOM and provenance. Blocking.
pub fn publish_build(
    env: &StageEnv,
    build_id: &str,
    build: &Artifacts,
    origin: &Origin<'_>,
    disk_path: &std::path::Path,
) -> Result<PublishOut, StageError> {
    let target = env.publish.as_ref();
    let recipe = &build.loaded.recipe;
    let skipped = |why: String| Ok(PublishOut::Skipped { skipped: why });
    let Some(publish) = recipe.publish.as_ref().filter(|p| !p.repository.is_empty()) else {
        return skipped(format!("recipe {} has no publish: section", recipe.name));
    };
    let Some(target) = target else {
        return skipped(
            "this worker has no publish target (kiln up/worker --publish-to REGISTRY|oci:DIR)"
                .into(),
        );
    };
    if build.boots.is_empty() {
        return skipped(
            "the image was not boot-verified (--no-verify); only verified images are published"
                .into(),
        );
    }
    let mut tags = publish.tags.clone();
    if tags.is_empty() {
        tags.push("latest".into());
    }
    let (reference, repository) = publish_reference(&target.to, &publish.repository, &tags[0]);
    let key = match &target.key {
        Some(path) => Some(store::load_signing_key(path).map_err(StageError::SigningKey)?),
        None => None,
    };
    let meta = meta(build, origin.commit, tags[1..].to_vec());
    let report = store::publish(disk_path, &reference, &meta, key.as_ref(), &target.store)?;
    let attested = std::time::Instant::now();
    let (attestations, sbom) = match &key {
        Some(key) => {
            let name = store::subject_name(&reference)?;
            let (list, sbom) = statements(env, build, origin, &name, &report.manifest_digest)?;
            let sealed: Vec<attest::Sealed> = origin
                .boot_attestation
                .iter()
                .map(|envelope| attest::Sealed {
                    predicate_type: attest::PREDICATE_BOOT.into(),
                    envelope: envelope.clone(),
                })
                .collect();
            let att = store::attach(&report.reference, key, &list, &sealed, &target.store)?;
            // The SBOM also as a plain document, for tools that look for one.
            if let Some(doc) = list
                .iter()
                .find(|s| s.predicate_type == attest::PREDICATE_SPDX)
            {
                let bytes = serde_json::to_vec(&doc.predicate).map_err(|e| StageError::Record {
                    what: "the SBOM".into(),
                    source: std::io::Error::other(e),
                })?;
                store::attach_sbom(&report.reference, &bytes, &target.store)?;
            }
            (Some(att), sbom)
        }
        None => (None, Err("the image is not signed (no --key)".to_string())),
    };
    let verification = json!({ "boots": serde_json::from_str::<Value>(meta.boot_report.as_deref().unwrap_or("{}")).ok().and_then(|v| v.get("boots").cloned()) });
    let message = ImagePublished {
        v: VERSION,
        build: build_id.to_string(),
        repository,
        reference: report.reference.clone(),
        digest: report.manifest_digest.to_string(),
        tags: report.tags.clone(),
        signature: report.signature_digest.as_ref().map(|d| d.to_string()),
        verification,
        promotion: None,
        time: EventTime::now(),
    };
    Ok(PublishOut::Pushed(Box::new(Pushed {
        reference: report.reference,
        manifest: report.manifest_digest,
        layer: report.layer_digest,
        signature: report.signature_digest,
        tags: report.tags,
        bytes: report.bytes,
        uploaded: report.uploaded,
        chunks: report.chunks,
        seconds: report.seconds,
        attestations,
        attestation_seconds: attested.elapsed().as_secs_f64(),
        sbom_packages: sbom.as_ref().ok().copied(),
        sbom_skipped: sbom.err(),
        message: Box::new(message),
    })))
}

/// Whether a registry error may heal on retry (the network, a server error); other refusals are
/// final.
pub fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Http { .. } | StoreError::Io { .. } | StoreError::Protocol { .. } => true,
        StoreError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::records::LocalRecords;
    use crate::pipeline::stages::{BootSummary, DiskOut};

    #[test]
    fn publish_signs_only_what_the_verify_stage_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.yaml");
        std::fs::write(
            &recipe,
            "name: r\nkernel: { package: linux-image-cloud-amd64 }\nboot: { loader: none }\n\
             disk: { partitions: [ { name: root, type: root, size: auto } ] }\n\
             verify: { expect: marker-1 }\n",
        )
        .unwrap();
        let loaded = crate::recipe::load(&recipe, &crate::recipe::LoadOptions::default()).unwrap();
        let mut build = Artifacts::new(loaded);
        let image = Digest256::from_sha256(&[7u8; 32]);
        build.disk = Some(DiskOut {
            root_hash: None,
            image: image.clone(),
            format: "raw".into(),
            disk_size: 1 << 20,
            file_size: 1 << 20,
        });
        build.boots.push(BootSummary {
            profile: "direct".into(),
            serial_log: None,
            serial_log_blob: None,
            accel: "tcg".into(),
            time_to_first_output: None,
            time_to_kernel: None,
            time_to_marker: 1.0,
            total: 1.0,
            marker_line: "marker-1".into(),
            secure_boot: None,
            verity_root_hash: None,
        });
        let records = LocalRecords::new(dir.path());
        let refused = check_verified(&records, &build).unwrap_err();
        assert!(
            refused.to_string().contains("not seen to boot"),
            "{refused}"
        );
        let record = |img: &Digest256, exp: &Option<String>, profile: &str| {
            serde_json::to_value(VerifiedBoot {
                image: img.clone(),
                profile: profile.into(),
                expect: exp.clone(),
                boot: img.clone(),
            })
            .unwrap()
        };
        // A record for another image, marker or profile does not count.
        let expect = Some("marker-1".to_string());
        let other = Digest256::from_sha256(&[8u8; 32]);
        for (img, exp, profile) in [
            (&other, &expect, "direct"),
            (&image, &Some("marker-2".to_string()), "direct"),
            (&image, &expect, "uefi"),
        ] {
            records
                .put(
                    VERIFIED,
                    &verified_key(img, exp, profile),
                    &record(img, exp, profile),
                )
                .unwrap();
        }
        assert!(check_verified(&records, &build).is_err());
        records
            .put(
                VERIFIED,
                &verified_key(&image, &expect, "direct"),
                &record(&image, &expect, "direct"),
            )
            .unwrap();
        assert!(check_verified(&records, &build).is_ok());
    }

    #[test]
    fn references_follow_the_worker_target() {
        assert_eq!(
            publish_reference("127.0.0.1:5000", "registry.example:5000/team/web", "v1"),
            (
                "127.0.0.1:5000/team/web:v1".to_string(),
                "127.0.0.1:5000/team/web".to_string()
            )
        );
        assert_eq!(
            publish_reference("127.0.0.1:5000/", "kiln/app", "latest").0,
            "127.0.0.1:5000/kiln/app:latest"
        );
        assert_eq!(
            publish_reference("oci:/srv/images", "kiln/app", "v2"),
            (
                "oci:/srv/images:v2".to_string(),
                "oci:/srv/images".to_string()
            )
        );
        assert_eq!(repository_path("team/web"), "team/web");
        assert_eq!(repository_path("localhost/web"), "web");
    }
}
