//! Delta delivery. At publish, the disk layer is split into content-defined chunks, each stored
//! as a blob in the image's repository (so identical chunks of other images and tags are stored
//! once), and a chunk index — the ordered chunks with their offsets, lengths and digests, and the
//! digest and size of the whole layer — is published as an OCI artifact whose `subject` is the
//! image manifest, also tagged `sha256-<hex>.chunks` for registries without the referrers API.
//! A pull with seeds (images the puller already holds) rebuilds the layer from the seeds' chunks
//! and fetches only the others, each checked against its digest, then checks the whole against
//! the digest the signed manifest names.
//!
//! Chunking works on 4 KiB blocks, the unit in which a filesystem inside the image (and qcow2's
//! clusters) move: a block that is all zeros ends a chunk and is left out (the index keeps the
//! gap, the rebuilt file has zeros there); after each other block a chunk ends when it has at
//! least [`MIN_CHUNK`] bytes and a hash of that block's content matches a mask (one block in
//! [`CUT_ONE_IN`]), or when it reaches [`MAX_CHUNK`]. Cut points depend on content only, so an
//! insertion or removal moves the cuts with the data and the chunks after it are found again.

use super::{Descriptor, OciManifest, StoreError, Target, io_err, to_json};
use crate::digest::Digest256;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// `artifactType` of a chunk index manifest.
pub const ARTIFACT_CHUNKS: &str = "application/vnd.kiln.chunks.v1+json";
/// Media type of the chunk index (the manifest's config blob).
pub const MEDIA_CHUNK_INDEX: &str = "application/vnd.kiln.chunk-index.v1+json";
/// Media type of one chunk (the manifest's layers).
pub const MEDIA_CHUNK: &str = "application/vnd.kiln.chunk.v1";
/// The block chunks are made of and cut between.
pub const BLOCK: usize = 4096;
/// A chunk is cut no sooner than this (unless zeros or the end come first)…
pub const MIN_CHUNK: usize = 16 * BLOCK;
/// …and no later than this.
pub const MAX_CHUNK: usize = 128 * BLOCK;
/// After [`MIN_CHUNK`], one block in this many ends a chunk: 64 KiB + 64 KiB on average.
pub const CUT_ONE_IN: u64 = 16;
/// The largest chunk index read (about 2 million chunks, a 160 GiB disk).
const MAX_INDEX_BYTES: u64 = 256 << 20;
/// The chunk manifest lists its chunks as layers (so registries keep them) up to this many.
const MAX_LISTED: usize = 20_000;
/// Chunks uploaded or fetched at once.
const PARALLEL: usize = 6;

/// The tag a chunk index is stored under: `sha256-<manifest hex>.chunks`.
pub fn chunks_tag(manifest: &Digest256) -> String {
    format!("sha256-{}.chunks", manifest.hex())
}

/// One chunk of a layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub length: u32,
    pub digest: Digest256,
}

/// The chunks of a layer: ordered, not overlapping; bytes between them are zeros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkIndex {
    pub v: u32,
    /// The whole layer.
    pub digest: Digest256,
    pub size: u64,
    pub block: u32,
    pub chunks: Vec<Chunk>,
}

impl ChunkIndex {
    /// Check that the index describes `layer` (the disk the signed manifest names) and is well
    /// formed: chunks in order, inside the layer, not overlapping, none empty or longer than
    /// [`MAX_CHUNK`].
    pub fn check(&self, layer: &Descriptor) -> Result<(), String> {
        if self.v != 1 {
            return Err(format!("version {} (this kiln reads 1)", self.v));
        }
        if self.digest != layer.digest || self.size != layer.size {
            return Err(format!(
                "it describes {} ({} bytes), but the signed manifest's disk is {} ({} bytes)",
                self.digest, self.size, layer.digest, layer.size
            ));
        }
        let mut end = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            let length = u64::from(c.length);
            if c.offset < end || length == 0 || length > MAX_CHUNK as u64 {
                return Err(format!(
                    "chunk {i} at {} ({} bytes) overlaps the one before, is empty or is longer than {MAX_CHUNK}",
                    c.offset, c.length
                ));
            }
            end = c.offset.saturating_add(length);
            if end > self.size {
                return Err(format!(
                    "chunk {i} ends at {end}, past the layer's {} bytes",
                    self.size
                ));
            }
        }
        Ok(())
    }
}

