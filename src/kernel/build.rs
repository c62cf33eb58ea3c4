//! Building a kernel from Debian's `linux-source-*` package and a configuration fragment
//! (`kernel.build` in a recipe): the build tools checked up front, the source unpacked once per
//! package digest under `$KILN_HOME/kernel/src`, the base configuration (`tinyconfig` or
//! `defconfig`) made once per source and toolchain, the fragment merged onto it
//! ([`super::config`]), `make olddefconfig`, a check that every option the fragment asked for
//! survived, then `make bzImage` out of tree. The result is kept under
//! `$KILN_HOME/kernel/builds/<key>`, the key hashing the source digest, the merged configuration,
//! the toolchain and the timestamp, so an unchanged rebuild is a directory lookup.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use super::config::{self, Config, ConfigError, Dropped};
use crate::bounded::LimitReader;
use crate::digest::Digest256;
use crate::home::write_atomic;
use crate::packages::deb::{ArReader, MAX_UNDECLARED_DATA, decompressor};
use crate::recipe::schema::KernelBase;

/// Options that let a kernel mount kiln's root partition with no initramfs: the virtio PCI
/// transport and block driver, ext4, GPT partitions (for `root=PARTUUID=`) and devtmpfs.
pub const ROOT_BUILTIN: &[&str] = &[
    "VIRTIO_PCI",
    "VIRTIO_BLK",
    "EXT4_FS",
    "EFI_PARTITION",
    "DEVTMPFS",
];

/// Bump when what a build produces for the same key changes.
const FORMAT: &str = "kiln-kernel-build v1";

/// Lines of the build log shown when a build fails.
const LOG_TAIL: usize = 30;

/// Most bytes the kernel source tarball inside `linux-source-*` may unpack to (6.1's tree is
/// 1.3 GB; the tarball's tar stream is what is counted).
const MAX_SOURCE_TREE: u64 = 8 << 30;

/// The commands a kernel build runs and the Debian packages that provide them.
const TOOLS: &[(&str, &str)] = &[
    ("gcc", "gcc"),
    ("make", "make"),
    ("ld", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
];

/// Headers the build compiles host tools against, and their packages.
const HEADERS: &[(&str, &str)] = &[
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
];

#[derive(Debug, Error)]
pub enum KernelBuildError {
    #[error(
        "building a kernel needs {missing}; install with: apt-get install {packages} (or use \
         `kernel.package` for a Debian kernel)"
    )]
    MissingTools { missing: String, packages: String },
    /// The fragment (or a configuration file) does not parse; the message names the file.
    #[error(transparent)]
    Fragment(#[from] ConfigError),
    #[error(
        "{fragment}: {count} option(s) did not survive `make olddefconfig` on {base}: {list}; \
         enable what they depend on in the fragment, or drop them (see `make menuconfig`'s help \
         for each option)"
    )]
    Dropped {
        fragment: String,
        base: &'static str,
        count: usize,
        list: String,
        options: Vec<Dropped>,
    },
    #[error("{step} failed ({status}); log: {log}\n{tail}")]
    Make {
        step: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} ({path})")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the source package {path} has no usr/src/linux-source-*.tar.* (is it linux-source?)")]
    NoTarball { path: PathBuf },
    #[error(
        "the source package {path}: {what} unpacks to more than {limit} bytes; refusing it as \
         corrupt or hostile (a decompression bomb) and removing what was unpacked. Fetch it again \
         from a trusted mirror"
    )]
    TooLarge {
        path: PathBuf,
        what: String,
        limit: u64,
    },
    #[error("the kernel build in {dir} produced no {file}")]
    NoOutput { dir: PathBuf, file: &'static str },
}

impl KernelBuildError {
    /// Whether the recipe (its fragment) is at fault, not the machine.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            KernelBuildError::Fragment(_) | KernelBuildError::Dropped { .. }
        )
    }
}

