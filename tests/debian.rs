//! Debian bookworm images (`rootfs.base: debian`) end to end: `recipes/debian-bookworm.yaml`
//! built with mmdebstrap's base, booted through OVMF and systemd-boot until systemd says
//! `running`, its sshd reached through a forwarded port; the Tree compared with the ext4 the
//! image holds (read back by the kernel); two builds compared byte for byte; a template change
//! rebuilt from the cached base; bad input refused with a clear message.
//!
//! The mmdebstrap base is made once and shared by all test runs (`/var/tmp/kiln-test-cache`,
//! including `stages/debian-base`); every test has its own stage cache otherwise. The tests take
//! one lock: they share the base and the machine's two cores.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, json_report as report, kiln, root, sha256_digest};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A recorded step of a stage in a report (its `cache`, `key`, `seconds`).
fn step<'a>(report: &'a serde_json::Value, stage_name: &str, name: &str) -> &'a serde_json::Value {
    stage(report, stage_name)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {stage_name} of {report}"))
}

fn stage<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {report}"))
}

/// Boot `image` (the example's qcow2) the way the uefi profile does — OVMF, q35, one virtio NIC on
/// QEMU's user network — with the guest's port 22 forwarded to a loopback port, and read what
/// answers there until an SSH banner or `deadline`. The disk is opened with `snapshot=on`, so the
/// image is not changed. Returns the banner, or says what answered last and the serial tail.
fn boot_and_read_banner(image: &Path, accel: &str, deadline: Duration) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let vars = dir.path().join("OVMF_VARS_4M.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    let serial_log = dir.path().join("serial.log");
    let port = free_port();
    let mut cmd = Command::new("qemu-system-x86_64");
    // The accelerator kiln's boot chose (its probe knows whether this host's KVM runs OVMF).
    cmd.args(["-accel", accel, "-machine", "q35"])
        .args(["-m", "512", "-smp", "1", "-nodefaults", "-display", "none"])
        .arg("-drive")
        .arg("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!(
            "if=virtio,format=qcow2,snapshot=on,file={}",
            image.display()
        ))
        .arg("-netdev")
        .arg(format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"))
        .args(["-device", "virtio-net-pci,netdev=net0,romfile="])
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()));
    let mut qemu = common::Running::spawn(cmd, &dir.path().join("qemu.log"));
    let started = Instant::now();
    let mut last = String::from("(no answer)");
    while started.elapsed() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            // QEMU accepts at once and closes when the guest refuses; a guest whose sshd is
            // still making its host keys answers late: wait on this connection rather than open
            // more, which sshd would count against MaxStartups.
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    if text.starts_with("SSH-") {
                        qemu.kill9();
                        return Ok(text);
                    }
                    last = text;
                }
                Ok(_) => last = String::from("(closed without a banner)"),
                Err(e) => last = format!("({e})"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    qemu.kill9();
    let serial = std::fs::read_to_string(&serial_log).unwrap_or_default();
    let lines: Vec<&str> = serial.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    let qemu_log = std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default();
    Err(format!(
        "no SSH banner within {deadline:?}; last answer {last:?}\nqemu: {qemu_log}\nserial tail:\n{tail}"
    ))
}

/// The example recipe built and booted once (uefi), shared by the tests that look at it.
struct Built {
    home: tempfile::TempDir,
    _out: tempfile::TempDir,
    report: serde_json::Value,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let home = common::shared_debian_home();
        let out = tempfile::tempdir().unwrap();
        let output = kiln(home.path())
            .args(["build", "recipes/debian-bookworm.yaml", "--json"])
            .args(["--profile", "uefi", "-o"])
            .arg(out.path())
            .output()
            .unwrap();
        let report = report(&output);
        Built {
            home,
            _out: out,
            report,
        }
    })
}

