//! kiln's home directory: `$KILN_HOME` (default `~/.cache/kiln`), its content-addressed blob
//! store, atomic writes and the temp files behind them. Blobs are written to a temp file, hashed while streaming, and renamed to
//! `blobs/sha256/<hex>` only when complete, so a crash never leaves a partial blob under a digest.

use crate::digest::{Digest256, hash_file};
use crate::tree::Content;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// `$KILN_HOME`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`, else `/var/tmp/kiln`.
pub fn kiln_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KILN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join(".cache").join("kiln");
    }
    PathBuf::from("/var/tmp/kiln")
}

/// Content-addressed files under `<root>/blobs/sha256/`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// A store under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BlobStore { root: dir.into() }
    }

    /// The store in `$KILN_HOME`.
    pub fn default_store() -> Self {
        Self::new(kiln_home())
    }

    fn dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// Where a blob lives (whether or not it exists).
    pub fn path(&self, digest: &Digest256) -> PathBuf {
        self.dir().join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest256) -> bool {
        self.path(digest).is_file()
    }

    /// Stream `reader` into the store; returns its digest and length. Nothing appears under the
    /// digest until all bytes are written and synced.
    pub fn put(&self, reader: &mut dyn Read) -> io::Result<(Digest256, u64)> {
        self.put_inner(reader, true)
    }

    /// As [`BlobStore::put`], without syncing each blob: for importing many small files (a
    /// Debian base has ~12,000), whose importer calls [`BlobStore::sync`] once before it records
    /// anything that names them.
    pub fn put_unsynced(&self, reader: &mut dyn Read) -> io::Result<(Digest256, u64)> {
        self.put_inner(reader, false)
    }

    /// Flush every blob written so far to the disk (`syncfs` of the store's filesystem).
    pub fn sync(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let dir = File::open(self.dir())?;
        // SAFETY: syncfs on a valid, owned descriptor has no memory effects.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn put_inner(&self, reader: &mut dyn Read, sync: bool) -> io::Result<(Digest256, u64)> {
        let dir = self.dir();
        fs::create_dir_all(&dir)?;
        let mut tmp = temp_file_in(&dir)?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        // One buffer per thread, taken while in use: a package's thousands of small files do not
        // each zero 1 MiB.
        thread_local! {
            static BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut buf = BUF.take();
        buf.resize(1 << 20, 0);
        let copied = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            hasher.update(&buf[..n]);
            if let Err(e) = tmp.write_all(&buf[..n]) {
                break Err(e);
            }
            len += n as u64;
        };
        BUF.set(buf);
        copied?;
        let digest = Digest256::from_sha256(&hasher.finalize());
        let dest = self.path(&digest);
        if dest.is_file() {
            touch(&dest);
            return Ok((digest, len));
        }
        if sync {
            tmp.as_file().sync_all()?;
        }
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok((digest, len))
    }

    /// Move the finished file at `path` into the store under its digest (hashed here), synced:
    /// no second copy of a large image is written. `path` is gone afterwards. On another
    /// filesystem than the store, the file is copied in instead (and then removed).
    pub fn put_file(&self, path: &Path) -> io::Result<(Digest256, u64)> {
        let mut file = File::open(path)?;
        let (digest, len) = hash_file(&mut file)?;
        let dest = self.path(&digest);
        if dest.is_file() {
            touch(&dest);
            fs::remove_file(path)?;
            return Ok((digest, len));
        }
        file.sync_all()?;
        fs::create_dir_all(self.dir())?;
        match fs::rename(path, &dest) {
            Ok(()) => Ok((digest, len)),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                file.seek(SeekFrom::Start(0))?;
                let stored = self.put(&mut file)?;
                fs::remove_file(path)?;
                Ok(stored)
            }
            Err(e) => Err(e),
        }
    }

    /// Store bytes.
    pub fn put_bytes(&self, bytes: &[u8]) -> io::Result<(Digest256, u64)> {
        self.put(&mut &bytes[..])
    }

    /// Store a stream and return it as Tree content (a host file in the store).
    pub fn put_content(&self, reader: &mut dyn Read) -> io::Result<Content> {
        let (digest, len) = self.put(reader)?;
        Ok(Content::Host {
            path: self.path(&digest),
            len,
        })
    }

    /// Hash a blob now (no memoized stamp): for bytes about to be booted, signed, pushed,
    /// uploaded or delivered. A blob whose bytes no longer match its digest is removed (so that
    /// it is fetched or made again) and reported as [`BlobState::Corrupt`].
    pub fn check(&self, digest: &Digest256) -> io::Result<BlobState> {
        let path = self.path(digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(e),
        };
        let (actual, _) = hash_file(&mut file)?;
        if &actual == digest {
            return Ok(BlobState::Intact);
        }
        tracing::warn!(
            "blob {} hashes to {actual}, not {digest}: removing the corrupt copy",
            path.display()
        );
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(BlobState::Corrupt(actual))
    }

    /// Open a blob, checking that it is present.
    pub fn open(&self, digest: &Digest256) -> io::Result<File> {
        File::open(self.path(digest))
    }
}

/// What [`BlobStore::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobState {
    /// Present, and its bytes hash to its digest.
    Intact,
    /// Not in the store.
    Missing,
    /// Its bytes hashed to this other digest; the file was removed.
    Corrupt(Digest256),
}

