//! The GUID partition table: protective MBR at LBA 0, primary header at LBA 1 with its 128-entry
//! array at LBA 2-33, and the backup array and header in the last 33 sectors of the disk.
//!
//! The `gpt` crate builds the structures and checksums. It wants a `Read + Write + Seek` device,
//! so [`write_gpt`] hands it a [`SparseDisk`]: an in-memory map of the 512-byte sectors actually
//! written over a virtual size. Only those sectors (about 68) are then copied to the caller's
//! [`WriteAt`] sink, so a 100 GiB disk costs no more memory than a 10 MiB one. The crate can do
//! everything needed here: explicit disk and partition GUIDs, names, exact LBAs (the whole entry
//! map is handed over with `update_partitions`), and deterministic output (no random GUID is drawn
//! when both are given; the MBR disk signature is zero). It silently truncates names longer than
//! 36 UTF-16 units, so [`write_gpt`] rejects those first.
//!
//! GUIDs are passed as 16 bytes in RFC 4122 (text) order, e.g. what `derive_id` returns or
//! `uuid::Uuid::as_bytes`; on disk they are stored mixed-endian (first three fields little-endian)
//! and `sgdisk -i` prints back exactly the GUID given.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::WriteAt;

/// Bytes per logical sector. Only 512-byte sectors are produced.
pub const SECTOR_SIZE: u64 = 512;
/// Number of entries in each partition entry array (the UEFI minimum, what every tool writes).
pub const MAX_PARTITIONS: usize = 128;
/// Sectors taken by one header plus one 128 x 128-byte entry array.
pub const TABLE_SECTORS: u64 = 33;
/// First LBA a partition may use: after the MBR, the primary header and its entry array.
pub const FIRST_USABLE_LBA: u64 = 1 + TABLE_SECTORS;
/// Longest partition name, in UTF-16 code units (72 bytes in the entry).
pub const MAX_NAME_UNITS: usize = 36;

/// Partition types from the Discoverable Partitions Specification, so that `systemd-dissect`
/// and systemd's auto-discovery understand the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartitionKind {
    /// EFI System Partition.
    Esp,
    /// Root file system for x86-64.
    RootX86_64,
    /// The dm-verity hash tree of the x86-64 root (Discoverable Partitions).
    RootVerityX86_64,
    /// Generic Linux data.
    LinuxData,
    /// Swap.
    Swap,
}

impl PartitionKind {
    /// The partition type GUID in RFC 4122 byte order.
    pub fn type_guid(self) -> [u8; 16] {
        *self.type_uuid().as_bytes()
    }

    /// The partition type GUID.
    pub fn type_uuid(self) -> uuid::Uuid {
        match self {
            PartitionKind::Esp => uuid::uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
            PartitionKind::RootX86_64 => uuid::uuid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
            PartitionKind::RootVerityX86_64 => {
                uuid::uuid!("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5")
            }
            PartitionKind::LinuxData => uuid::uuid!("0fc63daf-8483-4772-8e79-3d69d8477de4"),
            PartitionKind::Swap => uuid::uuid!("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"),
        }
    }

    /// Short name used in messages and recipes.
    pub fn name(self) -> &'static str {
        match self {
            PartitionKind::Esp => "esp",
            PartitionKind::RootX86_64 => "root-x86-64",
            PartitionKind::RootVerityX86_64 => "root-x86-64-verity",
            PartitionKind::LinuxData => "linux-data",
            PartitionKind::Swap => "swap",
        }
    }
}

impl std::fmt::Display for PartitionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the table, with exact sector bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub name: String,
    pub kind: PartitionKind,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    /// Unique partition GUID, RFC 4122 byte order.
    pub guid: [u8; 16],
}

