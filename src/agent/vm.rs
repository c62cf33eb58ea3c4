//! The agent's VMs: start one from a pulled image (a qcow2 overlay whose backing file is the
//! image, QEMU daemonized with a QMP socket and the serial console in a file, see
//! [`crate::verify::qemu::service_args`]), talk QMP to it, wait for it to be healthy, and stop
//! it. QEMU is not a child the agent must keep: it outlives the agent, and a restarted agent finds
//! it again by pid and QMP socket.

use super::AgentError;
use super::state::{HealthSpec, VmRecord};
use crate::verify::qemu::{ServiceVm, find_qemu, service_args};
use crate::verify::{ProfileDir, profile_accel};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The SMBIOS serial that tells a kiln image it runs under an agent (see the busybox init).
pub const AGENT_SMBIOS_SERIAL: &str = "kiln-agent";
/// How many serial lines a failure message quotes.
const TAIL: usize = 8;

/// What to start.
#[derive(Debug, Clone)]
pub struct VmRequest {
    pub id: u64,
    pub reference: String,
    pub digest: String,
    pub build: Option<String>,
    pub application: String,
    pub image: PathBuf,
    pub health: HealthSpec,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
}

/// A port on 127.0.0.1 that is free now.
pub fn free_port() -> Result<u16, AgentError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| AgentError::Io {
        what: "find a free loopback port",
        path: PathBuf::from("127.0.0.1:0"),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| AgentError::Io {
            what: "find a free loopback port",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::Io { what, path, source }
}

/// Start a VM for `req` in `<state_dir>/vm-<id>`; returns once QEMU runs (not yet healthy).
pub fn start(
    state_dir: &Path,
    profiles_dir: Option<&Path>,
    profile: &str,
    req: &VmRequest,
) -> Result<VmRecord, AgentError> {
    let profile = ProfileDir::locate(profiles_dir)?.load(profile)?;
    let qemu = find_qemu()?;
    let (accel, _) = profile_accel(&profile, &qemu)?;
    let dir = state_dir.join(format!("vm-{}", req.id));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io("clear the VM directory", &dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io("create the VM directory", &dir))?;
    let overlay = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&req.image)
        .arg(&overlay)
        .output()
        .map_err(|source| AgentError::Io {
            what: "run qemu-img (Debian package qemu-utils) to create",
            path: overlay.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Qemu(format!(
            "qemu-img create {} on {}: {}",
            overlay.display(),
            req.image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // A direct profile boots the kernel and initrd of the image's default boot entry.
    let direct = match profile.boot {
        crate::verify::BootMethod::Uefi => None,
        _ => Some(
            direct_boot(&req.image, &dir)
                .map_err(|why| AgentError::Config(format!("profile {}: {why}", profile.name)))?,
        ),
    };
    let vars = match &profile.firmware {
        Some(fw) => Some(crate::verify::private_vars(&fw.vars, &dir)?),
        None => None,
    };
    let host_port = match req.health.port {
        Some(_) => Some(free_port()?),
        None => None,
    };
    let vm = ServiceVm {
        profile,
        accel,
        vars,
        disk: overlay.clone(),
        serial_log: dir.join("serial.log"),
        qmp_socket: dir.join("qmp.sock"),
        pidfile: dir.join("qemu.pid"),
        forward: host_port.zip(req.health.port),
        smbios_serial: Some(AGENT_SMBIOS_SERIAL.into()),
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        direct,
    };
    let out = Command::new(&qemu)
        .args(service_args(&vm))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| AgentError::Io {
            what: "start",
            path: qemu.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Qemu(format!(
            "{} did not start the VM ({}): {}",
            qemu.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let pid = std::fs::read_to_string(&vm.pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            AgentError::Qemu(format!(
                "QEMU started but wrote no pid to {}",
                vm.pidfile.display()
            ))
        })?;
    tracing::info!(pid, image = %req.reference, "VM {} started", req.id);
    Ok(VmRecord {
        id: req.id,
        reference: req.reference.clone(),
        digest: req.digest.clone(),
        build: req.build.clone(),
        application: req.application.clone(),
        image: req.image.clone(),
        dir,
        overlay,
        serial_log: vm.serial_log,
        qmp: vm.qmp_socket,
        pid,
        host_port,
        guest_port: req.health.port,
        health: req.health.clone(),
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        since: String::new(),
    })
}

/// True while process `pid` is the QEMU of this VM (its command line names the QMP socket).
pub fn alive(vm: &VmRecord) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", vm.pid)) else {
        return false;
    };
    // A zombie has an empty command line.
    let needle = vm.qmp.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// Run one QMP command on the VM's socket and return its `return` value.
pub fn qmp(socket: &Path, command: &str) -> Result<Value, AgentError> {
    let err = |reason: String| AgentError::Qmp {
        socket: socket.to_path_buf(),
        reason,
    };
    let stream = UnixStream::connect(socket).map_err(|e| err(format!("connect: {e}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| err(e.to_string()))?;
    let mut writer = stream.try_clone().map_err(|e| err(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let read_reply = |reader: &mut BufReader<UnixStream>| -> Result<Value, AgentError> {
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| err(format!("read: {e}")))?;
            if n == 0 {
                return Err(err("QEMU closed the socket".into()));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| err(format!("bad reply {line:?}: {e}")))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(err(format!("QEMU answered an error: {e}")));
            }
            return Ok(v);
        }
    };
    let greeting = read_reply(&mut reader)?;
    if greeting.get("QMP").is_none() {
        return Err(err(format!("no QMP greeting: {greeting}")));
    }
    for cmd in ["qmp_capabilities", command] {
        writer
            .write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes())
            .map_err(|e| err(format!("write: {e}")))?;
        let reply = read_reply(&mut reader)?;
        if cmd == command {
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }
    Ok(Value::Null)
}

/// Re-adoptable: QEMU is alive and answers `query-status` with a running VM.
pub fn answers(vm: &VmRecord) -> bool {
    alive(vm)
        && qmp(&vm.qmp, "query-status")
            .map(|v| v["running"].as_bool() == Some(true))
            .unwrap_or(false)
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; the pid was checked to be this VM's QEMU.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stop a VM: QMP `quit`, then SIGKILL if QEMU is still there after `grace`; remove its
/// directory.
pub fn stop(vm: &VmRecord, grace: Duration) {
    if alive(vm) {
        if let Err(e) = qmp(&vm.qmp, "quit") {
            tracing::warn!(
                "QMP quit of VM {} failed ({e}); killing pid {}",
                vm.id,
                vm.pid
            );
        }
        let until = Instant::now() + grace;
        while alive(vm) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(vm) {
            signal(vm.pid, libc::SIGKILL);
            let until = Instant::now() + Duration::from_secs(2);
            while alive(vm) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
        tracing::warn!("removing {}: {e}", vm.dir.display());
    }
}

/// The kernel, initrd and command line of the image's default Boot Loader Specification entry,
/// copied into `dir` (blocking): the image is converted to raw with qemu-img (in `dir`, removed
/// after), its EFI system partition found in the GPT and read with kiln's FAT32 reader. An image
/// that boots a unified kernel image (Secure Boot) has no such entry: it needs a UEFI profile.
fn direct_boot(image: &Path, dir: &Path) -> Result<crate::verify::qemu::DirectBoot, String> {
    use crate::disk::read::{Fat32, find_esp};
    let raw = dir.join("image.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .map_err(|e| format!("run qemu-img convert: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&raw);
        return Err(format!(
            "qemu-img convert {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let found = (|| -> Result<crate::verify::qemu::DirectBoot, String> {
        let disk = std::fs::File::open(&raw).map_err(|e| format!("open {}: {e}", raw.display()))?;
        let (offset, len) = find_esp(&disk).map_err(|e| e.to_string())?;
        let fat = Fat32::open(&disk, offset, len).map_err(|e| e.to_string())?;
        let mut entries: Vec<String> = fat
            .list("loader/entries")
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.to_ascii_lowercase().ends_with(".conf"))
            .collect();
        if entries.is_empty() {
            let uki = fat.list("EFI/Linux").is_ok_and(|l| !l.is_empty());
            return Err(if uki {
                "the image boots a unified kernel image (EFI/Linux/*.efi) and has no boot entry to \
                 boot directly: run it with a UEFI profile (uefi, or uefi-secureboot for a signed one)"
                    .into()
            } else {
                "the image's ESP has no boot entry (loader/entries/*.conf) to boot directly".into()
            });
        }
        entries.sort();
        // loader.conf's `default`, when it names an entry; else the first.
        let default = fat
            .read("loader/loader.conf")
            .ok()
            .and_then(|t| {
                String::from_utf8_lossy(&t).lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("default")
                        .map(|v| v.trim().to_string())
                })
            })
            .filter(|d| entries.iter().any(|e| e.eq_ignore_ascii_case(d)));
        let name = default.unwrap_or_else(|| entries[0].clone());
        let text = fat
            .read(&format!("loader/entries/{name}"))
            .map_err(|e| e.to_string())?;
        let (linux, initrd, options) = crate::boot::parse_entry(&String::from_utf8_lossy(&text))
            .ok_or_else(|| format!("loader/entries/{name} has no `linux` line"))?;
        let copy = |from: &str, to: &str| -> Result<PathBuf, String> {
            let bytes = fat.read(from).map_err(|e| e.to_string())?;
            let path = dir.join(to);
            std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
            Ok(path)
        };
        Ok(crate::verify::qemu::DirectBoot {
            kernel: copy(&linux, "linux")?,
            initrd: initrd.map(|i| copy(&i, "initrd")).transpose()?,
            cmdline: options,
        })
    })();
    let _ = std::fs::remove_file(&raw);
    found
}

/// Stop every VM under `state_dir` other than `keep` (blocking): what an agent killed in the
/// middle of a deploy left behind — a half-booted new VM nobody tracks. Its QEMU is found by
/// its command line, which names the VM's QMP socket `<state_dir>/vm-<id>/qmp.sock` (a pidfile
/// may not be written yet), stopped, and every `vm-<id>` directory but `keep`'s is removed.
/// Returns the ids and pids of the QEMUs that were running.
pub fn reap_strays(state_dir: &Path, keep: Option<&VmRecord>) -> Vec<(u64, u32)> {
    let prefix = state_dir.join("vm-");
    let prefix = prefix.to_string_lossy();
    let kept = |id: u64| keep.is_some_and(|k| k.id == id);
    let mut stopped = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains("qemu-system") {
            continue;
        }
        // `<state_dir>/vm-<id>/…` anywhere on the command line.
        let id = cmdline.split(['\0', ',', '=']).find_map(|arg| {
            arg.strip_prefix(prefix.as_ref())
                .and_then(|rest| rest.split('/').next())
                .and_then(|n| n.parse::<u64>().ok())
        });
        let Some(id) = id.filter(|id| !kept(*id)) else {
            continue;
        };
        tracing::warn!(
            "VM {id} (QEMU pid {pid}) under {} is not tracked (left by an agent stopped in the middle of a deploy); stopping it",
            state_dir.display()
        );
        let qmp_socket = state_dir.join(format!("vm-{id}")).join("qmp.sock");
        qmp_quit_then_kill(&qmp_socket, pid);
        stopped.push((id, pid));
    }
    for e in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        let id = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id.filter(|id| !kept(*id))
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            tracing::warn!("removing VM {id}'s directory {}: {err}", e.path().display());
        }
    }
    stopped
}

/// QMP `quit` (when the socket answers), then SIGKILL after two seconds.
fn qmp_quit_then_kill(socket: &Path, pid: u32) {
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    let _ = qmp(socket, "quit");
    let until = Instant::now() + Duration::from_secs(2);
    while !gone() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !gone() {
        signal(pid, libc::SIGKILL);
    }
}

/// The last `n` lines of the serial log, joined with ` | ` (a message is one line).
pub fn serial_tail(log: &Path, n: usize) -> String {
    let text = crate::verify::serial::console_text(&std::fs::read(log).unwrap_or_default());
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

/// Whether the guest answers on `127.0.0.1:port`: it must send at least one byte back to a
/// request (user-mode networking accepts a connection even when nothing listens in the guest,
/// then closes it without a byte).
pub fn port_answers(port: u16) -> bool {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

/// Wait until the VM is healthy; returns the time from `started` (when QEMU was started), or a
/// one-line reason with the last serial lines.
pub fn wait_healthy(vm: &VmRecord, started: Instant) -> Result<Duration, String> {
    let timeout = Duration::from_secs(vm.health.timeout_s);
    let deadline = started + timeout;
    let mut marker_seen = vm.health.serial.is_none();
    let mut port_ok = vm.host_port.is_none();
    loop {
        if !marker_seen && let Some(m) = &vm.health.serial {
            let text = std::fs::read(&vm.serial_log).unwrap_or_default();
            marker_seen = String::from_utf8_lossy(&text)
                .lines()
                .any(|l| l.contains(m.as_str()));
        }
        if !port_ok && let Some(p) = vm.host_port {
            port_ok = port_answers(p);
        }
        if marker_seen && port_ok {
            return Ok(started.elapsed());
        }
        let tail = || serial_tail(&vm.serial_log, TAIL);
        if !alive(vm) {
            return Err(format!(
                "the VM (QEMU pid {}) exited after {:.1} s before it was healthy; last serial lines: {}",
                vm.pid,
                started.elapsed().as_secs_f64(),
                tail()
            ));
        }
        if Instant::now() >= deadline {
            let mut missing = Vec::new();
            if !marker_seen {
                missing.push(format!(
                    "no health marker {:?} on the serial console",
                    vm.health.serial.as_deref().unwrap_or_default()
                ));
            }
            if !port_ok {
                missing.push(format!(
                    "guest port {} (host 127.0.0.1:{}) did not answer",
                    vm.guest_port.unwrap_or_default(),
                    vm.host_port.unwrap_or_default()
                ));
            }
            return Err(format!(
                "{} within {} s; last serial lines: {}",
                missing.join(" and "),
                vm.health.timeout_s,
                tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_tail_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        std::fs::write(&log, "a\r\n\r\n\x1b[2J\x1b[01;01Hb\nc\x1b\n").unwrap();
        assert_eq!(serial_tail(&log, 2), "b | c");
        assert_eq!(serial_tail(&dir.path().join("none"), 2), "");
    }

    #[test]
    fn a_port_that_closes_silently_is_not_healthy() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(s);
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        });
        assert!(!port_answers(port));
        assert!(port_answers(port));
        t.join().unwrap();
    }
}