/// Whether a cut may follow this block: a hash of its content, one in [`CUT_ONE_IN`].
fn is_cut(block: &[u8]) -> bool {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for word in block.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h ^= h >> 29;
    h.is_multiple_of(CUT_ONE_IN)
}

/// Split what `reader` holds into chunks, calling `each` with every chunk and its bytes, in
/// order. Returns the chunks, the size read and, when `whole` is set, the digest of everything.
pub fn split(
    reader: &mut dyn Read,
    whole: bool,
    mut each: impl FnMut(&Chunk, &[u8]) -> io::Result<()>,
) -> io::Result<(Vec<Chunk>, u64, Option<Digest256>)> {
    let mut all = whole.then(Sha256::new);
    let mut chunks = Vec::new();
    let mut current: Vec<u8> = Vec::with_capacity(MAX_CHUNK);
    let mut start = 0u64;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 4 << 20];
    let mut filled = 0usize;
    let mut finish = |current: &mut Vec<u8>, start: u64, chunks: &mut Vec<Chunk>| {
        if current.is_empty() {
            return Ok(());
        }
        let chunk = Chunk {
            offset: start,
            length: current.len() as u32,
            digest: Digest256::of(current),
        };
        each(&chunk, current)?;
        chunks.push(chunk);
        current.clear();
        Ok::<(), io::Error>(())
    };
    loop {
        let n = reader.read(&mut buf[filled..])?;
        filled += n;
        let eof = n == 0;
        // Whole blocks, and at the end what is left.
        let usable = if eof { filled } else { filled - filled % BLOCK };
        if let Some(h) = all.as_mut() {
            h.update(&buf[..usable]);
        }
        for block in buf[..usable].chunks(BLOCK) {
            if block.iter().all(|b| *b == 0) {
                finish(&mut current, start, &mut chunks)?;
            } else {
                if current.is_empty() {
                    start = offset;
                }
                current.extend_from_slice(block);
                if current.len() >= MAX_CHUNK || (current.len() >= MIN_CHUNK && is_cut(block)) {
                    finish(&mut current, start, &mut chunks)?;
                }
            }
            offset += block.len() as u64;
        }
        buf.copy_within(usable..filled, 0);
        filled -= usable;
        if eof {
            break;
        }
    }
    finish(&mut current, start, &mut chunks)?;
    Ok((
        chunks,
        offset,
        all.map(|h| Digest256::from_sha256(&h.finalize())),
    ))
}

/// What publishing the chunks did (part of `kiln publish --json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChunkReport {
    /// Chunks in the index, and how many are different.
    pub chunks: usize,
    pub unique: usize,
    /// Bytes of (different) chunks the registry had already, and bytes uploaded.
    pub existing_bytes: u64,
    pub uploaded_bytes: u64,
    /// The chunk index manifest, also tagged `sha256-<image hex>.chunks`.
    pub index: Digest256,
}