fn io_at(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> KernelBuildError {
    let (what, path) = (what.into(), path.into());
    move |source| KernelBuildError::Io { what, path, source }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct KernelBuildSpec {
    /// `$KILN_HOME`.
    pub home: PathBuf,
    /// The verified `linux-source-*` `.deb`.
    pub source_deb: PathBuf,
    /// Its SHA-256 (from the signed index).
    pub source_digest: Digest256,
    /// The fragment's name (for messages), e.g. `kernel-configs/virt-minimal.config`.
    pub fragment_name: String,
    pub fragment: String,
    pub base: KernelBase,
    /// SOURCE_DATE_EPOCH: the kernel's build timestamp.
    pub epoch: i64,
    /// `make -j`; `None` = the number of CPUs.
    pub jobs: Option<usize>,
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    pub key: Digest256,
    /// `$KILN_HOME/kernel/builds/<key hex>`.
    pub dir: PathBuf,
    pub bzimage: PathBuf,
    /// `make kernelrelease`, e.g. `6.1.176`.
    pub release: String,
    /// The final configuration (after `make olddefconfig`).
    pub config: Config,
    /// The build log (kept beside the kernel).
    pub log: PathBuf,
    /// Whether the key was already built (nothing compiled).
    pub cached: bool,
    /// Seconds the compile took when it ran (the recorded time for a cached kernel).
    pub build_seconds: f64,
    pub toolchain: String,
}

impl BuiltKernel {
    /// Whether the kernel can mount kiln's root partition without an initramfs.
    pub fn boots_without_initramfs(&self) -> bool {
        self.config.all_builtin(ROOT_BUILTIN)
    }
}

/// Check that the build tools are installed; returns the toolchain's description (compiler,
/// linker and make versions), which is part of the build key.
pub fn check_build_tools() -> Result<String, KernelBuildError> {
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    for (tool, package) in TOOLS {
        if find_in_path(tool).is_none() {
            missing.push(format!("`{tool}`"));
            packages.push(*package);
        }
    }
    for (header, package) in HEADERS {
        if !Path::new(header).exists() {
            missing.push(header.to_string());
            packages.push(*package);
        }
    }
    if !missing.is_empty() {
        packages.dedup();
        return Err(KernelBuildError::MissingTools {
            missing: missing.join(", "),
            packages: packages.join(" "),
        });
    }
    let first_line = |cmd: &str| -> String {
        Command::new(cmd)
            .arg("--version")
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("{cmd} (unknown version)"))
    };
    Ok(["gcc", "ld", "make"]
        .iter()
        .map(|c| first_line(c))
        .collect::<Vec<_>>()
        .join("; "))
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The cache layout under `$KILN_HOME/kernel`.
struct Dirs {
    src: PathBuf,
    base: PathBuf,
    builds: PathBuf,
    logs: PathBuf,
}

impl Dirs {
    fn new(home: &Path) -> Result<Dirs, KernelBuildError> {
        let root = home.join("kernel");
        let dirs = Dirs {
            src: root.join("src"),
            base: root.join("base"),
            builds: root.join("builds"),
            logs: root.join("logs"),
        };
        for d in [&dirs.src, &dirs.base, &dirs.builds, &dirs.logs] {
            std::fs::create_dir_all(d).map_err(io_at("creating the kernel cache", d))?;
        }
        Ok(dirs)
    }
}

/// Build (or find) the kernel `req` describes.
pub fn build(req: &KernelBuildSpec) -> Result<BuiltKernel, KernelBuildError> {
    let fragment = Config::parse(&req.fragment_name, &req.fragment)?;
    let toolchain = check_build_tools()?;
    let dirs = Dirs::new(&req.home)?;
    let srctree = unpack_source(&dirs, &req.source_deb, &req.source_digest)?;
    let base = base_config(&dirs, &srctree, req, &toolchain)?;
    let (merged, _) = config::merge(&base, &fragment);
    let merged_text = merged.render();
    let key = build_key(req, &merged_text, &toolchain);
    let dir = dirs.builds.join(key.hex());
    if let Some(built) = load_built(&dir, &key, &toolchain)? {
        return Ok(built);
    }

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-", &key.hex()[..16]))
        .tempdir_in(&dirs.builds)
        .map_err(io_at("creating a kernel build directory", &dirs.builds))?;
    let out = tmp.path().join("obj");
    std::fs::create_dir_all(&out).map_err(io_at("creating the object directory", &out))?;
    // The log outlives a failed build (the temporary directory does not).
    let log_path = dirs.logs.join(format!("{}.log", key.hex()));
    let mut log = std::fs::File::create(&log_path).map_err(io_at("creating", &log_path))?;
    let _ = writeln!(
        log,
        "kiln kernel build {key}\nsource {}\nfragment {}\nbase {}\ntoolchain {toolchain}\n",
        req.source_digest,
        req.fragment_name,
        base_name(req.base)
    );
    write_atomic(&out.join(".config"), merged_text.as_bytes())
        .map_err(io_at("writing the merged configuration", &out))?;
    let make = Make {
        srctree: &srctree,
        out: &out,
        epoch: req.epoch,
        log: &log_path,
    };
    make.run(&["olddefconfig"], 1, false)?;
    let final_text = std::fs::read_to_string(out.join(".config"))
        .map_err(io_at("reading the configuration", out.join(".config")))?;
    let final_config = Config::parse(&out.join(".config").display().to_string(), &final_text)?;
    let lost = config::dropped(&fragment, &final_config);
    if !lost.is_empty() {
        return Err(KernelBuildError::Dropped {
            fragment: req.fragment_name.clone(),
            base: base_name(req.base),
            count: lost.len(),
            list: lost
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            options: lost,
        });
    }
    let jobs = req.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let started = Instant::now();
    make.run(&["bzImage"], jobs, true)?;
    if final_config.has_modules() {
        make.run(&["modules"], jobs, true)?;
        let staging = tmp.path().join("modules");
        let arg = format!("INSTALL_MOD_PATH={}", staging.display());
        make.run(&["modules_install", &arg, "INSTALL_MOD_STRIP=1"], 1, false)?;
    }
    let build_seconds = started.elapsed().as_secs_f64();

    // Keep the outputs, drop the objects.
    let bzimage = out.join("arch/x86/boot/bzImage");
    if !bzimage.is_file() {
        return Err(KernelBuildError::NoOutput {
            dir: out,
            file: "arch/x86/boot/bzImage",
        });
    }
    let release = std::fs::read_to_string(out.join("include/config/kernel.release"))
        .map_err(io_at("reading the kernel release", &out))?
        .trim()
        .to_string();
    let keep = [
        (bzimage, "bzImage"),
        (out.join(".config"), "config"),
        (out.join("System.map"), "System.map"),
    ];
    for (from, to) in keep {
        std::fs::rename(&from, tmp.path().join(to)).map_err(io_at("keeping", &from))?;
    }
    std::fs::copy(&log_path, tmp.path().join("build.log"))
        .map_err(io_at("keeping the build log", &log_path))?;
    std::fs::remove_dir_all(&out).map_err(io_at("removing the objects", &out))?;
    let record = serde_json::json!({
        "key": key,
        "release": release,
        "build_seconds": build_seconds,
        "toolchain": toolchain,
        "source": req.source_digest,
        "fragment": req.fragment_name,
        "base": base_name(req.base),
    });
    write_atomic(
        &tmp.path().join("kiln-build.json"),
        record.to_string().as_bytes(),
    )
    .map_err(io_at("recording the build", tmp.path()))?;
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, &dir) {
        // A concurrent build of the same key finished first: use its result.
        let _ = std::fs::remove_dir_all(&tmp_path);
        return load_built(&dir, &key, &toolchain)?
            .ok_or_else(|| io_at("storing the kernel build", &dir)(e));
    }
    let mut built = load_built(&dir, &key, &toolchain)?.ok_or(KernelBuildError::NoOutput {
        dir: dir.clone(),
        file: "bzImage",
    })?;
    built.cached = false;
    Ok(built)
}

fn base_name(base: KernelBase) -> &'static str {
    match base {
        KernelBase::Tinyconfig => "tinyconfig",
        KernelBase::Defconfig => "defconfig",
    }
}

