//! ext4 writer tests: build trees, write images with `write_ext4`, and check them with the real
//! e2fsprogs tools (e2fsck, debugfs, dumpe2fs) and, where allowed, the kernel (loop mount).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use kiln::disk::ext4::{Ext4Error, Ext4Options, Ext4Report, ext4_min_size, write_ext4};
use kiln::tree::{Content, Entry, EntryKind, Tree, TreePath, read_content};

mod common;
use common::sha256;

const MIB: u64 = 1 << 20;

fn opts() -> Ext4Options {
    Ext4Options {
        seed: "test-seed".into(),
        label: "root".into(),
        epoch: 1_700_000_000,
    }
}

fn write_image(tree: &Tree, path: &Path, size: u64) -> Result<Ext4Report, Ext4Error> {
    let mut file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    write_ext4(tree, &mut file, size, &opts())
}

/// `cmd args` run to its end: exit code (-1 for a signal), stdout, stderr.
fn tool(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = common::output(Command::new(cmd).args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `e2fsck -fn` exits 0 and prints nothing but its pass headers and the summary line.
fn e2fsck_clean(img: &Path) -> String {
    let (code, out, err) = tool("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert_eq!(code, 0, "e2fsck failed:\n{out}\n{err}");
    for l in out.lines() {
        let ok = l.starts_with("Pass ")
            || (l.contains(" files (") && l.ends_with(" blocks"))
            || l.is_empty();
        assert!(ok, "e2fsck reported: {l}\n{out}\n{err}");
    }
    for l in err.lines() {
        assert!(l.starts_with("e2fsck "), "e2fsck stderr: {l}\n{err}");
    }
    out
}

/// Run debugfs commands from a file; returns each command's output keyed by its index.
fn debugfs(img: &Path, cmds: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let cmdfile = dir.path().join("cmds");
    std::fs::write(&cmdfile, cmds.join("\n") + "\n").unwrap();
    let (code, out, err) = tool(
        "debugfs",
        &["-f", cmdfile.to_str().unwrap(), img.to_str().unwrap()],
    );
    assert_eq!(code, 0, "debugfs failed: {err}");
    let mut parts: Vec<String> = out
        .split("debugfs: ")
        .skip(1)
        .map(|s| s.split_once('\n').map(|x| x.1).unwrap_or("").to_string())
        .collect();
    assert_eq!(parts.len(), cmds.len(), "debugfs output:\n{out}\n{err}");
    parts.truncate(cmds.len());
    parts
}

fn field<'a>(stat: &'a str, name: &str) -> &'a str {
    let i = stat
        .find(&format!("{name}:"))
        .unwrap_or_else(|| panic!("no {name} in stat:\n{stat}"));
    stat[i + name.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
}

fn type_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::File(_) | EntryKind::HardLink { .. } => "regular",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::CharDevice { .. } => "character",
        EntryKind::BlockDevice { .. } => "block",
        EntryKind::Fifo => "FIFO",
        EntryKind::Socket => "socket",
    }
}

