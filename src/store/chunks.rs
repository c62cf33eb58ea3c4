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
pub const MIN_CHUNK: usize = 4 * BLOCK;
/// …and no later than this.
pub const MAX_CHUNK: usize = 32 * BLOCK;
/// After [`MIN_CHUNK`], one block in this many ends a chunk: 16 KiB + 16 KiB on average. Small,
/// because a filesystem's metadata changes in many scattered blocks (a package added to the
/// Debian example changes 9 MiB of blocks; 64 KiB chunks around them would be 105 MiB, these 49
/// MiB).
pub const CUT_ONE_IN: u64 = 4;
/// The largest chunk index read (about 2 million chunks, a 60 GiB disk).
const MAX_INDEX_BYTES: u64 = 256 << 20;
/// Chunks fetched at once.
const PARALLEL: usize = 16;

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
    /// A fast 64-bit hash of the content (16 hex digits): what a seed's chunks are matched by
    /// before the sha256 of the rebuilt whole proves them.
    #[serde(with = "hex_u64")]
    pub weak: u64,
}

/// A `u64` as 16 hex digits in JSON (exact in every JSON reader, unlike a large number).
mod hex_u64 {
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        if text.len() != 16 {
            return Err(serde::de::Error::custom("expected 16 hex digits"));
        }
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
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

/// A 64-bit hash of a block's content: whether a cut may follow it (one in [`CUT_ONE_IN`]), and
/// a part of its chunk's [`Chunk::weak`] hash.
fn block_hash(block: &[u8]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    let mut words = block.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    for (i, b) in words.remainder().iter().enumerate() {
        h = (h ^ (u64::from(*b) << (8 * i))).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h ^ (h >> 29)
}

/// Cut what `reader` holds into chunks, calling `each(offset, bytes, weak)` for every one in
/// order (`weak`: [`Chunk::weak`]), hashing everything into `all` when given. Returns the size.
fn cut(
    reader: &mut dyn Read,
    mut all: Option<&mut Sha256>,
    mut each: impl FnMut(u64, &[u8], u64) -> io::Result<()>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 4 << 20];
    // `buf` holds the file from `offset` on: `done` bytes already looked at, `filled` in all.
    let mut filled = 0usize;
    let mut done = 0usize;
    let mut offset = 0u64;
    // Where the chunk being cut starts in `buf` (kept whole in it until it is cut).
    let mut start: Option<usize> = None;
    let mut weak = 0u64;
    loop {
        let n = reader.read(&mut buf[filled..])?;
        filled += n;
        let eof = n == 0;
        // Whole blocks, and at the end what is left.
        let usable = if eof { filled } else { filled - filled % BLOCK };
        if let Some(h) = all.as_mut() {
            h.update(&buf[done..usable]);
        }
        let mut at = done;
        while at < usable {
            let end = (at + BLOCK).min(usable);
            let block = &buf[at..end];
            if block.iter().all(|b| *b == 0) {
                if let Some(st) = start.take() {
                    each(offset + st as u64, &buf[st..at], weak)?;
                }
            } else {
                let h = block_hash(block);
                let st = *start.get_or_insert_with(|| {
                    weak = 0x6a09_e667_f3bc_c908;
                    at
                });
                weak = (weak.rotate_left(7) ^ h).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let len = end - st;
                if len >= MAX_CHUNK || (len >= MIN_CHUNK && h.is_multiple_of(CUT_ONE_IN)) {
                    each(offset + st as u64, &buf[st..end], weak)?;
                    start = None;
                }
            }
            at = end;
        }
        if eof {
            break;
        }
        // An unfinished chunk moves to the front with the partial block, so it stays whole.
        let keep = start.unwrap_or(usable);
        buf.copy_within(keep..filled, 0);
        if let Some(st) = start.as_mut() {
            *st -= keep;
        }
        offset += keep as u64;
        filled -= keep;
        done = usable - keep;
    }
    if let Some(st) = start {
        each(offset + st as u64, &buf[st..filled], weak)?;
    }
    Ok(offset + filled as u64)
}

/// Split what `reader` holds into chunks, in order; returns them, the size read and the digest
/// of everything (one pass: the digest that names a layer and its chunks come together).
pub fn split(reader: &mut dyn Read) -> io::Result<(Vec<Chunk>, u64, Digest256)> {
    let mut all = Sha256::new();
    let mut chunks = Vec::new();
    let size = cut(reader, Some(&mut all), |offset, bytes, weak| {
        chunks.push(Chunk {
            offset,
            length: bytes.len() as u32,
            digest: Digest256::of(bytes),
            weak,
        });
        Ok(())
    })?;
    Ok((chunks, size, Digest256::from_sha256(&all.finalize())))
}

/// What publishing the chunk index did (part of `kiln publish --json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChunkReport {
    /// Chunks in the index, and how many are different.
    pub chunks: usize,
    pub unique: usize,
    /// Bytes of the disk in chunks the registry already holds in the images the tags pointed at
    /// (what a host running one of those reuses), and the rest (what it fetches).
    pub known_bytes: u64,
    pub new_bytes: u64,
    /// The chunk index manifest, also tagged `sha256-<image hex>.chunks`.
    pub index: Digest256,
}

