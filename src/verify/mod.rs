//! Boot verification: start the image in QEMU on a machine profile (`qemu/*.toml`), read the
//! serial console, and report whether and how fast the expected marker line appeared.
//!
//! - [`profile`]: the machine profiles (direct kernel boot, UEFI with OVMF).
//! - [`accel`]: KVM when a probe shows it can run a guest, else TCG.
//! - [`qemu`]: the QEMU command line and the process, which never outlives a boot.
//! - [`serial`]: serial output to lines; marker, kernel banner and panic detection.
//!
//! [`boot`] runs one [`BootSpec`]: it writes the whole serial log to the caller's file as it
//! arrives, succeeds when the marker line appears, and fails on timeout, on QEMU exiting first,
//! or at once on a kernel panic — with the last lines of the console in the error. QEMU is
//! killed (its process group) and reaped on every path. The image itself is attached with
//! `snapshot=on`, so a boot never changes it. [`boot_image`] is the `kiln boot` entry point.

pub mod accel;
pub mod profile;
pub mod qemu;
pub mod serial;

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use accel::{Accel, AccelProbe};
pub use profile::{AccelChoice, BootMethod, Profile, ProfileDir};

use qemu::QemuProcess;
use serial::{Event, SerialWatcher, TAIL_LINES};

/// How long a guest may take to power off after printing the marker before QEMU is killed.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Errors preparing or running a boot.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{binary} not found: install the Debian package qemu-system-x86 (or set $KILN_QEMU)")]
    QemuMissing { binary: String },
    #[error(
        "UEFI firmware {what} {path} not found: install the Debian package ovmf, or point the \
         profile's [firmware] at the OVMF files"
    )]
    FirmwareMissing { what: &'static str, path: PathBuf },
    #[error("{what} {path} does not exist")]
    InputMissing { what: &'static str, path: PathBuf },
    #[error("profile {profile} boots the kernel directly, so the boot needs a kernel file")]
    KernelRequired { profile: String },
    #[error("invalid boot request: {reason}")]
    BadSpec { reason: String },
    #[error(
        "machine profile directory {dir} does not exist (from --profiles or $KILN_QEMU_PROFILES)"
    )]
    ProfileDirMissing { dir: PathBuf },
    #[error(
        "{name:?} is not a machine profile name: a profile is named (A-Z a-z 0-9 _ -, at most 64 \
         characters) and looked up in the worker's profile directory (--profiles, \
         $KILN_QEMU_PROFILES or qemu/); paths are not accepted"
    )]
    ProfileName { name: String },
    #[error("no machine profile {name:?} in {dir}; available: {available}")]
    ProfileNotFound {
        name: String,
        dir: String,
        available: String,
    },
    #[error("machine profile {source_name}: {message}")]
    ProfileParse {
        source_name: String,
        message: String,
    },
    #[error("machine profile {source_name}: {reason}")]
    ProfileInvalid { source_name: String, reason: String },
    #[error("the profile asks for KVM, but {detail}; set accel = \"auto\" or \"tcg\"")]
    KvmUnusable { detail: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no line containing {marker:?} on the serial console within {:.1} s ({accel}; {}); QEMU \
         (pid {pid}) was killed{}",
        timeout.as_secs_f64(),
        if *kernel_seen { "the kernel started" } else { "the kernel never printed its banner" },
        console
    )]
    Timeout {
        marker: String,
        timeout: Duration,
        accel: Accel,
        pid: u32,
        kernel_seen: bool,
        console: Box<Console>,
    },
    #[error(
        "QEMU exited ({status}) after {:.2} s, before a line containing {marker:?} appeared{}{}",
        after.as_secs_f64(),
        Stderr(stderr),
        console
    )]
    Exited {
        marker: String,
        status: String,
        after: Duration,
        stderr: String,
        console: Box<Console>,
    },
    #[error(
        "the image enrolled its Secure Boot keys and reset the machine after {:.2} s, which this \
         profile ends the boot at; boot an image with `boot.secure_boot` under a profile with \
         Secure Boot firmware and `reboot = true`, such as `uefi-secureboot` (`--profile \
         uefi-secureboot`, or `verify.profile` in the recipe){}",
        after.as_secs_f64(),
        console
    )]
    ResetAfterEnrolling {
        after: Duration,
        console: Box<Console>,
    },
    #[error(
        "the kernel panicked after {:.2} s, before a line containing {marker:?} appeared: {line}; \
         QEMU was killed{}",
        after.as_secs_f64(),
        console
    )]
    Panic {
        marker: String,
        line: String,
        after: Duration,
        console: Box<Console>,
    },
    #[error(
        "the firmware refused to start the image after {:.2} s: {line} — a boot loader or \
         unified kernel image not signed by a key in the firmware's db (or changed after \
         signing); QEMU was killed{}",
        after.as_secs_f64(),
        console
    )]
    Refused {
        line: String,
        after: Duration,
        console: Box<Console>,
    },
    #[error(
        "dm-verity refused a block of the root (/dev/mapper/root) after {:.2} s: {line} — the \
         root partition differs from what its root hash covers (changed after the build, or \
         damaged); QEMU was killed{}",
        after.as_secs_f64(),
        console
    )]
    Corrupted {
        line: String,
        after: Duration,
        console: Box<Console>,
    },
}

