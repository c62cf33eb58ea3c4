//! Disk image outputs: the file a whole disk is written into, as a sparse raw image or as a qcow2
//! (version 3) image written directly, without a raw intermediate and without `qemu-img`.
//!
//! Both go through [`ImageWriter`], a [`WriteAt`] sink. Writes land in a temp file next to the
//! final path (`.NAME.XXXXXX.tmp`); [`ImageWriter::finish`] completes the metadata, fsyncs and
//! renames it into place. Dropping the writer without `finish`, or any failed write, discards the
//! temp file, so a half-written image never appears at the final path.
//!
//! qcow2 layout written here: cluster 0 holds the header; guest data clusters follow in the order
//! they are stored (a cluster is stored when it has been completely written, when it is evicted
//! from a small cache of partially written clusters, or at `finish`); all-zero clusters are never
//! allocated, and rewrites of stored clusters go in place. With compression, each stored cluster is
//! raw-deflated (4 KiB window, as qemu does) and packed byte-wise when that saves at least an
//! eighth of the cluster; a compressed cluster that is written again is inflated, patched and
//! stored uncompressed. At `finish` the L2 tables, the L1 table, the refcount blocks and the
//! refcount table are appended, then the header is written. The output depends only on the sequence
//! of writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tempfile::NamedTempFile;

use super::WriteAt;

/// The file format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A sparse file holding the disk byte for byte.
    Raw,
    /// QEMU copy-on-write version 3.
    Qcow2,
}

impl ImageFormat {
    /// `raw` or `qcow2`, as recipes, build outputs, OCI media types and QEMU's `format=` name it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format of an existing image from its first bytes: qcow2 when they are the qcow2 magic
    /// `QFI\xfb`, else raw. Reads at most four bytes.
    pub fn sniff(reader: &mut dyn io::Read) -> io::Result<ImageFormat> {
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            match reader.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(if got == 4 && magic == QCOW2_MAGIC.to_be_bytes() {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        })
    }
}

/// How to write a disk image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub format: ImageFormat,
    /// qcow2 only: store each cluster deflate-compressed when that saves space.
    pub compress: bool,
    /// qcow2 only: cluster size in bytes, a power of two from 512 to 2 MiB.
    pub cluster_size: u32,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            format: ImageFormat::Raw,
            compress: false,
            cluster_size: DEFAULT_CLUSTER_SIZE,
        }
    }
}

impl ImageOptions {
    /// qcow2 with default clusters, optionally compressed.
    pub fn qcow2(compress: bool) -> Self {
        ImageOptions {
            format: ImageFormat::Qcow2,
            compress,
            cluster_size: DEFAULT_CLUSTER_SIZE,
        }
    }
}

/// What a finished image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    pub format: ImageFormat,
    /// Size of the disk as a guest sees it.
    pub virtual_size: u64,
    /// Length of the image file.
    pub file_size: u64,
    /// Bytes the file occupies on the host filesystem (st_blocks * 512).
    pub allocated_bytes: u64,
    /// qcow2: guest clusters stored uncompressed (0 for raw).
    pub data_clusters: u64,
    /// qcow2: guest clusters stored compressed (0 for raw).
    pub compressed_clusters: u64,
    /// qcow2: clusters holding the header, L1/L2 tables and refcounts (0 for raw).
    pub metadata_clusters: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid options for disk image {path}: {reason}")]
    Options { path: PathBuf, reason: String },
    #[error("cannot {what} for disk image {path}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {path} was not written because an earlier write failed ({cause}); \
         fix that and build again"
    )]
    Failed { path: PathBuf, cause: String },
}

/// Default qcow2 cluster size (as `qemu-img create`).
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;

/// A disk image being written at `final_path`: writes go to a temp file in the same directory
/// (`.name.XXXXXX.tmp`), which `finish()` fsyncs and renames into place; dropping without finish
/// (or after an error) removes the temp file, so nothing half-written ever appears at final_path.
pub struct ImageWriter {
    final_path: PathBuf,
    tmp: NamedTempFile,
    virtual_size: u64,
    format: ImageFormat,
    /// The first write error; once set, the image can only be discarded.
    failed: Option<String>,
    sink: Sink,
}

