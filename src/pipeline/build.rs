//! `kiln build` in one process (`--no-bus`): the seven stages of [`crate::bus::Stage::ALL`] in
//! order through [`run_one`] against the local stage records, then delivery of the verified
//! image, its serial logs and a JSON report. An unchanged rebuild is a chain of lookups: no
//! download, no disk write, no boot.

use super::bus_build::{caller_access, request_for};
use super::records::{LocalRecords, StageRecords};
use super::recovery::{MAX_RECOVERIES, remake, run_stage};
use super::stages::{
    Artifacts, BootSummary, Handover, ProgressSink, ProgressUpdate, StageEnv, StageError,
    StageReport, io as stage_io,
};
use crate::bus::{self, CacheStatus};
use crate::digest::Digest256;
use crate::home::{BlobState, BlobStore, write_atomic};
use crate::packages::ArchiveOptions;
use crate::recipe::LoadOptions;
use crate::tree::Content;
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
    /// The image's SBOM (SPDX 2.3 JSON) beside it: `<image>.spdx.json`, what `kiln sbom IMAGE`
    /// prints. `None` for a build delivered from another host's workers (its SBOM is published
    /// with the image).
    pub sbom: Option<PathBuf>,
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
    #[error("{}", .0.message)]
    Recipe(Box<crate::recipe::Diagnostic>),
    #[error("the {stage} stage failed")]
    Stage {
        stage: bus::Stage,
        #[source]
        source: StageError,
    },
    #[error("delivering the image")]
    Deliver(#[source] StageError),
    /// The file system under `$KILN_HOME` is full (or over quota, or read-only).
    #[error(
        "no space left on device under {}{}: free space there (or point KILN_HOME elsewhere) and build again",
        home.display(),
        stage.map(|s| format!(" (the {s} stage)")).unwrap_or_default()
    )]
    NoSpace {
        home: PathBuf,
        stage: Option<bus::Stage>,
        #[source]
        source: Box<StageError>,
    },
}

impl BuildError {
    /// Whether the user's input is at fault (exit code 2) rather than the environment.
    pub fn is_input_error(&self) -> bool {
        match self {
            BuildError::Recipe(_) => true,
            BuildError::Stage { source, .. } | BuildError::Deliver(source) => {
                source.is_input_error()
            }
            BuildError::NoSpace { .. } => false,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Deliver(StageError::Io { what, source })
}

/// What a build tells its caller about a stage as it runs (for progress bars and logs; as JSON
/// an object tagged by `kind`: started, progress, completed).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StageNote {
    Started,
    Progress(ProgressUpdate),
    Completed { cache: CacheStatus, seconds: f64 },
}

/// Build (and, unless told otherwise, boot) a recipe in this process, without NATS: the same
/// stages as on the bus, in the same order. `observe(stage, note)` hears of every stage as it
/// starts, progresses and ends.
pub fn build(
    opts: &BuildOptions,
    observe: &(dyn Fn(bus::Stage, StageNote) + Sync),
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let request = request_for(opts, &bus::new_build_id()).map_err(BuildError::Deliver)?;
    let mut env = StageEnv::new(
        opts.home.clone(),
        opts.archive.clone(),
        opts.profiles_dir.clone(),
    );
    env.access = caller_access(&request).map_err(BuildError::Deliver)?;
    env.limits = opts.load.limits.clone();
    let records = LocalRecords::new(&opts.home);
    let mut h = Handover::new(request);
    for stage in bus::Stage::ALL {
        observe(stage, StageNote::Started);
        let sink = |update: ProgressUpdate| observe(stage, StageNote::Progress(update));
        let ran = run_stage(&env, &records, stage, &mut h, &sink)
            .map_err(|e| stage_error(&opts.home, stage, e))?;
        observe(
            stage,
            StageNote::Completed {
                cache: ran.report.cache,
                seconds: ran.report.seconds,
            },
        );
    }
    h.mirror_requests = env.requests();
    let sink = |update: ProgressUpdate| observe(bus::Stage::Publish, StageNote::Progress(update));
    deliver_recovering(opts, &env, &records, &h, started, &sink)
}

/// A stage's error as the build's: a recipe diagnostic as it is, a full disk named as such.
fn stage_error(home: &Path, stage: bus::Stage, source: StageError) -> BuildError {
    match source {
        StageError::Recipe(d) => BuildError::Recipe(d),
        source if source.is_no_space() => BuildError::NoSpace {
            home: home.to_path_buf(),
            stage: Some(stage),
            source: Box::new(source),
        },
        source => BuildError::Stage { stage, source },
    }
}

/// [`deliver`], and when the image blob is missing or damaged, the stage that made it run again
/// (its records forgotten) and the delivery retried: the image delivered is always the one
/// whose digest the build reports.
pub fn deliver_recovering(
    opts: &BuildOptions,
    env: &StageEnv,
    records: &dyn StageRecords,
    h: &Handover,
    started: Instant,
    progress: &dyn ProgressSink,
) -> Result<BuildReport, BuildError> {
    let mut recoveries = 0;
    loop {
        match deliver(opts, &env.blobs, Some(env), h, started) {
            Err(BuildError::Deliver(StageError::Lost { digest, corrupt }))
                if recoveries < MAX_RECOVERIES =>
            {
                recoveries += 1;
                remake(env, records, h, &digest, corrupt, progress).map_err(|e| {
                    if e.is_no_space() {
                        BuildError::NoSpace {
                            home: opts.home.clone(),
                            stage: None,
                            source: Box::new(e),
                        }
                    } else {
                        BuildError::Deliver(e)
                    }
                })?;
            }
            r => return r,
        }
    }
}

/// Deliver a finished build to `opts.out_dir`: the image from `blobs` (only once it booted),
/// its serial logs, its SBOM (when `env`, the stages' environment, is this host's) and the JSON
/// report with every stage's report. Shared by the in-process and the NATS paths.
pub fn deliver(
    opts: &BuildOptions,
    blobs: &BlobStore,
    env: Option<&StageEnv>,
    h: &Handover,
    started: Instant,
) -> Result<BuildReport, BuildError> {
    let state = h.artifacts().map_err(BuildError::Deliver)?;
    let recipe = &state.loaded.recipe;
    let disk = state.disk().map_err(BuildError::Deliver)?;
    let kernel = state.kernel().map_err(BuildError::Deliver)?;
    let packages = state.packages().map_err(BuildError::Deliver)?;

    // Deliver: the image (only now that it booted), its serial logs, the report.
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(io(format!("creating {}", opts.out_dir.display())))?;
    let file_name = match &recipe.version {
        Some(v) => format!("{}-{v}.{}", recipe.name, disk.format),
        None => format!("{}.{}", recipe.name, disk.format),
    };
    let image_path = opts.out_dir.join(file_name);
    // The bytes delivered are checked against the digest the report gives now.
    match blobs
        .check(&disk.image)
        .map_err(io(format!("checking the image blob {}", disk.image)))?
    {
        BlobState::Intact => {}
        state => {
            return Err(BuildError::Deliver(StageError::Lost {
                digest: disk.image.clone(),
                corrupt: matches!(state, BlobState::Corrupt(_)),
            }));
        }
    }
    copy_sparse(&blobs.path(&disk.image), &image_path).map_err(BuildError::Deliver)?;
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
    let sbom = env.and_then(|env| write_sbom(env, state, &image_path));
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
            .fetched(state.is_debian())
            .into_iter()
            .map(|p| PackageSummary {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
            })
            .collect(),
        stages: h.reports.clone(),
        boots,
        sbom,
        mirror_requests: h.mirror_requests,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| io("writing the report")(std::io::Error::other(e)))?;
    let mut report_path = image_path.as_os_str().to_os_string();
    report_path.push(".report.json");
    write_atomic(Path::new(&report_path), &json).map_err(io("writing the report"))?;
    Ok(report)
}