/// Read every path of `tree` back from the image with debugfs and compare type, mode, owner,
/// times, link count, size, device numbers, xattrs, link targets and content.
fn check_tree_matches(tree: &Tree, img: &Path) {
    let out = tempfile::tempdir().unwrap();
    let links = tree.link_counts();
    let mut cmds = Vec::new();
    // (path, owner entry, cmd index of stat, dump file, xattr files)
    let mut checks = Vec::new();
    for (path, _) in tree.iter() {
        let owner_path = tree.resolve_link(path).unwrap();
        let owner = tree.get(owner_path).unwrap();
        let p = format!("\"{path}\"");
        let stat_at = cmds.len();
        cmds.push(format!("stat {p}"));
        let mut dump = None;
        if matches!(owner.kind, EntryKind::File(_) | EntryKind::Symlink { .. }) {
            let f = out.path().join(format!("d{}", cmds.len()));
            cmds.push(format!("dump {p} {}", f.display()));
            dump = Some(f);
        }
        let mut xfiles = Vec::new();
        for name in owner.xattrs.keys() {
            let f = out.path().join(format!("x{}", cmds.len()));
            cmds.push(format!("ea_get -f {} {p} {name}", f.display()));
            xfiles.push((name.clone(), f));
        }
        checks.push((
            path.clone(),
            owner_path.clone(),
            owner,
            stat_at,
            dump,
            xfiles,
        ));
    }
    let outs = debugfs(img, &cmds);
    for (path, owner_path, owner, stat_at, dump, xfiles) in checks {
        let stat = &outs[stat_at];
        let ctx = format!("{path}:\n{stat}");
        assert_eq!(field(stat, "Type"), type_name(&owner.kind), "{ctx}");
        let mode = u32::from_str_radix(field(stat, "Mode"), 8).unwrap();
        assert_eq!(mode, owner.mode, "{ctx}");
        assert_eq!(field(stat, "User"), owner.uid.to_string(), "{ctx}");
        assert_eq!(field(stat, "Group"), owner.gid.to_string(), "{ctx}");
        let t = owner.mtime;
        let lo = t as i32 as u32;
        let extra = ((t - i64::from(t as i32)) >> 32) as u32 & 3;
        let want_time = format!("{lo:#010x}:{extra:08x}");
        for which in ["ctime", "atime", "mtime", "crtime"] {
            assert_eq!(field(stat, which), want_time, "{which} {ctx}");
        }
        match &owner.kind {
            EntryKind::Dir => {
                let subdirs = tree
                    .children(&path)
                    .filter(|(_, e)| matches!(e.kind, EntryKind::Dir))
                    .count()
                    + usize::from(
                        path.is_root() && tree.get(&TreePath::new("lost+found").unwrap()).is_none(),
                    );
                assert_eq!(field(stat, "Links"), (2 + subdirs).to_string(), "{ctx}");
            }
            _ => {
                let n = links.get(&owner_path).copied().unwrap_or(1);
                assert_eq!(field(stat, "Links"), n.to_string(), "{ctx}");
            }
        }
        match &owner.kind {
            EntryKind::File(c) => {
                assert_eq!(field(stat, "Size"), c.len().to_string(), "{ctx}");
                let got = std::fs::read(dump.unwrap()).unwrap();
                assert!(got == read_content(c).unwrap(), "content of {path} differs");
            }
            EntryKind::Symlink { target } => {
                assert_eq!(field(stat, "Size"), target.len().to_string(), "{ctx}");
                if target.len() < 60 {
                    assert!(
                        stat.contains(&format!("Fast link dest: \"{target}\"")),
                        "{ctx}"
                    );
                } else {
                    let got = std::fs::read(dump.unwrap()).unwrap();
                    assert_eq!(got, target.as_bytes(), "slow symlink target of {path}");
                }
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                let want = format!("Device major/minor number: {major:02}:{minor:02}");
                assert!(stat.contains(&want), "want {want}: {ctx}");
            }
            _ => {}
        }
        let listed = stat
            .split("Extended attributes:")
            .nth(1)
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("  ") && l.contains(" ("))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(listed, owner.xattrs.len(), "xattr count {ctx}");
        for (name, f) in xfiles {
            let got = std::fs::read(&f).unwrap_or_else(|_| panic!("{path}: xattr {name} missing"));
            let mut want = owner.xattrs[&name].clone();
            if name.starts_with("system.posix_acl_") {
                // ext4 stores no id for USER_OBJ, GROUP_OBJ, MASK and OTHER entries; debugfs
                // reads them back as 0.
                for e in want[4..].chunks_mut(8) {
                    if ![2, 8].contains(&e[0]) {
                        e[4..8].fill(0);
                    }
                }
            }
            assert_eq!(got, want, "{path}: xattr {name}");
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(seed))
                .to_be_bytes()[0]
        })
        .collect()
}

/// A sparse host file with `islands` 4 KiB data blocks every 8 KiB: one extent each.
fn fragmented_host_file(dir: &Path, name: &str, islands: u64) -> Content {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    let len = islands * 8192 + 100;
    f.set_len(len).unwrap();
    for i in 0..islands {
        f.write_at(&pattern(4096, i as u8), i * 8192).unwrap();
    }
    f.write_at(b"tail", len - 4).unwrap();
    Content::Host { path, len }
}

