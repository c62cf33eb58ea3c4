//! The ESP's content as a [`Tree`]: systemd-boot as the removable-media boot loader
//! (`EFI/BOOT/BOOTX64.EFI`), its `loader/loader.conf`, and one Boot Loader Specification Type #1
//! entry per kernel (`loader/entries/<name>.conf`) with the kernel and initrd beside it under
//! `/<name>/`. The two text files are rendered from `templates/loader.conf.j2` and
//! `templates/entry.conf.j2` (built into kiln). Everything is deterministic: fixed names, entries
//! in the caller's order, and every mtime set to the caller's epoch.

use std::io;

use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};

/// Where the `systemd-boot-efi` package puts the x86-64 boot loader.
pub const SYSTEMD_BOOT_EFI: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Where UEFI firmware looks for a boot loader on removable media (and on any disk without boot
/// variables, as on a fresh OVMF).
pub const REMOVABLE_BOOT_PATH: &str = "EFI/BOOT/BOOTX64.EFI";

/// Where systemd-boot finds the Secure Boot variables it enrolls: with `secure-boot-enroll force`
/// it enrolls only the set named `auto`, on its own.
pub const ENROLL_DIR: &str = "loader/keys/auto";

const LOADER_CONF_TEMPLATE: &str = include_str!("../templates/loader.conf.j2");
const ENTRY_CONF_TEMPLATE: &str = include_str!("../templates/entry.conf.j2");

/// Errors making the ESP content.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("no boot entries: the ESP needs at least one kernel")]
    NoEntries,
    #[error(
        "boot entry name {name:?}: {reason} (use letters, digits, `.`, `_`, `-` and `+`, not \
         starting with `.`)"
    )]
    BadName { name: String, reason: &'static str },
    #[error("two boot entries are named {name:?} (names are compared ignoring case, as FAT does)")]
    DuplicateEntry { name: String },
    #[error("boot entry {name:?}: {field} must be one line of text without NUL")]
    BadField { name: String, field: &'static str },
    #[error("boot entry {name:?}: the kernel is empty")]
    EmptyKernel { name: String },
    #[error(
        "{path} is not in the systemd-boot-efi package tree ({reason}); install the \
         systemd-boot-efi package into the tree that is passed in"
    )]
    SystemdBootMissing { path: String, reason: String },
    #[error("rendering {template}: {message}")]
    Template {
        template: &'static str,
        message: String,
    },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("reading {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// One kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// The entry's id: file name `loader/entries/<name>.conf` and directory `/<name>/` for the
    /// kernel and initrd.
    pub name: String,
    /// The menu title.
    pub title: String,
    /// The `version` line (e.g. the kernel release); omitted when `None`.
    pub version: Option<String>,
    /// The kernel image (an EFI-stub `vmlinuz`).
    pub kernel: Content,
    /// The initrd; no `initrd` line when `None`.
    pub initrd: Option<Content>,
    /// Kernel command line; `root=PARTUUID=<root_partuuid>` is appended when that is set.
    pub cmdline: String,
    pub root_partuuid: Option<uuid::Uuid>,
}

impl BootEntry {
    /// The `linux` path, relative to the ESP root.
    pub fn kernel_path(&self) -> String {
        format!("/{}/vmlinuz", self.name)
    }

    /// The `initrd` path, if there is an initrd.
    pub fn initrd_path(&self) -> Option<String> {
        self.initrd
            .as_ref()
            .map(|_| format!("/{}/initrd.img", self.name))
    }

