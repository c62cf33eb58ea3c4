//! The disk layout: turns partition specs (name, type, filesystem, size, how many bytes the
//! content needs) into exact offsets, sizes, sector bounds and GUIDs, and checks that they fit.
//!
//! Rules:
//! - Every partition starts and ends on a 1 MiB boundary; the first starts at 1 MiB (the primary
//!   GPT lives in the first MiB). Explicit sizes that are not whole MiB are rounded up.
//! - The backup GPT needs the last 33 sectors. With an `Auto` disk size the disk ends one whole
//!   MiB after the last partition, so the disk size is a MiB multiple too.
//! - `Size::Auto` for a partition = its content (`min_size`) plus headroom of 20% or 64 MiB,
//!   whichever is smaller, rounded up to 1 MiB and at least 1 MiB. Enough that small trees still
//!   get room for filesystem growth and logs, without doubling a 2 GiB root.
//! - `Size::Rest` takes whatever the disk has left (rounded down to 1 MiB) and must still hold
//!   its content. At most one partition may say `Rest`. On an `Auto` disk `Rest` means `Auto`.
//! - `Size::Auto` for the disk = 1 MiB + all partitions + 1 MiB.
//! - GUIDs: the disk's is `derive_id(seed, "disk")`, each partition's is
//!   `derive_id(seed, "partition:<name>")`, so names must be unique (and non-empty).

use super::WriteAt;
use super::derive_id;
use super::gpt::{
    GptError, GptPartition, MAX_NAME_UNITS, MAX_PARTITIONS, PartitionKind, SECTOR_SIZE,
    TABLE_SECTORS, write_gpt,
};

/// Alignment of every partition start and size.
pub const ALIGN: u64 = 1 << 20;

const MIB: u64 = 1 << 20;
/// Upper bound of the headroom an `Auto` partition gets on top of its content.
pub const AUTO_HEADROOM_MAX: u64 = 64 * MIB;
/// Headroom of an `Auto` partition as a fraction of its content: 1/5 = 20%.
pub const AUTO_HEADROOM_DIVISOR: u64 = 5;

/// A requested size: of a partition, or of the whole disk (`Bytes` or `Auto` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Auto,
    Rest,
}

impl std::str::FromStr for Size {
    type Err = LayoutError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s)
    }
}

/// The filesystem a partition will hold; the layout only records it for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    Fat32,
    Ext4,
    Swap,
    None,
}

/// What the recipe asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    pub name: String,
    pub kind: PartitionKind,
    pub filesystem: Filesystem,
    pub size: Size,
    /// Bytes the content needs, computed by the caller from the filesystem builders.
    pub min_size: u64,
}

/// A partition with its place on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPartition {
    pub name: String,
    pub kind: PartitionKind,
    pub filesystem: Filesystem,
    /// Byte offset from the start of the disk (a multiple of 1 MiB).
    pub offset: u64,
    /// Bytes (a multiple of 1 MiB).
    pub size: u64,
    /// `derive_id(seed, "partition:<name>")`.
    pub guid: [u8; 16],
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
}

/// The planned disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub disk_guid: [u8; 16],
    pub partitions: Vec<PlannedPartition>,
}

impl Layout {
    /// The partition table entries, in spec order.
    pub fn gpt_partitions(&self) -> Vec<GptPartition> {
        self.partitions
            .iter()
            .map(|p| GptPartition {
                name: p.name.clone(),
                kind: p.kind,
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                guid: p.guid,
            })
            .collect()
    }

    /// Write the protective MBR and both GPTs for this layout into `out`.
    pub fn write_table(&self, out: &mut dyn WriteAt) -> Result<(), GptError> {
        write_gpt(out, self.disk_size, self.disk_guid, &self.gpt_partitions())
    }