impl VerifyError {
    /// The serial console's log file and last lines, for errors from a boot that ran.
    pub fn console(&self) -> Option<&Console> {
        match self {
            VerifyError::Timeout { console, .. }
            | VerifyError::Exited { console, .. }
            | VerifyError::ResetAfterEnrolling { console, .. }
            | VerifyError::Panic { console, .. }
            | VerifyError::Refused { console, .. }
            | VerifyError::Corrupted { console, .. } => Some(console),
            _ => None,
        }
    }
}

/// The serial console of a failed boot: where the full log is, and its last lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Console {
    pub log: PathBuf,
    /// The last [`serial::TAIL_LINES`] lines, joined by newlines.
    pub tail: String,
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tail.is_empty() {
            write!(
                f,
                "\nthe serial console printed nothing (log: {})",
                self.log.display()
            )
        } else {
            write!(
                f,
                "\nlast {TAIL_LINES} lines of the serial console (full log: {}):\n{}",
                self.log.display(),
                self.tail
            )
        }
    }
}

struct Stderr<'a>(&'a String);

impl fmt::Display for Stderr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.trim().is_empty() {
            Ok(())
        } else {
            write!(f, "\nQEMU said: {}", self.0.trim())
        }
    }
}

/// One boot to run.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// The machine.
    pub profile: Profile,
    /// The disk image (raw or qcow2, detected), attached as virtio-blk with `snapshot=on`.
    /// Required for UEFI (it holds the ESP); optional for direct boot.
    pub image: Option<PathBuf>,
    /// Direct boot: the kernel (required) and initrd (optional).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Direct boot: the kernel command line; the profile's `append` is added after it.
    pub cmdline: String,
    /// The boot succeeds when a serial console line contains this text. It should not be part of
    /// the kernel command line, which the kernel echoes.
    pub expect: String,
    /// How long from starting QEMU until the marker must appear.
    pub timeout: Duration,
    /// The serial console is written here as it arrives (created or truncated).
    pub serial_log: PathBuf,
    /// Use this accelerator instead of the profile's choice (no probe).
    pub accel: Option<Accel>,
    /// After the marker, how long the guest may take to power off by itself before QEMU is
    /// killed. Zero stops QEMU at once.
    pub shutdown_grace: Duration,
}

