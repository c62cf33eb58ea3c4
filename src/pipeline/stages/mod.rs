//! The stages of a build. A stage is one file here implementing [`StageWork`]: what it needs
//! (blobs that must be local), how it runs (its recorded steps, each looked up by a typed key
//! before it runs), what it adds to the [`Handover`] and what it produced. [`bus::Stage`] is the
//! only list of stages; [`run_one`] runs any of them, so the in-process build
//! (`pipeline::build`) and the NATS worker (`pipeline::worker`) are thin loops over
//! [`bus::Stage::ALL`].
//!
//! A new stage is one file, one `bus::Stage` variant and one line in [`entry`].

pub mod disk;
pub mod kernel;
pub mod publish;
pub mod render;
pub mod rootfs;
pub mod source;
pub mod verify;

use super::access::{AccessError, RecipeAccess};
use super::records::{StageRecords, stage_key};
use crate::bus::{self, BuildRequest, CacheStatus, ImagePublished};
use crate::digest::Digest256;
use crate::disk::derive_id;
use crate::home::BlobStore;
use crate::manifest::{Manifest, from_manifest, to_manifest};
use crate::packages::deb::read_deb;
use crate::packages::{Archive, ArchiveOptions, PackageRef};
use crate::recipe::Loaded;
use crate::recipe::schema::{PartitionType, RootfsBase};
use crate::tree::Tree;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use disk::DiskOut;
pub use kernel::{BuiltKernelOut, KernelOut};
pub use publish::PublishTarget;
pub use rootfs::{BaseOut, ChosenPackages, RootfsOut};
pub use verify::{BootSummary, VERIFIED, verified_key};

/// One stage's work.
pub trait StageWork {
    /// Which stage this is.
    const STAGE: bus::Stage;
    /// What the stage produces: its `completed` message's `outputs`.
    type Output: Serialize;
    /// What must be local before [`StageWork::run`] (a worker fetches it from the object store).
    fn needs(_env: &StageEnv, _h: &Handover) -> Vec<Need> {
        Vec::new()
    }
    /// Do the work: each recorded step through [`StageRun::step`].
    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<Self::Output, StageError>;
    /// Add the outputs to what the build hands on.
    fn apply(h: &mut Handover, out: &Self::Output);
    /// What the stage made that the next stage needs (a worker uploads it).
    fn produced(_h: &Handover) -> Vec<Need> {
        Vec::new()
    }
    /// An image announcement to publish with the stage's `completed` message.
    fn announcement(_out: &Self::Output) -> Option<Box<ImagePublished>> {
        None
    }
}

