//! `kiln build` in one process: render → packages → rootfs → kernel → disk → verify. Each stage
//! is a function of its inputs; its outputs (content digests in the blob store) are recorded in
//! the stage cache under a key over those inputs, so an unchanged rebuild is a chain of lookups and
//! makes no download, no disk write and no boot.

use super::cache::{StageCache, stage_key};
use crate::boot::{BootEntry, LoaderOptions, esp_tree, systemd_boot_from};
use crate::cache::{BlobStore, Digest256};
use crate::disk::build::{DiskSpec, PartitionInput, build_disk};
use crate::disk::derive_id;
use crate::disk::gpt::PartitionKind;
use crate::disk::image::{ImageFormat, ImageOptions};
use crate::disk::layout::{Filesystem, Size, parse_size};
use crate::kernel::Kernel;
use crate::kernel::initramfs::{self, InitramfsSpec};
use crate::manifest::{Manifest, from_manifest, to_manifest};
use crate::packages::{Archive, ArchiveOptions, Deps, PackageRef, read_into_tree};
use crate::recipe::LoadOptions;
use crate::recipe::schema::{DiskFormat, FilesystemKind, Loader, PartitionType, RootfsBase};
use crate::tree::Tree;
use crate::verify::{self, BootImageOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Format versions of the stages: bump one when its output for the same inputs changes.
const PACKAGES_VERSION: u32 = 1;
const ROOTFS_VERSION: u32 = 1;
const KERNEL_VERSION: u32 = 1;
const DISK_VERSION: u32 = 1;
const VERIFY_VERSION: u32 = 1;

/// What `kiln build` is asked to do.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub recipe: PathBuf,
    pub load: LoadOptions,
    /// Where the image, serial log and report go.
    pub out_dir: PathBuf,
    /// `$KILN_HOME`.
    pub home: PathBuf,
    /// Boot the image to prove it (default); `false` skips the verify stage.
    pub verify: bool,
    /// Boot with these profiles (in order) instead of the recipe's `verify.profile`.
    pub profiles: Vec<String>,
    pub profiles_dir: Option<PathBuf>,
    /// Debian archive settings (mirror, keyring, offline); the suite comes from the recipe.
    pub archive: ArchiveOptions,
}

/// One stage's part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    /// `hit` or `miss`.
    pub cache: &'static str,
    pub seconds: f64,
    pub key: String,
}

/// What a boot proved (cached by image digest, profile and marker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSummary {
    pub profile: String,
    /// The serial console of this boot.
    pub serial_log: Option<PathBuf>,
    pub accel: String,
    pub time_to_first_output: Option<f64>,
    pub time_to_kernel: Option<f64>,
    pub time_to_marker: f64,
    pub total: f64,
    pub marker_line: String,
}

