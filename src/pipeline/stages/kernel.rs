//! The kernel stage: the kernel image and an initramfs holding the modules the root disk needs
//! (from the kernel package, or from a Debian image's own base), or a kernel built from source
//! (`kernel.build`) with the root disk's drivers built in, which boots without an initramfs.

use super::rootfs::debs;
use super::{
    Artifacts, Handover, Need, Partitions, StageEnv, StageError, StageRun, StageWork, deb_path, io,
    read_manifest, read_pkg,
};
use crate::bus;
use crate::digest::Digest256;
use crate::kernel::InstalledKernel;
use crate::kernel::build::{KernelBuildSpec, ROOT_BUILTIN};
use crate::kernel::initramfs::{self, InitramfsSpec};
use crate::manifest::from_manifest;
use crate::recipe::schema::Compression;
use crate::tree::Tree;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub struct KernelStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelOut {
    pub version: String,
    pub vmlinuz: Digest256,
    /// `None`: the kernel mounts the root partition itself (a built kernel with the root disk's
    /// drivers built in), so the image boots without an initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Digest256>,
    pub modules: Vec<String>,
    /// A kernel built from source (`kernel.build`): how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<BuiltKernelOut>,
}

/// What a kernel built from source records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuiltKernelOut {
    /// The key of the build in `$KILN_HOME/kernel/builds`.
    pub key: Digest256,
    /// The final `.config` (a blob).
    pub config: Digest256,
    pub toolchain: String,
    /// Whether the kernel was already built (no compile).
    pub cached: bool,
    /// How long the compile took (when it ran).
    pub build_seconds: f64,
    /// The build log on the worker that built it.
    pub log: PathBuf,
}

impl KernelOut {
    /// The kernel and initramfs blobs.
    pub fn blobs(&self) -> Vec<Need> {
        let mut out = vec![Need::Blob(self.vmlinuz.clone())];
        out.extend(self.initrd.clone().map(Need::Blob));
        out
    }
}

/// What the kernel stage made, as its message carries it.
#[derive(Debug, Clone, Serialize)]
pub struct KernelStageOut {
    pub kernel: KernelOut,
}

/// The key of a kernel from a package (fields sorted, as the JSON keys).
#[derive(Serialize)]
struct PackagedKey<'a> {
    base: Option<&'a Digest256>,
    busybox: &'a Digest256,
    compression: Option<Compression>,
    epoch: i64,
    /// The initramfs's `/init` template: a kiln whose `/init` changed makes the initramfs again.
    init: Digest256,
    kernel: Option<&'a Digest256>,
    modules: &'a [String],
    root: String,
    /// `disk.verity`: the packages of `dmsetup` that go into the initramfs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    verity_tools: Vec<&'a Digest256>,
}

/// The key of a kernel built from source.
#[derive(Serialize)]
struct BuiltKey<'a> {
    base: crate::recipe::schema::KernelBase,
    epoch: i64,
    fragment: &'a Option<String>,
    source: &'a Digest256,
    toolchain: String,
}

impl StageWork for KernelStage {
    const STAGE: bus::Stage = bus::Stage::Kernel;
    type Output = KernelStageOut;