/// Split the layer file `image` (digest `layer`) into chunks, upload those the repository lacks,
/// and publish the index referring to the image manifest `subject`.
pub(super) fn publish(
    target: &Target,
    image: &Path,
    layer: &Descriptor,
    subject: &Descriptor,
) -> Result<ChunkReport, StoreError> {
    let existing = AtomicU64::new(0);
    let uploaded = AtomicU64::new(0);
    let failure: Mutex<Option<StoreError>> = Mutex::new(None);
    let mut file = File::open(image).map_err(|e| io_err("open", image, e))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Digest256, Vec<u8>)>(PARALLEL * 2);
    let rx = Mutex::new(rx);
    let mut unique: Vec<Descriptor> = Vec::new();
    let split_result = std::thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| {
                loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok((digest, bytes))) = next else { break };
                    let done = match target.blob_exists(&digest) {
                        Ok(Some(_)) => {
                            existing.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            Ok(())
                        }
                        Ok(None) => target.put_small_blob(&bytes).map(|_| {
                            uploaded.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        }),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = done {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
        let mut seen = HashSet::new();
        let result = split(&mut file, false, |chunk, bytes| {
            if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                return Err(io::Error::other("an upload failed"));
            }
            if seen.insert(chunk.digest.clone()) {
                unique.push(Descriptor {
                    media_type: MEDIA_CHUNK.into(),
                    digest: chunk.digest.clone(),
                    size: u64::from(chunk.length),
                    artifact_type: None,
                    annotations: BTreeMap::new(),
                });
                tx.send((chunk.digest.clone(), bytes.to_vec()))
                    .map_err(|_| io::Error::other("the uploads stopped"))?;
            }
            Ok(())
        });
        drop(tx);
        result
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let (chunks, size, _) = split_result.map_err(|e| io_err("read", image, e))?;
    if size != layer.size {
        return Err(StoreError::SizeMismatch {
            what: format!(
                "{} (changed while it was split into chunks)",
                image.display()
            ),
            expected: layer.size,
            actual: size,
        });
    }
    let count = chunks.len();
    let index = to_json(&ChunkIndex {
        v: 1,
        digest: layer.digest.clone(),
        size,
        block: BLOCK as u32,
        chunks,
    })?;
    let config = Descriptor {
        media_type: MEDIA_CHUNK_INDEX.into(),
        digest: target.put_small_blob(&index)?,
        size: index.len() as u64,
        artifact_type: None,
        annotations: BTreeMap::new(),
    };
    let unique_count = unique.len();
    if unique.len() > MAX_LISTED {
        tracing::warn!(
            chunks = unique.len(),
            "too many chunks to list in the index manifest; a registry garbage collection may remove them (pulls then fetch the whole layer)"
        );
        unique.clear();
    }
    let m = OciManifest {
        schema_version: 2,
        media_type: Some(super::registry::OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_CHUNKS.into()),
        config,
        layers: unique,
        subject: Some(subject.clone()),
        annotations: BTreeMap::new(),
    };
    let digest =
        target.put_manifest(&chunks_tag(&subject.digest), &to_json(&m)?, ARTIFACT_CHUNKS)?;
    Ok(ChunkReport {
        chunks: count,
        unique: unique_count,
        existing_bytes: existing.into_inner(),
        uploaded_bytes: uploaded.into_inner(),
        index: digest,
    })
}

/// The chunk index of the image manifest `manifest` (whose disk is `layer`): None when the
/// image has none; an error when one is there but does not describe `layer`.
pub(super) fn fetch_index(
    target: &Target,
    r: &super::Reference,
    manifest: &Digest256,
    layer: &Descriptor,
) -> Result<Option<ChunkIndex>, StoreError> {
    let found =
        super::attached_manifests(target, r, manifest, ARTIFACT_CHUNKS, &chunks_tag(manifest))?;
    let Some(m) = found.into_iter().find(|m| {
        m.config.media_type == MEDIA_CHUNK_INDEX
            && m.subject.as_ref().is_some_and(|s| &s.digest == manifest)
    }) else {
        return Ok(None);
    };
    let bytes = target.small_blob_within(&m.config, "chunk index", MAX_INDEX_BYTES)?;
    let index: ChunkIndex = serde_json::from_slice(&bytes).map_err(|e| StoreError::Malformed {
        what: "chunk index".into(),
        reference: r.to_string(),
        reason: e.to_string(),
    })?;
    index.check(layer).map_err(|reason| StoreError::Malformed {
        what: format!("chunk index {}", m.config.digest),
        reference: r.to_string(),
        reason: format!("{reason}; refused (pull without --seed fetches the whole layer)"),
    })?;
    Ok(Some(index))
}

