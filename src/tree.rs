//! The Tree: an image's file tree as data.
//!
//! A [`Tree`] holds entries keyed by normalized path (sorted, so every writer walks them in the same
//! order), each with a kind, mode, owner, mtime, xattrs and — for regular files — a [`Content`]
//! that is streamed when a writer needs it, never held whole in memory unless it was given inline.
//! Trees are built in code, from a host directory, or from a tar stream (owners from the archive,
//! not from the builder). Nothing here touches a disk image; the filesystem writers read the Tree.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors building or checking a Tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("invalid path {path:?} in the image: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path}: parent {parent} is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("{path}: hard link to {target}, which is not in the tree (add the target first)")]
    MissingLinkTarget { path: String, target: String },
    #[error(
        "{path}: hard link to {target}, which is a {kind} (only non-directories can be hard linked)"
    )]
    BadLinkTarget {
        path: String,
        target: String,
        kind: &'static str,
    },
    #[error("{path}: cannot replace a directory that has entries with a non-directory")]
    ReplaceDir { path: String },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unsupported file type on the host ({what})")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error(
        "tar stream: {what} (limit {limit}); refusing the archive as corrupt or hostile, nothing \
         of it was kept"
    )]
    TarLimit { what: String, limit: u64 },
    #[error("tar stream: {context}")]
    Tar {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Most entries one tar stream may add to a Tree (a whole Debian desktop has ~300,000 files; the
/// largest single Debian packages ~100,000). Each entry costs memory, so a stream of millions of
/// tiny headers is refused.
pub const MAX_TAR_ENTRIES: u64 = 1_000_000;

/// Longest path (or link target) a tar entry may have, in bytes: Linux's `PATH_MAX`.
pub const MAX_TAR_PATH: usize = 4096;

/// Most bytes of holes the GNU sparse entries of one tar stream may add. Holes are zeros that
/// the archive does not hold, so they escape the caller's count of bytes read from the stream:
/// a few hundred bytes of header could otherwise describe an exabyte of zeros for the blob
/// store to write.
pub const MAX_TAR_SPARSE_HOLES: u64 = 1 << 30;

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> TreeError {
    let path = path.into();
    move |source| TreeError::Io { path, source }
}

/// A normalized path inside the image: `/`-separated components, no leading `/`, no `.`, `..` or
/// empty components, no NUL. The root directory is the empty path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreePath(String);

impl TreePath {
    /// The root directory.
    pub fn root() -> Self {
        TreePath(String::new())
    }

    /// Parse an absolute (`/etc/passwd`) or root-relative (`etc/passwd`) path. `..` and `.`
    /// components are rejected rather than resolved, so no path can escape the image root.
    pub fn new(path: &str) -> Result<Self, TreeError> {
        let invalid = |reason| TreeError::InvalidPath {
            path: path.to_string(),
            reason,
        };
        if path.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let trimmed = path.trim_start_matches('/');
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Ok(Self::root());
        }
        for component in trimmed.split('/') {
            match component {
                "" => return Err(invalid("has an empty component (`//`)")),
                "." => return Err(invalid("has a `.` component")),
                ".." => {
                    return Err(invalid(
                        "has a `..` component; paths cannot leave the image root",
                    ));
                }
                _ => {}
            }
        }
        Ok(TreePath(trimmed.to_string()))
    }

    /// The path without a leading slash (`""` for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent directory, or `None` for the root.
    pub fn parent(&self) -> Option<TreePath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => TreePath(self.0[..i].to_string()),
            None => TreePath::root(),
        })
    }

    /// The last component (`""` for the root).
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// This path with one more component appended.
    pub fn join(&self, name: &str) -> Result<TreePath, TreeError> {
        if self.is_root() {
            TreePath::new(name)
        } else {
            TreePath::new(&format!("{}/{}", self.0, name))
        }
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.split('/').count()
        }
    }
}

impl fmt::Display for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

impl fmt::Debug for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"/{}\"", self.0)
    }
}