/// Errors writing a partition table.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error(
        "disk size {size} bytes is not a multiple of the {SECTOR_SIZE}-byte sector; round it to a whole number of sectors (ideally MiB)"
    )]
    UnalignedDisk { size: u64 },
    #[error(
        "disk of {size} bytes is too small for a GPT: it needs at least {needed} bytes (tables at both ends plus one sector); make the disk bigger"
    )]
    DiskTooSmall { size: u64, needed: u64 },
    #[error(
        "{count} partitions given but a GPT entry array holds at most {MAX_PARTITIONS}; merge partitions"
    )]
    TooManyPartitions { count: usize },
    #[error(
        "partition {name:?}: name is {units} UTF-16 units long, the GPT allows at most {MAX_NAME_UNITS}; shorten it"
    )]
    NameTooLong { name: String, units: usize },
    #[error(
        "partition {name:?}: sectors {first_lba}..={last_lba} are outside the usable area {first_usable}..={last_usable} of this disk; fix the layout or enlarge the disk"
    )]
    OutOfRange {
        name: String,
        first_lba: u64,
        last_lba: u64,
        first_usable: u64,
        last_usable: u64,
    },
    #[error(
        "partitions {first:?} (sectors ..={first_last}) and {second:?} (sectors {second_first}..) overlap; fix the layout"
    )]
    Overlap {
        first: String,
        first_last: u64,
        second: String,
        second_first: u64,
    },
    #[error(
        "partition {name:?}: GUID {guid} is nil or used by another partition; every partition needs a unique non-zero GUID"
    )]
    BadGuid { name: String, guid: String },
    #[error("building the protective MBR failed")]
    Mbr(#[source] ::gpt::mbr::MBRError),
    #[error("building the GPT structures failed")]
    Table(#[source] ::gpt::GptError),
    #[error(
        "writing the partition table ({len} bytes at offset {offset}) to the disk image failed"
    )]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Write a protective MBR and the primary and backup GPT for a disk of `disk_size` bytes into
/// `out`. Only table sectors are written; partition contents are untouched. Partitions are stored
/// in the entry array in the order given (entry 1 = `parts[0]`). Same inputs, same bytes.
pub fn write_gpt(
    out: &mut dyn WriteAt,
    disk_size: u64,
    disk_guid: [u8; 16],
    parts: &[GptPartition],
) -> Result<(), GptError> {
    let (first_usable, last_usable) = usable_lbas(disk_size)?;
    check_partitions(parts, first_usable, last_usable)?;

    let sectors = disk_size / SECTOR_SIZE;
    let mut device = SparseDisk::new(disk_size);

    // Protective MBR covers LBA 1 to the end of the disk, capped at what 32 bits can say.
    let mbr =
        ::gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut device).map_err(GptError::Mbr)?;

    let mut disk = ::gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(::gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(device, Some(uuid::Uuid::from_bytes(disk_guid)))
        .map_err(GptError::Table)?;

    let entries: BTreeMap<u32, ::gpt::partition::Partition> = parts
        .iter()
        .zip(1u32..)
        .map(|(p, id)| {
            let entry = ::gpt::partition::Partition {
                part_type_guid: ::gpt::partition_types::Type {
                    guid: p.kind.type_uuid(),
                    os: ::gpt::partition_types::OperatingSystem::None,
                },
                part_guid: uuid::Uuid::from_bytes(p.guid),
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                flags: 0,
                name: p.name.clone(),
            };
            (id, entry)
        })
        .collect();
    disk.update_partitions(entries).map_err(GptError::Table)?;
    let device = disk.write().map_err(GptError::Table)?;

    // Copy the written sectors out as a few contiguous runs (the head and the tail of the disk).
    for (lba, run) in device.runs() {
        let offset = lba * SECTOR_SIZE;
        out.write_at(offset, &run)
            .map_err(|source| GptError::Write {
                offset,
                len: run.len(),
                source,
            })?;
    }
    Ok(())
}

/// First and last LBA a partition may use on a disk of `disk_size` bytes.
pub fn usable_lbas(disk_size: u64) -> Result<(u64, u64), GptError> {
    if !disk_size.is_multiple_of(SECTOR_SIZE) {
        return Err(GptError::UnalignedDisk { size: disk_size });
    }
    let sectors = disk_size / SECTOR_SIZE;
    // MBR + primary table + at least one usable sector + backup table.
    let needed_sectors = FIRST_USABLE_LBA + 1 + TABLE_SECTORS;
    if sectors < needed_sectors {
        return Err(GptError::DiskTooSmall {
            size: disk_size,
            needed: needed_sectors * SECTOR_SIZE,
        });
    }
    Ok((FIRST_USABLE_LBA, sectors - 1 - TABLE_SECTORS))
}

