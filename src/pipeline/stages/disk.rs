//! The disk stage: the ESP (systemd-boot, its loader entry, kernel and initramfs), the root
//! filesystem from the rootfs Tree and the recipe's other partitions, written as one GPT disk,
//! raw or qcow2.

use super::rootfs::debs;
use super::{
    Artifacts, Handover, Need, Partitions, StageEnv, StageError, StageRun, StageWork, io,
    kernel_cmdline, load_tree, mib, read_pkg, with_ticker,
};
use crate::boot::{
    BootEntry, LoaderOptions, esp_tree, package_file, systemd_boot_from, uki_esp_tree,
};
use crate::bus;
use crate::digest::Digest256;
use crate::disk::build::{DiskSpec, PartitionInput, TreeMaker, VeritySpec, build_disk};
use crate::disk::gpt::PartitionKind;
use crate::disk::image::{ImageFormat, ImageOptions};
use crate::disk::layout::{Filesystem, Size, parse_size};
use crate::home::BlobStore;
use crate::pipeline::records::key_part;
use crate::recipe::schema::{DiskFormat, FilesystemKind, Loader, PartitionType};
use crate::tree::{Content, Tree};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

pub struct DiskStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskOut {
    pub image: Digest256,
    /// The dm-verity root hash (hex) of a `disk.verity` image: on its kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// `raw` or `qcow2`.
    pub format: String,
    pub disk_size: u64,
    pub file_size: u64,
}

/// What the disk stage made, as its message carries it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStageOut {
    pub disk: DiskOut,
}

/// The key of the disk step (fields sorted, as the JSON keys).
#[derive(Serialize)]
struct DiskKey<'a> {
    /// The recipe's `boot:` (see [`key_part`]).
    boot: Value,
    description: &'a Option<String>,
    /// The recipe's `disk:`.
    disk: Value,
    epoch: i64,
    initrd: &'a Option<Digest256>,
    name: &'a str,
    rootfs: &'a Digest256,
    /// The Secure Boot certificate's digest, when the recipe signs for Secure Boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    secure_boot: Option<Digest256>,
    seed: &'a str,
    systemd_boot: &'a Digest256,
    version: &'a Option<String>,
    vmlinuz: &'a Digest256,
}

impl StageWork for DiskStage {
    const STAGE: bus::Stage = bus::Stage::Disk;
    type Output = DiskStageOut;

    fn needs(_env: &StageEnv, h: &Handover) -> Vec<Need> {
        let Some(build) = &h.build else {
            return Vec::new();
        };
        let mut out = debs(build);
        out.extend(build.rootfs.iter().map(|r| Need::Tree(r.manifest.clone())));
        out.extend(build.kernel.iter().flat_map(|k| k.blobs()));
        out
    }

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<DiskStageOut, StageError> {
        let build = h.artifacts()?;
        let recipe = &build.loaded.recipe;
        let kernel = build.kernel()?;
        let secure_boot = if recipe.boot.secure_boot {
            Some(super::secure_boot_key(run.env)?)
        } else {
            None
        };
        let key = DiskKey {
            boot: key_part(&recipe.boot),
            description: &recipe.description,
            disk: key_part(&recipe.disk),
            epoch: build.loaded.source_date_epoch,
            initrd: &kernel.initrd,
            name: &recipe.name,
            rootfs: &build.rootfs()?.manifest,
            secure_boot: secure_boot.as_ref().map(|k| k.fingerprint()),
            seed: &super::disk_seed(&build.loaded),
            systemd_boot: &build.packages()?.systemd_boot.sha256,
            version: &recipe.version,
            vmlinuz: &kernel.vmlinuz,
        };
        let disk = run.step("disk", 1, &key, |run| {
            disk(run, build, secure_boot.as_ref())
        })?;
        Ok(DiskStageOut { disk })
    }

    fn apply(h: &mut Handover, out: &DiskStageOut) {
        if let Some(b) = &mut h.build {
            b.disk = Some(out.disk.clone());
        }
    }

    fn produced(h: &Handover) -> Vec<Need> {
        h.build
            .iter()
            .flat_map(|b| b.disk.iter())
            .map(|d| Need::Blob(d.image.clone()))
            .collect()
    }
}

