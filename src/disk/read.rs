//! Reading files back out of a raw disk: the GPT's EFI system partition and, in it, a FAT32
//! file by path. Made for the agents' `direct` profile, which boots the kernel and initrd that an
//! image's ESP holds; it reads what kiln's own writers ([`super::gpt`], [`super::fat`]) lay out,
//! and any other FAT32 a GPT disk carries. Everything read is bounded: sizes, chains (a cycle
//! ends the read) and directory depth.

use std::os::unix::fs::FileExt;

/// Largest file read out of a FAT (a kernel or initrd is far smaller).
pub const MAX_FILE: u64 = 512 << 20;
/// Most entries read from one directory.
const MAX_DIR_ENTRIES: usize = 65_536;

/// What went wrong reading a disk.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("no GPT on the disk (no \"EFI PART\" header at sector 1)")]
    NoGpt,
    #[error("the GPT has no EFI system partition")]
    NoEsp,
    #[error("the EFI system partition is not FAT32: {0}")]
    NotFat32(String),
    #[error("{path}: not found in the EFI system partition")]
    NotFound { path: String },
    #[error("{path}: {reason}")]
    Bad { path: String, reason: String },
}

/// The EFI system partition type, as stored in a GPT entry (mixed-endian).
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Byte offset and length of the ESP on a raw GPT disk of 512-byte sectors.
pub fn find_esp(disk: &impl FileExt) -> Result<(u64, u64), ReadError> {
    let mut header = [0u8; 512];
    disk.read_exact_at(&mut header, 512)?;
    if &header[..8] != b"EFI PART" {
        return Err(ReadError::NoGpt);
    }
    let entries_lba = u64_at(&header, 72);
    let count = u32_at(&header, 80).min(1024) as u64;
    let size = u32_at(&header, 84) as u64;
    if !(128..=4096).contains(&size) {
        return Err(ReadError::NoGpt);
    }
    let mut entry = vec![0u8; size as usize];
    for i in 0..count {
        disk.read_exact_at(&mut entry, entries_lba * 512 + i * size)?;
        if entry[..16] == ESP_TYPE {
            let first = u64_at(&entry, 32);
            let last = u64_at(&entry, 40);
            if last < first {
                return Err(ReadError::NoEsp);
            }
            return Ok((first * 512, (last - first + 1) * 512));
        }
    }
    Err(ReadError::NoEsp)
}

/// A FAT32 file system at a byte offset of a disk.
pub struct Fat32<'a, D: FileExt> {
    disk: &'a D,
    base: u64,
    cluster_bytes: u64,
    fat_start: u64,
    data_start: u64,
    root: u32,
    clusters: u32,
}

/// One directory entry: its name (the long name when it has one) and where its data is.
struct DirEntry {
    name: String,
    dir: bool,
    cluster: u32,
    size: u64,
}

impl<'a, D: FileExt> Fat32<'a, D> {
    /// Read the boot sector of the FAT32 at `base` (`len` bytes long).
    pub fn open(disk: &'a D, base: u64, len: u64) -> Result<Self, ReadError> {
        let mut boot = [0u8; 512];
        disk.read_exact_at(&mut boot, base)?;
        let bad = |why: &str| ReadError::NotFat32(why.to_string());
        if boot[510..512] != [0x55, 0xaa] {
            return Err(bad("no boot sector signature"));
        }
        let sector = u16_at(&boot, 11) as u64;
        let per_cluster = boot[13] as u64;
        let reserved = u16_at(&boot, 14) as u64;
        let fats = boot[16] as u64;
        let fat_sectors = u32_at(&boot, 36) as u64;
        let root = u32_at(&boot, 44);
        if ![512, 1024, 2048, 4096].contains(&sector)
            || !per_cluster.is_power_of_two()
            || fats == 0
            || fat_sectors == 0
            || u16_at(&boot, 22) != 0
        {
            return Err(bad("its boot sector does not describe a FAT32"));
        }
        let data_start = (reserved + fats * fat_sectors) * sector;
        if data_start >= len {
            return Err(bad("its FATs run past the partition"));
        }
        let cluster_bytes = sector * per_cluster;
        let clusters = ((len - data_start) / cluster_bytes).min(u32::MAX as u64) as u32;
        Ok(Fat32 {
            disk,
            base,
            cluster_bytes,
            fat_start: reserved * sector,
            data_start,
            root,
            clusters,
        })
    }

    fn next_cluster(&self, cluster: u32) -> Result<Option<u32>, ReadError> {
        let mut b = [0u8; 4];
        self.disk
            .read_exact_at(&mut b, self.base + self.fat_start + cluster as u64 * 4)?;
        let next = u32::from_le_bytes(b) & 0x0fff_ffff;
        Ok((2..self.clusters + 2).contains(&next).then_some(next))
    }

