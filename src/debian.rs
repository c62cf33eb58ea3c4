//! The `rootfs.base: debian` base: a Debian system made by mmdebstrap (Debian package
//! `mmdebstrap`) and read into a [`Tree`] straight from its tar stream — nothing is extracted
//! onto the host — and the image overlay kiln puts on it (accounts, hostname, fstab, the
//! recipe's files; the systemd parts are in [`crate::systemd`]).
//!
//! The base is a function of [`BaseSpec`] and the mirror's signed release: the caller keys its
//! cache on [`BaseSpec::key_inputs`] so that one base serves every recipe (and every template
//! change) that asks for the same suite, variant, components and packages.

use crate::home::BlobStore;
use crate::packages::{Archive, Deps};
use crate::rootfs::{Mounts, RootfsError, RootfsSpec};
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};

/// The package kiln adds to the base when the recipe names no kernel.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// Locales that need no `locales` package (glibc ships C.UTF-8 in `libc-bin`).
const BUILTIN_LOCALES: [&str; 4] = ["C", "POSIX", "C.UTF-8", "C.utf8"];

#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error(
        "mmdebstrap not found: install the Debian package mmdebstrap (apt-get install mmdebstrap)"
    )]
    MmdebstrapMissing,
    #[error("starting mmdebstrap")]
    Spawn(#[source] std::io::Error),
    #[error("writing the Debian base into the cache (check that $KILN_HOME has space)")]
    Store(#[source] std::io::Error),
    #[error(
        "mmdebstrap {suite} ({variant}) failed ({status}); its last lines:\n{stderr}\ncheck the \
         package names and the mirror {mirror}"
    )]
    Failed {
        suite: String,
        variant: String,
        mirror: String,
        status: String,
        stderr: String,
    },
    #[error("reading mmdebstrap's tarball; mmdebstrap said:\n{stderr}")]
    Tarball {
        #[source]
        source: TreeError,
        stderr: String,
    },
    #[error(
        "rootfs.locale `{locale}` must be compiled by locale-gen: add `locales` to \
         rootfs.packages (or use C.UTF-8)"
    )]
    LocaleNeedsPackage { locale: String },
    #[error("{path} in the Debian base: {message}")]
    BadBaseFile { path: String, message: String },
}

/// What the base is made of: every field goes into its cache key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    pub components: Vec<String>,
    /// Sorted, without duplicates; the kernel package included.
    pub packages: Vec<String>,
    pub mirror: String,
    /// A locale to compile with locale-gen (`None` for the built-in ones).
    pub locale: Option<String>,
}

impl BaseSpec {
    /// The base a recipe asks for, against `mirror`.
    pub fn of(
        r: &crate::recipe::schema::Rootfs,
        kernel_package: Option<&str>,
        mirror: &str,
    ) -> Result<BaseSpec, DebianError> {
        let mut packages: Vec<String> = r.packages.iter().map(|p| p.trim().to_string()).collect();
        let kernel = kernel_package.unwrap_or(DEFAULT_KERNEL_PACKAGE).to_string();
        packages.push(kernel);
        packages.sort();
        packages.dedup();
        let locale = match r.locale.as_deref() {
            None => None,
            Some(l) if BUILTIN_LOCALES.contains(&l) => None,
            Some(l) => {
                if !packages
                    .iter()
                    .any(|p| p == "locales" || p == "locales-all")
                {
                    return Err(DebianError::LocaleNeedsPackage {
                        locale: l.to_string(),
                    });
                }
                Some(l.to_string())
            }
        };
        Ok(BaseSpec {
            suite: r.suite.clone().unwrap_or_else(|| "bookworm".into()),
            variant: r.variant.clone().unwrap_or_else(|| "minbase".into()),
            components: if r.components.is_empty() {
                vec!["main".into()]
            } else {
                r.components.clone()
            },
            packages,
            mirror: mirror.trim_end_matches('/').to_string(),
            locale,
        })
    }

    /// The cache key inputs: this spec plus the digest of the release it is installed from.
    pub fn key_inputs(&self, release_digest: &str) -> Value {
        json!({ "spec": self, "release": release_digest })
    }

