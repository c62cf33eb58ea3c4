//! kernel: module facts of Debian's 6.1 kernels, the cpio writer against GNU cpio, initramfs
//! determinism, and booting the kernels with kiln's initramfs under QEMU to a marker on the
//! root partition.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln::kernel::initramfs::{self, InitramfsSpec};
use kiln::kernel::{InstalledKernel, cpio};
use kiln::recipe::schema::Compression;
use kiln::tree::{Content, Entry, EntryKind, Tree, read_content};

fn kernel(flavour: &str) -> InstalledKernel {
    let tree = common::deb_tree(&common::kernel_package(flavour));
    let start = Instant::now();
    let k = InstalledKernel::from_tree(&tree).unwrap();
    eprintln!(
        "{}: indexed {} modules in {:?}",
        k.version,
        k.index.modules.len(),
        start.elapsed()
    );
    k
}

fn busybox() -> Tree {
    common::deb_tree("busybox-static")
}

fn names(k: &InstalledKernel, req: &[&str]) -> Vec<String> {
    k.closure(req)
        .unwrap()
        .modules
        .into_iter()
        .map(|m| m.name)
        .collect()
}

/// `list` holds every one of `deps` before `last`, which is the final entry.
fn assert_deps_first(list: &[String], deps: &[&str], last: &str) {
    assert_eq!(list.last().map(String::as_str), Some(last), "{list:?}");
    for d in deps {
        assert!(list.iter().any(|n| n == d), "{d} missing from {list:?}");
    }
    assert_eq!(list.len(), deps.len() + 1, "unexpected extras in {list:?}");
}

#[test]
fn cloud_kernel_module_facts() {
    let k = kernel("cloud-amd64");
    assert!(k.version.starts_with("6.1.0-") && k.version.ends_with("-cloud-amd64"));
    assert!(
        k.vmlinuz.len() > 4 << 20,
        "vmlinuz is {} bytes",
        k.vmlinuz.len()
    );
    assert!(
        k.index.modules.len() > 500,
        "{} modules",
        k.index.modules.len()
    );

    let pci = names(&k, &["virtio_pci"]);
    assert_deps_first(
        &pci,
        &[
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
        ],
        "virtio_pci",
    );
    let blk = names(&k, &["virtio_blk"]);
    assert_deps_first(&blk, &["virtio_ring", "virtio"], "virtio_blk");
    // `-` and `_` are the same to the kernel.
    assert_eq!(names(&k, &["virtio-blk"]), blk);
    let vfat = names(&k, &["vfat"]);
    assert_deps_first(&vfat, &["fat"], "vfat");

    // ext4 and crc32c are compiled in: nothing to load, reported as built in.
    let c = k.closure(&["ext4", "crc32c"]).unwrap();
    assert!(c.modules.is_empty(), "{:?}", c.names());
    assert_eq!(c.builtin, ["ext4", "crc32c"]);
    assert!(k.is_builtin("ext4"));

    // The default set for the root disk: only the virtio modules, each once, deps first.
    let root = k.root_disk_closure().unwrap();
    let root_names = root.names();
    assert_eq!(root_names.last(), Some(&"virtio_blk"));
    let pos = |n: &str| root_names.iter().position(|x| *x == n).unwrap();
    assert!(pos("virtio_ring") < pos("virtio_pci") && pos("virtio") < pos("virtio_blk"));
    assert_eq!(root_names.len(), 6, "{root_names:?}");
    assert_eq!(root.builtin, ["ext4", "crc32c"]);

    // Deterministic.
    assert_eq!(k.root_disk_closure().unwrap().names(), root_names);
}

#[test]
fn generic_kernel_has_ext4_as_module() {
    let k = kernel("amd64");
    assert!(k.version.ends_with("-amd64") && !k.version.contains("cloud"));
    assert!(!k.is_builtin("ext4"));
    let ext4 = names(&k, &["ext4"]);
    // jbd2 and ext4 want crypto-crc32c softly before them: the generic implementation, which
    // runs on every CPU, is picked over crc32c_intel.
    assert_deps_first(
        &ext4,
        &["jbd2", "mbcache", "crc16", "crc32c_generic"],
        "ext4",
    );
    assert!(!ext4.iter().any(|n| n == "crc32c_intel"));
    let pci = names(&k, &["virtio_pci"]);
    assert_deps_first(
        &pci,
        &[
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
        ],
        "virtio_pci",
    );
    let root = k.root_disk_closure().unwrap();
    let root_names = root.names();
    for m in ["virtio_pci", "virtio_blk", "ext4", "jbd2", "crc32c_generic"] {
        assert!(root_names.contains(&m), "{m} missing from {root_names:?}");
    }
}

