//! Kernel modules: reading a module's `.modinfo` ELF section, the index of a kernel's module
//! tree (names, aliases, built-ins) and the load-order closure of requested modules. Debian's
//! kernel packages ship no `modules.dep` (depmod runs at install time), so dependencies come from
//! each module's own `depends=` and `softdep=` records.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use thiserror::Error;

use crate::tree::{Content, TreePath};

/// The largest `.modinfo` section accepted (real ones are a few KiB).
const MAX_MODINFO: u64 = 1 << 20;
/// The largest decompressed module accepted.
const MAX_MODULE: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum ModuleError {
    #[error("kernel module {path}: {what}")]
    Malformed { path: String, what: String },
    #[error("kernel module {path}: reading")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel module {path}: {kind}-compressed modules are not supported yet \
         (kiln reads .ko and .ko.zst)"
    )]
    UnsupportedCompression { path: String, kind: &'static str },
}

/// How a module file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    None,
    Zstd,
    Xz,
    Gzip,
}

impl ModuleCompression {
    /// From the file name; `None` if it is not a module file.
    pub fn from_file_name(name: &str) -> Option<(&str, ModuleCompression)> {
        for (suffix, kind) in [
            (".ko", ModuleCompression::None),
            (".ko.zst", ModuleCompression::Zstd),
            (".ko.xz", ModuleCompression::Xz),
            (".ko.gz", ModuleCompression::Gzip),
        ] {
            if let Some(stem) = name.strip_suffix(suffix) {
                return Some((stem, kind));
            }
        }
        None
    }
}

/// A loadable module of a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`-` written as `_`), as the kernel reports it.
    pub name: String,
    /// Path relative to the module directory, e.g. `kernel/fs/ext4/ext4.ko`.
    pub rel_path: String,
    /// Where the file is in the kernel's Tree.
    pub tree_path: TreePath,
    pub content: Content,
    pub compression: ModuleCompression,
    /// Hard dependencies (`depends=`), canonical names.
    pub depends: Vec<String>,
    /// Optional modules or aliases to load before (`softdep=pre:`).
    pub softdep_pre: Vec<String>,
    /// Optional modules or aliases to load after (`softdep=post:`).
    pub softdep_post: Vec<String>,
    /// Exact aliases (no wildcards), canonical.
    pub aliases: Vec<String>,
}

impl Module {
    /// The module's path relative to the module directory once decompressed (`.ko`).
    pub fn plain_rel_path(&self) -> String {
        match ModuleCompression::from_file_name(&self.rel_path) {
            Some((stem, _)) => format!("{stem}.ko"),
            None => self.rel_path.clone(),
        }
    }

    /// Open the module's ELF bytes (decompressed when needed).
    pub fn open_plain(&self) -> Result<Box<dyn Read + '_>, ModuleError> {
        let io_err = |source| ModuleError::Io {
            path: self.tree_path.to_string(),
            source,
        };
        let raw = self.content.open().map_err(io_err)?;
        Ok(match self.compression {
            ModuleCompression::None => raw,
            ModuleCompression::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
            ModuleCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(raw).map_err(io_err)?)
            }
            ModuleCompression::Xz => {
                return Err(ModuleError::UnsupportedCompression {
                    path: self.tree_path.to_string(),
                    kind: "xz",
                });
            }
        })
    }

    /// The decompressed module as Tree content: the original content when it is not
    /// compressed, else the decompressed bytes in memory.
    pub fn plain_content(&self) -> Result<Content, ModuleError> {
        if self.compression == ModuleCompression::None {
            return Ok(self.content.clone());
        }
        let mut bytes = Vec::new();
        self.open_plain()?
            .take(MAX_MODULE + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ModuleError::Io {
                path: self.tree_path.to_string(),
                source,
            })?;
        if bytes.len() as u64 > MAX_MODULE {
            return Err(ModuleError::Malformed {
                path: self.tree_path.to_string(),
                what: format!("decompresses to more than {MAX_MODULE} bytes"),
            });
        }
        Ok(Content::inline(bytes))
    }
}