/// A stage's functions, looked up by [`bus::Stage`].
struct Entry {
    run: fn(&mut StageRun<'_>, &mut Handover) -> Result<Ran, StageError>,
    needs: fn(&StageEnv, &Handover) -> Vec<Need>,
    produced: fn(&Handover) -> Vec<Need>,
}

fn entry_of<S: StageWork>() -> Entry {
    Entry {
        run: run_as::<S>,
        needs: S::needs,
        produced: S::produced,
    }
}

/// The one place a stage name meets its code.
fn entry(stage: bus::Stage) -> Entry {
    match stage {
        bus::Stage::Source => entry_of::<source::SourceStage>(),
        bus::Stage::Render => entry_of::<render::RenderStage>(),
        bus::Stage::Rootfs => entry_of::<rootfs::RootfsStage>(),
        bus::Stage::Kernel => entry_of::<kernel::KernelStage>(),
        bus::Stage::Disk => entry_of::<disk::DiskStage>(),
        bus::Stage::Verify => entry_of::<verify::VerifyStage>(),
        bus::Stage::Publish => entry_of::<publish::PublishStage>(),
    }
}

/// What must be local to run `stage` on `h`.
pub fn needs(env: &StageEnv, stage: bus::Stage, h: &Handover) -> Vec<Need> {
    (entry(stage).needs)(env, h)
}

/// What `stage` made (in `h`, after it ran) that later stages need.
pub fn produced(stage: bus::Stage, h: &Handover) -> Vec<Need> {
    (entry(stage).produced)(h)
}

/// A stage that ran: its report (also added to the handover) and, from the publish stage, the
/// image announcement.
#[derive(Debug)]
pub struct Ran {
    pub report: StageReport,
    pub announce: Option<Box<ImagePublished>>,
}

/// Run one stage on `h` against `records`: recorded steps are reused, the rest run and are
/// recorded. Adds the stage's outputs and report to `h`. Blocking.
pub fn run_one(
    env: &StageEnv,
    records: &dyn StageRecords,
    stage: bus::Stage,
    h: &mut Handover,
    progress: &dyn ProgressSink,
) -> Result<Ran, StageError> {
    let mut run = StageRun {
        env,
        records,
        progress,
        steps: Vec::new(),
        cache: None,
    };
    let ran = (entry(stage).run)(&mut run, h)?;
    h.reports.push(ran.report.clone());
    Ok(ran)
}

fn run_as<S: StageWork>(run: &mut StageRun<'_>, h: &mut Handover) -> Result<Ran, StageError> {
    let started = Instant::now();
    let out = S::run(run, h)?;
    S::apply(h, &out);
    let outputs = serde_json::to_value(&out).map_err(|e| StageError::Record {
        what: format!("the {} stage's outputs", S::STAGE),
        source: std::io::Error::other(e),
    })?;
    let cache = run.cache.unwrap_or_else(|| {
        if !run.steps.is_empty() && run.steps.iter().all(|s| s.cache == CacheStatus::Hit) {
            CacheStatus::Hit
        } else {
            CacheStatus::Miss
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(stage = %S::STAGE, cache = ?cache, "{seconds:.2} s");
    Ok(Ran {
        report: StageReport {
            stage: S::STAGE,
            cache,
            seconds,
            outputs,
            steps: std::mem::take(&mut run.steps),
        },
        announce: S::announcement(&out),
    })
}

/// One stage running: where it looks records up and reports progress.
pub struct StageRun<'a> {
    pub env: &'a StageEnv,
    pub records: &'a dyn StageRecords,
    progress: &'a dyn ProgressSink,
    steps: Vec<StepReport>,
    /// Set by a stage whose cache status is not that of its steps (publish: nothing uploaded).
    cache: Option<CacheStatus>,
}

impl StageRun<'_> {
    /// Say how far the stage got.
    pub fn progress(&self, fraction: Option<f64>, message: impl Into<String>) {
        self.progress
            .progress(ProgressUpdate::new(fraction, message.into()));
    }

    /// A recorded step: its outputs recorded under `key` (a typed struct over its inputs), or
    /// `work` run and its outputs recorded.
    pub fn step<K, O>(
        &mut self,
        name: &str,
        version: u32,
        key: &K,
        work: impl FnOnce(&Self) -> Result<O, StageError>,
    ) -> Result<O, StageError>
    where
        K: Serialize,
        O: Serialize + DeserializeOwned,
    {
        self.step_if(name, version, key, |_| true, work)
    }

    /// [`StageRun::step`], using a record only when `usable` says so (its blobs are here).
    pub fn step_if<K, O>(
        &mut self,
        name: &str,
        version: u32,
        key: &K,
        usable: impl Fn(&O) -> bool,
        work: impl FnOnce(&Self) -> Result<O, StageError>,
    ) -> Result<O, StageError>
    where
        K: Serialize,
        O: Serialize + DeserializeOwned,
    {
        let started = Instant::now();
        let key = stage_key(name, version, key);
        let recorded = self
            .records
            .get(name, &key)
            .and_then(|v| serde_json::from_value::<O>(v).ok())
            .filter(|o| usable(o));
        let (out, cache) = match recorded {
            Some(out) => (out, CacheStatus::Hit),
            None => {
                let out = work(self)?;
                let value = serde_json::to_value(&out).map_err(|e| StageError::Record {
                    what: format!("the {name} step"),
                    source: std::io::Error::other(e),
                })?;
                self.records
                    .put(name, &key, &value)
                    .map_err(|source| StageError::Record {
                        what: format!("the {name} step"),
                        source,
                    })?;
                (out, CacheStatus::Miss)
            }
        };
        self.steps.push(StepReport {
            step: name.to_string(),
            cache,
            seconds: started.elapsed().as_secs_f64(),
            key,
        });
        Ok(out)
    }

    /// The stage's cache status, when it is not that of its steps.
    pub fn set_cache(&mut self, cache: CacheStatus) {
        self.cache = Some(cache);
    }
}

/// What a build hands from stage to stage: the `state` of every `completed` message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// The request, with its build id filled in.
    pub request: BuildRequest,
    /// The git commit of a git recipe (set by `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The commit time (seconds since the epoch) of a git recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
    /// The loaded recipe and what the stages made of it (set by `render`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Artifacts>,
    /// Each stage run so far: what `kiln build` puts in its report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<StageReport>,
    /// Requests the stages made to the Debian mirror so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mirror_requests: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Handover {
    pub fn new(request: BuildRequest) -> Self {
        Handover {
            request,
            commit: None,
            time: None,
            build: None,
            reports: Vec::new(),
            mirror_requests: 0,
        }
    }

    /// The build's artifacts, which every stage after render needs.
    pub fn artifacts(&self) -> Result<&Artifacts, StageError> {
        self.build.as_ref().ok_or(StageError::Missing("render"))
    }
}

/// The loaded recipe and what the stages made of it so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifacts {
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
    /// The verify stage's signed boot attestation (a DSSE envelope blob), when its worker has a
    /// verifier key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_attestation: Option<Digest256>,
}

