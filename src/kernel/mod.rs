//! The kernel an image boots: finding `vmlinuz` and the module tree in an unpacked kernel
//! package, resolving kernel modules with their dependencies, and building the initramfs (a cpio
//! newc archive with busybox, the modules and an `/init` that mounts the root partition); or
//! building a kernel from source and a configuration fragment ([`build`], [`config`]).

pub mod build;
pub mod config;
pub mod cpio;
pub mod initramfs;
pub mod modules;

use std::collections::BTreeSet;

use thiserror::Error;

use crate::tree::{Content, EntryKind, Tree, TreePath, read_content};
pub use modules::{Module, ModuleCompression, ModuleError, ModuleIndex, Resolved};

/// What the root disk needs when the recipe names no modules: the virtio PCI transport, the
/// virtio block driver, ext4, and crc32c for ext4's metadata checksums.
pub const ROOT_DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4", "crc32c"];

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "no kernel in the tree: expected /boot/vmlinuz-<version> (is the kernel package, e.g. \
         {}, in the recipe?)",
        crate::debian::DEFAULT_KERNEL_PACKAGE
    )]
    NoKernel,
    #[error("several kernels in the tree ({versions}); name the one to boot")]
    SeveralKernels { versions: String },
    #[error("kernel {version} not in the tree; found: {found}")]
    VersionNotFound { version: String, found: String },
    #[error("/boot/vmlinuz-{version} is a {kind}, expected a regular file")]
    NotAFile { version: String, kind: &'static str },
    #[error("kernel module `{name}` not in linux {version}{hint}")]
    NoSuchModule {
        name: String,
        version: String,
        hint: String,
    },
    #[error(
        "kernel module `{module}` depends on `{dependency}`, which linux {version} does not \
         have (a broken kernel package?)"
    )]
    MissingDependency {
        module: String,
        dependency: String,
        version: String,
    },
    #[error("reading {path} from the kernel package")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Module(#[from] ModuleError),
}

/// A kernel installed in a Tree: its version, image and modules.
#[derive(Debug, Clone)]
pub struct InstalledKernel {
    /// e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    pub vmlinuz: Content,
    /// `/lib/modules/<version>` or `/usr/lib/modules/<version>`; `None` when the package has no
    /// modules.
    pub modules_dir: Option<TreePath>,
    pub index: ModuleIndex,
}

/// The modules to load for a request, in load order, and the requested names that are built in.
#[derive(Debug, Clone, Default)]
pub struct Closure {
    /// Dependencies first; each module once.
    pub modules: Vec<Module>,
    /// Requested names (canonical) that are compiled into the kernel: nothing to load.
    pub builtin: Vec<String>,
}

impl Closure {
    pub fn names(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.name.as_str()).collect()
    }
}

impl InstalledKernel {
    /// The only kernel in the tree.
    pub fn from_tree(tree: &Tree) -> Result<InstalledKernel, KernelError> {
        Self::from_tree_version(tree, None)
    }

