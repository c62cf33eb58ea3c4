//! cpio "newc" (SVR4, no CRC) archive writer, the format the Linux kernel unpacks as an
//! initramfs. Written for reproducibility: entries in the Tree's path order, inode numbers
//! assigned in that order, every mtime set to one epoch, hard links flattened into copies, file
//! contents streamed from their [`Content`].

use std::collections::BTreeMap;
use std::io::{self, Write};

use thiserror::Error;

use crate::tree::{Content, Entry, EntryKind, Tree, TreePath};

/// newc stores sizes and numbers as 8 hex digits.
const MAX_FIELD: u64 = u32::MAX as u64;

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("cpio: writing /{path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cpio: /{path} is {len} bytes; the newc format holds at most 4 GiB - 1 per file \
         (keep large files out of the initramfs)"
    )]
    TooLarge { path: String, len: u64 },
    #[error("cpio: /{path}: {what}")]
    Invalid { path: String, what: String },
}

/// One archive member, as given to [`CpioWriter::append`].
#[derive(Debug, Clone)]
pub struct Member<'a> {
    /// Path inside the archive, without a leading `/`.
    pub path: &'a str,
    /// `S_IFMT | permission bits`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Device numbers for character and block devices.
    pub rdev: (u32, u32),
    pub data: MemberData<'a>,
}

/// What follows a member's header.
#[derive(Debug, Clone)]
pub enum MemberData<'a> {
    None,
    Bytes(&'a [u8]),
    Content(&'a Content),
}

/// Streams newc members to `out`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: io::BufWriter<W>,
    mtime: u32,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer that stamps every member with `mtime` (seconds since 1970, clamped to the
    /// format's range).
    pub fn new(out: W, mtime: i64) -> Self {
        CpioWriter {
            out: io::BufWriter::with_capacity(1 << 20, out),
            mtime: mtime.clamp(0, MAX_FIELD as i64) as u32,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Append one member; its inode number is the next in sequence.
    pub fn append(&mut self, member: &Member<'_>) -> Result<(), CpioError> {
        let io_err = |source| CpioError::Io {
            path: member.path.to_string(),
            source,
        };
        if member.path.is_empty() || member.path.as_bytes().contains(&0) {
            return Err(CpioError::Invalid {
                path: member.path.to_string(),
                what: "empty name or NUL in name".into(),
            });
        }
        let size = match &member.data {
            MemberData::None => 0,
            MemberData::Bytes(b) => b.len() as u64,
            MemberData::Content(c) => c.len(),
        };
        if size > MAX_FIELD {
            return Err(CpioError::TooLarge {
                path: member.path.to_string(),
                len: size,
            });
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(
            ino,
            member.mode,
            member.uid,
            member.gid,
            member.nlink,
            self.mtime,
            size as u32,
            member.rdev,
            member.path,
        )
        .map_err(io_err)?;
        match &member.data {
            MemberData::None => {}
            MemberData::Bytes(b) => self.raw(b).map_err(io_err)?,
            MemberData::Content(c) => {
                let copied =
                    io::copy(&mut c.open().map_err(io_err)?, &mut self.out).map_err(io_err)?;
                if copied != size {
                    return Err(CpioError::Invalid {
                        path: member.path.to_string(),
                        what: format!("content gave {copied} bytes, expected {size}"),
                    });
                }
                self.written += copied;
            }
        }
        self.pad().map_err(io_err)
    }

    /// Write the `TRAILER!!!` member, flush, and return the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let io_err = |source| CpioError::Io {
            path: "TRAILER!!!".into(),
            source,
        };
        self.header(0, 0, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!")
            .map_err(io_err)?;
        self.out.flush().map_err(io_err)?;
        self.out.into_inner().map_err(|e| io_err(e.into_error()))
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        size: u32,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut head = String::with_capacity(110 + name.len() + 4);
        head.push_str("070701");
        for f in fields {
            head.push_str(&format!("{f:08X}"));
        }
        head.push_str(name);
        head.push('\0');
        self.raw(head.as_bytes())?;
        self.pad()
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.raw(&[0u8; 3][..n])
    }
}

/// Write every entry of `tree` except the root, in path order, with every mtime set to `epoch`.
/// Hard links become copies of their target (same content and metadata, own inode).
pub fn write_tree<W: Write>(tree: &Tree, out: W, epoch: i64) -> Result<W, CpioError> {
    // A directory's link count: itself, its `.`, and each subdirectory's `..`.
    let mut subdirs: BTreeMap<TreePath, u32> = BTreeMap::new();
    for (path, entry) in tree.iter() {
        if matches!(entry.kind, EntryKind::Dir)
            && let Some(parent) = path.parent()
        {
            *subdirs.entry(parent).or_insert(0) += 1;
        }
    }
    let mut writer = CpioWriter::new(out, epoch);
    for (path, entry) in tree.iter() {
        if path.is_root() {
            continue;
        }
        let invalid = |what: String| CpioError::Invalid {
            path: path.to_string(),
            what,
        };
        let owner: &Entry = match &entry.kind {
            EntryKind::HardLink { .. } => {
                let target = tree
                    .resolve_link(path)
                    .map_err(|e| invalid(e.to_string()))?;
                tree.get(target)
                    .ok_or_else(|| invalid(format!("hard link target /{target} missing")))?
            }
            _ => entry,
        };
        let (nlink, rdev, data) = match &owner.kind {
            EntryKind::File(content) => (1, (0, 0), MemberData::Content(content)),
            EntryKind::Dir => (
                2 + subdirs.get(path).copied().unwrap_or(0),
                (0, 0),
                MemberData::None,
            ),
            EntryKind::Symlink { target } => (1, (0, 0), MemberData::Bytes(target.as_bytes())),
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                (1, (*major, *minor), MemberData::None)
            }
            EntryKind::Fifo | EntryKind::Socket => (1, (0, 0), MemberData::None),
            EntryKind::HardLink { target } => {
                return Err(invalid(format!("hard link to hard link /{target}")));
            }
        };
        writer.append(&Member {
            path: path.as_str(),
            mode: owner.full_mode(),
            uid: owner.uid,
            gid: owner.gid,
            nlink,
            rdev,
            data,
        })?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_exact() {
        let mut t = Tree::new();
        t.add("a", Entry::file(Content::inline(b"hi".to_vec()), 0o644))
            .unwrap();
        let out = write_tree(&t, Vec::new(), 0x1234).unwrap();
        let first = "070701\
            00000001000081A4000000000000000000000001\
            00001234000000020000000000000000\
            00000000000000000000000200000000";
        assert_eq!(&out[..110], first.as_bytes());
        // name "a\0" ends at 112, already aligned; then "hi" padded to 116.
        assert_eq!(&out[110..116], b"a\0hi\0\0");
        let trailer = &out[116..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(trailer.len(), 124);
    }

    #[test]
    fn refuses_files_over_4_gib() {
        let mut t = Tree::new();
        t.add("huge", Entry::file(Content::Zeros { len: 1 << 32 }, 0o644))
            .unwrap();
        let err = write_tree(&t, io::sink(), 0).unwrap_err().to_string();
        assert!(err.contains("/huge is 4294967296 bytes"), "{err}");
    }
}