    /// The planned partition called `name`.
    pub fn partition(&self, name: &str) -> Option<&PlannedPartition> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

/// Errors planning a layout or parsing a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "invalid size {text:?}: {reason}; write a whole number of bytes with an optional binary unit (K, M, G, T or KiB, MiB, GiB, TiB), e.g. 512M or 2GiB, or \"auto\" or \"rest\""
    )]
    BadSize { text: String, reason: String },
    #[error("the layout has no partitions; add at least one")]
    NoPartitions,
    #[error("{count} partitions requested but a GPT holds at most {MAX_PARTITIONS}")]
    TooManyPartitions { count: usize },
    #[error("a partition has an empty name; give every partition a unique name")]
    EmptyName,
    #[error(
        "partition {name:?}: name is {units} UTF-16 units long, the GPT allows at most {MAX_NAME_UNITS}; shorten it"
    )]
    NameTooLong { name: String, units: usize },
    #[error(
        "two partitions are named {name:?}; names must be unique (they also seed the partition GUIDs)"
    )]
    DuplicateName { name: String },
    #[error(
        "partitions {first:?} and {second:?} are both of type {kind}; a disk may have only one of each root type, change one to linux-data"
    )]
    DuplicateRoot {
        kind: PartitionKind,
        first: String,
        second: String,
    },
    #[error(
        "partitions {first:?} and {second:?} both ask for the rest of the disk; give all but one an explicit size or auto"
    )]
    TwoRest { first: String, second: String },
    #[error("partition {name:?}: size is zero; give a size of at least 1M, or auto")]
    ZeroSize { name: String },
    #[error("the disk size is zero; give a size or auto")]
    ZeroDisk,
    #[error("the disk size cannot be \"rest\"; give a size in bytes or auto")]
    RestDisk,
    #[error(
        "the disk size {size} is not a multiple of {SECTOR_SIZE} bytes; round it (to whole MiB ideally)"
    )]
    UnalignedDisk { size: u64 },
    #[error(
        "partition {name:?}: size {size} bytes is smaller than its content needs ({needed} bytes); set its size to at least {suggest} bytes ({suggest_mib}M), or use auto"
    )]
    TooSmall {
        name: String,
        size: u64,
        needed: u64,
        suggest: u64,
        suggest_mib: u64,
    },
    #[error(
        "partition {name:?}: takes the rest of the disk, which is {available} bytes, but needs at least {needed} bytes; make the disk at least {suggest_disk} bytes, shrink the other partitions, or use a disk size of auto"
    )]
    RestTooSmall {
        name: String,
        available: u64,
        needed: u64,
        suggest_disk: u64,
    },
    #[error(
        "partitions do not fit on a {disk_size}-byte disk: they need {needed} bytes but only {available} are usable (1 MiB at the start and the backup GPT at the end are reserved), and partition {name:?} is the first that does not fit; make the disk at least {suggest_disk} bytes, shrink partitions, or use a disk size of auto"
    )]
    DoesNotFit {
        name: String,
        disk_size: u64,
        needed: u64,
        available: u64,
        suggest_disk: u64,
    },
    #[error(
        "partition {name:?}: sizes add up to more than 2^64 bytes; check the units of the sizes"
    )]
    Overflow { name: String },
}

/// Parse a size: `"4096"` (bytes), `"512K"`, `"512M"`, `"2G"`, `"1T"` (binary units, so M means
/// MiB), `"2GiB"`, `"auto"`, `"rest"`. Units are case-insensitive and may follow a space. Decimal
/// units (`MB`, `GB`) are refused rather than guessed.
pub fn parse_size(text: &str) -> Result<Size, LayoutError> {
    let bad = |reason: &str| LayoutError::BadSize {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(Size::Auto);
    }
    if t.eq_ignore_ascii_case("rest") {
        return Ok(Size::Rest);
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    if number.is_empty() {
        return Err(bad(if t.is_empty() {
            "it is empty"
        } else {
            "it does not start with a number"
        }));
    }
    let number: u64 = number.parse().map_err(|_| bad("the number is too large"))?;
    let unit = unit.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(bad(
                "decimal units are ambiguous; kiln uses binary units (M = MiB = 2^20 bytes)",
            ));
        }
        _ if unit.starts_with('.') || unit.starts_with(',') => {
            return Err(bad("fractions are not supported, use a smaller unit"));
        }
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    number
        .checked_mul(1u64 << shift)
        .map(Size::Bytes)
        .ok_or_else(|| bad("it is larger than 2^64 bytes"))
}

