//! FAT32 for the ESP: a write-once builder that lays out a whole [`Tree`] as a FAT32 filesystem in
//! one sequential pass (boot sectors, both FATs, then every cluster in order).
//!
//! Layout decisions, all fixed so that the same Tree and seed give the same bytes:
//! - 512-byte sectors; 32 reserved sectors (boot sector at 0, FSInfo at 1, their backups at 6 and
//!   7); two FATs; media 0xF8; root directory at cluster 2.
//! - Cluster size from the partition size, per the table in Microsoft's FAT specification
//!   (fatgen103; `mkfs.fat -F 32` uses the same table): up to 260 MiB 512 B, up to 8 GiB 4 KiB, up
//!   to 16 GiB 8 KiB, up to 32 GiB 16 KiB, above 32 KiB. Partitions of 32.5 MiB (66,600 sectors) or
//!   less cannot be FAT32 and are refused. Each FAT is padded so the data area starts on a
//!   cluster boundary (as `mkfs.fat` does).
//! - Every directory and file gets one contiguous cluster chain, allocated in Tree path order, and
//!   written in that order. Unwritten bytes (free clusters, the unused tail of the FATs, holes in
//!   sparse files) are left to the sink, which reads them as zero.
//! - Names: a name that is already a valid upper-case 8.3 name is stored as a short name only.
//!   Every other name gets VFAT long-name entries and a generated short name: upper case,
//!   characters FAT short names cannot hold become `_`, spaces and embedded periods dropped, base
//!   up to 8 and extension up to 3 characters, and a `~N` tail (N counting up from 1, the base
//!   shortened to fit) unless the upper-cased name fits 8.3 unchanged. Names that fit 8.3 once
//!   upper-cased keep that short name, so no long name equals another entry's short name.
//! - Timestamps: every entry gets `epoch` (UTC, clamped to the DOS range 1980..=2107).
//! - Hard links: FAT has no links, so each link name gets its own copy of the content.
//! - Owners, modes, mtimes and xattrs are ignored: FAT has none (beyond the archive bit, which
//!   every file gets). Symlinks, devices, fifos and sockets are refused.
//! - The boot sector's hidden-sectors field is 0 (the writer does not know where its partition
//!   starts; UEFI and Linux do not use it).

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use crate::disk::{WriteAt, derive_id};
use crate::tree::{Content, EntryKind, Tree, TreeError, TreePath};

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u32 = 32;
const NUM_FATS: u32 = 2;
const ROOT_CLUSTER: u32 = 2;
/// Fewer clusters than this and every FAT implementation reads the volume as FAT16.
const MIN_CLUSTERS: u32 = 65_525;
/// Highest cluster count FAT32 can address (cluster numbers 2..=0x0FFFFFF6).
const MAX_CLUSTERS: u32 = 0x0FFF_FFF5;
/// The FAT specification's floor for FAT32: 32.5 MiB.
const MIN_SECTORS_EXCLUSIVE: u64 = 66_600;
/// Largest file FAT32 can hold (the size field is 32 bits).
const MAX_FILE_LEN: u64 = 0xFFFF_FFFF;
/// A FAT directory may have at most 65,536 32-byte entries (2 MiB).
const MAX_DIR_ENTRIES: usize = 65_536;
const DIR_ENTRY: usize = 32;
const MIB: u64 = 1 << 20;
/// Smallest partition (whole MiB) that can be FAT32.
const MIN_SIZE: u64 = 33 * MIB;
/// Write buffer size: writes reach the sink in chunks of this size.
const CHUNK: usize = 1 << 20;
const END_OF_CHAIN: u32 = 0x0FFF_FFFF;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LONG_NAME: u8 = 0x0F;

/// How to write the filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FatOptions {
    /// Image seed; the volume serial is derived from it (`derive_id(seed, "fat-serial")`).
    pub seed: String,
    /// Volume label: up to 11 ASCII characters that FAT short names allow, or spaces; letters
    /// are stored upper-case. Empty means no label ("NO NAME").
    pub label: String,
    /// Timestamp of every entry, seconds since the Unix epoch (stored as UTC).
    pub epoch: i64,
}

impl FatOptions {
    /// Options with the default label "ESP".
    pub fn new(seed: impl Into<String>, epoch: i64) -> Self {
        FatOptions {
            seed: seed.into(),
            label: "ESP".into(),
            epoch,
        }
    }
}

impl Default for FatOptions {
    fn default() -> Self {
        FatOptions::new("", 0)
    }
}

/// What was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatReport {
    /// Data clusters in the filesystem.
    pub clusters_total: u32,
    /// Clusters holding directories and file contents (the root directory included).
    pub clusters_used: u32,
    /// Bytes per cluster.
    pub cluster_size: u32,
}

