//! Choosing the accelerator: KVM when it can really run a guest, else TCG.
//!
//! `/dev/kvm` existing is not enough: some hosts (e.g. those with the `kvm_pvm` module) accept
//! every KVM ioctl and run real-mode code, yet hang as soon as a guest switches to protected mode —
//! which every kernel does. So the probe, after the cheap checks (open `/dev/kvm`,
//! `KVM_GET_API_VERSION`, `KVM_CREATE_VM`), starts QEMU under KVM with a 64 KiB test firmware that
//! prints `R` in real mode, switches to 32-bit protected mode, prints `P` and writes to QEMU's
//! `isa-debug-exit` port, so QEMU exits with status 3. Anything else within [`PROBE_TIMEOUT`] (or
//! within [`PROTECTED_MODE_GRACE`] of the `R`) means KVM cannot run guests here, and the answer
//! says which step failed. The result is cached per process and QEMU binary, and on disk per host
//! boot (see `record_path`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::qemu::QemuProcess;

/// How long the test guest may take under KVM (it needs milliseconds when KVM works).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// How long the test guest may take from real mode (its `R`) to its exit: microseconds of guest
/// code, so this is all slack for a loaded host.
pub const PROTECTED_MODE_GRACE: Duration = Duration::from_millis(500);

/// The accelerator QEMU runs the guest with (serialized as its `-accel` value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The probe's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelProbe {
    /// The accelerator to use: KVM if it ran the test guest, else TCG.
    pub accel: Accel,
    /// Whether KVM ran the test guest.
    pub kvm_usable: bool,
    /// What the probe found (why KVM is or is not used).
    pub detail: String,
    /// How long the probe took.
    pub took: Duration,
}

/// The probe's answer for `qemu`, probing on the first call in this process only.
pub fn probe_cached(qemu: &Path) -> AccelProbe {
    static CACHE: OnceLock<Mutex<BTreeMap<PathBuf, AccelProbe>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(BTreeMap::new()));
    // Held while probing, so concurrent callers wait for one probe instead of running several.
    let mut map = match cache.lock() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(answer) = map.get(qemu) {
        return answer.clone();
    }
    let record = record_path(qemu);
    if let Some(answer) = record.as_deref().and_then(read_record) {
        map.insert(qemu.to_path_buf(), answer.clone());
        return answer;
    }
    let answer = probe(qemu);
    if let Some(path) = &record {
        write_record(path, &answer);
    }
    map.insert(qemu.to_path_buf(), answer.clone());
    answer
}

/// Start [`probe_cached`] for `qemu` on another thread, so that a build's first boot finds the
/// answer ready instead of probing after the disk is written (the probe boots a test guest and
/// may wait seconds for it).
pub fn probe_in_background(qemu: PathBuf) {
    std::thread::spawn(move || {
        probe_cached(&qemu);
    });
}

/// Where the probe's answer is kept across processes: `$KILN_HOME/accel/<key>.json`, keyed by the
/// QEMU binary (path, size, mtime), the host kernel and the host's boot id — so it is asked again
/// after a reboot, a kernel or a QEMU change.
fn record_path(qemu: &Path) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(qemu).ok()?;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut h = Sha256::new();
    h.update(qemu.as_os_str().as_encoded_bytes());
    h.update(meta.size().to_le_bytes());
    h.update(meta.mtime().to_le_bytes());
    h.update(boot_id.trim().as_bytes());
    h.update(release.trim().as_bytes());
    let key = hex::encode(&h.finalize()[..16]);
    Some(
        crate::home::kiln_home()
            .join("accel")
            .join(format!("{key}.json")),
    )
}

fn read_record(path: &Path) -> Option<AccelProbe> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let kvm_usable = v["kvm_usable"].as_bool()?;
    Some(AccelProbe {
        accel: if kvm_usable { Accel::Kvm } else { Accel::Tcg },
        kvm_usable,
        detail: format!(
            "{} (probed earlier this boot; delete {} to probe again)",
            v["detail"].as_str()?,
            path.display()
        ),
        took: Duration::ZERO,
    })
}