    fn needs(_env: &StageEnv, h: &Handover) -> Vec<Need> {
        let Some(build) = &h.build else {
            return Vec::new();
        };
        let mut out = debs(build);
        // A Debian image's kernel is read from its base: its /boot and module directories.
        out.extend(
            build
                .rootfs
                .iter()
                .filter_map(|r| r.base.clone())
                .map(Need::KernelOf),
        );
        out
    }

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<KernelStageOut, StageError> {
        let build = h.artifacts()?;
        let pk = build.packages()?;
        let loaded = &build.loaded;
        let recipe = &loaded.recipe;
        let kernel = if let Some(spec) = &recipe.kernel.build {
            // The build's own cache (keyed by the merged configuration) is under this.
            let key = BuiltKey {
                base: spec.base,
                epoch: loaded.source_date_epoch,
                fragment: &loaded.kernel_fragment,
                source: &pk.kernel.sha256,
                toolchain: crate::kernel::build::check_build_tools()?,
            };
            run.step("kernel", 1, &key, |run| built_kernel(run.env, build))?
        } else {
            let base = build.rootfs.as_ref().and_then(|r| r.base.as_ref());
            let key = PackagedKey {
                base,
                busybox: &pk.busybox.sha256,
                compression: recipe.initramfs.compression,
                epoch: loaded.source_date_epoch,
                kernel: if base.is_some() {
                    None
                } else {
                    Some(&pk.kernel.sha256)
                },
                modules: &recipe.initramfs.modules,
                root: Partitions::of(loaded).root.to_string(),
                init: Digest256::of(initramfs::DEFAULT_INIT_TEMPLATE.as_bytes()),
                verity_tools: pk.verity_tools.iter().map(|p| &p.sha256).collect(),
            };
            run.step("kernel", 1, &key, |run| packaged_kernel(run.env, build))?
        };
        Ok(KernelStageOut { kernel })
    }

    fn apply(h: &mut Handover, out: &KernelStageOut) {
        if let Some(b) = &mut h.build {
            b.kernel = Some(out.kernel.clone());
        }
    }

    fn produced(h: &Handover) -> Vec<Need> {
        h.build
            .iter()
            .flat_map(|b| b.kernel.iter())
            .flat_map(KernelOut::blobs)
            .collect()
    }
}

/// The kernel of a package (or of a Debian base) and an initramfs with the modules the root disk
/// needs.
fn packaged_kernel(env: &StageEnv, build: &Artifacts) -> Result<KernelOut, StageError> {
    let pk = build.packages()?;
    let recipe = &build.loaded.recipe;
    let kernel_tree = match build.rootfs.as_ref().and_then(|r| r.base.as_ref()) {
        Some(base) => base_kernel_tree(env, base)?,
        None => read_pkg(env, &build.loaded, &pk.kernel)?,
    };
    let busybox = read_pkg(env, &build.loaded, &pk.busybox)?;
    let kernel = InstalledKernel::from_tree(&kernel_tree)?;
    let ids = Partitions::of(&build.loaded);
    let verity_tools = pk
        .verity_tools
        .iter()
        .map(|p| read_pkg(env, &build.loaded, p))
        .collect::<Result<Vec<Tree>, StageError>>()?;
    let mut spec = InitramfsSpec::new(&kernel, &busybox, ids.root.to_string());
    spec.modules = recipe.initramfs.modules.clone();
    spec.verity_tools = verity_tools.iter().collect();
    spec.compression = recipe.initramfs.compression.unwrap_or(Compression::Zstd);
    spec.epoch = build.loaded.source_date_epoch;
    let (bytes, closure) = initramfs::build_bytes(&spec)?;
    let (initrd, _) = env
        .blobs
        .put_bytes(&bytes)
        .map_err(io("storing the initramfs"))?;
    let mut reader = kernel.vmlinuz.open().map_err(io("reading vmlinuz"))?;
    let (vmlinuz, _) = env.blobs.put(&mut reader).map_err(io("storing vmlinuz"))?;
    Ok(KernelOut {
        version: kernel.version.clone(),
        vmlinuz,
        initrd: Some(initrd),
        modules: closure.names().iter().map(|s| s.to_string()).collect(),
        built: None,
    })
}

/// The kernel's files of a Debian base (see [`crate::debian::kernel_tree`]). Only their blobs
/// must be local: a worker on another host fetches just these.
fn base_kernel_tree(env: &StageEnv, base: &Digest256) -> Result<Tree, StageError> {
    let mut manifest = read_manifest(&env.blobs, base, "the Debian base manifest")?;
    manifest.entries.retain(|e| {
        !matches!(e.kind, crate::manifest::ManifestKind::File { .. })
            || crate::debian::holds_kernel(&e.path)
    });
    let image = from_manifest(&manifest, &env.blobs)?;
    Ok(crate::debian::kernel_tree(&image).map_err(crate::manifest::ManifestError::from)?)
}