#[test]
fn unknown_module_is_an_error_with_a_suggestion() {
    let k = kernel("cloud-amd64");
    let err = k.closure(&["virtio_blkk"]).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "kernel module `virtio_blkk` not in linux {}; did you mean `virtio_blk`?",
            k.version
        )
    );
    let err = k.closure(&["zzzzqqqq"]).unwrap_err().to_string();
    assert!(
        err.starts_with("kernel module `zzzzqqqq` not in linux 6.1.0-"),
        "{err}"
    );
}

fn sample_tree() -> Tree {
    let mut t = Tree::new();
    t.add("etc", Entry::dir(0o755)).unwrap();
    t.add(
        "etc/hostname",
        Entry::file(Content::inline(b"kiln\n".to_vec()), 0o644),
    )
    .unwrap();
    t.add("etc/empty", Entry::file(Content::inline(Vec::new()), 0o600))
        .unwrap();
    let big: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i * 7 % 251) as u8).collect();
    t.add(
        "data/big.bin",
        Entry::file(Content::inline(big), 0o640).owner(1000, 1000),
    )
    .unwrap();
    t.add(
        "data/zeros",
        Entry::file(Content::Zeros { len: 70_001 }, 0o644),
    )
    .unwrap();
    t.add(
        "data/hard",
        Entry::new(
            EntryKind::HardLink {
                target: kiln::tree::TreePath::new("etc/hostname").unwrap(),
            },
            0o644,
        ),
    )
    .unwrap();
    t.add("bin/sh", Entry::symlink("busybox")).unwrap();
    t.add(
        "bin/busybox",
        Entry::file(Content::inline(b"#!fake\n".to_vec()), 0o4755),
    )
    .unwrap();
    t.add("run/fifo", Entry::new(EntryKind::Fifo, 0o600))
        .unwrap();
    t
}

