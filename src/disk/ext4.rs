//! ext4: a write-once builder that lays out a whole [`Tree`] as an ext4 filesystem in one
//! mostly-sequential pass into a partition window.
//!
//! The filesystem has 4 KiB blocks, 256-byte inodes, extents, an internal jbd2 journal (inode 8,
//! sized like mke2fs does), sparse_super, 64bit, metadata_csum and the usual ext4 feature set. No
//! flex_bg and no resize inode: every block group carries its own bitmaps and inode table, so a
//! group's metadata sits right before its data and the image is written front to back.
//!
//! Work happens in three steps. [`prepare`] turns the Tree into inodes (numbers in Tree path
//! order, directory entries, xattr areas, the data ranges of sparse files); it does not depend on
//! the partition size. `plan_blocks` picks the geometry for a size and allocates every block
//! sequentially. The writer then emits group metadata and data in disk order, skipping blocks that
//! are all zeros (the sink reads unwritten bytes as zeros). Same Tree + same seed => same bytes.
//!
//! Directories are linear (no htree index, as with `mke2fs -d`), so their entries stay in Tree
//! order; e2fsck accepts them and the kernel indexes nothing it did not create. No blocks are
//! reserved for root (`-m 0`): images are sized to their contents.

use std::io;

use crate::disk::{WriteAt, derive_id};
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};

const BS: u64 = 4096;
const BSU: usize = 4096;
const BPG: u64 = 32768;
const INODE_SIZE: usize = 256;
const EXTRA_ISIZE: u16 = 32;
const DESC_SIZE: usize = 64;
const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const FIRST_INO: u32 = 11;
const INODE_RATIO: u64 = 16384;
const INODES_PER_BLOCK: u64 = BS / INODE_SIZE as u64;
const MAX_EXTENT_LEN: u64 = 32768;
const EXTENTS_PER_BLOCK: usize = (BSU - 12) / 12;
const LPF_BLOCKS: u64 = 4;
const MAX_LINKS: u32 = 65000;
const CHUNK: usize = 1 << 20;
/// Offset of the in-inode xattr area (after the 128-byte base inode and the extra fields).
const IBODY_OFF: usize = 128 + EXTRA_ISIZE as usize;
const XATTR_MAGIC: u32 = 0xEA02_0000;

const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const EXTENTS_FL: u32 = 0x80000;

/// Errors writing an ext4 filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(
        "ext4: the tree needs a partition of at least {needed} bytes, but only {available} bytes are available; make the partition larger"
    )]
    TooSmall { needed: u64, available: u64 },
    #[error("ext4: {path}: name component is {len} bytes; ext4 allows at most 255")]
    NameTooLong { path: String, len: usize },
    #[error("ext4: {path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("ext4: {path}: xattr {name:?}: {reason}")]
    Xattr {
        path: String,
        name: String,
        reason: String,
    },
    #[error("ext4: {path}: reading content")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("ext4: writing {len} bytes at offset {offset} of the partition")]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("ext4: invalid tree")]
    Tree(#[from] TreeError),
}

/// Identity and timestamps of the filesystem.
#[derive(Clone, Debug)]
pub struct Ext4Options {
    /// Image seed: the filesystem UUID ("ext4-uuid") and directory hash seed ("ext4-hash-seed")
    /// derive from it.
    pub seed: String,
    /// Volume label (at most 16 bytes are stored).
    pub label: String,
    /// Filesystem timestamps: mkfs/write/check time, lost+found and the journal inode.
    pub epoch: i64,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Report {
    /// Filesystem size in 4 KiB blocks (the partition may have a few unused blocks after it).
    pub blocks_total: u64,
    /// Blocks in use: metadata, journal and data.
    pub blocks_used: u64,
    /// Inodes in use, the reserved inodes 1-10 included.
    pub inodes_used: u64,
}

/// Write an ext4 filesystem holding `tree` into `out`, which is `size` bytes long and reads as
/// zeros where nothing is written.
pub fn write_ext4(
    tree: &Tree,
    out: &mut dyn WriteAt,
    size: u64,
    opts: &Ext4Options,
) -> Result<Ext4Report, Ext4Error> {
    let prep = prepare(tree, opts.epoch)?;
    let lay = match plan_blocks(&prep, size) {
        Ok(lay) => lay,
        Err(Ext4Error::TooSmall { .. }) => {
            return Err(Ext4Error::TooSmall {
                needed: min_size(&prep)?,
                available: size,
            });
        }
        Err(e) => return Err(e),
    };
    let image = Image::new(&prep, &lay, opts);
    image.write(out)?;
    Ok(Ext4Report {
        blocks_total: lay.geo.blocks,
        blocks_used: lay.geo.blocks - image.free_blocks,
        inodes_used: u64::from(prep.max_ino),
    })
}

/// Smallest partition size (bytes, multiple of 1 MiB) that holds the tree, metadata and journal
/// included.
pub fn ext4_min_size(tree: &Tree) -> Result<u64, Ext4Error> {
    let prep = prepare(tree, 0)?;
    min_size(&prep)
}

fn min_size(prep: &Prepared) -> Result<u64, Ext4Error> {
    const MIB: u64 = 1 << 20;
    let mut mib: u64 = 2;
    loop {
        match plan_blocks(prep, mib * MIB) {
            Ok(_) => return Ok(mib * MIB),
            Err(Ext4Error::TooSmall { needed, .. }) => {
                mib = (mib + 1).max(needed.div_ceil(MIB));
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Little-endian helpers and checksums.

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// ext4's crc32c: no pre- or post-inversion, chained through `seed`.
fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Seconds as ext4 stores them: the low 32 bits, and the epoch bits for the `_extra` field.
fn split_time(t: i64) -> (u32, u32) {
    let lo = t as i32;
    let extra = ((t - i64::from(lo)) >> 32) as u32 & 3;
    (lo as u32, extra)
}

// ---------------------------------------------------------------------------------------------
// Step 1: the Tree as inodes.

struct DirEnt {
    name: Vec<u8>,
    ino: u32,
    ftype: u8,
}

enum Body<'a> {
    /// A regular file: logical block runs that hold data; the rest are holes.
    File {
        content: &'a Content,
        runs: Vec<(u64, u64)>,
    },
    /// A directory: its entries ("." and ".." first) and which of them go in each block.
    Dir {
        ents: Vec<DirEnt>,
        blocks: Vec<(usize, usize)>,
        min_blocks: u64,
    },
    FastSymlink(Vec<u8>),
    SlowSymlink(Vec<u8>),
    /// i_block[0] and i_block[1] of a device inode.
    Device(u32, u32),
    /// A fifo or socket.
    Special,
}

struct Node<'a> {
    ino: u32,
    path: String,
    mode: u16,
    uid: u32,
    gid: u32,
    time: i64,
    links: u32,
    size: u64,
    body: Body<'a>,
    /// The in-inode xattr area (magic first), empty when there are none.
    ibody: Vec<u8>,
    /// An external xattr block without its checksum.
    xblock: Option<Vec<u8>>,
}

impl Node<'_> {
    /// Logical block runs to allocate.
    fn data_runs(&self) -> Vec<(u64, u64)> {
        match &self.body {
            Body::File { runs, .. } => runs.clone(),
            Body::Dir {
                blocks, min_blocks, ..
            } => vec![(0, (blocks.len() as u64).max(*min_blocks))],
            Body::SlowSymlink(_) => vec![(0, 1)],
            _ => Vec::new(),
        }
    }

    fn uses_extents(&self) -> bool {
        matches!(
            self.body,
            Body::File { .. } | Body::Dir { .. } | Body::SlowSymlink(_)
        )
    }
}

struct Prepared<'a> {
    /// Inode 2 (root), then inodes 11, 12, … in order.
    nodes: Vec<Node<'a>>,
    max_ino: u32,
    epoch: i64,
}

fn file_type(kind: &EntryKind) -> u8 {
    match kind {
        EntryKind::File(_) | EntryKind::HardLink { .. } => 1,
        EntryKind::Dir => 2,
        EntryKind::CharDevice { .. } => 3,
        EntryKind::BlockDevice { .. } => 4,
        EntryKind::Fifo => 5,
        EntryKind::Socket => 6,
        EntryKind::Symlink { .. } => 7,
    }
}

/// lost+found as mke2fs makes it, when the tree has none (its time is the epoch).
static LPF_ENTRY: Entry = Entry {
    kind: EntryKind::Dir,
    mode: 0o700,
    uid: 0,
    gid: 0,
    mtime: 0,
    xattrs: std::collections::BTreeMap::new(),
};

fn prepare(tree: &Tree, epoch: i64) -> Result<Prepared<'_>, Ext4Error> {
    tree.validate()?;
    let lpf_path = TreePath::new("lost+found")?;
    let tree_lpf = match tree.get(&lpf_path) {
        Some(e) if matches!(e.kind, EntryKind::Dir) => true,
        Some(e) => {
            return Err(Ext4Error::Unsupported {
                path: lpf_path.to_string(),
                reason: format!(
                    "is a {}; ext4 needs /lost+found to be a directory",
                    e.kind.name()
                ),
            });
        }
        None => false,
    };