/// Plan a disk: sizes, offsets, sector bounds and GUIDs for `parts`, in order. `disk_size` is
/// `Bytes` or `Auto`. See the module documentation for the rules.
pub fn plan(disk_size: Size, parts: &[PartitionSpec], seed: &str) -> Result<Layout, LayoutError> {
    check_specs(parts)?;

    // Sizes of everything but the Rest partition.
    let disk_is_auto = match disk_size {
        Size::Auto => true,
        Size::Bytes(0) => return Err(LayoutError::ZeroDisk),
        Size::Bytes(n) if !n.is_multiple_of(SECTOR_SIZE) => {
            return Err(LayoutError::UnalignedDisk { size: n });
        }
        Size::Bytes(_) => false,
        Size::Rest => return Err(LayoutError::RestDisk),
    };
    let mut sizes: Vec<Option<u64>> = Vec::with_capacity(parts.len());
    for spec in parts {
        let size = match spec.size {
            Size::Bytes(0) => {
                return Err(LayoutError::ZeroSize {
                    name: spec.name.clone(),
                });
            }
            Size::Bytes(n) => {
                let size = align_up(n).ok_or_else(|| overflow(spec))?;
                if size < spec.min_size {
                    let suggest = align_up(spec.min_size).ok_or_else(|| overflow(spec))?;
                    return Err(LayoutError::TooSmall {
                        name: spec.name.clone(),
                        size: n,
                        needed: spec.min_size,
                        suggest,
                        suggest_mib: suggest / MIB,
                    });
                }
                Some(size)
            }
            Size::Auto => Some(auto_size(spec)?),
            Size::Rest if disk_is_auto => Some(auto_size(spec)?),
            Size::Rest => None,
        };
        sizes.push(size);
    }

    let fixed_total = sizes.iter().zip(parts).try_fold(0u64, |acc, (s, spec)| {
        acc.checked_add(s.unwrap_or(0))
            .ok_or_else(|| overflow(spec))
    })?;
    let last = parts.last().ok_or(LayoutError::NoPartitions)?;

    let disk_size = match disk_size {
        Size::Bytes(n) => n,
        _ => fixed_total
            .checked_add(2 * ALIGN)
            .ok_or_else(|| overflow(last))?,
    };
    // Partitions live in [ALIGN, usable_end); usable_end is aligned and leaves the backup GPT room.
    let usable_end = align_down(disk_size.saturating_sub(TABLE_SECTORS * SECTOR_SIZE));
    let available = usable_end.saturating_sub(ALIGN);

    // Give the Rest partition what is left; check everything fits.
    if let Some(rest_index) = sizes.iter().position(Option::is_none) {
        let spec = &parts[rest_index];
        let left = available.saturating_sub(fixed_total);
        let needed = align_up(spec.min_size.max(1)).ok_or_else(|| overflow(spec))?;
        if fixed_total > available || left < needed {
            let suggest_disk = disk_size
                .checked_add(fixed_total.saturating_sub(available))
                .and_then(|d| d.checked_add(needed - left.min(needed)))
                .and_then(align_up)
                .ok_or_else(|| overflow(spec))?;
            return Err(LayoutError::RestTooSmall {
                name: spec.name.clone(),
                available: left,
                needed: spec.min_size.max(1),
                suggest_disk,
            });
        }
        sizes[rest_index] = Some(left);
    }

    let disk_guid = derive_id(seed, "disk");
    let mut partitions = Vec::with_capacity(parts.len());
    let mut offset = ALIGN;
    for (spec, size) in parts.iter().zip(sizes) {
        let size = size.unwrap_or(0);
        let end = offset.checked_add(size).ok_or_else(|| overflow(spec))?;
        if end > usable_end {
            let suggest_disk = fixed_total
                .checked_add(2 * ALIGN)
                .ok_or_else(|| overflow(spec))?;
            return Err(LayoutError::DoesNotFit {
                name: spec.name.clone(),
                disk_size,
                needed: fixed_total,
                available,
                suggest_disk,
            });
        }
        partitions.push(PlannedPartition {
            name: spec.name.clone(),
            kind: spec.kind,
            filesystem: spec.filesystem,
            offset,
            size,
            guid: derive_id(seed, &format!("partition:{}", spec.name)),
            first_lba: offset / SECTOR_SIZE,
            last_lba: end / SECTOR_SIZE - 1,
        });
        offset = end;
    }

    Ok(Layout {
        disk_size,
        disk_guid,
        partitions,
    })
}

