//! `kiln disk` end to end: whole disks from host trees, checked by the standard tools — sgdisk,
//! sfdisk, e2fsck, fsck.vfat, qemu-img check/compare, systemd-dissect — and byte-identical output
//! for the same input and seed, wherever it is run from.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{extract_partition, kiln_no_home as kiln, output, run, sha256};

/// A root tree with every entry type a host directory can hold, and an ESP tree.
fn make_trees(base: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let root = base.join("root");
    let esp = base.join("esp");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("var/empty")).unwrap();
    std::fs::write(root.join("etc/hostname"), "demo\n").unwrap();
    std::fs::write(root.join("usr/bin/tool"), vec![7u8; 300_000]).unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
    symlink("tool", root.join("usr/bin/short-link")).unwrap();
    symlink(
        "/".to_string() + &"long/".repeat(30),
        root.join("usr/bin/long-link"),
    )
    .unwrap();
    let fifo = root.join("var/fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    std::fs::write(esp.join("EFI/BOOT/BOOTX64.EFI"), vec![1u8; 100_000]).unwrap();
    std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
    std::fs::write(esp.join("loader/entries/kiln.conf"), "title kiln\n").unwrap();
    (root, esp)
}

fn disk(root: &Path, esp: &Path, out: &Path, extra: &[&str]) -> Output {
    output(
        kiln()
            .args([
                "-q",
                "disk",
                "--seed",
                "test-seed",
                "--epoch",
                "1700000000",
                "--root",
            ])
            .arg(root)
            .arg("--esp")
            .arg(esp)
            .args(extra)
            .arg("-o")
            .arg(out),
    )
}