/// Every kind of entry the Tree has, with odd modes, big ids and xattrs in and out of the inode.
fn rich_tree(host: &Path) -> Tree {
    let mut t = Tree::new();
    let f = |c: Content, mode| Entry::file(c, mode).mtime(1_600_000_000);
    t.add("/empty", f(Content::inline(""), 0o644)).unwrap();
    t.add(
        "/small",
        f(Content::inline("hello\n"), 0o644)
            .xattr("user.foo", "bar")
            .xattr("user.e", ""),
    )
    .unwrap();
    for (name, len) in [
        ("b4095", 4095),
        ("b4096", 4096),
        ("b4097", 4097),
        ("k300", 300 << 10),
        ("m9", 9 << 20),
    ] {
        t.add(
            &format!("/sizes/{name}"),
            f(Content::inline(pattern(len, len as u8)), 0o600),
        )
        .unwrap();
    }
    t.add("/frag/ten", f(fragmented_host_file(host, "ten", 10), 0o644))
        .unwrap();
    t.add(
        "/frag/many",
        f(fragmented_host_file(host, "many", 1500), 0o644),
    )
    .unwrap();
    t.add("/a/b/c/d/deep", f(Content::inline("deep"), 0o640))
        .unwrap();
    t.add("/a/emptysub", Entry::dir(0o750)).unwrap();
    t.add("/emptydir", Entry::dir(0o755).mtime(1_500_000_000))
        .unwrap();
    t.add("/lnk", Entry::symlink("small")).unwrap();
    t.add(
        "/slow",
        Entry::symlink(format!("{}/target", "x".repeat(100))).xattr("user.on-link", "1"),
    )
    .unwrap();
    t.add("/exact60", Entry::symlink("y".repeat(60))).unwrap();
    let hard = |target: &str| {
        Entry::new(
            EntryKind::HardLink {
                target: TreePath::new(target).unwrap(),
            },
            0o644,
        )
    };
    t.add("/hl1", hard("/small")).unwrap();
    t.add("/a/hl2", hard("/small")).unwrap();
    t.add("/aaa_link", hard("/zzz_owner")).unwrap();
    t.add("/zzz_owner", f(Content::inline("owner"), 0o644))
        .unwrap();
    t.add(
        "/dev/null",
        Entry::new(EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
    )
    .unwrap();
    t.add(
        "/dev/sda",
        Entry::new(EntryKind::BlockDevice { major: 8, minor: 0 }, 0o660).owner(0, 6),
    )
    .unwrap();
    t.add(
        "/dev/big",
        Entry::new(
            EntryKind::CharDevice {
                major: 300,
                minor: 70000,
            },
            0o600,
        ),
    )
    .unwrap();
    t.add("/run/fifo", Entry::new(EntryKind::Fifo, 0o600))
        .unwrap();
    t.add("/run/sock", Entry::new(EntryKind::Socket, 0o777))
        .unwrap();
    let cap = [
        1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    t.add(
        "/usr/bin/ping",
        f(Content::inline(pattern(5000, 9)), 0o4755).xattr("security.capability", cap.to_vec()),
    )
    .unwrap();
    let mut many = f(Content::inline("x"), 0o2755);
    for i in 0..12 {
        many = many.xattr(format!("user.attr{i:02}"), pattern(50 + i, i as u8));
    }
    many = many
        .xattr("user.zz-empty-in-block", "")
        .xattr("trusted.t", "trusted value")
        .xattr("security.capability", cap.to_vec());
    t.add("/usr/bin/many-xattrs", many).unwrap();
    // POSIX ACLs: stored in ext4's own format, read back in the xattr format.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    t.add(
        "/acl",
        f(Content::inline("acl"), 0o640).xattr("system.posix_acl_access", acl),
    )
    .unwrap();
    t.add(
        "/ünïcode-名前",
        f(Content::inline("utf-8"), 0o644).xattr("user.ключ", "значение"),
    )
    .unwrap();
    t.add("/tmp", Entry::dir(0o1777)).unwrap();
    t.add("/srv", Entry::dir(0o2775).xattr("user.dir", "d"))
        .unwrap();
    t.add(
        "/owned",
        f(Content::inline("big ids"), 0o644).owner(100_000, 200_000),
    )
    .unwrap();
    t.add(
        "/future",
        f(Content::inline("2100"), 0o644).mtime(4_200_000_000),
    )
    .unwrap();
    t.add(
        "/past",
        f(Content::inline("1960"), 0o644).mtime(-300_000_000),
    )
    .unwrap();
    t
}

#[test]
fn rich_tree_reads_back_and_fscks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    let img = dir.path().join("rich.img");
    let report = write_image(&tree, &img, 64 * MIB).unwrap();
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
    assert_eq!(report.blocks_total, 16384);
    // dumpe2fs agrees with the report.
    let (_, out, _) = tool("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let free: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(report.blocks_total - free, report.blocks_used);
    // The fragmented files got extent trees of depth 1 and 2.
    let outs = debugfs(&img, &["stat /frag/ten".into(), "stat /frag/many".into()]);
    assert!(
        outs[0].contains("(ETB0)") && !outs[0].contains("(ETB1)"),
        "{}",
        outs[0]
    );
    assert!(
        outs[1].contains("(ETB1)"),
        "depth-2 tree expected:\n{}",
        &outs[1][..outs[1].len().min(2000)]
    );
}

#[test]
fn host_dir_with_lost_found_and_root_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    *tree.get_mut(&TreePath::root()).unwrap() = Entry::dir(0o711)
        .owner(5, 6)
        .mtime(1234567)
        .xattr("user.root", "r");
    tree.add("/lost+found", Entry::dir(0o700)).unwrap();
    tree.add(
        "/lost+found/stray",
        Entry::file(Content::inline("s"), 0o600),
    )
    .unwrap();
    tree.add("/z", Entry::dir(0o755)).unwrap();
    let img = dir.path().join("lf.img");
    write_image(&tree, &img, 16 * MIB).unwrap();
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
}

