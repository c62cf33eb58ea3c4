//! `.deb` files read straight into a [`Tree`]: the `ar` container (parsed here), its
//! `control.tar.*` (fields and maintainer scripts) and `data.tar.*` (files, owners and modes from
//! the archive, contents streamed into the [`BlobStore`]). Decompression: xz, zstd, gzip, lzma
//! or none.
//!
//! A package is untrusted input: what its archives decompress to is counted as it comes out of
//! the decompressor (not taken from tar headers) and bounded by [`DebLimits`], derived from the
//! `Installed-Size` the signed index declares. A decompression bomb stops at the limit with
//! [`DebError::TooLarge`]; nothing of the package reaches the caller's tree.

use crate::bounded::LimitReader;
use crate::home::BlobStore;
use crate::readahead::read_ahead;
use crate::tree::{EntryKind, Tree, TreeError, TreePath};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Why a .deb could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("{path}: not a Debian package: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: reading {member}")]
    Io {
        path: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{package} ({path}): {member} unpacks to more than {limit} bytes ({basis}); refusing it as \
         corrupt or hostile (a decompression bomb), nothing of it was kept. Fetch it again from a \
         trusted mirror, and report the package if the mirror is right"
    )]
    TooLarge {
        package: String,
        path: PathBuf,
        member: String,
        limit: u64,
        basis: String,
    },
    #[error("{path}: data.tar")]
    Tree {
        path: PathBuf,
        #[source]
        source: TreeError,
    },
}

/// One member header of an `ar` archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArMember {
    pub name: String,
    pub size: u64,
    pub mode: u32,
}

/// The `ar` global header.
pub const AR_MAGIC: &[u8; 8] = b"!<arch>\n";

/// Parse a 60-byte `ar` member header (System V / GNU names: trailing `/` and spaces dropped).
pub fn parse_ar_header(header: &[u8; 60]) -> Result<ArMember, String> {
    if &header[58..60] != b"`\n" {
        return Err("bad ar member header (missing terminator)".into());
    }
    let field = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&header[range])
            .map(|s| s.trim_end_matches(' '))
            .map_err(|_| "non-ASCII ar header".to_string())
    };
    let name = field(0..16)?;
    let name = name.strip_suffix('/').unwrap_or(name).to_string();
    if name.is_empty() {
        return Err("empty ar member name".into());
    }
    let size = field(48..58)?
        .parse()
        .map_err(|_| format!("ar member {name}: bad size"))?;
    let mode_text = field(40..48)?;
    let mode = if mode_text.is_empty() {
        0o644
    } else {
        u32::from_str_radix(mode_text, 8).map_err(|_| format!("ar member {name}: bad mode"))?
    };
    Ok(ArMember { name, size, mode })
}

/// Reads `ar` members in order from a stream.
pub struct ArReader<R> {
    inner: R,
    /// Bytes of the current member (plus its padding) not yet consumed.
    pending: u64,
}

impl<R: Read> ArReader<R> {
    /// Check the global header.
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut magic = [0u8; 8];
        inner.read_exact(&mut magic)?;
        if &magic != AR_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no `!<arch>` header",
            ));
        }
        Ok(ArReader { inner, pending: 0 })
    }

    /// The next member header, or `None` at the end of the archive. Any unread data of the
    /// previous member is skipped.
    pub fn next_member(&mut self) -> io::Result<Option<ArMember>> {
        io::copy(&mut (&mut self.inner).take(self.pending), &mut io::sink())?;
        self.pending = 0;
        let mut header = [0u8; 60];
        let mut got = 0;
        while got < 60 {
            match self.inner.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "truncated ar member header",
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let member =
            parse_ar_header(&header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.pending = member.size + (member.size & 1);
        Ok(Some(member))
    }

    /// A reader over the current member's data.
    pub fn data(&mut self, member: &ArMember) -> MemberReader<'_, R> {
        MemberReader {
            ar: self,
            left: member.size,
        }
    }
}

/// The data of one `ar` member.
pub struct MemberReader<'a, R> {
    ar: &'a mut ArReader<R>,
    left: u64,
}

impl<R: Read> Read for MemberReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.ar.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ar member is truncated",
            ));
        }
        self.left -= n as u64;
        self.ar.pending -= n as u64;
        Ok(n)
    }
}