/// Where a regular file's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Bytes held in memory (templates, small generated files).
    Inline(Arc<[u8]>),
    /// A file on the host (a host tree, or a content-addressed blob in the cache). Read when a
    /// writer needs it; holes in a sparse host file stay holes.
    Host { path: PathBuf, len: u64 },
    /// `len` bytes of zeros that occupy no space (a sparse file made in code).
    Zeros { len: u64 },
}

impl Content {
    pub fn inline(bytes: impl Into<Vec<u8>>) -> Self {
        Content::Inline(Arc::from(bytes.into().into_boxed_slice()))
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Content::Inline(b) => b.len() as u64,
            Content::Host { len, .. } | Content::Zeros { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open the content for sequential reading.
    pub fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Content::Inline(b) => Box::new(io::Cursor::new(&b[..])),
            Content::Host { path, len } => Box::new(File::open(path)?.take(*len)),
            Content::Zeros { len } => Box::new(io::repeat(0).take(*len)),
        })
    }

    /// The byte ranges that hold data, as `(offset, length)`, ascending; everything else reads as
    /// zeros and may be left as a hole. A host file is asked with SEEK_DATA/SEEK_HOLE; inline
    /// content is one range.
    pub fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        match self {
            Content::Inline(b) if b.is_empty() => Ok(Vec::new()),
            Content::Inline(b) => Ok(vec![(0, b.len() as u64)]),
            Content::Zeros { .. } => Ok(Vec::new()),
            Content::Host { path, len } => host_data_ranges(path, *len),
        }
    }

    /// Read up to `buf.len()` bytes at `offset` (short only at the end of the content). Opens a
    /// host file for this one read: writers reading a file in chunks use [`Content::reader`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.reader()?.read_at(offset, buf)
    }

    /// A positioned reader that keeps a host file open across reads.
    pub fn reader(&self) -> io::Result<ContentReader<'_>> {
        let file = match self {
            Content::Host { path, .. } => Some(File::open(path)?),
            _ => None,
        };
        Ok(ContentReader {
            content: self,
            file,
        })
    }
}

/// Reads a [`Content`] at offsets; see [`Content::reader`].
pub struct ContentReader<'a> {
    content: &'a Content,
    file: Option<File>,
}

impl ContentReader<'_> {
    /// Read up to `buf.len()` bytes at `offset` (short only at the end of the content).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match (self.content, &self.file) {
            (Content::Inline(b), _) => {
                let start = (offset as usize).min(b.len());
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
                Ok(n)
            }
            (Content::Zeros { len }, _) => {
                let n = (buf.len() as u64).min(len.saturating_sub(offset)) as usize;
                buf[..n].fill(0);
                Ok(n)
            }
            (Content::Host { path, len }, file) => {
                use std::os::unix::fs::FileExt;
                let file = file
                    .as_ref()
                    .ok_or_else(|| io::Error::other("host file not open"))?;
                let want = (buf.len() as u64).min(len.saturating_sub(offset)) as usize;
                let mut done = 0;
                while done < want {
                    let n = file.read_at(&mut buf[done..want], offset + done as u64)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{} is shorter than {len} bytes", path.display()),
                        ));
                    }
                    done += n;
                }
                Ok(done)
            }
        }
    }
}