/// Set a file's modification time to now: a blob or record written again, or used, is recent
/// for collections (`gc`), which keep what running builds use and remove the least recently used
/// first. Best effort: a file that cannot be touched is only collected earlier.
pub fn touch(path: &Path) {
    if let Ok(f) = File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename), as an
/// ordinary 0644 file (not the temp file's 0600): nothing written this way is a secret.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp = temp_file_in(dir)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The prefix of every temp file and directory kiln creates under `$KILN_HOME`:
/// `.kiln-tmp-<pid>-`. It names the process, so a process started later can tell what a killed
/// one left behind (see [`sweep_stale_temp`]) from what a live one is still writing.
pub fn temp_prefix() -> String {
    format!("{TEMP_PREFIX}{}-", std::process::id())
}

const TEMP_PREFIX: &str = ".kiln-tmp-";

/// A temp file in `dir` named with [`temp_prefix`].
pub fn temp_file_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&temp_prefix())
        .tempfile_in(dir)
}

/// The pid in a name made with [`temp_prefix`].
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

/// True unless the process surely no longer exists (without `/proc`, every process counts as
/// alive, so nothing is removed).
pub(crate) fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Remove the temp files and directories that processes no longer running left in `$KILN_HOME`
/// (a worker killed while writing an image or a blob): in `tmp/`, `blobs/sha256/` and each
/// `stages/<stage>/`. Returns what was removed. Entries of live processes are left alone, so
/// workers sharing a home may run this at any time.
pub fn sweep_stale_temp(home: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = vec![home.join("tmp"), home.join("blobs").join("sha256")];
    if let Ok(rd) = fs::read_dir(home.join("stages")) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut removed = Vec::new();
    for dir in dirs {
        let entries = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(temp_owner) else {
                continue;
            };
            if pid == std::process::id() || process_alive(pid) {
                continue;
            }
            let path = entry.path();
            let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_file_moves_the_file_in_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let image = dir.path().join("image");
        fs::write(&image, b"disk bytes").unwrap();
        let (d, n) = store.put_file(&image).unwrap();
        assert_eq!((d.clone(), n), store.put_bytes(b"disk bytes").unwrap());
        assert!(!image.exists(), "the file was moved, not copied");
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"disk bytes");
        // The same content again: the stored blob is kept, the new file removed.
        fs::write(&image, b"disk bytes").unwrap();
        assert_eq!(store.put_file(&image).unwrap().0, d);
        assert!(!image.exists());
        assert!(
            store.put_file(&image).is_err(),
            "a missing file is an error"
        );
    }

    #[test]
    fn check_removes_a_blob_whose_bytes_changed() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let (d, _) = store.put_bytes(b"disk bytes").unwrap();
        assert_eq!(store.check(&d).unwrap(), BlobState::Intact);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(store.path(&d))
            .unwrap();
        f.write_all_at(b"D", 0).unwrap();
        drop(f);
        assert_eq!(
            store.check(&d).unwrap(),
            BlobState::Corrupt(Digest256::of(b"Disk bytes"))
        );
        assert!(!store.contains(&d), "the corrupt copy is gone");
        assert_eq!(store.check(&d).unwrap(), BlobState::Missing);
    }

    #[test]
    fn write_atomic_makes_an_ordinary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        write_atomic(&p, b"{}").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(fs::read(&p).unwrap(), b"{}");
    }

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let (d1, n) = store.put_bytes(b"hello").unwrap();
        let (d2, _) = store.put_bytes(b"hello").unwrap();
        assert_eq!(d1, d2);
        assert_eq!(n, 5);
        assert_eq!(
            d1.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(fs::read(store.path(&d1)).unwrap(), b"hello");
        // Only the blob remains in the directory: no temp files.
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            1
        );
        assert!(Digest256::parse(d1.as_str()).is_some());
        assert!(Digest256::parse("sha256:XYZ").is_none());
    }

    #[test]
    fn sweep_removes_only_what_dead_processes_left() {
        let home = tempfile::tempdir().unwrap();
        // A pid that surely ended: a child that ran and was reaped.
        let dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        let mut dead = dead;
        dead.wait().unwrap();
        let tmp = home.path().join("tmp");
        let blobs = home.path().join("blobs/sha256");
        let stages = home.path().join("stages/disk");
        for d in [&tmp, &blobs, &stages] {
            fs::create_dir_all(d).unwrap();
        }
        let stale_dir = tmp.join(format!(".kiln-tmp-{dead_pid}-image-abc"));
        fs::create_dir_all(&stale_dir).unwrap();
        fs::write(stale_dir.join("disk"), b"partial").unwrap();
        let stale_blob = blobs.join(format!(".kiln-tmp-{dead_pid}-xyz"));
        fs::write(&stale_blob, b"partial").unwrap();
        let stale_record = stages.join(format!(".kiln-tmp-{dead_pid}-r"));
        fs::write(&stale_record, b"{").unwrap();
        let mine = temp_file_in(&blobs).unwrap();
        let foreign = blobs.join(".tmpABCDEF");
        fs::write(&foreign, b"not ours to judge").unwrap();
        let (digest, _) = BlobStore::new(home.path()).put_bytes(b"kept").unwrap();

        let mut removed = sweep_stale_temp(home.path()).unwrap();
        removed.sort();
        let mut expected = vec![stale_dir, stale_blob, stale_record];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(mine.path().is_file());
        assert!(foreign.is_file());
        assert!(BlobStore::new(home.path()).contains(&digest));
        assert!(
            sweep_stale_temp(&home.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }
}