#[test]
fn cpio_is_read_by_gnu_cpio_and_round_trips() {
    let tree = sample_tree();
    let epoch = 1_700_000_000;
    let bytes = cpio::write_tree(&tree, Vec::new(), epoch).unwrap();
    assert_eq!(bytes.len() % 4, 0);
    assert!(bytes.starts_with(b"070701"));

    // cpio -t lists every path in tree order, then nothing else.
    let listed = run_cpio(&["-t", "--quiet"], &bytes, None);
    let want: Vec<&str> = tree
        .iter()
        .filter(|(p, _)| !p.is_root())
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(listed.lines().collect::<Vec<_>>(), want);

    // Extract and compare contents, modes, link targets and mtimes.
    let dir = tempfile::tempdir().unwrap();
    run_cpio(
        &["-idm", "--quiet", "--no-absolute-filenames"],
        &bytes,
        Some(dir.path()),
    );
    for (path, entry) in tree.iter().filter(|(p, _)| !p.is_root()) {
        let host = dir.path().join(path.as_str());
        let meta = std::fs::symlink_metadata(&host).unwrap();
        match &entry.kind {
            EntryKind::File(c) => {
                assert_eq!(
                    std::fs::read(&host).unwrap(),
                    read_content(c).unwrap(),
                    "{path}"
                );
                assert_eq!(meta.mode() & 0o7777, entry.mode, "{path}");
                assert_eq!(meta.mtime(), epoch, "{path}");
            }
            EntryKind::HardLink { target } => {
                let t = std::fs::read(dir.path().join(target.as_str())).unwrap();
                assert_eq!(std::fs::read(&host).unwrap(), t, "{path}");
            }
            EntryKind::Symlink { target } => {
                assert_eq!(std::fs::read_link(&host).unwrap(), Path::new(target));
            }
            EntryKind::Dir => assert!(meta.is_dir()),
            EntryKind::Fifo => {
                use std::os::unix::fs::FileTypeExt;
                assert!(meta.file_type().is_fifo());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("data/big.bin"))
            .unwrap()
            .uid(),
        1000
    );
    // Same tree, same bytes.
    assert_eq!(cpio::write_tree(&tree, Vec::new(), epoch).unwrap(), bytes);
}

fn run_cpio(args: &[&str], input: &[u8], dir: Option<&Path>) -> String {
    let mut cmd = Command::new("cpio");
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd
        .spawn()
        .expect("GNU cpio (Debian package cpio) installed");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "cpio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const PARTUUID: &str = "6a1c8b0e-3d52-4f0e-9b7a-2c4d5e6f7a8b";

#[test]
fn initramfs_contents_and_determinism() {
    let k = kernel("cloud-amd64");
    let bb = busybox();
    let mut spec = InitramfsSpec::new(&k, &bb, PARTUUID);
    spec.compression = Compression::Gzip;
    spec.epoch = 1_700_000_000;
    let (gz, closure) = initramfs::build_bytes(&spec).unwrap();
    assert_eq!(&gz[..2], b"\x1f\x8b");
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip header mtime must be 0");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    let listed = run_cpio(&["-t", "--quiet"], &raw, None);
    let listed: Vec<&str> = listed.lines().collect();
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/switch_root",
        "dev/console",
    ] {
        assert!(listed.contains(&want), "{want} not in {listed:?}");
    }
    for m in &closure.modules {
        let p = format!("lib/modules/{}/{}", k.version, m.plain_rel_path());
        assert!(listed.contains(&p.as_str()), "{p} not in the archive");
    }

    // /init loads the closure in order and looks for our PARTUUID.
    let dir = tempfile::tempdir().unwrap();
    run_cpio(
        &["-id", "--quiet", "--no-absolute-filenames"],
        &raw,
        Some(dir.path()),
    );
    let init = std::fs::read_to_string(dir.path().join("init")).unwrap();
    assert!(init.starts_with("#!/bin/sh\n"));
    assert_eq!(
        std::fs::metadata(dir.path().join("init"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let insmods: Vec<&str> = init
        .lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .collect();
    assert_eq!(insmods.len(), closure.modules.len());
    for (line, m) in insmods.iter().zip(&closure.modules) {
        assert!(
            line.contains(&format!("/{} ", m.plain_rel_path())),
            "{line}"
        );
    }
    assert!(init.contains(&format!("root_partuuid=\"{PARTUUID}\"")));
    let bb_bytes = read_content(&match &bb
        .get(&kiln::tree::TreePath::new("bin/busybox").unwrap())
        .unwrap()
        .kind
    {
        EntryKind::File(c) => c.clone(),
        _ => unreachable!(),
    })
    .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("bin/busybox")).unwrap(),
        bb_bytes
    );

    // Same inputs, same bytes (gzip and zstd); another epoch changes them.
    let sha = common::sha256_bytes;
    assert_eq!(sha(&initramfs::build_bytes(&spec).unwrap().0), sha(&gz));
    spec.compression = Compression::Zstd;
    let zst = initramfs::build_bytes(&spec).unwrap().0;
    assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert_eq!(sha(&initramfs::build_bytes(&spec).unwrap().0), sha(&zst));
    let mut unz = Vec::new();
    zstd::stream::read::Decoder::new(&zst[..])
        .unwrap()
        .read_to_end(&mut unz)
        .unwrap();
    assert_eq!(unz, raw);
    spec.epoch += 1;
    assert_ne!(sha(&initramfs::build_bytes(&spec).unwrap().0), sha(&zst));

    // Bad inputs are refused with a reason.
    spec.root_partuuid = "not-a-uuid".into();
    let err = initramfs::build_bytes(&spec).unwrap_err().to_string();
    assert!(err.contains("not a UUID"), "{err}");
}

// ---- booting under QEMU ----

const MARKER: &str = "KILN-ROOT-REACHED";

/// KVM is probed, never assumed: boot the kernel alone under KVM and see whether the serial
/// console says anything within a few seconds; else use TCG.
fn accel(vmlinuz: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "kvm",
                "-M",
                "pc",
                "-m",
                "256",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-no-reboot", "-kernel"])
            .arg(vmlinuz)
            .args(["-append", "console=ttyS0 panic=-1", "-serial"])
            .arg(format!("file:{}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return "tcg" };
        let start = Instant::now();
        let mut works = false;
        while start.elapsed() < Duration::from_secs(5) {
            if std::fs::read_to_string(&log).is_ok_and(|s| s.contains("Linux version")) {
                works = true;
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        let chosen = if works { "kvm" } else { "tcg" };
        eprintln!("QEMU accelerator: {chosen}");
        chosen
    })
}

fn write_content(c: &Content, path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    std::io::copy(&mut c.open().unwrap(), &mut f).unwrap();
}

/// A GPT disk whose one Linux partition (PARTUUID set by sfdisk) holds an ext4 with busybox
/// and an /sbin/init that prints the marker and powers off.
fn make_disk(dir: &Path, bb: &Tree) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "sbin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = match &bb
        .get(&kiln::tree::TreePath::new("bin/busybox").unwrap())
        .unwrap()
        .kind
    {
        EntryKind::File(c) => c.clone(),
        _ => unreachable!(),
    };
    write_content(&busybox, &root.join("bin/busybox"));
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        root.join("sbin/init"),
        format!(
            "#!/bin/busybox sh\n/bin/busybox echo \"{MARKER} pid $$ root $(/bin/busybox \
             stat -f -c %T /) mount $(/bin/busybox grep -m1 ' / ' /proc/mounts)\"\n\
             /bin/busybox poweroff -f\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "label: gpt\nstart=2048, size=126976, \
                 type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={PARTUUID}, name=root\n"
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    common::run(
        Command::new("mke2fs")
            .args(["-F", "-q", "-t", "ext4", "-E", "offset=1048576", "-d"])
            .arg(&root)
            .arg(&disk)
            .arg("62M"),
    );
    disk
}

struct Boot {
    /// Whether `expect` appeared on the serial console.
    seen: bool,
    /// Whether QEMU stopped by itself (the guest powered off).
    exited: bool,
    elapsed: Duration,
    accel: &'static str,
    serial: String,
}

impl Boot {
    fn last_lines(&self, n: usize) -> String {
        let lines: Vec<&str> = self.serial.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Boot `k` with `initrd` and `disk` as virtio-blk until `expect` shows on the serial console
/// and QEMU exits, or `timeout` passes (then QEMU is killed).
fn run_qemu(
    k: &InstalledKernel,
    initrd: &[u8],
    disk: &Path,
    append: &str,
    expect: &str,
    timeout: Duration,
) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let vmlinuz = dir.path().join("vmlinuz");
    write_content(&k.vmlinuz, &vmlinuz);
    std::fs::write(dir.path().join("initrd"), initrd).unwrap();
    let accel = accel(&vmlinuz);
    let log = dir.path().join("serial.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-M", "pc", "-m", "512", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-kernel"])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(dir.path().join("initrd"))
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {append}"))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let start = Instant::now();
    let mut exited = false;
    while start.elapsed() < timeout {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = start.elapsed();
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    Boot {
        seen: serial.contains(expect),
        exited,
        elapsed,
        accel,
        serial,
    }
}

/// Boot `flavour` with kiln's initramfs; `rw` adds `rw` to the command line, which /init
/// honours when it mounts the root (else read-only).
fn boot(flavour: &str, compression: Compression, rw: bool) {
    let k = kernel(flavour);
    let bb = busybox();
    let mut spec = InitramfsSpec::new(&k, &bb, PARTUUID);
    spec.compression = compression;
    spec.timeout_secs = 20;
    let (initrd, closure) = initramfs::build_bytes(&spec).unwrap();
    eprintln!(
        "{}: initramfs {} bytes, loads {:?}, built in {:?}",
        k.version,
        initrd.len(),
        closure.names(),
        closure.builtin
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), &bb);
    // The root's init runs as PID 1 on the ext4 partition, then powers off.
    let (append, mode) = if rw { ("rw", "rw,") } else { ("", "ro,") };
    let expect = format!("{MARKER} pid 1 root ext2/ext3 mount /dev/vda1 / ext4 {mode}");
    let b = run_qemu(
        &k,
        &initrd,
        &disk,
        append,
        &expect,
        Duration::from_secs(180),
    );
    assert!(
        b.seen && b.exited,
        "{flavour}: marker seen {}, QEMU exited {} after {:?} ({}); last 40 lines:\n{}",
        b.seen,
        b.exited,
        b.elapsed,
        b.accel,
        b.last_lines(40)
    );
    eprintln!(
        "{flavour}: booted to the root's init and powered off in {:?} under {}",
        b.elapsed, b.accel
    );
}

#[test]
fn cloud_kernel_boots_to_root_with_kiln_initramfs() {
    boot("cloud-amd64", Compression::Zstd, false);
}

#[test]
fn generic_kernel_boots_with_ext4_module() {
    boot("amd64", Compression::Gzip, true);
}

#[test]
fn missing_root_partition_is_reported_and_powers_off() {
    let k = kernel("cloud-amd64");
    let bb = busybox();
    let wanted = "0b0e9c4f-1111-4222-8333-944455556666";
    let mut spec = InitramfsSpec::new(&k, &bb, wanted);
    spec.timeout_secs = 2;
    spec.fail_delay_secs = 1;
    let (initrd, _) = initramfs::build_bytes(&spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), &bb); // its partition has PARTUUID, not `wanted`
    let expect = format!(
        "kiln-initramfs: ERROR: root partition PARTUUID={wanted} did not appear within 2 s"
    );
    let b = run_qemu(&k, &initrd, &disk, "", &expect, Duration::from_secs(120));
    assert!(
        b.seen && b.exited,
        "message seen {}, QEMU exited {} after {:?}; last 40 lines:\n{}",
        b.seen,
        b.exited,
        b.elapsed,
        b.last_lines(40)
    );
    // It says what it found: the partition that is there, and the modules loaded.
    assert!(
        b.serial.contains("DEVNAME=vda1 DEVTYPE=partition"),
        "{}",
        b.last_lines(40)
    );
    assert!(b.serial.contains("virtio_blk "), "{}", b.last_lines(40));
    assert!(!b.serial.contains(MARKER));
}

/// A merged-/usr layout (`/usr/lib/modules`) with zstd-compressed modules, as newer Debian
/// releases ship them: indexed the same, and the initramfs gets them decompressed.
#[test]
fn usr_lib_modules_and_zstd_modules() {
    let original = common::deb_tree(&common::kernel_package("cloud-amd64"));
    let mut tree = Tree::new();
    let mut plain = std::collections::BTreeMap::new();
    for (path, entry) in original.iter().filter(|(p, _)| !p.is_root()) {
        let p = path.as_str();
        match (&entry.kind, p.strip_prefix("lib/")) {
            (EntryKind::File(c), Some(rest))
                if p.ends_with("/virtio.ko") || p.ends_with("/virtio_blk.ko") =>
            {
                let bytes = read_content(c).unwrap();
                let zst = zstd::encode_all(&bytes[..], 3).unwrap();
                tree.add(
                    &format!("usr/lib/{rest}.zst"),
                    Entry::file(Content::inline(zst), 0o644),
                )
                .unwrap();
                plain.insert(format!("usr/lib/{rest}"), bytes);
            }
            (_, Some(rest)) => tree.add(&format!("usr/lib/{rest}"), entry.clone()).unwrap(),
            _ => tree.add(p, entry.clone()).unwrap(),
        }
    }
    let k = InstalledKernel::from_tree(&tree).unwrap();
    assert_eq!(
        k.modules_dir.as_ref().unwrap().as_str(),
        format!("usr/lib/modules/{}", k.version)
    );
    let c = k.closure(&["virtio_blk"]).unwrap();
    assert_deps_first(
        &c.modules.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        &["virtio_ring", "virtio"],
        "virtio_blk",
    );
    let virtio = c.modules.iter().find(|m| m.name == "virtio").unwrap();
    assert_eq!(virtio.compression, kiln::kernel::ModuleCompression::Zstd);

    let bb = busybox();
    let (initramfs, _) = initramfs::build_tree(&InitramfsSpec {
        modules: vec!["virtio_blk".into()],
        ..InitramfsSpec::new(&k, &bb, PARTUUID)
    })
    .unwrap();
    for (usr_path, bytes) in &plain {
        let rel = usr_path.strip_prefix("usr/").unwrap();
        let entry = initramfs
            .get(&kiln::tree::TreePath::new(rel).unwrap())
            .unwrap();
        let EntryKind::File(c) = &entry.kind else {
            panic!("{rel} is not a file")
        };
        assert_eq!(&read_content(c).unwrap(), bytes, "{rel} decompressed");
    }
}
