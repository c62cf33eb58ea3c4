//! FAT32 writer against the real tools: `fsck.vfat -n` must find nothing wrong, mtools must read
//! back every path and byte of the Tree, and `mkfs.vfat` must pick the same cluster size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::disk::fat::{FatError, FatOptions, fat32_min_size, write_fat32};
use kiln::tree::{Content, Entry, EntryKind, Tree, TreePath, read_content};

mod common;
use common::sha256;

const MIB: u64 = 1 << 20;
const EPOCH: i64 = 1_700_000_000; // 2023-11-14 22:13:20 UTC

/// Deterministic pseudo-random bytes (xorshift), so contents differ from file to file.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn file(bytes: impl Into<Vec<u8>>) -> Entry {
    Entry::file(Content::inline(bytes), 0o644)
}

/// Write `tree` into a raw file of `size` bytes.
fn image(dir: &Path, name: &str, tree: &Tree, size: u64, opts: &FatOptions) -> PathBuf {
    let path = dir.join(name);
    let mut f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    write_fat32(tree, &mut f, size, opts).unwrap();
    f.sync_all().unwrap();
    path
}

/// `fsck.vfat -n` must exit 0 and print only its banner and the summary line.
fn fsck_clean(img: &Path) -> String {
    let out = Command::new("fsck.vfat")
        .arg("-n")
        .arg(img)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "fsck.vfat failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "fsck.vfat reported something:\n{stdout}");
    assert!(lines[0].starts_with("fsck.fat"), "{stdout}");
    assert!(
        lines[1].contains(" files, ") && lines[1].contains(" clusters"),
        "{stdout}"
    );
    assert!(stderr.trim().is_empty(), "fsck.vfat stderr: {stderr}");
    lines[1].to_string()
}