#[test]
fn ten_thousand_entry_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..10_000 {
        let content = if i % 100 == 0 {
            Content::inline(format!("file {i}"))
        } else {
            Content::inline("")
        };
        tree.add(
            &format!("/many/entry-with-a-longish-name-{i:05}"),
            Entry::file(content, 0o644),
        )
        .unwrap();
    }
    tree.add("/many/sub", Entry::dir(0o755)).unwrap();
    let img = dir.path().join("big.img");
    let size = ext4_min_size(&tree).unwrap();
    write_image(&tree, &img, size).unwrap();
    e2fsck_clean(&img);
    let outs = debugfs(
        &img,
        &[
            "ls -p /many".into(),
            "cat /many/entry-with-a-longish-name-09900".into(),
        ],
    );
    let names: Vec<&str> = outs[0]
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .collect();
    assert_eq!(names.len(), 10_001);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "directory entries are in Tree order");
    assert_eq!(outs[1], "file 9900");
    check_tree_matches(&tree, &img);
}

#[test]
fn five_gib_sparse_files() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("sparse");
    let len: u64 = 5 << 30;
    let f = File::create(&host).unwrap();
    f.set_len(len).unwrap();
    let at: u64 = (3 << 30) + 12345;
    f.write_at(b"needle in a haystack", at).unwrap();
    drop(f);
    let mut tree = Tree::new();
    tree.add(
        "/big/sparse",
        Entry::file(Content::Host { path: host, len }, 0o644),
    )
    .unwrap();
    tree.add(
        "/big/zeros",
        Entry::file(Content::Zeros { len: len + 7 }, 0o644),
    )
    .unwrap();
    let size = ext4_min_size(&tree).unwrap();
    assert!(size < 64 * MIB, "sparse data should not need space: {size}");
    let img = dir.path().join("sparse.img");
    write_image(&tree, &img, size).unwrap();
    e2fsck_clean(&img);
    let lblk = at / 4096;
    let outs = debugfs(
        &img,
        &[
            "stat /big/sparse".into(),
            format!("bmap /big/sparse {lblk}"),
            "stat /big/zeros".into(),
            "bmap /big/sparse 0".into(),
        ],
    );
    assert_eq!(field(&outs[0], "Size"), len.to_string());
    assert_eq!(field(&outs[0], "Blockcount"), "8", "one data block only");
    assert_eq!(field(&outs[2], "Size"), (len + 7).to_string());
    assert_eq!(field(&outs[2], "Blockcount"), "0");
    assert_eq!(outs[3].trim(), "0", "block 0 is a hole");
    let phys: u64 = outs[1].trim().parse().unwrap();
    let mut buf = [0u8; 20];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, phys * 4096 + at % 4096)
        .unwrap();
    assert_eq!(&buf, b"needle in a haystack");
}