fn blob_content(blobs: &BlobStore, digest: &Digest256) -> Result<Content, StageError> {
    let path = blobs.path(digest);
    let len = std::fs::metadata(&path)
        .map_err(io(format!("reading blob {digest}")))?
        .len();
    Ok(Content::Host { path, len })
}

/// The whole content of `c` in memory.
fn read_all(c: &Content, what: &str) -> Result<Vec<u8>, StageError> {
    let mut out = Vec::with_capacity(usize::try_from(c.len()).unwrap_or(0));
    std::io::Read::read_to_end(
        &mut c.open().map_err(io(format!("reading {what}")))?,
        &mut out,
    )
    .map_err(io(format!("reading {what}")))?;
    Ok(out)
}

/// The image's os-release (`/etc/os-release`, else `/usr/lib/os-release`), or one made from the
/// recipe for an image without one.
fn os_release(root: &Tree, build: &Artifacts) -> Result<String, StageError> {
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        let Ok(p) = crate::tree::TreePath::new(path) else {
            continue;
        };
        let Ok(target) = root.resolve_link(&p) else {
            continue;
        };
        if let Some(crate::tree::EntryKind::File(c)) = root.get(target).map(|e| &e.kind) {
            return Ok(String::from_utf8_lossy(&read_all(c, path)?).into_owned());
        }
    }
    let r = &build.loaded.recipe;
    Ok(crate::uki::os_release(
        &r.name,
        r.description.as_deref(),
        r.version.as_deref(),
    ))
}

/// systemd-stub with the entry's kernel, initrd and command line and the image's os-release.
fn unified_kernel_image(
    stub: &Content,
    entry: &BootEntry,
    os_release: &str,
    kernel: &super::kernel::KernelOut,
) -> Result<Vec<u8>, StageError> {
    let stub = read_all(stub, crate::uki::STUB_PATH)?;
    let vmlinuz = read_all(&entry.kernel, "the kernel")?;
    let initrd = match &entry.initrd {
        Some(c) => Some(read_all(c, "the initramfs")?),
        None => None,
    };
    let cmdline = entry.options();
    Ok(crate::uki::assemble(
        &stub,
        &crate::uki::UkiParts {
            kernel: &vmlinuz,
            initrd: initrd.as_deref(),
            cmdline: &cmdline,
            os_release,
            uname: Some(&kernel.version),
        },
    )?)
}