/// Canonical module name: the kernel treats `-` and `_` alike.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The `key=value` records of a module's `.modinfo` section, in file order.
pub fn read_modinfo(module: &Module) -> Result<Vec<(String, String)>, ModuleError> {
    let path = module.tree_path.to_string();
    let section = match module.compression {
        ModuleCompression::None => match &module.content {
            // One open for the four reads (header, section table, names, .modinfo).
            Content::Host { path: host, len } => {
                use std::os::unix::fs::FileExt;
                let file = std::fs::File::open(host).map_err(|source| ModuleError::Io {
                    path: path.clone(),
                    source,
                })?;
                let len = *len;
                modinfo_section(&path, &mut |off, buf| {
                    let want = (buf.len() as u64).min(len.saturating_sub(off)) as usize;
                    let mut done = 0;
                    while done < want {
                        match file.read_at(&mut buf[done..want], off + done as u64)? {
                            0 => break,
                            n => done += n,
                        }
                    }
                    Ok(done)
                })?
            }
            content => modinfo_section(&path, &mut |off, buf| content.read_at(off, buf))?,
        },
        _ => {
            let plain = module.plain_content()?;
            modinfo_section(&path, &mut |off, buf| plain.read_at(off, buf))?
        }
    };
    Ok(parse_modinfo(&section))
}

/// Split a `.modinfo` section (NUL-separated `key=value` strings) into records.
pub fn parse_modinfo(section: &[u8]) -> Vec<(String, String)> {
    section
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let text = String::from_utf8_lossy(s);
            let (k, v) = text.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> io::Result<usize> + 'a;

fn read_exact_at(
    path: &str,
    read: &mut ReadAt<'_>,
    off: u64,
    len: u64,
) -> Result<Vec<u8>, ModuleError> {
    let mut buf = vec![0u8; len as usize];
    let n = read(off, &mut buf).map_err(|source| ModuleError::Io {
        path: path.to_string(),
        source,
    })?;
    if n != buf.len() {
        return Err(ModuleError::Malformed {
            path: path.to_string(),
            what: format!("truncated: wanted {len} bytes at offset {off}, file ends after {n}"),
        });
    }
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}
fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as u64
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Find and read the `.modinfo` section of a 64-bit little-endian ELF relocatable object.
fn modinfo_section(path: &str, read: &mut ReadAt<'_>) -> Result<Vec<u8>, ModuleError> {
    let bad = |what: String| ModuleError::Malformed {
        path: path.to_string(),
        what,
    };
    let ehdr = read_exact_at(path, read, 0, 64)?;
    if &ehdr[0..4] != b"\x7fELF" {
        return Err(bad("not an ELF file".into()));
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(bad(format!(
            "ELF class {} data {}: only 64-bit little-endian modules are supported",
            ehdr[4], ehdr[5]
        )));
    }
    let shoff = u64_at(&ehdr, 0x28);
    let shentsize = u16_at(&ehdr, 0x3A);
    let shnum = u16_at(&ehdr, 0x3C);
    let shstrndx = u16_at(&ehdr, 0x3E);
    // Entries are exactly an Elf64_Shdr, as the kernel's loader requires: a larger size would
    // let a header of 64 bytes ask for a section table of up to 4 GiB.
    if shentsize != 64 || shnum == 0 || shstrndx >= shnum {
        return Err(bad(format!(
            "bad section header table (entsize {shentsize}, count {shnum}, names {shstrndx})"
        )));
    }
    let table = read_exact_at(path, read, shoff, shentsize * shnum)?;
    let section = |i: u64| {
        let s = &table[(i * shentsize) as usize..];
        (u32_at(s, 0), u64_at(s, 24), u64_at(s, 32)) // name, offset, size
    };
    let (_, names_off, names_size) = section(shstrndx);
    if names_size > MAX_MODINFO {
        return Err(bad(format!("section name table of {names_size} bytes")));
    }
    let names = read_exact_at(path, read, names_off, names_size)?;
    for i in 0..shnum {
        let (name, off, size) = section(i);
        let name = names.get(name as usize..).unwrap_or_default();
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        if &name[..end] == b".modinfo" {
            if size > MAX_MODINFO {
                return Err(bad(format!(".modinfo section of {size} bytes")));
            }
            return read_exact_at(path, read, off, size);
        }
    }
    Err(bad("no .modinfo section".into()))
}

/// Parse `softdep=pre: a b post: c` into (pre, post).
fn parse_softdep(value: &str, pre: &mut Vec<String>, post: &mut Vec<String>) {
    let mut target: Option<&mut Vec<String>> = None;
    for word in value.split_whitespace() {
        match word {
            "pre:" => target = Some(&mut *pre),
            "post:" => target = Some(&mut *post),
            name => {
                if let Some(t) = target.as_deref_mut() {
                    t.push(canonical(name));
                }
            }
        }
    }
}

/// Fill a module's dependency fields from its `.modinfo` records.
pub fn apply_modinfo(module: &mut Module, records: &[(String, String)]) {
    for (key, value) in records {
        match key.as_str() {
            "name" if !value.is_empty() => module.name = canonical(value),
            "depends" => module
                .depends
                .extend(value.split(',').filter(|d| !d.is_empty()).map(canonical)),
            "softdep" => parse_softdep(value, &mut module.softdep_pre, &mut module.softdep_post),
            "alias" if !value.contains(['*', '?', '[']) => module.aliases.push(canonical(value)),
            _ => {}
        }
    }
}

/// Every module of one kernel, with its built-ins.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// Loadable modules by canonical name.
    pub modules: BTreeMap<String, Module>,
    /// Canonical alias → canonical module names providing it (sorted).
    pub aliases: BTreeMap<String, BTreeSet<String>>,
    /// Built-in modules (from `modules.builtin`), canonical.
    pub builtin: BTreeSet<String>,
    /// Built-in aliases (from `modules.builtin.modinfo`) → built-in module.
    pub builtin_aliases: BTreeMap<String, String>,
}