#[test]
fn bookworm_boots_uefi_to_running_and_serves_ssh() {
    let _guard = serial();
    let b = built();
    let boots = b.report["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 1);
    assert_eq!(boots[0]["profile"], "uefi");
    let marker = boots[0]["marker_line"].as_str().unwrap();
    let inputs = b.report["inputs"].as_str().unwrap();
    assert!(
        marker.contains(&format!("system-state=running kiln-boot-ok {inputs}")),
        "{marker}"
    );
    // Booted again outside kiln (kiln stops its VM at the marker), the image serves SSH.
    let image = PathBuf::from(b.report["image"].as_str().unwrap());
    let banner = boot_and_read_banner(
        &image,
        boots[0]["accel"].as_str().unwrap(),
        Duration::from_secs(240),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    // The kernel is the image's own (the base's), and the base step is reported.
    assert!(
        b.report["kernel_version"]
            .as_str()
            .unwrap()
            .ends_with("-cloud-amd64")
    );
    let base = &stage(&b.report, "rootfs")["outputs"]["base"];
    assert!(base["entries"].as_u64().unwrap() > 5000, "{base}");
    // The serial log shows first-boot SSH host keys and no failed unit.
    let log = std::fs::read_to_string(boots[0]["serial_log"].as_str().unwrap()).unwrap();
    assert!(!log.contains("kiln-failed-unit:"), "failed units in {log}");
}

/// The root partition of a disk image mounted read-only (loop, offset) until dropped.
struct Mounted {
    dir: tempfile::TempDir,
    _raw: tempfile::TempDir,
}

impl Mounted {
    fn root_of(image: &Path) -> Mounted {
        let raw_dir = tempfile::tempdir().unwrap();
        let raw = raw_dir.path().join("disk.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img convert");
        let out = Command::new("sfdisk")
            .arg("--json")
            .arg(&raw)
            .output()
            .unwrap();
        let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let pt = &table["partitiontable"];
        let sector = pt["sectorsize"].as_u64().unwrap_or(512);
        let root = pt["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "root")
            .expect("root partition");
        let offset = root["start"].as_u64().unwrap() * sector;
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "ext4", "-o"])
            .arg(format!("loop,ro,offset={offset}"))
            .arg(&raw)
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting the root partition (needs root and a loop device)"
        );
        Mounted { dir, _raw: raw_dir }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn tree_matches_the_ext4_in_the_image() {
    let _guard = serial();
    let b = built();
    let manifest_digest = stage(&b.report, "rootfs")["outputs"]["rootfs"]["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let blobs = kiln::home::BlobStore::new(b.home.path());
    let digest = kiln::digest::Digest256::parse(&manifest_digest).unwrap();
    let manifest: kiln::manifest::Manifest =
        serde_json::from_reader(blobs.open(&digest).unwrap()).unwrap();
    let image = PathBuf::from(b.report["image"].as_str().unwrap());
    let mnt = Mounted::root_of(&image);
    let at = |p: &str| mnt.dir.path().join(p.trim_start_matches('/'));

    use kiln::manifest::ManifestKind as K;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut sampled = 0usize;
    for e in &manifest.entries {
        let host = at(&e.path);
        let meta = std::fs::symlink_metadata(&host)
            .unwrap_or_else(|err| panic!("{} missing in the image: {err}", e.path));
        let ft = meta.file_type();
        let what = format!("{} ({:?})", e.path, e.kind);
        assert_eq!(meta.uid(), e.uid, "owner of {what}");
        assert_eq!(meta.gid(), e.gid, "group of {what}");
        if !ft.is_symlink() {
            assert_eq!(meta.mode() & 0o7777, e.mode, "mode of {what}");
        }
        match &e.kind {
            K::File { digest, len } => {
                assert!(ft.is_file(), "{what}");
                assert_eq!(meta.len(), *len, "size of {what}");
                sampled += 1;
                if e.mode & 0o6000 != 0 || !e.xattrs.is_empty() || sampled.is_multiple_of(97) {
                    assert_eq!(&sha256_digest(&host), digest.as_str(), "content of {what}");
                }
                if e.mode & 0o4000 != 0 {
                    *counts.entry("setuid").or_default() += 1;
                }
                *counts.entry("file").or_default() += 1;
            }
            K::Zeros { len } => assert_eq!(meta.len(), *len, "{what}"),
            K::Dir => {
                assert!(ft.is_dir(), "{what}");
                if std::fs::read_dir(&host).unwrap().next().is_none() {
                    *counts.entry("empty dir").or_default() += 1;
                }
            }
            K::Symlink { target } => {
                assert!(ft.is_symlink(), "{what}");
                assert_eq!(
                    std::fs::read_link(&host).unwrap().to_str().unwrap(),
                    target,
                    "{what}"
                );
                *counts.entry("symlink").or_default() += 1;
            }
            K::HardLink { target } => {
                let target_ino = std::fs::symlink_metadata(at(target)).unwrap().ino();
                assert_eq!(meta.ino(), target_ino, "{what} is not the same inode");
                assert!(meta.nlink() >= 2, "{what}");
                *counts.entry("hard link").or_default() += 1;
            }
            K::CharDevice { major, minor } | K::BlockDevice { major, minor } => {
                assert!(ft.is_char_device() || ft.is_block_device(), "{what}");
                let rdev = meta.rdev();
                let (ma, mi) = (
                    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
                    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
                );
                assert_eq!((ma as u32, mi as u32), (*major, *minor), "{what}");
                *counts.entry("device").or_default() += 1;
            }
            K::Fifo => assert!(ft.is_fifo(), "{what}"),
            K::Socket => assert!(ft.is_socket(), "{what}"),
        }
        if !ft.is_symlink() {
            let mut on_disk = BTreeMap::new();
            for name in xattr::list(&host).unwrap() {
                let name = name.to_string_lossy().into_owned();
                let value = xattr::get(&host, &name).unwrap().unwrap_or_default();
                on_disk.insert(name, hex::encode(value));
            }
            assert_eq!(on_disk, e.xattrs, "xattrs of {what}");
            if e.xattrs.contains_key("security.capability") {
                *counts.entry("capability").or_default() += 1;
            }
        }
    }
    // Nothing in the image that the Tree does not have (lost+found is the filesystem's).
    let known: std::collections::BTreeSet<String> =
        manifest.entries.iter().map(|e| e.path.clone()).collect();
    let mut stack = vec![mnt.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for item in std::fs::read_dir(&dir).unwrap() {
            let item = item.unwrap();
            let rel = format!(
                "/{}",
                item.path()
                    .strip_prefix(mnt.dir.path())
                    .unwrap()
                    .to_str()
                    .unwrap()
            );
            if rel == "/lost+found" {
                continue;
            }
            assert!(
                known.contains(&rel),
                "{rel} is in the image, not in the Tree"
            );
            if item.file_type().unwrap().is_dir() {
                stack.push(item.path());
            }
        }
    }
    // ping keeps its capability, su/passwd their setuid bits.
    let ping = std::fs::read_link(at("/usr/bin/ping")).ok();
    assert!(ping.is_none(), "/usr/bin/ping should be a file");
    assert!(
        xattr::get(at("/usr/bin/ping"), "security.capability")
            .unwrap()
            .is_some()
    );
    for kind in [
        "setuid",
        "capability",
        "hard link",
        "device",
        "empty dir",
        "symlink",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} checked: {counts:?}"
        );
    }
    // The first-boot parts: an empty machine-id and no SSH host keys.
    assert_eq!(std::fs::metadata(at("/etc/machine-id")).unwrap().len(), 0);
    let keys: Vec<_> = std::fs::read_dir(at("/etc/ssh"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
        .collect();
    assert!(keys.is_empty(), "SSH host keys baked into the image");
    // The recipe's user, key, groups and networkd config.
    let passwd = std::fs::read_to_string(at("/etc/passwd")).unwrap();
    let group = std::fs::read_to_string(at("/etc/group")).unwrap();
    // operators (rootfs.groups) takes gid 1000, so admin's own group is 1001.
    assert!(
        passwd.contains("admin:x:1000:1001::/home/admin:/bin/bash"),
        "{passwd}"
    );
    assert!(group.contains("\nadmin:x:1001:\n"), "{group}");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("sudo:") && l.ends_with(":admin")),
        "{group}"
    );
    let shadow = std::fs::read_to_string(at("/etc/shadow")).unwrap();
    assert!(
        shadow.lines().any(|l| l.starts_with("admin:!:")),
        "locked password"
    );
    let gshadow = std::fs::read_to_string(at("/etc/gshadow")).unwrap();
    assert!(gshadow.contains("operators:!::admin"), "{gshadow}");
    let keys = std::fs::read_to_string(at("/home/admin/.ssh/authorized_keys")).unwrap();
    assert!(keys.starts_with("ssh-ed25519 "));
    assert!(
        std::fs::read_to_string(at("/etc/systemd/network/20-kiln-dhcp.network"))
            .unwrap()
            .contains("DHCP=yes")
    );
    assert_eq!(
        std::fs::read_link(at(
            "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
        ))
        .unwrap(),
        Path::new("/lib/systemd/system/systemd-networkd.service")
    );
}

/// A copy of the example recipe in a temp dir, with `edit` applied to its text, and a local
/// `motd.j2` (which overrides the project's).
fn recipe_copy(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("recipes/debian-bookworm.yaml")).unwrap();
    std::fs::write(dir.path().join("recipe.yaml"), edit(text)).unwrap();
    std::fs::write(dir.path().join("motd.j2"), "Welcome, version one.\n").unwrap();
    dir
}

