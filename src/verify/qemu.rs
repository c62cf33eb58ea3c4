//! The QEMU process: finding the binary, building its command line from a profile and a boot
//! spec, and owning the running process so that it is always killed (its whole process group) and
//! reaped — on success, on error and on drop. [`service_args`] is the other kind of VM: a
//! daemonized, long-running one for the agents (see `crate::agent`).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::accel::Accel;
use super::profile::{BootMethod, Profile};
use super::{BootSpec, VerifyError};
use crate::disk::image::ImageFormat;

/// The QEMU binary kiln runs (override with `$KILN_QEMU`).
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Find QEMU: `$KILN_QEMU` if set, else `qemu-system-x86_64` on `$PATH`.
pub fn find_qemu() -> Result<PathBuf, VerifyError> {
    if let Some(path) = std::env::var_os("KILN_QEMU").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(VerifyError::QemuMissing {
                binary: path.display().to_string(),
            })
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|p| is_executable(p))
        .ok_or_else(|| VerifyError::QemuMissing {
            binary: QEMU_BINARY.to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The format of the disk image at `path` for QEMU's `-drive format=`, from its first bytes.
pub fn drive_format(path: &Path) -> Result<ImageFormat, VerifyError> {
    let io_err = |source| VerifyError::Io {
        what: "reading the disk image header",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    ImageFormat::sniff(&mut file).map_err(io_err)
}

/// A `-drive` option value: commas in file names are doubled.
fn drive_file(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// QEMU's arguments for `spec` on `profile`. `vars` is the private OVMF variable store copy
/// (UEFI only); `disk` the image and its format.
pub(crate) fn qemu_args(
    profile: &Profile,
    spec: &BootSpec,
    accel: Accel,
    vars: Option<&Path>,
    disk: Option<(&Path, ImageFormat)>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-nodefaults", "-display", "none", "-no-user-config"]);
    push(&["-machine", &profile.machine, "-accel", accel.qemu_name()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &profile.memory_mib.to_string()]);
    push(&["-smp", &profile.cpus.to_string()]);
    // The serial port is QEMU's stdout, which kiln reads; a guest reboot ends QEMU unless the
    // profile expects one.
    push(&["-serial", "stdio"]);
    if !profile.reboot {
        push(&["-no-reboot"]);
    }
    match profile.boot {
        BootMethod::Direct => {
            if let Some(kernel) = &spec.kernel {
                args.push("-kernel".into());
                args.push(kernel.into());
            }
            if let Some(initrd) = &spec.initrd {
                args.push("-initrd".into());
                args.push(initrd.into());
            }
            let cmdline = [spec.cmdline.trim(), profile.append.trim()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            args.push("-append".into());
            args.push(cmdline.into());
        }
        BootMethod::Uefi => {
            if let Some(fw) = &profile.firmware {
                args.push("-drive".into());
                args.push(
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        drive_file(&fw.code)
                    )
                    .into(),
                );
            }
            if let Some(vars) = vars {
                args.push("-drive".into());
                args.push(format!("if=pflash,format=raw,unit=1,file={}", drive_file(vars)).into());
            }
        }
    }
    if let Some((path, format)) = disk {
        // snapshot=on: the guest may write, but the writes go to a temporary overlay, so booting
        // never changes the image kiln built.
        args.push("-drive".into());
        args.push(
            format!(
                "file={},format={},if=virtio,snapshot=on",
                drive_file(path),
                format.name()
            )
            .into(),
        );
    }
    args.extend(profile.extra_args.iter().map(OsString::from));
    args
}

/// A long-running VM, as a kiln agent runs an application image: booted by the profile's
/// firmware from a writable (overlay) disk, daemonized so that it outlives the agent, with its
/// serial console in a file, a QMP socket for control and, optionally, a TCP port forwarded from
/// the host's loopback to the guest over user-mode networking.
#[derive(Clone, Debug)]
pub struct ServiceVm {
    pub profile: Profile,
    pub accel: Accel,
    /// The private OVMF variable store (UEFI profiles).
    pub vars: Option<PathBuf>,
    /// The qcow2 disk the guest writes to (an overlay on the pulled image).
    pub disk: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub pidfile: PathBuf,
    /// `(host port on 127.0.0.1, guest port)`.
    pub forward: Option<(u16, u16)>,
    /// The SMBIOS system serial number the guest sees (`/sys/class/dmi/id/product_serial`).
    pub smbios_serial: Option<String>,
    /// Override the profile's memory and CPUs.
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    /// Direct boot (a `direct` profile): the kernel, initrd and command line QEMU loads itself.
    pub direct: Option<DirectBoot>,
}

/// What QEMU boots directly (`-kernel`, `-initrd`, `-append`; the profile's `append` follows
/// the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// QEMU's arguments for a [`ServiceVm`] (with `-daemonize`: QEMU returns once the VM runs and
/// writes its pid to the pidfile).
pub fn service_args(vm: &ServiceVm) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    let profile = &vm.profile;
    push(&["-nodefaults", "-display", "none", "-no-user-config"]);
    push(&["-machine", &profile.machine, "-accel", vm.accel.qemu_name()]);
    if vm.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    let memory = vm.memory_mib.unwrap_or(profile.memory_mib).to_string();
    let cpus = vm.cpus.unwrap_or(profile.cpus).to_string();
    push(&["-m", &memory, "-smp", &cpus]);
    if let Some(fw) = &profile.firmware {
        args.push("-drive".into());
        args.push(
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                drive_file(&fw.code)
            )
            .into(),
        );
    }
    if let Some(vars) = &vm.vars {
        args.push("-drive".into());
        args.push(format!("if=pflash,format=raw,unit=1,file={}", drive_file(vars)).into());
    }
    if let Some(d) = &vm.direct {
        args.push("-kernel".into());
        args.push(d.kernel.clone().into());
        if let Some(initrd) = &d.initrd {
            args.push("-initrd".into());
            args.push(initrd.clone().into());
        }
        let append = match profile.append.trim() {
            "" => d.cmdline.clone(),
            extra => format!("{} {extra}", d.cmdline),
        };
        args.push("-append".into());
        args.push(append.into());
    }
    args.push("-drive".into());
    args.push(format!("file={},format=qcow2,if=virtio", drive_file(&vm.disk)).into());
    args.push("-serial".into());
    args.push(format!("file:{}", vm.serial_log.display()).into());
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", vm.qmp_socket.display()).into());
    let mut netdev = "user,id=net0".to_string();
    if let Some((host, guest)) = vm.forward {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    // romfile= (empty): no iPXE option ROM, so the firmware does not try a network boot first.
    args.extend(
        [
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]
        .map(OsString::from),
    );
    if let Some(serial) = &vm.smbios_serial {
        args.push("-smbios".into());
        args.push(format!("type=1,serial={}", serial.replace(',', ",,")).into());
    }
    args.push("-daemonize".into());
    args.push("-pidfile".into());
    args.push(vm.pidfile.clone().into());
    // The VM's network is the one above (with the forwarded port): the profile's own NIC, if it
    // has one, would clash with it (same netdev id) or give the guest a second NIC.
    args.extend(
        without_network(&profile.extra_args)
            .into_iter()
            .map(OsString::from),
    );
    args
}

/// `extra_args` without `-netdev X` pairs and `-device X` pairs whose X attaches a netdev.
fn without_network(extra_args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < extra_args.len() {
        let arg = extra_args[i].as_str();
        let next = extra_args.get(i + 1).map(String::as_str);
        let network = match (arg, next) {
            ("-netdev" | "-nic", Some(_)) => true,
            ("-device", Some(dev)) => dev.contains("netdev="),
            _ => false,
        };
        if network {
            i += 2;
        } else {
            out.push(arg);
            i += 1;
        }
    }
    out
}

/// A running QEMU in its own process group. Dropping it kills the group and reaps QEMU.
pub(crate) struct QemuProcess {
    child: Child,
    started: Instant,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Start `cmd` in a new process group, with SIGKILL as its parent-death signal so that it
    /// cannot outlive kiln even if kiln itself is killed.
    pub(crate) fn spawn(mut cmd: Command) -> io::Result<QemuProcess> {
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(QemuProcess {
            child,
            started: Instant::now(),
            status: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU was started.
    pub(crate) fn age(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    pub(crate) fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The exit status if QEMU has exited (reaping it).
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Wait up to `limit` for QEMU to exit; `None` if it is still running.
    pub(crate) fn wait_timeout(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Kill QEMU's process group with SIGKILL and reap QEMU. Returns its exit status (the
    /// natural one if it had already exited).
    pub(crate) fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.kill_group();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    fn kill_group(&self) {
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group QEMU leads (spawned
            // with process_group(0)); it has no memory effects.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_service_vm_drops_the_profiles_own_nic() {
        let extra: Vec<String> = [
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
            "-device",
            "virtio-rng-pci",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(without_network(&extra), ["-device", "virtio-rng-pci"]);
    }

    use super::*;

    #[test]
    fn detects_qcow2_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let r = dir.path().join("a.img");
        std::fs::write(&r, [0u8; 512]).unwrap();
        let e = dir.path().join("empty");
        std::fs::write(&e, b"").unwrap();
        assert_eq!(drive_format(&q).unwrap(), ImageFormat::Qcow2);
        assert_eq!(drive_format(&r).unwrap(), ImageFormat::Raw);
        assert_eq!(drive_format(&e).unwrap(), ImageFormat::Raw);
    }

    #[test]
    fn drive_file_names_escape_commas() {
        assert_eq!(drive_file(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn dropping_kills_the_process_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let p = QemuProcess::spawn(cmd).unwrap();
        let pid = p.pid();
        std::thread::sleep(Duration::from_millis(100));
        drop(p);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
