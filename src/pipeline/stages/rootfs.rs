//! The rootfs stage: choose the packages from one signed release and fetch them (step
//! `packages`), make the Debian base with mmdebstrap for `rootfs.base: debian` (step
//! `debian-base`), and assemble the image's root Tree from them and the recipe (step `rootfs`).

use super::{
    Artifacts, Handover, Need, Partitions, StageEnv, StageError, StageRun, StageWork, load_tree,
    mib, open_archive, read_manifest, read_pkg, store_tree,
};
use crate::bus;
use crate::digest::Digest256;
use crate::packages::index::parse_relations;
use crate::packages::{Archive, Deps, PackageRef};
use crate::recipe::Loaded;
use crate::rootfs::RootfsSpec;
use serde::{Deserialize, Serialize};

pub struct RootfsStage;

/// The packages a build uses, chosen from one signed release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChosenPackages {
    /// The kernel image package, or the `linux-source-*` package when the recipe builds its
    /// kernel (`kernel.build`).
    pub kernel: PackageRef,
    pub busybox: PackageRef,
    pub systemd_boot: PackageRef,
    /// `disk.verity`: `dmsetup` and the libraries it runs with, for the initramfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verity_tools: Vec<PackageRef>,
    /// The SHA-256 of the verified `InRelease` they were chosen from (the provenance names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Digest256>,
}

impl ChosenPackages {
    /// The packages a build downloads: a Debian image's kernel comes from its own base
    /// (mmdebstrap installs it), so its package is named but never fetched.
    pub fn fetched(&self, debian: bool) -> Vec<&PackageRef> {
        [&self.kernel, &self.busybox, &self.systemd_boot]
            .into_iter()
            .filter(|p| !(debian && *p == &self.kernel))
            .chain(&self.verity_tools)
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsOut {
    /// The Tree manifest (a blob).
    pub manifest: Digest256,
    /// `rootfs.base: debian`: the manifest of the mmdebstrap base the image was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Digest256>,
    /// The blob of the image's `/var/lib/dpkg/status` (Debian images): what the SBOM lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpkg_status: Option<Digest256>,
    /// The blob of the installed packages (JSON list of [`crate::sbom::SbomPackage`]), each
    /// matched in the verified index for its `.deb`'s SHA-256 (Debian images): the SBOM's
    /// packages, found once here rather than at every publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<Digest256>,
    /// The files kiln wrote into the root itself (init, units, accounts, the recipe's files):
    /// the SBOM lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generated: Vec<crate::sbom::GeneratedFile>,
}

/// The Debian base step's outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseOut {
    /// The base Tree's manifest (a blob).
    pub manifest: Digest256,
    pub entries: usize,
    /// Bytes of file content in the base.
    pub bytes: u64,
    /// The mmdebstrap arguments that made it (tarball on stdout).
    #[serde(default)]
    pub mmdebstrap: Vec<String>,
}

/// What the rootfs stage made: the packages, the Debian base (if any) and the root Tree.
#[derive(Debug, Clone, Serialize)]
pub struct RootfsStageOut {
    pub packages: ChosenPackages,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseOut>,
    pub rootfs: RootfsOut,
}

/// The key of the `packages` step (fields in the order of the JSON keys: sorted).
#[derive(Serialize)]
struct PackagesKey<'a> {
    arch: &'a str,
    components: &'a [String],
    kernel: &'a str,
    mirror: &'a str,
    release: &'a Digest256,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    verity: bool,
}

/// The key of the `rootfs` step.
#[derive(Serialize)]
struct RootfsKey<'a> {
    base: Option<&'a Digest256>,
    busybox: &'a Digest256,
    esp: Option<String>,
    inputs: &'a str,
    root: String,
}

impl StageWork for RootfsStage {
    const STAGE: bus::Stage = bus::Stage::Rootfs;
    type Output = RootfsStageOut;

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<RootfsStageOut, StageError> {
        let build = h.artifacts()?;
        let loaded = &build.loaded;
        let packages = packages(run, loaded)?;
        let base = if build.is_debian() {
            Some(debian_base(run, loaded)?)
        } else {
            None
        };
        let ids = Partitions::of(loaded);
        let base_manifest = base.as_ref().map(|b| b.manifest.clone());
        let key = RootfsKey {
            base: base_manifest.as_ref(),
            busybox: &packages.busybox.sha256,
            esp: ids.esp.map(|u| u.to_string()),
            inputs: &loaded.inputs,
            root: ids.root.to_string(),
        };
        // Version 2 recorded the dpkg status file's blob, version 3 the generated files,
        // version 4 the installed packages matched in the index (all for the SBOM); version 5
        // gives a Debian image's ESP its mount point (/boot/efi).
        let rootfs = run.step("rootfs", 5, &key, |run| {
            rootfs(run.env, loaded, &packages, base_manifest.as_ref())
        })?;
        Ok(RootfsStageOut {
            packages,
            base,
            rootfs,
        })
    }