#[test]
fn four_gib_plus_file_with_data() {
    // A file over 4 GiB whose data blocks span several block groups.
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("big");
    let len: u64 = (4 << 30) + 4096 * 3;
    let f = File::create(&host).unwrap();
    f.set_len(len).unwrap();
    let data = pattern(140 << 20, 3);
    f.write_at(&data, len - data.len() as u64).unwrap();
    drop(f);
    let mut tree = Tree::new();
    tree.add(
        "/big",
        Entry::file(Content::Host { path: host, len }, 0o644),
    )
    .unwrap();
    let size = ext4_min_size(&tree).unwrap();
    let img = dir.path().join("big.img");
    write_image(&tree, &img, size).unwrap();
    e2fsck_clean(&img);
    let out = dir.path().join("out");
    debugfs(&img, &[format!("dump /big {}", out.display())]);
    let got = File::open(&out).unwrap();
    assert_eq!(got.metadata().unwrap().len(), len);
    let mut buf = vec![0u8; data.len()];
    got.read_exact_at(&mut buf, len - data.len() as u64)
        .unwrap();
    assert!(buf == data);
}

#[test]
fn min_size_is_tight_and_full_partition_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..50 {
        tree.add(
            &format!("/d{}/f{i}", i % 5),
            Entry::file(Content::inline(pattern(3000 * i + 1, i as u8)), 0o644),
        )
        .unwrap();
    }
    let min = ext4_min_size(&tree).unwrap();
    assert_eq!(min % MIB, 0);
    let img = dir.path().join("min.img");
    write_image(&tree, &img, min).unwrap();
    e2fsck_clean(&img);
    let err = write_image(&tree, &img, min - MIB).unwrap_err();
    assert!(matches!(err, Ext4Error::TooSmall { .. }), "{err}");

    // Fill a 40 MiB partition to the last block with one more file.
    let size = 40 * MIB;
    let report = write_image(&tree, &img, size).unwrap();
    let free = report.blocks_total - report.blocks_used;
    // One block goes to the extent tree leaf when the filler spans more than 4 extents; the
    // filler fits in one group here, so it is a single extent.
    tree.add(
        "/filler",
        Entry::file(Content::inline(pattern((free * 4096) as usize, 7)), 0o644),
    )
    .unwrap();
    let report = write_image(&tree, &img, size).unwrap();
    assert_eq!(report.blocks_used, report.blocks_total, "{report:?}");
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
    assert_eq!(ext4_min_size(&tree).unwrap(), size);
}

#[test]
fn content_larger_than_partition_is_an_error_with_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add(
        "/huge",
        Entry::file(Content::inline(vec![1u8; 20 << 20]), 0o644),
    )
    .unwrap();
    let img = dir.path().join("small.img");
    let size = 16 * MIB;
    let err = write_image(&tree, &img, size).unwrap_err();
    let min = ext4_min_size(&tree).unwrap();
    match &err {
        Ext4Error::TooSmall { needed, available } => {
            assert_eq!(*needed, min);
            assert_eq!(*available, size);
        }
        other => panic!("unexpected error {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&min.to_string()) && msg.contains(&size.to_string()),
        "{msg}"
    );
}

