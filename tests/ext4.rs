//! ext4 writer tests: build trees, write images, and check them with the real e2fsprogs tools
//! (e2fsck, debugfs, dumpe2fs).

use std::path::Path;
use std::process::Command;

use kiln::disk::ext4::{Ext4Error, Ext4Options, ext4_min_size, write_ext4};
use kiln::tree::{Content, Entry, EntryKind, Tree, TreePath};

fn opts() -> Ext4Options {
    Ext4Options {
        seed: "test-seed".into(),
        label: "root".into(),
        epoch: 1_700_000_000,
    }
}

fn write_image(tree: &Tree, path: &Path, size: u64) -> Result<kiln::disk::ext4::Ext4Report, Ext4Error> {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut file = file;
    write_ext4(tree, &mut file, size, &opts())
}

fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn e2fsck_clean(img: &Path) {
    let (code, out, err) = run("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert_eq!(code, 0, "e2fsck failed:\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    // Pass headers and the summary only: anything else is a reported problem.
    for l in &lines {
        let ok = l.starts_with("Pass ")
            || (l.contains(" files (") && l.ends_with(" blocks"))
            || l.is_empty()
            || l.starts_with("e2fsck ");
        assert!(ok, "e2fsck reported: {l}\n{out}\n{err}");
    }
}

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tree::new();
    t.add("/etc/hostname", Entry::file(Content::inline("kiln\n"), 0o644)).unwrap();
    t.add("/bin/sh", Entry::symlink("busybox")).unwrap();
    let img = dir.path().join("a.img");
    write_image(&t, &img, 64 << 20).unwrap();
    e2fsck_clean(&img);
}
