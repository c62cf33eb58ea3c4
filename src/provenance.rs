//! How an image was made, as a SLSA provenance v1 predicate: the recipe and the request's
//! parameters (external), kiln's version, the mirror and SOURCE_DATE_EPOCH (internal), every
//! resolved input with its digest — the recipe's inputs digest, the signed `InRelease`, each template, each `.deb` by
//! its SHA-256 from the signed index, the Debian base, a kernel built from source — and the
//! builder (`urn:kiln:builder:<host>`). docs/provenance.md describes the build type. Pure: no
//! I/O.

use crate::bus::{BuildRequest, RecipeSource};
use crate::digest::Digest256;
use crate::pipeline::stages::Artifacts;
use serde_json::{Value, json};

/// `buildDefinition.buildType` of kiln's provenance.
pub const BUILD_TYPE: &str = "https://kiln.invalid/provenance/build/v1";

/// What the provenance describes besides the build's own artifacts.
pub struct ProvenanceInput<'a> {
    pub request: &'a BuildRequest,
    /// The git commit of a git recipe.
    pub commit: Option<&'a str>,
    pub build: &'a Artifacts,
    /// The Debian mirror and suite the packages came from.
    pub mirror: &'a str,
    pub suite: &'a str,
    /// The host that ran the publish stage.
    pub builder: &'a str,
}

fn sha256(d: &Digest256) -> Value {
    json!({ "sha256": d.hex() })
}

/// The SLSA provenance v1 predicate.
pub fn slsa(input: &ProvenanceInput<'_>) -> Value {
    let build = input.build;
    let recipe_uri = match &input.request.recipe {
        RecipeSource::Git { git } => format!(
            "git+{}@{}#{}",
            crate::net::redact(&git.url),
            input.commit.unwrap_or(&git.git_ref),
            git.path
        ),
        RecipeSource::Path { path } => format!("file://{}", path.display()),
        RecipeSource::Inline { name, .. } => format!("inline:{name}"),
    };
    let mut deps = Vec::new();
    if let Some(hex) = build.loaded.inputs.strip_prefix("sha256:") {
        deps.push(json!({
            "name": "recipe (build.inputs: the recipe chain, templates, parameters and variables)",
            "uri": recipe_uri,
            "digest": { "sha256": hex },
        }));
    }
    for (name, text) in &build.loaded.templates {
        deps.push(json!({
            "name": format!("template {name}"),
            "digest": sha256(&Digest256::of(text.as_bytes())),
        }));
    }
    if let Some(p) = &build.packages {
        if let Some(release) = &p.release {
            deps.push(json!({
                "name": format!("InRelease of Debian {} (OpenPGP-verified)", input.suite),
                "uri": format!(
                    "{}/dists/{}/InRelease",
                    input.mirror.trim_end_matches('/'),
                    input.suite
                ),
                "digest": sha256(release),
            }));
        }
        for deb in p.fetched(build.is_debian()) {
            deps.push(json!({
                "name": deb.name,
                "uri": format!("{}/{}", input.mirror.trim_end_matches('/'), deb.filename),
                "digest": sha256(&deb.sha256),
                "annotations": { "version": deb.version, "architecture": deb.architecture },
            }));
        }
    }
    if let Some(base) = build.rootfs.as_ref().and_then(|r| r.base.as_ref()) {
        deps.push(json!({
            "name": format!("Debian {} base (mmdebstrap), its Tree manifest", input.suite),
            "digest": sha256(base),
        }));
    }
    if let Some(k) = &build.kernel {
        deps.push(json!({
            "name": format!("kernel {}", k.version),
            "digest": sha256(&k.vmlinuz),
        }));
    }
    let mut recipe = serde_json::to_value(&input.request.recipe).unwrap_or(Value::Null);
    // An inline recipe's text is in the inputs digest; the provenance names it, not copies it.
    if let Some(o) = recipe.as_object_mut() {
        o.remove("inline");
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "recipe": recipe,
                "parameters": input.request.params,
                "profiles": input.request.profiles,
                "verify": input.request.verify,
            },
            "internalParameters": {
                "kilnVersion": env!("CARGO_PKG_VERSION"),
                "sourceDateEpoch": build.loaded.source_date_epoch,
                "mirror": input.mirror,
                "suite": input.suite,
            },
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {
                "id": format!("urn:kiln:builder:{}", input.builder),
                "version": { "kiln": env!("CARGO_PKG_VERSION") },
            },
            "metadata": {
                "invocationId": input.request.id.clone().unwrap_or_default(),
            },
            "byproducts": build.disk.as_ref().map(|d| vec![json!({
                "name": format!("disk image ({})", d.format),
                "digest": sha256(&d.image),
            })]).unwrap_or_default(),
        },
    })
}