#[test]
fn name_over_255_bytes_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    let name = "n".repeat(256);
    tree.add(
        &format!("/etc/{name}"),
        Entry::file(Content::inline("x"), 0o644),
    )
    .unwrap();
    let err = write_image(&tree, &dir.path().join("x.img"), 16 * MIB).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("/etc/{name}")) && msg.contains("256"),
        "{msg}"
    );
    // 255 is fine.
    let mut tree = Tree::new();
    tree.add(
        &format!("/etc/{}", "n".repeat(255)),
        Entry::file(Content::inline("x"), 0o644),
    )
    .unwrap();
    let img = dir.path().join("y.img");
    write_image(&tree, &img, 16 * MIB).unwrap();
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
}

#[test]
fn same_tree_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    let digest = |name: &str| {
        let img = dir.path().join(name);
        write_image(&tree, &img, 48 * MIB).unwrap();
        sha256(&img)
    };
    assert_eq!(digest("one.img"), digest("two.img"));
    // A different seed changes the UUID (and so every checksum).
    let img = dir.path().join("three.img");
    let mut file = File::create(&img).unwrap();
    file.set_len(48 * MIB).unwrap();
    let mut o = opts();
    o.seed = "other".into();
    write_ext4(&tree, &mut file, 48 * MIB, &o).unwrap();
    assert_ne!(sha256(&img), digest("four.img"));
}