/// `kernel.build`: build the kernel from the `linux-source-*` package and the recipe's fragment
/// (or find it built), and store it. A kernel with the root disk's drivers built in boots with
/// no initramfs.
fn built_kernel(env: &StageEnv, build: &Artifacts) -> Result<KernelOut, StageError> {
    let pk = build.packages()?;
    let loaded = &build.loaded;
    let spec = loaded
        .recipe
        .kernel
        .build
        .as_ref()
        .ok_or(StageError::Missing("render"))?;
    let fragment = loaded.kernel_fragment.clone().ok_or_else(|| {
        StageError::Unsupported(
            "kernel.build without its fragment's text (reload the recipe)".into(),
        )
    })?;
    let request = KernelBuildSpec {
        home: env.home.clone(),
        source_deb: deb_path(env, loaded, &pk.kernel)?,
        source_digest: pk.kernel.sha256.clone(),
        fragment_name: spec.fragment.clone(),
        fragment,
        base: spec.base,
        epoch: loaded.source_date_epoch,
        jobs: None,
    };
    let built = crate::kernel::build::build(&request)?;
    if !built.boots_without_initramfs() {
        let missing: Vec<String> = ROOT_BUILTIN
            .iter()
            .filter(|o| !built.config.all_builtin(&[o]))
            .map(|o| format!("CONFIG_{o}=y"))
            .collect();
        return Err(StageError::Unsupported(format!(
            "a built kernel whose root disk drivers are not built in (an initramfs for built \
             kernels is not supported yet); add to {}: {}",
            spec.fragment,
            missing.join(", ")
        )));
    }
    let mut file = std::fs::File::open(&built.bzimage)
        .map_err(io(format!("reading {}", built.bzimage.display())))?;
    let (vmlinuz, _) = env.blobs.put(&mut file).map_err(io("storing the kernel"))?;
    let (config, _) = env
        .blobs
        .put_bytes(built.config.render().as_bytes())
        .map_err(io("storing the kernel configuration"))?;
    Ok(KernelOut {
        version: built.release.clone(),
        vmlinuz,
        initrd: None,
        modules: Vec::new(),
        built: Some(BuiltKernelOut {
            key: built.key.clone(),
            config,
            toolchain: built.toolchain.clone(),
            cached: built.cached,
            build_seconds: built.build_seconds,
            log: built.log.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Typed keys serialise to the bytes of the JSON objects kiln hashed when they were plain
    /// JSON (the initramfs's /init template is in the key since it changed).
    #[test]
    fn keys_keep_their_bytes() {
        let d = Digest256::from_sha256(&[1u8; 32]);
        let e = Digest256::from_sha256(&[2u8; 32]);
        let modules = vec!["virtio_blk".to_string()];
        for (base, kernel) in [(None, Some(&d)), (Some(&e), None)] {
            let typed = PackagedKey {
                base,
                busybox: &d,
                compression: Some(Compression::Zstd),
                epoch: 7,
                kernel,
                modules: &modules,
                root: "u-root".into(),
                init: e.clone(),
                verity_tools: Vec::new(),
            };
            let old = json!({
                "kernel": kernel, "base": base, "busybox": d, "modules": modules,
                "compression": Some(Compression::Zstd), "root": "u-root", "epoch": 7, "init": e,
            });
            assert_eq!(
                serde_json::to_vec(&typed).unwrap(),
                serde_json::to_vec(&old).unwrap()
            );
        }
        let fragment = Some("CONFIG_X=y\n".to_string());
        let base = crate::recipe::schema::KernelBase::default();
        let typed = BuiltKey {
            base,
            epoch: 7,
            fragment: &fragment,
            source: &d,
            toolchain: "gcc 12".into(),
        };
        let old = json!({
            "source": d, "fragment": fragment, "base": base, "toolchain": "gcc 12", "epoch": 7,
        });
        assert_eq!(
            serde_json::to_vec(&typed).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
    }
}
