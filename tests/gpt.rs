//! Partition tables written by kiln, checked by the real tools: `sgdisk -v` finds no problems,
//! `sfdisk --json` and `sgdisk -i` show exactly the types, names, bounds and GUIDs that were
//! planned, `systemd-dissect` (when installed) reads the table, and the bytes are reproducible.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::disk::gpt::PartitionKind;
use kiln::disk::layout::{Filesystem, Layout, PartitionSpec, Size, plan};

mod common;
use common::sha256;

const MIB: u64 = 1 << 20;

fn spec(
    name: &str,
    kind: PartitionKind,
    filesystem: Filesystem,
    size: Size,
    min_size: u64,
) -> PartitionSpec {
    PartitionSpec {
        name: name.into(),
        kind,
        filesystem,
        size,
        min_size,
    }
}

fn esp_root() -> Vec<PartitionSpec> {
    vec![
        spec(
            "esp",
            PartitionKind::Esp,
            Filesystem::Fat32,
            Size::Bytes(64 * MIB),
            33 * MIB,
        ),
        spec(
            "root",
            PartitionKind::RootX86_64,
            Filesystem::Ext4,
            Size::Auto,
            300 * MIB,
        ),
    ]
}

fn esp_root_data_swap() -> Vec<PartitionSpec> {
    vec![
        spec(
            "esp",
            PartitionKind::Esp,
            Filesystem::Fat32,
            Size::Auto,
            40 * MIB,
        ),
        spec(
            "root",
            PartitionKind::RootX86_64,
            Filesystem::Ext4,
            Size::Bytes(1 << 30),
            700 * MIB,
        ),
        spec(
            "data",
            PartitionKind::LinuxData,
            Filesystem::Ext4,
            Size::Rest,
            10 * MIB,
        ),
        spec(
            "swap",
            PartitionKind::Swap,
            Filesystem::Swap,
            Size::Bytes(256 * MIB),
            0,
        ),
    ]
}

/// Write the layout's table into a fresh sparse raw image.
fn write_image(dir: &Path, name: &str, layout: &Layout) -> PathBuf {
    let path = dir.join(name);
    let mut file = File::create(&path).unwrap();
    file.set_len(layout.disk_size).unwrap();
    layout.write_table(&mut file).unwrap();
    drop(file);
    path
}

/// `cmd args image`, which must succeed (see [`common::succeeded`]); its stdout.
fn tool(cmd: &str, args: &[&str], image: &Path) -> String {
    let mut c = Command::new(cmd);
    c.args(args).arg(image);
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not run ({e}); install it (gdisk / fdisk)"));
    common::succeeded(&c, &out)
}

/// The Discoverable Partitions Specification type GUIDs, as sfdisk and sgdisk print them.
fn dps_type(kind: PartitionKind) -> &'static str {
    match kind {
        PartitionKind::Esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        PartitionKind::RootX86_64 => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        PartitionKind::RootVerityX86_64 => "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5",
        PartitionKind::LinuxData => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        PartitionKind::Swap => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    }
}

fn guid_text(g: [u8; 16]) -> String {
    uuid::Uuid::from_bytes(g).to_string().to_uppercase()
}

/// Every check the table tools can make, against what `layout` planned.
fn check_with_tools(image: &Path, layout: &Layout) {
    // sgdisk's verifier: CRCs, header fields, backup copy, overlaps, alignment.
    let verify = tool("sgdisk", &["-v"], image);
    assert!(verify.contains("No problems found"), "sgdisk -v:\n{verify}");

    // sfdisk: label, disk GUID, and each entry's type, GUID, name, start and size (sectors).
    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json"], image)).unwrap();
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(table["id"], guid_text(layout.disk_guid).as_str());
    assert_eq!(table["firstlba"], 34);
    assert_eq!(table["lastlba"], layout.disk_size / 512 - 34);
    let entries = table["partitions"].as_array().unwrap();
    assert_eq!(entries.len(), layout.partitions.len());
    for (entry, planned) in entries.iter().zip(&layout.partitions) {
        assert_eq!(entry["start"], planned.offset / 512, "{entry}");
        assert_eq!(entry["size"], planned.size / 512, "{entry}");
        assert_eq!(entry["type"], dps_type(planned.kind));
        assert_eq!(entry["uuid"], guid_text(planned.guid).as_str());
        assert_eq!(entry["name"], planned.name.as_str());
    }

    // sgdisk -i N: the exact unique GUID (mixed-endian on disk, printed back as given).
    for (i, planned) in layout.partitions.iter().enumerate() {
        let info = tool("sgdisk", &["-i", &(i + 1).to_string()], image);
        let want = [
            format!("Partition GUID code: {}", dps_type(planned.kind)),
            format!("Partition unique GUID: {}", guid_text(planned.guid)),
            format!("First sector: {} ", planned.first_lba),
            format!("Last sector: {} ", planned.last_lba),
            format!("Partition name: '{}'", planned.name),
        ];
        for w in want {
            assert!(
                info.contains(&w),
                "sgdisk -i {}:\n{info}\nmissing {w:?}",
                i + 1
            );
        }
    }
}

#[test]
fn esp_and_root() {
    let dir = tempfile::tempdir().unwrap();
    let layout = plan(Size::Auto, &esp_root(), "test-seed").unwrap();
    // ESP 64 MiB at 1 MiB; root 300 MiB + 20% = 360 MiB; 1 MiB each side.
    assert_eq!(layout.disk_size, (1 + 64 + 360 + 1) * MIB);
    let image = write_image(dir.path(), "disk.raw", &layout);
    check_with_tools(&image, &layout);
    // Only the tables were written: the image stays sparse.
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated <= 256 << 10, "{allocated} bytes allocated");
}

