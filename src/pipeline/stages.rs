//! The stages of a build as functions of a serializable [`BuildState`]: packages → rootfs → kernel
//! → disk → verify. Each stage reads what earlier stages recorded in the state (content digests,
//! resolved in the blob store), runs — or finds its result recorded under its key — and adds its
//! outputs to the state. The same functions run in `kiln build` and on NATS workers; a worker that
//! did not run the stage before gets the blobs it needs through the store.

use super::cache::stage_key;
use crate::boot::{BootEntry, LoaderOptions, esp_tree, systemd_boot_from};
use crate::cache::{BlobStore, Digest256};
use crate::disk::build::{DiskSpec, PartitionInput, build_disk};
use crate::disk::derive_id;
use crate::disk::gpt::PartitionKind;
use crate::disk::image::{ImageFormat, ImageOptions};
use crate::disk::layout::{Filesystem, Size, parse_size};
use crate::kernel::Kernel;
use crate::kernel::build::{BuildRequest, KernelBuildError, ROOT_BUILTIN};
use crate::kernel::initramfs::{self, InitramfsSpec};
use crate::manifest::{Manifest, from_manifest, to_manifest};
use crate::packages::{Archive, ArchiveOptions, Deps, PackageRef, read_into_tree};
use crate::recipe::Loaded;
use crate::recipe::schema::{
    Compression, DiskFormat, FilesystemKind, Loader, PartitionType, RootfsBase,
};
use crate::tree::{Content, Tree};
use crate::verify::{self, BootImageOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a stage runs: the local cache and how to reach the Debian archive and QEMU profiles.
#[derive(Debug, Clone)]
pub struct StageEnv {
    /// `$KILN_HOME`.
    pub home: PathBuf,
    pub blobs: BlobStore,
    /// Debian archive settings; the suite comes from the recipe.
    pub archive: ArchiveOptions,
    pub profiles_dir: Option<PathBuf>,
    /// Requests made to the Debian mirror by the stages run in this environment.
    pub mirror_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Archives opened by the stages run in this environment (see [`open_archive`]).
    archives: std::sync::Arc<ArchiveMemo>,
}

impl StageEnv {
    pub fn new(home: PathBuf, archive: ArchiveOptions, profiles_dir: Option<PathBuf>) -> Self {
        StageEnv {
            blobs: BlobStore::new(&home),
            home,
            archive,
            profiles_dir,
            mirror_requests: Default::default(),
            archives: Default::default(),
        }
    }

    /// Count the requests an archive made since it was last noted.
    fn note(&self, archive: &OpenedArchive) {
        use std::sync::atomic::Ordering;
        let now = archive.archive.network_requests();
        let before = archive.noted.swap(now, Ordering::Relaxed);
        self.mirror_requests
            .fetch_add(now.saturating_sub(before), Ordering::Relaxed);
    }
}

/// An archive opened by [`open_archive`], shared by the stages of one environment.
struct OpenedArchive {
    /// The options it was opened with (`Debug` text).
    key: String,
    opened: Instant,
    archive: Archive,
    /// Its request count when last added to [`StageEnv::mirror_requests`].
    noted: std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for OpenedArchive {
    type Target = Archive;
    fn deref(&self) -> &Archive {
        &self.archive
    }
}

/// How long an opened archive is reused at most (less when `release_max_age` is shorter).
const ARCHIVE_REUSE: Duration = Duration::from_secs(300);

/// The archives an environment opened. Opening one verifies InRelease's signature and builds an
/// HTTP client: with many cached builds (a stage hit costs only a record lookup otherwise) that
/// was most of a worker's time, so an archive is reused while its InRelease would be anyway.
#[derive(Default)]
struct ArchiveMemo {
    opened: std::sync::Mutex<Vec<std::sync::Arc<OpenedArchive>>>,
}

impl std::fmt::Debug for ArchiveMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveMemo").finish_non_exhaustive()
    }
}

/// Where stage results are recorded (the local stage cache, or a shared KV bucket).
pub trait StageRecords {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value>;
    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()>;
}

impl StageRecords for super::cache::StageCache {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value> {
        super::cache::StageCache::get(self, stage, key)
    }
    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        super::cache::StageCache::put(self, stage, key, outputs)
    }
}

/// How far a running stage got: what it is doing and, when known, the fraction done.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    /// Done so far, 0.0–1.0, when known.
    pub fraction: Option<f64>,
    /// What is happening, one line (e.g. `fetched 2/3 packages, 41 of 63 MiB`).
    pub message: String,
}

impl ProgressUpdate {
    pub fn new(fraction: Option<f64>, message: impl Into<String>) -> Self {
        ProgressUpdate {
            fraction: fraction.map(|f| f.clamp(0.0, 1.0)),
            message: message.into(),
        }
    }
}

/// Where a running stage reports its progress. Stages may call it often (several times a
/// second); rate limiting is the receiver's job. Called from the stage's own thread.
pub trait ProgressSink: Send + Sync {
    fn progress(&self, stage: &Stage, update: ProgressUpdate);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _: &Stage, _: ProgressUpdate) {}
}

impl<F: Fn(&Stage, ProgressUpdate) + Send + Sync> ProgressSink for F {
    fn progress(&self, stage: &Stage, update: ProgressUpdate) {
        self(stage, update)
    }
}

/// Run `work` while `tick(elapsed)` is called every `period` on another thread.
fn with_ticker<T>(
    period: Duration,
    tick: impl Fn(Duration) + Send + Sync,
    work: impl FnOnce() -> T,
) -> T {
    let started = Instant::now();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let tick = &tick;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period)
            {
                tick(started.elapsed());
            }
        });
        let out = work();
        drop(stop);
        out
    })
}

