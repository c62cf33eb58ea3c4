//! The recipe schema: typed structs for every section of a recipe, from the rendered YAML.
//!
//! Every struct rejects unknown fields, and every field has a default so that a recipe that
//! `extends:` another may give only what it changes; what a finished recipe must have is checked by
//! `validate` after the chain is merged. The same types generate `recipes/schema.json`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A recipe: everything kiln needs to build, verify, publish and deploy one disk image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Editor hint (`# yaml-language-server: $schema=...` is the usual way); ignored by kiln.
    #[serde(rename = "$schema", skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Image name: lowercase letters, digits, `-`, `_` and `.`; used in file names and
    /// repository paths.
    pub name: String,
    /// Image version, free text (e.g. `1.4.0`); available to templates as `recipe.version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// One line about the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A base recipe (path relative to this file) whose fields this one overrides. Plain YAML:
    /// not templated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Parameters and their defaults; `--set KEY=VALUE` overrides them. Available to templates as
    /// `params`. Plain YAML: not templated.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Environment variables templates may read (as `env.NAME`), with the value used when the
    /// variable is unset. No other variable is visible. Plain YAML: not templated.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Every timestamp in the image (seconds since 1970). Defaults to the recipe commit's time
    /// when built from git, else 0. Plain YAML: not templated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
    pub kernel: Kernel,
    pub rootfs: Rootfs,
    pub initramfs: Initramfs,
    pub disk: Disk,
    pub boot: Boot,
    pub verify: Verify,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
}

/// The kernel the image boots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Kernel {
    /// Debian package providing the kernel, e.g. `linux-image-cloud-amd64` (resolved to the
    /// versioned image package).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Build the kernel from source instead of using a package.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<KernelBuild>,
}

/// A kernel compiled from source with a configuration fragment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KernelBuild {
    /// Where the source comes from: `debian` (the `linux-source-*` package).
    pub source: KernelSource,
    /// Configuration fragment, relative to the project root (e.g.
    /// `kernel-configs/virt-minimal.config`).
    pub fragment: String,
    /// Base configuration the fragment is merged onto.
    pub base: KernelBase,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelSource {
    #[default]
    Debian,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelBase {
    #[default]
    Tinyconfig,
    Defconfig,
}

/// The root filesystem: a base plus what the recipe adds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Rootfs {
    /// `busybox` (busybox-static userland) or `debian` (a Debian system made by mmdebstrap).
    pub base: RootfsBase,
    /// Debian suite for the `debian` base and for package lookups (default `bookworm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// mmdebstrap variant for the `debian` base (`minbase`, `important`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Archive components (default `[main]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// Extra Debian packages to install.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// The image's hostname (written to /etc/hostname).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Time zone name, e.g. `Etc/UTC`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Locale, e.g. `C.UTF-8`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// Files to add or replace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Directories to create.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub directories: Vec<DirSpec>,
    /// Symbolic links to create.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub symlinks: Vec<SymlinkSpec>,
    /// Groups to add.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupSpec>,
    /// Users to add.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserSpec>,
    /// systemd units to enable or mask.
    #[serde(skip_serializing_if = "Services::is_empty")]
    pub services: Services,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RootfsBase {
    #[default]
    Busybox,
    Debian,
}

/// A file in the image. Exactly one of `content` and `template` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FileSpec {
    /// Absolute path in the image, e.g. `/etc/motd`.
    pub path: String,
    /// The file's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A template (from the recipe's directory or `templates/`) rendered with the recipe's
    /// context to make the file's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Permission bits as a quoted octal string (default `"0644"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `user:group`, by name or number (default `root:root`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A directory in the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DirSpec {
    /// Absolute path in the image.
    pub path: String,
    /// Permission bits as a quoted octal string (default `"0755"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `user:group`, by name or number (default `root:root`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A symbolic link in the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SymlinkSpec {
    /// Absolute path of the link in the image.
    pub path: String,
    /// What the link points to (stored as given; may be relative).
    pub target: String,
}

/// A group in /etc/group and /etc/gshadow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSpec {
    pub name: String,
    /// Numeric id; allocated from 1000 up when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A user in /etc/passwd and /etc/shadow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UserSpec {
    pub name: String,
    /// Numeric id; allocated from 1000 up when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Primary group name (default: a group named like the user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Supplementary groups.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Home directory (default `/home/NAME`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Login shell (default `/bin/sh`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// A crypt(3) hash (`$6$…`, `$y$…`); absent means the password is locked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Lines for ~/.ssh/authorized_keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

/// systemd units to enable or mask.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Services {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
}