    /// The `options` line: the command line, then `root=PARTUUID=…`.
    pub fn options(&self) -> String {
        let mut options = self.cmdline.trim().to_string();
        if let Some(uuid) = self.root_partuuid {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("root=PARTUUID={}", uuid.hyphenated()));
        }
        options
    }

    fn check(&self) -> Result<(), BootError> {
        check_name(&self.name)?;
        let one_line = |field, text: &str| {
            if text.contains(['\n', '\r', '\0']) {
                Err(BootError::BadField {
                    name: self.name.clone(),
                    field,
                })
            } else {
                Ok(())
            }
        };
        one_line("title", &self.title)?;
        one_line("version", self.version.as_deref().unwrap_or(""))?;
        one_line("cmdline", &self.cmdline)?;
        if self.kernel.is_empty() {
            return Err(BootError::EmptyKernel {
                name: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// An entry name must be a plain file name on FAT, and not the ESP's own directories.
fn check_name(name: &str) -> Result<(), BootError> {
    let bad = |reason| BootError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 64 {
        return Err(bad("longer than 64 characters"));
    }
    if name.starts_with('.') {
        return Err(bad("starts with `.`"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    {
        return Err(bad("has a character outside the allowed set"));
    }
    if name.eq_ignore_ascii_case("loader") || name.eq_ignore_ascii_case("efi") {
        return Err(bad("collides with the ESP's loader/ or EFI/ directory"));
    }
    Ok(())
}

/// Options for the boot loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Seconds the menu waits (0: boot the default at once; a key press still shows the menu).
    pub timeout_secs: u32,
    /// The mtime of every entry in the ESP tree.
    pub epoch: i64,
    /// Secure Boot variables for systemd-boot to enroll in setup mode: (name, `.auth` bytes)
    /// for `loader/keys/auto/<name>.auth`; `secure-boot-enroll force` in loader.conf.
    pub enroll: Vec<(String, Vec<u8>)>,
}

impl LoaderOptions {
    pub fn new(epoch: i64) -> Self {
        LoaderOptions {
            timeout_secs: 0,
            epoch,
            enroll: Vec::new(),
        }
    }
}

fn template_env() -> Result<minijinja::Environment<'static>, BootError> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .map_err(|e| BootError::Template {
            template: "syntax",
            message: e.to_string(),
        })?;
    env.set_syntax(syntax);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, source) in [
        ("loader.conf.j2", LOADER_CONF_TEMPLATE),
        ("entry.conf.j2", ENTRY_CONF_TEMPLATE),
    ] {
        env.add_template(name, source)
            .map_err(|e| BootError::Template {
                template: name,
                message: e.to_string(),
            })?;
    }
    Ok(env)
}

fn render(
    env: &minijinja::Environment<'_>,
    template: &'static str,
    ctx: minijinja::Value,
) -> Result<String, BootError> {
    let err = |e: minijinja::Error| BootError::Template {
        template,
        message: e.to_string(),
    };
    env.get_template(template)
        .map_err(err)?
        .render(ctx)
        .map_err(err)
}

/// `loader/loader.conf` whose default is the entry id `default` (`<name>.conf` for a Type #1
/// entry, `<name>.efi` for a unified kernel image).
pub fn render_loader_conf(default: &str, opts: &LoaderOptions) -> Result<String, BootError> {
    render(
        &template_env()?,
        "loader.conf.j2",
        minijinja::context! {
            timeout => opts.timeout_secs,
            default => default,
            enroll => !opts.enroll.is_empty(),
        },
    )
}

/// What a Boot Loader Specification Type #1 entry boots: `(linux, initrd, options)` (the first
/// `initrd` line; `options` lines joined with spaces). `None` without a `linux` line.
pub fn parse_entry(text: &str) -> Option<(String, Option<String>, String)> {
    let mut linux = None;
    let mut initrd = None;
    let mut options: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim();
        match key {
            "linux" if linux.is_none() => linux = Some(value.to_string()),
            "initrd" if initrd.is_none() => initrd = Some(value.to_string()),
            "options" => options.push(value),
            _ => {}
        }
    }
    Some((linux?, initrd, options.join(" ")))
}

/// `loader/entries/<name>.conf` for `entry`.
pub fn render_entry(entry: &BootEntry) -> Result<String, BootError> {
    entry.check()?;
    render(
        &template_env()?,
        "entry.conf.j2",
        minijinja::context! {
            title => entry.title.clone(),
            version => entry.version.clone(),
            linux => entry.kernel_path(),
            initrd => entry.initrd_path(),
            options => entry.options(),
        },
    )
}

/// The ESP content: systemd-boot (`systemd_boot`, e.g. from [`systemd_boot_from`]) at
/// [`REMOVABLE_BOOT_PATH`], `loader/loader.conf` with the first entry as the default, and each
/// entry's `.conf`, kernel and initrd. Directories get mode 0755, files 0644 (FAT keeps neither),
/// everything mtime `opts.epoch`.
pub fn esp_tree(
    systemd_boot: &Content,
    entries: &[BootEntry],
    opts: &LoaderOptions,
) -> Result<Tree, BootError> {
    let first = entries.first().ok_or(BootError::NoEntries)?;
    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        entry.check()?;
        if !seen.insert(entry.name.to_ascii_lowercase()) {
            return Err(BootError::DuplicateEntry {
                name: entry.name.clone(),
            });
        }
    }
    let mut tree = Tree::new();
    let epoch = opts.epoch;
    let add_file = |tree: &mut Tree, path: &str, content: Content| -> Result<(), BootError> {
        tree.insert(
            TreePath::new(path)?,
            Entry::file(content, 0o644).mtime(epoch),
        )?;
        Ok(())
    };
    for dir in ["EFI", "EFI/BOOT", "loader", "loader/entries"] {
        tree.insert(TreePath::new(dir)?, Entry::dir(0o755).mtime(epoch))?;
    }
    add_file(&mut tree, REMOVABLE_BOOT_PATH, systemd_boot.clone())?;
    add_file(
        &mut tree,
        "loader/loader.conf",
        Content::inline(render_loader_conf(&format!("{}.conf", first.name), opts)?),
    )?;
    for entry in entries {
        tree.insert(TreePath::new(&entry.name)?, Entry::dir(0o755).mtime(epoch))?;
        add_file(
            &mut tree,
            &format!("loader/entries/{}.conf", entry.name),
            Content::inline(render_entry(entry)?),
        )?;
        add_file(&mut tree, &entry.kernel_path(), entry.kernel.clone())?;
        if let (Some(path), Some(initrd)) = (entry.initrd_path(), &entry.initrd) {
            add_file(&mut tree, &path, initrd.clone())?;
        }
    }
    if let Some(root) = tree.get_mut(&TreePath::root()) {
        root.mtime = epoch;
    }
    Ok(tree)
}