fn host_data_ranges(path: &Path, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(Vec::new());
    }
    let file = File::open(path)?;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a valid, owned file descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges),
                // Filesystems without SEEK_DATA: the whole file is data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, len)]),
                _ => Err(err),
            };
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(len);
        ranges.push((data, hole - data));
        pos = hole;
    }
    Ok(ranges)
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File(Content),
    Dir,
    Symlink {
        target: String,
    },
    /// Another name for the non-directory at `target` (same inode).
    HardLink {
        target: TreePath,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::File(_) => "regular file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::HardLink { .. } => "hard link",
            EntryKind::CharDevice { .. } => "character device",
            EntryKind::BlockDevice { .. } => "block device",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
        }
    }

    /// The `S_IFMT` bits of this kind (hard links report those of a regular file; writers resolve
    /// them through [`Tree::resolve_link`]).
    pub fn format_bits(&self) -> u32 {
        match self {
            EntryKind::File(_) | EntryKind::HardLink { .. } => 0o100000,
            EntryKind::Dir => 0o040000,
            EntryKind::Symlink { .. } => 0o120000,
            EntryKind::CharDevice { .. } => 0o020000,
            EntryKind::BlockDevice { .. } => 0o060000,
            EntryKind::Fifo => 0o010000,
            EntryKind::Socket => 0o140000,
        }
    }
}

/// One entry of the Tree. `mode` holds the permission bits only (`0o7777`: setuid, setgid,
/// sticky and rwx); the type is `kind`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes by full name (`security.capability`, `user.foo`, …).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    pub fn new(kind: EntryKind, mode: u32) -> Self {
        Entry {
            kind,
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }

    pub fn dir(mode: u32) -> Self {
        Entry::new(EntryKind::Dir, mode)
    }

    pub fn file(content: Content, mode: u32) -> Self {
        Entry::new(EntryKind::File(content), mode)
    }

    pub fn symlink(target: impl Into<String>) -> Self {
        Entry::new(
            EntryKind::Symlink {
                target: target.into(),
            },
            0o777,
        )
    }

    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: i64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.insert(name.into(), value.into());
        self
    }

    /// `S_IFMT | permission bits`, as stored in an inode.
    pub fn full_mode(&self) -> u32 {
        self.kind.format_bits() | (self.mode & 0o7777)
    }
}