/// An `.xz` reader that decodes the blocks of a stream on up to four threads (dpkg-deb and
/// Debian's archive write multi-block streams: a kernel package's data is 5 blocks) and, as
/// `xz -d` does, reads concatenated streams and the zero padding between them.
struct XzStreams<R: BufRead> {
    decoder: Option<liblzma::bufread::XzDecoder<R>>,
}

impl<R: BufRead> XzStreams<R> {
    fn new(inner: R) -> io::Result<Self> {
        Ok(XzStreams {
            decoder: Some(liblzma::bufread::XzDecoder::new_stream(
                inner,
                Self::stream()?,
            )),
        })
    }

    fn stream() -> io::Result<liblzma::stream::Stream> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        liblzma::stream::MtStreamBuilder::new()
            .threads(threads as u32)
            // Above this the decoder falls back to one thread; there is no hard stop (the
            // callers bound what comes out).
            .memlimit_threading(256 << 20)
            .memlimit_stop(u64::MAX)
            .decoder()
            .map_err(|e| io::Error::other(format!("xz decoder: {e}")))
    }
}

impl<R: BufRead> Read for XzStreams<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The end of a stream: padding and another stream may follow.
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let mut inner = decoder.into_inner();
            loop {
                let available = inner.fill_buf()?;
                if available.is_empty() {
                    return Ok(0);
                }
                let zeros = available.iter().take_while(|b| **b == 0).count();
                if zeros == 0 {
                    break;
                }
                inner.consume(zeros);
            }
            self.decoder = Some(liblzma::bufread::XzDecoder::new_stream(
                inner,
                Self::stream()?,
            ));
        }
    }
}

/// A decompressing reader chosen by the member name's suffix (`data.tar.xz`, …).
pub fn decompressor<'a>(name: &str, inner: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let ext = name.rsplit_once(".tar").map(|(_, e)| e).unwrap_or("?");
    Ok(match ext {
        "" => Box::new(inner),
        ".xz" => Box::new(XzStreams::new(BufReader::with_capacity(1 << 16, inner))?),
        ".lzma" => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| io::Error::other(format!("lzma decoder: {e}")))?;
            Box::new(liblzma::read::XzDecoder::new_stream(inner, stream))
        }
        ".zst" => Box::new(zstd::stream::read::Decoder::new(inner)?),
        ".gz" => Box::new(flate2::read::GzDecoder::new(inner)),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("member {name}: unsupported compression {other:?}"),
            ));
        }
    })
}

/// What a .deb says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebInfo {
    /// Fields of `control` (Package, Version, Depends, …), in file order.
    pub control: Vec<(String, String)>,
    /// Other control members by name: maintainer scripts (`preinst`, `postinst`, `prerm`,
    /// `postrm`, `config`), `conffiles`, `triggers`, `shlibs`, `md5sums`, … (bytes as shipped).
    pub control_files: BTreeMap<String, Vec<u8>>,
    /// Paths (`/`-separated, no leading `/`) of the data entries in archive order: what dpkg
    /// would record in `/var/lib/dpkg/info/<package>.list`.
    pub files: Vec<String>,
}

impl DebInfo {
    /// A control field by name (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.control
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Control members larger than this are refused (they are tiny text files in real packages).
const MAX_CONTROL_MEMBER: u64 = 64 << 20;

/// Most bytes a `control.tar` may decompress to. Real ones hold maintainer scripts and
/// `md5sums`: a few KiB, 130 KiB for a kernel image with its 1,400 files.
pub const MAX_CONTROL_TAR: u64 = 16 << 20;

/// Most bytes a `data.tar` may decompress to when no `Installed-Size` was declared for the
/// package (a .deb read without its index entry, an old stage record).
pub const MAX_UNDECLARED_DATA: u64 = 4 << 30;

/// Most bytes a `data.tar` may decompress to whatever its package declares (the largest Debian
/// packages install a few GiB).
pub const MAX_DATA: u64 = 64 << 30;

/// How far `data.tar` may exceed the declared `Installed-Size`: twice the declared bytes (tar
/// adds a 512-byte header and padding to each entry, twice that with long names, while
/// `Installed-Size` counts a small file as 1 KiB) plus [`DECLARED_SLACK`] (a rounded or
/// hand-written size of a small package).
const DECLARED_FACTOR: u64 = 2;
/// See [`DECLARED_FACTOR`].
const DECLARED_SLACK: u64 = 16 << 20;

/// What reading one .deb may produce: the decompressed bytes of its `control.tar` and
/// `data.tar` (entries and path lengths are bounded by [`Tree::extend_from_tar`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebLimits {
    /// How messages name the package (`package hello 2.10-3`); empty: by the file's path.
    pub package: String,
    /// `Installed-Size` as declared (KiB), if it was.
    pub installed_kib: Option<u64>,
    pub control_bytes: u64,
    pub data_bytes: u64,
}

