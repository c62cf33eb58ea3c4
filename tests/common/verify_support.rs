//! Test support for the boot verification tests: real Debian packages (downloaded once with
//! `apt-get download` into /var/tmp/kiln-test-debs and unpacked there once), a tiny busybox
//! initramfs made with the `cpio` tool, and helpers to check that no QEMU is left behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use super::run;

pub const DEBS: &str = "/var/tmp/kiln-test-debs";

/// The line the test init prints once userspace runs.
pub const MARKER: &str = "KILN-TEST-MARKER: userspace is up";

/// Modules the test init loads so that the guest sees the virtio-blk disk, in load order.
const VIRTIO_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

/// One QEMU at a time: the machine has two cores, and parallel TCG guests would only slow each
/// other past their timeouts.
pub fn qemu_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cached .deb whose file name starts with `prefix`, downloading `package` if none is.
fn deb(prefix: &str, package: impl FnOnce() -> String) -> PathBuf {
    fs::create_dir_all(DEBS).unwrap();
    let find = || {
        let mut found: Vec<PathBuf> = fs::read_dir(DEBS)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(prefix) && name.ends_with(".deb")
            })
            .collect();
        found.sort();
        found.pop()
    };
    if let Some(found) = find() {
        return found;
    }
    let package = package();
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(DEBS));
    find().unwrap_or_else(|| panic!("apt-get download {package} left no {prefix}*.deb in {DEBS}"))
}

/// Unpack a .deb once (into `DEBS/root/<file stem>`, renamed into place when complete).
fn unpacked(deb: &Path) -> PathBuf {
    let stem = deb.file_stem().unwrap().to_string_lossy().into_owned();
    let root = Path::new(DEBS).join("root").join(&stem);
    if root.is_dir() {
        return root;
    }
    fs::create_dir_all(root.parent().unwrap()).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix(".unpack.")
        .tempdir_in(root.parent().unwrap())
        .unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tmp.path()));
    let tmp = tmp.keep();
    if fs::rename(&tmp, &root).is_err() {
        // Another test process unpacked it first.
        let _ = fs::remove_dir_all(&tmp);
    }
    root
}

/// The versioned cloud kernel package that `linux-image-cloud-amd64` depends on.
fn cloud_kernel_package() -> String {
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .unwrap_or_else(|| panic!("no linux-image-*-cloud-amd64 in apt-cache depends:\n{out}"))
        .to_string()
}

/// The unpacked cloud kernel package: (root, vmlinuz, release).
pub fn cloud_kernel() -> (PathBuf, PathBuf, String) {
    let root = unpacked(&deb("linux-image-6.1.0-", cloud_kernel_package));
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        })
        .unwrap_or_else(|| panic!("no vmlinuz-*-cloud-amd64 in {}", boot.display()));
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    (root, vmlinuz, release)
}

/// The static busybox binary.
pub fn busybox() -> PathBuf {
    unpacked(&deb("busybox-static_", || "busybox-static".into())).join("bin/busybox")
}

/// The unpacked systemd-boot-efi package root.
pub fn systemd_boot_root() -> PathBuf {
    unpacked(&deb("systemd-boot-efi_", || "systemd-boot-efi".into()))
}

/// A newc initramfs (made with `cpio`) holding busybox, the virtio-blk modules and three init
/// programs: `/init` prints the disk size and [`MARKER`] and powers off; `/hang` prints a line
/// and sleeps forever; `/quit` powers off without the marker.
pub fn initramfs(dir: &Path) -> PathBuf {
    let (kroot, _, release) = cloud_kernel();
    let root = dir.join("initramfs-root");
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let moddir = kroot.join("lib/modules").join(&release).join("kernel");
    let mut insmods = String::new();
    for m in VIRTIO_MODULES {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        fs::copy(moddir.join(m), root.join("modules").join(&name)).unwrap();
        insmods.push_str(&format!("/bin/busybox insmod /modules/{name}\n"));
    }
    let prologue = format!(
        "#!/bin/sh\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         exec >/dev/console 2>&1\n\
         {insmods}"
    );
    let scripts = [
        (
            "init",
            format!(
                "{prologue}\
                 n=0; while [ ! -e /sys/block/vda/size ] && [ $n -lt 50 ]; do \
                 /bin/busybox sleep 0.1; n=$((n+1)); done\n\
                 echo \"kiln-test: vda sectors=$(/bin/busybox cat /sys/block/vda/size 2>/dev/null)\"\n\
                 echo \"{MARKER}\"\n\
                 /bin/busybox poweroff -f\n"
            ),
        ),
        (
            "hang",
            format!(
                "{prologue}echo 'kiln-test: hanging'\n\
                 while true; do /bin/busybox sleep 1; done\n"
            ),
        ),
        (
            "quit",
            format!("{prologue}echo 'kiln-test: quitting'\n/bin/busybox poweroff -f\n"),
        ),
    ];
    for (name, text) in scripts {
        let path = root.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = dir.join("initrd.img");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > '{}'",
            out.display()
        ))
        .current_dir(&root)
        .status()
        .expect("cpio (install the Debian package cpio)");
    assert!(status.success(), "cpio failed: {status}");
    out
}

/// Live children of this process whose command name starts with `qemu`.
pub fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == me && comm.starts_with("qemu") {
            found.push(pid);
        }
    }
    found
}

/// QEMU with this pid is gone: reaped, not a zombie, not running.
pub fn assert_gone(pid: u32) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU pid {pid} is still there"
    );
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU children remain");
}

/// Write a Tree's directories and regular files into a host directory.
pub fn write_tree(tree: &kiln::tree::Tree, dir: &Path) {
    use kiln::tree::EntryKind;
    for (path, entry) in tree.iter() {
        let host = dir.join(path.as_str());
        match &entry.kind {
            EntryKind::Dir => fs::create_dir_all(&host).unwrap(),
            EntryKind::File(content) => {
                let mut out = fs::File::create(&host).unwrap();
                std::io::copy(&mut content.open().unwrap(), &mut out).unwrap();
            }
            other => panic!("{path}: unexpected {} in the ESP tree", other.name()),
        }
    }
}