fn check_partitions(
    parts: &[GptPartition],
    first_usable: u64,
    last_usable: u64,
) -> Result<(), GptError> {
    if parts.len() > MAX_PARTITIONS {
        return Err(GptError::TooManyPartitions { count: parts.len() });
    }
    let mut guids = BTreeSet::new();
    for p in parts {
        let units = p.name.encode_utf16().count();
        if units > MAX_NAME_UNITS {
            return Err(GptError::NameTooLong {
                name: p.name.clone(),
                units,
            });
        }
        if p.first_lba < first_usable || p.last_lba > last_usable || p.first_lba > p.last_lba {
            return Err(GptError::OutOfRange {
                name: p.name.clone(),
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                first_usable,
                last_usable,
            });
        }
        if p.guid == [0; 16] || !guids.insert(p.guid) {
            return Err(GptError::BadGuid {
                name: p.name.clone(),
                guid: uuid::Uuid::from_bytes(p.guid).to_string(),
            });
        }
    }
    let mut by_start: Vec<&GptPartition> = parts.iter().collect();
    by_start.sort_by_key(|p| p.first_lba);
    for pair in by_start.windows(2) {
        if pair[1].first_lba <= pair[0].last_lba {
            return Err(GptError::Overlap {
                first: pair[0].name.clone(),
                first_last: pair[0].last_lba,
                second: pair[1].name.clone(),
                second_first: pair[1].first_lba,
            });
        }
    }
    Ok(())
}

/// An in-memory disk of a virtual size that stores only the sectors written to it; the rest read
/// as zeros. It exists so the `gpt` crate can work on a seekable device without the whole disk
/// being allocated.
#[derive(Debug)]
pub struct SparseDisk {
    size: u64,
    pos: u64,
    sectors: BTreeMap<u64, Box<[u8; SECTOR_SIZE as usize]>>,
}

impl SparseDisk {
    pub fn new(size: u64) -> Self {
        SparseDisk {
            size,
            pos: 0,
            sectors: BTreeMap::new(),
        }
    }

    /// The written sectors, merged into runs of consecutive sectors: (first LBA, bytes).
    pub fn runs(&self) -> Vec<(u64, Vec<u8>)> {
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&lba, data) in &self.sectors {
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() as u64 / SECTOR_SIZE == lba => {
                    bytes.extend_from_slice(&data[..]);
                }
                _ => runs.push((lba, data.to_vec())),
            }
        }
        runs
    }
}

