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
//! Redelivery is cheap and harmless: the manifest bytes and the ed25519 signature are
//! deterministic (same disk, recipe and SOURCE_DATE_EPOCH → same digests), and the store skips
//! a blob the registry already has, so a second run pushes no disk bytes (`uploaded: 0`).

use crate::bus::{ErrorInfo, ErrorKind, EventTime, ImagePublished, VERSION};
use crate::pipeline::stages::BuildState;
use crate::store::{self, PublishMeta, StoreError, StoreOptions};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

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

/// What the stage did.
#[derive(Debug, Clone)]
pub enum Published {
    /// Nothing to do, and why.
    Skipped(String),
    /// Pushed: the stage's outputs and the message for the agents.
    Pushed {
        outputs: Value,
        message: Box<ImagePublished>,
    },
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
fn meta(build: &BuildState, commit: Option<&str>, extra_tags: Vec<String>) -> PublishMeta {
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

/// Push the build's verified disk (its blob must be local) to `target` and sign it. Blocking.
pub fn publish_build(
    build_id: &str,
    build: &BuildState,
    commit: Option<&str>,
    disk_path: &std::path::Path,
    target: Option<&PublishTarget>,
) -> Result<Published, ErrorInfo> {
    let recipe = &build.loaded.recipe;
    let Some(publish) = recipe.publish.as_ref().filter(|p| !p.repository.is_empty()) else {
        return Ok(Published::Skipped(format!(
            "recipe {} has no publish: section",
            recipe.name
        )));
    };
    let Some(target) = target else {
        return Ok(Published::Skipped(
            "this worker has no publish target (kiln up/worker --publish-to REGISTRY|oci:DIR)"
                .into(),
        ));
    };
    if build.boots.is_empty() {
        return Ok(Published::Skipped(
            "the image was not boot-verified (--no-verify); only verified images are published"
                .into(),
        ));
    }
    let mut tags = publish.tags.clone();
    if tags.is_empty() {
        tags.push("latest".into());
    }
    let (reference, repository) = publish_reference(&target.to, &publish.repository, &tags[0]);
    let key = match &target.key {
        Some(path) => Some(store::load_signing_key(path).map_err(|e| {
            ErrorInfo::new(
                ErrorKind::Internal,
                &format!("the publish worker's signing key: {e}"),
            )
        })?),
        None => None,
    };
    let meta = meta(build, commit, tags[1..].to_vec());
    let report = store::publish(disk_path, &reference, &meta, key.as_ref(), &target.store)
        .map_err(|e| store_error(&e))?;
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
        time: EventTime::now(),
    };
    let outputs = json!({
        "reference": report.reference,
        "manifest": report.manifest_digest,
        "layer": report.layer_digest,
        "signature": report.signature_digest,
        "tags": report.tags,
        "bytes": report.bytes,
        "uploaded": report.uploaded,
        "seconds": report.seconds,
    });
    Ok(Published::Pushed {
        outputs,
        message: Box::new(message),
    })
}

/// Registry refusals that a retry cannot fix are final; the rest (network) are retried.
fn store_error(e: &StoreError) -> ErrorInfo {
    let kind = match e {
        StoreError::Http { .. } | StoreError::Io { .. } | StoreError::Protocol { .. } => {
            ErrorKind::Transient
        }
        StoreError::Status { status, .. } if *status >= 500 => ErrorKind::Transient,
        _ => ErrorKind::Internal,
    };
    ErrorInfo::new(kind, &format!("publishing the image: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