/// Write the build's SBOM beside the image (temp + rename); `None`, with a warning, when it
/// cannot be made.
fn write_sbom(env: &StageEnv, build: &Artifacts, image: &Path) -> Option<PathBuf> {
    use crate::pipeline::stages::publish::{sbom_document, suite_of};
    let mut name = image.as_os_str().to_os_string();
    name.push(".spdx.json");
    let path = PathBuf::from(name);
    let made = sbom_document(env, build, &env.archive.mirror, &suite_of(env, build))
        .and_then(|(doc, _)| serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string()))
        .and_then(|bytes| {
            write_atomic(&path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))
        });
    match made {
        Ok(()) => Some(path),
        Err(reason) => {
            tracing::warn!("no SBOM beside the image: {reason}");
            None
        }
    }
}

/// Copy a file keeping its holes (temp file + rename).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::FileExt;
    let len = std::fs::metadata(from)
        .map_err(stage_io(format!("reading {}", from.display())))?
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
        .map_err(stage_io(format!("creating a file in {}", dir.display())))?;
    tmp.as_file()
        .set_len(len)
        .map_err(stage_io("sizing the copy"))?;
    let reader = content
        .reader()
        .map_err(stage_io("reading the cached image"))?;
    let source =
        std::fs::File::open(from).map_err(stage_io(format!("reading {}", from.display())))?;
    let mut buf = Vec::new();
    let mut in_kernel = true;
    for (start, length) in content
        .data_ranges()
        .map_err(stage_io("reading the cached image"))?
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
                .map_err(stage_io("reading the cached image"))?;
            if n == 0 {
                break;
            }
            tmp.as_file()
                .write_all_at(&buf[..n], off)
                .map_err(stage_io("writing the copy"))?;
            off += n as u64;
        }
    }
    // A delivered image is an ordinary file (the temp file was made 0600).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(stage_io(format!("setting the mode of {}", to.display())))?;
    tmp.as_file()
        .sync_all()
        .map_err(stage_io("syncing the copy"))?;
    tmp.persist(to)
        .map_err(|e| stage_io(format!("writing {}", to.display()))(e.error))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