impl Artifacts {
    pub fn new(loaded: Loaded) -> Self {
        Artifacts {
            loaded,
            packages: None,
            rootfs: None,
            kernel: None,
            disk: None,
            boots: Vec::new(),
            boot_attestation: None,
        }
    }

    pub fn packages(&self) -> Result<&ChosenPackages, StageError> {
        self.packages.as_ref().ok_or(StageError::Missing("rootfs"))
    }

    pub fn rootfs(&self) -> Result<&RootfsOut, StageError> {
        self.rootfs.as_ref().ok_or(StageError::Missing("rootfs"))
    }

    pub fn kernel(&self) -> Result<&KernelOut, StageError> {
        self.kernel.as_ref().ok_or(StageError::Missing("kernel"))
    }

    pub fn disk(&self) -> Result<&DiskOut, StageError> {
        self.disk.as_ref().ok_or(StageError::Missing("disk"))
    }

    /// Whether the image is a Debian one (`rootfs.base: debian`).
    pub fn is_debian(&self) -> bool {
        self.loaded.recipe.rootfs.base == RootfsBase::Debian
    }

    /// The `.deb`s this build downloaded.
    pub fn fetched_debs(&self) -> Vec<Digest256> {
        self.packages
            .iter()
            .flat_map(|c| c.fetched(self.is_debian()))
            .map(|p| p.sha256.clone())
            .collect()
    }
}

/// Blobs that must be local for a stage, or that it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// One blob.
    Blob(Digest256),
    /// A Tree manifest and every file it names.
    Tree(Digest256),
    /// A Debian base's manifest and the files of its kernel (`/boot`, the module directories).
    KernelOf(Digest256),
    /// A blob passed on when this host has it (a serial log).
    IfHere(Digest256),
}

impl Need {
    /// The blob itself (a manifest for [`Need::Tree`] and [`Need::KernelOf`]).
    pub fn digest(&self) -> &Digest256 {
        match self {
            Need::Blob(d) | Need::Tree(d) | Need::KernelOf(d) | Need::IfHere(d) => d,
        }
    }

    /// The file blobs a manifest names (its blob must be local); none for [`Need::Blob`].
    pub fn files(&self, blobs: &BlobStore) -> Result<Vec<Digest256>, StageError> {
        let (manifest, kernel_only) = match self {
            Need::Blob(_) | Need::IfHere(_) => return Ok(Vec::new()),
            Need::Tree(m) => (m, false),
            Need::KernelOf(m) => (m, true),
        };
        let m = read_manifest(blobs, manifest, "a manifest")?;
        Ok(m.entries
            .into_iter()
            .filter(|e| !kernel_only || crate::debian::holds_kernel(&e.path))
            .filter_map(|e| match e.kind {
                crate::manifest::ManifestKind::File { digest, .. } => Some(digest),
                _ => None,
            })
            .collect())
    }
}

/// One stage run, for reports and messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: bus::Stage,
    /// `hit` when every recorded step was found recorded.
    pub cache: CacheStatus,
    pub seconds: f64,
    /// The stage's outputs, as its `completed` message carries them.
    pub outputs: Value,
    /// The recorded steps it ran or found: their keys and cache status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
}

/// One recorded step of a stage (the packages, the Debian base, a boot under one profile).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub step: String,
    pub cache: CacheStatus,
    pub seconds: f64,
    pub key: Digest256,
}