    fn apply(h: &mut Handover, out: &RootfsStageOut) {
        if let Some(b) = &mut h.build {
            b.packages = Some(out.packages.clone());
            b.rootfs = Some(out.rootfs.clone());
        }
    }

    fn produced(h: &Handover) -> Vec<Need> {
        let Some(build) = &h.build else {
            return Vec::new();
        };
        let mut out: Vec<Need> = build.fetched_debs().into_iter().map(Need::Blob).collect();
        if let Some(r) = &build.rootfs {
            out.push(Need::Tree(r.manifest.clone()));
            // A Debian base's files are all in the image; its manifest is the kernel stage's.
            out.extend(r.base.clone().map(Need::Blob));
            out.extend(r.installed.clone().map(Need::Blob));
        }
        out
    }
}

/// The `packages` step: choose the packages from the signed release (recorded), and make sure
/// every `.deb` the build needs is here.
fn packages(run: &mut StageRun<'_>, loaded: &Loaded) -> Result<ChosenPackages, StageError> {
    let env = run.env;
    let archive = open_archive(env, loaded)?;
    let kernel = kernel_package_name(loaded);
    let key = PackagesKey {
        arch: &archive.options().arch,
        components: &archive.options().components,
        kernel: &kernel,
        mirror: &archive.options().mirror,
        release: archive.release_digest(),
        verity: loaded.recipe.disk.verity,
    };
    // Version 2: package references carry their source package (for the SBOM).
    let mut chosen: ChosenPackages = run.step("packages", 2, &key, |_| {
        Ok(ChosenPackages {
            kernel: versioned_package(&archive, &kernel)?,
            busybox: one_package(&archive, "busybox-static")?,
            systemd_boot: one_package(&archive, "systemd-boot-efi")?,
            verity_tools: if loaded.recipe.disk.verity {
                archive.resolve(&["dmsetup"], Deps::All)?
            } else {
                Vec::new()
            },
            release: None,
        })
    })?;
    // The release is in the step's key: a recorded choice was made from this very InRelease.
    chosen.release = Some(archive.release_digest().clone());
    let all =
        chosen.fetched(loaded.recipe.rootfs.base == crate::recipe::schema::RootfsBase::Debian);
    let total: u64 = all.iter().map(|p| p.size).sum();
    let mut done = 0u64;
    for (i, p) in all.iter().enumerate() {
        let fraction = Some(done as f64 / total.max(1) as f64);
        if env.blobs.contains(&p.sha256) {
            run.progress(fraction, format!("{} {} cached", p.name, p.version));
        } else {
            run.progress(
                fraction,
                format!(
                    "fetching {}/{} {} {} ({}), {} of {}",
                    i + 1,
                    all.len(),
                    p.name,
                    p.version,
                    mib(p.size),
                    mib(done),
                    mib(total)
                ),
            );
            archive.fetch(p)?;
        }
        done += p.size;
    }
    run.progress(Some(0.5), format!("{} packages, {}", all.len(), mib(total)));
    env.note(&archive);
    Ok(chosen)
}