impl Services {
    pub fn is_empty(&self) -> bool {
        self.enable.is_empty() && self.mask.is_empty()
    }
}

/// The initramfs kiln makes for the kernel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Initramfs {
    /// Kernel modules to load at boot, with their dependencies (default: what the root disk
    /// needs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// `gzip` or `zstd` (default `zstd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
}

/// The disk: size, output format and partitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Disk {
    /// Disk size (`2G`, `512M`, bytes) or `auto` (content plus headroom). Default `auto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// `raw` (sparse) or `qcow2`. Default `qcow2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// qcow2 only: compress clusters.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compress: bool,
    /// Partitions in disk order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Partition>,
    /// Protect the root with dm-verity: kiln adds a `root-verity` partition after the root
    /// (Discoverable Partitions type `root-x86-64-verity`) holding the hash tree it computes
    /// while writing the ext4, puts `roothash=<hex>` on the kernel command line (inside the
    /// unified kernel image, where Secure Boot covers it), and the initramfs mounts the root
    /// read-only through dm-verity: a changed block fails to read.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub verity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// One GPT partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Partition {
    /// GPT partition name (at most 36 characters).
    pub name: String,
    /// Discoverable Partitions Specification type.
    #[serde(rename = "type")]
    pub kind: PartitionType,
    /// Filesystem written into it (default: `fat32` for `esp`, `ext4` for `root`/`data`,
    /// `swap` for `swap`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FilesystemKind>,
    /// Size (`256M`, `1G`, bytes), `auto` (content plus headroom) or `rest` (what the disk has
    /// left). Default `auto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Filesystem label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `data` partitions: a directory of the image tree that this partition holds instead
    /// (e.g. `/srv`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PartitionType {
    /// EFI System Partition.
    Esp,
    /// Root partition for x86-64.
    #[default]
    Root,
    /// Linux generic data.
    Data,
    /// Swap.
    Swap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FilesystemKind {
    Fat32,
    Ext4,
    Swap,
    None,
}

impl Partition {
    /// The filesystem, with the type's default when not given.
    pub fn filesystem(&self) -> FilesystemKind {
        self.filesystem.unwrap_or(match self.kind {
            PartitionType::Esp => FilesystemKind::Fat32,
            PartitionType::Root | PartitionType::Data => FilesystemKind::Ext4,
            PartitionType::Swap => FilesystemKind::Swap,
        })
    }
}

/// How the image boots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Boot {
    /// `systemd-boot` (UEFI, Boot Loader Specification entry on the ESP) or `none` (direct
    /// kernel boot only). Default `systemd-boot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader: Option<Loader>,
    /// Kernel command line (kiln adds `root=PARTUUID=…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// systemd-boot menu timeout in seconds (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Boot a unified kernel image: systemd-stub with the kernel, initramfs, command line and
    /// os-release in one EFI binary at `EFI/Linux/<name>.efi`, which systemd-boot lists as a
    /// Type #2 entry (no Type #1 entry then). Needs `loader: systemd-boot`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub uki: bool,
    /// Sign systemd-boot and the unified kernel image for UEFI Secure Boot with the worker's
    /// Secure Boot key (`--secure-boot-key`, default `$KILN_HOME/secureboot.key`), and put the
    /// key's PK, KEK and db variables on the ESP (`loader/keys/auto/`), which systemd-boot enrolls
    /// into firmware in setup mode. Needs `uki: true`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secure_boot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Loader {
    SystemdBoot,
    None,
}

/// How kiln proves the image boots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Verify {
    /// QEMU machine profile from `qemu/` (`direct`, `uefi`). Default `direct`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Text the booted image must print on the serial console.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// Seconds to wait for `expect` (default 120).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// Where verified images are published.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Publish {
    /// OCI repository, e.g. `registry.example:5000/images/minimal`.
    pub repository: String,
    /// Tags to push (default `[latest]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// How application servers run the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Deploy {
    /// Text on the serial console that means the VM is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_serial: Option<String>,
    /// Guest TCP port that must accept connections for the VM to count as healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_port: Option<u16>,
    /// Seconds to wait for health before rolling back (default 120).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<u64>,
    /// VM memory in MiB (default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// VM CPUs (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Shell command the image's init runs (busybox images) when a kiln agent starts it, instead
    /// of powering off after the verify marker: the application, e.g.
    /// `httpd -p 8080 -h /srv/www && echo app-ready`. The agent gives the guest user-mode
    /// networking (10.0.2.15/24, gateway 10.0.2.2) and forwards `health_port` to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// The JSON Schema of recipes (written to `recipes/schema.json`).
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Recipe);
    serde_json::to_value(&schema).unwrap_or(serde_json::Value::Null)
}