impl BootSpec {
    /// A spec with no image, kernel or command line, the default shutdown grace and the
    /// profile's accelerator choice.
    pub fn new(
        profile: Profile,
        expect: impl Into<String>,
        timeout: Duration,
        serial_log: impl Into<PathBuf>,
    ) -> BootSpec {
        BootSpec {
            profile,
            image: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            expect: expect.into(),
            timeout,
            serial_log: serial_log.into(),
            accel: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// What a successful boot measured. Times count from starting QEMU (in seconds as JSON: `kiln
/// boot --json` prints it whole).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BootReport {
    pub profile: String,
    pub accel: Accel,
    /// Why this accelerator (the probe's finding, or who chose it).
    pub accel_detail: String,
    /// The first byte on the serial console (firmware or kernel).
    #[serde(serialize_with = "optional_seconds")]
    pub time_to_first_output: Option<Duration>,
    /// The first complete line.
    #[serde(serialize_with = "optional_seconds")]
    pub time_to_first_line: Option<Duration>,
    /// The kernel's banner line (`Linux version …`); `None` if it was not printed (e.g. `quiet`).
    #[serde(serialize_with = "optional_seconds")]
    pub time_to_kernel: Option<Duration>,
    /// The marker line.
    #[serde(serialize_with = "seconds")]
    pub time_to_marker: Duration,
    /// Until QEMU was gone (the guest powered off, or QEMU was killed after the grace time).
    #[serde(serialize_with = "seconds")]
    pub total: Duration,
    /// The line that contained the marker.
    pub marker_line: String,
    /// What the kernel said about UEFI Secure Boot (`Secure boot enabled`), when it said it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<String>,
    /// The dm-verity root hash the root was mounted with, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity_root_hash: Option<String>,
    /// Whether the guest ended QEMU by itself (power off) after the marker.
    pub powered_off: bool,
    /// QEMU's process id (gone by the time the report exists).
    pub qemu_pid: u32,
    pub serial_log: PathBuf,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn optional_seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => seconds(d, s),
        None => s.serialize_none(),
    }
}

impl fmt::Display for BootReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: Option<Duration>| match d {
            Some(d) => format!("{:.2} s", d.as_secs_f64()),
            None => "-".into(),
        };
        write!(
            f,
            "{} boot ({}): first output {}, kernel {}, marker {}, total {} (serial log {})",
            self.profile,
            self.accel,
            secs(self.time_to_first_output),
            secs(self.time_to_kernel),
            secs(Some(self.time_to_marker)),
            secs(Some(self.total)),
            self.serial_log.display()
        )
    }
}

/// Where `kiln boot` keeps an image's serial log: beside it, `<image>.serial.log`.
pub fn serial_log_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_os_string();
    name.push(".serial.log");
    PathBuf::from(name)
}

/// `kiln boot`: options naming the profile rather than holding it.
#[derive(Clone, Debug)]
pub struct BootImageOptions {
    /// Profile name (`direct`, `uefi`, … in the profile directory) or a path to a profile file.
    pub profile: String,
    /// The profile directory (`--profiles`); default see [`ProfileDir::locate`].
    pub profiles_dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub expect: String,
    pub timeout: Duration,
    /// Default: [`serial_log_path`] of the image.
    pub serial_log: Option<PathBuf>,
    pub accel: Option<Accel>,
}

impl BootImageOptions {
    /// Options for `profile`, waiting up to `timeout` for `expect`.
    pub fn new(profile: impl Into<String>, expect: impl Into<String>, timeout: Duration) -> Self {
        BootImageOptions {
            profile: profile.into(),
            profiles_dir: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            expect: expect.into(),
            timeout,
            serial_log: None,
            accel: None,
        }
    }
}

/// Boot `image` on the named profile and wait for the marker (the `kiln boot` command).
pub fn boot_image(image: &Path, opts: &BootImageOptions) -> Result<BootReport, VerifyError> {
    let profile = ProfileDir::locate(opts.profiles_dir.as_deref())?.load(&opts.profile)?;
    let serial_log = opts
        .serial_log
        .clone()
        .unwrap_or_else(|| serial_log_path(image));
    let mut spec = BootSpec::new(profile, opts.expect.clone(), opts.timeout, serial_log);
    spec.image = Some(image.to_path_buf());
    spec.kernel = opts.kernel.clone();
    spec.initrd = opts.initrd.clone();
    spec.cmdline = opts.cmdline.clone();
    spec.accel = opts.accel;
    boot(&spec)
}

