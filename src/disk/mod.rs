//! Disks: the byte sink that filesystem builders write into, and (in submodules) the GPT, FAT32,
//! ext4 and qcow2 writers and the layout that ties them together.

pub mod build;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod image;
pub mod layout;
pub mod read;

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

/// Derive 16 stable bytes (a UUID, a hash seed, a volume serial) from the image seed and a
/// purpose string, so that every identifier in an image follows from the recipe digest and
/// nothing from the clock or a random source. The result is a valid RFC 4122 version-4-shaped
/// UUID (variant and version bits set) so tools that check them accept it.
pub fn derive_id(seed: &str, purpose: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"kiln-id\0");
    h.update(seed.as_bytes());
    h.update(b"\0");
    h.update(purpose.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derive_id("s", "root"), derive_id("s", "root"));
        assert_ne!(derive_id("s", "root"), derive_id("s", "esp"));
        assert_ne!(derive_id("s", "root"), derive_id("t", "root"));
        assert_eq!(derive_id("s", "x")[6] >> 4, 4);
    }

    #[test]
    fn region_refuses_writes_past_its_end() {
        let mut v = Vec::new();
        let mut r = Region::new(&mut v, 10, 4);
        r.write_at(0, b"abcd").unwrap();
        assert!(r.write_at(1, b"abcd").is_err());
        assert_eq!(&v[10..14], b"abcd");
    }
}