/// What a requested name turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved<'a> {
    Module(&'a Module),
    /// Compiled into the kernel: nothing to load. Holds the built-in module's name.
    Builtin(String),
}

impl ModuleIndex {
    /// Add a module and register its aliases.
    pub fn insert(&mut self, module: Module) {
        for alias in &module.aliases {
            self.aliases
                .entry(alias.clone())
                .or_default()
                .insert(module.name.clone());
        }
        self.modules.insert(module.name.clone(), module);
    }

    /// Read `modules.builtin` (one path per line, e.g. `kernel/fs/ext4/ext4.ko`).
    pub fn add_builtin_list(&mut self, text: &str) {
        for line in text.lines() {
            let file = line.trim().rsplit('/').next().unwrap_or_default();
            if let Some((stem, _)) = ModuleCompression::from_file_name(file) {
                self.builtin.insert(canonical(stem));
            }
        }
    }

    /// Read `modules.builtin.modinfo` (NUL-separated `module.key=value`): built-in aliases.
    pub fn add_builtin_modinfo(&mut self, bytes: &[u8]) {
        for (key, value) in parse_modinfo(bytes) {
            if let Some((module, field)) = key.split_once('.') {
                if field == "alias" && !value.contains(['*', '?', '[']) {
                    self.builtin_aliases
                        .entry(canonical(&value))
                        .or_insert_with(|| canonical(module));
                }
                self.builtin.insert(canonical(module));
            }
        }
    }