/// Check the spec's inputs before anything starts.
fn check_spec(spec: &BootSpec) -> Result<(), VerifyError> {
    let bad = |reason: &str| {
        Err(VerifyError::BadSpec {
            reason: reason.to_string(),
        })
    };
    if spec.expect.trim().is_empty() {
        return bad("the expected marker is empty; every boot would pass");
    }
    if spec.expect.contains('\n') {
        return bad("the expected marker spans lines; it must be part of one line");
    }
    if spec.cmdline.contains(['\n', '\0']) {
        return bad("the kernel command line must be one line");
    }
    if spec.timeout.is_zero() {
        return bad("the timeout is zero");
    }
    let must_exist = |what, path: &Path| {
        if path.exists() {
            Ok(())
        } else {
            Err(VerifyError::InputMissing {
                what,
                path: path.to_path_buf(),
            })
        }
    };
    if let Some(image) = &spec.image {
        must_exist("disk image", image)?;
    }
    match spec.profile.boot {
        BootMethod::Direct => {
            let kernel = spec
                .kernel
                .as_deref()
                .ok_or_else(|| VerifyError::KernelRequired {
                    profile: spec.profile.name.clone(),
                })?;
            must_exist("kernel", kernel)?;
            if let Some(initrd) = &spec.initrd {
                must_exist("initrd", initrd)?;
            }
        }
        BootMethod::Uefi => {
            if spec.image.is_none() {
                return bad("a UEFI boot needs a disk image (the firmware boots its ESP)");
            }
            if spec.kernel.is_some() || spec.initrd.is_some() || !spec.cmdline.is_empty() {
                return bad(
                    "kernel, initrd and command line are for direct boot; under UEFI they come \
                     from the image's boot loader entry",
                );
            }
            if let Some(fw) = &spec.profile.firmware {
                for (what, path) in [("code", &fw.code), ("variable store", &fw.vars)] {
                    if !path.is_file() {
                        return Err(VerifyError::FirmwareMissing {
                            what,
                            path: path.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Decide the accelerator for `spec`: the caller's, the profile's, or the probe's.
fn choose_accel(spec: &BootSpec, qemu: &Path) -> Result<(Accel, String), VerifyError> {
    if let Some(accel) = spec.accel {
        return Ok((accel, format!("{accel} chosen by the caller")));
    }
    profile_accel(&spec.profile, qemu)
}

/// The accelerator a profile asks for: TCG, or the (cached) probe's finding for `auto`/`kvm`.
pub fn profile_accel(profile: &Profile, qemu: &Path) -> Result<(Accel, String), VerifyError> {
    match profile.accel {
        AccelChoice::Tcg => Ok((Accel::Tcg, "tcg chosen by the profile".into())),
        AccelChoice::Auto => {
            let probe = accel::probe_cached(qemu);
            Ok((probe.accel, probe.detail))
        }
        AccelChoice::Kvm => {
            let probe = accel::probe_cached(qemu);
            if probe.kvm_usable {
                Ok((Accel::Kvm, probe.detail))
            } else {
                Err(VerifyError::KvmUnusable {
                    detail: probe.detail,
                })
            }
        }
    }
}

/// A private, writable copy of the OVMF variable store in `dir`.
pub fn private_vars(template: &Path, dir: &Path) -> Result<PathBuf, VerifyError> {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("OVMF_VARS.fd");
    std::fs::copy(template, &copy).map_err(|source| VerifyError::Io {
        what: "copying the UEFI variable store",
        path: template.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        VerifyError::Io {
            what: "making the UEFI variable store copy writable",
            path: copy.clone(),
            source,
        }
    })?;
    Ok(copy)
}

/// Run one boot. See the module documentation.
pub fn boot(spec: &BootSpec) -> Result<BootReport, VerifyError> {
    check_spec(spec)?;
    let qemu = qemu::find_qemu()?;
    let (accel, accel_detail) = choose_accel(spec, &qemu)?;
    let disk = match &spec.image {
        Some(image) => Some((image.as_path(), qemu::drive_format(image)?)),
        None => None,
    };
    let scratch = tempfile::Builder::new()
        .prefix("kiln-boot.")
        .tempdir()
        .map_err(|source| VerifyError::Io {
            what: "creating a temp directory in",
            path: std::env::temp_dir(),
            source,
        })?;
    let vars = match (&spec.profile.boot, &spec.profile.firmware) {
        (BootMethod::Uefi, Some(fw)) => Some(private_vars(&fw.vars, scratch.path())?),
        _ => None,
    };
    let mut log = File::create(&spec.serial_log).map_err(|source| VerifyError::Io {
        what: "creating the serial log",
        path: spec.serial_log.clone(),
        source,
    })?;
    let args = qemu::qemu_args(&spec.profile, spec, accel, vars.as_deref(), disk);
    tracing::debug!(qemu = %qemu.display(), ?args, "starting QEMU");
    let mut cmd = Command::new(&qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = QemuProcess::spawn(cmd).map_err(|source| VerifyError::Spawn {
        binary: qemu.clone(),
        source,
    })?;
    let started = Instant::now();
    let pid = process.pid();

    let rx = read_serial(process.stdout());
    let stderr = StderrTail::read(process.stderr());

    let mut watcher = SerialWatcher::new(&spec.expect);
    let mut seen = Seen::default();
    let deadline = started + spec.timeout;
    let mut grace_deadline = None;
    let mut eof = false;
    while !eof && seen.panic.is_none() && seen.refused.is_none() && seen.corrupted.is_none() {
        let until = grace_deadline.unwrap_or(deadline);
        let now = Instant::now();
        if now >= until {
            break;
        }
        let (events, at) = match rx.recv_timeout(until - now) {
            Ok(Some((at, bytes))) => {
                log.write_all(&bytes).map_err(|source| VerifyError::Io {
                    what: "writing the serial log",
                    path: spec.serial_log.clone(),
                    source,
                })?;
                (watcher.feed(&bytes), at - started)
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                eof = true;
                (watcher.finish(), started.elapsed())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        };
        seen.record(events, at);
        if seen.marker.is_some() && grace_deadline.is_none() {
            grace_deadline = Some(Instant::now() + spec.shutdown_grace);
        }
    }
    let _ = log.flush();

    let io_err = |what, source| VerifyError::Io {
        what,
        path: qemu.clone(),
        source,
    };
    if let Some((after, line)) = seen.corrupted.clone() {
        process.kill().map_err(|e| io_err("stopping QEMU", e))?;
        return Err(VerifyError::Corrupted {
            line,
            after,
            console: Box::new(Console {
                log: spec.serial_log.clone(),
                tail: watcher.tail(),
            }),
        });
    }
    if let Some((time_to_marker, marker_line)) = seen.marker.clone() {
        let remaining = grace_deadline
            .map(|g| g.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let exited = process
            .wait_timeout(remaining)
            .map_err(|e| io_err("waiting for QEMU", e))?;
        if exited.is_none() {
            process.kill().map_err(|e| io_err("stopping QEMU", e))?;
        }
        let total = started.elapsed();
        // Drain what QEMU printed before it went away into the log.
        while let Ok(Some((_, bytes))) = rx.recv_timeout(Duration::from_millis(200)) {
            let _ = log.write_all(&bytes);
        }
        return Ok(BootReport {
            profile: spec.profile.name.clone(),
            accel,
            accel_detail,
            time_to_first_output: seen.first_output,
            time_to_first_line: seen.first_line,
            time_to_kernel: seen.kernel,
            time_to_marker,
            total,
            marker_line,
            secure_boot: seen.secure_boot.clone(),
            verity_root_hash: seen.verity_root.clone(),
            powered_off: exited.is_some(),
            qemu_pid: pid,
            serial_log: spec.serial_log.clone(),
        });
    }
    if let Some((after, line)) = seen.refused.clone() {
        process.kill().map_err(|e| io_err("stopping QEMU", e))?;
        return Err(VerifyError::Refused {
            line,
            after,
            console: Box::new(Console {
                log: spec.serial_log.clone(),
                tail: watcher.tail(),
            }),
        });
    }
    if let Some((after, line)) = seen.panic.clone() {
        process.kill().map_err(|e| io_err("stopping QEMU", e))?;
        return Err(VerifyError::Panic {
            marker: spec.expect.clone(),
            line,
            after,
            console: Box::new(Console {
                log: spec.serial_log.clone(),
                tail: watcher.tail(),
            }),
        });
    }
    if eof {
        // QEMU closed its stdout: it is exiting. Give it a moment, then make sure.
        let after = started.elapsed();
        let status = match process
            .wait_timeout(Duration::from_secs(2))
            .map_err(|e| io_err("waiting for QEMU", e))?
        {
            Some(status) => status.to_string(),
            None => {
                process.kill().map_err(|e| io_err("stopping QEMU", e))?;
                "closed its console and was killed".to_string()
            }
        };
        let console = Box::new(Console {
            log: spec.serial_log.clone(),
            tail: watcher.tail(),
        });
        // systemd-boot enrolling keys in setup mode resets the machine when it is done.
        if !spec.profile.reboot && console.tail.contains("Enrolling secure boot keys") {
            return Err(VerifyError::ResetAfterEnrolling { after, console });
        }
        let stderr = stderr.text();
        return Err(VerifyError::Exited {
            marker: spec.expect.clone(),
            status,
            after,
            stderr,
            console,
        });
    }
    process.kill().map_err(|e| io_err("stopping QEMU", e))?;
    Err(VerifyError::Timeout {
        marker: spec.expect.clone(),
        timeout: spec.timeout,
        accel,
        pid,
        kernel_seen: seen.kernel.is_some(),
        console: Box::new(Console {
            log: spec.serial_log.clone(),
            tail: watcher.tail(),
        }),
    })
}

/// Serial output arrives on QEMU's stdout; a thread reads it and sends each chunk stamped with
/// its arrival time, then `None` at the end of the stream.
fn read_serial(stdout: Option<ChildStdout>) -> mpsc::Receiver<Option<(Instant, Vec<u8>)>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut stdout) = stdout {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Some((Instant::now(), buf[..n].to_vec()))).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(None);
        });
    }
    rx
}

/// The last [`StderrTail::KEEP`] bytes of QEMU's stderr (its error message is at the end),
/// read by a thread.
struct StderrTail {
    text: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StderrTail {
    const KEEP: usize = 8192;

    fn read(stderr: Option<ChildStderr>) -> StderrTail {
        let text = Arc::new(Mutex::new(Vec::new()));
        let thread = stderr.map(|mut stderr| {
            let text = Arc::clone(&text);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut t) = text.lock() {
                        t.extend_from_slice(&buf[..n]);
                        if t.len() > Self::KEEP {
                            let cut = t.len() - Self::KEEP;
                            t.drain(..cut);
                        }
                    }
                }
            })
        });
        StderrTail { text, thread }
    }

    /// What was read, once QEMU has exited: the thread ends at the end of the stream, which it
    /// is given up to a second to reach (a stray process could hold the pipe open).
    fn text(mut self) -> String {
        if let Some(thread) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(1);
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        self.text
            .lock()
            .map(|t| String::from_utf8_lossy(&t).into_owned())
            .unwrap_or_default()
    }
}

/// What the watcher has reported so far, with times since QEMU started.
#[derive(Default)]
struct Seen {
    first_output: Option<Duration>,
    first_line: Option<Duration>,
    kernel: Option<Duration>,
    marker: Option<(Duration, String)>,
    panic: Option<(Duration, String)>,
    secure_boot: Option<String>,
    refused: Option<(Duration, String)>,
    corrupted: Option<(Duration, String)>,
    verity_root: Option<String>,
}

impl Seen {
    fn record(&mut self, events: Vec<Event>, at: Duration) {
        for event in events {
            match event {
                Event::FirstOutput => self.first_output = Some(at),
                Event::FirstLine => self.first_line = Some(at),
                Event::Kernel => self.kernel = Some(at),
                Event::Marker(line) => {
                    self.marker.get_or_insert((at, line));
                }
                // A panic after the marker (e.g. while powering off) does not undo the success.
                Event::Panic(line) if self.marker.is_none() => {
                    self.panic.get_or_insert((at, line));
                }
                Event::Panic(_) => {}
                Event::SecureBoot(state) => {
                    self.secure_boot.get_or_insert(state);
                }
                Event::Refused(line) if self.marker.is_none() => {
                    self.refused.get_or_insert((at, line));
                }
                Event::Refused(_) => {}
                // A changed block fails the boot even when the marker came first.
                Event::VerityRoot(hash) => {
                    self.verity_root.get_or_insert(hash);
                }
                Event::Corrupted(line) => {
                    self.corrupted.get_or_insert((at, line));
                }
            }
        }
    }
}
