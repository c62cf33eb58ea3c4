//! The initramfs kiln boots with: busybox, the kernel modules the root disk needs (with their
//! dependencies, decompressed), and an `/init` rendered from `templates/initramfs-init.sh.j2`
//! that loads them, finds the root partition by PARTUUID, mounts it and `switch_root`s. Written
//! as a cpio newc archive compressed with zstd or gzip; the same inputs give the same bytes.

use std::io::{self, Write};

use serde::Serialize;
use thiserror::Error;

use super::cpio::{self, CpioError};
use super::{Closure, InstalledKernel, KernelError, ROOT_DISK_MODULES};
use crate::recipe::schema::Compression;
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};

/// The default `/init` template, also shipped as `templates/initramfs-init.sh.j2`.
pub const DEFAULT_INIT_TEMPLATE: &str = include_str!("../../templates/initramfs-init.sh.j2");

/// busybox applets the default `/init` calls by name, linked in `/bin`.
pub const APPLETS: &[&str] = &[
    "cat",
    "echo",
    "grep",
    "insmod",
    "ls",
    "mkdir",
    "mount",
    "od",
    "poweroff",
    "readlink",
    "reboot",
    "sed",
    "sh",
    "sleep",
    "switch_root",
    "tr",
    "umount",
];

/// zstd level: most of level 19's ratio at a fraction of its time (19 took ~1 s for a 2 MiB cpio).
const ZSTD_LEVEL: i32 = 9;

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error(
        "initramfs: busybox not found at /bin/busybox in the busybox tree (is the \
         busybox-static package unpacked into it?)"
    )]
    NoBusybox,
    #[error("initramfs: root PARTUUID `{0}` is not a UUID (expected 8-4-4-4-12 hex digits)")]
    BadPartuuid(String),
    #[error("initramfs: root filesystem type `{0}` is not a plain name (letters, digits, _)")]
    BadFsType(String),
    #[error(
        "initramfs: {what} `{value}` has characters that are unsafe in the /init shell script \
         (allowed: letters, digits, . _ - + / ,)"
    )]
    UnsafeName { what: &'static str, value: String },
    /// minijinja's alternate form shows the template line; it is the whole report, not a source.
    #[error("initramfs: rendering the /init template: {0:#}")]
    Template(minijinja::Error),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("initramfs: compressing")]
    Compress(#[source] io::Error),
}

impl From<minijinja::Error> for InitramfsError {
    fn from(e: minijinja::Error) -> Self {
        InitramfsError::Template(e)
    }
}

/// Everything an initramfs is made from.
#[derive(Debug, Clone)]
pub struct InitramfsSpec<'a> {
    pub kernel: &'a InstalledKernel,
    /// The unpacked busybox-static package (`/bin/busybox`).
    pub busybox: &'a Tree,
    /// Modules to load (names or aliases); empty means [`ROOT_DISK_MODULES`]. Built-in ones
    /// are skipped.
    pub modules: Vec<String>,
    /// GPT partition UUID of the root partition.
    pub root_partuuid: String,
    /// Root filesystem type for `mount -t` (e.g. `ext4`).
    pub rootfstype: String,
    /// Seconds to wait for the root partition.
    pub timeout_secs: u32,
    /// Seconds the failure message stays on the console before `/init` powers off.
    pub fail_delay_secs: u32,
    pub compression: Compression,
    /// Every mtime in the archive.
    pub epoch: i64,
    /// `/init` template text; `None` uses [`DEFAULT_INIT_TEMPLATE`].
    pub init_template: Option<&'a str>,
    /// The unpacked packages of `dmsetup` and its libraries: with them, the initramfs mounts a
    /// root given by `roothash=` through dm-verity (and loads the dm-verity modules).
    pub verity_tools: Vec<&'a Tree>,
}

