//! Files on the host: copying and listing directory trees, damaging a file the way a bad disk
//! does ([`flip_byte`]), and a small file system to fill ([`Tmpfs`]).

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