/// Where stages run: the local blob store and records, how to reach the Debian archive and QEMU
/// profiles, what requests may reach, and where images are published.
#[derive(Debug, Clone)]
pub struct StageEnv {
    /// `$KILN_HOME`.
    pub home: PathBuf,
    pub blobs: BlobStore,
    /// Debian archive settings; the suite comes from the recipe.
    pub archive: ArchiveOptions,
    pub profiles_dir: Option<PathBuf>,
    /// What build requests may reach on this host (recipe roots, git repositories, variables).
    pub access: RecipeAccess,
    /// Bounds on loading a recipe.
    pub limits: crate::recipe::limits::Limits,
    /// Where the publish stage pushes images (none: it completes as skipped).
    pub publish: Option<PublishTarget>,
    /// The key the verify stage signs its boot attestations with (none: it signs none).
    pub verifier: Option<crate::store::SigningKey>,
    /// The Secure Boot key the disk stage signs boot loaders and kernels with (see
    /// [`secure_boot_key`]); `None`: `$KILN_HOME/secureboot.key`.
    pub secure_boot_key: Option<PathBuf>,
    /// Requests made to the Debian mirror by the stages run in this environment.
    pub mirror_requests: Arc<AtomicU64>,
    /// Archives opened by the stages run in this environment (see [`open_archive`]).
    archives: Arc<ArchiveMemo>,
}

impl StageEnv {
    pub fn new(home: PathBuf, archive: ArchiveOptions, profiles_dir: Option<PathBuf>) -> Self {
        StageEnv {
            blobs: BlobStore::new(&home),
            home,
            archive,
            profiles_dir,
            access: RecipeAccess::default(),
            limits: Default::default(),
            publish: None,
            verifier: None,
            secure_boot_key: None,
            mirror_requests: Default::default(),
            archives: Default::default(),
        }
    }

    /// The same environment with a mirror request counter of its own (one build's requests).
    pub fn counting(&self) -> Self {
        let mut env = self.clone();
        env.mirror_requests = Default::default();
        env
    }

    /// Requests to the Debian mirror counted so far.
    pub fn requests(&self) -> u64 {
        self.mirror_requests.load(Ordering::Relaxed)
    }

    /// Count the requests an archive made since it was last noted.
    fn note(&self, archive: &OpenedArchive) {
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
    noted: AtomicU64,
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
    opened: std::sync::Mutex<Vec<Arc<OpenedArchive>>>,
}

impl std::fmt::Debug for ArchiveMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveMemo").finish_non_exhaustive()
    }
}

/// The recipe's archive: reused from this environment when it was opened with the same options
/// less than [`ARCHIVE_REUSE`] (and `release_max_age`) ago, else opened (InRelease verified).
fn open_archive(env: &StageEnv, loaded: &Loaded) -> Result<Arc<OpenedArchive>, StageError> {
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
    let opened = Arc::new(OpenedArchive {
        key,
        opened: Instant::now(),
        archive: Archive::open_lazy(opts)?,
        noted: Default::default(),
    });
    memo.push(opened.clone());
    Ok(opened)
}

/// How far a running stage got: what it is doing and, when known, the fraction done.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
    fn progress(&self, update: ProgressUpdate);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _: ProgressUpdate) {}
}