/// Errors laying out or writing a FAT32 filesystem.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error(
        "a {size}-byte partition is too small for FAT32 (it needs at least {MIN_CLUSTERS} \
         clusters, i.e. more than 32.5 MiB); make the ESP at least {min} bytes"
    )]
    TooSmall { size: u64, min: u64 },
    #[error(
        "a {size}-byte partition is too large for FAT32 with 512-byte sectors (at most 2 TiB); \
         make the ESP smaller"
    )]
    TooLarge { size: u64 },
    #[error("{path}: FAT cannot hold this name: {reason}; rename it")]
    BadName { path: String, reason: String },
    #[error(
        "{path} and {other} differ only in letter case, which FAT (case-insensitive) cannot hold \
         in one directory; rename one"
    )]
    DuplicateName { path: String, other: String },
    #[error("{path}: FAT cannot hold a {kind}; remove it from the ESP tree")]
    Unsupported { path: String, kind: &'static str },
    #[error(
        "{path}: {len} bytes is larger than the FAT32 file size limit of 4 GiB - 1 (4294967295 bytes)"
    )]
    FileTooLarge { path: String, len: u64 },
    #[error(
        "{path}: directory has {entries} entries (long names included), more than the FAT limit of \
         {MAX_DIR_ENTRIES}; split it"
    )]
    DirTooLarge { path: String, entries: usize },
    #[error(
        "the tree does not fit: it needs {needed} bytes of clusters ({cluster_size}-byte clusters; \
         {path} is the first entry that does not fit) but the {size}-byte partition has only \
         {available}; make the ESP at least {min_size} bytes (see fat32_min_size)"
    )]
    NoSpace {
        path: String,
        needed: u64,
        available: u64,
        cluster_size: u32,
        size: u64,
        min_size: u64,
    },
    #[error("volume label {label:?}: {reason}")]
    BadLabel { label: String, reason: &'static str },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{path}: reading content")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the FAT32 filesystem at byte {offset} of the partition")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Write `tree` as a FAT32 filesystem filling a partition of `size` bytes (rounded down to whole
/// sectors) into `out`, which must read unwritten bytes as zero. Nothing is written if the tree
/// cannot be held (bad names, unsupported entries, too little space).
pub fn write_fat32(
    tree: &Tree,
    out: &mut dyn WriteAt,
    size: u64,
    opts: &FatOptions,
) -> Result<FatReport, FatError> {
    let label = parse_label(&opts.label)?;
    let plan = Plan::new(tree, label.is_some())?;
    let geo = Geometry::for_size(size)?;
    let alloc = plan
        .allocate(&geo)
        .map_err(|(path, needed)| FatError::NoSpace {
            path,
            needed,
            available: u64::from(geo.clusters) * u64::from(geo.cluster_bytes()),
            cluster_size: geo.cluster_bytes(),
            size,
            min_size: fat32_min_size(tree).unwrap_or(0),
        })?;
    let serial = {
        let id = derive_id(&opts.seed, "fat-serial");
        u32::from_le_bytes([id[0], id[1], id[2], id[3]])
    };
    let stamp = DosStamp::from_epoch(opts.epoch);
    let used = alloc.used;

    let mut w = SeqWriter::new(out);
    // Reserved sectors: boot sector, FSInfo, and their backups at 6 and 7.
    let boot = boot_sector(&geo, serial, label.as_ref());
    let fsinfo = fsinfo_sector(&geo, used);
    let mut reserved = vec![0u8; RESERVED_SECTORS as usize * SECTOR as usize];
    reserved[0..512].copy_from_slice(&boot);
    reserved[512..1024].copy_from_slice(&fsinfo);
    reserved[6 * 512..7 * 512].copy_from_slice(&boot);
    reserved[7 * 512..8 * 512].copy_from_slice(&fsinfo);
    w.write(&reserved)?;
    // Both FATs: only the used head of each is written; the rest (free clusters) stays zero.
    for fat in 0..NUM_FATS {
        w.advance_to(geo.fat_offset(fat))?;
        write_fat(&mut w, &alloc.chains)?;
    }
    // Data clusters, in allocation (= Tree path) order.
    for (node, &(first, count)) in plan.nodes.iter().zip(&alloc.chains_by_node) {
        if count == 0 {
            continue;
        }
        w.advance_to(geo.cluster_offset(first))?;
        match &node.body {
            Body::Dir { .. } => {
                let bytes = plan.dir_bytes(node, first, &alloc, label.as_ref(), &stamp);
                w.write(&bytes)?;
            }
            Body::File(content) => write_content(&mut w, node.path, content)?,
        }
    }
    w.flush()?;
    Ok(FatReport {
        clusters_total: geo.clusters,
        clusters_used: used,
        cluster_size: geo.cluster_bytes(),
    })
}

/// Smallest partition size (bytes, multiple of 1 MiB) holding the tree as FAT32 (at least the
/// FAT32 minimum of 65,525 clusters: 33 MiB).
pub fn fat32_min_size(tree: &Tree) -> Result<u64, FatError> {
    let plan = Plan::new(tree, true)?;
    let mut size = MIN_SIZE;
    loop {
        let geo = Geometry::for_size(size)?;
        let cluster = u64::from(geo.cluster_bytes());
        let needed = plan.clusters_needed(cluster);
        if needed <= u64::from(geo.clusters) {
            return Ok(size);
        }
        // Grow by the missing clusters plus their two FAT entries, in whole MiB. A larger size
        // may bring a larger cluster size, so check again.
        let missing = needed - u64::from(geo.clusters);
        let grow = (missing * cluster + missing * 8).div_ceil(MIB).max(1) * MIB;
        size += grow;
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    total_sectors: u32,
    sectors_per_cluster: u32,
    fat_sectors: u32,
    clusters: u32,
}

/// Sectors per cluster for FAT32 by volume size in sectors (fatgen103, "DskTableFAT32").
fn sectors_per_cluster(total_sectors: u64) -> Option<u32> {
    const TABLE: [(u64, u32); 5] = [
        (532_480, 1),     // up to 260 MiB: 512 B
        (16_777_216, 8),  // up to 8 GiB: 4 KiB
        (33_554_432, 16), // up to 16 GiB: 8 KiB
        (67_108_864, 32), // up to 32 GiB: 16 KiB
        (u64::MAX, 64),   // above: 32 KiB
    ];
    if total_sectors <= MIN_SECTORS_EXCLUSIVE {
        return None;
    }
    TABLE
        .iter()
        .find(|&&(limit, _)| total_sectors <= limit)
        .map(|&(_, spc)| spc)
}

impl Geometry {
    fn for_size(size: u64) -> Result<Geometry, FatError> {
        let total = size / SECTOR;
        if total > u64::from(u32::MAX) {
            return Err(FatError::TooLarge { size });
        }
        let too_small = FatError::TooSmall {
            size,
            min: MIN_SIZE,
        };
        let spc = u64::from(sectors_per_cluster(total).ok_or(too_small)?);
        let reserved = u64::from(RESERVED_SECTORS);
        let fats = u64::from(NUM_FATS);
        // FAT sectors for `clusters` entries (plus the two reserved ones), padded so that the
        // data area starts on a cluster boundary.
        let fat_for = |clusters: u64| {
            let mut sectors = ((clusters + 2) * 4).div_ceil(SECTOR);
            while !(reserved + fats * sectors).is_multiple_of(spc) {
                sectors += 1;
            }
            sectors
        };
        let clusters_with = |fat: u64| total.saturating_sub(reserved + fats * fat) / spc;
        let aligned = |sectors: u64| (reserved + fats * sectors).is_multiple_of(spc);
        // A FAT of `f` sectors is enough when it covers the clusters it leaves; that gets easier
        // as `f` grows. Sizing it for every sector as a cluster is enough; sizing it for the
        // clusters that leaves is a lower bound. Step up from there to the smallest that fits.
        let upper = fat_for(total.saturating_sub(reserved) / spc);
        let mut fat = fat_for(clusters_with(upper));
        while fat < upper && !(aligned(fat) && fat_for(clusters_with(fat)) <= fat) {
            fat += 1;
        }
        let clusters = clusters_with(fat).min(u64::from(MAX_CLUSTERS));
        if clusters < u64::from(MIN_CLUSTERS) {
            return Err(FatError::TooSmall {
                size,
                min: MIN_SIZE,
            });
        }
        Ok(Geometry {
            total_sectors: total as u32,
            sectors_per_cluster: spc as u32,
            fat_sectors: fat as u32,
            clusters: clusters as u32,
        })
    }

    fn cluster_bytes(&self) -> u32 {
        self.sectors_per_cluster * SECTOR as u32
    }

    fn fat_offset(&self, index: u32) -> u64 {
        (u64::from(RESERVED_SECTORS) + u64::from(index) * u64::from(self.fat_sectors)) * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        let data = u64::from(RESERVED_SECTORS) + u64::from(NUM_FATS) * u64::from(self.fat_sectors);
        (data + u64::from(cluster - 2) * u64::from(self.sectors_per_cluster)) * SECTOR
    }
}

// ---------------------------------------------------------------------------------------------
// Plan: names and sizes of every entry, independent of the cluster size.

enum Body<'t> {
    Dir { children: Vec<usize> },
    File(&'t Content),
}

struct Node<'t> {
    path: &'t TreePath,
    parent: usize,
    body: Body<'t>,
    short: [u8; 11],
    /// VFAT long name (UTF-16), when the short name alone cannot hold the name.
    long: Option<Vec<u16>>,
    /// Directory: its 32-byte entries (`.`/`..` or the volume label included).
    entries: usize,
}

impl Node<'_> {
    fn len(&self) -> u64 {
        match &self.body {
            Body::Dir { .. } => (self.entries * DIR_ENTRY) as u64,
            Body::File(content) => content.len(),
        }
    }

    /// Directory entries this node takes in its parent.
    fn slots(&self) -> usize {
        1 + self.long.as_ref().map_or(0, |l| l.len().div_ceil(13))
    }
}