    // Inode numbers: the root is 2, lost+found 11, every other inode owner 12, 13, … in path order.
    let mut inos: std::collections::BTreeMap<&TreePath, u32> = std::collections::BTreeMap::new();
    let mut next = FIRST_INO + 1;
    for (path, entry) in tree.iter() {
        check_name(path)?;
        if path.is_root() {
            inos.insert(path, ROOT_INO);
        } else if *path == lpf_path {
            inos.insert(path, FIRST_INO);
        } else if !matches!(entry.kind, EntryKind::HardLink { .. }) {
            inos.insert(path, next);
            next = next.checked_add(1).ok_or_else(|| Ext4Error::Unsupported {
                path: path.to_string(),
                reason: "more than 2^32 inodes".into(),
            })?;
        }
    }
    let max_ino = next - 1;
    let link_counts = tree.link_counts();

    // Directory entries per directory inode, in the Tree's (bytewise) order.
    let mut dir_ents: std::collections::BTreeMap<u32, Vec<DirEnt>> =
        std::collections::BTreeMap::new();
    let mut subdirs: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    dir_ents.insert(ROOT_INO, Vec::new());
    dir_ents.insert(FIRST_INO, Vec::new());
    for (path, entry) in tree.iter() {
        let Some(parent) = path.parent() else {
            continue;
        };
        let parent_ino = inos
            .get(&parent)
            .copied()
            .ok_or_else(|| Ext4Error::Unsupported {
                path: path.to_string(),
                reason: "parent directory missing from the tree".into(),
            })?;
        let (ino, ftype) = match &entry.kind {
            EntryKind::HardLink { .. } => {
                let owner = tree.resolve_link(path)?;
                let ino = inos
                    .get(owner)
                    .copied()
                    .ok_or_else(|| Ext4Error::Unsupported {
                        path: path.to_string(),
                        reason: "hard link target has no inode".into(),
                    })?;
                let kind = tree.get(owner).map(|e| file_type(&e.kind)).unwrap_or(1);
                (ino, kind)
            }
            kind => {
                let ino = inos
                    .get(path)
                    .copied()
                    .ok_or_else(|| Ext4Error::Unsupported {
                        path: path.to_string(),
                        reason: "entry has no inode".into(),
                    })?;
                (ino, file_type(kind))
            }
        };
        if matches!(entry.kind, EntryKind::Dir) {
            *subdirs.entry(parent_ino).or_insert(0) += 1;
            dir_ents.entry(ino).or_default();
        }
        dir_ents.entry(parent_ino).or_default().push(DirEnt {
            name: path.file_name().as_bytes().to_vec(),
            ino,
            ftype,
        });
    }
    if !tree_lpf {
        let root = dir_ents.entry(ROOT_INO).or_default();
        let pos = root
            .iter()
            .position(|d| d.name.as_slice() > b"lost+found".as_slice())
            .unwrap_or(root.len());
        root.insert(
            pos,
            DirEnt {
                name: b"lost+found".to_vec(),
                ino: FIRST_INO,
                ftype: 2,
            },
        );
        *subdirs.entry(ROOT_INO).or_insert(0) += 1;
    }