/// The JSON report written beside the image.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub name: String,
    pub version: Option<String>,
    pub inputs: String,
    pub image: PathBuf,
    pub image_digest: Digest256,
    pub format: &'static str,
    pub disk_size: u64,
    pub file_size: u64,
    pub kernel_version: String,
    pub modules: Vec<String>,
    pub packages: Vec<PackageSummary>,
    pub stages: Vec<StageReport>,
    /// One boot per profile (empty with `--no-verify`).
    pub boots: Vec<BootSummary>,
    /// Network requests made to the Debian mirror during this build.
    pub mirror_requests: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageSummary {
    pub name: String,
    pub version: String,
    pub sha256: Digest256,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Recipe(Box<crate::recipe::Diagnostic>),
    #[error("packages: {0}")]
    Packages(#[from] crate::packages::PackagesError),
    #[error("reading package {package}: {message}")]
    Deb { package: String, message: String },
    #[error("rootfs: {0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("kernel: {0}")]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("{0}")]
    Initramfs(#[from] crate::kernel::initramfs::InitramfsError),
    #[error("boot loader: {0}")]
    Boot(#[from] crate::boot::BootError),
    #[error("disk: {0}")]
    Disk(#[from] crate::disk::build::DiskError),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("verify: {0}")]
    Verify(#[from] verify::VerifyError),
    #[error("the recipe asks for {0}, which kiln cannot build yet")]
    Unsupported(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    /// Whether the user's input is at fault (exit code 2) rather than the environment.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            BuildError::Recipe(_)
                | BuildError::Unsupported(_)
                | BuildError::Kernel(_)
                | BuildError::Initramfs(_)
                | BuildError::Verify(_)
        ) || matches!(
            self,
            BuildError::Packages(crate::packages::PackagesError::Resolve(_))
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// The packages a busybox build uses, chosen from one signed release.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChosenPackages {
    kernel: PackageRef,
    busybox: PackageRef,
    systemd_boot: PackageRef,
}

/// Outputs of the rootfs stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RootfsOut {
    manifest: Digest256,
}

/// Outputs of the kernel stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KernelOut {
    version: String,
    vmlinuz: Digest256,
    initrd: Digest256,
    modules: Vec<String>,
}

/// Outputs of the disk stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskOut {
    image: Digest256,
    disk_size: u64,
    file_size: u64,
}

/// Runs stages against the cache and keeps the report.
struct Runner<'a> {
    cache: StageCache,
    stages: Vec<StageReport>,
    progress: &'a dyn Fn(&str, &str),
}

impl Runner<'_> {
    /// Look the stage up by key, or run it and record what it made.
    fn stage<T, F>(
        &mut self,
        name: &str,
        version: u32,
        inputs: &impl Serialize,
        run: F,
    ) -> Result<T, BuildError>
    where
        T: Serialize + for<'de> Deserialize<'de>,
        F: FnOnce() -> Result<T, BuildError>,
    {
        let key = stage_key(name, version, inputs);
        let started = Instant::now();
        (self.progress)(name, "started");
        let (out, hit) = match self.cache.get::<T>(name, &key) {
            Some(out) => (out, true),
            None => {
                let out = run()?;
                self.cache
                    .put(name, &key, &out)
                    .map_err(io(format!("recording the {name} stage in the cache")))?;
                (out, false)
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        (self.progress)(name, if hit { "cache hit" } else { "done" });
        tracing::info!(
            stage = name,
            cache = if hit { "hit" } else { "miss" },
            "{seconds:.2} s"
        );
        self.stages.push(StageReport {
            stage: name.to_string(),
            cache: if hit { "hit" } else { "miss" },
            seconds,
            key: key.to_string(),
        });
        Ok(out)
    }
}

/// Build (and, unless told otherwise, boot) a recipe. `progress(stage, what)` is called as
/// stages start and end.
pub fn build(
    opts: &BuildOptions,
    progress: &dyn Fn(&str, &str),
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let loaded = crate::recipe::load(&opts.recipe, &opts.load)
        .map_err(|d| BuildError::Recipe(Box::new(d)))?;
    let recipe = &loaded.recipe;
    if recipe.rootfs.base != RootfsBase::Busybox {
        return Err(BuildError::Unsupported("rootfs.base: debian".into()));
    }
    if recipe.kernel.build.is_some() {
        return Err(BuildError::Unsupported("kernel.build".into()));
    }
    let blobs = BlobStore::new(&opts.home);
    let mut runner = Runner {
        cache: StageCache::new(&opts.home),
        stages: Vec::new(),
        progress,
    };
    let seed = loaded.inputs.clone();
    let epoch = loaded.source_date_epoch;

    // Packages: the kernel image, busybox-static, systemd-boot-efi — each on its own. The
    // choice is cached by the signed release it was made from, so a warm build reads no index.
    let mut archive_opts = opts.archive.clone();
    if let Some(suite) = &recipe.rootfs.suite {
        archive_opts.suite = suite.clone();
    }
    let archive = Archive::open_lazy(archive_opts)?;
    let kernel_name = recipe
        .kernel
        .package
        .clone()
        .unwrap_or_else(|| "linux-image-cloud-amd64".into());
    let chosen: ChosenPackages = runner.stage(
        "packages",
        PACKAGES_VERSION,
        &serde_json::json!({
            "release": archive.release_digest(),
            "kernel": kernel_name,
            "mirror": archive.options().mirror,
            "arch": archive.options().arch,
            "components": archive.options().components,
        }),
        || {
            Ok(ChosenPackages {
                kernel: kernel_image_package(&archive, &kernel_name)?,
                busybox: one_package(&archive, "busybox-static")?,
                systemd_boot: one_package(&archive, "systemd-boot-efi")?,
            })
        },
    )?;
    let (kernel_pkg, busybox_pkg, sdboot_pkg) =
        (chosen.kernel, chosen.busybox, chosen.systemd_boot);
    let mut packages = Vec::new();
    for p in [&kernel_pkg, &busybox_pkg, &sdboot_pkg] {
        archive.fetch(p)?;
        packages.push(PackageSummary {
            name: p.name.clone(),
            version: p.version.clone(),
            sha256: p.sha256.clone(),
        });
    }
    let read_pkg = |p: &PackageRef| -> Result<Tree, BuildError> {
        let path = archive.fetch(p)?;
        let mut tree = Tree::new();
        read_into_tree(&path, &mut tree, &blobs).map_err(|e| BuildError::Deb {
            package: p.name.clone(),
            message: e.to_string(),
        })?;
        Ok(tree)
    };

    // Partition identities follow from the seed, so the initramfs and fstab can name them
    // before the disk exists.
    let parts = &recipe.disk.partitions;
    let root_name = parts
        .iter()
        .find(|p| p.kind == PartitionType::Root)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| "root".into());
    let esp_name = parts
        .iter()
        .find(|p| p.kind == PartitionType::Esp)
        .map(|p| p.name.clone());
    let partuuid =
        |name: &str| uuid::Uuid::from_bytes(derive_id(&seed, &format!("partition:{name}")));
    let root_partuuid = partuuid(&root_name);
    let esp_partuuid = esp_name.as_deref().map(partuuid);

    // rootfs
    let rootfs: RootfsOut = runner.stage(
        "rootfs",
        ROOTFS_VERSION,
        &serde_json::json!({
            "inputs": loaded.inputs,
            "busybox": busybox_pkg.sha256,
            "root": root_partuuid.to_string(),
            "esp": esp_partuuid.map(|u| u.to_string()),
        }),
        || {
            let busybox = read_pkg(&busybox_pkg)?;
            let mounts = crate::rootfs::Mounts {
                root_partuuid: root_partuuid.to_string(),
                esp_partuuid: esp_partuuid.map(|u| u.to_string()),
            };
            let tree = crate::rootfs::busybox_rootfs(&loaded, &busybox, &mounts)?;
            let manifest = to_manifest(&tree, &blobs)?;
            let bytes = serde_json::to_vec(&manifest)
                .map_err(|e| io("writing the manifest")(std::io::Error::other(e)))?;
            let (digest, _) = blobs
                .put_bytes(&bytes)
                .map_err(io("storing the manifest"))?;
            Ok(RootfsOut { manifest: digest })
        },
    )?;

    // kernel + initramfs
    let compression = recipe
        .initramfs
        .compression
        .unwrap_or(crate::recipe::schema::Compression::Zstd);
    let kernel: KernelOut = runner.stage(
        "kernel",
        KERNEL_VERSION,
        &serde_json::json!({
            "kernel": kernel_pkg.sha256,
            "busybox": busybox_pkg.sha256,
            "modules": recipe.initramfs.modules,
            "compression": format!("{compression:?}"),
            "root": root_partuuid.to_string(),
            "epoch": epoch,
        }),
        || {
            let kernel_tree = read_pkg(&kernel_pkg)?;
            let busybox = read_pkg(&busybox_pkg)?;
            let kernel = Kernel::from_tree(&kernel_tree)?;
            let mut spec = InitramfsSpec::new(&kernel, &busybox, root_partuuid.to_string());
            spec.modules = recipe.initramfs.modules.clone();
            spec.compression = compression;
            spec.epoch = epoch;
            let (bytes, closure) = initramfs::build_bytes(&spec)?;
            let (initrd, _) = blobs
                .put_bytes(&bytes)
                .map_err(io("storing the initramfs"))?;
            let mut reader = kernel.vmlinuz.open().map_err(io("reading vmlinuz"))?;
            let (vmlinuz, _) = blobs.put(&mut reader).map_err(io("storing vmlinuz"))?;
            Ok(KernelOut {
                version: kernel.version.clone(),
                vmlinuz,
                initrd,
                modules: closure.names().iter().map(|s| s.to_string()).collect(),
            })
        },
    )?;

    // disk
    let cmdline = recipe
        .boot
        .cmdline
        .clone()
        .unwrap_or_else(|| "console=ttyS0".into());
    let format = match recipe.disk.format {
        Some(DiskFormat::Raw) => ImageFormat::Raw,
        _ => ImageFormat::Qcow2,
    };
    let loader = recipe.boot.loader.unwrap_or(Loader::SystemdBoot);
    let disk: DiskOut = runner.stage(
        "disk",
        DISK_VERSION,
        &serde_json::json!({
            "rootfs": rootfs.manifest,
            "systemd_boot": sdboot_pkg.sha256,
            "vmlinuz": kernel.vmlinuz,
            "initrd": kernel.initrd,
            "cmdline": cmdline,
            "disk": recipe.disk,
            "boot": recipe.boot,
            "name": recipe.name,
            "version": recipe.version,
            "seed": seed,
            "epoch": epoch,
        }),
        || {
            let manifest: Manifest = {
                let file = blobs
                    .open(&rootfs.manifest)
                    .map_err(io("reading the rootfs manifest"))?;
                serde_json::from_reader(std::io::BufReader::new(file))
                    .map_err(|e| io("reading the rootfs manifest")(std::io::Error::other(e)))?
            };
            let root_tree = from_manifest(&manifest, &blobs)?;
            let esp = if loader == Loader::SystemdBoot && esp_name.is_some() {
                let sdboot_tree = read_pkg(&sdboot_pkg)?;
                let sdboot = systemd_boot_from(&sdboot_tree)?;
                let entry = BootEntry {
                    name: recipe.name.clone(),
                    title: recipe
                        .description
                        .clone()
                        .unwrap_or_else(|| recipe.name.clone()),
                    version: recipe.version.clone(),
                    kernel: crate::tree::Content::Host {
                        path: blobs.path(&kernel.vmlinuz),
                        len: file_len(&blobs.path(&kernel.vmlinuz))?,
                    },
                    initrd: Some(crate::tree::Content::Host {
                        path: blobs.path(&kernel.initrd),
                        len: file_len(&blobs.path(&kernel.initrd))?,
                    }),
                    cmdline: cmdline.clone(),
                    root_partuuid: Some(root_partuuid),
                };
                let mut loader_opts = LoaderOptions::new(epoch);
                if let Some(t) = recipe.boot.timeout {
                    loader_opts.timeout_secs = t;
                }
                Some(esp_tree(&sdboot, &[entry], &loader_opts)?)
            } else {
                None
            };
            let mut inputs = Vec::new();
            let mut esp = esp;
            let mut root_tree = Some(root_tree);
            for p in parts {
                let size = match p.size.as_deref() {
                    None => Size::Auto,
                    Some(text) => {
                        parse_size(text).map_err(|e| BuildError::Unsupported(e.to_string()))?
                    }
                };
                let (kind, filesystem, tree) = match p.kind {
                    PartitionType::Esp => (
                        PartitionKind::Esp,
                        Filesystem::Fat32,
                        Some(esp.take().unwrap_or_default()),
                    ),
                    PartitionType::Root => (
                        PartitionKind::RootX86_64,
                        Filesystem::Ext4,
                        root_tree.take(),
                    ),
                    PartitionType::Data => (
                        PartitionKind::LinuxData,
                        if p.filesystem() == FilesystemKind::None {
                            Filesystem::None
                        } else {
                            Filesystem::Ext4
                        },
                        if p.filesystem() == FilesystemKind::None {
                            None
                        } else {
                            Some(Tree::new())
                        },
                    ),
                    PartitionType::Swap => (PartitionKind::Swap, Filesystem::Swap, None),
                };
                inputs.push(PartitionInput {
                    name: p.name.clone(),
                    kind,
                    filesystem,
                    size,
                    label: p.label.clone(),
                    tree,
                });
            }
            let disk_size = match recipe.disk.size.as_deref() {
                None => Size::Auto,
                Some(text) => {
                    parse_size(text).map_err(|e| BuildError::Unsupported(e.to_string()))?
                }
            };
            let spec = DiskSpec {
                size: disk_size,
                image: ImageOptions {
                    format,
                    compress: recipe.disk.compress,
                    ..ImageOptions::default()
                },
                seed: seed.clone(),
                epoch,
                partitions: inputs,
            };
            let tmp_dir = opts.home.join("tmp");
            std::fs::create_dir_all(&tmp_dir).map_err(io("creating the cache's tmp dir"))?;
            let tmp = tmp_dir.join(format!("{}.image", std::process::id()));
            let report = build_disk(&spec, &tmp)?;
            let mut file = std::fs::File::open(&tmp).map_err(io("reading the new image"))?;
            let (image, _) = blobs.put(&mut file).map_err(io("storing the image"))?;
            let _ = std::fs::remove_file(&tmp);
            Ok(DiskOut {
                image,
                disk_size: report.layout.disk_size,
                file_size: report.image.file_size,
            })
        },
    )?;

    // The image goes to the output directory only once verified; boots use the cached blob
    // (attached with snapshot=on, so it is never changed).
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(io(format!("creating {}", opts.out_dir.display())))?;
    let ext = match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    };
    let file_name = match &recipe.version {
        Some(v) => format!("{}-{v}.{ext}", recipe.name),
        None => format!("{}.{ext}", recipe.name),
    };
    let image_path = opts.out_dir.join(file_name);
    let cached_image = blobs.path(&disk.image);

    // verify: one boot per profile, each cached by image digest, profile and marker.
    let mut boots = Vec::new();
    if opts.verify {
        let profiles = if opts.profiles.is_empty() {
            vec![
                recipe
                    .verify
                    .profile
                    .clone()
                    .unwrap_or_else(|| "direct".into()),
            ]
        } else {
            opts.profiles.clone()
        };
        let expect = recipe.verify.expect.clone().unwrap_or_default();
        let timeout = Duration::from_secs(recipe.verify.timeout.unwrap_or(120));
        for profile in profiles {
            let log = if boots.is_empty() {
                verify::serial_log_path(&image_path)
            } else {
                let mut name = image_path.as_os_str().to_os_string();
                name.push(format!(".{profile}.serial.log"));
                PathBuf::from(name)
            };
            let mut summary: BootSummary = runner.stage(
                "verify",
                VERIFY_VERSION,
                &serde_json::json!({
                    "image": disk.image,
                    "profile": profile,
                    "expect": expect,
                    "vmlinuz": kernel.vmlinuz,
                    "initrd": kernel.initrd,
                    "cmdline": cmdline,
                }),
                || {
                    let method = verify::profile::ProfileDir::locate(opts.profiles_dir.as_deref())?
                        .load(&profile)?
                        .boot;
                    let mut bo = BootImageOptions::new(profile.clone(), expect.clone(), timeout);
                    bo.profiles_dir = opts.profiles_dir.clone();
                    if method == verify::profile::BootMethod::Direct {
                        bo.kernel = Some(blobs.path(&kernel.vmlinuz));
                        bo.initrd = Some(blobs.path(&kernel.initrd));
                        bo.cmdline = format!("{cmdline} root=PARTUUID={root_partuuid}");
                    }
                    bo.serial_log = Some(log.clone());
                    let report = verify::boot_image(&cached_image, &bo)?;
                    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
                    Ok(BootSummary {
                        profile: profile.clone(),
                        serial_log: None,
                        accel: report.accel.to_string(),
                        time_to_first_output: secs(report.time_to_first_output),
                        time_to_kernel: secs(report.time_to_kernel),
                        time_to_marker: report.time_to_marker.as_secs_f64(),
                        total: report.total.as_secs_f64(),
                        marker_line: report.marker_line.clone(),
                    })
                },
            )?;
            summary.serial_log = log.exists().then_some(log);
            boots.push(summary);
        }
    }

    copy_sparse(&cached_image, &image_path)?;

    let report = BuildReport {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        inputs: loaded.inputs.clone(),
        image: image_path.clone(),
        image_digest: disk.image.clone(),
        format: ext,
        disk_size: disk.disk_size,
        file_size: disk.file_size,
        kernel_version: kernel.version.clone(),
        modules: kernel.modules.clone(),
        packages,
        stages: runner.stages,
        boots,
        mirror_requests: archive.network_requests(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| io("writing the report")(std::io::Error::other(e)))?;
    let mut report_path = image_path.as_os_str().to_os_string();
    report_path.push(".report.json");
    crate::cache::write_atomic(Path::new(&report_path), &json).map_err(io("writing the report"))?;
    Ok(report)
}

fn file_len(path: &Path) -> Result<u64, BuildError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(io(format!("reading {}", path.display())))
}

/// One package without its dependencies.
fn one_package(archive: &Archive, name: &str) -> Result<PackageRef, BuildError> {
    let mut found = archive.resolve(&[name], Deps::None)?;
    found
        .pop()
        .ok_or_else(|| BuildError::Unsupported(format!("package {name}")))
}

/// The versioned kernel image package behind a name such as `linux-image-cloud-amd64` (a
/// metapackage that depends on `linux-image-<version>-cloud-amd64`).
fn kernel_image_package(archive: &Archive, name: &str) -> Result<PackageRef, BuildError> {
    let mut current = one_package(archive, name)?;
    for _ in 0..4 {
        let next = archive
            .index()?
            .versions_of(&current.name)
            .find(|(_, e)| e.version_str() == current.version)
            .and_then(|(_, e)| {
                e.depends()
                    .split(',')
                    .map(|d| {
                        d.trim()
                            .split([' ', '(', '|'])
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
                    .find(|d| d.starts_with("linux-image-") && d != &current.name)
            });
        match next {
            Some(n) if current.name.ends_with("-amd64") && !looks_versioned(&current.name) => {
                current = one_package(archive, &n)?;
            }
            _ => break,
        }
    }
    Ok(current)
}

/// `linux-image-6.1.0-26-cloud-amd64` (versioned) vs `linux-image-cloud-amd64` (meta).
fn looks_versioned(name: &str) -> bool {
    name.trim_start_matches("linux-image-")
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
}

/// Copy a file keeping its holes.
fn copy_sparse(from: &Path, to: &Path) -> Result<(), BuildError> {
    use crate::tree::Content;
    use std::os::unix::fs::FileExt;
    let len = file_len(from)?;
    let content = Content::Host {
        path: from.to_path_buf(),
        len,
    };
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("creating a file in {}", dir.display())))?;
    tmp.as_file()
        .set_len(len)
        .map_err(io("sizing the image copy"))?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, length) in content
        .data_ranges()
        .map_err(io("reading the cached image"))?
    {
        let mut off = start;
        while off < start + length {
            let want = ((start + length - off) as usize).min(buf.len());
            let n = content
                .read_at(off, &mut buf[..want])
                .map_err(io("reading the cached image"))?;
            if n == 0 {
                break;
            }
            tmp.as_file()
                .write_all_at(&buf[..n], off)
                .map_err(io("writing the image copy"))?;
            off += n as u64;
        }
    }
    tmp.as_file()
        .sync_all()
        .map_err(io("syncing the image copy"))?;
    tmp.persist(to)
        .map_err(|e| io(format!("writing {}", to.display()))(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_kernel_names() {
        assert!(looks_versioned("linux-image-6.1.0-26-cloud-amd64"));
        assert!(!looks_versioned("linux-image-cloud-amd64"));
    }
}