fn build_copy(home: &Path, recipe: &Path, extra: &[&str]) -> Output {
    let out = home.join("out");
    kiln(home)
        .arg("build")
        .arg(recipe.join("recipe.yaml"))
        .arg("--templates")
        .arg(root().join("templates"))
        .args(["--json", "-o"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn same_inputs_same_image_and_a_template_change_reuses_the_base() {
    let _guard = serial();
    let recipe = recipe_copy(|t| t);
    let home1 = common::shared_debian_home();
    let first = report(&build_copy(home1.path(), recipe.path(), &["--no-verify"]));
    // A second home: every stage but the shared base runs again.
    let home2 = common::shared_debian_home();
    let second = report(&build_copy(home2.path(), recipe.path(), &["--no-verify"]));
    assert_eq!(second["image_digest"], first["image_digest"]);
    for s in ["rootfs", "kernel", "disk"] {
        assert_eq!(stage(&second, s)["cache"], "miss", "{s}");
    }
    assert_eq!(step(&second, "rootfs", "debian-base")["cache"], "hit");

    // One template file changes: the base, the packages and nothing else are reused.
    std::fs::write(recipe.path().join("motd.j2"), "Welcome, version two.\n").unwrap();
    let started = Instant::now();
    let third = report(&build_copy(home2.path(), recipe.path(), &["--no-verify"]));
    let took = started.elapsed();
    assert_ne!(third["image_digest"], first["image_digest"]);
    assert_eq!(step(&third, "rootfs", "packages")["cache"], "hit");
    assert_eq!(step(&third, "rootfs", "debian-base")["cache"], "hit");
    assert_eq!(
        step(&third, "rootfs", "debian-base")["key"],
        step(&first, "rootfs", "debian-base")["key"]
    );
    // The overlay and what depends on it run again: rootfs and the disk. The initramfs names
    // the root partition, whose GUID follows the recipe's name, not its inputs: it is reused.
    for s in ["rootfs", "disk"] {
        assert_eq!(stage(&third, s)["cache"], "miss", "{s}");
    }
    assert_eq!(stage(&third, "kernel")["cache"], "hit");
    assert_eq!(third["mirror_requests"], 0);
    eprintln!("one-template rebuild (debug build, no boot): {took:.2?}");
}

fn refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "exit code; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let _guard = serial();
    let home = common::shared_debian_home();
    // An unknown package: named, from kiln's index, before mmdebstrap runs.
    let r = recipe_copy(|t| t.replace("    - sudo\n", "    - sudo\n    - kiln-no-such-package\n"));
    let started = Instant::now();
    refused(
        &build_copy(home.path(), r.path(), &["--no-verify"]),
        &["kiln-no-such-package"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "not caught early"
    );

    // A uid the base already gives to www-data.
    let r = recipe_copy(|t| t.replace("    - name: admin\n", "    - name: admin\n      uid: 33\n"));
    refused(
        &build_copy(home.path(), r.path(), &["--no-verify"]),
        &["admin", "33", "www-data"],
    );

    // A unit that does not exist.
    let r = recipe_copy(|t| {
        t.replace(
            "enable: [systemd-networkd.service]",
            "enable: [systemd-networkd.service, kiln-nonexistent.service]",
        )
    });
    refused(
        &build_copy(home.path(), r.path(), &["--no-verify"]),
        &["kiln-nonexistent.service", "does not exist"],
    );
}

#[test]
fn a_degraded_boot_fails_and_names_the_failed_units() {
    let _guard = serial();
    let home = common::shared_debian_home();
    let r = recipe_copy(|t| {
        t.replace(
            "  directories:\n",
            "    - path: /etc/systemd/system/kiln-broken.service\n      content: \"[Service]\\nType=oneshot\\nExecStart=/bin/false\\n[Install]\\nWantedBy=multi-user.target\\n\"\n  directories:\n",
        )
        .replace(
            "enable: [systemd-networkd.service]",
            "enable: [systemd-networkd.service, kiln-broken.service]",
        )
    });
    let output = build_copy(home.path(), r.path(), &["--profile", "direct"]);
    refused(
        &output,
        &["degraded", "kiln-broken.service", "failed units"],
    );
}

/// recipes/debian-secure.yaml: the Debian example as a signed unified kernel image with a
/// dm-verity root. It boots under `uefi-secureboot` (OVMF enrolls the keys, then enforces) to
/// `running` with no failed unit, although its root is read-only: /etc and /var are writable
/// layers over it.
#[test]
fn the_secure_variant_boots_enforcing_with_a_verified_read_only_root() {
    let _guard = serial();
    let home = common::shared_debian_home();
    let out = tempfile::tempdir().unwrap();
    let output = kiln(home.path())
        .args(["build", "recipes/debian-secure.yaml", "--json", "-o"])
        .arg(out.path())
        .output()
        .unwrap();
    let report = report(&output);
    let boots = report["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 1, "{report}");
    assert_eq!(boots[0]["profile"], "uefi-secureboot");
    assert_eq!(boots[0]["secure_boot"], "Secure boot enabled", "{report}");
    let root_hash = boots[0]["verity_root_hash"].as_str().unwrap();
    assert_eq!(root_hash.len(), 64, "{report}");
    let marker = boots[0]["marker_line"].as_str().unwrap();
    assert!(
        marker.contains("system-state=running kiln-boot-ok"),
        "{marker}"
    );
    let log = std::fs::read_to_string(boots[0]["serial_log"].as_str().unwrap()).unwrap();
    assert!(!log.contains("kiln-failed-unit:"), "failed units in {log}");
    assert!(
        log.contains("through dm-verity") && log.contains("writable layers in memory"),
        "{log}"
    );
    // systemd's own generators find the same verity pair from the same command line.
    assert!(
        log.contains("Using verity root device /dev/mapper/root")
            && log.contains("systemd-veritysetup-generator")
            && log
                .lines()
                .any(|l| l.contains(" OK ") && l.contains("Verity Protection Setup for root."))
            && !log.contains("FAILED"),
        "{log}"
    );
    // systemd pairs the root with its verity partition from the root hash the boot used.
    let raw = out.path().join("disk.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(report["image"].as_str().unwrap())
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    if !common::is_root() {
        return; // systemd-dissect opens the image through a loop device
    }
    let o = Command::new("systemd-dissect")
        .args(["--json=short", &format!("--root-hash={root_hash}")])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dissect: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let root = dissect["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["designator"] == "root")
        .unwrap_or_else(|| panic!("no root in {dissect}"));
    assert_eq!(root["verity"], "yes", "{dissect}");
}

/// Stages on two hosts: worker A (source, render, rootfs; the shared base) and worker B (kernel,
/// disk, verify, publish) with an empty home of its own. B gets everything through NATS's object
/// store: the base's kernel files (nothing downloaded from the mirror: the kernel comes from the
/// base) and the image's files, and writes an image qemu-img accepts.
#[test]
fn workers_on_two_homes_build_a_debian_image_through_the_object_store() {
    let _guard = serial();
    let server = kiln::bus::PrivateServer::start().unwrap();
    let url = server.url();
    let home_a = common::shared_debian_home();
    let home_b = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (home_a.path().join("a.log"), home_b.path().join("b.log"));
    let worker = |home: &Path, stages: &str, log: &Path| {
        let mut c = kiln(home);
        // A missing blob is a failure at once, not after minutes of redeliveries.
        c.args([
            "worker",
            "--nats",
            &url,
            "--stages",
            stages,
            "--max-deliver",
            "1",
        ])
        .args(common::recipe_roots());
        common::Running::spawn(c, log)
    };
    let a = worker(home_a.path(), "source,render,rootfs", &log_a);
    let b = worker(home_b.path(), "kernel,disk,verify,publish", &log_b);
    let logs = || {
        format!(
            "A:\n{}\nB:\n{}",
            std::fs::read_to_string(&log_a).unwrap_or_default(),
            std::fs::read_to_string(&log_b).unwrap_or_default()
        )
    };
    // The stream exists once both workers say they are ready: a request sent before would find
    // no stream to take it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while ![&log_a, &log_b]
        .iter()
        .all(|l| std::fs::read_to_string(l).is_ok_and(|t| t.contains(" ready: ")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "workers not ready\n{}",
            logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = kiln(home_a.path())
        .args(["submit", "recipes/debian-bookworm.yaml", "--no-verify"])
        .args(["--follow", "--timeout", "1200", "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        logs()
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let completed = |stage: &str| {
        events
            .iter()
            .find(|e| e["kind"] == "completed" && e["stage"] == stage)
            .unwrap_or_else(|| panic!("no {stage} completed: {events:?}"))
    };
    for (stage, w) in [("rootfs", &a), ("kernel", &b), ("disk", &b)] {
        let by = completed(stage)["worker"].as_str().unwrap();
        assert!(
            by.ends_with(&format!("/{}", w.pid())),
            "{stage} ran on {by}"
        );
    }
    // B never touched the mirror: its home has no package index and no .deb; nor did it ask
    // the object store for the kernel package (the kernel comes from the base).
    assert!(!home_b.path().join("debian").exists(), "{}", logs());
    let kernel_deb = completed("rootfs")["outputs"]["packages"]["kernel"]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no kernel package: {}", completed("rootfs")))
        .trim_start_matches("sha256:")
        .to_string();
    assert!(
        !common::walk(&home_b.path().join("blobs")).iter().any(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains(&kernel_deb)),
        "B fetched the kernel package {kernel_deb}"
    );
    let image = completed("disk")["outputs"]["disk"]["image"]
        .as_str()
        .unwrap_or_else(|| panic!("no image digest: {}", completed("disk")))
        .trim_start_matches("sha256:")
        .to_string();
    let blob = common::walk(&home_b.path().join("blobs"))
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().contains(&image))
        .unwrap_or_else(|| panic!("B's blob store lacks the image {image}"));
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&blob)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    drop(a);
    drop(b);
}

/// A Debian image published by `kiln up --publish-to --key` carries an SBOM of every installed
/// package: the same (name, version, architecture) list that `dpkg-query` reads from the image's
/// own status file (the root partition mounted by the kernel), each with its source package and
/// the `.deb`'s SHA-256 from the verified index; the SPDX project's `pyspdxtools` validates it.
#[test]
fn a_published_debian_image_lists_what_dpkg_query_reads_from_it() {
    use kiln::bus::{BuildRequest, Bus, RecipeSource};
    let _guard = serial();
    let home = common::shared_debian_home();
    let work = tempfile::tempdir().unwrap();
    let reg = common::registry::start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let server = kiln::bus::PrivateServer::start().unwrap();
    let url = server.url();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let recipe = recipe_copy(|t| t + "\npublish:\n  repository: kiln/debian\n  tags: [latest]\n");
    let log = work.path().join("up.log");
    let _up = {
        let mut c = kiln(home.path());
        c.args([
            "up",
            "--nats",
            &url,
            "--listen",
            "none",
            "--publish-to",
            &host,
            "--key",
        ])
        .arg(&key)
        .args(common::recipe_roots());
        common::Running::spawn(c, &log)
    };
    // The request names the project's templates, as `kiln build --templates` would.
    let mut req = BuildRequest::new(
        RecipeSource::Path {
            path: recipe.path().join("recipe.yaml"),
        },
        "debian-sbom-test",
    );
    let id = format!("debian-sbom-{}", std::process::id());
    req.id = Some(id.clone());
    req.templates = Some(root().join("templates"));
    // Booted directly (kernel and initramfs from the build): the UEFI path is the other tests'.
    req.profiles = vec!["direct".into()];
    common::rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        // kiln up makes the stream when it starts.
        let deadline = Instant::now() + Duration::from_secs(60);
        while bus.kiln_stream().await.is_err() {
            assert!(Instant::now() < deadline, "kiln up made no KILN stream");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bus.publish_request(&req).await.unwrap();
    });
    let o = kiln(home.path())
        .args(["logs", "-f", &id, "--json", "--nats", &url])
        .output()
        .unwrap();
    let events = common::json_lines(&o);
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(
        (last["kind"].as_str(), last["stage"].as_str()),
        (Some("completed"), Some("publish")),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let out = &last["outputs"];
    let reference = out["reference"].as_str().unwrap();

    let o = kiln(home.path())
        .args(["sbom", reference, "--key"])
        .arg(work.path().join("images.key.pub"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let spdx_file = work.path().join("debian.spdx.json");
    std::fs::write(&spdx_file, &o.stdout).unwrap();
    let v = Command::new("/var/tmp/kiln-test-tools/bin/pyspdxtools")
        .arg("-i")
        .arg(&spdx_file)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "pyspdxtools: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let packages: Vec<&serde_json::Value> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"].as_str().unwrap().starts_with("SPDXRef-deb-"))
        .collect();
    let mut listed: Vec<String> = packages
        .iter()
        .map(|p| {
            let purl = p["externalRefs"][0]["referenceLocator"].as_str().unwrap();
            let arch = purl
                .split("arch=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap();
            format!(
                "{} {} {arch}",
                p["name"].as_str().unwrap(),
                p["versionInfo"].as_str().unwrap()
            )
        })
        .collect();
    listed.sort();
    assert_eq!(out["sbom_packages"], listed.len(), "{out}");
    let with_sha = packages
        .iter()
        .filter(|p| p["checksums"][0]["checksumValue"].is_string())
        .count();
    assert_eq!(
        with_sha,
        packages.len(),
        "every installed package is in the index it came from"
    );
    assert!(
        packages.iter().any(|p| p["name"] == "libc6"
            && p["sourceInfo"]
                .as_str()
                .unwrap()
                .contains("source package glibc")),
        "{doc}"
    );

    // The oracle: dpkg-query on the status file of the pulled image's root file system.
    let image = work.path().join("pulled.qcow2");
    let o = kiln(home.path())
        .args(["pull", reference, "-o"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mounted = Mounted::root_of(&image);
    let q = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            mounted.dir.path().join("var/lib/dpkg").display()
        ))
        .args([
            "-W",
            "-f",
            "${db:Status-Abbrev}|${Package} ${Version} ${Architecture}\n",
        ])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let mut installed: Vec<String> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ii |"))
        .map(str::to_string)
        .collect();
    installed.sort();
    assert!(installed.len() > 50, "{installed:?}");
    assert_eq!(listed, installed);
    // The files kiln wrote (accounts, fstab, hostname, the recipe's units) hash to what the
    // mounted image holds.
    let files = doc["files"].as_array().expect("generated files");
    let paths: Vec<&str> = files
        .iter()
        .map(|f| f["fileName"].as_str().unwrap().trim_start_matches('.'))
        .collect();
    for want in ["/etc/fstab", "/etc/hostname"] {
        assert!(paths.contains(&want), "{want} not in {paths:?}");
    }
    assert!(!paths.contains(&"/usr/bin/dpkg"), "{paths:?}");
    for (f, path) in files.iter().zip(&paths) {
        let on_disk = mounted.dir.path().join(path.trim_start_matches('/'));
        assert_eq!(
            f["checksums"][1]["checksumValue"],
            common::sha256(&on_disk),
            "{f}"
        );
    }
}
