//! dm-verity hash trees, in the format `veritysetup format` writes (hash type 1, SHA-256, 4 KiB
//! data and hash blocks, a 512-byte superblock in the first hash block): every data block is
//! hashed with the salt in front, 128 hashes fill a hash block, and the levels are stacked with
//! the one nearest the root first, up to the root hash. The kernel checks every block it reads
//! from the root partition against this tree. Pure: the caller hands in the data through a
//! reader and writes the result.

use sha2::{Digest, Sha256};
use std::io;

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
/// SHA-256 digests per hash block.
const PER_BLOCK: u64 = BLOCK / 32;

/// What identifies a hash tree besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    pub salt: [u8; 32],
    /// The superblock's UUID.
    pub uuid: [u8; 16],
}

/// A computed hash tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    /// The hash partition's content: superblock block, then the levels.
    pub device: Vec<u8>,
    pub root_hash: [u8; 32],
    pub data_blocks: u64,
}

impl HashTree {
    pub fn root_hex(&self) -> String {
        hex::encode(self.root_hash)
    }
}

/// Blocks per level for `data_blocks` data blocks, from level 0 (hashes of the data) up.
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(PER_BLOCK);
        sizes.push(n);
    }
    sizes
}

/// Bytes of the hash device for `data_bytes` of data (a multiple of [`BLOCK`]).
pub fn hash_device_size(data_bytes: u64) -> u64 {
    let blocks = data_bytes / BLOCK;
    (1 + level_sizes(blocks).iter().sum::<u64>()) * BLOCK
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The hash tree of `data_bytes` bytes read through `read_block(index, buf)` (which fills
/// `buf` with data block `index`, or returns `Ok(false)` for a block known to be zeros).
pub fn hash_tree(
    data_bytes: u64,
    params: &VerityParams,
    mut read_block: impl FnMut(u64, &mut [u8]) -> io::Result<bool>,
) -> io::Result<HashTree> {
    if data_bytes == 0 || !data_bytes.is_multiple_of(BLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("verity data of {data_bytes} bytes is not a whole number of 4 KiB blocks"),
        ));
    }
    let data_blocks = data_bytes / BLOCK;
    let zero_hash = salted(&params.salt, &[0u8; BLOCK as usize]);
    let mut buf = vec![0u8; BLOCK as usize];
    // Level 0: the data blocks' digests, in order.
    let mut digests = Vec::with_capacity(data_blocks as usize * 32);
    for i in 0..data_blocks {
        if read_block(i, &mut buf)? {
            digests.extend_from_slice(&salted(&params.salt, &buf));
        } else {
            digests.extend_from_slice(&zero_hash);
        }
    }
    // Each level's blocks (digests packed, zero-padded), hashed into the next, up to one block.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut current = digests;
    let root_hash = if data_blocks == 1 {
        current[..32].try_into().unwrap_or_default()
    } else {
        loop {
            let mut level = current;
            level.resize(level.len().div_ceil(BLOCK as usize) * BLOCK as usize, 0);
            let mut next = Vec::with_capacity(level.len() / BLOCK as usize * 32);
            for block in level.chunks(BLOCK as usize) {
                next.extend_from_slice(&salted(&params.salt, block));
            }
            let blocks = level.len() / BLOCK as usize;
            levels.push(level);
            if blocks == 1 {
                break next[..32].try_into().unwrap_or_default();
            }
            current = next;
        }
    };
    let mut device = superblock(data_blocks, params);
    device.resize(BLOCK as usize, 0);
    for level in levels.iter().rev() {
        device.extend_from_slice(level);
    }
    Ok(HashTree {
        device,
        root_hash,
        data_blocks,
    })
}

/// The 512-byte verity superblock (version 1).
fn superblock(data_blocks: u64, params: &VerityParams) -> Vec<u8> {
    let mut sb = vec![0u8; 512];
    sb[..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&params.uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(params.salt.len() as u16).to_le_bytes());
    sb[88..88 + params.salt.len()].copy_from_slice(&params.salt);
    sb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_levels() {
        assert_eq!(level_sizes(1), Vec::<u64>::new());
        assert_eq!(level_sizes(128), vec![1]);
        assert_eq!(level_sizes(129), vec![2, 1]);
        assert_eq!(hash_device_size(129 * BLOCK), 4 * BLOCK);
        let params = VerityParams {
            salt: [7; 32],
            uuid: [1; 16],
        };
        let data = vec![0xabu8; 200 * BLOCK as usize];
        let tree = hash_tree(data.len() as u64, &params, |i, buf| {
            let at = (i * BLOCK) as usize;
            buf.copy_from_slice(&data[at..at + BLOCK as usize]);
            Ok(true)
        })
        .unwrap();
        assert_eq!(tree.device.len() as u64, hash_device_size(200 * BLOCK));
        // Zero blocks given as such hash like zeros read.
        let zeros = hash_tree(3 * BLOCK, &params, |_, _| Ok(false)).unwrap();
        let read = hash_tree(3 * BLOCK, &params, |_, buf| {
            buf.fill(0);
            Ok(true)
        })
        .unwrap();
        assert_eq!(zeros, read);
        assert!(hash_tree(100, &params, |_, _| Ok(false)).is_err());
    }
}