fn mtool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every path under `root` (relative, `/`-separated) with its content, `None` for directories.
fn host_listing(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for item in std::fs::read_dir(dir).unwrap() {
            let path = item.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if path.is_dir() {
                out.insert(rel, None);
                walk(root, &path, out);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// What the Tree says should be on the volume (hard links read as their target's content).
fn tree_listing(tree: &Tree) -> BTreeMap<String, Option<Vec<u8>>> {
    tree.iter()
        .filter(|(p, _)| !p.is_root())
        .map(|(path, entry)| {
            let value = match &entry.kind {
                EntryKind::Dir => None,
                EntryKind::File(c) => Some(read_content(c).unwrap()),
                EntryKind::HardLink { .. } => {
                    let target = tree.resolve_link(path).unwrap();
                    match &tree.get(target).unwrap().kind {
                        EntryKind::File(c) => Some(read_content(c).unwrap()),
                        other => panic!("link to {other:?}"),
                    }
                }
                other => panic!("unexpected {other:?}"),
            };
            (path.as_str().to_string(), value)
        })
        .collect()
}

/// A tree with everything an ESP (and then some) can hold. Host files live in `host`.
fn esp_tree(host: &Path) -> Tree {
    let mut t = Tree::new();
    t.add("/EFI/BOOT/BOOTX64.EFI", file(noise(1, 100_000)))
        .unwrap();
    t.add(
        "/EFI/BOOT/bootx64-copy.efi",
        Entry::new(
            EntryKind::HardLink {
                target: TreePath::new("/EFI/BOOT/BOOTX64.EFI").unwrap(),
            },
            0o644,
        ),
    )
    .unwrap();
    t.add("/EFI/systemd/systemd-bootx64.efi", file(noise(2, 90_001)))
        .unwrap();
    t.add("/loader/loader.conf", file("timeout 0\ndefault kiln*\n"))
        .unwrap();
    t.add(
        "/loader/entries/kiln-6.1.0-28-amd64.conf",
        file("title kiln\nlinux /vmlinuz\n"),
    )
    .unwrap();
    // Mixed case, 8.3 in various cases, names that need `~N` tails.
    for name in [
        "README.TXT",
        "lower.txt",
        "MixedCase.Txt",
        "ReadMe.md",
        "with spaces.txt",
        "a+b=c;d,e[1].txt",
        ".hidden",
        "x.tar.gz",
        "name.with.many.dots",
        "NOEXT",
        "noext2",
        "FOO~1",
        "foo bar",
        "Program Files",
    ] {
        t.add(
            &format!("/names/{name}"),
            file(format!("content of {name}\n")),
        )
        .unwrap();
    }
    t.add(
        &format!("/names/{}.txt", "long".repeat(62)),
        file("longest name: 252 characters"),
    )
    .unwrap();
    // Unicode (BMP: mtools 4.0.32 renders characters outside the BMP as `_` per UTF-16 unit).
    for name in [
        "über.txt",
        "ñandú.conf",
        "日本語のファイル.txt",
        "Ελληνικά",
        "Ça va",
    ] {
        t.add(&format!("/unicode/{name}"), file(format!("{name}!")))
            .unwrap();
    }
    // Nesting, empty files and an empty directory.
    t.add("/a/b/c/d/e/f/g/deep file.txt", file("deep")).unwrap();
    t.add("/a/b/empty", file("")).unwrap();
    t.add("/EMPTY.DAT", file("")).unwrap();
    t.add("/empty dir", Entry::dir(0o755)).unwrap();
    // Several MiB from a host file (streamed), a sparse host file, and zeros made in code.
    let big = host.join("big");
    std::fs::write(&big, noise(3, (5 * MIB + 123) as usize)).unwrap();
    t.add(
        "/big/vmlinuz-6.1.0-28-amd64",
        Entry::file(
            Content::Host {
                path: big,
                len: 5 * MIB + 123,
            },
            0o644,
        ),
    )
    .unwrap();
    let sparse = host.join("sparse");
    {
        let f = File::create(&sparse).unwrap();
        f.set_len(3 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"in the middle", MIB + 77).unwrap();
    }
    t.add(
        "/big/sparse.img",
        Entry::file(
            Content::Host {
                path: sparse,
                len: 3 * MIB,
            },
            0o644,
        ),
    )
    .unwrap();
    t.add(
        "/big/zeros.bin",
        Entry::file(Content::Zeros { len: 2 * MIB + 1 }, 0o644),
    )
    .unwrap();
    // Many files in one directory: long generated short names up to `~2000`.
    for i in 0..2000 {
        t.add(
            &format!("/many/file-{i:04}.txt"),
            file(format!("file number {i}\n")),
        )
        .unwrap();
    }
    t
}

#[test]
fn esp_tree_passes_fsck_and_reads_back_through_mtools() {
    let dir = tempfile::tempdir().unwrap();
    let tree = esp_tree(dir.path());
    let size = fat32_min_size(&tree).unwrap();
    assert!(size.is_multiple_of(MIB));
    let img = image(
        dir.path(),
        "esp.img",
        &tree,
        size,
        &FatOptions::new("seed", EPOCH),
    );
    let summary = fsck_clean(&img);
    // Every Tree entry but the root is a file for fsck (directories included).
    assert!(
        summary.contains(&format!(": {} files,", tree.len())),
        "{summary}"
    );

    let dest = dir.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let img_arg = img.to_str().unwrap();
    mtool(
        "mcopy",
        &["-s", "-i", img_arg, "::/", dest.to_str().unwrap()],
    );
    let got = host_listing(&dest);
    let want = tree_listing(&tree);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "paths differ"
    );
    for (path, content) in &want {
        assert!(got[path] == *content, "{path}: content differs");
    }

    // blkid sees a FAT32 volume with our label and the serial derived from the seed.
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&img)
        .output()
        .unwrap();
    let probe = String::from_utf8_lossy(&out.stdout);
    let id = kiln::disk::derive_id("seed", "fat-serial");
    let serial = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
    for want in [
        "TYPE=vfat".to_string(),
        "VERSION=FAT32".to_string(),
        "LABEL=ESP".to_string(),
        format!("UUID={:04X}-{:04X}", serial >> 16, serial & 0xFFFF),
    ] {
        assert!(probe.lines().any(|l| l == want), "{want} not in\n{probe}");
    }

    // Short names, long names, label and timestamps as mdir shows them.
    let root = mtool("mdir", &["-i", img_arg, "-a", "::/"]);
    assert!(root.contains("Volume in drive : is ESP"), "{root}");
    let names = mtool("mdir", &["-i", img_arg, "-a", "::/names"]);
    let line = |short: &str| -> String {
        names
            .lines()
            .find(|l| l.starts_with(short))
            .unwrap_or_else(|| panic!("no {short:?} in\n{names}"))
            .to_string()
    };
    // Upper-case 8.3 names have no long name; others show theirs after the date.
    assert!(
        line("README   TXT").trim_end().ends_with("22:13"),
        "{names}"
    );
    assert!(line("NOEXT ").trim_end().ends_with("22:13"), "{names}");
    assert!(line("FOO~1 ").trim_end().ends_with("22:13"), "{names}");
    assert!(line("LOWER    TXT").ends_with(" lower.txt"), "{names}");
    assert!(line("MIXEDC~1 TXT").ends_with(" MixedCase.Txt"), "{names}");
    assert!(line("README   MD").ends_with(" ReadMe.md"), "{names}");
    assert!(
        line("WITHSP~1 TXT").ends_with(" with spaces.txt"),
        "{names}"
    );
    assert!(
        line("A_B_C_~1 TXT").ends_with(" a+b=c;d,e[1].txt"),
        "{names}"
    );
    assert!(line("HIDDEN~1").ends_with(" .hidden"), "{names}");
    assert!(line("XTAR~1   GZ").ends_with(" x.tar.gz"), "{names}");
    assert!(line("FOOBAR~1").ends_with(" foo bar"), "{names}");
    assert!(line("PROGRA~1").ends_with(" Program Files"), "{names}");
    assert!(
        line("README   TXT").contains("2023-11-14  22:13"),
        "{names}"
    );
    let many = mtool("mdir", &["-i", img_arg, "-a", "::/many"]);
    assert!(
        many.lines()
            .any(|l| l.starts_with("FILE-0~1 TXT") && l.ends_with(" file-0000.txt")),
        "{many}"
    );
    // 2,000 entries, each with its long name and a distinct short name.
    let entries: Vec<&str> = many.lines().filter(|l| l.contains(" file-")).collect();
    assert_eq!(entries.len(), 2000, "{many}");
    let shorts: std::collections::BTreeSet<&str> = entries.iter().map(|l| &l[..12]).collect();
    assert_eq!(shorts.len(), 2000, "short names repeat:\n{many}");
    assert!(
        entries.iter().any(|l| l.starts_with("FIL~1000 TXT")),
        "{many}"
    );
    let deep = mtool("mtype", &["-i", img_arg, "::/a/b/c/d/e/f/g/deep file.txt"]);
    assert_eq!(deep, "deep");
}

#[test]
fn names_outside_the_bmp_are_stored_as_surrogate_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add("/smile-😀.txt", file("smile")).unwrap();
    let img = image(
        dir.path(),
        "e.img",
        &tree,
        33 * MIB,
        &FatOptions::new("s", EPOCH),
    );
    fsck_clean(&img);
    // mtools 4.0.32 converts each UTF-16 unit on its own, so the two surrogates of U+1F600 show
    // as `__`: the name is 14 units long as FAT stores it.
    let listing = mtool("mdir", &["-i", img.to_str().unwrap(), "::/"]);
    assert!(listing.contains(" smile-__.txt"), "{listing}");
    let body = mtool("mtype", &["-i", img.to_str().unwrap(), "::/SMILE-~1.TXT"]);
    assert_eq!(body, "smile");
}