    let mut nodes: Vec<Node> = Vec::with_capacity(inos.len() + 1);
    let mut owners: Vec<(&TreePath, &Entry, u32)> = Vec::with_capacity(inos.len() + 1);
    for (path, entry) in tree.iter() {
        if let Some(&ino) = inos.get(path) {
            owners.push((path, entry, ino));
        }
    }
    if !tree_lpf {
        owners.push((&lpf_path, &LPF_ENTRY, FIRST_INO));
    }
    owners.sort_by_key(|o| o.2);
    for (path, entry, ino) in owners {
        let display = path.to_string();
        let links = match &entry.kind {
            EntryKind::Dir => {
                let n = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                if n > MAX_LINKS { 1 } else { n }
            }
            _ => link_counts.get(path).copied().unwrap_or(1),
        };
        if links > MAX_LINKS {
            return Err(Ext4Error::Unsupported {
                path: display,
                reason: format!("{links} hard links; ext4 allows at most {MAX_LINKS}"),
            });
        }
        let (body, size) = match &entry.kind {
            EntryKind::File(content) => {
                let size = content.len();
                if size.div_ceil(BS) > u64::from(u32::MAX) {
                    return Err(Ext4Error::Unsupported {
                        path: display,
                        reason: format!("{size} bytes is larger than ext4's 16 TiB file limit"),
                    });
                }
                let ranges = content.data_ranges().map_err(|source| Ext4Error::Read {
                    path: display.clone(),
                    source,
                })?;
                (
                    Body::File {
                        content,
                        runs: block_runs(&ranges, size),
                    },
                    size,
                )
            }
            EntryKind::Dir => {
                let parent = match path.parent() {
                    Some(p) => inos.get(&p).copied().unwrap_or(ROOT_INO),
                    None => ROOT_INO,
                };
                let mut ents = vec![
                    DirEnt {
                        name: b".".to_vec(),
                        ino,
                        ftype: 2,
                    },
                    DirEnt {
                        name: b"..".to_vec(),
                        ino: parent,
                        ftype: 2,
                    },
                ];
                ents.append(dir_ents.entry(ino).or_default());
                let blocks = pack_dir(&ents);
                let min_blocks = if ino == FIRST_INO { LPF_BLOCKS } else { 1 };
                let n = (blocks.len() as u64).max(min_blocks);
                (
                    Body::Dir {
                        ents,
                        blocks,
                        min_blocks,
                    },
                    n * BS,
                )
            }
            EntryKind::Symlink { target } => {
                let t = target.as_bytes().to_vec();
                if t.is_empty() || t.len() >= BSU {
                    return Err(Ext4Error::Unsupported {
                        path: display,
                        reason: format!(
                            "symlink target of {} bytes; ext4 needs 1 to 4095 bytes",
                            t.len()
                        ),
                    });
                }
                let len = t.len() as u64;
                if t.len() < 60 {
                    (Body::FastSymlink(t), len)
                } else {
                    (Body::SlowSymlink(t), len)
                }
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                (device_body(*major, *minor, &display)?, 0)
            }
            EntryKind::Fifo | EntryKind::Socket => (Body::Special, 0),
            EntryKind::HardLink { .. } => continue,
        };
        let (ibody, xblock) = encode_xattrs(&display, &entry.xattrs)?;
        nodes.push(Node {
            ino,
            path: display,
            mode: (entry.full_mode() & 0xffff) as u16,
            uid: entry.uid,
            gid: entry.gid,
            time: if std::ptr::eq(entry, &LPF_ENTRY) {
                epoch
            } else {
                entry.mtime
            },
            links,
            size,
            body,
            ibody,
            xblock,
        });
    }
    Ok(Prepared {
        nodes,
        max_ino,
        epoch,
    })
}

/// i_block words of a device inode: the old 16-bit encoding when it fits, else the new one.
fn device_body(major: u32, minor: u32, path: &str) -> Result<Body<'static>, Ext4Error> {
    {
        if major < 256 && minor < 256 {
            Ok(Body::Device((major << 8) | minor, 0))
        } else if major < 4096 && minor < (1 << 20) {
            Ok(Body::Device(
                0,
                (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
            ))
        } else {
            Err(Ext4Error::Unsupported {
                path: path.to_string(),
                reason: format!(
                    "device {major}:{minor} does not fit ext4 (major < 4096, minor < 2^20)"
                ),
            })
        }
    }
}

fn check_name(path: &TreePath) -> Result<(), Ext4Error> {
    let len = path.file_name().len();
    if len > 255 {
        return Err(Ext4Error::NameTooLong {
            path: path.to_string(),
            len,
        });
    }
    Ok(())
}

/// Byte ranges with data -> merged logical block runs `(first block, count)`.
fn block_runs(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let end_blocks = size.div_ceil(BS);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in ranges {
        if len == 0 {
            continue;
        }
        let start = off / BS;
        let end = (off.saturating_add(len)).div_ceil(BS).min(end_blocks);
        if start >= end {
            continue;
        }
        match runs.last_mut() {
            Some(last) if start <= last.0 + last.1 => {
                let new_end = end.max(last.0 + last.1);
                last.1 = new_end - last.0;
            }
            _ => runs.push((start, end - start)),
        }
    }
    runs
}

fn dirent_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Which entries go into each directory block (leaving room for the checksum tail).
fn pack_dir(ents: &[DirEnt]) -> Vec<(usize, usize)> {
    let cap = BSU - 12;
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, e) in ents.iter().enumerate() {
        let l = dirent_len(e.name.len());
        if used + l > cap {
            blocks.push((start, i));
            start = i;
            used = 0;
        }
        used += l;
    }
    blocks.push((start, ents.len()));
    blocks
}

// ---------------------------------------------------------------------------------------------
// Extended attributes.

fn xattr_name(name: &str) -> Option<(u8, &str)> {
    match name {
        "system.posix_acl_access" => return Some((2, "")),
        "system.posix_acl_default" => return Some((3, "")),
        "system.richacl" => return Some((8, "")),
        _ => {}
    }
    for (prefix, index) in [
        ("user.", 1),
        ("trusted.", 4),
        ("security.", 6),
        ("system.", 7),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((index, rest));
        }
    }
    None
}

/// Convert a POSIX ACL from the xattr (VFS) format to ext4's on-disk format.
fn acl_to_disk(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return None;
    }
    if u32::from_le_bytes(value[0..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in value[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            _ => return None,
        }
    }
    Some(out)
}