enum Sink {
    Raw(RawSink),
    Qcow2(Box<Qcow2Sink>),
}

impl ImageWriter {
    pub fn create(
        final_path: &Path,
        virtual_size: u64,
        opts: &ImageOptions,
    ) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::Options {
            path: final_path.to_path_buf(),
            reason,
        };
        let name = final_path
            .file_name()
            .ok_or_else(|| bad("the path has no file name".into()))?;
        let dir = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if opts.format == ImageFormat::Qcow2 {
            Qcow2Sink::check(virtual_size, opts.cluster_size).map_err(bad)?;
        }
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .rand_bytes(6)
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|source| ImageError::Io {
                what: format!("create a temp file in {}", dir.display()),
                path: final_path.to_path_buf(),
                source,
            })?;
        let sink = match opts.format {
            ImageFormat::Raw => {
                tmp.as_file()
                    .set_len(virtual_size)
                    .map_err(|source| ImageError::Io {
                        what: format!("size the temp file to {virtual_size} bytes"),
                        path: final_path.to_path_buf(),
                        source,
                    })?;
                Sink::Raw(RawSink::default())
            }
            ImageFormat::Qcow2 => Sink::Qcow2(Box::new(Qcow2Sink::new(
                virtual_size,
                opts.cluster_size,
                opts.compress,
            ))),
        };
        Ok(ImageWriter {
            final_path: final_path.to_path_buf(),
            tmp,
            virtual_size,
            format: opts.format,
            failed: None,
            sink,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Complete the image (qcow2 metadata), fsync it and rename it to the final path.
    pub fn finish(mut self) -> Result<ImageReport, ImageError> {
        let path = self.final_path.clone();
        if let Some(cause) = self.failed.take() {
            return Err(ImageError::Failed { path, cause });
        }
        let io_err = |what: &str| {
            let path = path.clone();
            let what = what.to_string();
            move |source| ImageError::Io { what, path, source }
        };
        let file = self.tmp.as_file();
        let counts = match &mut self.sink {
            Sink::Raw(raw) => {
                raw.flush(file).map_err(io_err("write buffered data"))?;
                Qcow2Counts::default()
            }
            Sink::Qcow2(q) => q.finish(file).map_err(io_err("write qcow2 metadata"))?,
        };
        file.sync_all().map_err(io_err("fsync the temp file"))?;
        let meta = file.metadata().map_err(io_err("stat the temp file"))?;
        let report = ImageReport {
            format: self.format,
            virtual_size: self.virtual_size,
            file_size: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            data_clusters: counts.data,
            compressed_clusters: counts.compressed,
            metadata_clusters: counts.metadata,
        };
        self.tmp.persist(&path).map_err(|e| ImageError::Io {
            what: "rename the finished temp file into place".into(),
            path: path.clone(),
            source: e.error,
        })?;
        // Make the rename durable. The image is complete and in place already, so a failure here
        // is not worth failing the build for.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(report)
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= self.virtual_size);
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at offset {offset} goes past the end of the {}-byte disk",
                    data.len(),
                    self.virtual_size
                ),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        let file = self.tmp.as_file();
        match &mut self.sink {
            Sink::Raw(raw) => raw.write(file, offset, data),
            Sink::Qcow2(q) => q.write(file, offset, data),
        }
    }
}

impl WriteAt for ImageWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(cause) = &self.failed {
            return Err(io::Error::other(format!(
                "disk image {} already failed: {cause}",
                self.final_path.display()
            )));
        }
        let result = self.write_inner(offset, data);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }
}

/// Ask the kernel to start writing `[offset, offset + len)` to disk now, so that the fsync in
/// `finish` has little left to wait for. Only a hint: errors are ignored (they surface at fsync).
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range on a file descriptor we own; it does not touch memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// True when every byte is zero. Checks 4 KiB at a time so the inner loop vectorizes and a
/// non-zero buffer is rejected early.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