struct Plan<'t> {
    nodes: Vec<Node<'t>>,
}

struct Allocation {
    /// `(first cluster, cluster count)` per node; count 0 (first 0) for empty files.
    chains_by_node: Vec<(u32, u32)>,
    /// The non-empty chains in cluster order.
    chains: Vec<(u32, u32)>,
    used: u32,
}

impl<'t> Plan<'t> {
    fn new(tree: &'t Tree, has_label: bool) -> Result<Plan<'t>, FatError> {
        let mut nodes: Vec<Node<'t>> = Vec::with_capacity(tree.len());
        let mut index: BTreeMap<&'t TreePath, usize> = BTreeMap::new();
        for (path, entry) in tree.iter() {
            let body = match &entry.kind {
                EntryKind::Dir => Body::Dir {
                    children: Vec::new(),
                },
                EntryKind::File(content) => Body::File(content),
                EntryKind::HardLink { .. } => {
                    let target = tree.resolve_link(path)?;
                    match tree.get(target).map(|e| &e.kind) {
                        Some(EntryKind::File(content)) => Body::File(content),
                        Some(other) => {
                            return Err(FatError::Unsupported {
                                path: path.to_string(),
                                kind: link_kind(other),
                            });
                        }
                        None => {
                            return Err(TreeError::MissingLinkTarget {
                                path: path.to_string(),
                                target: target.to_string(),
                            }
                            .into());
                        }
                    }
                }
                other => {
                    return Err(FatError::Unsupported {
                        path: path.to_string(),
                        kind: other.name(),
                    });
                }
            };
            if let Body::File(content) = &body
                && content.len() > MAX_FILE_LEN
            {
                return Err(FatError::FileTooLarge {
                    path: path.to_string(),
                    len: content.len(),
                });
            }
            let id = nodes.len();
            let parent = match path.parent() {
                None => {
                    if !matches!(body, Body::Dir { .. }) {
                        return Err(FatError::Unsupported {
                            path: path.to_string(),
                            kind: "root that is not a directory",
                        });
                    }
                    id
                }
                Some(parent) => {
                    let Some(&p) = index.get(&parent) else {
                        return Err(TreeError::ParentNotDir {
                            path: path.to_string(),
                            parent: parent.to_string(),
                        }
                        .into());
                    };
                    match &mut nodes[p].body {
                        Body::Dir { children } => children.push(id),
                        Body::File(_) => {
                            return Err(TreeError::ParentNotDir {
                                path: path.to_string(),
                                parent: parent.to_string(),
                            }
                            .into());
                        }
                    }
                    p
                }
            };
            index.insert(path, id);
            nodes.push(Node {
                path,
                parent,
                body,
                short: [b' '; 11],
                long: None,
                entries: 0,
            });
        }
        if nodes.is_empty() {
            return Err(TreeError::InvalidPath {
                path: "/".into(),
                reason: "tree has no root",
            }
            .into());
        }
        // Names, directory by directory.
        for dir in 0..nodes.len() {
            let children = match &nodes[dir].body {
                Body::Dir { children } => children.clone(),
                Body::File(_) => continue,
            };
            let paths: Vec<&TreePath> = children.iter().map(|&c| nodes[c].path).collect();
            let names = name_directory(&paths)?;
            let mut entries = if dir == 0 { usize::from(has_label) } else { 2 };
            for (&child, (short, long)) in children.iter().zip(names) {
                nodes[child].short = short;
                nodes[child].long = long;
                entries += nodes[child].slots();
            }
            if entries > MAX_DIR_ENTRIES {
                return Err(FatError::DirTooLarge {
                    path: nodes[dir].path.to_string(),
                    entries,
                });
            }
            nodes[dir].entries = entries;
        }
        Ok(Plan { nodes })
    }

    fn clusters_of(node: &Node, cluster: u64) -> u64 {
        let clusters = node.len().div_ceil(cluster);
        match node.body {
            // A directory has at least one cluster, even if empty.
            Body::Dir { .. } => clusters.max(1),
            Body::File(_) => clusters,
        }
    }

    fn clusters_needed(&self, cluster: u64) -> u64 {
        self.nodes
            .iter()
            .map(|n| Self::clusters_of(n, cluster))
            .sum()
    }

    /// Contiguous chains in node order, starting at the root's cluster 2. On overflow, the
    /// path of the first node that does not fit and the bytes the whole tree needs.
    fn allocate(&self, geo: &Geometry) -> Result<Allocation, (String, u64)> {
        let cluster = u64::from(geo.cluster_bytes());
        let mut next = u64::from(ROOT_CLUSTER);
        let end = u64::from(ROOT_CLUSTER) + u64::from(geo.clusters);
        let mut chains_by_node = Vec::with_capacity(self.nodes.len());
        let mut chains = Vec::new();
        for node in &self.nodes {
            let count = Self::clusters_of(node, cluster);
            if next + count > end {
                return Err((
                    node.path.to_string(),
                    self.clusters_needed(cluster) * cluster,
                ));
            }
            if count == 0 {
                chains_by_node.push((0, 0));
            } else {
                chains_by_node.push((next as u32, count as u32));
                chains.push((next as u32, count as u32));
            }
            next += count;
        }
        Ok(Allocation {
            chains_by_node,
            chains,
            used: (next - u64::from(ROOT_CLUSTER)) as u32,
        })
    }

    /// The bytes of a directory: `.`/`..` (or the volume label in the root), then each child's
    /// long-name entries and short entry, then zeros up to the end of its last cluster.
    fn dir_bytes(
        &self,
        dir: &Node,
        first: u32,
        alloc: &Allocation,
        label: Option<&[u8; 11]>,
        stamp: &DosStamp,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(dir.entries * DIR_ENTRY);
        if dir.path.is_root() {
            if let Some(label) = label {
                out.extend_from_slice(&short_entry(label, ATTR_VOLUME_ID, 0, 0, stamp));
            }
        } else {
            let parent = &self.nodes[dir.parent];
            // `..` of a directory in the root points at cluster 0, by convention.
            let parent_cluster = if parent.path.is_root() {
                0
            } else {
                alloc.chains_by_node[dir.parent].0
            };
            out.extend_from_slice(&short_entry(
                b".          ",
                ATTR_DIRECTORY,
                first,
                0,
                stamp,
            ));
            out.extend_from_slice(&short_entry(
                b"..         ",
                ATTR_DIRECTORY,
                parent_cluster,
                0,
                stamp,
            ));
        }
        if let Body::Dir { children } = &dir.body {
            for &child in children {
                let node = &self.nodes[child];
                if let Some(long) = &node.long {
                    for slot in long_entries(long, short_checksum(&node.short)) {
                        out.extend_from_slice(&slot);
                    }
                }
                let (attr, size) = match node.body {
                    Body::Dir { .. } => (ATTR_DIRECTORY, 0),
                    // Checked against MAX_FILE_LEN when planning.
                    Body::File(content) => (ATTR_ARCHIVE, content.len() as u32),
                };
                let cluster = alloc.chains_by_node[child].0;
                out.extend_from_slice(&short_entry(&node.short, attr, cluster, size, stamp));
            }
        }
        out
    }
}

fn link_kind(target: &EntryKind) -> &'static str {
    match target {
        EntryKind::Symlink { .. } => "hard link to a symlink",
        EntryKind::CharDevice { .. } => "hard link to a character device",
        EntryKind::BlockDevice { .. } => "hard link to a block device",
        EntryKind::Fifo => "hard link to a fifo",
        EntryKind::Socket => "hard link to a socket",
        EntryKind::Dir => "hard link to a directory",
        _ => "hard link to a hard link",
    }
}