/// Checks that do not depend on sizes: count, names, root types, Rest count.
fn check_specs(parts: &[PartitionSpec]) -> Result<(), LayoutError> {
    if parts.is_empty() {
        return Err(LayoutError::NoPartitions);
    }
    if parts.len() > MAX_PARTITIONS {
        return Err(LayoutError::TooManyPartitions { count: parts.len() });
    }
    for (i, spec) in parts.iter().enumerate() {
        if spec.name.is_empty() {
            return Err(LayoutError::EmptyName);
        }
        let units = spec.name.encode_utf16().count();
        if units > MAX_NAME_UNITS {
            return Err(LayoutError::NameTooLong {
                name: spec.name.clone(),
                units,
            });
        }
        let earlier = &parts[..i];
        if earlier.iter().any(|p| p.name == spec.name) {
            return Err(LayoutError::DuplicateName {
                name: spec.name.clone(),
            });
        }
        if is_root(spec.kind)
            && let Some(first) = earlier.iter().find(|p| p.kind == spec.kind)
        {
            return Err(LayoutError::DuplicateRoot {
                kind: spec.kind,
                first: first.name.clone(),
                second: spec.name.clone(),
            });
        }
        if spec.size == Size::Rest
            && let Some(first) = earlier.iter().find(|p| p.size == Size::Rest)
        {
            return Err(LayoutError::TwoRest {
                first: first.name.clone(),
                second: spec.name.clone(),
            });
        }
    }
    Ok(())
}

fn is_root(kind: PartitionKind) -> bool {
    matches!(kind, PartitionKind::RootX86_64)
}

/// Content plus min(20%, 64 MiB), rounded up to 1 MiB, at least 1 MiB.
fn auto_size(spec: &PartitionSpec) -> Result<u64, LayoutError> {
    let headroom = (spec.min_size / AUTO_HEADROOM_DIVISOR).min(AUTO_HEADROOM_MAX);
    spec.min_size
        .checked_add(headroom)
        .and_then(align_up)
        .map(|s| s.max(ALIGN))
        .ok_or_else(|| overflow(spec))
}

fn overflow(spec: &PartitionSpec) -> LayoutError {
    LayoutError::Overflow {
        name: spec.name.clone(),
    }
}

fn align_up(n: u64) -> Option<u64> {
    n.checked_next_multiple_of(ALIGN)
}