    /// The bytes of the chain starting at `cluster`, at most `limit` of them.
    fn read_chain(&self, cluster: u32, limit: u64, path: &str) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        let mut at = Some(cluster).filter(|c| *c >= 2);
        let mut steps = 0u64;
        while let Some(c) = at {
            if out.len() as u64 >= limit {
                break;
            }
            steps += 1;
            if steps > self.clusters as u64 + 1 || c >= self.clusters + 2 {
                return Err(ReadError::Bad {
                    path: path.to_string(),
                    reason: "its cluster chain loops or runs past the partition".into(),
                });
            }
            let mut buf = vec![0u8; self.cluster_bytes as usize];
            let offset = self.base + self.data_start + (c as u64 - 2) * self.cluster_bytes;
            self.disk.read_exact_at(&mut buf, offset)?;
            out.extend_from_slice(&buf);
            at = self.next_cluster(c)?;
        }
        out.truncate(limit.min(out.len() as u64) as usize);
        Ok(out)
    }

    fn entries(&self, cluster: u32, path: &str) -> Result<Vec<DirEntry>, ReadError> {
        let bytes = self.read_chain(cluster, (MAX_DIR_ENTRIES * 32) as u64, path)?;
        let mut out = Vec::new();
        let mut long: Vec<u16> = Vec::new();
        for e in bytes.chunks_exact(32) {
            match e[0] {
                0 => break,
                0xe5 => {
                    long.clear();
                    continue;
                }
                _ => {}
            }
            let attr = e[11];
            if attr == 0x0f {
                // A long-name part: parts come last first; each holds 13 UTF-16 units.
                let mut part: Vec<u16> = Vec::new();
                for (from, to) in [(1, 11), (14, 26), (28, 32)] {
                    part.extend(
                        e[from..to]
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]])),
                    );
                }
                if e[0] & 0x40 != 0 {
                    long.clear();
                }
                part.append(&mut long);
                long = part;
                continue;
            }
            if attr & 0x08 != 0 {
                long.clear();
                continue; // volume label
            }
            let name = if long.is_empty() {
                let base = String::from_utf8_lossy(&e[..8]).trim_end().to_string();
                let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
                if ext.is_empty() {
                    base
                } else {
                    format!("{base}.{ext}")
                }
            } else {
                let end = long
                    .iter()
                    .position(|u| *u == 0 || *u == 0xffff)
                    .unwrap_or(long.len());
                String::from_utf16_lossy(&long[..end])
            };
            long.clear();
            out.push(DirEntry {
                name,
                dir: attr & 0x10 != 0,
                cluster: (u16_at(e, 20) as u32) << 16 | u16_at(e, 26) as u32,
                size: u32_at(e, 28) as u64,
            });
        }
        Ok(out)
    }

    fn lookup(&self, path: &str) -> Result<DirEntry, ReadError> {
        let mut current = DirEntry {
            name: String::new(),
            dir: true,
            cluster: self.root,
            size: 0,
        };
        for (depth, part) in path.split('/').filter(|p| !p.is_empty()).enumerate() {
            if !current.dir || depth > 32 {
                return Err(ReadError::NotFound { path: path.into() });
            }
            current = self
                .entries(current.cluster, path)?
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(part))
                .ok_or_else(|| ReadError::NotFound { path: path.into() })?;
        }
        Ok(current)
    }

    /// The names in directory `path` (`""` for the root), without `.` and `..`.
    pub fn list(&self, path: &str) -> Result<Vec<String>, ReadError> {
        let dir = self.lookup(path)?;
        if !dir.dir {
            return Err(ReadError::Bad {
                path: path.into(),
                reason: "not a directory".into(),
            });
        }
        Ok(self
            .entries(dir.cluster, path)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != "." && n != "..")
            .collect())
    }

    /// The content of file `path` (at most [`MAX_FILE`] bytes).
    pub fn read(&self, path: &str) -> Result<Vec<u8>, ReadError> {
        let f = self.lookup(path)?;
        if f.dir {
            return Err(ReadError::Bad {
                path: path.into(),
                reason: "a directory, not a file".into(),
            });
        }
        if f.size > MAX_FILE {
            return Err(ReadError::Bad {
                path: path.into(),
                reason: format!("{} bytes, more than the {MAX_FILE} read at most", f.size),
            });
        }
        let data = self.read_chain(f.cluster, f.size, path)?;
        if (data.len() as u64) < f.size {
            return Err(ReadError::Bad {
                path: path.into(),
                reason: "its cluster chain is shorter than its size".into(),
            });
        }
        Ok(data)
    }
}