impl DebLimits {
    /// Limits for a package whose index entry declares `installed_kib` (or nothing).
    pub fn for_package(package: impl Into<String>, installed_kib: Option<u64>) -> DebLimits {
        let data_bytes = match installed_kib {
            Some(kib) => kib
                .saturating_mul(1024)
                .saturating_mul(DECLARED_FACTOR)
                .saturating_add(DECLARED_SLACK)
                .min(MAX_DATA),
            None => MAX_UNDECLARED_DATA,
        };
        DebLimits {
            package: package.into(),
            installed_kib,
            control_bytes: MAX_CONTROL_TAR,
            data_bytes,
        }
    }

    /// Limits for a .deb nothing is known about: the hard caps.
    pub fn undeclared() -> DebLimits {
        Self::for_package(String::new(), None)
    }

    /// Why the data limit is what it is, for messages.
    fn data_basis(&self) -> String {
        match self.installed_kib {
            Some(kib) if self.data_bytes < MAX_DATA => format!(
                "the index declares Installed-Size {kib} KiB; allowed: {DECLARED_FACTOR}x that \
                 plus {} MiB",
                DECLARED_SLACK >> 20
            ),
            Some(kib) => format!(
                "the index declares Installed-Size {kib} KiB, above kiln's ceiling of {} GiB",
                MAX_DATA >> 30
            ),
            None => format!(
                "no Installed-Size declared; kiln's cap for undeclared packages is {} GiB",
                MAX_UNDECLARED_DATA >> 30
            ),
        }
    }
}

/// Read a .deb into `tree`, streaming file contents into `store`, within `limits` (from
/// [`PackageRef::deb_limits`](super::PackageRef::deb_limits)); returns its control data.
pub fn read_into_tree(
    path: &Path,
    limits: &DebLimits,
    tree: &mut Tree,
    store: &BlobStore,
) -> Result<DebInfo, DebError> {
    let file = File::open(path).map_err(|source| DebError::Io {
        path: path.to_path_buf(),
        member: "the file".into(),
        source,
    })?;
    read_deb(
        path,
        BufReader::with_capacity(1 << 20, file),
        limits,
        tree,
        store,
    )
}

