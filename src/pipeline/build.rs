//! `kiln build` in one process: render, then the stages of [`super::stages`] in order against the
//! local stage cache, then delivery of the verified image, its serial logs and a JSON report. An
//! unchanged rebuild is a chain of lookups: no download, no disk write, no boot.

use super::cache::StageCache;
use super::stages::{
    BootSummary, BuildState, ProgressUpdate, Stage, StageEnv, StageError, StageReport,
    check_supported, copy_sparse, is_debian, run_stage,
};
use crate::cache::{BlobStore, Digest256, write_atomic};
use crate::packages::ArchiveOptions;
use crate::recipe::LoadOptions;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// The JSON report written beside the image.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub name: String,
    pub version: Option<String>,
    pub inputs: String,
    pub image: PathBuf,
    pub image_digest: Digest256,
    pub format: String,
    pub disk_size: u64,
    pub file_size: u64,
    pub kernel_version: String,
    pub modules: Vec<String>,
    pub packages: Vec<PackageSummary>,
    pub stages: Vec<StageReport>,
    /// One boot per profile (empty with `--no-verify`).
    pub boots: Vec<BootSummary>,
    /// Requests made to the Debian mirror during this build (0 on a warm cache).
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
    #[error(transparent)]
    Stage(#[from] StageError),
}

impl BuildError {
    /// Whether the user's input is at fault (exit code 2) rather than the environment.
    pub fn is_input_error(&self) -> bool {
        match self {
            BuildError::Recipe(_) => true,
            BuildError::Stage(e) => e.is_input_error(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Stage(StageError::Io { what, source })
}

/// The stages a build runs, in order.
pub fn stage_plan(verify: bool, profiles: &[String]) -> Vec<Stage> {
    let mut plan = vec![Stage::Packages, Stage::Rootfs, Stage::Kernel, Stage::Disk];
    if verify {
        plan.extend(profiles.iter().cloned().map(Stage::Verify));
    }
    plan
}

/// What a build tells its caller about a stage as it runs (for progress bars and logs).
#[derive(Debug, Clone, PartialEq)]
pub enum StageNote {
    Started,
    Progress(ProgressUpdate),
    Completed {
        /// `hit` or `miss`.
        cache: String,
        seconds: f64,
    },
}

/// Build (and, unless told otherwise, boot) a recipe in this process, without NATS.
/// `observe(stage, note)` hears of every stage as it starts, progresses and ends.
pub fn build(
    opts: &BuildOptions,
    observe: &(dyn Fn(&str, StageNote) + Sync),
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let loaded = crate::recipe::load(&opts.recipe, &opts.load)
        .map_err(|d| BuildError::Recipe(Box::new(d)))?;
    check_supported(&loaded)?;
    let env = StageEnv::new(
        opts.home.clone(),
        opts.archive.clone(),
        opts.profiles_dir.clone(),
    );
    let records = StageCache::new(&opts.home);
    let profiles = if opts.profiles.is_empty() {
        vec![
            loaded
                .recipe
                .verify
                .profile
                .clone()
                .unwrap_or_else(|| "direct".into()),
        ]
    } else {
        opts.profiles.clone()
    };
    let mut state = BuildState::new(loaded);
    let mut stages = Vec::new();
    let sink = |stage: &Stage, update: ProgressUpdate| {
        observe(stage.name(), StageNote::Progress(update));
    };
    for stage in stage_plan(opts.verify, &profiles) {
        observe(stage.name(), StageNote::Started);
        let report = run_stage(&env, &records, &stage, &mut state, &sink)?;
        observe(
            stage.name(),
            StageNote::Completed {
                cache: report.cache.clone(),
                seconds: report.seconds,
            },
        );
        stages.push(report);
    }
    let mirror_requests = env
        .mirror_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    deliver(opts, &env.blobs, &state, stages, mirror_requests, started)
}

/// Deliver a finished build to `opts.out_dir`: the image from `blobs` (only once it booted),
/// its serial logs and the JSON report. Shared by the in-process and the NATS paths.
pub fn deliver(
    opts: &BuildOptions,
    blobs: &BlobStore,
    state: &BuildState,
    stages: Vec<StageReport>,
    mirror_requests: u64,
    started: Instant,
) -> Result<BuildReport, BuildError> {
    let recipe = &state.loaded.recipe;
    let (Some(disk), Some(kernel), Some(packages)) = (&state.disk, &state.kernel, &state.packages)
    else {
        return Err(StageError::Missing("disk").into());
    };

    // Deliver: the image (only now that it booted), its serial logs, the report.
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(io(format!("creating {}", opts.out_dir.display())))?;
    let file_name = match &recipe.version {
        Some(v) => format!("{}-{v}.{}", recipe.name, disk.format),
        None => format!("{}.{}", recipe.name, disk.format),
    };
    let image_path = opts.out_dir.join(file_name);
    copy_sparse(&blobs.path(&disk.image), &image_path)?;
    let mut boots = state.boots.clone();
    for (i, boot) in boots.iter_mut().enumerate() {
        let Some(log) = &boot.serial_log else {
            continue;
        };
        let mut name = image_path.as_os_str().to_os_string();
        if i > 0 {
            name.push(format!(".{}", boot.profile));
        }
        name.push(".serial.log");
        let dest = PathBuf::from(name);
        // The log where the boot wrote it (this host), else its blob (fetched from the store).
        let source = match &boot.serial_log_blob {
            _ if log.is_file() => Some(log.clone()),
            Some(d) if blobs.contains(d) => Some(blobs.path(d)),
            _ => None,
        };
        if let Some(source) = source
            && std::fs::copy(&source, &dest).is_ok()
        {
            boot.serial_log = Some(dest);
        }
    }
    let report = BuildReport {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        inputs: state.loaded.inputs.clone(),
        image: image_path.clone(),
        image_digest: disk.image.clone(),
        format: disk.format.clone(),
        disk_size: disk.disk_size,
        file_size: disk.file_size,
        kernel_version: kernel.version.clone(),
        modules: kernel.modules.clone(),
        packages: packages
            .fetched(is_debian(&state.loaded))
            .into_iter()
            .map(|p| PackageSummary {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
            })
            .collect(),
        stages,
        boots,
        mirror_requests,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| io("writing the report")(std::io::Error::other(e)))?;
    let mut report_path = image_path.as_os_str().to_os_string();
    report_path.push(".report.json");
    write_atomic(Path::new(&report_path), &json).map_err(io("writing the report"))?;
    Ok(report)
}