/// The chunks that the chunk indexes of what `tags` point at now list.
fn known_chunks(target: &Target, r: &super::Reference, tags: &[String]) -> HashSet<Digest256> {
    let mut known = HashSet::new();
    for tag in tags {
        let Ok(Some(fetched)) = target.get_manifest(tag) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<OciManifest>(&fetched.bytes) else {
            continue;
        };
        let [layer] = m.layers.as_slice() else {
            continue;
        };
        let digest = Digest256::of(&fetched.bytes);
        if let Ok(Some(index)) = fetch_index(target, r, &digest, layer) {
            known.extend(index.chunks.into_iter().map(|c| c.digest));
        }
    }
    known
}

/// Publish the index of `chunks` (from [`split`]) of the disk `layer`, referring to the image
/// manifest `subject`. The chunks are not stored again: a puller fetches each as a range of the
/// layer, which the registry has whole.
pub(super) fn publish(
    target: &Target,
    r: &super::Reference,
    tags: &[String],
    chunks: Vec<Chunk>,
    layer: &Descriptor,
    subject: &Descriptor,
) -> Result<ChunkReport, StoreError> {
    let known = known_chunks(target, r, tags);
    let unique: HashSet<&Digest256> = chunks.iter().map(|c| &c.digest).collect();
    let unique = unique.len();
    let known_bytes: u64 = chunks
        .iter()
        .filter(|c| known.contains(&c.digest))
        .map(|c| u64::from(c.length))
        .sum();
    let covered: u64 = chunks.iter().map(|c| u64::from(c.length)).sum();
    let count = chunks.len();
    let index = to_json(&ChunkIndex {
        v: 1,
        digest: layer.digest.clone(),
        size: layer.size,
        block: BLOCK as u32,
        chunks,
    })?;
    let m = OciManifest {
        schema_version: 2,
        media_type: Some(super::registry::OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_CHUNKS.into()),
        config: Descriptor {
            media_type: MEDIA_CHUNK_INDEX.into(),
            digest: target.put_small_blob(&index)?,
            size: index.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        // The disk the chunks are ranges of.
        layers: vec![layer.clone()],
        subject: Some(subject.clone()),
        annotations: BTreeMap::new(),
    };
    let digest =
        target.put_manifest(&chunks_tag(&subject.digest), &to_json(&m)?, ARTIFACT_CHUNKS)?;
    Ok(ChunkReport {
        chunks: count,
        unique,
        known_bytes,
        new_bytes: covered - known_bytes,
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
    // A chunk is at least a block, and its entry well under 256 bytes: a larger index is not
    // one of this disk's.
    let max = MAX_INDEX_BYTES.min(layer.size / BLOCK as u64 * 256 + (64 << 10));
    let bytes = target.small_blob_within(&m.config, "chunk index", max)?;
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

    let started = std::time::Instant::now();
    // The seeds' chunks, for the chunks still to write: matched by their weak hash and length
    // (cheap: no sha256 of the seeds); the sha256 of the rebuilt whole proves them.
    let wanted: HashSet<(u64, u32)> = todo.iter().map(|c| (c.weak, c.length)).collect();
    let mut found: HashMap<(u64, u32), Found> = HashMap::new();
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
        let scanned = cut(&mut f, None, |offset, bytes, weak| {
            let key = (weak, bytes.len() as u32);
            if wanted.contains(&key) {
                found.entry(key).or_insert(Found { seed: i, offset });
            }
            Ok(())
        });
        if let Err(e) = scanned {
            tracing::warn!(seed = %seed.display(), "seed not used: {e}");
        }
    }
    tracing::debug!("seeds scanned in {:.3} s", started.elapsed().as_secs_f64());
    let pending: HashSet<u64> = todo.iter().map(|c| c.offset).collect();
    let fetch: Vec<&Chunk> = todo
        .iter()
        .filter(|c| !found.contains_key(&(c.weak, c.length)))
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
                    let result = fetch_chunk(
                        target,
                        &index.digest,
                        c,
                        &mut buf,
                        &fetched,
                        &fetched_chunks,
                    )
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

    tracing::debug!("chunks fetched at {:.3} s", started.elapsed().as_secs_f64());
    // One pass in order: the seeds' chunks are copied in, and everything is hashed on the way
    // on a thread of its own (zeros between chunks, the rest read back), to check the whole
    // against the digest the signed manifest names.
    let open_seeds: Vec<Option<File>> = seeds.iter().map(|s| File::open(s).ok()).collect();
    let hashing = super::HashThread::start(Sha256::new());
    let mut pass = hashing.buffer();
    let mut used = 0usize;
    let mut at = 0u64;
    let mut flushed = 0u64;
    for c in index.chunks.iter().map(Some).chain([None]) {
        let (gap_end, length) = match c {
            Some(c) => (c.offset, c.length as usize),
            None => (index.size, 0),
        };
        // Zeros up to the chunk, then room for it.
        let mut gap = gap_end - at;
        loop {
            let room = pass.len() - used;
            let zeros = gap.min(room as u64) as usize;
            pass[used..used + zeros].fill(0);
            used += zeros;
            gap -= zeros as u64;
            if gap == 0 && pass.len() - used >= length {
                break;
            }
            hashing.update(std::mem::replace(&mut pass, hashing.buffer()), used);
            used = 0;
        }
        let Some(c) = c else { break };
        let b = &mut pass[used..used + length];
        match found
            .get(&(c.weak, c.length))
            .filter(|_| pending.contains(&c.offset))
        {
            Some(f) => {
                let seed = open_seeds[f.seed].as_ref().ok_or_else(|| {
                    io::Error::other(format!("seed {} is gone", seeds[f.seed].display()))
                });
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
        used += length;
        at = c.offset + u64::from(c.length);
        if at - flushed >= super::WRITE_BEHIND {
            super::start_writeback(&file, flushed, at - flushed);
            flushed = at;
        }
    }
    hashing.update(pass, used);
    let hasher = hashing.finish();
    let actual = Digest256::from_sha256(&hasher.finalize());
    tracing::debug!(
        "rebuilt and hashed at {:.3} s",
        started.elapsed().as_secs_f64()
    );
    if actual != index.digest {
        let _ = std::fs::remove_file(partial);
        return Err(StoreError::DigestMismatch {
            what: format!("disk rebuilt from chunks in {}", partial.display()),
            expected: index.digest.clone(),
            actual,
        });
    }
    file.sync_all().map_err(|e| io_err("sync", partial, e))?;
    tracing::debug!("synced at {:.3} s", started.elapsed().as_secs_f64());
    drop(file);
    std::fs::rename(partial, out).map_err(|e| io_err("rename into place", out, e))?;
    Ok(report)
}

/// Fetch chunk `c` (a range of the layer `layer`) into `buf` and check its digest; once more
/// when it does not match.
fn fetch_chunk(
    target: &Target,
    layer: &Digest256,
    c: &Chunk,
    buf: &mut Vec<u8>,
    fetched: &AtomicU64,
    fetched_chunks: &AtomicU64,
) -> Result<(), StoreError> {
    let length = u64::from(c.length);
    let mut actual = None;
    for attempt in 0..2 {
        buf.clear();
        target
            .get_range(layer, c.offset, length)?
            .take(length + 1)
            .read_to_end(buf)
            .map_err(|e| target.read_error("chunk", layer, &e))?;
        fetched.fetch_add(buf.len() as u64, Ordering::Relaxed);
        fetched_chunks.fetch_add(1, Ordering::Relaxed);
        let digest = Digest256::of(buf);
        if buf.len() as u64 == length && digest == c.digest {
            return Ok(());
        }
        tracing::warn!(
            chunk = %c.digest, attempt = attempt + 1,
            "chunk at {} of {} does not match its digest ({} bytes, {digest})",
            c.offset, target.blob_source(layer), buf.len()
        );
        actual = Some(digest);
    }
    Err(StoreError::DigestMismatch {
        what: format!(
            "chunk {} (bytes {}-{} of {}, fetched twice)",
            c.digest,
            c.offset,
            c.offset + length - 1,
            target.blob_source(layer)
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
        let (chunks, size, whole) = split(&mut &data[..]).unwrap();
        (chunks, size, Some(whole))
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
        assert!((16 << 10..=64 << 10).contains(&average), "{average}");
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

    /// Hands out what it holds a few bytes at a time.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1 % 7919 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn chunks_do_not_depend_on_how_the_bytes_arrive() {
        let mut data = noise(3, 9 << 20);
        data[5 << 20..(5 << 20) + 3 * BLOCK].fill(0);
        data.truncate(data.len() - 123);
        let whole = chunks_of(&data);
        let (chunks, size, all) = split(&mut Trickle(&data, 0)).unwrap();
        let trickled = (chunks, size, Some(all));
        assert_eq!(whole, trickled);
        // The weak hash tells chunks apart like the sha256 does.
        let weak: HashSet<u64> = whole.0.iter().map(|c| c.weak).collect();
        assert_eq!(weak.len(), whole.0.len());
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