/// The last non-empty line of a (growing) text file, printable characters only, at most
/// `max` characters.
fn last_line(path: &Path, max: usize) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .rfind(|l| !l.trim().is_empty())?;
    Some(line.trim().chars().take(max).collect())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The stages after render, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Packages,
    Rootfs,
    Kernel,
    Disk,
    /// Boot under one QEMU profile.
    Verify(String),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Packages => "packages",
            Stage::Rootfs => "rootfs",
            Stage::Kernel => "kernel",
            Stage::Disk => "disk",
            Stage::Verify(_) => "verify",
        }
    }

    /// Format version: bump when the stage's output for the same inputs changes.
    fn version(&self) -> u32 {
        1
    }
}

/// The packages a busybox build uses, chosen from one signed release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChosenPackages {
    /// The kernel image package, or the `linux-source-*` package when the recipe builds its
    /// kernel (`kernel.build`).
    pub kernel: PackageRef,
    pub busybox: PackageRef,
    pub systemd_boot: PackageRef,
}

impl ChosenPackages {
    /// The packages a build downloads: a Debian image's kernel comes from its own base
    /// (mmdebstrap installs it), so its package is named but never fetched.
    pub fn fetched(&self, debian: bool) -> Vec<&PackageRef> {
        [&self.kernel, &self.busybox, &self.systemd_boot]
            .into_iter()
            .filter(|p| !(debian && *p == &self.kernel))
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
}

/// The Debian base step (inside the rootfs stage, cached on its own under `debian-base`).
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

/// One run of the Debian base step, for the rootfs stage's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseRun {
    pub key: Digest256,
    /// `hit` or `miss`.
    pub cache: String,
    pub seconds: f64,
    #[serde(flatten)]
    pub out: BaseOut,
}

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
    fn blobs(&self) -> Vec<Digest256> {
        let mut out = vec![self.vmlinuz.clone()];
        out.extend(self.initrd.clone());
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskOut {
    pub image: Digest256,
    /// `raw` or `qcow2`.
    pub format: String,
    pub disk_size: u64,
    pub file_size: u64,
}

/// What a boot proved (cached by image digest, profile and marker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSummary {
    pub profile: String,
    /// The serial console of this boot.
    pub serial_log: Option<PathBuf>,
    /// The serial log's content as a blob, so that a host other than the one that booted the
    /// image can deliver it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log_blob: Option<Digest256>,
    pub accel: String,
    pub time_to_first_output: Option<f64>,
    pub time_to_kernel: Option<f64>,
    pub time_to_marker: f64,
    pub total: f64,
    pub marker_line: String,
}

/// Everything a build has made so far; it travels with the build from stage to stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildState {
    pub loaded: Loaded,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<ChosenPackages>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskOut>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boots: Vec<BootSummary>,
}

impl BuildState {
    pub fn new(loaded: Loaded) -> Self {
        BuildState {
            loaded,
            packages: None,
            rootfs: None,
            kernel: None,
            disk: None,
            boots: Vec::new(),
        }
    }

    /// The digests this state refers to that a worker needs locally to run `stage`.
    pub fn blobs_needed(&self, stage: &Stage) -> Vec<Digest256> {
        let mut out = Vec::new();
        let debs = || -> Vec<Digest256> {
            self.packages
                .iter()
                .flat_map(|c| c.fetched(is_debian(&self.loaded)))
                .map(|p| p.sha256.clone())
                .collect()
        };
        match stage {
            Stage::Packages => {}
            Stage::Rootfs => out.extend(debs()),
            Stage::Kernel => {
                out.extend(debs());
                // A Debian image's kernel is read from its base (the base's files: the worker).
                out.extend(self.rootfs.iter().filter_map(|r| r.base.clone()));
            }
            Stage::Disk => {
                out.extend(debs());
                out.extend(self.rootfs.iter().map(|r| r.manifest.clone()));
                out.extend(self.kernel.iter().flat_map(KernelOut::blobs));
            }
            Stage::Verify(_) => {
                out.extend(self.kernel.iter().flat_map(KernelOut::blobs));
                out.extend(self.disk.iter().map(|d| d.image.clone()));
            }
        }
        out
    }
}