// ---------------------------------------------------------------------------------------------
// Names

/// Characters a short name may hold besides `A`-`Z` and `0`-`9`.
const SHORT_SPECIALS: &[u8] = b"!#$%&'()-@^_`{}~";

fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || SHORT_SPECIALS.contains(&b)
}

/// Check a name against what VFAT long names can hold; return it as UTF-16.
fn check_long_name(name: &str) -> Result<Vec<u16>, String> {
    for c in name.chars() {
        if (c as u32) < 0x20 || c == '\u{7f}' {
            return Err(format!("control character U+{:04X}", c as u32));
        }
        if "\"*/:<>?\\|".contains(c) {
            return Err(format!("character {c:?} is not allowed"));
        }
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("ends with a period or a space".into());
    }
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > 255 {
        return Err(format!(
            "{} UTF-16 units long, more than the limit of 255",
            units.len()
        ));
    }
    Ok(units)
}

/// The name as an 11-byte short name if, upper-cased, it is a valid 8.3 name as it stands.
fn exact_short_name(name: &str) -> Option<[u8; 11]> {
    if !name.is_ascii() {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    let (base, ext) = match upper.split_once('.') {
        Some((base, ext)) if !ext.is_empty() => (base, ext),
        Some(_) => return None,
        None => (upper.as_str(), ""),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 {
        return None;
    }
    if !base.bytes().chain(ext.bytes()).all(short_char_ok) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// The basis of a generated short name: upper-cased base (up to 8) and extension (up to 3),
/// spaces and periods dropped, other characters short names cannot hold turned into `_`.
fn short_basis(name: &str) -> (Vec<u8>, Vec<u8>) {
    let squeezed: String = name.chars().filter(|&c| c != ' ').collect();
    let trimmed = squeezed.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (trimmed, ""),
    };
    let convert = |part: &str, max: usize| -> Vec<u8> {
        part.chars()
            .filter(|&c| c != '.')
            .map(|c| {
                let b = if c.is_ascii() {
                    c.to_ascii_uppercase() as u8
                } else {
                    b'_'
                };
                if short_char_ok(b) { b } else { b'_' }
            })
            .take(max)
            .collect()
    };
    let mut base = convert(base, 8);
    if base.is_empty() {
        base.push(b'_');
    }
    (base, convert(ext, 3))
}

/// Case folding for the duplicate check: simple per-character upper case.
fn fold(name: &str) -> String {
    name.chars()
        .map(|c| {
            let mut up = c.to_uppercase();
            match (up.next(), up.next()) {
                (Some(u), None) => u,
                _ => c,
            }
        })
        .collect()
}

/// A directory entry's names: the 11-byte short name and, when needed, the UTF-16 long name.
type Names = ([u8; 11], Option<Vec<u16>>);

/// Short names (and long names where needed) for the children of one directory, in order.
fn name_directory(paths: &[&TreePath]) -> Result<Vec<Names>, FatError> {
    let mut folded: BTreeMap<String, &TreePath> = BTreeMap::new();
    let mut units = Vec::with_capacity(paths.len());
    for &path in paths {
        let name = path.file_name();
        let long = check_long_name(name).map_err(|reason| FatError::BadName {
            path: path.to_string(),
            reason,
        })?;
        if let Some(other) = folded.insert(fold(name), path) {
            return Err(FatError::DuplicateName {
                path: path.to_string(),
                other: other.to_string(),
            });
        }
        units.push(long);
    }
    // Names that fit 8.3 once upper-cased keep that short name; reserve them all first so that
    // generated names avoid them whatever the order.
    let exact: Vec<Option<[u8; 11]>> = paths
        .iter()
        .map(|p| exact_short_name(p.file_name()))
        .collect();
    let mut taken: BTreeSet<[u8; 11]> = exact.iter().flatten().copied().collect();
    let mut next_tail: BTreeMap<(Vec<u8>, Vec<u8>), u32> = BTreeMap::new();
    let mut out = Vec::with_capacity(paths.len());
    for ((&path, long), exact) in paths.iter().zip(units).zip(exact) {
        let name = path.file_name();
        if let Some(short) = exact {
            // Upper-case 8.3 names need no long name; others keep their case in one.
            let long = (name.as_bytes() != &short_display(&short)[..]).then_some(long);
            out.push((short, long));
            continue;
        }
        let (base, ext) = short_basis(name);
        let n = next_tail.entry((base.clone(), ext.clone())).or_insert(1);
        let short = loop {
            let tail = format!("~{n}");
            let keep = base.len().min(8 - tail.len());
            let mut short = [b' '; 11];
            short[..keep].copy_from_slice(&base[..keep]);
            short[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
            short[8..8 + ext.len()].copy_from_slice(&ext);
            *n += 1;
            if taken.insert(short) {
                break short;
            }
        };
        out.push((short, Some(long)));
    }
    Ok(out)
}

/// `NAME.EXT` (or `NAME`) of an 11-byte short name.
fn short_display(short: &[u8; 11]) -> Vec<u8> {
    let base: Vec<u8> = short[..8].iter().copied().filter(|&b| b != b' ').collect();
    let ext: Vec<u8> = short[8..].iter().copied().filter(|&b| b != b' ').collect();
    let mut out = base;
    if !ext.is_empty() {
        out.push(b'.');
        out.extend_from_slice(&ext);
    }
    out
}

fn parse_label(label: &str) -> Result<Option<[u8; 11]>, FatError> {
    let bad = |reason| FatError::BadLabel {
        label: label.to_string(),
        reason,
    };
    if label.is_empty() {
        return Ok(None);
    }
    if label.len() > 11 || !label.is_ascii() {
        return Err(bad("must be at most 11 ASCII characters"));
    }
    if label.starts_with(' ') {
        return Err(bad("must not start with a space"));
    }
    let upper = label.to_ascii_uppercase();
    if !upper.bytes().all(|b| b == b' ' || short_char_ok(b)) {
        return Err(bad(
            "may hold only letters, digits, spaces and !#$%&'()-@^_`{}~",
        ));
    }
    let mut out = [b' '; 11];
    out[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(Some(out))
}

/// The checksum of a short name that ties long-name entries to it.
fn short_checksum(short: &[u8; 11]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

// ---------------------------------------------------------------------------------------------
// On-disk structures

/// A DOS date and time (local time = UTC here), 2-second resolution plus a tenths byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DosStamp {
    date: u16,
    time: u16,
    tenths: u8,
}

impl DosStamp {
    /// The DOS form of `epoch`, clamped to 1980-01-01 00:00:00 ..= 2107-12-31 23:59:59.
    fn from_epoch(epoch: i64) -> DosStamp {
        use crate::time::{Civil, SECS_PER_DAY, days_from_civil};
        let min = days_from_civil(1980, 1, 1) * SECS_PER_DAY;
        let max = days_from_civil(2107, 12, 31) * SECS_PER_DAY + SECS_PER_DAY - 1;
        let Civil {
            year: y,
            month: m,
            day: d,
            hour: h,
            minute: min,
            second: s,
            ..
        } = Civil::from_epoch(epoch.clamp(min, max));
        DosStamp {
            date: (((y - 1980) << 9) | (m << 5) | d) as u16,
            time: ((h << 11) | (min << 5) | (s / 2)) as u16,
            tenths: ((s % 2) * 100) as u8,
        }
    }
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, t: &DosStamp) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    e[13] = t.tenths;
    e[14..16].copy_from_slice(&t.time.to_le_bytes());
    e[16..18].copy_from_slice(&t.date.to_le_bytes());
    e[18..20].copy_from_slice(&t.date.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&t.time.to_le_bytes());
    e[24..26].copy_from_slice(&t.date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// VFAT long-name entries for `long`, in on-disk order (last part first).
fn long_entries(long: &[u16], checksum: u8) -> Vec<[u8; 32]> {
    const OFFSETS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    let count = long.len().div_ceil(13);
    (0..count)
        .rev()
        .map(|i| {
            let mut e = [0u8; 32];
            e[0] = (i + 1) as u8 | if i + 1 == count { 0x40 } else { 0 };
            e[11] = ATTR_LONG_NAME;
            e[13] = checksum;
            for (j, &off) in OFFSETS.iter().enumerate() {
                let k = i * 13 + j;
                let unit = match k.cmp(&long.len()) {
                    std::cmp::Ordering::Less => long[k],
                    std::cmp::Ordering::Equal => 0x0000,
                    std::cmp::Ordering::Greater => 0xFFFF,
                };
                e[off..off + 2].copy_from_slice(&unit.to_le_bytes());
            }
            e
        })
        .collect()
}

fn boot_sector(geo: &Geometry, serial: u32, label: Option<&[u8; 11]>) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    b[3..11].copy_from_slice(b"MSWIN4.1");
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = geo.sectors_per_cluster as u8;
    b[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
    b[16] = NUM_FATS as u8;
    // Root entries, 16-bit total sectors: 0 on FAT32.
    b[21] = 0xF8;
    // 16-bit FAT size: 0 on FAT32.
    b[24..26].copy_from_slice(&63u16.to_le_bytes());
    b[26..28].copy_from_slice(&255u16.to_le_bytes());
    // Hidden sectors: 0 (see the module documentation).
    b[32..36].copy_from_slice(&geo.total_sectors.to_le_bytes());
    b[36..40].copy_from_slice(&geo.fat_sectors.to_le_bytes());
    // Flags 0: the FATs are mirrored. Version 0.0.
    b[44..48].copy_from_slice(&ROOT_CLUSTER.to_le_bytes());
    b[48..50].copy_from_slice(&1u16.to_le_bytes());
    b[50..52].copy_from_slice(&6u16.to_le_bytes());
    b[64] = 0x80;
    b[66] = 0x29;
    b[67..71].copy_from_slice(&serial.to_le_bytes());
    b[71..82].copy_from_slice(label.unwrap_or(b"NO NAME    "));
    b[82..90].copy_from_slice(b"FAT32   ");
    // Boot code: not bootable in BIOS mode; ask the firmware for the next device and halt.
    b[90..95].copy_from_slice(&[0xCD, 0x18, 0xF4, 0xEB, 0xFD]);
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn fsinfo_sector(geo: &Geometry, used: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    let free = geo.clusters - used;
    s[488..492].copy_from_slice(&free.to_le_bytes());
    let next_free = if free == 0 {
        u32::MAX
    } else {
        ROOT_CLUSTER + used
    };
    s[492..496].copy_from_slice(&next_free.to_le_bytes());
    s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    s
}

/// One FAT: the two reserved entries, then every chain (each cluster points at the next, the
/// last is end-of-chain). Chains are contiguous and start at cluster 2 with no gaps.
fn write_fat(w: &mut SeqWriter, chains: &[(u32, u32)]) -> Result<(), FatError> {
    let mut buf = Vec::with_capacity(CHUNK);
    buf.extend_from_slice(&0x0FFF_FFF8u32.to_le_bytes());
    buf.extend_from_slice(&END_OF_CHAIN.to_le_bytes());
    for &(first, count) in chains {
        for cluster in first..first + count {
            let value = if cluster + 1 == first + count {
                END_OF_CHAIN
            } else {
                cluster + 1
            };
            buf.extend_from_slice(&value.to_le_bytes());
            if buf.len() == CHUNK {
                w.write(&buf)?;
                buf.clear();
            }
        }
    }
    w.write(&buf)
}

fn write_content(w: &mut SeqWriter, path: &TreePath, content: &Content) -> Result<(), FatError> {
    let read_err = |source| FatError::Read {
        path: path.to_string(),
        source,
    };
    let start = w.position();
    let len = content.len();
    let reader = content.reader().map_err(read_err)?;
    for (offset, range_len) in content.data_ranges().map_err(read_err)? {
        let end = (offset + range_len).min(len);
        if offset >= end {
            continue;
        }
        w.advance_to(start + offset)?;
        let mut at = offset;
        while at < end {
            let want = (end - at).min(CHUNK as u64) as usize;
            let space = w.space(want)?;
            let n = reader.read_at(at, space).map_err(read_err)?;
            if n == 0 {
                return Err(read_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("content ended at byte {at} of {len}"),
                )));
            }
            w.commit(n)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Buffers forward writes into large chunks; gaps are zero-filled in the buffer when small and
/// skipped (left unwritten, reading as zero) when large.
struct SeqWriter<'a> {
    out: &'a mut dyn WriteAt,
    buf: Vec<u8>,
    filled: usize,
    base: u64,
}

impl<'a> SeqWriter<'a> {
    fn new(out: &'a mut dyn WriteAt) -> Self {
        SeqWriter {
            out,
            buf: vec![0; CHUNK],
            filled: 0,
            base: 0,
        }
    }

    fn position(&self) -> u64 {
        self.base + self.filled as u64
    }

    fn flush(&mut self) -> Result<(), FatError> {
        if self.filled > 0 {
            self.out
                .write_at(self.base, &self.buf[..self.filled])
                .map_err(|source| FatError::Write {
                    offset: self.base,
                    source,
                })?;
            self.base += self.filled as u64;
            self.filled = 0;
        }
        Ok(())
    }

    /// Move forward to `offset`; the bytes in between read as zero.
    fn advance_to(&mut self, offset: u64) -> Result<(), FatError> {
        let pos = self.position();
        if offset < pos {
            return Err(FatError::Write {
                offset,
                source: io::Error::other(format!(
                    "internal error: layout went backwards from {pos}"
                )),
            });
        }
        let gap = offset - pos;
        if gap <= (CHUNK - self.filled) as u64 {
            let gap = gap as usize;
            self.buf[self.filled..self.filled + gap].fill(0);
            self.filled += gap;
            if self.filled == CHUNK {
                self.flush()?;
            }
        } else {
            self.flush()?;
            self.base = offset;
        }
        Ok(())
    }

    fn write(&mut self, mut data: &[u8]) -> Result<(), FatError> {
        while !data.is_empty() {
            let space = self.space(data.len())?;
            let n = space.len();
            space.copy_from_slice(&data[..n]);
            self.commit(n)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Up to `max` bytes of buffer to fill at the current position; then [`Self::commit`].
    fn space(&mut self, max: usize) -> Result<&mut [u8], FatError> {
        if self.filled == CHUNK {
            self.flush()?;
        }
        let end = (self.filled + max).min(CHUNK);
        Ok(&mut self.buf[self.filled..end])
    }

    fn commit(&mut self, n: usize) -> Result<(), FatError> {
        self.filled += n;
        if self.filled == CHUNK {
            self.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;

    #[test]
    fn cluster_sizes_follow_the_spec_table() {
        assert!(matches!(
            Geometry::for_size(32 * MIB),
            Err(FatError::TooSmall { .. })
        ));
        let g = Geometry::for_size(MIN_SIZE).unwrap();
        assert_eq!(g.cluster_bytes(), 512);
        assert!(g.clusters >= MIN_CLUSTERS);
        assert_eq!(Geometry::for_size(260 * MIB).unwrap().cluster_bytes(), 512);
        assert_eq!(Geometry::for_size(261 * MIB).unwrap().cluster_bytes(), 4096);
        assert_eq!(
            Geometry::for_size(8192 * MIB).unwrap().cluster_bytes(),
            4096
        );
        assert_eq!(
            Geometry::for_size(8193 * MIB).unwrap().cluster_bytes(),
            8192
        );
        assert_eq!(
            Geometry::for_size(32768 * MIB + MIB)
                .unwrap()
                .cluster_bytes(),
            32768
        );
        assert!(matches!(
            Geometry::for_size(3 << 40),
            Err(FatError::TooLarge { .. })
        ));
    }

    #[test]
    fn fat_covers_clusters_and_data_is_cluster_aligned() {
        for mib in [33, 100, 260, 261, 1000, 8193, 16385, 40000] {
            let g = Geometry::for_size(mib * MIB).unwrap();
            assert!(u64::from(g.fat_sectors) * 128 >= u64::from(g.clusters) + 2);
            // Not wasteful: one sector-per-cluster alignment step at most.
            let fewer = u64::from(g.fat_sectors) - 32;
            assert!(fewer * 128 < u64::from(g.clusters) + 2, "{mib} MiB: {g:?}");
            assert_eq!(g.cluster_offset(2) % u64::from(g.cluster_bytes()), 0);
            let end = g.cluster_offset(2) + u64::from(g.clusters) * u64::from(g.cluster_bytes());
            assert!(end <= mib * MIB);
        }
    }

    #[test]
    fn checksum_matches_the_spec_algorithm() {
        // Reference: the byte-wise algorithm from the FAT specification.
        let name = *b"README  TXT";
        let mut sum: u8 = 0;
        for &b in &name {
            sum = (if sum & 1 != 0 { 0x80u8 } else { 0 })
                .wrapping_add(sum >> 1)
                .wrapping_add(b);
        }
        assert_eq!(short_checksum(&name), sum);
    }

    fn names(list: &[&str]) -> Vec<(String, bool)> {
        let paths: Vec<TreePath> = list.iter().map(|n| TreePath::new(n).unwrap()).collect();
        let refs: Vec<&TreePath> = paths.iter().collect();
        name_directory(&refs)
            .unwrap()
            .into_iter()
            .map(|(s, l)| (String::from_utf8(short_display(&s)).unwrap(), l.is_some()))
            .collect()
    }

    #[test]
    fn short_names_like_windows() {
        let got = names(&[
            "BOOTX64.EFI",
            "readme.txt",
            "Long File Name.html",
            "Long File Name 2.html",
            "a+b.c",
            ".bashrc",
            "über.txt",
            "x.tar.gz",
            "FOO~1",
            "foo bar",
        ]);
        let want = [
            ("BOOTX64.EFI", false),
            ("README.TXT", true),
            ("LONGFI~1.HTM", true),
            ("LONGFI~2.HTM", true),
            ("A_B~1.C", true),
            ("BASHRC~1", true),
            ("_BER~1.TXT", true),
            ("XTAR~1.GZ", true),
            ("FOO~1", false),
            ("FOOBAR~1", true),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(s, l)| (s.to_string(), *l)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn tails_grow_and_avoid_reserved_names() {
        let list: Vec<String> = (0..120).map(|i| format!("long name {i}.txt")).collect();
        let mut refs: Vec<&str> = list.iter().map(String::as_str).collect();
        refs.push("LONGNA~3.TXT");
        let got = names(&refs);
        let set: BTreeSet<&String> = got.iter().map(|(s, _)| s).collect();
        assert_eq!(set.len(), got.len());
        assert_eq!(got[2].0, "LONGNA~4.TXT");
        assert_eq!(got[9].0, "LONGN~11.TXT");
        assert_eq!(got[119].0, "LONG~121.TXT");
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "a:b",
            "a?",
            "tab\there",
            "end.",
            "end ",
            "q\"",
            "a|b",
            "a<b",
            "del\u{7f}",
        ] {
            assert!(check_long_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_long_name(&"x".repeat(255)).is_ok());
        assert!(check_long_name(&"x".repeat(256)).is_err());
        assert!(check_long_name(&"😀".repeat(128)).is_err());
    }

    #[test]
    fn dos_stamps() {
        // 2023-11-14 22:13:20 UTC
        let t = DosStamp::from_epoch(1_700_000_000);
        assert_eq!(t.date, ((2023 - 1980) << 9) | (11 << 5) | 14);
        assert_eq!(t.time, (22 << 11) | (13 << 5) | 10);
        assert_eq!(t.tenths, 0);
        assert_eq!(DosStamp::from_epoch(0).date, (1 << 5) | 1);
        assert_eq!(
            DosStamp::from_epoch(i64::MAX).date,
            (127 << 9) | (12 << 5) | 31
        );
        assert_eq!(DosStamp::from_epoch(1_700_000_001).tenths, 100);
    }

    #[test]
    fn long_entries_hold_the_name_in_reverse_order() {
        let name: Vec<u16> = "abcdefghijklmnopq".encode_utf16().collect();
        let e = long_entries(&name, 0x42);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0][0], 0x42);
        assert_eq!(e[1][0], 0x01);
        assert_eq!(e[1][1], b'a');
        assert_eq!(e[0][1], b'n');
        // After "q": a 0x0000 terminator, then 0xFFFF padding.
        assert_eq!(&e[0][9..11], &[0, 0]);
        assert_eq!(&e[0][14..16], &[0xFF, 0xFF]);
        assert!(e.iter().all(|s| s[11] == 0x0F && s[13] == 0x42));
    }

    #[test]
    fn writes_in_memory_and_refuses_too_much_content() {
        let mut tree = Tree::new();
        tree.add("/a/b.txt", Entry::file(Content::inline("hi"), 0o644))
            .unwrap();
        let mut img = Vec::new();
        let report = write_fat32(&tree, &mut img, MIN_SIZE, &FatOptions::default()).unwrap();
        assert_eq!(report.cluster_size, 512);
        assert_eq!(report.clusters_used, 3);
        assert_eq!(&img[510..512], &[0x55, 0xAA]);
        assert_eq!(&img[..512], &img[6 * 512..7 * 512]);

        tree.add(
            "/big",
            Entry::file(
                Content::Zeros {
                    len: MIN_SIZE + MIB,
                },
                0o644,
            ),
        )
        .unwrap();
        let err = write_fat32(&tree, &mut Vec::new(), MIN_SIZE, &FatOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/big"), "{err}");
        let min = fat32_min_size(&tree).unwrap();
        assert!(min > MIN_SIZE + MIB && min.is_multiple_of(MIB), "{min}");
        write_fat32(&tree, &mut Vec::new(), min, &FatOptions::default()).unwrap();
    }
}
