//! Building a whole disk: size every partition from its content, plan the layout, then write the
//! GPT and each filesystem straight into the output image (raw or qcow2) in one pass. The image
//! appears at its path only when complete.

use super::WriteAt;
use super::ext4::{Ext4Error, Ext4Options, ext4_min_size, write_ext4};
use super::fat::{FatError, FatOptions, fat32_min_size, write_fat32};
use super::gpt::{GptError, PartitionKind};
use super::image::{ImageError, ImageFormat, ImageOptions, ImageReport, ImageWriter};
use super::layout::{Filesystem, Layout, LayoutError, PartitionSpec, Size, plan};
use super::{Region, derive_id};
use crate::tree::Tree;
use std::path::Path;

/// One partition to build: what it is, how big, and (for filesystems) the tree it holds.
pub struct PartitionInput {
    pub name: String,
    pub kind: PartitionKind,
    pub filesystem: Filesystem,
    pub size: Size,
    /// Filesystem label (default: the partition name).
    pub label: Option<String>,
    /// Content for `Fat32`/`Ext4` partitions (empty tree when absent).
    pub tree: Option<Tree>,
}

/// A dm-verity hash tree over one partition, in another.
pub struct VeritySpec<'a> {
    /// The partition the tree covers (the root) and the one that holds it.
    pub data: String,
    pub hash: String,
    pub params: crate::verity::VerityParams,
    /// A partition whose tree depends on the root hash (the ESP, whose unified kernel image
    /// carries it on the command line), remade once it is known: (name, maker from the hex
    /// root hash). Its tree in `partitions` sizes it, so the maker must give the same sizes.
    pub remake: Option<(String, TreeMaker<'a>)>,
}

/// Makes a partition's tree from the verity root hash (hex).
pub type TreeMaker<'a> = Box<dyn Fn(&str) -> Result<Tree, String> + 'a>;

/// A whole disk to build.
pub struct DiskSpec<'a> {
    pub size: Size,
    pub image: ImageOptions,
    /// Everything that identifies the disk (GUIDs, UUIDs, serials, hash seeds) derives from it.
    pub seed: String,
    /// Filesystem timestamps (SOURCE_DATE_EPOCH).
    pub epoch: i64,
    pub partitions: Vec<PartitionInput>,
    /// Protect a partition with dm-verity (its data partition is written first, hashed, and
    /// the partitions' UUIDs are the halves of the root hash, as Discoverable Partitions say).
    pub verity: Option<VeritySpec<'a>>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct DiskReport {
    pub layout: Layout,
    pub image: ImageReport,
    /// The dm-verity root hash (hex), when the disk has a hash tree.
    pub root_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("partition table")]
    Gpt(#[from] GptError),
    #[error("partition `{partition}` (ext4)")]
    Ext4 {
        partition: String,
        #[source]
        source: Ext4Error,
    },
    #[error("partition `{partition}` (FAT32)")]
    Fat {
        partition: String,
        #[source]
        source: FatError,
    },
    #[error("partition `{partition}` (swap)")]
    Swap {
        partition: String,
        #[source]
        source: std::io::Error,
    },
    #[error("partition `{partition}`: a {kind} partition cannot hold files")]
    TreeOnRawPartition {
        partition: String,
        kind: &'static str,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("the dm-verity hash tree of partition `{partition}`")]
    Verity {
        partition: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dm-verity: {0}")]
    VeritySpec(String),
}

/// Smallest swap area kiln writes (one page header plus some pages).
const MIN_SWAP: u64 = 1 << 20;

/// Writes go to both: the image, and a scratch file the hash tree is computed from.
struct Tee<'a> {
    image: &'a mut dyn WriteAt,
    copy: &'a mut std::fs::File,
}

impl WriteAt for Tee<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.image.write_at(offset, data)?;
        self.copy.write_at(offset, data)
    }
}

