//! Disks: the byte sink that filesystem builders write into, and (in submodules) the GPT, FAT32,
//! ext4 and qcow2 writers and the layout that ties them together.

use std::io;

/// A random-access byte sink: a raw image file, a qcow2 writer, or a partition window of either.
/// Bytes never written read back as zeros, so writers leave zero regions unwritten.
pub trait WriteAt {
    /// Write all of `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
}

impl WriteAt for std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
}

/// In-memory sink (tests, small images).
impl WriteAt for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset as usize + data.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// A window `[start, start + len)` of another sink: a partition. Writes past its end are an error,
/// so a filesystem builder can never spill into its neighbour.
pub struct Region<'a> {
    inner: &'a mut dyn WriteAt,
    start: u64,
    len: u64,
}

impl<'a> Region<'a> {
    pub fn new(inner: &'a mut dyn WriteAt, start: u64, len: u64) -> Self {
        Region { inner, start, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl WriteAt for Region<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "write of {} bytes at {offset} goes past the end of a {}-byte region",
                        data.len(),
                        self.len
                    ),
                )
            })?;
        let _ = end;
        self.inner.write_at(self.start + offset, data)
    }
}