/// The ESP content for a unified kernel image: systemd-boot at [`REMOVABLE_BOOT_PATH`],
/// `loader/loader.conf` defaulting to the image, and the image at `EFI/Linux/<name>.efi`, where
/// systemd-boot finds it as a Type #2 entry (title and version from its `.osrel`).
pub fn uki_esp_tree(
    systemd_boot: &Content,
    name: &str,
    uki: Content,
    opts: &LoaderOptions,
) -> Result<Tree, BootError> {
    check_name(name)?;
    let mut tree = Tree::new();
    let epoch = opts.epoch;
    for dir in ["EFI", "EFI/BOOT", crate::uki::ESP_DIR, "loader"] {
        tree.insert(TreePath::new(dir)?, Entry::dir(0o755).mtime(epoch))?;
    }
    let file = |content: Content| Entry::file(content, 0o644).mtime(epoch);
    tree.insert(
        TreePath::new(REMOVABLE_BOOT_PATH)?,
        file(systemd_boot.clone()),
    )?;
    tree.insert(
        TreePath::new("loader/loader.conf")?,
        file(Content::inline(render_loader_conf(
            &format!("{name}.efi"),
            opts,
        )?)),
    )?;
    tree.insert(
        TreePath::new(&format!("{}/{name}.efi", crate::uki::ESP_DIR))?,
        file(uki),
    )?;
    if !opts.enroll.is_empty() {
        for dir in ["loader/keys", ENROLL_DIR] {
            tree.insert(TreePath::new(dir)?, Entry::dir(0o755).mtime(epoch))?;
        }
        for (var, bytes) in &opts.enroll {
            tree.insert(
                TreePath::new(&format!("{ENROLL_DIR}/{var}.auth"))?,
                file(Content::inline(bytes.clone())),
            )?;
        }
    }
    if let Some(root) = tree.get_mut(&TreePath::root()) {
        root.mtime = epoch;
    }
    Ok(tree)
}

/// systemd-boot's EFI binary from a tree holding the `systemd-boot-efi` package
/// ([`SYSTEMD_BOOT_EFI`]), following a hard link if the package tree has one.
pub fn systemd_boot_from(package: &Tree) -> Result<Content, BootError> {
    package_file(package, SYSTEMD_BOOT_EFI)
}