fn write_record(path: &Path, answer: &AccelProbe) {
    let v = serde_json::json!({
        "kvm_usable": answer.kvm_usable,
        "detail": answer.detail,
        "took_ms": answer.took.as_millis() as u64,
    });
    if let Ok(bytes) = serde_json::to_vec_pretty(&v)
        && let Err(e) = crate::home::write_atomic(path, &bytes)
    {
        tracing::debug!("cannot record the KVM probe in {}: {e}", path.display());
    }
}

/// Probe now (uncached): can `qemu` run a guest under KVM?
pub fn probe(qemu: &Path) -> AccelProbe {
    let start = Instant::now();
    let result = kvm_device_check().and_then(|()| kvm_guest_check(qemu));
    let (accel, kvm_usable, detail) = match result {
        Ok(detail) => (Accel::Kvm, true, detail),
        Err(why) => (
            Accel::Tcg,
            false,
            format!("KVM cannot be used ({why}); using TCG"),
        ),
    };
    AccelProbe {
        accel,
        kvm_usable,
        detail,
        took: start.elapsed(),
    }
}

// ioctl numbers from <linux/kvm.h> (KVMIO = 0xAE; both take no argument structure).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_API_VERSION: libc::c_int = 12;

/// `/dev/kvm` opens, speaks API version 12, and creates a VM.
fn kvm_device_check() -> Result<(), String> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Err("/dev/kvm does not exist: no KVM module loaded, or not exposed here".into());
    }
    let kvm = File::options()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| {
            format!("cannot open /dev/kvm read-write: {e} (add the user to the kvm group)")
        })?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!(
            "KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}"
        ));
    }
    // SAFETY: KVM_CREATE_VM with machine type 0 returns a new file descriptor or -1.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(format!(
            "KVM_CREATE_VM failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `vm` is a descriptor we own and close once.
    unsafe { libc::close(vm) };
    Ok(())
}

/// Run the test firmware under KVM.
fn kvm_guest_check(qemu: &Path) -> Result<String, String> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-kvm-probe.")
        .tempdir()
        .map_err(|e| format!("cannot make a temp directory for the probe: {e}"))?;
    let firmware = dir.path().join("probe.bin");
    std::fs::write(&firmware, probe_firmware())
        .map_err(|e| format!("cannot write {}: {e}", firmware.display()))?;
    let out_path = dir.path().join("serial");
    let err_path = dir.path().join("stderr");
    let open =
        |p: &Path| File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
    let (out, err) = (open(&out_path)?, open(&err_path)?);
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-m", "16", "-no-reboot", "-serial", "stdio", "-bios"])
    .arg(&firmware)
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    let mut process =
        QemuProcess::spawn(cmd).map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let status = wait_for_guest(&mut process, &out_path)
        .map_err(|e| format!("waiting for the probe QEMU: {e}"))?;
    let serial = std::fs::read(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let stderr = stderr.trim();
    let reached = |c: u8| serial.contains(&c);
    match status {
        Some(status) if status.code() == Some(3) => Ok(format!(
            "a test guest switched to protected mode under KVM in {} ms",
            process.age().as_millis()
        )),
        Some(status) => Err(format!(
            "QEMU with -accel kvm exited with {status} before the test guest finished{}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {stderr}")
            }
        )),
        None => {
            process
                .kill()
                .map_err(|e| format!("stopping the probe QEMU: {e}"))?;
            let stage = if reached(b'P') {
                "it reached protected mode but did not exit"
            } else if reached(b'R') {
                "it ran in real mode but hung switching to protected mode, as a kernel would"
            } else {
                "it printed nothing"
            };
            Err(format!(
                "a test guest under KVM did not finish within {} ms: {stage}",
                process.age().as_millis()
            ))
        }
    }
}