/// One stage run, for reports and messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    /// `hit` or `miss`.
    pub cache: String,
    pub seconds: f64,
    pub key: Digest256,
    /// The stage's outputs.
    pub outputs: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("packages: {0}")]
    Packages(#[from] crate::packages::PackagesError),
    #[error("reading package {package}: {message}")]
    Deb { package: String, message: String },
    #[error("rootfs: {0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("debian base: {0}")]
    Debian(#[from] crate::debian::DebianError),
    #[error("verify: {0}")]
    SystemState(#[from] crate::systemd::SystemStateError),
    #[error("kernel: {0}")]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("kernel build: {0}")]
    KernelBuild(#[from] KernelBuildError),
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
    #[error("{0} must run before this stage")]
    Missing(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl StageError {
    /// Whether the user's input is at fault (a retry cannot help) rather than the environment.
    pub fn is_input_error(&self) -> bool {
        if let StageError::KernelBuild(e) = self {
            return e.is_input_error();
        }
        matches!(
            self,
            StageError::Unsupported(_)
                | StageError::Kernel(_)
                | StageError::Initramfs(_)
                | StageError::Verify(_)
                | StageError::Rootfs(_)
                | StageError::SystemState(_)
                | StageError::Debian(crate::debian::DebianError::LocaleNeedsPackage { .. })
                | StageError::Packages(crate::packages::PackagesError::Resolve(_))
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
    let what = what.into();
    move |source| StageError::Io { what, source }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, StageError> {
    serde_json::to_value(v).map_err(|e| io("recording stage outputs")(std::io::Error::other(e)))
}

fn from_json<T: for<'de> Deserialize<'de>>(v: Value) -> Option<T> {
    serde_json::from_value(v).ok()
}

/// The checks a recipe must pass before its stages can run.
pub fn check_supported(loaded: &Loaded) -> Result<(), StageError> {
    if loaded.recipe.kernel.build.is_some() && loaded.recipe.rootfs.base != RootfsBase::Busybox {
        return Err(StageError::Unsupported(
            "kernel.build with rootfs.base: debian (a Debian image boots the kernel of its own packages)"
                .into(),
        ));
    }
    Ok(())
}

/// Run one stage against `records`: a recorded result is reused, otherwise the stage runs and
/// its result is recorded. The outputs are added to `state`.
pub fn run_stage(
    env: &StageEnv,
    records: &dyn StageRecords,
    stage: &Stage,
    state: &mut BuildState,
    progress: &dyn ProgressSink,
) -> Result<StageReport, StageError> {
    let started = Instant::now();
    let (key, outputs, hit) = match stage {
        Stage::Packages => {
            let archive = open_archive(env, &state.loaded)?;
            let inputs = json!({
                "release": archive.release_digest(),
                "kernel": kernel_package_name(&state.loaded),
                "mirror": archive.options().mirror,
                "arch": archive.options().arch,
                "components": archive.options().components,
            });
            let key = stage_key(stage.name(), stage.version(), &inputs);
            let (chosen, hit) = match records.get(stage.name(), &key).and_then(from_json) {
                Some(c) => (c, true),
                None => (choose_packages(&archive, &state.loaded)?, false),
            };
            let chosen: ChosenPackages = chosen;
            let all = chosen.fetched(is_debian(&state.loaded));
            let total: u64 = all.iter().map(|p| p.size).sum();
            let mut done = 0u64;
            for (i, p) in all.iter().enumerate() {
                let fraction = Some(done as f64 / total.max(1) as f64);
                if env.blobs.contains(&p.sha256) {
                    progress.progress(
                        stage,
                        ProgressUpdate::new(fraction, format!("{} {} cached", p.name, p.version)),
                    );
                } else {
                    progress.progress(
                        stage,
                        ProgressUpdate::new(
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
                        ),
                    );
                    archive.fetch(p)?;
                }
                done += p.size;
            }
            progress.progress(
                stage,
                ProgressUpdate::new(Some(1.0), format!("{} packages, {}", all.len(), mib(total))),
            );
            env.note(&archive);
            let out = to_json(&chosen)?;
            state.packages = Some(chosen);
            (key, out, hit)
        }
        Stage::Rootfs => {
            let pk = state
                .packages
                .as_ref()
                .ok_or(StageError::Missing("packages"))?;
            let ids = Partitions::of(&state.loaded);
            let base = if is_debian(&state.loaded) {
                Some(debian_base(env, records, &state.loaded)?)
            } else {
                None
            };
            let base_manifest = base.as_ref().map(|b| b.out.manifest.clone());
            let inputs = json!({
                "inputs": state.loaded.inputs,
                "busybox": pk.busybox.sha256,
                "root": ids.root.to_string(),
                "esp": ids.esp.map(|u| u.to_string()),
                "base": base_manifest,
            });
            let (key, out, hit) = cached(records, stage, &inputs, || {
                rootfs(env, state, base_manifest.as_ref())
            })?;
            state.rootfs = Some(out.clone());
            let mut json_out = to_json(&out)?;
            if let (Some(b), Value::Object(map)) = (&base, &mut json_out) {
                map.insert("base_step".into(), to_json(b)?);
            }
            (key, json_out, hit)
        }
        Stage::Kernel => {
            let pk = state
                .packages
                .as_ref()
                .ok_or(StageError::Missing("packages"))?;
            let ids = Partitions::of(&state.loaded);
            let recipe = &state.loaded.recipe;
            if let Some(build) = &recipe.kernel.build {
                // The build's own cache (keyed by the merged configuration) is under this.
                let inputs = json!({
                    "source": pk.kernel.sha256,
                    "fragment": state.loaded.kernel_fragment,
                    "base": build.base,
                    "toolchain": crate::kernel::build::check_build_tools()?,
                    "epoch": state.loaded.source_date_epoch,
                });
                let (key, out, hit) = cached(records, stage, &inputs, || built_kernel(env, state))?;
                state.kernel = Some(out.clone());
                let outputs = to_json(&out)?;
                if !hit {
                    records
                        .put(stage.name(), &key, &outputs)
                        .map_err(io(format!("recording the {} stage", stage.name())))?;
                }
                return Ok(report(stage, started, key, outputs, hit));
            }
            let base = state.rootfs.as_ref().and_then(|r| r.base.clone());
            let inputs = json!({
                "kernel": if base.is_some() { None } else { Some(&pk.kernel.sha256) },
                "base": base,
                "busybox": pk.busybox.sha256,
                "modules": recipe.initramfs.modules,
                "compression": recipe.initramfs.compression,
                "root": ids.root.to_string(),
                "epoch": state.loaded.source_date_epoch,
            });
            let (key, out, hit) = cached(records, stage, &inputs, || kernel(env, state))?;
            state.kernel = Some(out.clone());
            (key, to_json(&out)?, hit)
        }
        Stage::Disk => {
            let pk = state
                .packages
                .as_ref()
                .ok_or(StageError::Missing("packages"))?;
            let rootfs_out = state.rootfs.as_ref().ok_or(StageError::Missing("rootfs"))?;
            let kernel_out = state.kernel.as_ref().ok_or(StageError::Missing("kernel"))?;
            let recipe = &state.loaded.recipe;
            let inputs = json!({
                "rootfs": rootfs_out.manifest,
                "systemd_boot": pk.systemd_boot.sha256,
                "vmlinuz": kernel_out.vmlinuz,
                "initrd": kernel_out.initrd,
                "disk": recipe.disk,
                "boot": recipe.boot,
                "name": recipe.name,
                "description": recipe.description,
                "version": recipe.version,
                "seed": state.loaded.inputs,
                "epoch": state.loaded.source_date_epoch,
            });
            let (key, out, hit) = cached(records, stage, &inputs, || {
                disk(env, state, stage, progress)
            })?;
            state.disk = Some(out.clone());
            (key, to_json(&out)?, hit)
        }
        Stage::Verify(profile) => {
            let kernel_out = state.kernel.as_ref().ok_or(StageError::Missing("kernel"))?;
            let disk_out = state.disk.as_ref().ok_or(StageError::Missing("disk"))?;
            // The profile's settings, not only its name: a changed machine boots again.
            let machine =
                verify::profile::ProfileDir::locate(env.profiles_dir.as_deref())?.load(profile)?;
            let inputs = json!({
                "image": disk_out.image,
                "profile": profile,
                "machine": machine,
                "expect": state.loaded.recipe.verify.expect,
                "vmlinuz": kernel_out.vmlinuz,
                "initrd": kernel_out.initrd,
                "cmdline": kernel_cmdline(&state.loaded, kernel_out),
            });
            let (key, out, hit) = cached(records, stage, &inputs, || {
                let log = default_serial_log(env, disk_out, profile);
                let tick = |elapsed: Duration| {
                    let line = last_line(&log, 100).unwrap_or_default();
                    progress.progress(
                        stage,
                        ProgressUpdate::new(
                            None,
                            format!("booting {profile} {:.1} s: {line}", elapsed.as_secs_f64()),
                        ),
                    );
                };
                let summary = with_ticker(Duration::from_millis(250), tick, || {
                    verify_boot(env, state, profile, Some(log.clone()))
                })?;
                if crate::systemd::reports_state(&state.loaded) {
                    let serial = summary
                        .serial_log
                        .as_ref()
                        .and_then(|p| std::fs::read_to_string(p).ok())
                        .unwrap_or_default();
                    let log_name = summary
                        .serial_log
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    crate::systemd::check_system_state(&summary.marker_line, &serial, &log_name)?;
                }
                Ok(summary)
            })?;
            // What the publish stage checks before it signs: this worker booted this image
            // to this marker (see [`verified_key`]).
            let proof = verified_key(&disk_out.image, &state.loaded.recipe.verify.expect, profile);
            if records.get(VERIFIED, &proof).is_none() {
                let record = json!({
                    "image": disk_out.image, "profile": profile,
                    "expect": state.loaded.recipe.verify.expect, "boot": key,
                });
                records
                    .put(VERIFIED, &proof, &record)
                    .map_err(io("recording the verified boot"))?;
            }
            state.boots.push(out.clone());
            (key, to_json(&out)?, hit)
        }
    };
    if !hit {
        records
            .put(stage.name(), &key, &outputs)
            .map_err(io(format!("recording the {} stage", stage.name())))?;
    }
    Ok(report(stage, started, key, outputs, hit))
}

fn report(
    stage: &Stage,
    started: Instant,
    key: Digest256,
    outputs: Value,
    hit: bool,
) -> StageReport {
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        stage = stage.name(),
        cache = if hit { "hit" } else { "miss" },
        "{seconds:.2} s"
    );
    StageReport {
        stage: stage.name().to_string(),
        cache: if hit { "hit" } else { "miss" }.to_string(),
        seconds,
        key,
        outputs,
    }
}

/// The records of boots that passed: one per image, marker and profile, written by the verify
/// stage itself whenever a boot of that image printed that marker. The publish stage signs only
/// images with such records, whatever the message that triggered it claims.
pub const VERIFIED: &str = "verified";

/// The key of a [`VERIFIED`] record.
pub fn verified_key(image: &Digest256, expect: &Option<String>, profile: &str) -> Digest256 {
    stage_key(
        VERIFIED,
        1,
        &json!({ "image": image, "expect": expect, "profile": profile }),
    )
}

/// Look a stage's result up by key, or compute it.
fn cached<T, F>(
    records: &dyn StageRecords,
    stage: &Stage,
    inputs: &Value,
    run: F,
) -> Result<(Digest256, T, bool), StageError>
where
    T: for<'de> Deserialize<'de>,
    F: FnOnce() -> Result<T, StageError>,
{
    let key = stage_key(stage.name(), stage.version(), inputs);
    if let Some(out) = records.get(stage.name(), &key).and_then(from_json) {
        return Ok((key, out, true));
    }
    Ok((key, run()?, false))
}

/// The recipe's archive: reused from this environment when it was opened with the same options
/// less than [`ARCHIVE_REUSE`] (and `release_max_age`) ago, else opened (InRelease verified).
fn open_archive(
    env: &StageEnv,
    loaded: &Loaded,
) -> Result<std::sync::Arc<OpenedArchive>, StageError> {
    let mut opts = env.archive.clone();
    opts.home = env.home.clone();
    if let Some(suite) = &loaded.recipe.rootfs.suite {
        opts.suite = suite.clone();
    }
    let key = format!("{opts:?}");
    let reuse = ARCHIVE_REUSE.min(opts.release_max_age);
    let mut memo = env
        .archives
        .opened
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    memo.retain(|a| a.opened.elapsed() < reuse);
    if let Some(a) = memo.iter().find(|a| a.key == key) {
        return Ok(a.clone());
    }
    let opened = std::sync::Arc::new(OpenedArchive {
        key,
        opened: Instant::now(),
        archive: Archive::open_lazy(opts)?,
        noted: Default::default(),
    });
    memo.push(opened.clone());
    Ok(opened)
}

fn kernel_package_name(loaded: &Loaded) -> String {
    if loaded.recipe.kernel.build.is_some() {
        return SOURCE_PACKAGE.into();
    }
    loaded
        .recipe
        .kernel
        .package
        .clone()
        .unwrap_or_else(|| "linux-image-cloud-amd64".into())
}

/// The metapackage of the current kernel source (`linux-source` → `linux-source-6.1`).
const SOURCE_PACKAGE: &str = "linux-source";

fn choose_packages(archive: &Archive, loaded: &Loaded) -> Result<ChosenPackages, StageError> {
    Ok(ChosenPackages {
        kernel: versioned_package(archive, &kernel_package_name(loaded))?,
        busybox: one_package(archive, "busybox-static")?,
        systemd_boot: one_package(archive, "systemd-boot-efi")?,
    })
}

/// The `.deb` of a package in the local store, downloaded (and verified) if missing.
fn deb_path(env: &StageEnv, loaded: &Loaded, p: &PackageRef) -> Result<PathBuf, StageError> {
    if env.blobs.contains(&p.sha256) {
        return Ok(env.blobs.path(&p.sha256));
    }
    let archive = open_archive(env, loaded)?;
    let path = archive.fetch(p);
    env.note(&archive);
    Ok(path?)
}

fn read_pkg(env: &StageEnv, loaded: &Loaded, p: &PackageRef) -> Result<Tree, StageError> {
    let path = deb_path(env, loaded, p)?;
    let mut tree = Tree::new();
    read_into_tree(&path, &p.deb_limits(), &mut tree, &env.blobs).map_err(|e| StageError::Deb {
        package: p.name.clone(),
        message: e.to_string(),
    })?;
    Ok(tree)
}

/// Copy `len` bytes at `start` of `from` to the same offset of `to` inside the kernel
/// (`copy_file_range`: no round trip through user memory). On failure returns the offset up to
/// which bytes were copied, for the caller to go on another way.
fn kernel_copy(from: &std::fs::File, to: &std::fs::File, start: u64, len: u64) -> Result<(), u64> {
    use std::os::fd::AsRawFd;
    let (mut off_in, mut off_out) = (start as libc::loff_t, start as libc::loff_t);
    let end = start + len;
    while (off_in as u64) < end {
        let want = ((end - off_in as u64) as usize).min(1 << 30);
        // SAFETY: both descriptors are open for the call; the offsets are ours to update.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n <= 0 {
            return Err(off_in as u64);
        }
    }
    Ok(())
}

/// Partition identities follow from the seed (`build.inputs`), so the initramfs and fstab can
/// name them before the disk exists.
pub struct Partitions {
    pub root: uuid::Uuid,
    pub esp: Option<uuid::Uuid>,
}

impl Partitions {
    pub fn of(loaded: &Loaded) -> Self {
        let parts = &loaded.recipe.disk.partitions;
        let id = |name: &str| {
            uuid::Uuid::from_bytes(derive_id(&loaded.inputs, &format!("partition:{name}")))
        };
        let root = parts
            .iter()
            .find(|p| p.kind == PartitionType::Root)
            .map(|p| p.name.as_str())
            .unwrap_or("root");
        let esp = parts
            .iter()
            .find(|p| p.kind == PartitionType::Esp)
            .map(|p| id(&p.name));
        Partitions {
            root: id(root),
            esp,
        }
    }
}

fn cmdline(loaded: &Loaded) -> String {
    loaded
        .recipe
        .boot
        .cmdline
        .clone()
        .unwrap_or_else(|| "console=ttyS0".into())
}

/// The recipe's command line, plus what a kernel that mounts root itself (no initramfs) needs:
/// wait for the disk, ext4, read-write (the initramfs does this otherwise).
fn kernel_cmdline(loaded: &Loaded, kernel: &KernelOut) -> String {
    let base = cmdline(loaded);
    if kernel.initrd.is_some() {
        return base;
    }
    format!("{} rootwait rootfstype=ext4 rw", base.trim())
}

fn rootfs(
    env: &StageEnv,
    state: &BuildState,
    base: Option<&Digest256>,
) -> Result<RootfsOut, StageError> {
    let pk = state
        .packages
        .as_ref()
        .ok_or(StageError::Missing("packages"))?;
    let ids = Partitions::of(&state.loaded);
    let mounts = crate::rootfs::Mounts {
        root_partuuid: ids.root.to_string(),
        esp_partuuid: ids.esp.map(|u| u.to_string()),
    };
    let tree = match base {
        Some(base) => {
            let base_tree = load_tree(&env.blobs, base, "the Debian base manifest")?;
            crate::debian::debian_rootfs(&state.loaded, base_tree, &mounts)?
        }
        None => {
            let busybox = read_pkg(env, &state.loaded, &pk.busybox)?;
            crate::rootfs::busybox_rootfs(&state.loaded, &busybox, &mounts)?
        }
    };
    let digest = store_tree(&env.blobs, &tree)?;
    Ok(RootfsOut {
        manifest: digest,
        base: base.cloned(),
    })
}

/// Write a Tree's manifest into the blob store.
fn store_tree(blobs: &BlobStore, tree: &Tree) -> Result<Digest256, StageError> {
    let manifest = to_manifest(tree, blobs)?;
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| io("writing the manifest")(std::io::Error::other(e)))?;
    let (digest, _) = blobs
        .put_bytes(&bytes)
        .map_err(io("storing the manifest"))?;
    Ok(digest)
}

/// Read a Tree back from a manifest in the blob store.
fn load_tree(blobs: &BlobStore, digest: &Digest256, what: &str) -> Result<Tree, StageError> {
    Ok(from_manifest(&read_manifest(blobs, digest, what)?, blobs)?)
}

fn read_manifest(
    blobs: &BlobStore,
    digest: &Digest256,
    what: &str,
) -> Result<Manifest, StageError> {
    let file = blobs
        .open(digest)
        .map_err(io(format!("reading {what} {digest}")))?;
    serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| io(format!("reading {what} {digest}"))(std::io::Error::other(e)))
}

/// The kernel's files of a Debian base (see [`crate::debian::kernel_tree`]). Only their blobs
/// must be local: a worker on another host fetches just these.
fn base_kernel_tree(blobs: &BlobStore, base: &Digest256) -> Result<Tree, StageError> {
    let mut manifest = read_manifest(blobs, base, "the Debian base manifest")?;
    manifest.entries.retain(|e| {
        !matches!(e.kind, crate::manifest::ManifestKind::File { .. })
            || crate::debian::holds_kernel(&e.path)
    });
    let image = from_manifest(&manifest, blobs)?;
    Ok(crate::debian::kernel_tree(&image).map_err(crate::manifest::ManifestError::from)?)
}

pub fn is_debian(loaded: &Loaded) -> bool {
    loaded.recipe.rootfs.base == RootfsBase::Debian
}

/// The Debian base of a recipe: looked up under its own key (suite, the mirror's signed release,
/// variant, components, packages), else made by mmdebstrap and recorded. Unknown package names
/// are reported from kiln's index before mmdebstrap runs.
fn debian_base(
    env: &StageEnv,
    records: &dyn StageRecords,
    loaded: &Loaded,
) -> Result<BaseRun, StageError> {
    const STEP: &str = "debian-base";
    let started = Instant::now();
    let archive = open_archive(env, loaded)?;
    let spec = crate::debian::BaseSpec::of(loaded, &archive.options().mirror)?;
    let key = stage_key(STEP, 1, &spec.key_inputs(archive.release_digest().as_str()));
    let recorded: Option<BaseOut> = records.get(STEP, &key).and_then(from_json);
    if let Some(out) = recorded
        && env.blobs.contains(&out.manifest)
    {
        env.note(&archive);
        return Ok(BaseRun {
            key,
            cache: "hit".into(),
            seconds: started.elapsed().as_secs_f64(),
            out,
        });
    }
    let checked = spec.check_packages(&archive);
    env.note(&archive);
    checked?;
    let epoch = archive.release().date.unwrap_or(1);
    let tree = crate::debian::build_base(&spec, &env.blobs, epoch)?;
    let out = BaseOut {
        manifest: store_tree(&env.blobs, &tree)?,
        entries: tree.len(),
        bytes: tree.content_bytes(),
        mmdebstrap: spec.mmdebstrap_args(),
    };
    records
        .put(STEP, &key, &to_json(&out)?)
        .map_err(io("recording the Debian base"))?;
    tracing::info!(
        entries = out.entries,
        bytes = out.bytes,
        "Debian base made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(BaseRun {
        key,
        cache: "miss".into(),
        seconds: started.elapsed().as_secs_f64(),
        out,
    })
}

fn kernel(env: &StageEnv, state: &BuildState) -> Result<KernelOut, StageError> {
    let pk = state
        .packages
        .as_ref()
        .ok_or(StageError::Missing("packages"))?;
    let recipe = &state.loaded.recipe;
    let kernel_tree = match state.rootfs.as_ref().and_then(|r| r.base.as_ref()) {
        Some(base) => base_kernel_tree(&env.blobs, base)?,
        None => read_pkg(env, &state.loaded, &pk.kernel)?,
    };
    let busybox = read_pkg(env, &state.loaded, &pk.busybox)?;
    let kernel = Kernel::from_tree(&kernel_tree)?;
    let ids = Partitions::of(&state.loaded);
    let mut spec = InitramfsSpec::new(&kernel, &busybox, ids.root.to_string());
    spec.modules = recipe.initramfs.modules.clone();
    spec.compression = recipe.initramfs.compression.unwrap_or(Compression::Zstd);
    spec.epoch = state.loaded.source_date_epoch;
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

/// `kernel.build`: build the kernel from the `linux-source-*` package and the recipe's fragment
/// (or find it built), and store it. A kernel with the root disk's drivers built in boots with
/// no initramfs.
fn built_kernel(env: &StageEnv, state: &BuildState) -> Result<KernelOut, StageError> {
    let pk = state
        .packages
        .as_ref()
        .ok_or(StageError::Missing("packages"))?;
    let loaded = &state.loaded;
    let build = loaded
        .recipe
        .kernel
        .build
        .as_ref()
        .ok_or(StageError::Missing("kernel.build"))?;
    let fragment = loaded.kernel_fragment.clone().ok_or_else(|| {
        StageError::Unsupported(
            "kernel.build without its fragment's text (reload the recipe)".into(),
        )
    })?;
    let request = BuildRequest {
        home: env.home.clone(),
        source_deb: deb_path(env, loaded, &pk.kernel)?,
        source_digest: pk.kernel.sha256.clone(),
        fragment_name: build.fragment.clone(),
        fragment,
        base: build.base,
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
            "a built kernel whose root disk drivers are not built in (an initramfs for built              kernels is not supported yet); add to {}: {}",
            build.fragment,
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

fn blob_content(blobs: &BlobStore, digest: &Digest256) -> Result<Content, StageError> {
    let path = blobs.path(digest);
    let len = std::fs::metadata(&path)
        .map_err(io(format!("reading blob {digest}")))?
        .len();
    Ok(Content::Host { path, len })
}

fn disk(
    env: &StageEnv,
    state: &BuildState,
    stage: &Stage,
    progress: &dyn ProgressSink,
) -> Result<DiskOut, StageError> {
    let pk = state
        .packages
        .as_ref()
        .ok_or(StageError::Missing("packages"))?;
    let rootfs_out = state.rootfs.as_ref().ok_or(StageError::Missing("rootfs"))?;
    let kernel_out = state.kernel.as_ref().ok_or(StageError::Missing("kernel"))?;
    let loaded = &state.loaded;
    let recipe = &loaded.recipe;
    let blobs = &env.blobs;
    let root_tree = load_tree(blobs, &rootfs_out.manifest, "the rootfs manifest")?;
    let ids = Partitions::of(loaded);
    let loader = recipe.boot.loader.unwrap_or(Loader::SystemdBoot);
    let mut esp = if loader == Loader::SystemdBoot && ids.esp.is_some() {
        let sdboot = systemd_boot_from(&read_pkg(env, loaded, &pk.systemd_boot)?)?;
        let entry = BootEntry {
            name: recipe.name.clone(),
            title: recipe
                .description
                .clone()
                .unwrap_or_else(|| recipe.name.clone()),
            version: recipe.version.clone(),
            kernel: blob_content(blobs, &kernel_out.vmlinuz)?,
            initrd: match &kernel_out.initrd {
                Some(d) => Some(blob_content(blobs, d)?),
                None => None,
            },
            cmdline: kernel_cmdline(loaded, kernel_out),
            root_partuuid: Some(ids.root),
        };
        let mut loader_opts = LoaderOptions::new(loaded.source_date_epoch);
        if let Some(t) = recipe.boot.timeout {
            loader_opts.timeout_secs = t;
        }
        Some(esp_tree(&sdboot, &[entry], &loader_opts)?)
    } else {
        None
    };
    let mut root_tree = Some(root_tree);
    let size = |text: Option<&str>| -> Result<Size, StageError> {
        match text {
            None => Ok(Size::Auto),
            Some(t) => parse_size(t).map_err(|e| StageError::Unsupported(e.to_string())),
        }
    };
    let mut inputs = Vec::new();
    for p in &recipe.disk.partitions {
        let raw = p.filesystem() == FilesystemKind::None;
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
            PartitionType::Data if raw => (PartitionKind::LinuxData, Filesystem::None, None),
            PartitionType::Data => (
                PartitionKind::LinuxData,
                Filesystem::Ext4,
                Some(Tree::new()),
            ),
            PartitionType::Swap => (PartitionKind::Swap, Filesystem::Swap, None),
        };
        inputs.push(PartitionInput {
            name: p.name.clone(),
            kind,
            filesystem,
            size: size(p.size.as_deref())?,
            label: p.label.clone(),
            tree,
        });
    }
    let format = match recipe.disk.format {
        Some(DiskFormat::Raw) => ImageFormat::Raw,
        _ => ImageFormat::Qcow2,
    };
    let spec = DiskSpec {
        size: size(recipe.disk.size.as_deref())?,
        image: ImageOptions {
            format,
            compress: recipe.disk.compress,
            ..ImageOptions::default()
        },
        seed: loaded.inputs.clone(),
        epoch: loaded.source_date_epoch,
        partitions: inputs,
    };
    let tmp_dir = env.home.join("tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(io("creating the cache's tmp dir"))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{}image-", crate::cache::temp_prefix()))
        .tempdir_in(&tmp_dir)
        .map_err(io("creating a temp dir for the image"))?;
    let path = tmp.path().join("disk");
    // What the partitions hold: the disk writes at least this much (and its metadata).
    let content: u64 = spec
        .partitions
        .iter()
        .flat_map(|p| p.tree.iter())
        .flat_map(|t| t.iter())
        .map(|(_, e)| match &e.kind {
            crate::tree::EntryKind::File(c) => c.len(),
            _ => 0,
        })
        .sum();
    let tick = |_: Duration| {
        use std::os::unix::fs::MetadataExt;
        let written = std::fs::metadata(&path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        progress.progress(
            stage,
            ProgressUpdate::new(
                Some((written as f64 / content.max(1) as f64).min(0.99)),
                format!(
                    "writing the disk: {} of about {}",
                    mib(written),
                    mib(content)
                ),
            ),
        );
    };
    let report = with_ticker(Duration::from_millis(200), tick, || {
        build_disk(&spec, &path)
    })?;
    progress.progress(
        stage,
        ProgressUpdate::new(
            Some(1.0),
            format!(
                "wrote {} ({} disk, {} file)",
                format!("{format:?}").to_lowercase(),
                mib(report.layout.disk_size),
                mib(report.image.file_size)
            ),
        ),
    );
    let (image, _) = blobs.put_file(&path).map_err(io("storing the image"))?;
    Ok(DiskOut {
        image,
        format: match format {
            ImageFormat::Raw => "raw".into(),
            ImageFormat::Qcow2 => "qcow2".into(),
        },
        disk_size: report.layout.disk_size,
        file_size: report.image.file_size,
    })
}

/// Where the serial log of a boot goes when the caller does not say: beside the cached image.
fn default_serial_log(env: &StageEnv, disk: &DiskOut, profile: &str) -> PathBuf {
    env.home
        .join("logs")
        .join(format!("{}.{profile}.serial.log", disk.image.hex()))
}

/// Boot the built image under `profile` (the cached blob, attached with snapshot=on).
pub fn verify_boot(
    env: &StageEnv,
    state: &BuildState,
    profile: &str,
    serial_log: Option<PathBuf>,
) -> Result<BootSummary, StageError> {
    let kernel_out = state.kernel.as_ref().ok_or(StageError::Missing("kernel"))?;
    let disk_out = state.disk.as_ref().ok_or(StageError::Missing("disk"))?;
    let recipe = &state.loaded.recipe;
    let expect = recipe.verify.expect.clone().unwrap_or_default();
    let timeout = Duration::from_secs(recipe.verify.timeout.unwrap_or(120));
    let log = serial_log.unwrap_or_else(|| default_serial_log(env, disk_out, profile));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let method = verify::profile::ProfileDir::locate(env.profiles_dir.as_deref())?
        .load(profile)?
        .boot;
    let mut bo = BootImageOptions::new(profile, expect, timeout);
    bo.profiles_dir = env.profiles_dir.clone();
    if method == verify::profile::BootMethod::Direct {
        bo.kernel = Some(env.blobs.path(&kernel_out.vmlinuz));
        bo.initrd = kernel_out.initrd.as_ref().map(|d| env.blobs.path(d));
        bo.cmdline = format!(
            "{} root=PARTUUID={}",
            kernel_cmdline(&state.loaded, kernel_out),
            Partitions::of(&state.loaded).root
        );
    }
    bo.serial_log = Some(log.clone());
    let report = verify::boot_image(&env.blobs.path(&disk_out.image), &bo)?;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let serial_log_blob = std::fs::File::open(&log)
        .and_then(|mut f| env.blobs.put(&mut f))
        .map(|(digest, _)| digest)
        .ok();
    Ok(BootSummary {
        profile: profile.to_string(),
        serial_log: Some(log),
        serial_log_blob,
        accel: report.accel.to_string(),
        time_to_first_output: secs(report.time_to_first_output),
        time_to_kernel: secs(report.time_to_kernel),
        time_to_marker: report.time_to_marker.as_secs_f64(),
        total: report.total.as_secs_f64(),
        marker_line: report.marker_line.clone(),
    })
}

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
                e.depends()
                    .split(',')
                    .map(|d| {
                        d.trim()
                            .split([' ', '(', '|'])
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
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

/// Copy a file keeping its holes (temp file + rename).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::FileExt;
    let len = std::fs::metadata(from)
        .map_err(io(format!("reading {}", from.display())))?
        .len();
    let content = Content::Host {
        path: from.to_path_buf(),
        len,
    };
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("creating a file in {}", dir.display())))?;
    tmp.as_file().set_len(len).map_err(io("sizing the copy"))?;
    let reader = content.reader().map_err(io("reading the cached image"))?;
    let source = std::fs::File::open(from).map_err(io(format!("reading {}", from.display())))?;
    let mut buf = Vec::new();
    let mut in_kernel = true;
    for (start, length) in content
        .data_ranges()
        .map_err(io("reading the cached image"))?
    {
        let mut off = start;
        if in_kernel {
            match kernel_copy(&source, tmp.as_file(), start, length) {
                Ok(()) => continue,
                // Not on this kernel or between these filesystems: copy through memory.
                Err(copied) => {
                    off = copied;
                    in_kernel = false;
                }
            }
        }
        buf.resize(1 << 20, 0);
        while off < start + length {
            let want = ((start + length - off) as usize).min(buf.len());
            let n = reader
                .read_at(off, &mut buf[..want])
                .map_err(io("reading the cached image"))?;
            if n == 0 {
                break;
            }
            tmp.as_file()
                .write_all_at(&buf[..n], off)
                .map_err(io("writing the copy"))?;
            off += n as u64;
        }
    }
    // A delivered image is an ordinary file (the temp file was made 0600).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io(format!("setting the mode of {}", to.display())))?;
    tmp.as_file().sync_all().map_err(io("syncing the copy"))?;
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
        assert!(looks_versioned("linux-source-6.1"));
        assert!(!looks_versioned("linux-source"));
    }

    #[test]
    fn copy_sparse_keeps_data_and_holes_and_makes_an_ordinary_file() {
        use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("image");
        let f = std::fs::File::create(&from).unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 5000], 0).unwrap();
        f.write_all_at(&[9u8; 70000], 40 << 20).unwrap();
        drop(f);
        let to = dir.path().join("out").join("copy.raw");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let m = std::fs::metadata(&to).unwrap();
        assert_eq!(m.len(), len);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "the hole was written: {}",
            m.blocks()
        );
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
    }
}