impl<F: Fn(ProgressUpdate) + Send + Sync> ProgressSink for F {
    fn progress(&self, update: ProgressUpdate) {
        self(update)
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The recipe does not load: the diagnostic says where and what to do.
    #[error("{}", .0.message)]
    Recipe(Box<crate::recipe::Diagnostic>),
    #[error("the request names what this host's operator did not open to requests")]
    Refused(#[source] AccessError),
    #[error(
        "recipe {} does not exist on this worker (path recipes are read on the worker's file \
         system; use an absolute path, or send it inline or from git)",
        .0.display()
    )]
    NoRecipe(PathBuf),
    #[error("fetching the recipe from git failed")]
    Source(#[source] crate::source::SourceError),
    #[error("the Debian archive")]
    Packages(#[from] crate::packages::PackagesError),
    #[error("reading package {package}")]
    Deb {
        package: String,
        #[source]
        source: Box<crate::packages::deb::DebError>,
    },
    #[error("assembling the root filesystem")]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("making the Debian base")]
    Debian(#[from] crate::debian::DebianError),
    #[error("the booted system's state")]
    SystemState(#[from] crate::systemd::SystemStateError),
    #[error("the kernel")]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("building the kernel")]
    KernelBuild(#[from] crate::kernel::build::KernelBuildError),
    #[error("making the initramfs")]
    Initramfs(#[from] crate::kernel::initramfs::InitramfsError),
    #[error("the boot loader")]
    Boot(#[from] crate::boot::BootError),
    #[error("making the unified kernel image")]
    Uki(#[from] crate::pe::PeError),
    #[error("Secure Boot")]
    SecureBoot(#[from] crate::secureboot::SecureBootError),
    #[error("writing the disk")]
    Disk(#[from] crate::disk::build::DiskError),
    #[error("a Tree manifest")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("the boot")]
    Verify(#[from] crate::verify::VerifyError),
    #[error("the recipe asks for {0}, which kiln cannot build yet")]
    Unsupported(String),
    #[error("the {0} stage must run before this stage")]
    Missing(&'static str),
    #[error(
        "no verify stage recorded a passing {profile} boot of {image} with this recipe's marker: \
         refusing to sign and publish an image that was not seen to boot"
    )]
    NotVerified { profile: String, image: Digest256 },
    #[error("publishing the image")]
    Publish(#[from] crate::store::StoreError),
    #[error("the publish worker's signing key")]
    SigningKey(#[source] crate::store::sign::KeyError),
    #[error("recording {what}")]
    Record {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A blob the stage needs is not here, or its bytes no longer match its digest (the damaged
    /// copy was removed): the runner fetches it again or runs the stage that made it again.
    #[error(
        "blob {digest} {}",
        if *.corrupt { "no longer matches its digest (the damaged copy was removed)" }
        else { "is missing from the blob store" }
    )]
    Lost { digest: Digest256, corrupt: bool },
}

impl StageError {
    /// What kind of failure this is: whether to fix the input, retry, or report a bug.
    pub fn kind(&self) -> bus::ErrorKind {
        use crate::source::SourceError as S;
        use bus::ErrorKind as K;
        if self.is_no_space() {
            return K::NoSpace;
        }
        let input = match self {
            StageError::Refused(_) | StageError::NotVerified { .. } => return K::InvalidMessage,
            StageError::Verify(_) | StageError::SystemState(_) => return K::Verification,
            StageError::SigningKey(_) => return K::Internal,
            StageError::Publish(e) if !publish::is_transient(e) => return K::Internal,
            StageError::KernelBuild(e) => e.is_input_error(),
            // A host out of descriptors or memory is not the recipe's fault.
            StageError::Recipe(d) => {
                !(d.kind == crate::recipe::DiagnosticKind::Io && out_of_resources(&d.message))
            }
            StageError::Source(e) => matches!(
                e,
                S::UnknownRef { .. }
                    | S::BadRecipePath { .. }
                    | S::MissingRecipe { .. }
                    | S::UnsupportedScheme { .. }
                    | S::NoSuchPath { .. }
            ),
            StageError::Debian(e) => {
                matches!(e, crate::debian::DebianError::LocaleNeedsPackage { .. })
            }
            StageError::Packages(e) => matches!(e, crate::packages::PackagesError::Resolve(_)),
            StageError::Unsupported(_)
            | StageError::NoRecipe(_)
            | StageError::Kernel(_)
            | StageError::Initramfs(_)
            | StageError::Rootfs(_) => true,
            _ => false,
        };
        if input { K::Recipe } else { K::Transient }
    }

    /// The file system kiln writes to is full, over quota or read-only (ENOSPC, EDQUOT, EROFS
    /// anywhere in the error's causes): an operator must free space, a retry cannot help.
    pub fn is_no_space(&self) -> bool {
        crate::error::is_no_space(self)
    }

    /// Whether the user's input is at fault (a retry cannot help, exit code 2) rather than the
    /// environment.
    pub fn is_input_error(&self) -> bool {
        use bus::ErrorKind as K;
        matches!(self.kind(), K::Recipe | K::InvalidMessage | K::Verification)
    }
}

/// Whether an error's text says the host ran out of a resource (file descriptors, memory) rather
/// than that a file is missing or unreadable: `std::io::Error` prints its OS error number.
pub fn out_of_resources(message: &str) -> bool {
    ["(os error 23)", "(os error 24)", "(os error 12)"]
        .iter()
        .any(|code| message.contains(code))
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
    let what = what.into();
    move |source| StageError::Io { what, source }
}

/// Check a blob's bytes against its digest now, before they are booted, signed, pushed or
/// delivered (a damaged copy is removed): [`StageError::Lost`] when it is missing or damaged.
pub(crate) fn intact(env: &StageEnv, digest: &Digest256) -> Result<(), StageError> {
    use crate::home::BlobState;
    match env
        .blobs
        .check(digest)
        .map_err(io(format!("checking blob {digest}")))?
    {
        BlobState::Intact => Ok(()),
        BlobState::Missing => Err(StageError::Lost {
            digest: digest.clone(),
            corrupt: false,
        }),
        BlobState::Corrupt(_) => Err(StageError::Lost {
            digest: digest.clone(),
            corrupt: true,
        }),
    }
}

/// Refused by the host's [`RecipeAccess`] (a recipe inside the roots that is not there: missing).
pub(crate) fn refused(e: AccessError) -> StageError {
    match e {
        AccessError::NotFound {
            what: "recipe",
            path,
            ..
        } => StageError::NoRecipe(PathBuf::from(path)),
        e => StageError::Refused(e),
    }
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

/// A package's files as a Tree (their content in the blob store).
fn read_pkg(env: &StageEnv, loaded: &Loaded, p: &PackageRef) -> Result<Tree, StageError> {
    // A collection (`kiln gc`, `--cache-max`) may remove a cached .deb between finding it and
    // opening it: then it is fetched again. Once open, it stays readable whatever happens to
    // its name.
    let mut again = false;
    let (path, file) = loop {
        let path = deb_path(env, loaded, p)?;
        match std::fs::File::open(&path) {
            Ok(file) => break (path, file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !again => {
                tracing::info!("{} was removed from the cache: fetching it again", p.name);
                again = true;
            }
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        }
    };
    let mut tree = Tree::new();
    read_deb(
        &path,
        std::io::BufReader::with_capacity(1 << 20, file),
        &p.deb_limits(),
        &mut tree,
        &env.blobs,
    )
    .map_err(|source| StageError::Deb {
        package: p.name.clone(),
        source: Box::new(source),
    })?;
    Ok(tree)
}

/// What a disk's identities (GPT GUIDs, filesystem UUIDs and hash seeds, the FAT volume id, the
/// dm-verity salt) derive from: the recipe's name, so that they stay the same from one build of
/// a recipe to the next. Were they to follow the inputs, every ext4 metadata block (their
/// checksums are seeded with the UUID) would change with any change of the recipe, and a delta
/// pull would fetch them all.
pub fn disk_seed(loaded: &Loaded) -> String {
    format!("recipe:{}", loaded.recipe.name)
}

/// Partition identities follow from the disk's seed ([`disk_seed`]), so the initramfs and fstab
/// can name them before the disk exists.
pub struct Partitions {
    pub root: uuid::Uuid,
    pub esp: Option<uuid::Uuid>,
}

impl Partitions {
    pub fn of(loaded: &Loaded) -> Self {
        let parts = &loaded.recipe.disk.partitions;
        let id = |name: &str| {
            uuid::Uuid::from_bytes(derive_id(&disk_seed(loaded), &format!("partition:{name}")))
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

/// The recipe's command line, plus what a kernel that mounts root itself (no initramfs) needs:
/// wait for the disk, ext4, read-write (the initramfs does this otherwise).
fn kernel_cmdline(loaded: &Loaded, kernel: &KernelOut) -> String {
    let base = loaded
        .recipe
        .boot
        .cmdline
        .clone()
        .unwrap_or_else(|| "console=ttyS0".into());
    if kernel.initrd.is_some() {
        return base;
    }
    format!("{} rootwait rootfstype=ext4 rw", base.trim())
}

/// The Secure Boot key of this environment: the file it names, else `$KILN_HOME/secureboot.key`,
/// made (with its certificate) the first time a recipe asks for Secure Boot.
pub fn secure_boot_key(env: &StageEnv) -> Result<crate::secureboot::SecureBootKey, StageError> {
    use crate::secureboot::{SecureBootError, SecureBootKey, cert_path_of, keygen};
    let path = match &env.secure_boot_key {
        Some(p) => p.clone(),
        None => {
            let p = env.home.join("secureboot.key");
            if !p.exists() {
                std::fs::create_dir_all(&env.home)
                    .map_err(io(format!("creating {}", env.home.display())))?;
                let name = format!(
                    "kiln Secure Boot key ({})",
                    crate::pipeline::worker::host_name()
                );
                match keygen(&p, &name) {
                    Ok(_) => tracing::info!(
                        "made the Secure Boot key {} (certificate {})",
                        p.display(),
                        cert_path_of(&p).display()
                    ),
                    // Another worker of this home made it first.
                    Err(SecureBootError::Exists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            p
        }
    };
    Ok(SecureBootKey::load(&path, &cert_path_of(&path))?)
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

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