    /// Check every package name against the signed index of `archive` (fast, and a clearer
    /// error than apt's).
    pub fn check_packages(&self, archive: &Archive) -> Result<(), crate::packages::PackagesError> {
        let names: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        archive.resolve(&names, Deps::None)?;
        Ok(())
    }

    /// The mmdebstrap arguments that write this base as a tarball to stdout.
    pub fn mmdebstrap_args(&self) -> Vec<String> {
        let mut args = vec![
            "--mode=auto".to_string(),
            "--format=tar".to_string(),
            format!("--variant={}", self.variant),
            format!("--components={}", self.components.join(",")),
        ];
        if !self.packages.is_empty() {
            args.push(format!("--include={}", self.packages.join(",")));
        }
        // kiln makes the initramfs itself: while packages install, update-initramfs is a no-op
        // (diverted), so no unused initrd is built and the base builds faster.
        args.push(
            "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add \
             /usr/sbin/update-initramfs && ln -s /bin/true \"$1/usr/sbin/update-initramfs\""
                .to_string(),
        );
        let mut customize = String::from(
            "rm -f \"$1/usr/sbin/update-initramfs\" && chroot \"$1\" dpkg-divert --quiet --local \
             --rename --remove /usr/sbin/update-initramfs",
        );
        if let Some(locale) = &self.locale {
            let charset = if locale.to_ascii_lowercase().contains("utf-8")
                || locale.to_ascii_lowercase().contains("utf8")
            {
                "UTF-8"
            } else {
                "ISO-8859-1"
            };
            customize.push_str(&format!(
                " && echo '{} {charset}' > \"$1/etc/locale.gen\" && chroot \"$1\" locale-gen",
                locale.replace('\'', "")
            ));
        }
        args.push(format!("--customize-hook={customize}"));
        args.push(self.suite.clone());
        args.push("-".to_string());
        args.push(self.mirror.clone());
        args
    }
}