fn align_down(n: u64) -> u64 {
    n - n % ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use PartitionKind::*;

    fn spec(name: &str, kind: PartitionKind, size: Size, min_size: u64) -> PartitionSpec {
        PartitionSpec {
            name: name.into(),
            kind,
            filesystem: Filesystem::None,
            size,
            min_size,
        }
    }

    #[test]
    fn parse_size_accepts() {
        let cases = [
            ("4096", Size::Bytes(4096)),
            ("512M", Size::Bytes(512 * MIB)),
            ("512 MiB", Size::Bytes(512 * MIB)),
            ("2GiB", Size::Bytes(2 << 30)),
            ("1G", Size::Bytes(1 << 30)),
            ("1g", Size::Bytes(1 << 30)),
            ("64k", Size::Bytes(64 << 10)),
            ("3T", Size::Bytes(3 << 40)),
            ("100B", Size::Bytes(100)),
            ("0", Size::Bytes(0)),
            (" auto ", Size::Auto),
            ("AUTO", Size::Auto),
            ("rest", Size::Rest),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        assert_eq!("2G".parse::<Size>(), Ok(Size::Bytes(2 << 30)));
    }

    #[test]
    fn parse_size_refuses() {
        let cases = [
            ("", "empty"),
            ("M", "does not start with a number"),
            ("-1M", "does not start with a number"),
            ("1.5G", "fractions"),
            ("512MB", "decimal units"),
            ("1GB", "decimal units"),
            ("12 parsecs", "unknown unit"),
            ("1X", "unknown unit"),
            ("99999999999999999999", "too large"),
            ("16777216T", "larger than 2^64"),
        ];
        for (text, want) in cases {
            let err = parse_size(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err} should say {want:?}");
            assert!(err.contains(&format!("{text:?}")), "{err} names the input");
        }
    }

    #[test]
    fn plans_auto_disk() {
        let parts = [
            spec("esp", Esp, Size::Bytes(100 * MIB), 33 * MIB),
            spec("root", RootX86_64, Size::Auto, 100 * MIB),
            spec("swap", Swap, Size::Rest, 0),
        ];
        let l = plan(Size::Auto, &parts, "seed").unwrap();
        let got: Vec<(u64, u64)> = l.partitions.iter().map(|p| (p.offset, p.size)).collect();
        // root: 100 MiB + 20 MiB headroom; swap (rest on an auto disk = auto): 1 MiB minimum.
        assert_eq!(
            got,
            vec![(MIB, 100 * MIB), (101 * MIB, 120 * MIB), (221 * MIB, MIB)]
        );
        assert_eq!(l.disk_size, 223 * MIB);
        assert_eq!(l.partitions[1].first_lba, 101 * 2048);
        assert_eq!(l.partitions[1].last_lba, 221 * 2048 - 1);
        assert_eq!(l.partitions[0].guid, derive_id("seed", "partition:esp"));
        assert_eq!(l.disk_guid, derive_id("seed", "disk"));
        assert_eq!(l, plan(Size::Auto, &parts, "seed").unwrap());
        assert_ne!(
            l.partitions[0].guid,
            plan(Size::Auto, &parts, "other").unwrap().partitions[0].guid
        );
    }

    #[test]
    fn auto_headroom_is_capped() {
        let parts = [spec("root", RootX86_64, Size::Auto, 2000 * MIB + 1)];
        let l = plan(Size::Auto, &parts, "s").unwrap();
        assert_eq!(l.partitions[0].size, 2065 * MIB);
    }

    #[test]
    fn rest_fills_explicit_disk() {
        let parts = [
            spec("esp", Esp, Size::Bytes(64 * MIB), 0),
            spec("root", RootX86_64, Size::Rest, 10 * MIB),
            spec("swap", Swap, Size::Bytes(1000), 0),
        ];
        // 1 GiB + 3 sectors: the tail still leaves room for the backup GPT.
        let l = plan(Size::Bytes((1 << 30) + 1536), &parts, "s").unwrap();
        let root = l.partition("root").unwrap();
        assert_eq!(root.offset, 65 * MIB);
        assert_eq!(root.size, 1023 * MIB - 65 * MIB - MIB);
        let swap = l.partition("swap").unwrap();
        assert_eq!(swap.size, MIB, "explicit sizes round up to 1 MiB");
        assert_eq!(swap.offset + swap.size, 1023 * MIB);
        let last_usable = l.disk_size / 512 - 34;
        assert!(swap.last_lba <= last_usable);
    }

    #[test]
    fn plan_refuses() {
        let esp = || spec("esp", Esp, Size::Bytes(64 * MIB), 0);
        let cases: Vec<(Size, Vec<PartitionSpec>, &[&str])> = vec![
            (Size::Auto, vec![], &["no partitions"]),
            (
                Size::Auto,
                vec![spec("esp", Esp, Size::Bytes(10 * MIB), 33 * MIB)],
                &["\"esp\"", "34603008", "at least 34603008", "33M"],
            ),
            (
                Size::Bytes(64 * MIB),
                vec![esp(), spec("root", RootX86_64, Size::Bytes(MIB), 0)],
                &[
                    "\"esp\"",
                    "67108864-byte disk",
                    "need 68157440",
                    "65011712 are usable",
                    "at least 70254592",
                ],
            ),
            (
                Size::Bytes(100 * MIB),
                vec![esp(), spec("root", RootX86_64, Size::Rest, 40 * MIB)],
                &[
                    "\"root\"",
                    "35651584 bytes",
                    "41943040",
                    "at least 111149056",
                ],
            ),
            (
                Size::Auto,
                vec![
                    spec("a", LinuxData, Size::Rest, 0),
                    spec("b", LinuxData, Size::Rest, 0),
                ],
                &["\"a\" and \"b\"", "rest of the disk"],
            ),
            (
                Size::Auto,
                vec![
                    spec("r1", RootX86_64, Size::Auto, 0),
                    spec("r2", RootX86_64, Size::Auto, 0),
                ],
                &["\"r1\" and \"r2\"", "root-x86-64"],
            ),
            (
                Size::Auto,
                vec![esp(), spec("esp", LinuxData, Size::Auto, 0)],
                &["two partitions are named \"esp\""],
            ),
            (
                Size::Auto,
                vec![spec(&"x".repeat(37), LinuxData, Size::Auto, 0)],
                &["37 UTF-16 units", "at most 36"],
            ),
            (
                Size::Auto,
                vec![spec("", LinuxData, Size::Auto, 0)],
                &["empty name"],
            ),
            (
                Size::Auto,
                vec![spec("z", LinuxData, Size::Bytes(0), 0)],
                &["\"z\"", "size is zero"],
            ),
            (Size::Bytes(0), vec![esp()], &["disk size is zero"]),
            (Size::Rest, vec![esp()], &["cannot be \"rest\""]),
            (
                Size::Bytes(MIB + 1),
                vec![esp()],
                &["not a multiple of 512"],
            ),
            (
                Size::Auto,
                vec![spec("big", LinuxData, Size::Bytes(u64::MAX - 5), 0)],
                &["\"big\"", "2^64"],
            ),
            (
                Size::Auto,
                (0..129)
                    .map(|i| spec(&format!("p{i}"), LinuxData, Size::Auto, 0))
                    .collect(),
                &["129 partitions"],
            ),
        ];
        for (disk, parts, wants) in cases {
            let err = plan(disk, &parts, "s").unwrap_err().to_string();
            for want in wants {
                assert!(err.contains(want), "{err}\n  should say {want:?}");
            }
        }
    }

    #[test]
    fn name_limit_counts_utf16_units() {
        // 18 characters outside the BMP = 36 UTF-16 units: allowed. One more is not.
        let ok = "😀".repeat(18);
        assert!(plan(Size::Auto, &[spec(&ok, LinuxData, Size::Auto, 0)], "s").is_ok());
        let long = "😀".repeat(19);
        assert!(plan(Size::Auto, &[spec(&long, LinuxData, Size::Auto, 0)], "s").is_err());
    }

    #[test]
    fn layout_writes_its_table() {
        let parts = [
            spec("esp", Esp, Size::Bytes(2 * MIB), 0),
            spec("root", RootX86_64, Size::Auto, 0),
        ];
        let l = plan(Size::Auto, &parts, "s").unwrap();
        let mut img = Vec::new();
        l.write_table(&mut img).unwrap();
        assert_eq!(img.len() as u64, l.disk_size);
        assert_eq!(&img[512..520], b"EFI PART");
    }
}