/// The image's file tree. Always contains the root directory. Iteration is in path order, which
/// puts every directory before its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<TreePath, Entry>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// A tree with only the root directory (0755, root:root).
    pub fn new() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(TreePath::root(), Entry::dir(0o755));
        Tree { entries }
    }

    /// Insert or replace an entry. Missing parent directories are created (0755, root:root,
    /// mtime of the entry). Replacing a directory keeps its children only if the new entry is a
    /// directory too.
    pub fn insert(&mut self, path: TreePath, entry: Entry) -> Result<(), TreeError> {
        self.ensure_parents(&path, entry.mtime)?;
        if let Some(old) = self.entries.get(&path)
            && matches!(old.kind, EntryKind::Dir)
            && !matches!(entry.kind, EntryKind::Dir)
            && self.children(&path).next().is_some()
        {
            return Err(TreeError::ReplaceDir {
                path: path.to_string(),
            });
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Insert by string path (convenience for code and tests).
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), TreeError> {
        self.insert(TreePath::new(path)?, entry)
    }

    fn ensure_parents(&mut self, path: &TreePath, mtime: i64) -> Result<(), TreeError> {
        let mut missing = Vec::new();
        let mut cur = path.parent();
        while let Some(p) = cur {
            match self.entries.get(&p) {
                Some(e) if matches!(e.kind, EntryKind::Dir) => break,
                Some(_) => {
                    return Err(TreeError::ParentNotDir {
                        path: path.to_string(),
                        parent: p.to_string(),
                    });
                }
                None => {
                    cur = p.parent();
                    missing.push(p);
                }
            }
        }
        for p in missing {
            self.entries.insert(p, Entry::dir(0o755).mtime(mtime));
        }
        Ok(())
    }

    /// Remove an entry and everything under it.
    pub fn remove(&mut self, path: &TreePath) {
        if path.is_root() {
            return;
        }
        let under: Vec<TreePath> = self.descendants(path).map(|(p, _)| p.clone()).collect();
        for p in under {
            self.entries.remove(&p);
        }
        self.entries.remove(path);
    }

    pub fn get(&self, path: &TreePath) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn get_mut(&mut self, path: &TreePath) -> Option<&mut Entry> {
        self.entries.get_mut(path)
    }

    /// All entries in path order (the root first).
    pub fn iter(&self) -> impl Iterator<Item = (&TreePath, &Entry)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&TreePath, &mut Entry)> {
        self.entries.iter_mut()
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() <= 1
    }

    /// Every entry strictly below `dir`, in path order.
    pub fn descendants<'a>(
        &'a self,
        dir: &TreePath,
    ) -> impl Iterator<Item = (&'a TreePath, &'a Entry)> + 'a {
        use std::ops::Bound;
        let prefix = if dir.is_root() {
            String::new()
        } else {
            format!("{}/", dir.as_str())
        };
        // Everything under `dir/` is contiguous in byte order, starting at `dir/` itself.
        let start = if dir.is_root() {
            Bound::Excluded(TreePath::root())
        } else {
            Bound::Included(TreePath(prefix.clone()))
        };
        self.entries
            .range((start, Bound::Unbounded))
            .take_while(move |(p, _)| p.as_str().starts_with(&prefix))
    }

    /// The direct children of `dir`, in name order (bytewise).
    pub fn children<'a>(
        &'a self,
        dir: &TreePath,
    ) -> impl Iterator<Item = (&'a TreePath, &'a Entry)> + 'a {
        let depth = dir.depth() + 1;
        self.descendants(dir)
            .filter(move |(p, _)| p.depth() == depth)
    }

    /// Follow a hard link to the entry that owns the inode. Errors if the target is missing or is
    /// a directory.
    pub fn resolve_link<'a>(&'a self, path: &TreePath) -> Result<&'a TreePath, TreeError> {
        let Some((key, entry)) = self.entries.get_key_value(path) else {
            return Err(TreeError::MissingLinkTarget {
                path: path.to_string(),
                target: path.to_string(),
            });
        };
        match &entry.kind {
            EntryKind::HardLink { target } => match self.entries.get_key_value(target) {
                None => Err(TreeError::MissingLinkTarget {
                    path: path.to_string(),
                    target: target.to_string(),
                }),
                Some((_, e)) if matches!(e.kind, EntryKind::Dir | EntryKind::HardLink { .. }) => {
                    Err(TreeError::BadLinkTarget {
                        path: path.to_string(),
                        target: target.to_string(),
                        kind: e.kind.name(),
                    })
                }
                Some((k, _)) => Ok(k),
            },
            _ => Ok(key),
        }
    }

    /// Check the invariants writers rely on: every hard link points at an existing non-directory,
    /// non-link entry.
    pub fn validate(&self) -> Result<(), TreeError> {
        for (path, entry) in &self.entries {
            if let EntryKind::HardLink { .. } = entry.kind {
                self.resolve_link(path)?;
            }
        }
        Ok(())
    }

    /// Set every mtime later than `epoch` to `epoch` (SOURCE_DATE_EPOCH clamping).
    pub fn clamp_mtimes(&mut self, epoch: i64) {
        for entry in self.entries.values_mut() {
            if entry.mtime > epoch {
                entry.mtime = epoch;
            }
        }
    }

    /// Number of names that refer to each inode owner (1 + hard links to it).
    pub fn link_counts(&self) -> BTreeMap<TreePath, u32> {
        let mut counts = BTreeMap::new();
        for entry in self.entries.values() {
            if let EntryKind::HardLink { target } = &entry.kind {
                *counts.entry(target.clone()).or_insert(1) += 1;
            }
        }
        counts
    }

    /// Sum of regular file content lengths (hard links counted once).
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                EntryKind::File(c) => c.len(),
                _ => 0,
            })
            .sum()
    }

    /// Read a host directory. Owners, modes, mtimes and xattrs come from the host; file contents
    /// stay on the host and are read when written. Files that share an inode become hard links to
    /// the first path (in path order) that names it.
    pub fn from_host_dir(root: &Path) -> Result<Tree, TreeError> {
        let mut tree = Tree::new();
        let meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
        if !meta.is_dir() {
            return Err(TreeError::Io {
                path: root.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let mut root_entry = Entry::dir(meta.mode());
        root_entry.uid = meta.uid();
        root_entry.gid = meta.gid();
        root_entry.mtime = meta.mtime();
        root_entry.xattrs = read_host_xattrs(root)?;
        tree.entries.insert(TreePath::root(), root_entry);
        let mut inodes: BTreeMap<(u64, u64), TreePath> = BTreeMap::new();
        tree.walk_host(root, &TreePath::root(), &mut inodes)?;
        Ok(tree)
    }

    fn walk_host(
        &mut self,
        dir: &Path,
        at: &TreePath,
        inodes: &mut BTreeMap<(u64, u64), TreePath>,
    ) -> Result<(), TreeError> {
        let mut names = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let item = item.map_err(io_err(dir))?;
            names.push(item.file_name());
        }
        names.sort();
        for name in names {
            let host = dir.join(&name);
            let name = name.to_str().ok_or_else(|| TreeError::InvalidPath {
                path: host.display().to_string(),
                reason: "is not valid UTF-8",
            })?;
            let path = at.join(name)?;
            let meta = std::fs::symlink_metadata(&host).map_err(io_err(&host))?;
            let ft = meta.file_type();
            let key = (meta.dev(), meta.ino());
            let kind = if ft.is_dir() {
                EntryKind::Dir
            } else if meta.nlink() > 1 && inodes.contains_key(&key) {
                EntryKind::HardLink {
                    target: inodes[&key].clone(),
                }
            } else if ft.is_file() {
                EntryKind::File(Content::Host {
                    path: host.clone(),
                    len: meta.len(),
                })
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&host).map_err(io_err(&host))?;
                let target = target.to_str().ok_or_else(|| TreeError::InvalidPath {
                    path: host.display().to_string(),
                    reason: "symlink target is not valid UTF-8",
                })?;
                EntryKind::Symlink {
                    target: target.to_string(),
                }
            } else if ft.is_char_device() {
                let (major, minor) = split_dev(meta.rdev());
                EntryKind::CharDevice { major, minor }
            } else if ft.is_block_device() {
                let (major, minor) = split_dev(meta.rdev());
                EntryKind::BlockDevice { major, minor }
            } else if ft.is_fifo() {
                EntryKind::Fifo
            } else if ft.is_socket() {
                EntryKind::Socket
            } else {
                return Err(TreeError::Unsupported {
                    path: host,
                    what: "unknown type",
                });
            };
            if !ft.is_dir() && meta.nlink() > 1 && !inodes.contains_key(&key) {
                inodes.insert(key, path.clone());
            }
            let is_link = matches!(kind, EntryKind::HardLink { .. });
            let entry = Entry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                xattrs: if ft.is_symlink() || is_link {
                    BTreeMap::new()
                } else {
                    read_host_xattrs(&host)?
                },
            };
            self.entries.insert(path.clone(), entry);
            if ft.is_dir() {
                self.walk_host(&host, &path, inodes)?;
            }
        }
        Ok(())
    }

    /// Read a tar stream (ustar, GNU or pax; pax `SCHILY.xattr.*` records become xattrs). Owners
    /// and modes come from the archive. File contents are streamed into `blobs`, which returns
    /// the [`Content`] to record (e.g. a content-addressed file in the cache). Later entries
    /// replace earlier ones with the same path, as tar extraction does.
    pub fn extend_from_tar<R: Read>(
        &mut self,
        reader: R,
        blobs: &mut dyn FnMut(&mut dyn Read, u64) -> io::Result<Content>,
    ) -> Result<(), TreeError> {
        let tar_err = |context: String| move |source| TreeError::Tar { context, source };
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(tar_err("reading the archive".into()))?;
        let mut count = 0u64;
        let mut holes = 0u64;
        for item in entries {
            let mut item = item.map_err(tar_err("reading an entry header".into()))?;
            count += 1;
            if count > MAX_TAR_ENTRIES {
                return Err(TreeError::TarLimit {
                    what: format!("more than {MAX_TAR_ENTRIES} entries"),
                    limit: MAX_TAR_ENTRIES,
                });
            }
            let raw_path = item
                .path()
                .map_err(tar_err("reading an entry path".into()))?
                .to_string_lossy()
                .into_owned();
            if raw_path.len() > MAX_TAR_PATH {
                return Err(TreeError::TarLimit {
                    what: format!(
                        "entry {count} has a path of {} bytes ({}…)",
                        raw_path.len(),
                        raw_path.chars().take(60).collect::<String>()
                    ),
                    limit: MAX_TAR_PATH as u64,
                });
            }
            let raw_path = raw_path.strip_prefix("./").unwrap_or(&raw_path).to_string();
            if raw_path == "." || raw_path.is_empty() {
                // The archive's root: take its owner and mode.
                let header = item.header();
                let root = self.entries.get_mut(&TreePath::root()).ok_or_else(|| {
                    TreeError::InvalidPath {
                        path: "/".into(),
                        reason: "tree has no root",
                    }
                })?;
                root.mode = header.mode().unwrap_or(0o755) & 0o7777;
                root.uid = header.uid().unwrap_or(0) as u32;
                root.gid = header.gid().unwrap_or(0) as u32;
                root.mtime = header.mtime().unwrap_or(0) as i64;
                continue;
            }
            let path = TreePath::new(&raw_path)?;
            let mut xattrs = BTreeMap::new();
            if let Some(exts) = item
                .pax_extensions()
                .map_err(tar_err(format!("{path}: reading pax headers")))?
            {
                for ext in exts {
                    let ext = ext.map_err(tar_err(format!("{path}: reading a pax header")))?;
                    if let Ok(key) = ext.key()
                        && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                    {
                        xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
                    }
                }
            }
            let header = item.header().clone();
            let mode = header
                .mode()
                .map_err(tar_err(format!("{path}: reading mode")))?;
            let uid = header
                .uid()
                .map_err(tar_err(format!("{path}: reading uid")))? as u32;
            let gid = header
                .gid()
                .map_err(tar_err(format!("{path}: reading gid")))? as u32;
            let mtime = header
                .mtime()
                .map_err(tar_err(format!("{path}: reading mtime")))? as i64;
            let link_name = || -> Result<String, TreeError> {
                let target = item
                    .link_name()
                    .map_err(tar_err(format!("{path}: reading link name")))?
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if target.len() > MAX_TAR_PATH {
                    return Err(TreeError::TarLimit {
                        what: format!("{path}: link target of {} bytes", target.len()),
                        limit: MAX_TAR_PATH as u64,
                    });
                }
                Ok(target)
            };
            let dev = || -> (u32, u32) {
                (
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                )
            };
            use tar::EntryType as T;
            let kind = match header.entry_type() {
                T::Regular | T::Continuous | T::GNUSparse => {
                    let len = item.size();
                    if header.entry_type() == T::GNUSparse {
                        let stored = header
                            .entry_size()
                            .map_err(tar_err(format!("{path}: reading size")))?;
                        holes = holes.saturating_add(len.saturating_sub(stored));
                        if holes > MAX_TAR_SPARSE_HOLES {
                            return Err(TreeError::TarLimit {
                                what: format!(
                                    "{path}: the holes of sparse files (zeros the archive does \
                                     not hold) add up to too many bytes"
                                ),
                                limit: MAX_TAR_SPARSE_HOLES,
                            });
                        }
                    }
                    let content = blobs(&mut item, len)
                        .map_err(tar_err(format!("{path}: storing content")))?;
                    EntryKind::File(content)
                }
                T::Directory => EntryKind::Dir,
                T::Symlink => EntryKind::Symlink {
                    target: link_name()?,
                },
                T::Link => {
                    let target = link_name()?;
                    let target = target.strip_prefix("./").unwrap_or(&target);
                    EntryKind::HardLink {
                        target: TreePath::new(target)?,
                    }
                }
                T::Char => {
                    let (major, minor) = dev();
                    EntryKind::CharDevice { major, minor }
                }
                T::Block => {
                    let (major, minor) = dev();
                    EntryKind::BlockDevice { major, minor }
                }
                T::Fifo => EntryKind::Fifo,
                other => {
                    return Err(TreeError::Tar {
                        context: format!("{path}: unsupported entry type {other:?}"),
                        source: io::Error::other("unsupported tar entry"),
                    });
                }
            };
            let entry = Entry {
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                mtime,
                xattrs,
            };
            if matches!(entry.kind, EntryKind::Dir)
                && let Some(old) = self.entries.get_mut(&path)
                && matches!(old.kind, EntryKind::Dir)
            {
                // A directory listed again keeps its children; take the new metadata.
                *old = entry;
                continue;
            }
            self.insert(path, entry)?;
        }
        Ok(())
    }
}

fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
    (major as u32, minor as u32)
}

fn read_host_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, TreeError> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => {
            return Err(TreeError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    for name in names {
        let Some(name) = name.to_str().map(str::to_string) else {
            continue;
        };
        if let Some(value) = xattr::get(path, &name).map_err(io_err(path))? {
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// Read a whole content into memory (tests and small files only).
pub fn read_content(content: &Content) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(content.len() as usize);
    content.open()?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Seek helper used by writers that need the file length of a host file.
pub fn host_len(path: &Path) -> io::Result<u64> {
    File::open(path)?.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_and_reject_escapes() {
        assert_eq!(TreePath::new("/etc/passwd").unwrap().as_str(), "etc/passwd");
        assert_eq!(TreePath::new("etc/").unwrap().as_str(), "etc");
        assert!(TreePath::new("/").unwrap().is_root());
        for bad in ["../x", "/a/../b", "a//b", "./a", "a/./b", "a\0b"] {
            assert!(TreePath::new(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn insert_creates_parents_and_children_are_ordered() {
        let mut t = Tree::new();
        t.add("/b/z", Entry::file(Content::inline("z"), 0o644))
            .unwrap();
        t.add("/b/a", Entry::file(Content::inline("a"), 0o644))
            .unwrap();
        t.add("/b/a.d/x", Entry::file(Content::inline("x"), 0o644))
            .unwrap();
        t.add("/a", Entry::dir(0o700)).unwrap();
        let kids: Vec<_> = t
            .children(&TreePath::new("/b").unwrap())
            .map(|(p, _)| p.as_str().to_string())
            .collect();
        assert_eq!(kids, ["b/a", "b/a.d", "b/z"]);
        let top: Vec<_> = t
            .children(&TreePath::root())
            .map(|(p, _)| p.as_str().to_string())
            .collect();
        assert_eq!(top, ["a", "b"]);
        assert_eq!(t.descendants(&TreePath::root()).count(), 6);
        assert!(matches!(
            t.get(&TreePath::new("/b").unwrap()).unwrap().kind,
            EntryKind::Dir
        ));
    }

    #[test]
    fn file_parent_is_an_error() {
        let mut t = Tree::new();
        t.add("/f", Entry::file(Content::inline("f"), 0o644))
            .unwrap();
        assert!(matches!(
            t.add("/f/x", Entry::dir(0o755)),
            Err(TreeError::ParentNotDir { .. })
        ));
    }

    #[test]
    fn hard_link_to_missing_path_is_an_error() {
        let mut t = Tree::new();
        t.add(
            "/l",
            Entry::new(
                EntryKind::HardLink {
                    target: TreePath::new("/missing").unwrap(),
                },
                0o644,
            ),
        )
        .unwrap();
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("/missing"), "{err}");
    }

    #[test]
    fn sparse_host_file_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_at(b"hello", 32 << 20).unwrap();
        let c = Content::Host {
            path: path.clone(),
            len: 64 << 20,
        };
        let ranges = c.data_ranges().unwrap();
        let data: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(data < 1 << 20, "{ranges:?}");
        assert!(
            ranges
                .iter()
                .any(|&(o, l)| o <= 32 << 20 && o + l >= (32 << 20) + 5)
        );
    }

    #[test]
    fn tar_paths_and_link_targets_are_bounded() {
        let long = format!("./{}/f", "d".repeat(MAX_TAR_PATH));
        for (path, link) in [(long.as_str(), None), ("./l", Some(long.as_str()))] {
            let mut builder = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(0);
            match link {
                None => builder.append_data(&mut h, path, io::empty()).unwrap(),
                Some(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    builder.append_link(&mut h, path, target).unwrap();
                }
            }
            let bytes = builder.into_inner().unwrap();
            let mut t = Tree::new();
            let err = t
                .extend_from_tar(&bytes[..], &mut |_, _| Ok(Content::inline("")))
                .unwrap_err();
            assert!(matches!(err, TreeError::TarLimit { .. }), "{err}");
            assert!(err.to_string().contains("limit 4096"), "{err}");
        }
    }

    /// A GNU sparse entry `big` whose one 512-byte data block sits at `offset`: holes before it.
    fn sparse_tar(offset: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(512);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(offset);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(offset + 512);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 512]);
        bytes.extend_from_slice(&[0; 1024]);
        bytes
    }

    #[test]
    fn sparse_holes_are_bounded() {
        let mut t = Tree::new();
        t.extend_from_tar(&sparse_tar(1024)[..], &mut |r, len| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            assert_eq!(v.len() as u64, len);
            Ok(Content::inline(v))
        })
        .unwrap();
        assert_eq!(t.content_bytes(), 1536);
        // 2 KiB of archive describing an exabyte of zeros.
        let mut t = Tree::new();
        let err = t
            .extend_from_tar(
                &sparse_tar(1 << 60)[..],
                &mut |_, _| -> io::Result<Content> { panic!("the content was read") },
            )
            .unwrap_err();
        assert!(matches!(err, TreeError::TarLimit { .. }), "{err}");
    }

    #[test]
    fn tar_round_trip_keeps_owners_links_and_xattrs() {
        let mut builder = tar::Builder::new(Vec::new());
        let new_header = || {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_mode(0o644);
            h
        };
        let mut h = new_header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("./usr/bin").unwrap();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        builder.append(&h, io::empty()).unwrap();
        let mut h = new_header();
        h.set_path("./usr/bin/ping").unwrap();
        h.set_mode(0o4755);
        h.set_uid(0);
        h.set_gid(1234);
        h.set_size(4);
        h.set_cksum();
        builder
            .append_pax_extensions([("SCHILY.xattr.security.capability", &b"\x01\x02"[..])])
            .unwrap();
        builder.append(&h, &b"ping"[..]).unwrap();
        let mut h = new_header();
        h.set_entry_type(tar::EntryType::Link);
        h.set_path("./usr/bin/ping2").unwrap();
        h.set_link_name("./usr/bin/ping").unwrap();
        h.set_size(0);
        h.set_cksum();
        builder.append(&h, io::empty()).unwrap();
        let bytes = builder.into_inner().unwrap();

        let mut t = Tree::new();
        t.extend_from_tar(&bytes[..], &mut |r, _len| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(Content::inline(v))
        })
        .unwrap();
        let ping = t.get(&TreePath::new("/usr/bin/ping").unwrap()).unwrap();
        assert_eq!(ping.mode, 0o4755);
        assert_eq!(ping.gid, 1234);
        assert_eq!(ping.xattrs["security.capability"], b"\x01\x02");
        assert_eq!(ping.kind, EntryKind::File(Content::inline("ping")));
        t.validate().unwrap();
        assert_eq!(
            t.resolve_link(&TreePath::new("/usr/bin/ping2").unwrap())
                .unwrap()
                .as_str(),
            "usr/bin/ping"
        );
    }
}