/// The Debian base of a recipe: looked up under its own key (suite, the mirror's signed release,
/// variant, components, packages), else made by mmdebstrap and recorded. Unknown package names
/// are reported from kiln's index before mmdebstrap runs.
fn debian_base(run: &mut StageRun<'_>, loaded: &Loaded) -> Result<BaseOut, StageError> {
    let env = run.env;
    let archive = open_archive(env, loaded)?;
    let spec = crate::debian::BaseSpec::of(
        &loaded.recipe.rootfs,
        loaded.recipe.kernel.package.as_deref(),
        &archive.options().mirror,
    )?;
    let key = spec.key_inputs(archive.release_digest().as_str());
    let here = |out: &BaseOut| env.blobs.contains(&out.manifest);
    let out = run.step_if("debian-base", 1, &key, here, |run| {
        run.progress(None, "making the Debian base with mmdebstrap");
        let checked = spec.check_packages(&archive);
        env.note(&archive);
        checked?;
        let started = std::time::Instant::now();
        let epoch = archive.release().date.unwrap_or(1);
        let tree = crate::debian::build_base(&spec, &env.blobs, epoch)?;
        let out = BaseOut {
            manifest: store_tree(&env.blobs, &tree)?,
            entries: tree.len(),
            bytes: tree.content_bytes(),
            mmdebstrap: spec.mmdebstrap_args(),
        };
        tracing::info!(
            entries = out.entries,
            bytes = out.bytes,
            "Debian base made in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    })?;
    env.note(&archive);
    Ok(out)
}

fn rootfs(
    env: &StageEnv,
    loaded: &Loaded,
    packages: &ChosenPackages,
    base: Option<&Digest256>,
) -> Result<RootfsOut, StageError> {
    let ids = Partitions::of(loaded);
    let mounts = crate::rootfs::Mounts {
        root_partuuid: ids.root.to_string(),
        esp_partuuid: ids.esp.map(|u| u.to_string()),
        verity: loaded.recipe.disk.verity,
    };
    let tree = match base {
        Some(base) => {
            let base_tree = load_tree(&env.blobs, base, "the Debian base manifest")?;
            crate::debian::debian_rootfs(&RootfsSpec::of(loaded), base_tree, &mounts)?
        }
        None => {
            let busybox = read_pkg(env, loaded, &packages.busybox)?;
            crate::rootfs::busybox_rootfs(&RootfsSpec::of(loaded), &busybox, &mounts)?
        }
    };
    let digest = store_tree(&env.blobs, &tree)?;
    let manifest = read_manifest(&env.blobs, &digest, "the image's manifest")?;
    let dpkg_status = match base {
        Some(_) => manifest
            .entries
            .iter()
            .find(|e| e.path == crate::sbom::DPKG_STATUS)
            .and_then(|e| match &e.kind {
                crate::manifest::ManifestKind::File { digest, .. } => Some(digest.clone()),
                _ => None,
            }),
        None => None,
    };
    let installed = match &dpkg_status {
        Some(status) => Some(installed_packages(env, loaded, status)?),
        None => None,
    };
    let base_manifest = match base {
        Some(b) => Some(read_manifest(&env.blobs, b, "the Debian base manifest")?),
        None => None,
    };
    let mut generated = Vec::new();
    for (path, sha256) in
        crate::sbom::generated_paths(&manifest, base_manifest.as_ref(), &["/bin/busybox"])
    {
        let blob = env.blobs.path(sha256);
        let bytes = std::fs::read(&blob).map_err(super::io(format!(
            "reading {path} ({}) for the SBOM",
            blob.display()
        )))?;
        generated.push(crate::sbom::GeneratedFile {
            path: path.to_string(),
            sha256: sha256.clone(),
            sha1: crate::digest::sha1_hex(&bytes),
        });
    }
    Ok(RootfsOut {
        manifest: digest,
        base: base.cloned(),
        dpkg_status,
        installed,
        generated,
    })
}

/// The packages a Debian image's dpkg status file says are installed, each matched (name,
/// version, architecture) in the verified index for its `.deb`'s SHA-256, stored as a blob.
fn installed_packages(
    env: &StageEnv,
    loaded: &Loaded,
    status: &Digest256,
) -> Result<Digest256, StageError> {
    let path = env.blobs.path(status);
    let text = std::fs::read_to_string(&path).map_err(super::io(format!(
        "reading the dpkg status {}",
        path.display()
    )))?;
    let mut packages = crate::sbom::parse_dpkg_status(&text);
    let archive = open_archive(env, loaded)?;
    let index = archive.index()?;
    for p in &mut packages {
        p.deb = index
            .versions_of(&p.name)
            .map(|(_, e)| e)
            .find(|e| e.version_str() == p.version && e.architecture() == p.architecture)
            .map(|e| (Digest256::from_sha256(e.sha256()), e.filename().to_string()));
    }
    let bytes = serde_json::to_vec(&packages)
        .map_err(|e| super::io("recording the installed packages")(std::io::Error::other(e)))?;
    let (digest, _) = env
        .blobs
        .put_bytes(&bytes)
        .map_err(super::io("storing the installed packages"))?;
    Ok(digest)
}

/// The kernel package the recipe names: the recipe's, the default, or the kernel source
/// metapackage for `kernel.build`.
fn kernel_package_name(loaded: &Loaded) -> String {
    if loaded.recipe.kernel.build.is_some() {
        return SOURCE_PACKAGE.into();
    }
    loaded
        .recipe
        .kernel
        .package
        .clone()
        .unwrap_or_else(|| crate::debian::DEFAULT_KERNEL_PACKAGE.into())
}

/// The metapackage of the current kernel source (`linux-source` → `linux-source-6.1`).
const SOURCE_PACKAGE: &str = "linux-source";

/// One package without its dependencies.
fn one_package(archive: &Archive, name: &str) -> Result<PackageRef, StageError> {
    let mut found = archive.resolve(&[name], Deps::None)?;
    found
        .pop()
        .ok_or_else(|| StageError::Unsupported(format!("package {name}")))
}

/// The versioned kernel package behind a name such as `linux-image-cloud-amd64` (a metapackage
/// that depends on `linux-image-<version>-cloud-amd64`) or `linux-source` (→
/// `linux-source-<version>`).
fn versioned_package(archive: &Archive, name: &str) -> Result<PackageRef, StageError> {
    let prefix = if name.starts_with("linux-source") {
        "linux-source-"
    } else {
        "linux-image-"
    };
    let mut current = one_package(archive, name)?;
    for _ in 0..4 {
        if looks_versioned(&current.name) {
            break;
        }
        let next = archive
            .index()?
            .versions_of(&current.name)
            .find(|(_, e)| e.version_str() == current.version)
            .and_then(|(_, e)| {
                // The first alternative of each `Depends` group.
                parse_relations(e.depends())
                    .ok()?
                    .into_iter()
                    .filter_map(|group| group.into_iter().next())
                    .map(|r| r.name)
                    .find(|d| d.starts_with(prefix) && d != &current.name)
            });
        match next {
            Some(n) => current = one_package(archive, &n)?,
            None => break,
        }
    }
    Ok(current)
}

/// `linux-image-6.1.0-26-cloud-amd64`, `linux-source-6.1` (versioned) vs
/// `linux-image-cloud-amd64`, `linux-source` (meta).
fn looks_versioned(name: &str) -> bool {
    name.trim_start_matches("linux-image-")
        .trim_start_matches("linux-source-")
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
}

/// The blobs the rootfs stage reads: the `.deb`s it fetched already (a worker that did not fetch
/// them gets them from the object store).
pub(super) fn debs(build: &Artifacts) -> Vec<Need> {
    build.fetched_debs().into_iter().map(Need::Blob).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versioned_kernel_names() {
        assert!(looks_versioned("linux-image-6.1.0-26-cloud-amd64"));
        assert!(!looks_versioned(crate::debian::DEFAULT_KERNEL_PACKAGE));
        assert!(looks_versioned("linux-source-6.1"));
        assert!(!looks_versioned("linux-source"));
    }

    /// Typed keys serialise to the bytes of the JSON objects earlier kiln versions hashed, so
    /// records made before stay valid.
    #[test]
    fn keys_keep_their_bytes() {
        let d = Digest256::from_sha256(&[1u8; 32]);
        let e = Digest256::from_sha256(&[2u8; 32]);
        let components = vec!["main".to_string()];
        let typed = PackagesKey {
            arch: "amd64",
            components: &components,
            kernel: crate::debian::DEFAULT_KERNEL_PACKAGE,
            mirror: "http://deb.debian.org/debian",
            release: &d,
            verity: false,
        };
        let old = json!({
            "release": d, "kernel": crate::debian::DEFAULT_KERNEL_PACKAGE,
            "mirror": "http://deb.debian.org/debian", "arch": "amd64", "components": ["main"],
        });
        assert_eq!(
            serde_json::to_vec(&typed).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
        for base in [None, Some(&e)] {
            let typed = RootfsKey {
                base,
                busybox: &d,
                esp: Some("u-esp".into()),
                inputs: "sha256:00",
                root: "u-root".into(),
            };
            let old = json!({
                "inputs": "sha256:00", "busybox": d, "root": "u-root",
                "esp": Some("u-esp"), "base": base,
            });
            assert_eq!(
                serde_json::to_vec(&typed).unwrap(),
                serde_json::to_vec(&old).unwrap()
            );
        }
    }
}