/// [`read_into_tree`] from any stream; `path` is only used in messages.
pub fn read_deb(
    path: &Path,
    reader: impl Read + Send,
    limits: &DebLimits,
    tree: &mut Tree,
    store: &BlobStore,
) -> Result<DebInfo, DebError> {
    let too_large = |member: &str, limit: u64, basis: String| DebError::TooLarge {
        package: if limits.package.is_empty() {
            "package".to_string()
        } else {
            limits.package.clone()
        },
        path: path.to_path_buf(),
        member: member.to_string(),
        limit,
        basis,
    };
    let format = |reason: String| DebError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |member: &str| {
        let member = member.to_string();
        move |source| DebError::Io {
            path: path.to_path_buf(),
            member,
            source,
        }
    };
    let mut ar = ArReader::new(reader).map_err(|e| format(e.to_string()))?;
    let first = ar
        .next_member()
        .map_err(|e| format(e.to_string()))?
        .ok_or_else(|| format("empty ar archive".into()))?;
    if first.name != "debian-binary" {
        return Err(format(format!(
            "first member is {:?}, expected debian-binary",
            first.name
        )));
    }
    let mut version = String::new();
    ar.data(&first)
        .take(64)
        .read_to_string(&mut version)
        .map_err(io_err("debian-binary"))?;
    if !version.starts_with("2.") {
        return Err(format(format!(
            "format version {:?} (only 2.x is known)",
            version.trim()
        )));
    }
    let mut info = DebInfo::default();
    let mut saw_control = false;
    let mut saw_data = false;
    // The package's own tree first, so a broken archive leaves `tree` untouched.
    let mut pkg_tree = Tree::new();
    while let Some(member) = ar.next_member().map_err(|e| format(e.to_string()))? {
        if member.name.starts_with("control.tar") {
            let data = ar.data(&member);
            let tar = decompressor(&member.name, data).map_err(io_err(&member.name))?;
            let mut tar = LimitReader::new(tar, limits.control_bytes);
            let read = read_control(&mut tar, &mut info);
            if tar.exceeded() {
                let basis = format!(
                    "kiln's cap for control data is {} MiB",
                    limits.control_bytes >> 20
                );
                return Err(too_large(&member.name, limits.control_bytes, basis));
            }
            read.map_err(io_err(&member.name))?;
            saw_control = true;
        } else if member.name.starts_with("data.tar") {
            let data = ar.data(&member);
            let name = member.name.clone();
            // Decompression on a second thread while this one hashes and stores the files.
            let (read, exceeded) = read_ahead(
                move || decompressor(&name, data),
                |tar| {
                    let mut tar = LimitReader::new(tar, limits.data_bytes);
                    // Thousands of files (a kernel's modules): one sync for all of them below,
                    // not one per file.
                    let read = pkg_tree.extend_from_tar(&mut tar, &mut |r: &mut dyn Read, _len| {
                        let (digest, len) = store.put_unsynced(r)?;
                        Ok(crate::tree::Content::Host {
                            path: store.path(&digest),
                            len,
                        })
                    });
                    (read, tar.exceeded())
                },
            );
            if exceeded {
                return Err(too_large(
                    &member.name,
                    limits.data_bytes,
                    limits.data_basis(),
                ));
            }
            read.map_err(|source| DebError::Tree {
                path: path.to_path_buf(),
                source,
            })?;
            store.sync().map_err(io_err(&member.name))?;
            saw_data = true;
        } else if member.name.starts_with('_') {
            // Reserved for extensions; dpkg ignores them too.
        } else {
            return Err(format(format!("unexpected member {:?}", member.name)));
        }
    }
    if !saw_control || !saw_data {
        return Err(format(
            "missing control.tar or data.tar member (truncated download?)".into(),
        ));
    }
    info.files = merge(tree, &pkg_tree).map_err(|source| DebError::Tree {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(info)
}

/// Add a package's entries to `tree` the way dpkg unpacks onto a filesystem: a directory that
/// the tree already has as a symlink to a directory (merged `/usr`: `bin -> usr/bin`) is kept and
/// entries go through it; a directory already present keeps its children and takes the package's
/// metadata. Returns the package's paths (as named in the package), in path order.
pub fn merge(tree: &mut Tree, pkg: &Tree) -> Result<Vec<String>, TreeError> {
    let mut files = Vec::new();
    for (path, entry) in pkg.iter() {
        if path.is_root() {
            continue;
        }
        files.push(path.as_str().to_string());
        let dest = redirect(tree, path)?;
        let mut entry = entry.clone();
        if let EntryKind::HardLink { target } = &entry.kind {
            entry.kind = EntryKind::HardLink {
                target: redirect(tree, target)?,
            };
        }
        match (tree.get(&dest).map(|e| &e.kind), &entry.kind) {
            (Some(EntryKind::Symlink { .. }), EntryKind::Dir)
                if resolve_dir(tree, &dest).is_some() =>
            {
                continue;
            }
            (Some(EntryKind::Dir), EntryKind::Dir) => {
                if let Some(old) = tree.get_mut(&dest) {
                    *old = entry;
                }
                continue;
            }
            _ => {}
        }
        tree.insert(dest, entry)?;
    }
    Ok(files)
}

/// `path` with its parent directories resolved through symlinks in `tree`.
fn redirect(tree: &Tree, path: &TreePath) -> Result<TreePath, TreeError> {
    let Some(parent) = path.parent() else {
        return Ok(path.clone());
    };
    match resolve_dir(tree, &parent) {
        Some(dir) if dir != parent => dir.join(path.file_name()),
        _ => Ok(path.clone()),
    }
}

/// Resolve every component of `path` through symlinks in `tree`; `Some` only if the result is a
/// directory of the tree.
fn resolve_dir(tree: &Tree, path: &TreePath) -> Option<TreePath> {
    let mut cur = TreePath::root();
    let mut hops = 0;
    let mut pending: Vec<String> = path.as_str().split('/').rev().map(str::to_string).collect();
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "." | "" => continue,
            ".." => {
                cur = cur.parent().unwrap_or_else(TreePath::root);
                continue;
            }
            _ => {}
        }
        let next = cur.join(&comp).ok()?;
        match tree.get(&next).map(|e| &e.kind) {
            Some(EntryKind::Dir) => cur = next,
            Some(EntryKind::Symlink { target }) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.starts_with('/') {
                    cur = TreePath::root();
                }
                pending.extend(target.split('/').rev().map(str::to_string));
            }
            _ => return None,
        }
    }
    Some(cur)
}