struct XEntry {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl XEntry {
    fn entry_len(&self) -> usize {
        (16 + self.name.len() + 3) & !3
    }
    fn value_len(&self) -> usize {
        (self.value.len() + 3) & !3
    }
    fn hash(&self) -> u32 {
        let mut h: u32 = 0;
        for &c in &self.name {
            h = (h << 5) ^ (h >> 27) ^ u32::from(c);
        }
        for w in self.value.chunks(4) {
            let mut word = [0u8; 4];
            word[..w.len()].copy_from_slice(w);
            h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(word);
        }
        h
    }
}

/// Lay out entries and values in `area`: entries from `first`, values packed at the end;
/// value offsets are relative to `base`. Returns the entry hashes.
fn fill_xattrs(area: &mut [u8], first: usize, base: usize, ents: &[XEntry]) -> Vec<u32> {
    let mut pos = first;
    let mut vend = area.len();
    let mut hashes = Vec::new();
    for e in ents {
        vend -= e.value_len();
        area[vend..vend + e.value.len()].copy_from_slice(&e.value);
        let h = e.hash();
        hashes.push(h);
        area[pos] = e.name.len() as u8;
        area[pos + 1] = e.index;
        put16(area, pos + 2, (vend - base) as u16);
        put32(area, pos + 4, 0);
        put32(area, pos + 8, e.value.len() as u32);
        put32(area, pos + 12, h);
        area[pos + 16..pos + 16 + e.name.len()].copy_from_slice(&e.name);
        pos += e.entry_len();
    }
    hashes
}

type XattrAreas = (Vec<u8>, Option<Vec<u8>>);

/// Build the in-inode xattr area and, for what does not fit there, an external block.
fn encode_xattrs(
    path: &str,
    xattrs: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<XattrAreas, Ext4Error> {
    if xattrs.is_empty() {
        return Ok((Vec::new(), None));
    }
    let err = |name: &str, reason: String| Ext4Error::Xattr {
        path: path.to_string(),
        name: name.to_string(),
        reason,
    };
    let mut ents = Vec::new();
    for (name, value) in xattrs {
        let (index, suffix) = xattr_name(name).ok_or_else(|| {
            err(
                name,
                "unknown namespace (ext4 stores user., trusted., security. and system.)".into(),
            )
        })?;
        if suffix.len() > 255 {
            return Err(err(name, "name longer than 255 bytes".into()));
        }
        let value = if index == 2 || index == 3 {
            acl_to_disk(value).ok_or_else(|| err(name, "malformed POSIX ACL value".into()))?
        } else {
            value.clone()
        };
        ents.push(XEntry {
            index,
            name: suffix.as_bytes().to_vec(),
            value,
        });
    }
    // The kernel searches block entries in (index, name length, name) order.
    ents.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    let ibody_cap = INODE_SIZE - IBODY_OFF - 4;
    let mut used = 4; // terminator
    let mut split = 0;
    for e in &ents {
        let need = e.entry_len() + e.value_len();
        if used + need > ibody_cap {
            break;
        }
        used += need;
        split += 1;
    }
    let (inner, outer) = ents.split_at(split);
    let mut ibody = Vec::new();
    if !inner.is_empty() {
        let mut area = vec![0u8; INODE_SIZE - IBODY_OFF];
        put32(&mut area, 0, XATTR_MAGIC);
        fill_xattrs(&mut area, 4, 4, inner);
        ibody = area;
    }
    let mut xblock = None;
    if !outer.is_empty() {
        let need: usize = 32
            + 4
            + outer
                .iter()
                .map(|e| e.entry_len() + e.value_len())
                .sum::<usize>();
        if need > BSU {
            return Err(err(
                &format!("{} and others", outer[0].name.escape_ascii()),
                format!(
                    "xattrs need {need} bytes outside the inode; one ext4 xattr block holds {BSU}"
                ),
            ));
        }
        let mut block = vec![0u8; BSU];
        put32(&mut block, 0, XATTR_MAGIC);
        put32(&mut block, 4, 1); // refcount
        put32(&mut block, 8, 1); // blocks
        let hashes = fill_xattrs(&mut block, 32, 0, outer);
        let mut h: u32 = 0;
        for eh in hashes {
            h = (h << 16) ^ (h >> 16) ^ eh;
        }
        put32(&mut block, 12, h);
        xblock = Some(block);
    }
    Ok((ibody, xblock))
}

// ---------------------------------------------------------------------------------------------
// Step 2: geometry and allocation for one size.

struct Geometry {
    blocks: u64,
    groups: u64,
    ipg: u64,
    itable_blocks: u64,
    gdt_blocks: u64,
    journal_blocks: u64,
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

impl Geometry {
    fn new(size: u64, max_ino: u32) -> Result<Geometry, Ext4Error> {
        let too_small = |needed_blocks: u64| Ext4Error::TooSmall {
            needed: needed_blocks * BS,
            available: size,
        };
        let mut blocks = size / BS;
        if blocks < 64 {
            return Err(too_small(2048));
        }
        let mut groups = blocks.div_ceil(BPG);
        loop {
            let ratio_inodes = (blocks * BS / INODE_RATIO).div_ceil(groups);
            let need_inodes = u64::from(max_ino).div_ceil(groups);
            let ipg = ratio_inodes
                .max(need_inodes)
                .max(INODES_PER_BLOCK)
                .next_multiple_of(INODES_PER_BLOCK);
            // s_inodes_count is 32 bits: very large filesystems get fewer inodes per group.
            let ipg = ipg.min((u64::from(u32::MAX) / groups) / INODES_PER_BLOCK * INODES_PER_BLOCK);
            if ipg > BPG || ipg * groups < u64::from(max_ino) {
                let groups_needed = u64::from(max_ino).div_ceil(BPG);
                return Err(too_small(groups_needed * BPG));
            }
            let geo = Geometry {
                blocks,
                groups,
                ipg,
                itable_blocks: ipg / INODES_PER_BLOCK,
                gdt_blocks: (groups * DESC_SIZE as u64).div_ceil(BS),
                journal_blocks: journal_blocks(blocks),
            };
            let last = groups - 1;
            if geo.group_len(last) < geo.meta_len(last) + 16 {
                if groups == 1 {
                    return Err(too_small(geo.meta_len(0) + 16));
                }
                groups -= 1;
                blocks = groups * BPG;
                continue;
            }
            return Ok(geo);
        }
    }

    fn has_super(&self, g: u64) -> bool {
        g <= 1 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
    }

    fn group_start(&self, g: u64) -> u64 {
        g * BPG
    }

    /// Blocks in group `g`; groups past the end are full-size (used to count what a tree needs).
    fn group_len(&self, g: u64) -> u64 {
        if g + 1 == self.groups {
            self.blocks - g * BPG
        } else {
            BPG
        }
    }

    fn super_len(&self, g: u64) -> u64 {
        if self.has_super(g) {
            1 + self.gdt_blocks
        } else {
            0
        }
    }

    fn meta_len(&self, g: u64) -> u64 {
        self.super_len(g) + 2 + self.itable_blocks
    }

    fn block_bitmap(&self, g: u64) -> u64 {
        self.group_start(g) + self.super_len(g)
    }

    fn data_start(&self, g: u64) -> u64 {
        self.group_start(g) + self.meta_len(g)
    }
}

/// Journal size in blocks, as mke2fs picks it for a filesystem of `blocks` 4 KiB blocks (never
/// below jbd2's minimum of 1024 blocks).
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// Hands out blocks front to back, skipping each group's metadata.
struct Alloc<'g> {
    geo: &'g Geometry,
    group: u64,
    pos: u64,
    /// Every allocated run, ascending and merged.
    runs: Vec<(u64, u64)>,
}

impl<'g> Alloc<'g> {
    fn new(geo: &'g Geometry) -> Self {
        Alloc {
            geo,
            group: 0,
            pos: geo.data_start(0),
            runs: Vec::new(),
        }
    }

    fn take(&mut self, mut n: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        while n > 0 {
            // Past the last group, blocks are only counted (contiguously) so a caller can learn
            // how much space the tree needs.
            let end = if self.group >= self.geo.groups {
                u64::MAX
            } else {
                self.geo.group_start(self.group) + self.geo.group_len(self.group)
            };
            if self.pos >= end {
                self.group += 1;
                self.pos = if self.group >= self.geo.groups {
                    self.geo.blocks
                } else {
                    self.geo.data_start(self.group)
                };
                continue;
            }
            let t = n.min(end - self.pos);
            for list in [&mut out, &mut self.runs] {
                match list.last_mut() {
                    Some(last) if last.0 + last.1 == self.pos => last.1 += t,
                    _ => list.push((self.pos, t)),
                }
            }
            self.pos += t;
            n -= t;
        }
        out
    }

    fn take_blocks(&mut self, n: u64) -> Vec<u64> {
        self.take(n)
            .into_iter()
            .flat_map(|(s, l)| s..s + l)
            .collect()
    }
}

#[derive(Clone, Copy)]
struct Extent {
    lblk: u64,
    len: u64,
    phys: u64,
}

#[derive(Default)]
struct Placed {
    extents: Vec<Extent>,
    depth: u16,
    /// Extent tree blocks: leaves, then (for depth 2) index blocks.
    leaves: Vec<u64>,
    index: Vec<u64>,
    xattr_block: Option<u64>,
}

impl Placed {
    fn blocks(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum::<u64>()
            + self.leaves.len() as u64
            + self.index.len() as u64
            + u64::from(self.xattr_block.is_some())
    }
}

fn place(
    alloc: &mut Alloc,
    runs: &[(u64, u64)],
    xattr_block: bool,
    path: &str,
) -> Result<Placed, Ext4Error> {
    let mut p = Placed::default();
    for &(lblk, count) in runs {
        let mut l = lblk;
        for (phys, len) in alloc.take(count) {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(MAX_EXTENT_LEN);
                p.extents.push(Extent {
                    lblk: l,
                    len: n,
                    phys: phys + off,
                });
                l += n;
                off += n;
            }
        }
    }
    let n = p.extents.len();
    if n > 4 {
        let leaves = n.div_ceil(EXTENTS_PER_BLOCK);
        p.leaves = alloc.take_blocks(leaves as u64);
        if leaves <= 4 {
            p.depth = 1;
        } else {
            let index = leaves.div_ceil(EXTENTS_PER_BLOCK);
            if index > 4 {
                return Err(Ext4Error::Unsupported {
                    path: path.to_string(),
                    reason: format!("{n} extents is too fragmented for a depth-2 extent tree"),
                });
            }
            p.index = alloc.take_blocks(index as u64);
            p.depth = 2;
        }
    }
    if xattr_block {
        p.xattr_block = alloc.take_blocks(1).first().copied();
    }
    Ok(p)
}

/// Where one size's filesystem puts everything: geometry, journal, each node's blocks.
struct BlockPlan {
    geo: Geometry,
    journal: Placed,
    /// Parallel to `Prepared::nodes`.
    placed: Vec<Placed>,
    runs: Vec<(u64, u64)>,
}

fn plan_blocks(prep: &Prepared, size: u64) -> Result<BlockPlan, Ext4Error> {
    let geo = Geometry::new(size, prep.max_ino)?;
    let mut alloc = Alloc::new(&geo);
    let journal = place(&mut alloc, &[(0, geo.journal_blocks)], false, "<journal>")?;
    let mut placed = Vec::with_capacity(prep.nodes.len());
    for node in &prep.nodes {
        placed.push(place(
            &mut alloc,
            &node.data_runs(),
            node.xblock.is_some(),
            &node.path,
        )?);
    }
    let end = alloc.runs.last().map(|r| r.0 + r.1).unwrap_or(0);
    if end > geo.blocks {
        // Each extra group also carries bitmaps and an inode table.
        let extra_groups = (end - geo.blocks).div_ceil(BPG);
        return Err(Ext4Error::TooSmall {
            needed: (end + extra_groups * (2 + geo.itable_blocks)) * BS,
            available: size,
        });
    }
    let runs = alloc.runs;
    Ok(BlockPlan {
        geo,
        journal,
        placed,
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// Step 3: rendering and writing.

/// Buffers contiguous writes into large chunks and leaves all-zero blocks unwritten.
struct Seq<'o> {
    out: &'o mut dyn WriteAt,
    buf: Vec<u8>,
    start: u64,
}

impl<'o> Seq<'o> {
    fn new(out: &'o mut dyn WriteAt) -> Self {
        Seq {
            out,
            buf: Vec::with_capacity(CHUNK),
            start: 0,
        }
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), Ext4Error> {
        if offset != self.start + self.buf.len() as u64 || self.buf.len() + data.len() > CHUNK {
            self.flush()?;
            self.start = offset;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Ext4Error> {
        let buf = std::mem::take(&mut self.buf);
        let mut i = 0;
        while i < buf.len() {
            let block_end = |i: usize| (i + BSU).min(buf.len());
            if buf[i..block_end(i)].iter().all(|&b| b == 0) {
                i = block_end(i);
                continue;
            }
            let mut j = block_end(i);
            while j < buf.len() && buf[j..block_end(j)].iter().any(|&b| b != 0) {
                j = block_end(j);
            }
            let offset = self.start + i as u64;
            self.out
                .write_at(offset, &buf[i..j])
                .map_err(|source| Ext4Error::Write {
                    offset,
                    len: j - i,
                    source,
                })?;
            i = j;
        }
        self.start += buf.len() as u64;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }
}

struct Image<'p> {
    prep: &'p Prepared<'p>,
    lay: &'p BlockPlan,
    csum_seed: u32,
    sb: Vec<u8>,
    gdt: Vec<u8>,
    free_blocks: u64,
}

impl<'p> Image<'p> {
    fn new(prep: &'p Prepared<'p>, lay: &'p BlockPlan, opts: &Ext4Options) -> Self {
        let uuid = derive_id(&opts.seed, "ext4-uuid");
        let hash_seed = derive_id(&opts.seed, "ext4-hash-seed");
        let csum_seed = crc(!0, &uuid);
        let mut img = Image {
            prep,
            lay,
            csum_seed,
            sb: Vec::new(),
            gdt: Vec::new(),
            free_blocks: 0,
        };
        let geo = &lay.geo;
        let mut gdt = vec![0u8; (geo.gdt_blocks * BS) as usize];
        let mut free_blocks = 0;
        let mut dirs_per_group = vec![0u64; geo.groups as usize];
        for node in &prep.nodes {
            if node.mode & 0o170000 == S_IFDIR {
                dirs_per_group[((node.ino - 1) as u64 / geo.ipg) as usize] += 1;
            }
        }
        for g in 0..geo.groups {
            let (bb, free) = img.block_bitmap(g);
            let ib = img.inode_bitmap(g);
            let used_inodes = img.used_inodes(g);
            free_blocks += free;
            let d = &mut gdt[g as usize * DESC_SIZE..(g as usize + 1) * DESC_SIZE];
            let bb_at = geo.block_bitmap(g);
            let ib_at = bb_at + 1;
            let it_at = bb_at + 2;
            let free_inodes = geo.ipg - used_inodes;
            let bb_csum = crc(csum_seed, &bb);
            let ib_csum = crc(csum_seed, &ib[..(geo.ipg / 8) as usize]);
            let dirs = dirs_per_group[g as usize];
            put32(d, 0x00, bb_at as u32);
            put32(d, 0x04, ib_at as u32);
            put32(d, 0x08, it_at as u32);
            put16(d, 0x0C, free as u16);
            put16(d, 0x0E, free_inodes as u16);
            put16(d, 0x10, dirs as u16);
            put16(d, 0x12, 0x4); // EXT4_BG_INODE_ZEROED
            put16(d, 0x18, bb_csum as u16);
            put16(d, 0x1A, ib_csum as u16);
            put16(d, 0x1C, free_inodes as u16);
            put32(d, 0x20, (bb_at >> 32) as u32);
            put32(d, 0x24, (ib_at >> 32) as u32);
            put32(d, 0x28, (it_at >> 32) as u32);
            put16(d, 0x2C, (free >> 16) as u16);
            put16(d, 0x2E, (free_inodes >> 16) as u16);
            put16(d, 0x30, (dirs >> 16) as u16);
            put16(d, 0x32, (free_inodes >> 16) as u16);
            put16(d, 0x38, (bb_csum >> 16) as u16);
            put16(d, 0x3A, (ib_csum >> 16) as u16);
            let mut c = crc(csum_seed, &(g as u32).to_le_bytes());
            c = crc(c, d);
            put16(d, 0x1E, c as u16);
        }
        img.gdt = gdt;
        img.free_blocks = free_blocks;
        img.sb = img.superblock(opts, &uuid, &hash_seed);
        img
    }

    /// Inodes in use in group `g` (inodes 1..=max_ino are all in use).
    fn used_inodes(&self, g: u64) -> u64 {
        let first = g * self.lay.geo.ipg;
        u64::from(self.prep.max_ino)
            .saturating_sub(first)
            .min(self.lay.geo.ipg)
    }

    fn block_bitmap(&self, g: u64) -> (Vec<u8>, u64) {
        let geo = &self.lay.geo;
        let mut bm = vec![0u8; BSU];
        let set = |bm: &mut [u8], from: u64, to: u64| {
            for b in from..to {
                bm[(b / 8) as usize] |= 1 << (b % 8);
            }
        };
        let start = geo.group_start(g);
        let len = geo.group_len(g);
        set(&mut bm, 0, geo.meta_len(g));
        set(&mut bm, len, BPG);
        let first = self.lay.runs.partition_point(|r| r.0 + r.1 <= start);
        for r in &self.lay.runs[first..] {
            if r.0 >= start + len {
                break;
            }
            let from = r.0.max(start) - start;
            let to = (r.0 + r.1).min(start + len) - start;
            set(&mut bm, from, to);
        }
        let used: u64 = bm.iter().map(|b| u64::from(b.count_ones())).sum();
        (bm, BPG - used)
    }

    fn inode_bitmap(&self, g: u64) -> Vec<u8> {
        let mut bm = vec![0u8; BSU];
        let used = self.used_inodes(g);
        for i in (0..used).chain(self.lay.geo.ipg..BPG) {
            bm[(i / 8) as usize] |= 1 << (i % 8);
        }
        bm
    }

    fn superblock(&self, opts: &Ext4Options, uuid: &[u8; 16], hash_seed: &[u8; 16]) -> Vec<u8> {
        let geo = &self.lay.geo;
        let mut s = vec![0u8; 1024];
        let inodes = geo.groups * geo.ipg;
        let free_inodes = inodes - u64::from(self.prep.max_ino);
        let (time, time_hi) = split_time(opts.epoch);
        put32(&mut s, 0x00, inodes as u32);
        put32(&mut s, 0x04, geo.blocks as u32);
        put32(&mut s, 0x0C, self.free_blocks as u32);
        put32(&mut s, 0x10, free_inodes as u32);
        put32(&mut s, 0x14, 0); // first data block
        put32(&mut s, 0x18, 2); // log block size: 1024 << 2
        put32(&mut s, 0x1C, 2);
        put32(&mut s, 0x20, BPG as u32);
        put32(&mut s, 0x24, BPG as u32);
        put32(&mut s, 0x28, geo.ipg as u32);
        put32(&mut s, 0x30, time); // write time
        put16(&mut s, 0x36, 0xFFFF); // max mount count: -1
        put16(&mut s, 0x38, 0xEF53);
        put16(&mut s, 0x3A, 1); // clean
        put16(&mut s, 0x3C, 1); // errors: continue
        put32(&mut s, 0x40, time); // last check
        put32(&mut s, 0x4C, 1); // dynamic revision
        put32(&mut s, 0x54, FIRST_INO);
        put16(&mut s, 0x58, INODE_SIZE as u16);
        // compat: has_journal, ext_attr, dir_index
        put32(&mut s, 0x5C, 0x4 | 0x8 | 0x20);
        // incompat: filetype, extents, 64bit
        put32(&mut s, 0x60, 0x2 | 0x40 | 0x80);
        // ro_compat: sparse_super, large_file, huge_file, dir_nlink, extra_isize, metadata_csum
        put32(&mut s, 0x64, 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400);
        s[0x68..0x78].copy_from_slice(uuid);
        let label = opts.label.as_bytes();
        let n = label.len().min(16);
        s[0x78..0x78 + n].copy_from_slice(&label[..n]);
        put32(&mut s, 0xE0, JOURNAL_INO);
        s[0xEC..0xFC].copy_from_slice(hash_seed);
        s[0xFC] = 1; // default hash: half_md4
        s[0xFD] = 1; // s_jnl_blocks holds a copy of the journal inode's block map
        put16(&mut s, 0xFE, DESC_SIZE as u16);
        put32(&mut s, 0x100, 0x4 | 0x8); // default mount options: user_xattr, acl
        put32(&mut s, 0x108, time); // mkfs time
        let jroot = self.extent_root(&self.lay.journal);
        s[0x10C..0x10C + 60].copy_from_slice(&jroot);
        let jsize = geo.journal_blocks * BS;
        put32(&mut s, 0x10C + 60, (jsize >> 32) as u32);
        put32(&mut s, 0x10C + 64, jsize as u32);
        put32(&mut s, 0x150, (geo.blocks >> 32) as u32);
        put32(&mut s, 0x158, (self.free_blocks >> 32) as u32);
        put16(&mut s, 0x15C, EXTRA_ISIZE);
        put16(&mut s, 0x15E, EXTRA_ISIZE);
        put32(&mut s, 0x160, 0x1); // signed directory hash
        s[0x175] = 1; // checksum type: crc32c
        s[0x274] = time_hi as u8;
        s[0x276] = time_hi as u8;
        s[0x277] = time_hi as u8;
        s
    }

    /// The superblock as stored in group `g`.
    fn superblock_for(&self, g: u64) -> Vec<u8> {
        let mut s = self.sb.clone();
        put16(&mut s, 0x5A, g as u16);
        let c = crc(!0, &s[..0x3FC]);
        put32(&mut s, 0x3FC, c);
        s
    }

    fn inode_seed(&self, ino: u32) -> u32 {
        crc(crc(self.csum_seed, &ino.to_le_bytes()), &0u32.to_le_bytes())
    }

    /// The 60-byte i_block of an extent-mapped inode.
    fn extent_root(&self, p: &Placed) -> [u8; 60] {
        let mut b = [0u8; 60];
        match p.depth {
            0 => write_extent_node(&mut b, 4, 0, &p.extents, |e| (e.lblk, e.len, e.phys)),
            1 => {
                let entries: Vec<(u64, u64)> = p
                    .leaves
                    .iter()
                    .zip(p.extents.chunks(EXTENTS_PER_BLOCK))
                    .map(|(&blk, ch)| (ch[0].lblk, blk))
                    .collect();
                write_index_node(&mut b, 4, 1, &entries);
            }
            _ => {
                let leaf_first: Vec<(u64, u64)> = p
                    .leaves
                    .iter()
                    .zip(p.extents.chunks(EXTENTS_PER_BLOCK))
                    .map(|(&blk, ch)| (ch[0].lblk, blk))
                    .collect();
                let entries: Vec<(u64, u64)> = p
                    .index
                    .iter()
                    .zip(leaf_first.chunks(EXTENTS_PER_BLOCK))
                    .map(|(&blk, ch)| (ch[0].0, blk))
                    .collect();
                write_index_node(&mut b, 4, 2, &entries);
            }
        }
        b
    }

    /// Extent tree blocks of an inode, in allocation order, with checksums.
    fn extent_blocks(&self, ino: u32, p: &Placed) -> Vec<(u64, Vec<u8>)> {
        let seed = self.inode_seed(ino);
        let mut out = Vec::new();
        let mut leaf_first = Vec::new();
        for (&blk, ch) in p.leaves.iter().zip(p.extents.chunks(EXTENTS_PER_BLOCK)) {
            let mut b = vec![0u8; BSU];
            write_extent_node(&mut b, EXTENTS_PER_BLOCK as u16, 0, ch, |e| {
                (e.lblk, e.len, e.phys)
            });
            leaf_first.push((ch[0].lblk, blk));
            out.push((blk, b));
        }
        for (&blk, ch) in p.index.iter().zip(leaf_first.chunks(EXTENTS_PER_BLOCK)) {
            let mut b = vec![0u8; BSU];
            write_index_node(&mut b, EXTENTS_PER_BLOCK as u16, 1, ch);
            out.push((blk, b));
        }
        for (_, b) in &mut out {
            let tail = 12 + 12 * EXTENTS_PER_BLOCK;
            let c = crc(seed, &b[..tail]);
            put32(b, tail, c);
        }
        out
    }

    fn render_inode(&self, ino: u32, out: &mut [u8]) {
        let epoch = self.prep.epoch;
        if ino == 1 {
            // The bad blocks inode, as mke2fs leaves it: only timestamps.
            let (t, _) = split_time(epoch);
            put32(out, 0x08, t);
            put32(out, 0x0C, t);
            put32(out, 0x10, t);
            let c = crc(self.inode_seed(ino), out);
            put16(out, 0x7C, c as u16);
            return;
        }
        let jnode;
        let (node, placed) = if ino == JOURNAL_INO {
            jnode = Node {
                ino,
                path: String::new(),
                mode: S_IFREG | 0o600,
                uid: 0,
                gid: 0,
                time: epoch,
                links: 1,
                size: self.lay.geo.journal_blocks * BS,
                body: Body::Special,
                ibody: Vec::new(),
                xblock: None,
            };
            (&jnode, &self.lay.journal)
        } else {
            match self.node_index(ino) {
                Some(i) => (&self.prep.nodes[i], &self.lay.placed[i]),
                None => return,
            }
        };
        let (t, t_extra) = split_time(node.time);
        put16(out, 0x00, node.mode);
        put16(out, 0x02, node.uid as u16);
        put32(out, 0x04, node.size as u32);
        put32(out, 0x08, t);
        put32(out, 0x0C, t);
        put32(out, 0x10, t);
        put16(out, 0x18, node.gid as u16);
        put16(out, 0x1A, node.links as u16);
        let sectors = placed.blocks() * (BS / 512);
        put32(out, 0x1C, sectors as u32);
        let extents = ino == JOURNAL_INO || node.uses_extents();
        put32(out, 0x20, if extents { EXTENTS_FL } else { 0 });
        let iblock: [u8; 60] = if extents {
            self.extent_root(placed)
        } else {
            let mut b = [0u8; 60];
            match &node.body {
                Body::FastSymlink(t) => b[..t.len()].copy_from_slice(t),
                Body::Device(a, c) => {
                    put32(&mut b, 0, *a);
                    put32(&mut b, 4, *c);
                }
                _ => {}
            }
            b
        };
        out[0x28..0x64].copy_from_slice(&iblock);
        let acl = placed.xattr_block.unwrap_or(0);
        put32(out, 0x68, acl as u32);
        put32(out, 0x6C, (node.size >> 32) as u32);
        put16(out, 0x74, (sectors >> 32) as u16);
        put16(out, 0x76, (acl >> 32) as u16);
        put16(out, 0x78, (node.uid >> 16) as u16);
        put16(out, 0x7A, (node.gid >> 16) as u16);
        put16(out, 0x80, EXTRA_ISIZE);
        put32(out, 0x84, t_extra);
        put32(out, 0x88, t_extra);
        put32(out, 0x8C, t_extra);
        put32(out, 0x90, t);
        put32(out, 0x94, t_extra);
        if !node.ibody.is_empty() {
            out[IBODY_OFF..].copy_from_slice(&node.ibody);
        }
        let c = crc(self.inode_seed(ino), out);
        put16(out, 0x7C, c as u16);
        put16(out, 0x82, (c >> 16) as u16);
    }

    fn node_index(&self, ino: u32) -> Option<usize> {
        if ino == ROOT_INO {
            Some(0)
        } else if ino >= FIRST_INO && ino <= self.prep.max_ino {
            Some((ino - FIRST_INO) as usize + 1)
        } else {
            None
        }
    }

    /// Superblock copy, group descriptors, bitmaps and the used part of the inode table of
    /// group `g`, as one contiguous run of blocks from the group's start.
    fn group_meta(&self, g: u64) -> (u64, Vec<u8>) {
        let geo = &self.lay.geo;
        let mut buf = Vec::new();
        if geo.has_super(g) {
            let mut first = vec![0u8; BSU];
            let at = if g == 0 { 1024 } else { 0 };
            first[at..at + 1024].copy_from_slice(&self.superblock_for(g));
            buf.extend_from_slice(&first);
            buf.extend_from_slice(&self.gdt);
        }
        buf.extend_from_slice(&self.block_bitmap(g).0);
        buf.extend_from_slice(&self.inode_bitmap(g));
        let used = self.used_inodes(g);
        let table_len = (used.div_ceil(INODES_PER_BLOCK) * BS) as usize;
        let base = buf.len();
        buf.resize(base + table_len, 0);
        for i in 0..used {
            let ino = (g * geo.ipg + i + 1) as u32;
            let off = base + i as usize * INODE_SIZE;
            self.render_inode(ino, &mut buf[off..off + INODE_SIZE]);
        }
        (geo.group_start(g) * BS, buf)
    }

    fn write(&self, out: &mut dyn WriteAt) -> Result<(), Ext4Error> {
        let mut w = Writer {
            seq: Seq::new(out),
            img: self,
            next_group: 0,
        };
        // The journal: only its superblock is non-zero.
        if let Some(first) = self.lay.journal.extents.first() {
            let jsb = self.journal_superblock();
            w.put(first.phys, &jsb)?;
        }
        let mut buf = vec![0u8; CHUNK];
        for (node, placed) in self.prep.nodes.iter().zip(&self.lay.placed) {
            self.write_node(&mut w, &mut buf, node, placed)?;
        }
        w.meta_upto(self.lay.geo.groups)?;
        w.seq.flush()
    }

    fn journal_superblock(&self) -> Vec<u8> {
        let mut b = vec![0u8; BSU];
        let be =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        be(&mut b, 0x0, 0xC03B_3998);
        be(&mut b, 0x4, 4); // superblock v2
        be(&mut b, 0xC, BS as u32);
        be(&mut b, 0x10, self.lay.geo.journal_blocks as u32);
        be(&mut b, 0x14, 1); // first log block
        be(&mut b, 0x18, 1); // first expected sequence
        be(&mut b, 0x1C, 0); // start 0: clean, nothing to replay
        b[0x30..0x40].copy_from_slice(&self.sb[0x68..0x78]);
        be(&mut b, 0x40, 1); // one user
        b
    }

    fn write_node(
        &self,
        w: &mut Writer,
        buf: &mut [u8],
        node: &Node,
        placed: &Placed,
    ) -> Result<(), Ext4Error> {
        match &node.body {
            Body::File { content, .. } => {
                let reader = content.reader().map_err(|source| Ext4Error::Read {
                    path: node.path.clone(),
                    source,
                })?;
                for e in &placed.extents {
                    let mut done = 0;
                    while done < e.len {
                        let n = (e.len - done).min((CHUNK / BSU) as u64);
                        let offset = (e.lblk + done) * BS;
                        let want = (n * BS).min(node.size.saturating_sub(offset)) as usize;
                        let chunk = &mut buf[..(n * BS) as usize];
                        let mut got = 0;
                        while got < want {
                            let r = reader
                                .read_at(offset + got as u64, &mut chunk[got..want])
                                .map_err(|source| Ext4Error::Read {
                                    path: node.path.clone(),
                                    source,
                                })?;
                            if r == 0 {
                                return Err(Ext4Error::Read {
                                    path: node.path.clone(),
                                    source: io::Error::new(
                                        io::ErrorKind::UnexpectedEof,
                                        format!(
                                            "content ended at byte {}; the tree says {} bytes",
                                            offset + got as u64,
                                            node.size
                                        ),
                                    ),
                                });
                            }
                            got += r;
                        }
                        chunk[want..].fill(0);
                        w.put(e.phys + done, chunk)?;
                        done += n;
                    }
                }
            }
            Body::Dir { ents, blocks, .. } => {
                let seed = self.inode_seed(node.ino);
                let mut lblk = 0u64;
                for e in &placed.extents {
                    for k in 0..e.len {
                        let range = blocks.get(lblk as usize).copied();
                        let b = render_dir_block(ents, range, seed);
                        w.put(e.phys + k, &b)?;
                        lblk += 1;
                    }
                }
            }
            Body::SlowSymlink(t) => {
                if let Some(e) = placed.extents.first() {
                    let mut b = vec![0u8; BSU];
                    b[..t.len()].copy_from_slice(t);
                    w.put(e.phys, &b)?;
                }
            }
            _ => {}
        }
        for (blk, b) in self.extent_blocks(node.ino, placed) {
            w.put(blk, &b)?;
        }
        if let (Some(blk), Some(xb)) = (placed.xattr_block, &node.xblock) {
            let mut b = xb.clone();
            let mut c = crc(self.csum_seed, &blk.to_le_bytes());
            c = crc(c, &b);
            put32(&mut b, 16, c);
            w.put(blk, &b)?;
        }
        Ok(())
    }
}

/// Interleaves group metadata with data so the image is written in disk order.
struct Writer<'o, 'i> {
    seq: Seq<'o>,
    img: &'i Image<'i>,
    next_group: u64,
}

impl Writer<'_, '_> {
    fn meta_upto(&mut self, group: u64) -> Result<(), Ext4Error> {
        while self.next_group < group.min(self.img.lay.geo.groups) {
            let (off, buf) = self.img.group_meta(self.next_group);
            self.seq.put(off, &buf)?;
            self.next_group += 1;
        }
        Ok(())
    }

    /// Write whole blocks starting at block `blk`.
    fn put(&mut self, blk: u64, data: &[u8]) -> Result<(), Ext4Error> {
        self.meta_upto(blk / BPG + 1)?;
        self.seq.put(blk * BS, data)
    }
}

fn write_extent_node(
    b: &mut [u8],
    max: u16,
    depth: u16,
    extents: &[Extent],
    f: impl Fn(&Extent) -> (u64, u64, u64),
) {
    put16(b, 0, 0xF30A);
    put16(b, 2, extents.len() as u16);
    put16(b, 4, max);
    put16(b, 6, depth);
    for (i, e) in extents.iter().enumerate() {
        let (lblk, len, phys) = f(e);
        let o = 12 + 12 * i;
        put32(b, o, lblk as u32);
        put16(b, o + 4, len as u16);
        put16(b, o + 6, (phys >> 32) as u16);
        put32(b, o + 8, phys as u32);
    }
}

fn write_index_node(b: &mut [u8], max: u16, depth: u16, entries: &[(u64, u64)]) {
    put16(b, 0, 0xF30A);
    put16(b, 2, entries.len() as u16);
    put16(b, 4, max);
    put16(b, 6, depth);
    for (i, &(lblk, leaf)) in entries.iter().enumerate() {
        let o = 12 + 12 * i;
        put32(b, o, lblk as u32);
        put32(b, o + 4, leaf as u32);
        put16(b, o + 8, (leaf >> 32) as u16);
    }
}

/// One directory block: the entries in `range` (or a single empty entry), then the checksum
/// tail.
fn render_dir_block(ents: &[DirEnt], range: Option<(usize, usize)>, seed: u32) -> Vec<u8> {
    let mut b = vec![0u8; BSU];
    let cap = BSU - 12;
    let ents = match range {
        Some((s, e)) => &ents[s..e],
        None => &[],
    };
    if ents.is_empty() {
        put16(&mut b, 4, cap as u16);
    }
    let mut off = 0;
    for (i, d) in ents.iter().enumerate() {
        let len = dirent_len(d.name.len());
        let rec_len = if i + 1 == ents.len() { cap - off } else { len };
        put32(&mut b, off, d.ino);
        put16(&mut b, off + 4, rec_len as u16);
        b[off + 6] = d.name.len() as u8;
        b[off + 7] = d.ftype;
        b[off + 8..off + 8 + d.name.len()].copy_from_slice(&d.name);
        off += len;
    }
    put16(&mut b, cap + 4, 12);
    b[cap + 7] = 0xDE;
    let c = crc(seed, &b[..cap]);
    put32(&mut b, cap + 8, c);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_ext4_convention() {
        // crc32c of "123456789" is 0xE3069283 with standard inversion.
        assert_eq!(!crc(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn block_runs_merge_and_clip() {
        assert_eq!(block_runs(&[(0, 5)], 5), vec![(0, 1)]);
        assert_eq!(
            block_runs(&[(0, 4096), (4096, 10), (20000, 1)], 30000),
            vec![(0, 2), (4, 1)]
        );
    }

    #[test]
    fn sparse_super_groups() {
        let geo = Geometry::new(64 << 30, 100).unwrap();
        let with: Vec<u64> = (0..60).filter(|&g| geo.has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }
}