/// Build the disk at `out` (written to a temp file and renamed into place when complete).
pub fn build_disk(spec: &DiskSpec, out: &Path) -> Result<DiskReport, DiskError> {
    let mut specs = Vec::with_capacity(spec.partitions.len());
    for p in &spec.partitions {
        let min_size = match (p.filesystem, &p.tree) {
            (Filesystem::Ext4, tree) => {
                let empty = Tree::new();
                ext4_min_size(tree.as_ref().unwrap_or(&empty)).map_err(|source| {
                    DiskError::Ext4 {
                        partition: p.name.clone(),
                        source,
                    }
                })?
            }
            (Filesystem::Fat32, tree) => {
                let empty = Tree::new();
                fat32_min_size(tree.as_ref().unwrap_or(&empty)).map_err(|source| {
                    DiskError::Fat {
                        partition: p.name.clone(),
                        source,
                    }
                })?
            }
            (Filesystem::Swap, None) => MIN_SWAP,
            (Filesystem::None, None) => 0,
            (Filesystem::Swap, Some(_)) | (Filesystem::None, Some(_)) => {
                return Err(DiskError::TreeOnRawPartition {
                    partition: p.name.clone(),
                    kind: if p.filesystem == Filesystem::Swap {
                        "swap"
                    } else {
                        "raw"
                    },
                });
            }
        };
        specs.push(PartitionSpec {
            name: p.name.clone(),
            kind: p.kind,
            filesystem: p.filesystem,
            size: p.size,
            min_size,
        });
    }
    let mut layout = plan(spec.size, &specs, &spec.seed)?;
    if let Some(v) = &spec.verity {
        // The hash partition holds the tree of the data partition as planned: plan again when
        // the first guess was short.
        let index = |name: &str| {
            specs
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| DiskError::VeritySpec(format!("no partition named `{name}`")))
        };
        let (data, hash) = (index(&v.data)?, index(&v.hash)?);
        for _ in 0..3 {
            let needed = crate::verity::hash_device_size(layout.partitions[data].size);
            if needed <= layout.partitions[hash].size {
                break;
            }
            specs[hash].min_size = needed;
            layout = plan(spec.size, &specs, &spec.seed)?;
        }
    }
    tracing::debug!(disk_size = layout.disk_size, "planned layout");
    let mut image = ImageWriter::create(out, layout.disk_size, &spec.image)?;
    let mut root_hash = None;
    let mut remade: Option<(usize, Tree)> = None;
    let mut done = vec![false; spec.partitions.len()];
    if let Some(v) = &spec.verity {
        let data = specs.iter().position(|p| p.name == v.data).unwrap_or(0);
        let hash = specs.iter().position(|p| p.name == v.hash).unwrap_or(0);
        let verity_err = |source| DiskError::Verity {
            partition: v.data.clone(),
            source,
        };
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        let mut copy = match dir {
            Some(d) => tempfile::tempfile_in(d),
            None => tempfile::tempfile(),
        }
        .map_err(verity_err)?;
        {
            let planned = &layout.partitions[data];
            let mut region = Region::new(&mut image, planned.offset, planned.size);
            let mut tee = Tee {
                image: &mut region,
                copy: &mut copy,
            };
            write_partition(spec, &spec.partitions[data], planned, &mut tee, None)?;
        }
        let planned = &layout.partitions[data];
        let tree = {
            use std::os::unix::fs::FileExt;
            copy.set_len(planned.size).map_err(verity_err)?;
            crate::verity::hash_tree(planned.size, &v.params, |i, buf| {
                copy.read_exact_at(buf, i * crate::verity::BLOCK)?;
                Ok(true)
            })
            .map_err(verity_err)?
        };
        let hex = tree.root_hex();
        // Discoverable Partitions: the data partition's UUID is the root hash's first half, the
        // hash partition's the second, so the pair is found from the hash alone.
        let mut first = [0u8; 16];
        let mut second = [0u8; 16];
        first.copy_from_slice(&tree.root_hash[..16]);
        second.copy_from_slice(&tree.root_hash[16..]);
        layout.partitions[data].guid = first;
        layout.partitions[hash].guid = second;
        let hash_part = &layout.partitions[hash];
        let mut region = Region::new(&mut image, hash_part.offset, hash_part.size);
        region
            .write_at(0, &tree.device)
            .map_err(|source| DiskError::Verity {
                partition: v.hash.clone(),
                source,
            })?;
        done[data] = true;
        done[hash] = true;
        if let Some((name, maker)) = &v.remake {
            let at = specs
                .iter()
                .position(|p| &p.name == name)
                .ok_or_else(|| DiskError::VeritySpec(format!("no partition named `{name}`")))?;
            remade = Some((at, maker(&hex).map_err(DiskError::VeritySpec)?));
        }
        tracing::info!(root_hash = %hex, blocks = tree.data_blocks, "dm-verity hash tree");
        root_hash = Some(hex);
    }
    for (i, (input, planned)) in spec.partitions.iter().zip(&layout.partitions).enumerate() {
        if done[i] {
            continue;
        }
        let tree = remade.as_ref().filter(|(at, _)| *at == i).map(|(_, t)| t);
        let mut region = Region::new(&mut image, planned.offset, planned.size);
        write_partition(spec, input, planned, &mut region, tree)?;
    }
    layout.write_table(&mut image)?;
    let image = image.finish()?;
    Ok(DiskReport {
        layout,
        image,
        root_hash,
    })
}