/// Collect `control` fields and the other small control members.
fn read_control(reader: impl Read, info: &mut DebInfo) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    for item in archive.entries()? {
        let mut item = item?;
        if item.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = item.path()?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").to_string();
        if item.size() > MAX_CONTROL_MEMBER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control member {name} is {} bytes", item.size()),
            ));
        }
        let mut bytes = Vec::with_capacity(item.size() as usize);
        item.read_to_end(&mut bytes)?;
        if name == "control" {
            let text = String::from_utf8_lossy(&bytes);
            let stanzas = super::index::parse_stanzas(&text)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("control: {e}")))?;
            info.control = stanzas.into_iter().next().unwrap_or_default().fields;
        } else {
            info.control_files.insert(name, bytes);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Content, Entry};

    /// `data` as one .xz stream of blocks of `block` bytes.
    fn xz(data: &[u8], block: u64) -> Vec<u8> {
        use std::io::Write;
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(2)
            .block_size(block)
            .preset(1)
            .encoder()
            .unwrap();
        let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn xz_reads_multi_block_and_concatenated_streams_with_padding() {
        let one: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let two = b"the second stream".to_vec();
        let mut packed = xz(&one, 1 << 20);
        packed.extend_from_slice(&[0; 8]);
        packed.extend(xz(&two, 0));
        let mut out = Vec::new();
        decompressor("data.tar.xz", &packed[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), one.len() + two.len());
        assert!(out[..one.len()] == one[..] && out[one.len()..] == two[..]);
        // A broken stream is an error, not a short read.
        packed[100] ^= 0xff;
        let mut out = Vec::new();
        let res = decompressor("data.tar.xz", &packed[..])
            .unwrap()
            .read_to_end(&mut out);
        assert!(res.is_err(), "read {} bytes", out.len());
        // So is trailing data that is not a stream.
        let mut tail = xz(&two, 0);
        tail.extend_from_slice(b"junk");
        let res = decompressor("data.tar.xz", &tail[..])
            .unwrap()
            .read_to_end(&mut Vec::new());
        assert!(res.is_err());
    }

    fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = AR_MAGIC.to_vec();
        for (name, data) in members {
            out.extend(
                format!(
                    "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                    name,
                    0,
                    0,
                    0,
                    "100644",
                    data.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    fn tar(files: &[(&str, &[u8], u32, u64)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        builder.append_data(&mut dir, "./", &[][..]).unwrap();
        for (name, data, mode, uid) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_size(data.len() as u64);
            builder.append_data(&mut h, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn tar_gz(files: &[(&str, &[u8], u32, u64)]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar(files)).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn reads_xz_and_zstd_members() {
        use std::io::Write;
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&tar(&[(
            "./control",
            b"Package: z\nVersion: 2\n",
            0o644,
            0,
        )]))
        .unwrap();
        let control = xz.finish().unwrap();
        let data = zstd::encode_all(&tar(&[("./etc/z.conf", b"zzz", 0o640, 0)])[..], 3).unwrap();
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", &control),
            ("data.tar.zst", &data),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let mut tree = Tree::new();
        let info = read_deb(
            Path::new("z.deb"),
            &deb[..],
            &DebLimits::undeclared(),
            &mut tree,
            &store,
        )
        .unwrap();
        assert_eq!(info.field("Version"), Some("2"));
        let e = tree.get(&TreePath::new("etc/z.conf").unwrap()).unwrap();
        assert_eq!(e.mode, 0o640);
        let EntryKind::File(content) = &e.kind else {
            panic!("not a file")
        };
        assert_eq!(crate::tree::read_content(content).unwrap(), b"zzz");
        // Uncompressed members work too.
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            (
                "control.tar",
                &tar(&[("./control", b"Package: u\n", 0o644, 0)]),
            ),
            ("data.tar", &tar(&[("./u", b"u", 0o644, 0)])),
        ]);
        let mut tree = Tree::new();
        read_deb(
            Path::new("u.deb"),
            &deb[..],
            &DebLimits::undeclared(),
            &mut tree,
            &store,
        )
        .unwrap();
        assert!(tree.get(&TreePath::new("u").unwrap()).is_some());
    }

    #[test]
    fn reads_a_small_deb() {
        let control = tar_gz(&[
            (
                "./control",
                b"Package: hello\nVersion: 1.0\nDepends: libc6\n",
                0o644,
                0,
            ),
            ("./postinst", b"#!/bin/sh\nexit 0\n", 0o755, 0),
        ]);
        let data = tar_gz(&[
            ("./usr/bin/hello", b"ELF!", 0o755, 0),
            ("./home/user/x", b"abc", 0o600, 1000),
        ]);
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &control),
            ("data.tar.gz", &data),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let mut tree = Tree::new();
        let info = read_deb(
            Path::new("hello.deb"),
            &deb[..],
            &DebLimits::undeclared(),
            &mut tree,
            &store,
        )
        .unwrap();
        assert_eq!(info.field("package"), Some("hello"));
        assert_eq!(info.field("Depends"), Some("libc6"));
        assert_eq!(info.control_files["postinst"], b"#!/bin/sh\nexit 0\n");
        assert!(
            info.files.contains(&"usr/bin/hello".to_string()),
            "{:?}",
            info.files
        );
        let e = tree.get(&TreePath::new("usr/bin/hello").unwrap()).unwrap();
        assert_eq!((e.mode, e.uid), (0o755, 0));
        let EntryKind::File(content) = &e.kind else {
            panic!("not a file")
        };
        assert_eq!(crate::tree::read_content(content).unwrap(), b"ELF!");
        let e = tree.get(&TreePath::new("home/user/x").unwrap()).unwrap();
        assert_eq!((e.mode, e.uid, e.gid), (0o600, 1000, 1000));
    }

    #[test]
    fn refuses_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let mut tree = Tree::new();
        let p = Path::new("x.deb");
        let none = DebLimits::undeclared();
        let err = read_deb(p, &b"hello"[..], &none, &mut tree, &store).unwrap_err();
        assert!(err.to_string().contains("not a Debian package"), "{err}");
        let deb = ar(&[("debian-binary", b"3.0\n")]);
        assert!(read_deb(p, &deb[..], &none, &mut tree, &store).is_err());
        let deb = ar(&[("debian-binary", b"2.0\n")]);
        let err = read_deb(p, &deb[..], &none, &mut tree, &store).unwrap_err();
        assert!(err.to_string().contains("missing control.tar"), "{err}");
        let data = tar_gz(&[("./a", b"x", 0o644, 0)]);
        let mut deb = ar(&[
            ("debian-binary", b"2.0\n"),
            (
                "control.tar.gz",
                &tar_gz(&[("./control", b"Package: a\n", 0o644, 0)]),
            ),
            ("data.tar.bz2", &data),
        ]);
        assert!(read_deb(p, &deb[..], &none, &mut tree, &store).is_err());
        deb.truncate(deb.len() - 10);
        assert!(read_deb(p, &deb[..], &none, &mut tree, &store).is_err());
        // A failed read leaves the tree as it was.
        assert_eq!(tree, Tree::new());
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        use std::io::Write;
        let zeros_gz = |name: &str, len: usize| {
            let mut builder = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(len as u64);
            builder
                .append_data(&mut h, name, io::repeat(0).take(len as u64))
                .unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(&builder.into_inner().unwrap()).unwrap();
            gz.finish().unwrap()
        };
        let control = tar_gz(&[("./control", b"Package: z\n", 0o644, 0)]);
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let p = Path::new("z.deb");

        // data.tar: 8 MiB of zeros, declared 4 KiB, limit lowered to 1 MiB for a fast test.
        let data = zeros_gz("./big", 8 << 20);
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &control),
            ("data.tar.gz", &data),
        ]);
        let mut limits = DebLimits::for_package("package z 1", Some(4));
        assert_eq!(limits.data_bytes, 2 * 4096 + (16 << 20));
        limits.data_bytes = 1 << 20;
        let mut tree = Tree::new();
        let err = read_deb(p, &deb[..], &limits, &mut tree, &store).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DebError::TooLarge { .. }), "{msg}");
        for want in [
            "package z 1",
            "data.tar.gz",
            "1048576 bytes",
            "Installed-Size 4 KiB",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert_eq!(tree, Tree::new());
        // The same package within its limit reads fine.
        limits.data_bytes = 9 << 20;
        read_deb(p, &deb[..], &limits, &mut tree, &store).unwrap();

        // control.tar: a 2 MiB member of zeros against a 1 MiB control limit.
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &zeros_gz("./md5sums", 2 << 20)),
            ("data.tar.gz", &tar_gz(&[("./a", b"a", 0o644, 0)])),
        ]);
        let mut limits = DebLimits::undeclared();
        limits.control_bytes = 1 << 20;
        let mut tree = Tree::new();
        let err = read_deb(p, &deb[..], &limits, &mut tree, &store).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DebError::TooLarge { .. }), "{msg}");
        assert!(msg.contains("control.tar.gz"), "{msg}");
        assert_eq!(tree, Tree::new());
    }

    #[test]
    fn limits_follow_the_declared_size() {
        // (declared KiB, data limit)
        for (declared, want) in [
            (None, MAX_UNDECLARED_DATA),
            (Some(0), DECLARED_SLACK),
            (Some(10), 20 * 1024 + DECLARED_SLACK),
            (Some(1 << 20), (2 << 30) + DECLARED_SLACK),
            (Some(u64::MAX), MAX_DATA),
        ] {
            assert_eq!(
                DebLimits::for_package("p", declared).data_bytes,
                want,
                "{declared:?}"
            );
        }
    }

    #[test]
    fn ar_headers() {
        let mut h = [b' '; 60];
        h[..14].copy_from_slice(b"debian-binary/");
        h[40..46].copy_from_slice(b"100644");
        h[48..49].copy_from_slice(b"4");
        h[58..60].copy_from_slice(b"`\n");
        let m = parse_ar_header(&h).unwrap();
        assert_eq!(
            (m.name.as_str(), m.size, m.mode),
            ("debian-binary", 4, 0o100644)
        );
        h[59] = b'x';
        assert!(parse_ar_header(&h).is_err());
    }

    #[test]
    fn merge_goes_through_directory_symlinks() {
        let mut tree = Tree::new();
        tree.add("usr/bin", Entry::dir(0o755)).unwrap();
        tree.add("bin", Entry::symlink("usr/bin")).unwrap();
        tree.add("usr/bin/old", Entry::file(Content::inline("o"), 0o755))
            .unwrap();
        let mut pkg = Tree::new();
        pkg.add("bin", Entry::dir(0o755)).unwrap();
        pkg.add("bin/sh", Entry::file(Content::inline("sh"), 0o755))
            .unwrap();
        pkg.add("usr/bin", Entry::dir(0o700)).unwrap();
        let files = merge(&mut tree, &pkg).unwrap();
        assert_eq!(files, ["bin", "bin/sh", "usr", "usr/bin"]);
        let get = |p: &str| tree.get(&TreePath::new(p).unwrap()).cloned();
        assert!(matches!(
            get("bin").unwrap().kind,
            EntryKind::Symlink { .. }
        ));
        assert!(get("usr/bin/sh").is_some());
        assert!(get("usr/bin/old").is_some(), "existing children stay");
        assert_eq!(get("usr/bin").unwrap().mode, 0o700);
    }
}