fn disk(
    run: &StageRun<'_>,
    build: &Artifacts,
    secure_boot: Option<&crate::secureboot::SecureBootKey>,
) -> Result<DiskOut, StageError> {
    let env = run.env;
    let pk = build.packages()?;
    let rootfs_out = build.rootfs()?;
    let kernel_out = build.kernel()?;
    let loaded = &build.loaded;
    let recipe = &loaded.recipe;
    let blobs = &env.blobs;
    let root_tree = load_tree(blobs, &rootfs_out.manifest, "the rootfs manifest")?;
    let ids = Partitions::of(loaded);
    let loader = recipe.boot.loader.unwrap_or(Loader::SystemdBoot);
    let package = match loader == Loader::SystemdBoot && ids.esp.is_some() {
        true => Some(read_pkg(env, loaded, &pk.systemd_boot)?),
        false => None,
    };
    let os_release = os_release(&root_tree, build)?;
    // What does not depend on the root hash, made once: systemd-boot (signed for Secure Boot
    // with a unified kernel image) and the key variables it enrolls.
    let mut loader_opts = LoaderOptions::new(loaded.source_date_epoch);
    if let Some(t) = recipe.boot.timeout {
        loader_opts.timeout_secs = t;
    }
    let sdboot = match &package {
        None => None,
        Some(package) => {
            let sdboot = systemd_boot_from(package)?;
            match secure_boot.filter(|_| recipe.boot.uki) {
                None => Some(sdboot),
                Some(key) => {
                    let loader = read_all(&sdboot, crate::boot::SYSTEMD_BOOT_EFI)?;
                    for var in ["PK", "KEK", "db"] {
                        loader_opts.enroll.push((
                            var.to_string(),
                            key.auth_variable(var, loaded.source_date_epoch)?,
                        ));
                    }
                    Some(Content::inline(key.sign_pe(&loader, "systemd-boot")?))
                }
            }
        }
    };
    // The ESP, for a root hash when the root has dm-verity (it goes on the command line).
    let make_esp = |root_hash: Option<&str>| -> Result<Option<Tree>, StageError> {
        let (Some(package), Some(sdboot)) = (&package, &sdboot) else {
            return Ok(None);
        };
        let mut entry = BootEntry {
            name: recipe.name.clone(),
            title: recipe
                .description
                .clone()
                .unwrap_or_else(|| recipe.name.clone()),
            version: recipe.version.clone(),
            kernel: blob_content(blobs, &kernel_out.vmlinuz)?,
            initrd: match &kernel_out.initrd {
                Some(d) => Some(blob_content(blobs, d)?),
                None => None,
            },
            cmdline: kernel_cmdline(loaded, kernel_out),
            root_partuuid: Some(ids.root),
        };
        if let Some(hash) = root_hash {
            // The initramfs finds the root and its hash tree from the root hash alone.
            entry.cmdline = format!("{} roothash={hash}", entry.cmdline.trim());
            entry.root_partuuid = None;
        }
        if recipe.boot.uki {
            let stub = package_file(package, crate::uki::STUB_PATH)?;
            let mut uki = unified_kernel_image(&stub, &entry, &os_release, kernel_out)?;
            if let Some(key) = secure_boot {
                // Signed in-process (deterministic); the firmware enrolls the key from the ESP.
                uki = key.sign_pe(&uki, "the unified kernel image")?;
            }
            Ok(Some(uki_esp_tree(
                sdboot,
                &recipe.name,
                Content::inline(uki),
                &loader_opts,
            )?))
        } else {
            Ok(Some(esp_tree(sdboot, &[entry], &loader_opts)?))
        }
    };
    // With dm-verity, sized with a stand-in hash of the same length, made again with the real
    // one once the root is written.
    let stand_in = "0".repeat(64);
    let verity = recipe.disk.verity;
    let mut esp = make_esp(verity.then_some(stand_in.as_str()))?;
    let mut names = (None, None);
    let mut root_tree = Some(root_tree);
    let size = |text: Option<&str>| -> Result<Size, StageError> {
        match text {
            None => Ok(Size::Auto),
            Some(t) => parse_size(t).map_err(|e| StageError::Unsupported(e.to_string())),
        }
    };
    let mut inputs = Vec::new();
    for p in &recipe.disk.partitions {
        let raw = p.filesystem() == FilesystemKind::None;
        let (kind, filesystem, tree) = match p.kind {
            PartitionType::Esp => {
                names.0 = Some(p.name.clone());
                (
                    PartitionKind::Esp,
                    Filesystem::Fat32,
                    Some(esp.take().unwrap_or_default()),
                )
            }
            PartitionType::Root => {
                names.1 = Some(p.name.clone());
                (
                    PartitionKind::RootX86_64,
                    Filesystem::Ext4,
                    root_tree.take(),
                )
            }
            PartitionType::Data if raw => (PartitionKind::LinuxData, Filesystem::None, None),
            PartitionType::Data => (
                PartitionKind::LinuxData,
                Filesystem::Ext4,
                Some(Tree::new()),
            ),
            PartitionType::Swap => (PartitionKind::Swap, Filesystem::Swap, None),
        };
        inputs.push(PartitionInput {
            name: p.name.clone(),
            kind,
            filesystem,
            size: size(p.size.as_deref())?,
            label: p.label.clone(),
            tree,
        });
        if verity && p.kind == PartitionType::Root {
            // The hash tree right after the root (Discoverable Partitions' pair).
            inputs.push(PartitionInput {
                name: format!("{}-verity", p.name),
                kind: PartitionKind::RootVerityX86_64,
                filesystem: Filesystem::None,
                size: Size::Auto,
                label: None,
                tree: None,
            });
        }
    }
    let verity_spec = match (verity, names) {
        (true, (esp_name, Some(root_name))) => Some(VeritySpec {
            hash: format!("{root_name}-verity"),
            data: root_name,
            params: crate::verity::VerityParams {
                // From the disk's seed: the same recipe, the same salt, so unchanged blocks
                // keep their hashes from one build to the next.
                salt: sha2::Digest::finalize(sha2::Digest::chain_update(
                    <sha2::Sha256 as sha2::Digest>::new(),
                    format!("{}/verity-salt", super::disk_seed(loaded)),
                ))
                .into(),
                uuid: crate::disk::derive_id(&super::disk_seed(loaded), "verity-superblock"),
            },
            remake: esp_name.map(|name| {
                let maker: TreeMaker<'_> = Box::new(|hash: &str| {
                    make_esp(Some(hash))
                        .map(Option::unwrap_or_default)
                        .map_err(|e| crate::error::Chain(&e).to_string())
                });
                (name, maker)
            }),
        }),
        _ => None,
    };
    let format = match recipe.disk.format {
        Some(DiskFormat::Raw) => ImageFormat::Raw,
        _ => ImageFormat::Qcow2,
    };
    let spec = DiskSpec {
        size: size(recipe.disk.size.as_deref())?,
        image: ImageOptions {
            format,
            compress: recipe.disk.compress,
            ..ImageOptions::default()
        },
        seed: super::disk_seed(loaded),
        epoch: loaded.source_date_epoch,
        partitions: inputs,
        verity: verity_spec,
    };
    let tmp_dir = env.home.join("tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(io("creating the cache's tmp dir"))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{}image-", crate::home::temp_prefix()))
        .tempdir_in(&tmp_dir)
        .map_err(io("creating a temp dir for the image"))?;
    let path = tmp.path().join("disk");
    // What the partitions hold: the disk writes at least this much (and its metadata).
    let content: u64 = spec
        .partitions
        .iter()
        .flat_map(|p| p.tree.iter())
        .flat_map(|t| t.iter())
        .map(|(_, e)| match &e.kind {
            crate::tree::EntryKind::File(c) => c.len(),
            _ => 0,
        })
        .sum();
    let tick = |_: Duration| {
        use std::os::unix::fs::MetadataExt;
        let written = std::fs::metadata(&path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        run.progress(
            Some((written as f64 / content.max(1) as f64).min(0.99)),
            format!(
                "writing the disk: {} of about {}",
                mib(written),
                mib(content)
            ),
        );
    };
    let report = with_ticker(Duration::from_millis(200), tick, || {
        build_disk(&spec, &path)
    })?;
    run.progress(
        Some(1.0),
        format!(
            "wrote {} ({} disk, {} file)",
            format!("{format:?}").to_lowercase(),
            mib(report.layout.disk_size),
            mib(report.image.file_size)
        ),
    );
    let (image, _) = blobs.put_file(&path).map_err(io("storing the image"))?;
    Ok(DiskOut {
        image,
        root_hash: report.root_hash,
        format: format.name().into(),
        disk_size: report.layout.disk_size,
        file_size: report.image.file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The typed key serialises to the bytes of the JSON object earlier kiln versions hashed.
    #[test]
    fn key_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        std::fs::write(
            &path,
            "name: r\nversion: '1'\nkernel: { package: linux-image-cloud-amd64 }\nboot: { loader: none }\n\
             disk: { partitions: [ { name: root, type: root, size: auto } ] }\n",
        )
        .unwrap();
        let loaded = crate::recipe::load(&path, &crate::recipe::LoadOptions::default()).unwrap();
        let r = &loaded.recipe;
        let d = Digest256::from_sha256(&[1u8; 32]);
        let initrd = Some(Digest256::from_sha256(&[2u8; 32]));
        let typed = DiskKey {
            boot: key_part(&r.boot),
            description: &r.description,
            disk: key_part(&r.disk),
            epoch: loaded.source_date_epoch,
            initrd: &initrd,
            name: &r.name,
            rootfs: &d,
            secure_boot: None,
            seed: &crate::pipeline::stages::disk_seed(&loaded),
            systemd_boot: &d,
            version: &r.version,
            vmlinuz: &d,
        };
        let old = json!({
            "rootfs": d, "systemd_boot": d, "vmlinuz": d, "initrd": initrd,
            "disk": r.disk, "boot": r.boot, "name": r.name, "description": r.description,
            "version": r.version, "seed": crate::pipeline::stages::disk_seed(&loaded), "epoch": loaded.source_date_epoch,
        });
        assert_eq!(
            serde_json::to_vec(&typed).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
    }
}