    /// The kernel `version` (or the only one when `None`).
    pub fn from_tree_version(
        tree: &Tree,
        version: Option<&str>,
    ) -> Result<InstalledKernel, KernelError> {
        let boot = TreePath::new("boot").map_err(|_| KernelError::NoKernel)?;
        let versions: Vec<String> = tree
            .children(&boot)
            .filter_map(|(p, _)| p.file_name().strip_prefix("vmlinuz-").map(str::to_string))
            .collect();
        let version = match (version, versions.as_slice()) {
            (_, []) => return Err(KernelError::NoKernel),
            (Some(v), found) => {
                if !found.iter().any(|f| f == v) {
                    return Err(KernelError::VersionNotFound {
                        version: v.to_string(),
                        found: found.join(", "),
                    });
                }
                v.to_string()
            }
            (None, [only]) => only.clone(),
            (None, found) => {
                return Err(KernelError::SeveralKernels {
                    versions: found.join(", "),
                });
            }
        };
        let vmlinuz_path = boot
            .join(&format!("vmlinuz-{version}"))
            .map_err(|_| KernelError::NoKernel)?;
        let vmlinuz = file_content(tree, &vmlinuz_path)
            .map_err(|kind| KernelError::NotAFile {
                version: version.clone(),
                kind,
            })?
            .clone();

        let modules_dir = ["usr/lib/modules", "lib/modules"].iter().find_map(|base| {
            let p = TreePath::new(&format!("{base}/{version}")).ok()?;
            matches!(tree.get(&p)?.kind, EntryKind::Dir).then_some(p)
        });
        let mut index = ModuleIndex::default();
        if let Some(dir) = &modules_dir {
            let prefix_len = dir.as_str().len() + 1;
            for (path, entry) in tree.descendants(dir) {
                let name = path.file_name();
                let Some((stem, compression)) = ModuleCompression::from_file_name(name) else {
                    continue;
                };
                if matches!(entry.kind, EntryKind::Dir) {
                    continue;
                }
                let Ok(content) = file_content(tree, path) else {
                    continue;
                };
                let mut module = Module {
                    name: modules::canonical(stem),
                    rel_path: path.as_str()[prefix_len..].to_string(),
                    tree_path: path.clone(),
                    content: content.clone(),
                    compression,
                    depends: Vec::new(),
                    softdep_pre: Vec::new(),
                    softdep_post: Vec::new(),
                    aliases: Vec::new(),
                };
                let records = modules::read_modinfo(&module)?;
                modules::apply_modinfo(&mut module, &records);
                index.insert(module);
            }
            for (file, is_modinfo) in [
                ("modules.builtin", false),
                ("modules.builtin.modinfo", true),
            ] {
                let Ok(p) = dir.join(file) else { continue };
                let Ok(content) = file_content(tree, &p) else {
                    continue;
                };
                let bytes = read_content(content).map_err(|source| KernelError::Io {
                    path: p.to_string(),
                    source,
                })?;
                if is_modinfo {
                    index.add_builtin_modinfo(&bytes);
                } else {
                    index.add_builtin_list(&String::from_utf8_lossy(&bytes));
                }
            }
        }
        Ok(InstalledKernel {
            version,
            vmlinuz,
            modules_dir,
            index,
        })
    }

    /// Whether `name` (a module name or alias) is compiled into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        matches!(self.index.resolve(name), Some(Resolved::Builtin(_)))
    }

    /// The modules to load for `names`, dependencies first (`depends=` and soft `pre:`
    /// dependencies before a module, soft `post:` ones after it). Deterministic: the order
    /// follows the request and each module's own dependency lists. A name that is neither a
    /// module, an alias nor built in is an error with a suggestion.
    pub fn closure<S: AsRef<str>>(&self, names: &[S]) -> Result<Closure, KernelError> {
        let mut walk = Walk {
            kernel: self,
            done: BTreeSet::new(),
            active: BTreeSet::new(),
            out: Closure::default(),
        };
        for name in names {
            let name = name.as_ref();
            match self.index.resolve(name) {
                None => {
                    let wanted = modules::canonical(name);
                    let hint = match crate::recipe::diag::did_you_mean(&wanted, self.index.names())
                    {
                        Some(s) => format!("; did you mean `{s}`?"),
                        None => format!(
                            "; it has {} loadable and {} built-in modules",
                            self.index.modules.len(),
                            self.index.builtin.len()
                        ),
                    };
                    return Err(KernelError::NoSuchModule {
                        name: name.to_string(),
                        version: self.version.clone(),
                        hint,
                    });
                }
                Some(Resolved::Builtin(_)) => {
                    let canon = modules::canonical(name);
                    if !walk.out.builtin.contains(&canon) {
                        walk.out.builtin.push(canon);
                    }
                }
                Some(Resolved::Module(m)) => walk.visit(m)?,
            }
        }
        Ok(walk.out)
    }

    /// [`InstalledKernel::closure`] of [`ROOT_DISK_MODULES`].
    pub fn root_disk_closure(&self) -> Result<Closure, KernelError> {
        self.closure(ROOT_DISK_MODULES)
    }
}

struct Walk<'a> {
    kernel: &'a InstalledKernel,
    done: BTreeSet<String>,
    active: BTreeSet<String>,
    out: Closure,
}

impl<'a> Walk<'a> {
    fn visit(&mut self, module: &'a Module) -> Result<(), KernelError> {
        if self.done.contains(&module.name) || !self.active.insert(module.name.clone()) {
            return Ok(());
        }
        for soft in &module.softdep_pre {
            self.visit_optional(soft)?;
        }
        for dep in &module.depends {
            match self.kernel.index.resolve(dep) {
                Some(Resolved::Module(m)) => self.visit(m)?,
                Some(Resolved::Builtin(_)) => {}
                None => {
                    return Err(KernelError::MissingDependency {
                        module: module.name.clone(),
                        dependency: dep.clone(),
                        version: self.kernel.version.clone(),
                    });
                }
            }
        }
        self.active.remove(&module.name);
        self.done.insert(module.name.clone());
        self.out.modules.push(module.clone());
        for soft in &module.softdep_post {
            self.visit_optional(soft)?;
        }
        Ok(())
    }