    /// Resolve a module name or alias. Module names win over built-ins, built-ins over aliases;
    /// an alias provided by several modules resolves to the first by name (e.g. `crc32c` →
    /// `crc32c_generic`, which runs on every CPU, before `crc32c_intel`).
    pub fn resolve(&self, name: &str) -> Option<Resolved<'_>> {
        let name = canonical(name);
        if let Some(m) = self.modules.get(&name) {
            return Some(Resolved::Module(m));
        }
        if self.builtin.contains(&name) {
            return Some(Resolved::Builtin(name));
        }
        if let Some(b) = self.builtin_aliases.get(&name) {
            return Some(Resolved::Builtin(b.clone()));
        }
        let provider = self.aliases.get(&name)?.iter().next()?;
        self.modules.get(provider).map(Resolved::Module)
    }

    /// Names of all loadable and built-in modules (for suggestions).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.modules
            .keys()
            .chain(self.builtin.iter())
            .map(String::as_str)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal 64-bit little-endian ELF with sections: null, `.shstrtab`, `.modinfo`.
    pub(crate) fn tiny_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let names_off = 64u64;
        let info_off = names_off + shstrtab.len() as u64;
        let sh_off = (info_off + modinfo.len() as u64).next_multiple_of(8);
        let mut f = vec![0u8; sh_off as usize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[0x28..0x30].copy_from_slice(&sh_off.to_le_bytes());
        f[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        f[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        f[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        f[64..64 + shstrtab.len()].copy_from_slice(shstrtab);
        f[info_off as usize..info_off as usize + modinfo.len()].copy_from_slice(modinfo);
        for (name, off, size) in [
            (0u32, 0u64, 0u64),
            (1, names_off, shstrtab.len() as u64),
            (11, info_off, modinfo.len() as u64),
        ] {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[24..32].copy_from_slice(&off.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&sh);
        }
        f
    }

    fn module(file: &str, bytes: Vec<u8>) -> Module {
        let (stem, compression) = ModuleCompression::from_file_name(file).unwrap();
        Module {
            name: canonical(stem),
            rel_path: format!("kernel/{file}"),
            tree_path: TreePath::new(&format!("lib/modules/v/kernel/{file}")).unwrap(),
            content: Content::inline(bytes),
            compression,
            depends: vec![],
            softdep_pre: vec![],
            softdep_post: vec![],
            aliases: vec![],
        }
    }

    const INFO: &[u8] = b"alias=fs-foo\0alias=pci:v*d*\0depends=bar-core,baz\0\
        softdep=pre: crc32c post: qux\0name=foo_fs\0vermagic=6.1\0\0\0";

    #[test]
    fn reads_modinfo_of_plain_and_zstd_modules() {
        let elf = tiny_elf(INFO);
        let zst = zstd::encode_all(&elf[..], 3).unwrap();
        for m in [
            module("foo-fs.ko", elf.clone()),
            module("foo-fs.ko.zst", zst),
        ] {
            let mut m = m;
            let records = read_modinfo(&m).unwrap();
            assert_eq!(records[2], ("depends".into(), "bar-core,baz".into()));
            apply_modinfo(&mut m, &records);
            assert_eq!(m.name, "foo_fs");
            assert_eq!(m.depends, ["bar_core", "baz"]);
            assert_eq!(m.softdep_pre, ["crc32c"]);
            assert_eq!(m.softdep_post, ["qux"]);
            assert_eq!(m.aliases, ["fs_foo"]);
            assert_eq!(m.plain_rel_path(), "kernel/foo-fs.ko");
            assert_eq!(
                crate::tree::read_content(&m.plain_content().unwrap()).unwrap(),
                elf
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "a.ko",
                b"not an elf at all, but long enough to hold a header.............".to_vec(),
                "not an ELF",
            ),
            ("b.ko", b"\x7fELF".to_vec(), "truncated"),
            (
                "c.ko",
                {
                    let mut e = tiny_elf(INFO);
                    e[4] = 1;
                    e
                },
                "only 64-bit little-endian",
            ),
            (
                "d.ko",
                tiny_elf(INFO)
                    .into_iter()
                    .map(|b| if b == b'.' { b'_' } else { b })
                    .collect(),
                "no .modinfo",
            ),
            (
                // Found by the kernel_module fuzzer: 65535 entries of 65535 bytes, one 3 GiB
                // allocation before any read.
                "f.ko",
                {
                    let mut e = tiny_elf(INFO);
                    e[0x3A..0x3E].copy_from_slice(&[0xff; 4]);
                    e
                },
                "bad section header table (entsize 65535",
            ),
            (
                "e.ko.xz",
                vec![0xfd, b'7', b'z'],
                "xz-compressed modules are not supported",
            ),
        ];
        for (file, bytes, want) in cases {
            let err = read_modinfo(&module(file, bytes)).unwrap_err().to_string();
            assert!(err.contains(want), "{file}: {err}");
        }
    }

    #[test]
    fn resolves_names_builtins_and_aliases() {
        let mut index = ModuleIndex::default();
        for (name, aliases) in [
            ("crc32c_intel", vec!["crc32c"]),
            ("crc32c_generic", vec!["crc32c"]),
        ] {
            let mut m = module(&format!("{name}.ko"), vec![]);
            m.aliases = aliases.into_iter().map(String::from).collect();
            index.insert(m);
        }
        index.add_builtin_list("kernel/fs/ext4/ext4.ko\nkernel/lib/crc-t10dif.ko\n");
        index
            .add_builtin_modinfo(b"ext4.alias=fs-ext4\0ext4.file=fs/ext4/ext4\0zlib.license=GPL\0");
        let name = |r: Option<Resolved<'_>>| match r {
            Some(Resolved::Module(m)) => format!("module {}", m.name),
            Some(Resolved::Builtin(b)) => format!("builtin {b}"),
            None => "none".into(),
        };
        assert_eq!(name(index.resolve("crc32c")), "module crc32c_generic");
        assert_eq!(name(index.resolve("crc32c-intel")), "module crc32c_intel");
        assert_eq!(name(index.resolve("ext4")), "builtin ext4");
        assert_eq!(name(index.resolve("fs-ext4")), "builtin ext4");
        assert_eq!(name(index.resolve("crc_t10dif")), "builtin crc_t10dif");
        assert_eq!(name(index.resolve("zlib")), "builtin zlib");
        assert_eq!(name(index.resolve("nope")), "none");
    }
}