fn build_key(req: &KernelBuildSpec, merged: &str, toolchain: &str) -> Digest256 {
    let mut h = Sha256::new();
    for (label, value) in [
        ("format", FORMAT),
        ("source", req.source_digest.as_str()),
        ("config", merged),
        ("toolchain", toolchain),
        ("epoch", &req.epoch.to_string()),
    ] {
        h.update(label.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    }
    Digest256::from_sha256(&h.finalize())
}

/// A finished build in `dir`, if there is one.
fn load_built(
    dir: &Path,
    key: &Digest256,
    toolchain: &str,
) -> Result<Option<BuiltKernel>, KernelBuildError> {
    let record_path = dir.join("kiln-build.json");
    let bzimage = dir.join("bzImage");
    let Ok(record) = std::fs::read(&record_path) else {
        return Ok(None);
    };
    if !bzimage.is_file() {
        return Ok(None);
    }
    let record: serde_json::Value = serde_json::from_slice(&record).map_err(|e| {
        io_at("reading the kernel build record", &record_path)(std::io::Error::other(e))
    })?;
    let config_path = dir.join("config");
    let text = std::fs::read_to_string(&config_path)
        .map_err(io_at("reading the kernel configuration", &config_path))?;
    Ok(Some(BuiltKernel {
        key: key.clone(),
        dir: dir.to_path_buf(),
        bzimage,
        release: record["release"].as_str().unwrap_or_default().to_string(),
        config: Config::parse(&config_path.display().to_string(), &text)?,
        log: dir.join("build.log"),
        cached: true,
        build_seconds: record["build_seconds"].as_f64().unwrap_or_default(),
        toolchain: toolchain.to_string(),
    }))
}

/// `make` in the source tree with the objects in `out`, reproducible settings, output to `log`.
struct Make<'a> {
    srctree: &'a Path,
    out: &'a Path,
    epoch: i64,
    log: &'a Path,
}