impl Read for SparseDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let lba = self.pos / SECTOR_SIZE;
        let within = (self.pos % SECTOR_SIZE) as usize;
        let n = buf
            .len()
            .min(SECTOR_SIZE as usize - within)
            .min((self.size - self.pos) as usize);
        match self.sectors.get(&lba) {
            Some(sector) => buf[..n].copy_from_slice(&sector[within..within + n]),
            None => buf[..n].fill(0),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for SparseDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write at offset {} past the end of a {}-byte disk",
                    self.pos, self.size
                ),
            ));
        }
        let lba = self.pos / SECTOR_SIZE;
        let within = (self.pos % SECTOR_SIZE) as usize;
        let n = buf
            .len()
            .min(SECTOR_SIZE as usize - within)
            .min((self.size - self.pos) as usize);
        let sector = self
            .sectors
            .entry(lba)
            .or_insert_with(|| Box::new([0; SECTOR_SIZE as usize]));
        sector[within..within + n].copy_from_slice(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for SparseDisk {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        let target = match from {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn part(name: &str, kind: PartitionKind, first: u64, last: u64, g: u8) -> GptPartition {
        GptPartition {
            name: name.into(),
            kind,
            first_lba: first,
            last_lba: last,
            guid: [g; 16],
        }
    }

    #[test]
    fn type_guids_are_the_dps_ones() {
        assert_eq!(
            PartitionKind::RootX86_64.type_uuid().to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(
            PartitionKind::RootVerityX86_64.type_uuid().to_string(),
            "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"
        );
        assert_eq!(PartitionKind::Esp.type_guid()[0], 0xc1);
    }

    #[test]
    fn sparse_disk_reads_zeros_and_merges_runs() {
        let mut d = SparseDisk::new(10 * SECTOR_SIZE);
        d.seek(SeekFrom::Start(510)).unwrap();
        d.write_all(b"abcd").unwrap();
        d.seek(SeekFrom::End(-512)).unwrap();
        d.write_all(&[7; 512]).unwrap();
        assert!(d.write_all(b"x").is_err());
        let mut buf = vec![1u8; 1024];
        d.seek(SeekFrom::Start(0)).unwrap();
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[508..514], &[0, 0, b'a', b'b', b'c', b'd']);
        let runs = d.runs();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].0, runs[0].1.len()), (0, 1024));
        assert_eq!((runs[1].0, runs[1].1.len()), (9, 512));
    }

    #[test]
    fn writes_only_table_sectors_with_mixed_endian_guids() {
        let mut out = Vec::new();
        let guid = *uuid::Uuid::parse_str("01234567-89ab-cdef-0123-456789abcdef")
            .unwrap()
            .as_bytes();
        let parts = [GptPartition {
            guid,
            ..part("root", PartitionKind::RootX86_64, 2048, 4095, 0)
        }];
        write_gpt(&mut out, 4 * MIB, [9; 16], &parts).unwrap();
        assert_eq!(out.len() as u64, 4 * MIB);
        assert_eq!(&out[510..512], &[0x55, 0xaa]);
        assert_eq!(out[450], 0xee);
        assert_eq!(&out[512..520], b"EFI PART");
        let entry = &out[1024..1024 + 128];
        // Partition GUID at offset 16: first three fields little-endian.
        assert_eq!(
            &entry[16..32],
            &[
                0x67, 0x45, 0x23, 0x01, 0xab, 0x89, 0xef, 0xcd, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
        assert_eq!(u64::from_le_bytes(entry[32..40].try_into().unwrap()), 2048);
        assert_eq!(u64::from_le_bytes(entry[40..48].try_into().unwrap()), 4095);
        assert_eq!(&entry[56..64], &[b'r', 0, b'o', 0, b'o', 0, b't', 0]);
        let last = out.len() - 512;
        assert_eq!(&out[last..last + 8], b"EFI PART");
        // Nothing between the tables is touched.
        assert!(out[34 * 512..last - 32 * 512].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_tables() {
        let ok = part("a", PartitionKind::Esp, 2048, 4095, 1);
        let cases: Vec<(u64, Vec<GptPartition>, &str)> = vec![
            (4 * MIB + 1, vec![ok.clone()], "multiple of the 512-byte"),
            (40 * 512, vec![], "too small"),
            (
                4 * MIB,
                vec![part("a", PartitionKind::Esp, 2048, 8191, 1)],
                "outside the usable area",
            ),
            (
                4 * MIB,
                vec![part("a", PartitionKind::Esp, 10, 100, 1)],
                "outside the usable area",
            ),
            (
                4 * MIB,
                vec![ok.clone(), part("b", PartitionKind::Swap, 4000, 5000, 2)],
                "overlap",
            ),
            (
                4 * MIB,
                vec![ok.clone(), part("b", PartitionKind::Swap, 5000, 6000, 1)],
                "unique non-zero GUID",
            ),
            (
                4 * MIB,
                vec![part(&"n".repeat(37), PartitionKind::Esp, 2048, 4095, 1)],
                "at most 36",
            ),
            (
                4 * MIB,
                (0..129)
                    .map(|i| part("p", PartitionKind::LinuxData, 2048 + i, 2048 + i, i as u8))
                    .collect(),
                "at most 128",
            ),
        ];
        for (size, parts, want) in cases {
            let mut out = Vec::new();
            let err = write_gpt(&mut out, size, [9; 16], &parts).unwrap_err();
            assert!(err.to_string().contains(want), "{err} should say {want:?}");
            assert!(out.is_empty(), "nothing written on error");
        }
    }
}