/// Wait for the probe QEMU to exit, at most [`PROBE_TIMEOUT`] — or, once the guest has printed
/// `R` (real mode ran), at most [`PROTECTED_MODE_GRACE`] more for it to finish: the switch to
/// protected mode is a handful of instructions, so a guest still silent after that is hung there
/// (the signature of hosts where KVM cannot run kernels), and the probe need not wait out the rest.
/// `None`: it did not exit in time (the caller kills it).
fn wait_for_guest(
    process: &mut QemuProcess,
    serial: &Path,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let mut real_mode_at: Option<Instant> = None;
    loop {
        if let Some(status) = process.try_wait()? {
            return Ok(Some(status));
        }
        if real_mode_at.is_none() && std::fs::read(serial).is_ok_and(|out| out.contains(&b'R')) {
            real_mode_at = Some(Instant::now());
        }
        let hung = real_mode_at.is_some_and(|at| at.elapsed() >= PROTECTED_MODE_GRACE);
        if hung || process.age() >= PROBE_TIMEOUT {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A 64 KiB firmware image (`-bios`), hand-assembled. QEMU maps it below 4 GiB and at
/// 0xF0000; the CPU starts at F000:FFF0.
fn probe_firmware() -> Vec<u8> {
    #[rustfmt::skip]
    const CODE: [u8; 0x37] = [
        // 0x00, real mode, CS base 0xF0000
        0xfa,                                     // cli
        0xba, 0xf8, 0x03,                         // mov dx, 0x3f8 (COM1 data)
        0xb0, b'R',                               // mov al, 'R'
        0xee,                                     // out dx, al
        0x2e, 0x66, 0x0f, 0x01, 0x16, 0x58, 0x00, // lgdt cs:[0x58] (32-bit base)
        0x0f, 0x20, 0xc0,                         // mov eax, cr0
        0x0c, 0x01,                               // or al, 1 (PE)
        0x0f, 0x22, 0xc0,                         // mov cr0, eax
        0x66, 0xea, 0x1e, 0x00, 0x0f, 0x00, 0x08, 0x00, // jmp dword 0x08:0x000f001e
        // 0x1e, 32-bit protected mode
        0x66, 0xb8, 0x10, 0x00,                   // mov ax, 0x10 (flat data)
        0x8e, 0xd8,                               // mov ds, ax
        0x8e, 0xd0,                               // mov ss, ax
        0x66, 0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
        0xb0, b'P',                               // mov al, 'P'
        0xee,                                     // out dx, al
        0x66, 0xba, 0xf4, 0x00,                   // mov dx, 0xf4 (isa-debug-exit)
        0xb0, 0x01,                               // mov al, 1 -> QEMU exit status 3
        0xee,                                     // out dx, al
        0xf4,                                     // hlt
        0xeb, 0xfd,                               // jmp hlt
    ];
    #[rustfmt::skip]
    const GDT: [u8; 0x1e] = [
        // 0x40: null descriptor, flat 4 GiB code (0x08), flat 4 GiB data (0x10)
        0, 0, 0, 0, 0, 0, 0, 0,
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
        0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
        // 0x58: GDTR: limit 23, base 0x000f0040
        0x17, 0x00, 0x40, 0x00, 0x0f, 0x00,
    ];
    // 0xfff0, the reset vector: jmp far 0xf000:0x0000
    const RESET: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];
    let mut image = vec![0u8; 0x10000];
    image[..CODE.len()].copy_from_slice(&CODE);
    image[0x40..0x40 + GDT.len()].copy_from_slice(&GDT);
    image[0xfff0..0xfff0 + RESET.len()].copy_from_slice(&RESET);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_layout() {
        let fw = probe_firmware();
        assert_eq!(fw.len(), 65536);
        // The far jump targets the 32-bit code at offset 0x1e; the GDTR points at 0xf0040.
        assert_eq!(&fw[0x16..0x1e], &[0x66, 0xea, 0x1e, 0, 0x0f, 0, 0x08, 0]);
        assert_eq!(&fw[0x1e..0x20], &[0x66, 0xb8]);
        assert_eq!(&fw[0x5a..0x5e], &[0x40, 0, 0x0f, 0]);
        assert_eq!(fw[0xfff0], 0xea);
    }
}