#[test]
fn same_tree_and_seed_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tree = esp_tree(dir.path());
    let size = fat32_min_size(&tree).unwrap();
    let digest = |name: &str, seed: &str| {
        let img = image(dir.path(), name, &tree, size, &FatOptions::new(seed, EPOCH));
        let digest = sha256(&img);
        std::fs::remove_file(&img).unwrap();
        digest
    };
    let a = digest("a.img", "seed");
    let b = digest("b.img", "seed");
    assert_eq!(a, b);
    let c = digest("c.img", "other seed");
    assert_ne!(a, c, "the volume serial comes from the seed");
}

/// Cluster size and (for the record) cluster count from a FAT32 boot sector.
fn bpb(img: &Path) -> (u8, u32, u32) {
    use std::io::Read;
    let mut bytes = [0u8; 512];
    File::open(img).unwrap().read_exact(&mut bytes).unwrap();
    let spc = bytes[13];
    let total = u32::from_le_bytes(bytes[32..36].try_into().unwrap());
    let fat = u32::from_le_bytes(bytes[36..40].try_into().unwrap());
    let reserved = u32::from(u16::from_le_bytes(bytes[14..16].try_into().unwrap()));
    let clusters = (total - reserved - 2 * fat) / u32::from(spc);
    (spc, clusters, reserved)
}

