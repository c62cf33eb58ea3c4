//! Files on the host: copying and listing directory trees, damaging a file the way a bad disk
//! does ([`flip_byte`]), a small file system to fill ([`Tmpfs`]), and reading a disk image with
//! the standard tools ([`extract_partition`], [`root_file`]).

use std::path::{Path, PathBuf};

/// Copy the directory `from` to `to` recursively (created as needed; regular files and
/// directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap_or_else(|err| {
                panic!("copy {} to {}: {err}", e.path().display(), dest.display())
            });
        }
    }
}

/// Every file under `dir`, recursively (none if it does not exist).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `text` (base64) with the digit in its middle changed (`A` ↔ another): the same length and
/// alphabet, other bytes once decoded.
pub fn change_base64_digit(text: &str) -> String {
    let mid = text.len() / 2;
    let other = if &text[mid..=mid] == "A" { "B" } else { "A" };
    format!("{}{other}{}", &text[..mid], &text[mid + 1..])
}

/// Flip every bit of the byte at `offset` of the file at `path` in place, keeping its size and
/// its modification time (as a bad disk sector would: nothing that looks at metadata notices).
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let meta = f.metadata().unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
    f.set_modified(meta.modified().unwrap()).unwrap();
    let after = std::fs::metadata(path).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (meta.len(), meta.modified().unwrap())
    );
}

/// A tmpfs of a given size mounted on a temp dir (root only), unmounted when dropped.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        super::run(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Change its size (`mount -o remount,size=…`): space freed, or taken away.
    pub fn resize(&self, size: &str) {
        super::run(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(self.dir.path()),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Copy partition `n` (1-based) out of a raw disk using sfdisk's table.
pub fn extract_partition(raw: &Path, n: usize, dest: &Path) {
    let json = super::run(std::process::Command::new("sfdisk").arg("--json").arg(raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let p = &v["partitiontable"]["partitions"][n - 1];
    let start = p["start"].as_u64().unwrap();
    let size = p["size"].as_u64().unwrap();
    super::run(
        std::process::Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .arg(format!("of={}", dest.display()))
            .args(["bs=512", "status=none", "conv=sparse"])
            .arg(format!("skip={start}"))
            .arg(format!("count={size}")),
    );
}

/// Files read out of the root partition (GPT name `root`) of a raw or qcow2 disk image, by
/// qemu-img, sfdisk and debugfs; `None` for a path that is not a regular file there.
pub fn root_files(image: &Path, paths: &[&str]) -> Vec<Option<Vec<u8>>> {
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("disk.raw");
    super::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&raw),
    );
    let json = super::run(std::process::Command::new("sfdisk").arg("--json").arg(&raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let n = v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .position(|p| p["name"] == "root")
        .expect("a partition named root");
    let part = work.path().join("root.img");
    extract_partition(&raw, n + 1, &part);
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let out = work.path().join(format!("file-{i}"));
            let _ = std::process::Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump {path} {}", out.display()))
                .arg(&part)
                .output()
                .unwrap();
            std::fs::read(&out).ok()
        })
        .collect()
}