#[test]
fn esp_root_data_and_swap_on_a_fixed_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk_size = 4 << 30;
    let layout = plan(Size::Bytes(disk_size), &esp_root_data_swap(), "test-seed").unwrap();
    let data = layout.partition("data").unwrap();
    // Rest: everything between root's end and swap, swap ending 1 MiB before the disk's end.
    assert_eq!(data.offset, (1 + 48 + 1024) * MIB);
    assert_eq!(data.size, disk_size - 2 * MIB - (48 + 1024 + 256) * MIB);
    let image = write_image(dir.path(), "disk.raw", &layout);
    check_with_tools(&image, &layout);
}

#[test]
fn huge_sparse_disk_keeps_a_capped_protective_mbr() {
    // 3 TiB: more sectors than the MBR's 32-bit field can count.
    let dir = tempfile::tempdir().unwrap();
    let layout = plan(Size::Bytes(3 << 40), &esp_root_data_swap(), "big").unwrap();
    let image = write_image(dir.path(), "big.raw", &layout);
    check_with_tools(&image, &layout);
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut File::open(&image).unwrap(), &mut mbr).unwrap();
    assert_eq!(mbr[446 + 4], 0xee, "protective partition type");
    assert_eq!(
        &mbr[446 + 8..446 + 12],
        &1u32.to_le_bytes(),
        "starts at LBA 1"
    );
    assert_eq!(
        &mbr[446 + 12..446 + 16],
        &u32::MAX.to_le_bytes(),
        "size capped"
    );
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
}

#[test]
fn same_inputs_same_bytes() {
    // Small sizes so hashing whole images stays quick; the table code does not depend on them.
    let parts = || {
        let mut parts = esp_root_data_swap();
        parts[1].size = Size::Bytes(8 * MIB);
        parts[1].min_size = MIB;
        parts[3].size = Size::Bytes(4 * MIB);
        parts
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = Size::Bytes(128 * MIB);
    let a = plan(disk, &parts(), "seed-1").unwrap();
    let b = plan(disk, &parts(), "seed-1").unwrap();
    let c = plan(disk, &parts(), "seed-2").unwrap();
    let ia = write_image(dir.path(), "a.raw", &a);
    let ib = write_image(dir.path(), "b.raw", &b);
    let ic = write_image(dir.path(), "c.raw", &c);
    check_with_tools(&ia, &a);
    assert_eq!(sha256(&ia), sha256(&ib));
    assert_ne!(sha256(&ia), sha256(&ic), "the seed must change the GUIDs");
}

/// Put a real filesystem (or swap signature) in each partition with the standard tools, so that
/// `systemd-dissect` — which gives up on partitions it cannot probe — can look at the table.
/// Stand-ins until kiln's own FAT32 and ext4 writers fill the partitions.
fn format_with_standard_tools(image: &Path, layout: &Layout) {
    for p in &layout.partitions {
        let kib = (p.size / 1024).to_string();
        let (cmd, args): (&str, Vec<String>) = match p.filesystem {
            Filesystem::Fat32 => (
                "mkfs.vfat",
                vec![
                    "-F".into(),
                    "32".into(),
                    "--offset".into(),
                    (p.offset / 512).to_string(),
                ],
            ),
            Filesystem::Ext4 => (
                "mke2fs",
                vec![
                    "-q".into(),
                    "-F".into(),
                    "-t".into(),
                    "ext4".into(),
                    "-E".into(),
                    format!("offset={}", p.offset),
                ],
            ),
            Filesystem::Swap => {
                // This mkswap has no --offset: make the signature page in a side file and copy it.
                let side = image.with_extension("swap");
                File::create(&side).unwrap().set_len(p.size).unwrap();
                tool("mkswap", &["-q"], &side);
                let mut page = vec![0u8; 4096];
                std::io::Read::read_exact(&mut File::open(&side).unwrap(), &mut page).unwrap();
                let img = std::fs::OpenOptions::new().write(true).open(image).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&img, &page, p.offset).unwrap();
                continue;
            }
            Filesystem::None => continue,
        };
        let out = Command::new(cmd)
            .args(&args)
            .arg(image)
            .arg(&kib)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn systemd_dissect_reads_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let layout = plan(Size::Auto, &esp_root_data_swap(), "dissect").unwrap();
    let image = write_image(dir.path(), "disk.raw", &layout);
    format_with_standard_tools(&image, &layout);
    check_with_tools(&image, &layout);
    if !common::is_root() {
        eprintln!("systemd-dissect needs root for loop devices; only the table tools ran");
        return;
    }
    let out = match Command::new("systemd-dissect")
        .args(["--json=short"])
        .arg(&image)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("systemd-dissect not installed ({e}); only the table tools ran");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-dissect failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["size"], layout.disk_size);
    let mounts = json["mounts"].as_array().unwrap();
    // Generic Linux data has no DPS designator; the other three must be recognised by type.
    let expected = [
        ("esp", "vfat", "esp"),
        ("root", "ext4", "root"),
        ("swap", "swap", "swap"),
    ];
    assert_eq!(mounts.len(), expected.len(), "{stdout}");
    for (name, fstype, designator) in expected {
        let (index, planned) = layout
            .partitions
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
            .unwrap();
        let mount = mounts
            .iter()
            .find(|m| m["designator"] == designator)
            .unwrap_or_else(|| panic!("no {designator} in {stdout}"));
        let guid = uuid::Uuid::from_bytes(planned.guid).to_string();
        assert_eq!(mount["partition_uuid"], guid.as_str(), "{designator}");
        assert_eq!(mount["partition_label"], name);
        assert_eq!(mount["fstype"], fstype);
        assert_eq!(mount["partno"], index + 1);
        if designator == "root" {
            assert_eq!(mount["architecture"], "x86-64");
        }
    }
}