#[test]
fn cluster_size_matches_mkfs_vfat() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add("/EFI/BOOT/BOOTX64.EFI", file("x")).unwrap();
    for mib in [
        33, 100, 260, 261, 1024, 8192, 8193, 16384, 16385, 32768, 32769,
    ] {
        let size = mib * MIB;
        // Only the boot sectors, FAT heads and a few clusters are written: the file stays sparse.
        let ours = image(
            dir.path(),
            "ours.img",
            &tree,
            size,
            &FatOptions::new("s", EPOCH),
        );
        fsck_clean(&ours);
        let theirs = dir.path().join("mkfs.img");
        File::create(&theirs).unwrap().set_len(size).unwrap();
        let out = Command::new("mkfs.vfat")
            .args(["-F", "32"])
            .arg(&theirs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let (our_spc, our_clusters, _) = bpb(&ours);
        let (their_spc, their_clusters, their_reserved) = bpb(&theirs);
        assert_eq!(
            our_spc, their_spc,
            "{mib} MiB: sectors per cluster differ (ours {our_clusters} clusters, mkfs \
             {their_clusters} clusters, {their_reserved} reserved sectors)"
        );
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn min_size_is_tight() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..5 {
        tree.add(
            &format!("/data/part{i}.bin"),
            Entry::file(Content::Zeros { len: 9 * MIB + i }, 0o644),
        )
        .unwrap();
    }
    let size = fat32_min_size(&tree).unwrap();
    assert!(size > 45 * MIB && size.is_multiple_of(MIB), "{size}");
    let img = image(
        dir.path(),
        "min.img",
        &tree,
        size,
        &FatOptions::new("s", EPOCH),
    );
    fsck_clean(&img);
    let err = write_fat32(&tree, &mut Vec::new(), size - MIB, &FatOptions::default()).unwrap_err();
    assert!(matches!(err, FatError::NoSpace { .. }), "{err}");

    // An empty tree still needs the FAT32 minimum.
    assert_eq!(fat32_min_size(&Tree::new()).unwrap(), 33 * MIB);
}

#[test]
fn largest_file_fits_and_one_byte_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    tree.add(
        "/huge.bin",
        Entry::file(
            Content::Zeros {
                len: u64::from(u32::MAX) - 4095,
            },
            0o644,
        ),
    )
    .unwrap();
    let size = fat32_min_size(&tree).unwrap();
    let img = image(
        dir.path(),
        "huge.img",
        &tree,
        size,
        &FatOptions::new("s", EPOCH),
    );
    fsck_clean(&img);
    let listing = mtool("mdir", &["-i", img.to_str().unwrap(), "::/"]);
    assert!(listing.contains("4294963200"), "{listing}");
    std::fs::remove_file(&img).unwrap();

    // 4 GiB - 1 itself is written (and mtools reads its size), but fsck.vfat 4.2 computes the
    // chain length in 32 bits: 2^20 clusters of 4 KiB overflow to 0 and it reports a mismatch.
    // That is why the fsck check above uses the largest size below a whole 4 KiB cluster.
    let mut tree = Tree::new();
    tree.add(
        "/huge.bin",
        Entry::file(
            Content::Zeros {
                len: u64::from(u32::MAX),
            },
            0o644,
        ),
    )
    .unwrap();
    let img = image(
        dir.path(),
        "max.img",
        &tree,
        size,
        &FatOptions::new("s", EPOCH),
    );
    let listing = mtool("mdir", &["-i", img.to_str().unwrap(), "::/"]);
    assert!(listing.contains("4294967295"), "{listing}");
    std::fs::remove_file(&img).unwrap();

    tree.add(
        "/dir/too-big.bin",
        Entry::file(Content::Zeros { len: 1 << 32 }, 0o644),
    )
    .unwrap();
    let err = fat32_min_size(&tree).unwrap_err();
    assert!(matches!(err, FatError::FileTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("/dir/too-big.bin"), "{err}");
}

/// Write `tree` into memory; the error, after checking nothing was written.
fn refused(tree: &Tree, size: u64) -> FatError {
    let mut out = Vec::new();
    let err = write_fat32(tree, &mut out, size, &FatOptions::new("s", EPOCH)).unwrap_err();
    assert!(out.is_empty(), "wrote {} bytes before failing", out.len());
    err
}

#[test]
fn names_fat_cannot_hold_are_refused() {
    let long = "n".repeat(256);
    let bad = [
        "a\"b",
        "a*b",
        "a:b",
        "a<b",
        "a>b",
        "a?b",
        "a\\b",
        "a|b",
        "tab\tb",
        "bell\u{7}",
        "dot.",
        "space ",
        &long,
    ];
    for name in bad {
        let mut tree = Tree::new();
        tree.add(&format!("/dir/{name}"), file("x")).unwrap();
        let err = refused(&tree, 33 * MIB);
        assert!(matches!(err, FatError::BadName { .. }), "{name:?}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("/dir/{name}")), "{msg}");
    }
    let mut tree = Tree::new();
    tree.add("/EFI/Boot", Entry::dir(0o755)).unwrap();
    tree.add("/EFI/BOOT", Entry::dir(0o755)).unwrap();
    let err = refused(&tree, 33 * MIB);
    assert!(matches!(err, FatError::DuplicateName { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("/EFI/Boot") && msg.contains("/EFI/BOOT"),
        "{msg}"
    );
    let mut tree = Tree::new();
    tree.add("/Über", file("1")).unwrap();
    tree.add("/über", file("2")).unwrap();
    assert!(matches!(
        refused(&tree, 33 * MIB),
        FatError::DuplicateName { .. }
    ));
}

#[test]
fn entries_fat_cannot_hold_are_refused() {
    let cases = [
        (Entry::symlink("/target"), "symlink"),
        (
            Entry::new(EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
            "character device",
        ),
        (
            Entry::new(EntryKind::BlockDevice { major: 8, minor: 0 }, 0o660),
            "block device",
        ),
        (Entry::new(EntryKind::Fifo, 0o644), "fifo"),
        (Entry::new(EntryKind::Socket, 0o644), "socket"),
    ];
    for (entry, kind) in cases {
        let mut tree = Tree::new();
        tree.add("/EFI/odd", entry).unwrap();
        let err = refused(&tree, 33 * MIB);
        let msg = err.to_string();
        assert!(matches!(err, FatError::Unsupported { .. }), "{msg}");
        assert!(msg.contains("/EFI/odd") && msg.contains(kind), "{msg}");
    }
}

#[test]
fn too_much_content_and_too_small_partitions_are_refused() {
    let mut tree = Tree::new();
    tree.add("/small", file("x")).unwrap();
    tree.add(
        "/vmlinuz",
        Entry::file(Content::Zeros { len: 40 * MIB }, 0o644),
    )
    .unwrap();
    let err = refused(&tree, 33 * MIB);
    let FatError::NoSpace {
        path,
        needed,
        available,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(path, "/vmlinuz");
    assert!(*needed > 40 * MIB && *available < 33 * MIB, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&needed.to_string()) && msg.contains(&available.to_string()),
        "{msg}"
    );

    // More than 65,536 directory entries: each of these names takes 3 (two long-name parts).
    let mut tree = Tree::new();
    for i in 0..22_000 {
        tree.add(&format!("/crowded/a long file name {i:05}"), file(""))
            .unwrap();
    }
    let err = refused(&tree, 64 * MIB);
    assert!(matches!(err, FatError::DirTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("/crowded"), "{err}");

    let err = refused(&Tree::new(), 32 * MIB);
    assert!(matches!(err, FatError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("33"), "{err}");

    let mut opts = FatOptions::new("s", EPOCH);
    opts.label = "TOO LONG LABEL".into();
    let err = write_fat32(&Tree::new(), &mut Vec::new(), 33 * MIB, &opts).unwrap_err();
    assert!(matches!(err, FatError::BadLabel { .. }), "{err}");
}

#[test]
fn host_tree_with_a_fifo_is_refused() {
    // A host directory with a fifo (a device node needs root; the Tree path is the same).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("EFI")).unwrap();
    File::create(root.join("EFI/ok.txt"))
        .unwrap()
        .write_all(b"ok")
        .unwrap();
    let fifo = root.join("EFI/pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let tree = Tree::from_host_dir(&root).unwrap();
    let err = refused(&tree, 33 * MIB);
    assert!(err.to_string().contains("/EFI/pipe"), "{err}");
    assert!(err.to_string().contains("fifo"), "{err}");
}

/// kiln's own FAT32 reader (the agents' `direct` profile reads kernels out of ESPs with it)
/// gets back every file of a tree kiln wrote — long names, 8.3 names, nested directories, a
/// multi-cluster file — and mcopy (mtools) agrees on the bytes.
#[test]
fn the_reader_gets_back_what_the_writer_wrote() {
    use kiln::disk::read::Fat32;
    let dir = tempfile::tempdir().unwrap();
    let big = noise(7, 3 * 4096 + 17);
    let mut tree = Tree::new();
    for d in ["loader", "loader/entries", "Debian 12 kernel"] {
        tree.insert(TreePath::new(d).unwrap(), Entry::dir(0o755))
            .unwrap();
    }
    let files: [(&str, Vec<u8>); 4] = [
        (
            "loader/entries/kiln.conf",
            b"linux /kiln/vmlinuz\noptions quiet\n".to_vec(),
        ),
        ("Debian 12 kernel/vmlinuz-6.1.0-50-cloud-amd64", big.clone()),
        ("README.TXT", b"short name\n".to_vec()),
        ("empty", Vec::new()),
    ];
    for (p, bytes) in &files {
        tree.insert(TreePath::new(p).unwrap(), file(bytes.clone()))
            .unwrap();
    }
    let img = image(
        dir.path(),
        "esp.img",
        &tree,
        40 * MIB,
        &FatOptions::new("s", EPOCH),
    );
    let disk = File::open(&img).unwrap();
    let fat = Fat32::open(&disk, 0, 40 * MIB).unwrap();
    for (p, bytes) in &files {
        assert_eq!(&fat.read(p).unwrap(), bytes, "{p}");
        // Names are matched ignoring case, as FAT does.
        assert_eq!(&fat.read(&p.to_uppercase()).unwrap(), bytes, "{p}");
    }
    let mut root = fat.list("").unwrap();
    root.sort();
    assert_eq!(root, ["Debian 12 kernel", "README.TXT", "empty", "loader"]);
    assert_eq!(fat.list("loader/entries").unwrap(), ["kiln.conf"]);
    assert!(fat.read("loader/entries/missing.conf").is_err());
    assert!(fat.read("loader").is_err());
    // The second opinion: mtools reads the same bytes.
    let out = dir.path().join("kernel");
    let status = Command::new("mcopy")
        .arg("-i")
        .arg(&img)
        .arg("::Debian 12 kernel/vmlinuz-6.1.0-50-cloud-amd64")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(&out).unwrap(), big);
}