#[test]
fn raw_and_qcow2_disks_pass_every_checker_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let (root, esp) = make_trees(dir.path());
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    let o = disk(
        &root,
        &esp,
        &raw,
        &[
            "--format",
            "raw",
            "--data",
            &format!("{}:16M", root.join("etc").display()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = disk(
        &root,
        &esp,
        &qcow2,
        &[
            "--format",
            "qcow2",
            "--data",
            &format!("{}:16M", root.join("etc").display()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let v = run(Command::new("sgdisk").arg("-v").arg(&raw));
    assert!(v.contains("No problems found"), "{v}");
    let dump = run(Command::new("sfdisk").arg("-d").arg(&raw));
    assert!(
        dump.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{dump}"
    );
    assert!(
        dump.contains("type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        "{dump}"
    );
    assert!(
        dump.contains("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        "{dump}"
    );

    run(Command::new("qemu-img").arg("check").arg(&qcow2));
    let cmp = run(Command::new("qemu-img")
        .arg("compare")
        .arg(&raw)
        .arg(&qcow2));
    assert!(cmp.contains("identical"), "{cmp}");
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2));
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    let esp_img = dir.path().join("esp.img");
    extract_partition(&raw, 1, &esp_img);
    let o = output(Command::new("fsck.vfat").arg("-n").arg(&esp_img));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    for n in [2, 3] {
        let img = dir.path().join(format!("p{n}.img"));
        extract_partition(&raw, n, &img);
        let o = output(Command::new("e2fsck").arg("-fn").arg(&img));
        assert!(
            o.status.success(),
            "partition {n}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The root tree reads back: setuid bit, hard link count, symlink target, fifo.
    let p2 = dir.path().join("p2.img");
    let stat = run(Command::new("debugfs")
        .arg("-R")
        .arg("stat /usr/bin/tool")
        .arg(&p2));
    assert!(stat.contains("Mode:  04755"), "{stat}");
    assert!(stat.contains("Links: 2"), "{stat}");
    let ls = run(Command::new("debugfs").arg("-R").arg("ls -l /var").arg(&p2));
    assert!(ls.contains("fifo"), "{ls}");

    if Path::new("/usr/bin/systemd-dissect").exists() && common::is_root() {
        let o = output(
            Command::new("systemd-dissect")
                .args(["--json=short"])
                .arg(&raw),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(text.contains("\"designator\":\"root\""), "{text}");
        assert!(text.contains("\"designator\":\"esp\""), "{text}");
    }
}

#[test]
fn same_input_same_bytes_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (root, esp) = make_trees(dir.path());
    let a = dir.path().join("a.qcow2");
    let b_dir = tempfile::tempdir().unwrap();
    let b = b_dir.path().join("b.qcow2");
    let o = disk(&root, &esp, &a, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // From another working directory, with relative paths.
    let o = output(
        kiln()
            .current_dir(dir.path())
            .args(["-q", "disk", "--seed", "test-seed", "--epoch", "1700000000"])
            .args(["--root", "root", "--esp", "esp", "-o"])
            .arg(&b),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256(&a), sha256(&b));
    // Another seed gives another disk.
    let c = dir.path().join("c.qcow2");
    let o = output(
        kiln()
            .args([
                "-q",
                "disk",
                "--seed",
                "other",
                "--epoch",
                "1700000000",
                "--root",
            ])
            .arg(&root)
            .arg("--esp")
            .arg(&esp)
            .arg("-o")
            .arg(&c),
    );
    assert!(o.status.success());
    assert_ne!(sha256(&a), sha256(&c));
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (root, esp) = make_trees(dir.path());
    let out = dir.path().join("out.raw");

    // Content larger than its partition: the error names the partition and the sizes.
    std::fs::write(root.join("big"), vec![3u8; 8 << 20]).unwrap();
    let o = disk(&root, &esp, &out, &["--format", "raw", "--root-size", "4M"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("root"), "{err}");
    assert!(err.contains("needs") || err.contains("need"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    std::fs::remove_file(root.join("big")).unwrap();

    // A name FAT cannot hold, and a node FAT cannot hold, in the ESP.
    std::fs::write(esp.join("bad:name"), "x").unwrap();
    let o = disk(&root, &esp, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("bad:name"), "{err}");
    std::fs::remove_file(esp.join("bad:name")).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(esp.join("pipe"))
            .status()
            .unwrap()
            .success()
    );
    let o = disk(&root, &esp, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("pipe"), "{err}");
    assert!(!out.exists());
    // No temp files left beside the output either.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A name too long for ext4.
    std::fs::remove_file(esp.join("pipe")).unwrap();
    std::fs::write(root.join("n".repeat(255)), "ok").unwrap();
    let o = disk(&root, &esp, &out, &["--format", "raw"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&out).unwrap();

    // Bad sizes are usage errors.
    let o = disk(&root, &esp, &out, &["--size", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lots"));
}

#[test]
fn hard_link_to_a_missing_path_is_refused_before_writing() {
    use kiln::disk::build::{DiskSpec, PartitionInput, build_disk};
    use kiln::disk::gpt::PartitionKind;
    use kiln::disk::image::ImageOptions;
    use kiln::disk::layout::{Filesystem, Size};
    use kiln::tree::{Content, Entry, EntryKind, Tree, TreePath};

    for fs in [Filesystem::Ext4, Filesystem::Fat32] {
        let mut tree = Tree::new();
        tree.add("/a", Entry::file(Content::inline("a"), 0o644))
            .unwrap();
        tree.add(
            "/link",
            Entry::new(
                EntryKind::HardLink {
                    target: TreePath::new("/missing").unwrap(),
                },
                0o644,
            ),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.raw");
        let kind = if fs == Filesystem::Ext4 {
            PartitionKind::RootX86_64
        } else {
            PartitionKind::Esp
        };
        let spec = DiskSpec {
            size: Size::Auto,
            image: ImageOptions::default(),
            seed: "s".into(),
            epoch: 0,
            partitions: vec![PartitionInput {
                name: "p".into(),
                kind,
                filesystem: fs,
                size: Size::Auto,
                label: None,
                tree: Some(tree),
            }],
            verity: None,
        };
        let err = build_disk(&spec, &out).unwrap_err();
        let text = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(text.contains("/missing"), "{fs:?}: {text}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

/// A root with a dm-verity hash tree, written by kiln in the same build as the ext4:
/// `veritysetup verify` (cryptsetup) accepts the pair with kiln's root hash and refuses it after
/// one byte of a file changed; the partitions carry the Discoverable Partitions types and the
/// halves of the root hash as their UUIDs; e2fsck accepts the root; the same spec gives the
/// same bytes.
#[test]
fn a_verity_root_is_what_veritysetup_verifies() {
    use kiln::disk::build::{DiskSpec, PartitionInput, VeritySpec, build_disk};
    use kiln::disk::gpt::PartitionKind;
    use kiln::disk::image::{ImageFormat, ImageOptions};
    use kiln::disk::layout::{Filesystem, Size};
    use kiln::tree::{Content, Entry, Tree};
    use kiln::verity::VerityParams;

    let dir = tempfile::tempdir().unwrap();
    let build = |name: &str, format: ImageFormat| {
        let mut root = Tree::new();
        for i in 0..200 {
            root.add(
                &format!("/f{i}"),
                Entry::file(Content::inline(format!("file {i}\n").repeat(300)), 0o644),
            )
            .unwrap();
        }
        let mut esp = Tree::new();
        esp.add("/hash", Entry::file(Content::inline("placeholder"), 0o644))
            .unwrap();
        let part = |name: &str, kind, filesystem, tree| PartitionInput {
            name: name.into(),
            kind,
            filesystem,
            size: Size::Auto,
            label: None,
            tree,
        };
        let spec = DiskSpec {
            size: Size::Auto,
            image: ImageOptions {
                format,
                ..ImageOptions::default()
            },
            seed: "verity-test".into(),
            epoch: 1_700_000_000,
            partitions: vec![
                part("esp", PartitionKind::Esp, Filesystem::Fat32, Some(esp)),
                part(
                    "root",
                    PartitionKind::RootX86_64,
                    Filesystem::Ext4,
                    Some(root),
                ),
                part(
                    "root-verity",
                    PartitionKind::RootVerityX86_64,
                    Filesystem::None,
                    None,
                ),
            ],
            verity: Some(VeritySpec {
                data: "root".into(),
                hash: "root-verity".into(),
                params: VerityParams {
                    salt: [0x5a; 32],
                    uuid: [0x11; 16],
                },
                // The ESP learns the root hash, as a UKI's command line does.
                remake: Some((
                    "esp".into(),
                    Box::new(|hash: &str| {
                        let mut t = Tree::new();
                        t.add(
                            "/hash",
                            Entry::file(Content::inline(hash.to_string()), 0o644),
                        )
                        .map_err(|e| e.to_string())?;
                        Ok(t)
                    }),
                )),
            }),
        };
        let out = dir.path().join(name);
        let report = build_disk(&spec, &out).unwrap();
        (out, report.root_hash.unwrap())
    };
    let (raw, hash) = build("v.raw", ImageFormat::Raw);
    let (qcow2, hash2) = build("v.qcow2", ImageFormat::Qcow2);
    assert_eq!(hash, hash2);
    let (again, _) = build("again.raw", ImageFormat::Raw);
    assert_eq!(sha256(&raw), sha256(&again));
    let converted = dir.path().join("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&qcow2)
        .arg(&converted));
    assert_eq!(sha256(&converted), sha256(&raw));

    let p = |n: usize| dir.path().join(format!("p{n}.img"));
    for n in 1..=3 {
        extract_partition(&raw, n, &p(n));
    }
    let o = output(
        Command::new("veritysetup")
            .arg("verify")
            .arg(p(2))
            .arg(p(3))
            .arg(&hash),
    );
    assert!(
        o.status.success(),
        "veritysetup: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dump = run(Command::new("veritysetup").arg("dump").arg(p(3)));
    assert!(dump.contains("Hash type:       \t1"), "{dump}");
    assert!(dump.contains("sha256"), "{dump}");
    let o = output(Command::new("e2fsck").arg("-fn").arg(p(2)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // The ESP was made again with the root hash.
    let esp_hash = run(Command::new("mtype").arg("-i").arg(p(1)).arg("::hash"));
    assert_eq!(esp_hash.trim(), hash);
    // Types and UUIDs as Discoverable Partitions say.
    let json = run(Command::new("sfdisk").arg("--json").arg(&raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let parts = v["partitiontable"]["partitions"].as_array().unwrap();
    // root-x86-64-verity as the specification spells it (systemd's SD_GPT_ROOT_X86_64_VERITY).
    assert_eq!(parts[2]["type"], "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5");
    let uuid = |i: usize| {
        parts[i]["uuid"]
            .as_str()
            .unwrap()
            .replace('-', "")
            .to_lowercase()
    };
    assert_eq!(format!("{}{}", uuid(1), uuid(2)), hash);
    // systemd pairs the two partitions from the root hash alone (it needs loop devices: root).
    if Path::new("/usr/bin/systemd-dissect").exists() && common::is_root() {
        let o = output(
            Command::new("systemd-dissect")
                .args(["--json=short", &format!("--root-hash={hash}")])
                .arg(&raw),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "systemd-dissect --root-hash: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mounts = v["mounts"].as_array().unwrap();
        let find = |d: &str| mounts.iter().find(|m| m["designator"] == d).cloned();
        let root = find("root").unwrap_or_else(|| panic!("no root in {text}"));
        assert_eq!(root["verity"], "yes", "{text}");
        assert_eq!(root["rw"], "ro", "{text}");
        let verity = find("root-verity").unwrap_or_else(|| panic!("no root-verity in {text}"));
        assert_eq!(verity["fstype"], "DM_verity_hash", "{text}");
    }
    // One byte of a file changed: veritysetup finds it.
    let o = output(
        Command::new("debugfs")
            .arg("-R")
            .arg("blocks /f7")
            .arg(p(2)),
    );
    let block: u64 = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    common::flip_byte(&p(2), block * 4096 + 10);
    let o = output(
        Command::new("veritysetup")
            .arg("verify")
            .arg(p(2))
            .arg(p(3))
            .arg(&hash),
    );
    assert!(!o.status.success(), "veritysetup accepted a changed root");
}