/// A non-empty file of the `systemd-boot-efi` package tree (systemd-boot, the stub), following
/// a hard link if the package tree has one.
pub fn package_file(package: &Tree, file: &str) -> Result<Content, BootError> {
    let path = TreePath::new(file)?;
    let missing = |reason: String| BootError::SystemdBootMissing {
        path: file.to_string(),
        reason,
    };
    let entry = package
        .get(&path)
        .ok_or_else(|| missing("no such entry".into()))?;
    let entry = match &entry.kind {
        EntryKind::HardLink { .. } => {
            let owner = package.resolve_link(&path)?;
            package
                .get(owner)
                .ok_or_else(|| missing(format!("hard link target {owner} is missing")))?
        }
        _ => entry,
    };
    match &entry.kind {
        EntryKind::File(content) if !content.is_empty() => Ok(content.clone()),
        EntryKind::File(_) => Err(missing("the file is empty".into())),
        other => Err(missing(format!("it is a {}", other.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_parses_back_to_what_boots() {
        let text = "# comment\ntitle kiln\nlinux /kiln/vmlinuz\ninitrd /kiln/initrd\ninitrd /other\noptions root=PARTUUID=x ro\noptions quiet\n";
        assert_eq!(
            parse_entry(text),
            Some((
                "/kiln/vmlinuz".to_string(),
                Some("/kiln/initrd".to_string()),
                "root=PARTUUID=x ro quiet".to_string()
            ))
        );
        assert_eq!(parse_entry("title x\noptions y\n"), None);
        assert_eq!(
            parse_entry("linux\t/k\n"),
            Some(("/k".to_string(), None, String::new()))
        );
    }

    fn entry(name: &str) -> BootEntry {
        BootEntry {
            name: name.into(),
            title: "Kiln Test".into(),
            version: Some("6.1.0-56-cloud-amd64".into()),
            kernel: Content::inline(b"MZkernel".to_vec()),
            initrd: Some(Content::inline(b"070701".to_vec())),
            cmdline: "console=ttyS0 quiet".into(),
            root_partuuid: Some(uuid::Uuid::from_bytes([0x11; 16])),
        }
    }

    #[test]
    fn renders_loader_and_entry() {
        let loader = render_loader_conf("kiln.conf", &LoaderOptions::new(0)).unwrap();
        assert_eq!(
            loader,
            "# systemd-boot configuration, written by kiln (src/boot.rs).\n\
             timeout 0\ndefault kiln.conf\neditor no\n"
        );
        let text = render_entry(&entry("kiln")).unwrap();
        assert_eq!(
            text,
            "# Boot Loader Specification Type #1 entry, written by kiln (src/boot.rs).\n\
             title Kiln Test\n\
             version 6.1.0-56-cloud-amd64\n\
             linux /kiln/vmlinuz\n\
             initrd /kiln/initrd.img\n\
             options console=ttyS0 quiet root=PARTUUID=11111111-1111-1111-1111-111111111111\n"
        );
        let mut bare = entry("kiln");
        bare.initrd = None;
        bare.version = None;
        bare.root_partuuid = None;
        let text = render_entry(&bare).unwrap();
        assert!(
            !text.contains("initrd") && !text.contains("version"),
            "{text}"
        );
        assert!(text.ends_with("linux /kiln/vmlinuz\noptions console=ttyS0 quiet\n"));
    }

    #[test]
    fn esp_tree_layout_is_fixed() {
        let sdboot = Content::inline(b"MZsdboot".to_vec());
        let tree = esp_tree(&sdboot, &[entry("kiln")], &LoaderOptions::new(1234)).unwrap();
        let paths: Vec<String> = tree.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            paths,
            [
                "/",
                "/EFI",
                "/EFI/BOOT",
                "/EFI/BOOT/BOOTX64.EFI",
                "/kiln",
                "/kiln/initrd.img",
                "/kiln/vmlinuz",
                "/loader",
                "/loader/entries",
                "/loader/entries/kiln.conf",
                "/loader/loader.conf",
            ]
        );
        assert!(tree.iter().all(|(_, e)| e.mtime == 1234));
        let again = esp_tree(&sdboot, &[entry("kiln")], &LoaderOptions::new(1234)).unwrap();
        assert_eq!(tree, again);
    }

    #[test]
    fn refuses_bad_entries() {
        let sdboot = Content::inline(b"MZ".to_vec());
        let opts = LoaderOptions::new(0);
        assert!(matches!(
            esp_tree(&sdboot, &[], &opts),
            Err(BootError::NoEntries)
        ));
        for name in ["", "../x", "a b", ".hidden", "loader", "EFI"] {
            assert!(
                matches!(
                    esp_tree(&sdboot, &[entry(name)], &opts),
                    Err(BootError::BadName { .. })
                ),
                "{name:?}"
            );
        }
        let mut e = entry("kiln");
        e.cmdline = "a\nlinux /evil".into();
        assert!(matches!(
            esp_tree(&sdboot, &[e], &opts),
            Err(BootError::BadField { .. })
        ));
        assert!(matches!(
            esp_tree(&sdboot, &[entry("a"), entry("A")], &opts),
            Err(BootError::DuplicateEntry { .. })
        ));
    }

    #[test]
    fn finds_systemd_boot_in_a_package_tree() {
        let mut pkg = Tree::new();
        assert!(systemd_boot_from(&pkg).is_err());
        pkg.add(
            SYSTEMD_BOOT_EFI,
            Entry::file(Content::inline(b"MZ".to_vec()), 0o644),
        )
        .unwrap();
        assert_eq!(systemd_boot_from(&pkg).unwrap().len(), 2);
    }
}