impl Make<'_> {
    fn run(&self, targets: &[&str], jobs: usize, nice: bool) -> Result<(), KernelBuildError> {
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.log)
            .map_err(io_at("opening the build log", self.log))?;
        let step = format!("make {}", targets.join(" "));
        let _ = writeln!(log, "\n$ {step} -j{jobs}");
        let mut cmd = if nice {
            let mut c = Command::new("nice");
            c.args(["-n", "10", "make"]);
            c
        } else {
            Command::new("make")
        };
        cmd.arg("-C")
            .arg(self.srctree)
            .arg(format!("O={}", self.out.display()))
            .arg("ARCH=x86_64")
            .arg(format!("-j{jobs}"))
            .args(targets)
            .env("KBUILD_BUILD_TIMESTAMP", build_timestamp(self.epoch))
            .env("KBUILD_BUILD_USER", "kiln")
            .env("KBUILD_BUILD_HOST", "kiln")
            .env("KBUILD_BUILD_VERSION", "1")
            .env("SOURCE_DATE_EPOCH", self.epoch.to_string())
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .stdin(Stdio::null());
        let err_log = log.try_clone().map_err(io_at("the build log", self.log))?;
        cmd.stdout(log).stderr(err_log);
        let status = cmd.status().map_err(io_at("running make", self.srctree))?;
        if status.success() {
            return Ok(());
        }
        Err(KernelBuildError::Make {
            step,
            status: status.to_string(),
            log: self.log.to_path_buf(),
            tail: log_tail(self.log, LOG_TAIL),
        })
    }
}