/// Run mmdebstrap for `spec` and read its tarball (stdout) into a Tree whose file contents go
/// into `blobs`. `epoch` is its SOURCE_DATE_EPOCH (kiln uses the release's date, so the base
/// depends only on its key).
pub fn build_base(spec: &BaseSpec, blobs: &BlobStore, epoch: i64) -> Result<Tree, DebianError> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(spec.mmdebstrap_args())
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::info!(suite = %spec.suite, variant = %spec.variant, packages = spec.packages.len(),
        "building the Debian base with mmdebstrap");
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DebianError::MmdebstrapMissing
        } else {
            DebianError::Spawn(e)
        }
    })?;
    let stderr = child.stderr.take();
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let mut tree = Tree::new();
    let read = match child.stdout.take() {
        Some(stdout) => tree.extend_from_tar(stdout, &mut |r, _len| {
            let (digest, len) = blobs.put_unsynced(r)?;
            Ok(Content::Host {
                path: blobs.path(&digest),
                len,
            })
        }),
        None => Ok(()),
    };
    if read.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(DebianError::Spawn)?;
    let stderr = stderr_thread.join().unwrap_or_default();
    // apt quotes URLs in its messages: shown without credentials.
    let tail = crate::net::redact(&tail_lines(&stderr, 30)).into_owned();
    if !status.success() {
        return Err(DebianError::Failed {
            suite: spec.suite.clone(),
            variant: spec.variant.clone(),
            mirror: crate::net::redact(&spec.mirror).into_owned(),
            status: status.to_string(),
            stderr: tail,
        });
    }
    read.map_err(|source| DebianError::Tarball {
        source,
        stderr: tail,
    })?;
    // One flush for all the base's blobs, before the caller records anything that names them.
    blobs.sync().map_err(DebianError::Store)?;
    Ok(tree)
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Text of a regular file of the tree (empty when absent).
fn text_of(tree: &Tree, path: &str) -> Result<String, RootfsError> {
    let p = TreePath::new(path)?;
    match tree.get(&p).map(|e| &e.kind) {
        None => Ok(String::new()),
        Some(EntryKind::File(c)) => {
            let bytes = crate::tree::read_content(c).map_err(|e| TreeError::Io {
                path: path.into(),
                source: e,
            })?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        Some(other) => Err(RootfsError::Tree(TreeError::InvalidPath {
            path: path.to_string(),
            reason: if matches!(other, EntryKind::Dir) {
                "is a directory, expected a file"
            } else {
                "is not a regular file"
            },
        })),
    }
}

/// `name → id` of the colon-separated database `text` (`/etc/passwd`: field 2 is the uid).
fn ids_of(text: &str) -> BTreeMap<u32, String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

fn add_text(tree: &mut Tree, path: &str, text: String, mode: u32) -> Result<(), RootfsError> {
    tree.add(path, Entry::file(Content::inline(text), mode))?;
    Ok(())
}

fn ensure_newline(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The image's root Tree for a `rootfs.base: debian` recipe: the base plus users and groups
/// (appended to its passwd, shadow, group and gshadow), SSH keys, hostname, fstab, the systemd
/// configuration, and the recipe's files, directories and symlinks; every mtime is
/// SOURCE_DATE_EPOCH.
pub fn debian_rootfs(
    spec: &RootfsSpec<'_>,
    base: Tree,
    mounts: &Mounts,
) -> Result<Tree, RootfsError> {
    let mut tree = base;
    let passwd = text_of(&tree, "/etc/passwd")?;
    let group = text_of(&tree, "/etc/group")?;
    let shadow = text_of(&tree, "/etc/shadow")?;
    let gshadow = text_of(&tree, "/etc/gshadow")?;
    let (users, groups) =
        crate::rootfs::accounts_over(spec.rootfs, ids_of(&passwd), ids_of(&group), "/bin/bash")?;
    let base_groups: Vec<String> = group
        .lines()
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect();
    let days = spec.epoch.max(0) / crate::time::SECS_PER_DAY;

    let mut passwd = ensure_newline(passwd);
    let mut shadow = ensure_newline(shadow);
    for u in &users {
        passwd.push_str(&format!(
            "{}:x:{}:{}::{}:{}\n",
            u.name, u.uid, u.gid, u.home, u.shell
        ));
        shadow.push_str(&format!("{}:{}:{days}:0:99999:7:::\n", u.name, u.password));
    }
    // Groups: members added to the base's groups (sudo, adm, …), new groups appended.
    let members_of = |name: &str| -> Vec<String> {
        groups
            .iter()
            .filter(|g| g.name == name)
            .flat_map(|g| g.members.clone())
            .collect()
    };
    let with_members = |text: &str, member_field: usize| -> String {
        let mut out = String::new();
        for line in text.lines() {
            let mut fields: Vec<String> = line.split(':').map(str::to_string).collect();
            let extra = fields.first().map(|n| members_of(n)).unwrap_or_default();
            if !extra.is_empty() && fields.len() > member_field {
                let mut members: Vec<String> = fields[member_field]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect();
                for m in extra {
                    if !members.contains(&m) {
                        members.push(m);
                    }
                }
                fields[member_field] = members.join(",");
            }
            out.push_str(&fields.join(":"));
            out.push('\n');
        }
        out
    };
    let mut group_text = with_members(&group, 3);
    let mut gshadow_text = with_members(&gshadow, 3);
    for g in groups.iter().filter(|g| !base_groups.contains(&g.name)) {
        let members = g.members.join(",");
        group_text.push_str(&format!("{}:x:{}:{members}\n", g.name, g.gid));
        gshadow_text.push_str(&format!("{}:!::{members}\n", g.name));
    }
    add_text(&mut tree, "/etc/passwd", passwd, 0o644)?;
    add_text(&mut tree, "/etc/group", group_text, 0o644)?;
    // Debian: shadow and gshadow are root:shadow 0640.
    let shadow_gid = ids_of(&text_of(&tree, "/etc/group")?)
        .into_iter()
        .find(|(_, n)| n == "shadow")
        .map(|(id, _)| id)
        .unwrap_or(0);
    tree.add(
        "/etc/shadow",
        Entry::file(Content::inline(shadow), 0o640).owner(0, shadow_gid),
    )?;
    tree.add(
        "/etc/gshadow",
        Entry::file(Content::inline(gshadow_text), 0o640).owner(0, shadow_gid),
    )?;
    crate::rootfs::add_homes(&mut tree, spec, &users)?;

    let hostname = spec.hostname();
    let ctx = json!({
        "hostname": hostname,
        "root_partuuid": mounts.root_partuuid,
        "esp_partuuid": mounts.esp_partuuid,
        "verity": mounts.verity,
    });
    let render = |name: &str, ctx: Value| {
        spec.templates
            .render(name, ctx)
            .map_err(|message| RootfsError::Template {
                name: name.to_string(),
                message,
            })
    };
    add_text(&mut tree, "/etc/hostname", format!("{hostname}\n"), 0o644)?;
    add_text(
        &mut tree,
        "/etc/hosts",
        render("debian/hosts.j2", ctx.clone())?,
        0o644,
    )?;
    add_text(
        &mut tree,
        "/etc/fstab",
        render("debian/fstab.j2", ctx.clone())?,
        0o644,
    )?;
    // The ESP's mount point (systemd makes a missing one, but not on a read-only root).
    let boot_efi = TreePath::new("/boot/efi")?;
    if mounts.esp_partuuid.is_some() && tree.get(&boot_efi).is_none() {
        tree.insert(boot_efi, Entry::dir(0o755))?;
    }
    // Logs and caches of the build host's run, not of the image.
    for path in [
        "/var/log/dpkg.log",
        "/var/log/apt/history.log",
        "/var/log/apt/term.log",
        "/var/log/alternatives.log",
        "/var/cache/ldconfig/aux-cache",
    ] {
        tree.remove(&TreePath::new(path)?);
    }
    crate::rootfs::apply_recipe_entries(&mut tree, spec, &users, &groups)?;
    crate::systemd::configure(&mut tree, spec)?;
    for (_, entry) in tree.iter_mut() {
        entry.mtime = spec.epoch;
    }
    tree.validate()?;
    Ok(tree)
}

/// The directories a Debian image's kernel lives in.
const KERNEL_DIRS: [&str; 3] = ["boot", "usr/lib/modules", "lib/modules"];

/// Whether an absolute manifest path (`/boot/vmlinuz-…`) is under one of [`KERNEL_DIRS`].
pub fn holds_kernel(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    KERNEL_DIRS.iter().any(|d| {
        rel.strip_prefix(d)
            .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// The kernel's files of an image tree (`/boot/vmlinuz-*` and the module directories), as a
/// small Tree that [`crate::kernel::InstalledKernel::from_tree`] reads: the kernel comes from the image's
/// own packages.
pub fn kernel_tree(image: &Tree) -> Result<Tree, TreeError> {
    let mut out = Tree::new();
    for dir in KERNEL_DIRS {
        let d = TreePath::new(dir)?;
        if !image.get(&d).is_some_and(|e| e.kind == EntryKind::Dir) {
            continue;
        }
        out.insert(d.clone(), Entry::dir(0o755))?;
        for (p, e) in image.descendants(&d) {
            out.insert(p.clone(), e.clone())?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_kernel_matches_kernel_dirs_only() {
        assert!(holds_kernel("/boot/vmlinuz-6.1.0-1-cloud-amd64"));
        assert!(holds_kernel("/usr/lib/modules/6.1/kernel/x.ko"));
        assert!(!holds_kernel("/boot"));
        assert!(!holds_kernel("/bootx/vmlinuz"));
        assert!(!holds_kernel("/usr/lib/modules-load.d/a.conf"));
        assert!(!holds_kernel("/etc/passwd"));
    }

    #[test]
    fn ids_of_reads_passwd_and_group() {
        let ids = ids_of(
            "root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n",
        );
        assert_eq!(ids.get(&42).map(String::as_str), Some("_apt"));
        assert_eq!(ids.get(&0).map(String::as_str), Some("root"));
        let g = ids_of("root:x:0:\nsudo:x:27:\n");
        assert_eq!(g.get(&27).map(String::as_str), Some("sudo"));
    }

    #[test]
    fn mmdebstrap_args_carry_the_spec() {
        let spec = BaseSpec {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            components: vec!["main".into()],
            packages: vec![DEFAULT_KERNEL_PACKAGE.into(), "systemd".into()],
            mirror: "http://deb.debian.org/debian".into(),
            locale: None,
        };
        let args = spec.mmdebstrap_args();
        assert!(args.contains(&"--variant=minbase".to_string()));
        assert!(args.contains(&format!("--include={DEFAULT_KERNEL_PACKAGE},systemd")));
        assert_eq!(
            &args[args.len() - 3..],
            ["bookworm", "-", "http://deb.debian.org/debian"]
        );
    }
}