/// What rebuilding a layer from seeds and chunks did (part of `kiln pull --json` and of the
/// agent's deploy result).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeltaReport {
    pub chunks: usize,
    /// Chunks (and their bytes) fetched from the registry, retries included.
    pub fetched_chunks: usize,
    pub fetched_bytes: u64,
    /// Chunks (and bytes) taken from the seeds.
    pub reused_chunks: usize,
    pub reused_bytes: u64,
    /// Chunks (and bytes) a previous, interrupted pull had already written.
    pub resumed_chunks: usize,
    pub resumed_bytes: u64,
    /// Bytes left out as zeros.
    pub zero_bytes: u64,
}

/// Where a chunk can be read from a seed.
struct Found {
    seed: usize,
    offset: u64,
}

/// Rebuild the layer `index` describes into `partial` from the `seeds` and the chunks fetched
/// from `target`, then check the whole against the index's digest (the signed manifest's) and
/// rename it to `out`. A previous attempt's `partial` is reused: its chunks that check out are
/// kept, its other bytes between chunks are zeroed.
pub(super) fn assemble(
    target: &Target,
    index: &ChunkIndex,
    seeds: &[PathBuf],
    partial: &Path,
    out: &Path,
) -> Result<DeltaReport, StoreError> {
    let mut report = DeltaReport {
        chunks: index.chunks.len(),
        ..DeltaReport::default()
    };
    let resuming = partial.exists();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
        .map_err(|e| io_err("open", partial, e))?;
    file.set_len(index.size)
        .map_err(|e| io_err("size", partial, e))?;
    let mut todo: Vec<&Chunk> = Vec::new();
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut gap_start = 0u64;
    for c in &index.chunks {
        if resuming {
            zero(&file, gap_start, c.offset - gap_start).map_err(|e| io_err("zero", partial, e))?;
            let b = &mut buf[..c.length as usize];
            if file.read_exact_at(b, c.offset).is_ok() && Digest256::of(b) == c.digest {
                report.resumed_chunks += 1;
                report.resumed_bytes += u64::from(c.length);
                gap_start = c.offset + u64::from(c.length);
                continue;
            }
        }
        gap_start = c.offset + u64::from(c.length);
        todo.push(c);
    }
    if resuming {
        zero(&file, gap_start, index.size - gap_start).map_err(|e| io_err("zero", partial, e))?;
    }
    let covered: u64 = index.chunks.iter().map(|c| u64::from(c.length)).sum();
    report.zero_bytes = index.size - covered;

    // The seeds' chunks, for the chunks still to write.
    let wanted: HashSet<&Digest256> = todo.iter().map(|c| &c.digest).collect();
    let mut found: HashMap<Digest256, Found> = HashMap::new();
    for (i, seed) in seeds.iter().enumerate() {
        if found.len() == wanted.len() {
            break;
        }
        let mut f = match File::open(seed) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(seed = %seed.display(), "seed not used: {e}");
                continue;
            }
        };
        let scanned = split(&mut f, false, |c, _| {
            if wanted.contains(&c.digest) && !found.contains_key(&c.digest) {
                found.insert(
                    c.digest.clone(),
                    Found {
                        seed: i,
                        offset: c.offset,
                    },
                );
            }
            Ok(())
        });
        if let Err(e) = scanned {
            tracing::warn!(seed = %seed.display(), "seed not used: {e}");
        }
    }
    let pending: HashSet<u64> = todo.iter().map(|c| c.offset).collect();
    let fetch: Vec<&Chunk> = todo
        .iter()
        .filter(|c| !found.contains_key(&c.digest))
        .copied()
        .collect();

    // The rest from the registry, a few at a time; a chunk that fails its digest is fetched
    // once more.
    let fetched = AtomicU64::new(0);
    let fetched_chunks = AtomicU64::new(0);
    let next = Mutex::new(fetch.iter());
    let failure: Mutex<Option<StoreError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(fetch.len()) {
            scope.spawn(|| {
                let mut buf = Vec::with_capacity(MAX_CHUNK + 1);
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    let Some(c) = next.lock().ok().and_then(|mut i| i.next().copied()) else {
                        break;
                    };
                    let result = fetch_chunk(target, c, &mut buf, &fetched, &fetched_chunks)
                        .and_then(|()| {
                            file.write_all_at(&buf, c.offset)
                                .map_err(|e| io_err("write", partial, e))
                        });
                    if let Err(e) = result {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    report.fetched_bytes = fetched.into_inner();
    report.fetched_chunks = fetched_chunks.into_inner() as usize;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let _ = file.sync_data();
        return Err(e);
    }

    // One pass in order: the seeds' chunks are copied in, and everything is hashed on the way
    // (zeros between chunks, the rest read back), to check the whole against the digest the
    // signed manifest names.
    let open_seeds: Vec<Option<File>> = seeds.iter().map(|s| File::open(s).ok()).collect();
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; MAX_CHUNK];
    let hash_zeros = |hasher: &mut Sha256, mut len: u64| {
        while len > 0 {
            let n = len.min(zeros.len() as u64) as usize;
            hasher.update(&zeros[..n]);
            len -= n as u64;
        }
    };
    let mut at = 0u64;
    let seed_misread =
        |f: &Found| io::Error::other(format!("seed {} changed", seeds[f.seed].display()));
    for c in &index.chunks {
        hash_zeros(&mut hasher, c.offset - at);
        let b = &mut buf[..c.length as usize];
        match found.get(&c.digest).filter(|_| pending.contains(&c.offset)) {
            Some(f) => {
                let seed = open_seeds[f.seed].as_ref().ok_or_else(|| seed_misread(f));
                seed.and_then(|seed| seed.read_exact_at(b, f.offset))
                    .map_err(|e| io_err("read", &seeds[f.seed], e))?;
                file.write_all_at(b, c.offset)
                    .map_err(|e| io_err("write", partial, e))?;
                report.reused_chunks += 1;
                report.reused_bytes += u64::from(c.length);
            }
            None => file
                .read_exact_at(b, c.offset)
                .map_err(|e| io_err("read", partial, e))?,
        }
        hasher.update(&*b);
        at = c.offset + u64::from(c.length);
    }
    hash_zeros(&mut hasher, index.size - at);
    let actual = Digest256::from_sha256(&hasher.finalize());
    if actual != index.digest {
        let _ = std::fs::remove_file(partial);
        return Err(StoreError::DigestMismatch {
            what: format!("disk rebuilt from chunks in {}", partial.display()),
            expected: index.digest.clone(),
            actual,
        });
    }
    file.sync_all().map_err(|e| io_err("sync", partial, e))?;
    drop(file);
    std::fs::rename(partial, out).map_err(|e| io_err("rename into place", out, e))?;
    Ok(report)
}

/// Fetch chunk `c` into `buf` and check its digest; once more when it does not match.
fn fetch_chunk(
    target: &Target,
    c: &Chunk,
    buf: &mut Vec<u8>,
    fetched: &AtomicU64,
    fetched_chunks: &AtomicU64,
) -> Result<(), StoreError> {
    let length = u64::from(c.length);
    let mut actual = None;
    for attempt in 0..2 {
        buf.clear();
        let body = target.get_blob(&c.digest, 0)?.body;
        body.take(length + 1)
            .read_to_end(buf)
            .map_err(|e| target.read_error("chunk", &c.digest, &e))?;
        fetched.fetch_add(buf.len() as u64, Ordering::Relaxed);
        fetched_chunks.fetch_add(1, Ordering::Relaxed);
        let digest = Digest256::of(buf);
        if buf.len() as u64 == length && digest == c.digest {
            return Ok(());
        }
        tracing::warn!(
            chunk = %c.digest, attempt = attempt + 1,
            "chunk from {} does not match its digest ({} bytes, {digest})",
            target.blob_source(&c.digest), buf.len()
        );
        actual = Some(digest);
    }
    Err(StoreError::DigestMismatch {
        what: format!(
            "chunk {} at offset {} (fetched twice from {})",
            c.digest,
            c.offset,
            target.blob_source(&c.digest)
        ),
        expected: c.digest.clone(),
        actual: actual.unwrap_or_else(|| c.digest.clone()),
    })
}

/// Make `len` bytes at `offset` read as zeros: a hole where the filesystem can punch one.
fn zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate only reads its integer arguments; the fd is open for the call.
    let punched = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    } == 0;
    if punched {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bytes (xorshift), the same for the same seed.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunks_of(data: &[u8]) -> (Vec<Chunk>, u64, Option<Digest256>) {
        split(&mut &data[..], true, |_, _| Ok(())).unwrap()
    }

    #[test]
    fn chunks_cover_the_data_leave_zeros_out_and_respect_blocks() {
        let mut data = noise(1, 3 << 20);
        data.extend(vec![0u8; 10 * BLOCK]);
        data.extend(noise(2, 1 << 20));
        data.extend(b"tail");
        let (chunks, size, whole) = chunks_of(&data);
        assert_eq!(size, data.len() as u64);
        assert_eq!(whole, Some(Digest256::of(&data)));
        let mut end = 0;
        for c in &chunks {
            assert!(c.offset >= end);
            assert_eq!(c.offset % BLOCK as u64, 0, "{c:?}");
            assert!(c.length as usize <= MAX_CHUNK);
            let bytes = &data[c.offset as usize..c.offset as usize + c.length as usize];
            assert_eq!(Digest256::of(bytes), c.digest);
            end = c.offset + u64::from(c.length);
        }
        let covered: u64 = chunks.iter().map(|c| u64::from(c.length)).sum();
        assert_eq!(
            covered,
            data.len() as u64 - 10 * BLOCK as u64,
            "zeros are left out"
        );
        let average = covered / chunks.len() as u64;
        assert!((64 << 10..=192 << 10).contains(&average), "{average}");
        let index = ChunkIndex {
            v: 1,
            digest: Digest256::of(&data),
            size,
            block: 4096,
            chunks,
        };
        let layer = Descriptor {
            media_type: String::new(),
            digest: Digest256::of(&data),
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        };
        assert_eq!(index.check(&layer), Ok(()));
        let mut other = layer.clone();
        other.digest = Digest256::of(b"x");
        assert!(index.check(&other).unwrap_err().contains("signed manifest"));
        let mut bad = index.clone();
        bad.chunks.swap(0, 1);
        assert!(bad.check(&layer).is_err());
    }

    #[test]
    fn an_insertion_changes_only_the_chunks_around_it() {
        let a = noise(7, 8 << 20);
        let mut b = a.clone();
        // Three blocks inserted in the middle, one byte changed near the end.
        b.splice(4 << 20..4 << 20, noise(9, 3 * BLOCK));
        let last = b.len() - 100_000;
        b[last] ^= 0xff;
        let (ca, _, _) = chunks_of(&a);
        let (cb, _, _) = chunks_of(&b);
        let known: HashSet<&Digest256> = ca.iter().map(|c| &c.digest).collect();
        let new: u64 = cb
            .iter()
            .filter(|c| !known.contains(&c.digest))
            .map(|c| u64::from(c.length))
            .sum();
        assert!(
            new <= 4 * MAX_CHUNK as u64,
            "{new} new bytes of {}",
            b.len()
        );
    }
}