// ---------------------------------------------------------------------------------------------
// Raw

/// Consecutive writes are gathered up to this size before they go to the file.
const RAW_BUFFER: usize = 1 << 20;
/// Granularity at which zero runs are left as holes.
const SPARSE_BLOCK: u64 = 4096;

#[derive(Default)]
struct RawSink {
    buf: Vec<u8>,
    start: u64,
}

impl RawSink {
    fn write(&mut self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let appends = offset == self.start + self.buf.len() as u64;
        if !self.buf.is_empty() && appends && self.buf.len() + data.len() <= RAW_BUFFER {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.flush(file)?;
        if data.len() >= RAW_BUFFER {
            return write_sparse(file, offset, data);
        }
        self.start = offset;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self, file: &File) -> io::Result<()> {
        if !self.buf.is_empty() {
            write_sparse(file, self.start, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Write `data` at `offset`, leaving zero runs (in 4 KiB file blocks) as holes where the file has
/// no data yet. Zeros over earlier data are written, so the file always reads back as written.
fn write_sparse(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut run_start = 0usize;
    let mut run_zero: Option<bool> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let block_end = (abs / SPARSE_BLOCK + 1) * SPARSE_BLOCK;
        let end = data.len().min(pos + (block_end - abs) as usize);
        let zero = is_zero(&data[pos..end]);
        match run_zero {
            Some(z) if z != zero => {
                write_run(file, offset + run_start as u64, &data[run_start..pos], z)?;
                run_start = pos;
                run_zero = Some(zero);
            }
            None => run_zero = Some(zero),
            _ => {}
        }
        pos = end;
    }
    match run_zero {
        Some(z) => write_run(file, offset + run_start as u64, &data[run_start..], z),
        None => Ok(()),
    }
}

fn write_run(file: &File, offset: u64, data: &[u8], zero: bool) -> io::Result<()> {
    if zero && !has_data(file, offset, data.len() as u64) {
        return Ok(());
    }
    file.write_all_at(data, offset)
}

/// Whether any byte of `[start, start + len)` may hold data (is not a hole). Errs on the side of
/// "data" when the filesystem cannot tell.
fn has_data(file: &File, start: u64, len: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(start) else {
        return true;
    };
    // SAFETY: lseek on a file descriptor we own; it only moves the file position, which this
    // module never uses (all I/O is positional).
    let found = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if found < 0 {
        // ENXIO: no data at or after `start`.
        return io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    (found as u64) < start + len
}

// ---------------------------------------------------------------------------------------------
// qcow2

const QCOW2_MAGIC: u32 = 0x5146_49fb;
const QCOW2_VERSION: u32 = 3;
const HEADER_LENGTH: u32 = 112;
const REFCOUNT_ORDER: u32 = 4;
/// L1/L2 entry flag: the cluster's refcount is exactly one.
const FLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster descriptor.
const FLAG_COMPRESSED: u64 = 1 << 62;
/// Host offset bits 9-55 of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const SECTOR: u64 = 512;
/// qemu's limit on the L1 table size.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Appended clusters are gathered up to this size before they go to the file.
const APPEND_FLUSH: usize = 4 << 20;
/// Bytes of partially written clusters kept in memory.
const CACHE_BYTES: u64 = 2 << 20;
/// qemu compresses with a 4 KiB window and decompresses with the same.
const DEFLATE_WINDOW_BITS: u8 = 12;

#[derive(Default)]
struct Qcow2Counts {
    data: u64,
    compressed: u64,
    metadata: u64,
}

/// A guest cluster that has been partly written but not stored yet (it was unallocated).
struct CachedCluster {
    index: u64,
    data: Vec<u8>,
    /// Written byte ranges, sorted and merged.
    covered: Vec<(usize, usize)>,
    last_use: u64,
}

impl CachedCluster {
    fn cover(&mut self, start: usize, end: usize) {
        let (mut start, mut end) = (start, end);
        let mut merged = Vec::with_capacity(self.covered.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.covered {
            if e < start {
                merged.push((s, e));
            } else if s > end {
                if !placed {
                    merged.push((start, end));
                    placed = true;
                }
                merged.push((s, e));
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        if !placed {
            merged.push((start, end));
        }
        self.covered = merged;
    }

    fn is_full(&self, len: usize) -> bool {
        self.covered
            .first()
            .is_some_and(|&(s, e)| s == 0 && e >= len)
    }
}

struct Qcow2Sink {
    cluster_bits: u32,
    cs: u64,
    virtual_size: u64,
    l2_entries: u64,
    l1_size: u64,
    /// L2 tables by L1 index, created when a cluster they cover is stored.
    l2_tables: Vec<Option<Box<[u64]>>>,
    /// Refcount of every host cluster so far (index = host cluster number).
    refcounts: Vec<u16>,
    /// Host clusters allocated so far; the file is `next_cluster * cs` bytes long once flushed.
    next_cluster: u64,
    /// Allocated host bytes `[pending_start, next_cluster * cs)` not yet written to the file.
    pending: Vec<u8>,
    pending_start: u64,
    /// Host byte offset where the next compressed cluster may continue (0 = none).
    compressed_tail: u64,
    cache: Vec<CachedCluster>,
    cache_capacity: usize,
    tick: u64,
    compressor: Option<Compress>,
    /// Compression output.
    scratch: Vec<u8>,
    /// Buffers of evicted cache entries, reused.
    spare: Vec<Vec<u8>>,
}

impl Qcow2Sink {
    fn check(virtual_size: u64, cluster_size: u32) -> Result<(), String> {
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            return Err(format!(
                "qcow2 cluster size {cluster_size} is not a power of two from 512 to 2097152"
            ));
        }
        if !virtual_size.is_multiple_of(SECTOR) {
            return Err(format!(
                "qcow2 virtual size {virtual_size} is not a multiple of 512 bytes; round it up"
            ));
        }
        let cs = cluster_size as u64;
        let l1_bytes = virtual_size.div_ceil(cs * (cs / 8)) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(format!(
                "virtual size {virtual_size} needs a {l1_bytes}-byte L1 table with \
                 {cluster_size}-byte clusters, more than qemu's {MAX_L1_BYTES}; use bigger clusters"
            ));
        }
        Ok(())
    }

    fn new(virtual_size: u64, cluster_size: u32, compress: bool) -> Self {
        let cs = cluster_size as u64;
        let l2_entries = cs / 8;
        let l1_size = virtual_size.div_ceil(cs * l2_entries);
        Qcow2Sink {
            cluster_bits: cluster_size.trailing_zeros(),
            cs,
            virtual_size,
            l2_entries,
            l1_size,
            l2_tables: (0..l1_size).map(|_| None).collect(),
            refcounts: vec![1], // the header cluster
            next_cluster: 1,
            pending: Vec::new(),
            pending_start: cs,
            compressed_tail: 0,
            cache: Vec::new(),
            cache_capacity: (CACHE_BYTES / cs).clamp(4, 64) as usize,
            tick: 0,
            compressor: compress.then(|| {
                Compress::new_with_window_bits(Compression::default(), false, DEFLATE_WINDOW_BITS)
            }),
            scratch: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Bytes of guest cluster `vc` inside the disk (the last one may be short).
    fn cluster_len(&self, vc: u64) -> usize {
        self.cs.min(self.virtual_size - vc * self.cs) as usize
    }

    fn l2_entry(&self, vc: u64) -> u64 {
        let table = &self.l2_tables[(vc / self.l2_entries) as usize];
        table
            .as_ref()
            .map_or(0, |t| t[(vc % self.l2_entries) as usize])
    }

    fn set_l2_entry(&mut self, vc: u64, entry: u64) {
        let n = self.l2_entries as usize;
        let table = self.l2_tables[(vc / self.l2_entries) as usize]
            .get_or_insert_with(|| vec![0u64; n].into_boxed_slice());
        table[(vc % self.l2_entries) as usize] = entry;
    }

    fn write(&mut self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let vc = abs / self.cs;
            let off = (abs % self.cs) as usize;
            let n = (self.cs as usize - off).min(data.len() - pos);
            self.write_in_cluster(file, vc, off, &data[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    fn write_in_cluster(
        &mut self,
        file: &File,
        vc: u64,
        off: usize,
        piece: &[u8],
    ) -> io::Result<()> {
        let len = self.cluster_len(vc);
        if let Some(i) = self.cache.iter().position(|c| c.index == vc) {
            self.tick += 1;
            let entry = &mut self.cache[i];
            entry.last_use = self.tick;
            entry.data[off..off + piece.len()].copy_from_slice(piece);
            entry.cover(off, off + piece.len());
            if entry.is_full(len) {
                let entry = self.cache.swap_remove(i);
                self.store_new(file, vc, &entry.data)?;
                self.spare.push(entry.data);
            }
            return Ok(());
        }
        let entry = self.l2_entry(vc);
        if entry & FLAG_COMPRESSED != 0 {
            return self.rewrite_compressed(file, vc, entry, off, piece);
        }
        let host = entry & OFFSET_MASK;
        if host != 0 {
            return self.write_host(file, host + off as u64, piece);
        }
        if off == 0 && piece.len() == len {
            return self.store_new(file, vc, piece);
        }
        if is_zero(piece) {
            // The cluster is unallocated and reads as zeros already.
            return Ok(());
        }
        if self.cache.len() >= self.cache_capacity {
            let lru = (0..self.cache.len())
                .min_by_key(|&i| self.cache[i].last_use)
                .unwrap_or(0);
            let evicted = self.cache.swap_remove(lru);
            self.store_new(file, evicted.index, &evicted.data)?;
            self.spare.push(evicted.data);
        }
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        data.resize(self.cs as usize, 0);
        data[off..off + piece.len()].copy_from_slice(piece);
        self.tick += 1;
        self.cache.push(CachedCluster {
            index: vc,
            data,
            covered: vec![(off, off + piece.len())],
            last_use: self.tick,
        });
        Ok(())
    }

    /// Store unallocated guest cluster `vc` with contents `data` (shorter than a cluster means
    /// zero-padded): nothing if all zero, compressed if enabled and smaller, else a new cluster.
    fn store_new(&mut self, file: &File, vc: u64, data: &[u8]) -> io::Result<()> {
        if is_zero(data) {
            return Ok(());
        }
        if let Some(compressor) = self.compressor.as_mut() {
            let cs = self.cs as usize;
            let padded;
            let input = if data.len() == cs {
                data
            } else {
                let mut p = vec![0u8; cs];
                p[..data.len()].copy_from_slice(data);
                padded = p;
                &padded
            };
            // The output buffer has room for any deflate stream of a cluster (zlib-rs 0.6 panics
            // when it runs out of output with a small window). Compressed clusters are packed
            // byte-wise, so the result is used when it saves at least an eighth of the cluster.
            self.scratch.resize(2 * cs + 4096, 0);
            compressor.reset();
            let status = compressor
                .compress(input, &mut self.scratch, FlushCompress::Finish)
                .map_err(|e| io::Error::other(format!("deflate failed: {e}")))?;
            let n = compressor.total_out() as usize;
            if status == Status::StreamEnd && n <= cs - cs / 8 {
                let compressed = std::mem::take(&mut self.scratch);
                let placed = self.place_compressed(file, &compressed[..n]);
                self.scratch = compressed;
                let start = placed?;
                let descriptor = self.compressed_descriptor(start, n as u64)?;
                self.set_l2_entry(vc, descriptor);
                return Ok(());
            }
        }
        let host = self.append_cluster(file, data)?;
        self.set_l2_entry(vc, host | FLAG_COPIED);
        Ok(())
    }

    /// Allocate the next host cluster with `data` (zero-padded to a cluster), refcount 1.
    fn append_cluster(&mut self, file: &File, data: &[u8]) -> io::Result<u64> {
        let host = self.next_cluster * self.cs;
        self.pending.extend_from_slice(data);
        self.pending
            .resize(self.pending.len() + (self.cs as usize - data.len()), 0);
        self.refcounts.push(1);
        self.next_cluster += 1;
        self.maybe_flush(file)?;
        Ok(host)
    }

    /// Put compressed bytes after the previous compressed cluster when they fit in its host
    /// cluster (or that cluster is the last one, so they can run into a new one), else at the
    /// start of a new cluster. Every host cluster touched gets one more reference.
    fn place_compressed(&mut self, file: &File, bytes: &[u8]) -> io::Result<u64> {
        let cs = self.cs;
        let n = bytes.len() as u64;
        let mut start = self.next_cluster * cs;
        let tail = self.compressed_tail;
        if !tail.is_multiple_of(cs) {
            let tail_cluster = tail / cs;
            let fits = tail + n <= (tail_cluster + 1) * cs;
            let last = tail_cluster + 1 == self.next_cluster;
            if (fits || last) && self.refcounts[tail_cluster as usize] < u16::MAX - 1 {
                start = tail;
            }
        }
        let end = start + n;
        while self.next_cluster * cs < end {
            self.pending.resize(self.pending.len() + cs as usize, 0);
            self.refcounts.push(0);
            self.next_cluster += 1;
        }
        self.write_host(file, start, bytes)?;
        for c in start / cs..=(end - 1) / cs {
            self.refcounts[c as usize] += 1;
        }
        self.compressed_tail = end;
        self.maybe_flush(file)?;
        Ok(start)
    }

    /// Bit position of the sector count in a compressed cluster descriptor.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    fn compressed_descriptor(&self, start: u64, len: u64) -> io::Result<u64> {
        let shift = self.csize_shift();
        if start >= 1 << shift {
            return Err(io::Error::other(format!(
                "compressed data at host offset {start} is beyond what a qcow2 descriptor with \
                 {}-byte clusters can address",
                self.cs
            )));
        }
        let extra_sectors = (start + len - 1) / SECTOR - start / SECTOR;
        Ok(FLAG_COMPRESSED | (extra_sectors << shift) | start)
    }

    /// Host byte offset and byte length (to the end of its last sector) of compressed data.
    fn parse_descriptor(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let start = entry & ((1u64 << shift) - 1);
        let extra = (entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1);
        (start, (extra + 1) * SECTOR - start % SECTOR)
    }

    /// A write into a compressed cluster: decompress, patch, store it again uncompressed and drop
    /// the references to the compressed bytes.
    fn rewrite_compressed(
        &mut self,
        file: &File,
        vc: u64,
        entry: u64,
        off: usize,
        piece: &[u8],
    ) -> io::Result<()> {
        let (start, len) = self.parse_descriptor(entry);
        let mut compressed = vec![0u8; len as usize];
        self.read_host(file, start, &mut compressed)?;
        let mut plain = vec![0u8; self.cs as usize];
        let mut inflater = Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
        inflater
            .decompress(&compressed, &mut plain, FlushDecompress::Finish)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("cannot inflate compressed cluster at host offset {start}: {e}"),
                )
            })?;
        if inflater.total_out() != self.cs {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "compressed cluster at host offset {start} inflates to {} bytes, not {}",
                    inflater.total_out(),
                    self.cs
                ),
            ));
        }
        plain[off..off + piece.len()].copy_from_slice(piece);
        for c in start / self.cs..=(start + len - 1) / self.cs {
            let rc = &mut self.refcounts[c as usize];
            *rc = rc.checked_sub(1).ok_or_else(|| {
                io::Error::other(format!(
                    "refcount of host cluster {c} would drop below zero"
                ))
            })?;
        }
        if is_zero(&plain) {
            self.set_l2_entry(vc, 0);
            return Ok(());
        }
        let host = self.append_cluster(file, &plain)?;
        self.set_l2_entry(vc, host | FLAG_COPIED);
        Ok(())
    }

    fn write_host(&mut self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let split = self.pending_start;
        let on_disk = (split.saturating_sub(offset) as usize).min(data.len());
        if on_disk > 0 {
            file.write_all_at(&data[..on_disk], offset)?;
        }
        if on_disk < data.len() {
            let at = (offset + on_disk as u64 - split) as usize;
            let rest = &data[on_disk..];
            self.pending[at..at + rest.len()].copy_from_slice(rest);
        }
        Ok(())
    }

    fn read_host(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let split = self.pending_start;
        let on_disk = (split.saturating_sub(offset) as usize).min(buf.len());
        if on_disk > 0 {
            file.read_exact_at(&mut buf[..on_disk], offset)?;
        }
        if on_disk < buf.len() {
            let at = (offset + on_disk as u64 - split) as usize;
            let n = buf.len() - on_disk;
            buf[on_disk..].copy_from_slice(&self.pending[at..at + n]);
        }
        Ok(())
    }

    fn maybe_flush(&mut self, file: &File) -> io::Result<()> {
        if self.pending.len() >= APPEND_FLUSH {
            self.flush_pending(file)?;
        }
        Ok(())
    }

    fn flush_pending(&mut self, file: &File) -> io::Result<()> {
        if !self.pending.is_empty() {
            file.write_all_at(&self.pending, self.pending_start)?;
            start_writeback(file, self.pending_start, self.pending.len() as u64);
            self.pending_start += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }

    fn finish(&mut self, file: &File) -> io::Result<Qcow2Counts> {
        let cs = self.cs;
        // Partially written clusters, in guest order.
        let mut cached = std::mem::take(&mut self.cache);
        cached.sort_by_key(|c| c.index);
        for c in cached {
            self.store_new(file, c.index, &c.data)?;
        }

        let mut counts = Qcow2Counts::default();
        let mut l1 = vec![0u64; self.l1_size as usize];
        let mut l2_count = 0u64;
        for (i, slot) in l1.iter_mut().enumerate() {
            let Some(table) = self.l2_tables[i].take() else {
                continue;
            };
            let mut bytes = Vec::with_capacity(cs as usize);
            for &e in table.iter() {
                if e & FLAG_COMPRESSED != 0 {
                    counts.compressed += 1;
                } else if e != 0 {
                    counts.data += 1;
                }
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            *slot = self.append_cluster(file, &bytes)? | FLAG_COPIED;
            l2_count += 1;
        }

        let l1_offset = if l1.is_empty() {
            0
        } else {
            let offset = self.next_cluster * cs;
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            for chunk in bytes.chunks(cs as usize) {
                self.append_cluster(file, chunk)?;
            }
            offset
        };

        // Refcount blocks and table go last and count themselves: grow both until they cover
        // every cluster including their own.
        let per_block = cs / 2;
        let base = self.next_cluster;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = base + blocks + table_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks <= blocks && need_table <= table_clusters {
                break;
            }
            blocks = blocks.max(need_blocks);
            table_clusters = table_clusters.max(need_table);
        }
        let mut refcounts = self.refcounts.clone();
        refcounts.resize((base + blocks + table_clusters) as usize, 1);
        for b in 0..blocks {
            let first = (b * per_block) as usize;
            let last = (first + per_block as usize).min(refcounts.len());
            let bytes: Vec<u8> = refcounts[first.min(last)..last]
                .iter()
                .flat_map(|r| r.to_be_bytes())
                .collect();
            self.append_cluster(file, &bytes)?;
        }
        let table_offset = self.next_cluster * cs;
        let table: Vec<u8> = (0..blocks)
            .flat_map(|b| ((base + b) * cs).to_be_bytes())
            .collect();
        for i in 0..table_clusters as usize {
            let from = (i * cs as usize).min(table.len());
            let to = (from + cs as usize).min(table.len());
            self.append_cluster(file, &table[from..to])?;
        }
        self.flush_pending(file)?;

        let mut header = vec![0u8; SECTOR as usize];
        let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &QCOW2_MAGIC.to_be_bytes());
        put(4, &QCOW2_VERSION.to_be_bytes());
        // 8: backing_file_offset, 16: backing_file_size: none.
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        // 32: crypt_method none.
        put(36, &(self.l1_size as u32).to_be_bytes());
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(56, &(table_clusters as u32).to_be_bytes());
        // 60: nb_snapshots, 64: snapshots_offset, 72..96: feature bits: all zero.
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // 104: compression_type 0 = deflate; then the end-of-extensions marker (zeros).
        file.write_all_at(&header, 0)?;
        file.set_len(self.next_cluster * cs)?;

        counts.metadata =
            1 + l2_count + l1.len().div_ceil(cs as usize / 8) as u64 + blocks + table_clusters;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_cluster(cs: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(cs + 64);
        let mut i = 0;
        while v.len() < cs {
            v.extend_from_slice(format!("compressible line {i}\n").as_bytes());
            i += 1;
        }
        v.truncate(cs);
        v
    }

    #[test]
    fn rewriting_a_compressed_cluster_stores_it_uncompressed_and_drops_its_references() {
        let tmp = tempfile::tempfile().unwrap();
        let mut q = Qcow2Sink::new(1 << 20, 4096, true);
        let data = text_cluster(4096);
        q.write(&tmp, 0, &data).unwrap();
        q.write(&tmp, 4096, &data).unwrap();
        let first = q.l2_entry(0);
        let second = q.l2_entry(1);
        assert_ne!(first & FLAG_COMPRESSED, 0);
        assert_ne!(second & FLAG_COMPRESSED, 0);
        // Both compressed clusters share host cluster 1.
        let (start, _) = q.parse_descriptor(second);
        assert_eq!(start / 4096, 1);
        assert_eq!(q.refcounts[1], 2);

        q.write(&tmp, 100, b"patched").unwrap();
        let entry = q.l2_entry(0);
        assert_eq!(entry & FLAG_COMPRESSED, 0);
        assert_ne!(entry & FLAG_COPIED, 0);
        assert_eq!(q.refcounts[1], 1);
        let mut back = vec![0u8; 4096];
        q.read_host(&tmp, entry & OFFSET_MASK, &mut back).unwrap();
        let mut expected = data.clone();
        expected[100..107].copy_from_slice(b"patched");
        assert_eq!(back, expected);
    }

    #[test]
    fn partial_writes_wait_in_the_cache_until_the_cluster_is_full() {
        let tmp = tempfile::tempfile().unwrap();
        let mut q = Qcow2Sink::new(1 << 20, 4096, false);
        q.write(&tmp, 8192 + 2048, &[7u8; 2048]).unwrap();
        assert_eq!(q.l2_entry(2), 0);
        assert_eq!(q.cache.len(), 1);
        q.write(&tmp, 8192, &[9u8; 2048]).unwrap();
        assert!(q.cache.is_empty());
        assert_eq!(q.l2_entry(2), 4096 | FLAG_COPIED);
        // Zeros into an unallocated cluster allocate nothing.
        q.write(&tmp, 0, &[0u8; 4096]).unwrap();
        q.write(&tmp, 4096 + 5, &[0u8; 100]).unwrap();
        assert_eq!(q.l2_entry(0), 0);
        assert!(q.cache.is_empty());
    }

    #[test]
    fn coverage_merges_ranges() {
        let mut c = CachedCluster {
            index: 0,
            data: Vec::new(),
            covered: vec![(10, 20)],
            last_use: 0,
        };
        c.cover(30, 40);
        c.cover(0, 5);
        assert_eq!(c.covered, vec![(0, 5), (10, 20), (30, 40)]);
        c.cover(5, 30);
        assert_eq!(c.covered, vec![(0, 40)]);
        assert!(c.is_full(40));
        assert!(!c.is_full(41));
    }
}