/// Write one partition's file system (or swap signature) into `out` (the partition's region).
fn write_partition(
    spec: &DiskSpec,
    input: &PartitionInput,
    planned: &super::layout::PlannedPartition,
    out: &mut dyn WriteAt,
    tree_override: Option<&Tree>,
) -> Result<(), DiskError> {
    {
        let region = out;
        let label = input.label.clone().unwrap_or_else(|| input.name.clone());
        let seed = format!("{}/{}", spec.seed, input.name);
        let empty = Tree::new();
        let tree = tree_override.or(input.tree.as_ref()).unwrap_or(&empty);
        tracing::info!(
            partition = %input.name,
            size = planned.size,
            "writing {:?}",
            input.filesystem
        );
        match input.filesystem {
            Filesystem::Ext4 => {
                let opts = Ext4Options {
                    seed,
                    label,
                    epoch: spec.epoch,
                };
                write_ext4(tree, region, planned.size, &opts).map_err(|source| {
                    DiskError::Ext4 {
                        partition: input.name.clone(),
                        source,
                    }
                })?;
            }
            Filesystem::Fat32 => {
                let mut opts = FatOptions::new(seed, spec.epoch);
                opts.label = label;
                write_fat32(tree, region, planned.size, &opts).map_err(|source| {
                    DiskError::Fat {
                        partition: input.name.clone(),
                        source,
                    }
                })?;
            }
            Filesystem::Swap => {
                write_swap(region, planned.size, &seed, &label).map_err(|source| {
                    DiskError::Swap {
                        partition: input.name.clone(),
                        source,
                    }
                })?;
            }
            Filesystem::None => {}
        }
    }
    Ok(())
}

/// Write a Linux swap signature (version 1, 4 KiB pages) like `mkswap`: the header in the first
/// page, `SWAPSPACE2` at its end.
fn write_swap(out: &mut dyn WriteAt, size: u64, seed: &str, label: &str) -> std::io::Result<()> {
    const PAGE: u64 = 4096;
    let pages = size / PAGE;
    if pages < 10 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("swap needs at least 40 KiB, the partition has {size} bytes"),
        ));
    }
    let mut page = vec![0u8; PAGE as usize];
    // struct swap_header_v1_2 starts after 1024 bytes of boot block.
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes()); // version
    let last_page = (pages - 1).min(u64::from(u32::MAX)) as u32;
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    // nr_badpages = 0 at 1032..1036
    page[1036..1052].copy_from_slice(&derive_id(seed, "swap-uuid"));
    let name = label.as_bytes();
    let n = name.len().min(16);
    page[1052..1052 + n].copy_from_slice(&name[..n]);
    page[PAGE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    out.write_at(0, &page)
}

/// Parse a format name from the command line or a recipe.
pub fn image_format(name: &str) -> Option<ImageFormat> {
    match name {
        "raw" => Some(ImageFormat::Raw),
        "qcow2" => Some(ImageFormat::Qcow2),
        _ => None,
    }
}