/// The kernel's build timestamp (`uname -v`) for SOURCE_DATE_EPOCH, as `date -u` prints it:
/// `Tue Nov 14 22:13:20 UTC 2023`.
pub fn build_timestamp(epoch: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let c = crate::time::Civil::from_epoch(epoch);
    format!(
        "{} {} {:>2} {:02}:{:02}:{:02} UTC {}",
        DAYS[c.weekday as usize],
        MONTHS[(c.month - 1).clamp(0, 11) as usize],
        c.day,
        c.hour,
        c.minute,
        c.second,
        c.year
    )
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut lines = std::collections::VecDeque::with_capacity(n + 1);
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        lines.push_back(line);
        if lines.len() > n {
            lines.pop_front();
        }
    }
    Vec::from(lines).join("\n")
}

/// The source tree of a `linux-source-*` package, unpacked once per package digest: the
/// `.deb`'s data tar is streamed, and the `usr/src/linux-source-*.tar.*` inside it is unpacked
/// into a temporary directory renamed into place (a concurrent unpack of the same package loses
/// the rename and uses the winner's tree).
fn unpack_source(dirs: &Dirs, deb: &Path, digest: &Digest256) -> Result<PathBuf, KernelBuildError> {
    let dir = dirs.src.join(digest.hex());
    let tree = |d: &Path| -> Option<PathBuf> {
        std::fs::read_dir(d)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.join("Makefile").is_file() && p.join("Kconfig").is_file())
    };
    if dir.join(".kiln-complete").is_file()
        && let Some(t) = tree(&dir)
    {
        return Ok(t);
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-", &digest.hex()[..16]))
        .tempdir_in(&dirs.src)
        .map_err(io_at("creating a source directory", &dirs.src))?;
    let file = std::fs::File::open(deb).map_err(io_at("reading the source package", deb))?;
    let mut ar =
        ArReader::new(BufReader::with_capacity(1 << 20, file)).map_err(io_at("reading", deb))?;
    let mut found = false;
    while let Some(member) = ar.next_member().map_err(io_at("reading", deb))? {
        if !member.name.starts_with("data.tar") {
            continue;
        }
        let data = decompressor(&member.name, ar.data(&member)).map_err(io_at("reading", deb))?;
        // Both tar streams are counted as they leave their decompressor: the .deb's data.tar
        // (no Installed-Size is at hand here: the cap for undeclared packages) and the source
        // tarball inside it.
        let mut data = LimitReader::new(data, MAX_UNDECLARED_DATA);
        let mut inner_limit: Option<(String, bool)> = None;
        let result = (|| -> Result<bool, KernelBuildError> {
            let mut outer = tar::Archive::new(&mut data);
            for entry in outer.entries().map_err(io_at("reading", deb))? {
                let entry = entry.map_err(io_at("reading", deb))?;
                let path = entry.path().map_err(io_at("reading", deb))?.into_owned();
                let name = path.to_string_lossy().trim_start_matches("./").to_string();
                let Some(file_name) = name.strip_prefix("usr/src/") else {
                    continue;
                };
                if !file_name.starts_with("linux-source-") || !file_name.contains(".tar") {
                    continue;
                }
                let inner = decompressor(file_name, entry).map_err(io_at("reading", deb))?;
                let mut inner = LimitReader::new(inner, MAX_SOURCE_TREE);
                let mut archive = tar::Archive::new(&mut inner);
                archive.set_preserve_mtime(true);
                let unpacked = archive.unpack(tmp.path());
                inner_limit = Some((file_name.to_string(), inner.exceeded()));
                unpacked.map_err(io_at(format!("unpacking {file_name}"), tmp.path()))?;
                return Ok(true);
            }
            Ok(false)
        })();
        if data.exceeded() {
            return Err(KernelBuildError::TooLarge {
                path: deb.to_path_buf(),
                what: member.name.clone(),
                limit: MAX_UNDECLARED_DATA,
            });
        }
        if let Some((file_name, true)) = inner_limit {
            return Err(KernelBuildError::TooLarge {
                path: deb.to_path_buf(),
                what: file_name,
                limit: MAX_SOURCE_TREE,
            });
        }
        found = result?;
        break;
    }
    if !found {
        return Err(KernelBuildError::NoTarball {
            path: deb.to_path_buf(),
        });
    }
    write_atomic(
        &tmp.path().join(".kiln-complete"),
        digest.as_str().as_bytes(),
    )
    .map_err(io_at("marking the source tree", tmp.path()))?;
    let tmp_path = tmp.keep();
    if dir.exists() {
        // A half-finished tree from an interrupted run, or a concurrent winner.
        if dir.join(".kiln-complete").is_file()
            && let Some(t) = tree(&dir)
        {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Ok(t);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = std::fs::rename(&tmp_path, &dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        if !dir.join(".kiln-complete").is_file() {
            return Err(io_at("storing the kernel source", &dir)(e));
        }
    }
    tree(&dir).ok_or(KernelBuildError::NoTarball {
        path: deb.to_path_buf(),
    })
}

/// The base configuration (`make tinyconfig` or `defconfig`) of a source tree, made once per
/// source digest, base and toolchain.
fn base_config(
    dirs: &Dirs,
    srctree: &Path,
    req: &KernelBuildSpec,
    toolchain: &str,
) -> Result<Config, KernelBuildError> {
    let mut h = Sha256::new();
    for part in [
        FORMAT,
        req.source_digest.as_str(),
        base_name(req.base),
        toolchain,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let path = dirs
        .base
        .join(format!("{}.config", hex::encode(h.finalize())));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) => {
            let tmp = tempfile::Builder::new()
                .prefix(".base-")
                .tempdir_in(&dirs.base)
                .map_err(io_at("creating a directory", &dirs.base))?;
            let log = tmp.path().join("log");
            let make = Make {
                srctree,
                out: tmp.path(),
                epoch: req.epoch,
                log: &log,
            };
            make.run(&[base_name(req.base)], 1, false)?;
            let text = std::fs::read_to_string(tmp.path().join(".config"))
                .map_err(io_at("reading the base configuration", tmp.path()))?;
            write_atomic(&path, text.as_bytes())
                .map_err(io_at("storing the base configuration", &path))?;
            text
        }
    };
    Ok(Config::parse(base_name(req.base), &text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_timestamps_read_like_date() {
        assert_eq!(
            build_timestamp(1_700_000_000),
            "Tue Nov 14 22:13:20 UTC 2023"
        );
        assert_eq!(build_timestamp(0), "Thu Jan  1 00:00:00 UTC 1970");
        assert_eq!(build_timestamp(951_782_400), "Tue Feb 29 00:00:00 UTC 2000");
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(log_tail(&p, 3), "line 98\nline 99\nline 100");
        assert_eq!(log_tail(&dir.path().join("none"), 3), "");
    }

    #[test]
    fn the_key_covers_source_config_toolchain_and_time() {
        let req = KernelBuildSpec {
            home: PathBuf::from("/nonexistent"),
            source_deb: PathBuf::from("/nonexistent.deb"),
            source_digest: Digest256::of(b"source"),
            fragment_name: "f".into(),
            fragment: String::new(),
            base: KernelBase::Tinyconfig,
            epoch: 1,
            jobs: None,
        };
        let k = build_key(&req, "CONFIG_A=y\n", "gcc 12");
        assert_eq!(k, build_key(&req, "CONFIG_A=y\n", "gcc 12"));
        assert_ne!(k, build_key(&req, "CONFIG_A=m\n", "gcc 12"));
        assert_ne!(k, build_key(&req, "CONFIG_A=y\n", "gcc 13"));
        let mut other = req.clone();
        other.epoch = 2;
        assert_ne!(k, build_key(&other, "CONFIG_A=y\n", "gcc 12"));
        other = req.clone();
        other.source_digest = Digest256::of(b"other");
        assert_ne!(k, build_key(&other, "CONFIG_A=y\n", "gcc 12"));
    }
}