impl<'a> InitramfsSpec<'a> {
    /// Defaults: root disk modules, ext4, 30 s timeout, 10 s failure delay, zstd, epoch 0, default template.
    pub fn new(
        kernel: &'a InstalledKernel,
        busybox: &'a Tree,
        root_partuuid: impl Into<String>,
    ) -> Self {
        InitramfsSpec {
            kernel,
            busybox,
            modules: Vec::new(),
            root_partuuid: root_partuuid.into(),
            rootfstype: "ext4".into(),
            timeout_secs: 30,
            fail_delay_secs: 10,
            compression: Compression::Zstd,
            epoch: 0,
            init_template: None,
            verity_tools: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct InitModule {
    name: String,
    path: String,
}

#[derive(Serialize)]
struct InitContext {
    kernel_version: String,
    modules: Vec<InitModule>,
    builtin: Vec<String>,
    root_partuuid: String,
    /// The GUID as its 16 bytes appear in a GPT entry, in hex.
    root_partuuid_gpt: String,
    rootfstype: String,
    timeout: u32,
    fail_delay: u32,
    /// dmsetup is here: a `roothash=` root is set up through dm-verity.
    verity: bool,
    /// overlayfs is here: a dm-verity root's /etc and /var get a writable layer in memory.
    overlay: bool,
}

/// The uncompressed initramfs as a Tree, with the module closure it loads.
pub fn build_tree(spec: &InitramfsSpec<'_>) -> Result<(Tree, Closure), InitramfsError> {
    let partuuid = uuid::Uuid::try_parse(&spec.root_partuuid)
        .map_err(|_| InitramfsError::BadPartuuid(spec.root_partuuid.clone()))?;
    if spec.rootfstype.is_empty()
        || !spec
            .rootfstype
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(InitramfsError::BadFsType(spec.rootfstype.clone()));
    }
    let mut requested: Vec<String> = if spec.modules.is_empty() {
        ROOT_DISK_MODULES.iter().map(|s| s.to_string()).collect()
    } else {
        spec.modules.clone()
    };
    let verity = !spec.verity_tools.is_empty();
    if verity && !requested.iter().any(|m| m == "dm-verity") {
        requested.push("dm-verity".into());
    }
    // A dm-verity root is read-only: /etc and /var get a writable layer in memory (overlayfs)
    // where the kernel has it.
    let overlay = verity && spec.kernel.index.resolve("overlay").is_some();
    if overlay && !requested.iter().any(|m| m == "overlay") {
        requested.push("overlay".into());
    }
    let closure = spec.kernel.closure(&requested)?;
    check_safe("kernel version", &spec.kernel.version)?;

    let busybox = TreePath::new("bin/busybox")?;
    let busybox_owner = spec
        .busybox
        .resolve_link(&busybox)
        .map_err(|_| InitramfsError::NoBusybox)?;
    let busybox_content = match spec.busybox.get(busybox_owner).map(|e| &e.kind) {
        Some(EntryKind::File(c)) => c.clone(),
        _ => return Err(InitramfsError::NoBusybox),
    };

    let mut tree = Tree::new();
    for dir in ["bin", "dev", "proc", "sys", "run", "tmp", "newroot"] {
        tree.add(dir, Entry::dir(0o755))?;
    }
    tree.add(
        "dev/console",
        Entry::new(EntryKind::CharDevice { major: 5, minor: 1 }, 0o600),
    )?;
    tree.add(
        "dev/null",
        Entry::new(EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
    )?;
    tree.add("bin/busybox", Entry::file(busybox_content, 0o755))?;
    for applet in APPLETS {
        tree.add(&format!("bin/{applet}"), Entry::symlink("busybox"))?;
    }

    for package in &spec.verity_tools {
        add_runtime_files(&mut tree, package)?;
    }

    let mod_base = format!("lib/modules/{}", spec.kernel.version);
    let mut init_modules = Vec::new();
    for module in &closure.modules {
        let rel = module.plain_rel_path();
        check_safe("module path", &rel)?;
        check_safe("module name", &module.name)?;
        let content: Content = module.plain_content().map_err(KernelError::from)?;
        tree.add(&format!("{mod_base}/{rel}"), Entry::file(content, 0o644))?;
        init_modules.push(InitModule {
            name: module.name.clone(),
            path: rel,
        });
    }

    let context = InitContext {
        kernel_version: spec.kernel.version.clone(),
        modules: init_modules,
        builtin: closure.builtin.clone(),
        root_partuuid: partuuid.hyphenated().to_string(),
        root_partuuid_gpt: hex::encode(partuuid.to_bytes_le()),
        rootfstype: spec.rootfstype.clone(),
        timeout: spec.timeout_secs,
        fail_delay: spec.fail_delay_secs,
        verity,
        overlay,
    };
    let init = render_init(
        spec.init_template.unwrap_or(DEFAULT_INIT_TEMPLATE),
        &context,
    )?;
    tree.add("init", Entry::file(Content::inline(init), 0o755))?;
    Ok((tree, closure))
}

/// Where Debian's packages put shared libraries and the dynamic loader.
const LIB_DIRS: [&str; 3] = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64"];

/// From an unpacked package: `sbin/dmsetup` and the shared libraries (and the loader) directly
/// in [`LIB_DIRS`], files and symlinks as they are; documentation, udev rules and everything in
/// subdirectories stay out.
fn add_runtime_files(tree: &mut Tree, package: &Tree) -> Result<(), InitramfsError> {
    for (path, entry) in package.iter() {
        let p = path.as_str().trim_start_matches('/');
        let wanted = p == "sbin/dmsetup"
            || LIB_DIRS.iter().any(|dir| {
                p.strip_prefix(dir)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|name| !name.contains('/') && name.contains(".so"))
            });
        if !wanted || tree.get(path).is_some() {
            continue;
        }
        let entry = match &entry.kind {
            EntryKind::File(_) | EntryKind::Symlink { .. } => entry.clone(),
            EntryKind::HardLink { .. } => {
                let owner = package.resolve_link(path)?;
                match package.get(owner) {
                    Some(e) => e.clone(),
                    None => continue,
                }
            }
            _ => continue,
        };
        if let Some(parent) = path.parent() {
            let mut dirs = Vec::new();
            let mut at = Some(parent);
            while let Some(d) = at {
                if d.is_root() || tree.get(&d).is_some() {
                    break;
                }
                at = d.parent();
                dirs.push(d);
            }
            for d in dirs.into_iter().rev() {
                tree.insert(d, Entry::dir(0o755))?;
            }
        }
        tree.insert(path.clone(), entry)?;
    }
    Ok(())
}

/// Names that go into the shell script unquoted-safe: nothing a shell would interpret.
fn check_safe(what: &'static str, value: &str) -> Result<(), InitramfsError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+/,".contains(c));
    if ok {
        Ok(())
    } else {
        Err(InitramfsError::UnsafeName {
            what,
            value: value.to_string(),
        })
    }
}

fn render_init(template: &str, context: &InitContext) -> Result<String, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    let mut text = env.render_named_str(
        "initramfs-init.sh.j2",
        template,
        minijinja::Value::from(minijinja::value::Serde(context)),
    )?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// Build the initramfs and write it, compressed, to `out`. Returns the sink and the module
/// closure that the `/init` loads.
pub fn build<W: Write>(spec: &InitramfsSpec<'_>, out: W) -> Result<(W, Closure), InitramfsError> {
    let (tree, closure) = build_tree(spec)?;
    let out = match spec.compression {
        Compression::Gzip => {
            // GzEncoder writes mtime 0 and no file name: the header is fixed.
            let enc = flate2::write::GzEncoder::new(out, flate2::Compression::best());
            let enc = cpio::write_tree(&tree, enc, spec.epoch)?;
            enc.finish().map_err(InitramfsError::Compress)?
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)
                .map_err(InitramfsError::Compress)?;
            // The kernel's zstd decompressor wants a content checksum or not, both fine; the
            // frame is single-threaded so the output is deterministic.
            enc.include_checksum(true)
                .map_err(InitramfsError::Compress)?;
            let enc = cpio::write_tree(&tree, enc, spec.epoch)?;
            enc.finish().map_err(InitramfsError::Compress)?
        }
    };
    Ok((out, closure))
}

/// [`build`] into memory.
pub fn build_bytes(spec: &InitramfsSpec<'_>) -> Result<(Vec<u8>, Closure), InitramfsError> {
    build(spec, Vec::new())
}