    /// Soft dependencies are loaded when present; missing or built-in ones are skipped.
    fn visit_optional(&mut self, name: &str) -> Result<(), KernelError> {
        if let Some(Resolved::Module(m)) = self.kernel.index.resolve(name) {
            self.visit(m)?;
        }
        Ok(())
    }
}

/// The content of the regular file at `path`, following hard links; else the kind found.
fn file_content<'t>(tree: &'t Tree, path: &TreePath) -> Result<&'t Content, &'static str> {
    let owner = tree.resolve_link(path).map_err(|_| "missing entry")?;
    match tree.get(owner).map(|e| &e.kind) {
        Some(EntryKind::File(c)) => Ok(c),
        Some(other) => Err(other.name()),
        None => Err("missing entry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;

    fn add_module(tree: &mut Tree, version: &str, file: &str, info: &str) {
        let elf = modules::tests::tiny_elf(info.replace(';', "\0").as_bytes());
        tree.add(
            &format!("lib/modules/{version}/kernel/{file}"),
            Entry::file(Content::inline(elf), 0o644),
        )
        .unwrap();
    }

    fn sample(version: &str) -> Tree {
        let mut t = Tree::new();
        t.add(
            &format!("boot/vmlinuz-{version}"),
            Entry::file(Content::inline(b"bzImage".to_vec()), 0o644),
        )
        .unwrap();
        add_module(
            &mut t,
            version,
            "a.ko",
            "name=a;depends=b,c;softdep=post: d",
        );
        add_module(
            &mut t,
            version,
            "b.ko",
            "name=b;depends=c;softdep=pre: loop-alias",
        );
        add_module(&mut t, version, "c.ko", "name=c;depends=");
        add_module(&mut t, version, "d.ko", "name=d;depends=;softdep=pre: a");
        add_module(
            &mut t,
            version,
            "e-x.ko",
            "name=e_x;alias=loop-alias;softdep=pre: b",
        );
        add_module(&mut t, version, "broken.ko", "name=broken;depends=gone");
        t.add(
            &format!("lib/modules/{version}/modules.builtin"),
            Entry::file(Content::inline(b"kernel/fs/ext4/ext4.ko\n".to_vec()), 0o644),
        )
        .unwrap();
        t
    }

    #[test]
    fn closure_orders_dependencies_first_and_survives_soft_cycles() {
        let k = InstalledKernel::from_tree(&sample("9.9.9-test")).unwrap();
        assert_eq!(k.version, "9.9.9-test");
        assert_eq!(read_content(&k.vmlinuz).unwrap(), b"bzImage");
        let c = k.closure(&["a", "ext4", "e-x"]).unwrap();
        // a needs b, then c. b softly wants e_x (by its alias) before itself and needs c;
        // e_x softly wants b back (a cycle: skipped). d comes after a (post), its pre-softdep
        // on a already satisfied.
        assert_eq!(c.names(), ["e_x", "c", "b", "a", "d"]);
        assert_eq!(c.builtin, ["ext4"]);
        let err = k.closure(&["broken"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "kernel module `broken` depends on `gone`, which linux 9.9.9-test does not have \
             (a broken kernel package?)"
        );
    }

    #[test]
    fn finds_exactly_one_kernel_or_says_why() {
        assert!(matches!(
            InstalledKernel::from_tree(&Tree::new()),
            Err(KernelError::NoKernel)
        ));
        let mut two = sample("1.0");
        two.add(
            "boot/vmlinuz-2.0",
            Entry::file(Content::inline(vec![1]), 0o644),
        )
        .unwrap();
        let err = InstalledKernel::from_tree(&two).unwrap_err().to_string();
        assert_eq!(
            err,
            "several kernels in the tree (1.0, 2.0); name the one to boot"
        );
        let k = InstalledKernel::from_tree_version(&two, Some("2.0")).unwrap();
        assert!(k.modules_dir.is_none() && k.index.modules.is_empty());
        let err = InstalledKernel::from_tree_version(&two, Some("3.0"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "kernel 3.0 not in the tree; found: 1.0, 2.0");
    }
}