#[test]
fn journal_is_valid_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add("/f", Entry::file(Content::inline("j"), 0o644))
        .unwrap();
    for (size, journal_size) in [(16 * MIB, "4096k"), (200 * MIB, "16M"), (1200 * MIB, "32M")] {
        let img = dir.path().join("j.img");
        write_image(&tree, &img, size).unwrap();
        e2fsck_clean(&img);
        let (code, out, err) = tool("dumpe2fs", &["-h", img.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let features = out
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap();
        for feat in [
            "has_journal",
            "extent",
            "64bit",
            "metadata_csum",
            "huge_file",
            "dir_nlink",
            "extra_isize",
            "sparse_super",
            "large_file",
            "filetype",
            "ext_attr",
        ] {
            assert!(
                features.split_whitespace().any(|f| f == feat),
                "{feat} missing: {features}"
            );
        }
        assert!(out.contains("Filesystem state:         clean"), "{out}");
        assert!(out.contains("Journal start:            0"), "{out}");
        assert!(
            out.contains(&format!("Total journal size:       {journal_size}\n")),
            "{out}"
        );
        assert!(out.contains("Filesystem volume name:   root"), "{out}");
        let (code, out, err) = tool("debugfs", &["-R", "logdump", img.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("Journal starts at block 0, transaction 1"),
            "{out}"
        );
    }
}

/// The kernel mounts the image read-write and sees the tree. Skipped (with a note) where loop
/// mounts are not allowed.
#[test]
fn kernel_mounts_read_write() {
    let dir = tempfile::tempdir().unwrap();
    let tree = rich_tree(dir.path());
    let img = dir.path().join("mnt.img");
    write_image(&tree, &img, 64 * MIB).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (code, _, err) = tool(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    if code != 0 {
        eprintln!("skipping kernel mount check: {err}");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        assert_eq!(std::fs::read(mnt.join("small")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read_link(mnt.join("slow"))
                .unwrap()
                .to_str()
                .unwrap()
                .len(),
            107
        );
        assert_eq!(
            xattr::get(mnt.join("usr/bin/many-xattrs"), "user.attr11")
                .unwrap()
                .unwrap(),
            pattern(61, 11)
        );
        // Extent trees of depth 0, 1 and 2 read back through the kernel.
        for p in ["sizes/m9", "frag/ten", "frag/many"] {
            let want = match &tree.get(&TreePath::new(p).unwrap()).unwrap().kind {
                EntryKind::File(c) => read_content(c).unwrap(),
                _ => unreachable!(),
            };
            assert!(std::fs::read(mnt.join(p)).unwrap() == want, "{p} differs");
        }
        // The kernel reads the ACL back in the xattr format, with its undefined ids.
        let acl = xattr::get(mnt.join("acl"), "system.posix_acl_access")
            .unwrap()
            .unwrap();
        let want =
            &tree.get(&TreePath::new("/acl").unwrap()).unwrap().xattrs["system.posix_acl_access"];
        assert_eq!(&acl, want);
        std::fs::write(mnt.join("new-file"), b"written by the kernel").unwrap();
        std::fs::create_dir(mnt.join("tmp/newdir")).unwrap();
        for i in 0..300 {
            std::fs::write(mnt.join(format!("emptydir/f{i}")), b"x").unwrap();
        }
    });
    let (code, _, err) = tool("umount", &[mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "umount: {err}");
    result.unwrap();
    e2fsck_clean(&img);
    let outs = debugfs(&img, &["cat /new-file".into(), "ls -p /emptydir".into()]);
    assert_eq!(outs[0], "written by the kernel");
    assert_eq!(outs[1].lines().filter(|l| l.contains("/f")).count(), 300);
}

#[test]
fn multi_group_partition_filled_to_the_last_block() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("dense");
    let data = pattern(128 << 20, 5);
    std::fs::write(&host, &data).unwrap();
    drop(data);
    let dense = |len: u64| Content::Host {
        path: host.clone(),
        len,
    };
    let mut tree = Tree::new();
    tree.add("/a", Entry::file(dense(100 << 20), 0o644))
        .unwrap();
    tree.add("/b", Entry::file(dense(100 << 20), 0o644))
        .unwrap();
    let size = 300 * MIB;
    let img = dir.path().join("full.img");
    let report = write_image(&tree, &img, size).unwrap();
    let free = report.blocks_total - report.blocks_used;
    assert!(free < 32768, "{report:?}");
    tree.add("/c", Entry::file(dense(free * 4096), 0o644))
        .unwrap();
    let report = write_image(&tree, &img, size).unwrap();
    assert_eq!(report.blocks_used, report.blocks_total, "{report:?}");
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
    // One byte more does not fit, and the error says how much is needed.
    tree.add("/d", Entry::file(Content::inline("1"), 0o644))
        .unwrap();
    match write_image(&tree, &img, size) {
        Err(Ext4Error::TooSmall { needed, available }) => {
            assert_eq!(available, size);
            assert!(needed > size, "{needed}");
        }
        other => panic!("expected TooSmall, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_errors_with_context() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.img");
    // More xattrs than the inode and one xattr block hold.
    let mut e = Entry::file(Content::inline("x"), 0o644);
    for i in 0..40 {
        e = e.xattr(format!("user.k{i}"), vec![b'v'; 200]);
    }
    let mut tree = Tree::new();
    tree.add("/x", e).unwrap();
    let msg = write_image(&tree, &img, 16 * MIB).unwrap_err().to_string();
    assert!(msg.contains("/x") && msg.contains("xattr"), "{msg}");
    // An unknown xattr namespace.
    let mut tree = Tree::new();
    tree.add(
        "/y",
        Entry::file(Content::inline("y"), 0o644).xattr("bogus.name", "v"),
    )
    .unwrap();
    let msg = write_image(&tree, &img, 16 * MIB).unwrap_err().to_string();
    assert!(msg.contains("/y") && msg.contains("bogus.name"), "{msg}");
    // lost+found that is not a directory.
    let mut tree = Tree::new();
    tree.add("/lost+found", Entry::file(Content::inline("no"), 0o644))
        .unwrap();
    let msg = write_image(&tree, &img, 16 * MIB).unwrap_err().to_string();
    assert!(msg.contains("/lost+found"), "{msg}");
}

#[test]
fn empty_tree_min_size() {
    let dir = tempfile::tempdir().unwrap();
    let tree = Tree::new();
    let min = ext4_min_size(&tree).unwrap();
    assert!(min <= 8 * MIB, "{min}");
    let img = dir.path().join("empty.img");
    let report = write_image(&tree, &img, min).unwrap();
    assert_eq!(report.inodes_used, 11);
    e2fsck_clean(&img);
    check_tree_matches(&tree, &img);
}
