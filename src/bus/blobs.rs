//! Blobs and stage outputs shared across hosts: the JetStream object store bucket `kiln-blobs`
//! (content-addressed, object name = `sha256:<hex>`) in front of which sits the local
//! [`BlobStore`], the KV bucket `kiln-stages` (stage key → outputs JSON, and the build-id claims),
//! and the KV bucket `kiln-states` (the states stages hand on, `state/<digest>`, see
//! `pipeline::handoff`), which expires with the stream's history.
//!
//! Every blob fetched from the bucket is written to a temp file, its sha256 checked, and only then
//! renamed into the local store; a local blob is re-hashed before it is trusted, so a corrupted
//! file is replaced rather than used, and hashed again right before it is uploaded.
//!
//! A bucket deleted while workers run (the object store, or the KV bucket's stream) is created
//! again by the first operation that finds it gone, and the operation retried once.

use super::{Bus, BusError, nats_err};
use crate::digest::{Digest256, hash_file};
use crate::home::BlobStore;
use crate::task::blocking;
use async_nats::jetstream::{kv, object_store, stream};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Object store bucket of content-addressed blobs.
pub const BLOB_BUCKET: &str = "kiln-blobs";
/// KV bucket of stage key → outputs.
pub const STAGE_BUCKET: &str = "kiln-stages";
/// KV bucket of the states stages hand on (`state/<digest>`), kept as long as the `KILN` stream
/// keeps the messages that name them ([`super::RETENTION`]).
pub const STATE_BUCKET: &str = "kiln-states";
/// Object chunk size: below the server's default 1 MiB max_payload (headers need room too).
pub const CHUNK_SIZE: usize = 960 * 1024;

/// A blob transfer failure.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest} is not in the local store nor in the {BLOB_BUCKET} bucket")]
    NotFound { digest: Digest256 },
    #[error(
        "blob {expected} downloaded from {BLOB_BUCKET} hashes to {actual}: the bucket copy is corrupt; delete it (`nats object del {BLOB_BUCKET} {expected}`) and publish it again"
    )]
    Corrupt {
        expected: Digest256,
        actual: Digest256,
    },
    #[error("{path} changed while uploading: it hashed to {before}, the upload to {after}; retry")]
    Changed {
        path: PathBuf,
        before: Digest256,
        after: String,
    },
    #[error(
        "stage key {key:?} has characters a KV key cannot hold (allowed: letters, digits, `-_/.` and `:`)"
    )]
    BadKey { key: String },
    #[error("the record under {key} in {bucket} is not JSON")]
    BadOutputs {
        bucket: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { what, path, source }
}

/// Create the blob bucket if missing, with [`Bus::replicas`] replicas, or scale its stream up
/// to them (idempotent; never scales down).
pub(crate) async fn ensure_object_store(bus: &Bus) -> Result<object_store::ObjectStore, BusError> {
    bus.patiently(|| ensure_object_store_once(bus)).await
}

async fn ensure_object_store_once(bus: &Bus) -> Result<object_store::ObjectStore, BusError> {
    let js = bus.jetstream();
    if let Ok(store) = js.get_object_store(BLOB_BUCKET).await {
        bus.scale_up(&format!("OBJ_{BLOB_BUCKET}")).await?;
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: BLOB_BUCKET.to_string(),
        description: Some("kiln content-addressed blobs (name = sha256:<hex>)".into()),
        storage: stream::StorageType::File,
        num_replicas: bus.replicas(),
        ..Default::default()
    })
    .await
    .map_err(|e| {
        bus.unavailable(
            &format!("OBJ_{BLOB_BUCKET}"),
            format!("create object store bucket {BLOB_BUCKET}"),
            e,
        )
    })
}

/// Whether a NATS error says the bucket (its stream) is not there: deleted, or never made.
fn bucket_missing(e: &impl std::fmt::Display) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["stream not found", "bucket not found", "no responders"]
        .iter()
        .any(|m| text.contains(m))
}

/// Whether an operation on the bucket backed by `stream` failed because the bucket is gone: the
/// error says so, or (a direct get to a missing stream only times out) the server says the
/// stream does not exist.
async fn bucket_gone(bus: &Bus, stream: &str, e: &impl std::fmt::Display) -> bool {
    if bucket_missing(e) {
        return true;
    }
    match bus.jetstream().get_stream(stream).await {
        Ok(_) => false,
        Err(e) => bucket_missing(&e),
    }
}

/// sha256 of the file at `path`, streamed.
fn hash_path(path: &Path) -> Result<Digest256, BlobError> {
    let mut f = std::fs::File::open(path).map_err(io_err("open", path))?;
    let (digest, _len) = hash_file(&mut f).map_err(io_err("read", path))?;
    Ok(digest)
}

impl From<tokio::task::JoinError> for BlobError {
    fn from(e: tokio::task::JoinError) -> BlobError {
        BlobError::Bus(BusError::Nats {
            what: "run a blocking file task".into(),
            message: e.to_string(),
        })
    }
}

/// The blob bucket with a local store in front of it.
#[derive(Clone)]
pub struct Blobs {
    bus: Bus,
    /// Replaced when the bucket was deleted and made again.
    remote: std::sync::Arc<std::sync::Mutex<object_store::ObjectStore>>,
    local: BlobStore,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

/// What this process already checked, so a cached stage does not hash every input again or ask
/// the bucket about every output again.
#[derive(Default)]
struct Seen {
    /// Local blobs whose content was hashed, with the length and mtime it had then.
    verified: std::collections::HashMap<Digest256, (u64, std::time::SystemTime)>,
    /// Blobs the bucket is known to hold (objects are content-addressed and never rewritten).
    remote: std::collections::HashSet<Digest256>,
    /// When the bucket that [`Seen::remote`] describes was created: a bucket deleted and made
    /// again holds none of them.
    bucket_created: Option<i128>,
}

/// Length and mtime of a file, to tell whether it changed since it was hashed.
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Blobs {
    /// Open (creating if needed) the bucket, with `local` as this host's store.
    pub async fn open(bus: &Bus, local: BlobStore) -> Result<Blobs, BlobError> {
        Ok(Blobs {
            bus: bus.clone(),
            remote: std::sync::Arc::new(std::sync::Mutex::new(ensure_object_store(bus).await?)),
            local,
            seen: Default::default(),
        })
    }

    /// The bucket as last opened.
    fn remote(&self) -> object_store::ObjectStore {
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The bucket is gone (deleted while workers run): make it again. What this process knew
    /// the bucket held is forgotten.
    async fn recreate(&self) -> Result<(), BusError> {
        tracing::warn!("the {BLOB_BUCKET} object store bucket is gone: creating it again");
        let store = ensure_object_store(&self.bus).await?;
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = store;
        let mut seen = self.seen();
        seen.remote.clear();
        seen.bucket_created = None;
        Ok(())
    }

    /// Whether `e`, from an operation on the bucket, means the bucket is gone.
    async fn gone(&self, e: &impl std::fmt::Display) -> bool {
        bucket_gone(&self.bus, &format!("OBJ_{BLOB_BUCKET}"), e).await
    }

    /// Make sure what this process remembers the bucket holds is still true: the bucket is
    /// there (made again when it is gone) and is the one it was (not deleted and made again
    /// since, by this or another host). One request; a worker calls it before it uploads a
    /// stage's outputs.
    pub async fn revalidate(&self) -> Result<(), BlobError> {
        let name = format!("OBJ_{BLOB_BUCKET}");
        let created = match self.bus.jetstream().get_stream(&name).await {
            Ok(stream) => stream.cached_info().created.unix_timestamp_nanos(),
            Err(e) if bucket_missing(&e) => {
                self.recreate().await?;
                return Ok(());
            }
            Err(e) => return Err(nats_err(format!("read stream {name}"))(e).into()),
        };
        let mut seen = self.seen();
        if seen.bucket_created != Some(created) {
            if seen.bucket_created.is_some() {
                tracing::warn!(
                    "the {BLOB_BUCKET} bucket was made again: its blobs are uploaded again"
                );
            }
            seen.remote.clear();
            seen.bucket_created = Some(created);
        }
        Ok(())
    }

    pub fn local(&self) -> &BlobStore {
        &self.local
    }

    /// Store the file at `path` locally and in the bucket (skipped when the bucket has it).
    pub async fn put_blob(&self, path: &Path) -> Result<Digest256, BlobError> {
        let local = self.local.clone();
        let src = path.to_path_buf();
        let (digest, _len) = blocking(move || {
            let mut f = std::fs::File::open(&src).map_err(io_err("open", &src))?;
            local.put(&mut f).map_err(io_err("store", &src))
        })
        .await?;
        if self.remote_has(&digest).await {
            return Ok(digest);
        }
        // Upload from the source file, not the store copy: a damaged store file must not spread.
        self.upload(path, digest).await
    }

    /// Upload the file at `path`, whose content hashed to `digest`, to the bucket (made again
    /// when it is gone), and check the digest the server computed.
    async fn upload(&self, path: &Path, digest: Digest256) -> Result<Digest256, BlobError> {
        let meta = || object_store::ObjectMetadata {
            name: digest.to_string(),
            chunk_size: Some(CHUNK_SIZE),
            ..Default::default()
        };
        let open = || async {
            tokio::fs::File::open(path)
                .await
                .map_err(io_err("open", path))
        };
        let mut file = open().await?;
        let info = match self.remote().put(meta(), &mut file).await {
            Err(e) if self.gone(&e).await => {
                self.recreate().await?;
                let mut file = open().await?;
                self.remote().put(meta(), &mut file).await
            }
            r => r,
        }
        .map_err(|e| nats_err(format!("upload {digest} to {BLOB_BUCKET}"))(e))?;
        // The object store records `SHA-256=<base64url>`; it must match what we hashed.
        let expected = format!(
            "SHA-256={}",
            base64_url(&hex::decode(digest.hex()).unwrap_or_default())
        );
        if let Some(got) = info.digest
            && got != expected
        {
            let _ = self.remote().delete(digest.as_str()).await;
            return Err(BlobError::Changed {
                path: path.to_path_buf(),
                before: digest,
                after: got,
            });
        }
        self.seen().remote.insert(digest.clone());
        Ok(digest)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make sure a blob stored locally is also in the bucket. Its bytes are hashed right before
    /// the upload (no memoized hash): a damaged copy is removed, not uploaded, and reported as
    /// [`BlobError::NotFound`] (it must be fetched or made again).
    pub async fn publish_local(&self, digest: &Digest256) -> Result<(), BlobError> {
        if self.remote_has(digest).await {
            return Ok(());
        }
        let path = self.local.path(digest);
        let local = self.local.clone();
        let d = digest.clone();
        let state = blocking(move || local.check(&d).map_err(io_err("hash", &path))).await?;
        if state != crate::home::BlobState::Intact {
            self.seen().verified.remove(digest);
            return Err(BlobError::NotFound {
                digest: digest.clone(),
            });
        }
        let path = self.local.path(digest);
        self.upload(&path, digest.clone()).await?;
        Ok(())
    }

    /// The blob's path in the local store: used when present and intact, else downloaded from
    /// the bucket to a temp file, checked and renamed into the store.
    pub async fn get_blob(&self, digest: &Digest256) -> Result<PathBuf, BlobError> {
        let dest = self.local.path(digest);
        if dest.is_file() {
            let before = stamp(&dest);
            if before.is_some() && self.seen().verified.get(digest) == before.as_ref() {
                return Ok(dest);
            }
            let d = dest.clone();
            let actual = blocking(move || hash_path(&d)).await?;
            if &actual == digest {
                if let Some(s) = before {
                    self.seen().verified.insert(digest.clone(), s);
                }
                return Ok(dest);
            }
            tracing::warn!(
                "local blob {} hashes to {actual}: discarding it and fetching it again",
                dest.display()
            );
            let _ = std::fs::remove_file(&dest);
        }
        let mut object = match self.remote().get(digest.as_str()).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                return Err(BlobError::NotFound {
                    digest: digest.clone(),
                });
            }
            Err(e) if self.gone(&e).await => {
                // A new, empty bucket cannot hold it either.
                self.recreate().await?;
                return Err(BlobError::NotFound {
                    digest: digest.clone(),
                });
            }
            Err(e) => {
                return Err(nats_err(format!("download {digest} from {BLOB_BUCKET}"))(e).into());
            }
        };
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err("create", &dir))?;
        let tmp = crate::home::temp_file_in(&dir).map_err(io_err("create a temp file in", &dir))?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = object
                .read(&mut buf)
                .await
                .map_err(|e| nats_err(format!("download {digest} from {BLOB_BUCKET}"))(e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .await
                .map_err(io_err("write", &tmp_path))?;
        }
        file.sync_all().await.map_err(io_err("sync", &tmp_path))?;
        drop(file);
        let actual = Digest256::from_sha256(&hasher.finalize());
        if &actual != digest {
            return Err(BlobError::Corrupt {
                expected: digest.clone(),
                actual,
            });
        }
        tmp_path.persist(&dest).map_err(|e| BlobError::Io {
            what: "rename into the store",
            path: dest.clone(),
            source: e.error,
        })?;
        if let Some(s) = stamp(&dest) {
            self.seen().verified.insert(digest.clone(), s);
        }
        self.seen().remote.insert(digest.clone());
        Ok(dest)
    }

    /// Every object in the bucket: its name, size and modification time (Unix seconds). For
    /// collections.
    pub async fn remote_objects(&self) -> Result<Vec<(String, u64, i64)>, BlobError> {
        use futures::StreamExt;
        let mut list = self
            .remote()
            .list()
            .await
            .map_err(nats_err(format!("list the objects of {BLOB_BUCKET}")))?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(nats_err(format!("list the objects of {BLOB_BUCKET}")))?;
            if !info.deleted {
                let modified = info.modified.map_or(0, |t| t.unix_timestamp());
                out.push((info.name, info.size as u64, modified));
            }
        }
        Ok(out)
    }

    /// Remove an object from the bucket (its chunks too).
    pub async fn remove_remote(&self, name: &str) -> Result<(), BlobError> {
        self.remote()
            .delete(name)
            .await
            .map_err(nats_err(format!("delete {name} from {BLOB_BUCKET}")))?;
        if let Some(d) = Digest256::parse(name) {
            self.seen().remote.remove(&d);
        }
        Ok(())
    }

    /// An object's bytes, when it has at most `max` of them (a manifest); None otherwise.
    pub async fn read_remote(&self, digest: &Digest256, max: u64) -> Option<Vec<u8>> {
        let info = self.remote().info(digest.as_str()).await.ok()?;
        if info.deleted || info.size as u64 > max {
            return None;
        }
        let mut object = self.remote().get(digest.as_str()).await.ok()?;
        let mut bytes = Vec::with_capacity(info.size);
        object.read_to_end(&mut bytes).await.ok()?;
        Some(bytes)
    }

    /// Ask the bucket whether it has the blob now (not what this process remembers: a collection
    /// may have removed it since). When it does not, the files of `listed` (a manifest's) are
    /// forgotten too, so they are asked about again.
    pub async fn remote_has_now(&self, digest: &Digest256, listed: &[Digest256]) -> bool {
        let has = self
            .remote()
            .info(digest.as_str())
            .await
            .is_ok_and(|i| !i.deleted);
        let mut seen = self.seen();
        if has {
            seen.remote.insert(digest.clone());
        } else {
            seen.remote.remove(digest);
            for d in listed {
                seen.remote.remove(d);
            }
        }
        has
    }

    /// True when the bucket has the blob (asked once per process: objects are never rewritten).
    pub async fn remote_has(&self, digest: &Digest256) -> bool {
        if self.seen().remote.contains(digest) {
            return true;
        }
        match self.remote().info(digest.as_str()).await {
            // A deleted object keeps its info, marked deleted.
            Ok(info) if info.deleted => false,
            Ok(_) => {
                self.seen().remote.insert(digest.clone());
                true
            }
            Err(e) => {
                if self.gone(&e).await
                    && let Err(e) = self.recreate().await
                {
                    tracing::warn!("{}", crate::error::Chain(&e));
                }
                false
            }
        }
    }
}

/// Base64 URL-safe with padding, as the object store writes digests.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A KV bucket of JSON records: `kiln-stages` (stage key → outputs JSON) or `kiln-states`.
#[derive(Clone)]
pub struct StageOutputs {
    bus: Bus,
    /// Replaced when the bucket was deleted and made again.
    kv: std::sync::Arc<std::sync::Mutex<kv::Store>>,
    bucket: &'static str,
}

impl std::fmt::Debug for StageOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageOutputs").finish_non_exhaustive()
    }
}

/// The KV backing stream of `bucket`, created by hand: `create_key_value` fails against NATS 2.9.
fn kv_stream_config(bucket: &'static str) -> stream::Config {
    if bucket == STATE_BUCKET {
        // Read through the stream's leader, never a replica: a worker reads a state moments
        // after the stage before it wrote it, and a replica that has not applied that write yet
        // would have the `completed` message refused as naming a state nobody recorded.
        stream::Config {
            allow_direct: false,
            ..kv_bucket_stream(
                bucket,
                "kiln states handed on: state/<digest> -> state",
                super::RETENTION,
            )
        }
    } else {
        kv_bucket_stream(
            bucket,
            "kiln stage key -> outputs",
            std::time::Duration::ZERO,
        )
    }
}

/// The backing stream of a KV bucket as NATS lays one out (one value per key, rollups,
/// direct gets), created by hand because `create_key_value` fails against NATS 2.9. `max_age`
/// zero keeps values for ever. Its replicas are set by `Bus::ensure_stream` (the cluster's size,
/// never lowered).
pub(crate) fn kv_bucket_stream(
    bucket: &str,
    description: &str,
    max_age: std::time::Duration,
) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Open the KV bucket `bucket` without creating it (readers may not create streams): `None`
/// while nobody has made it.
pub(crate) async fn existing_kv(bus: &Bus, bucket: &str) -> Result<Option<kv::Store>, BusError> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let js = bus.jetstream();
    let what =
        || format!("open KV bucket {bucket} (may this NATS user read it? see docs/nats-roles.md)");
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(_) => {}
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(nats_err(what())(e)),
    }
    js.get_key_value(bucket)
        .await
        .map(Some)
        .map_err(nats_err(what()))
}

/// The KV key of a stage key: `:` becomes `=` (a digest `sha256:<hex>` is a common key), other
/// characters must already be valid.
fn kv_key(key: &str) -> Result<String, BlobError> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_/.:".contains(&b));
    if !ok {
        return Err(BlobError::BadKey {
            key: key.to_string(),
        });
    }
    Ok(key.replace(':', "="))
}

impl StageOutputs {
    /// Open (creating if needed) the `kiln-stages` bucket.
    pub async fn open(bus: &Bus) -> Result<StageOutputs, BusError> {
        Self::open_bucket(bus, STAGE_BUCKET).await
    }

    /// Open (creating if needed) `bucket` ([`STAGE_BUCKET`] or [`STATE_BUCKET`]).
    pub async fn open_bucket(bus: &Bus, bucket: &'static str) -> Result<StageOutputs, BusError> {
        let kv = Self::ensure(bus, bucket).await?;
        Ok(Self::with_store(bus, kv, bucket))
    }

    /// Open `bucket` without creating it, for readers that may not create streams (submitters
    /// reading a build's final state).
    pub async fn open_existing(bus: &Bus, bucket: &'static str) -> Result<StageOutputs, BusError> {
        let kv = bus
            .jetstream()
            .get_key_value(bucket)
            .await
            .map_err(nats_err(format!(
                "open KV bucket {bucket} (do the workers run? they create it)"
            )))?;
        Ok(Self::with_store(bus, kv, bucket))
    }

    fn with_store(bus: &Bus, kv: kv::Store, bucket: &'static str) -> StageOutputs {
        StageOutputs {
            bus: bus.clone(),
            kv: std::sync::Arc::new(std::sync::Mutex::new(kv)),
            bucket,
        }
    }

    async fn ensure(bus: &Bus, bucket: &'static str) -> Result<kv::Store, BusError> {
        bus.ensure_stream(kv_stream_config(bucket)).await?;
        bus.jetstream()
            .get_key_value(bucket)
            .await
            .map_err(nats_err(format!("open KV bucket {bucket}")))
    }

    fn kv(&self) -> kv::Store {
        self.kv.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The bucket is gone (deleted while workers run): make it again.
    async fn recreate(&self) -> Result<(), BusError> {
        tracing::warn!("the {} KV bucket is gone: creating it again", self.bucket);
        let kv = Self::ensure(&self.bus, self.bucket).await?;
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = kv;
        Ok(())
    }

    /// Whether `e`, from an operation on the bucket, means the bucket is gone.
    async fn gone(&self, e: &impl std::fmt::Display) -> bool {
        bucket_gone(&self.bus, &format!("KV_{}", self.bucket), e).await
    }

    /// Forget a key's record (a stage record whose blobs are lost).
    pub async fn remove(&self, key: &str) -> Result<(), BlobError> {
        let k = kv_key(key)?;
        match self.kv().purge(&k).await {
            Err(e) if self.gone(&e).await => {
                // A new, empty bucket holds no record to forget.
                self.recreate().await?;
                Ok(())
            }
            r => r,
        }
        .map_err(nats_err(format!("delete {key} from {}", self.bucket)))?;
        Ok(())
    }

    /// The record under a key.
    pub async fn get(&self, key: &str) -> Result<Option<serde_json::Value>, BlobError> {
        let k = kv_key(key)?;
        let got = match self.kv().get(&k).await {
            Err(e) if self.gone(&e).await => {
                self.recreate().await?;
                Ok(None)
            }
            r => r,
        };
        let Some(bytes) = got.map_err(nats_err(format!("read {key} from {}", self.bucket)))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| BlobError::BadOutputs {
                bucket: self.bucket,
                key: key.to_string(),
                source,
            })
    }

    /// Every record: its key (as [`StageOutputs::get`] takes it), when it was written (Unix
    /// seconds) and its JSON (null when not JSON). For collections.
    pub async fn entries(&self) -> Result<Vec<(String, i64, serde_json::Value)>, BlobError> {
        use futures::StreamExt;
        let what = || format!("list the records of {}", self.bucket);
        let kv = self.kv();
        let mut keys = kv.keys().await.map_err(nats_err(what()))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(nats_err(what()))?);
        }
        let mut out = Vec::new();
        for k in names {
            let Some(entry) = kv.entry(k.clone()).await.map_err(nats_err(what()))? else {
                continue;
            };
            let value = serde_json::from_slice(&entry.value).unwrap_or(serde_json::Value::Null);
            out.push((k.replace('=', ":"), entry.created.unix_timestamp(), value));
        }
        Ok(out)
    }

    /// Record a key's JSON.
    pub async fn put(&self, key: &str, outputs: &serde_json::Value) -> Result<(), BlobError> {
        let k = kv_key(key)?;
        let bytes = serde_json::to_vec(outputs).map_err(|source| BlobError::BadOutputs {
            bucket: self.bucket,
            key: key.to_string(),
            source,
        })?;
        let bytes: bytes::Bytes = bytes.into();
        match self.kv().put(&k, bytes.clone()).await {
            Err(e) if self.gone(&e).await => {
                self.recreate().await?;
                self.kv().put(&k, bytes).await
            }
            r => r,
        }
        .map_err(nats_err(format!("write {key} to {}", self.bucket)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_base64() {
        assert_eq!(kv_key("disk/sha256:ab").unwrap(), "disk/sha256=ab");
        assert!(kv_key("a b").is_err());
        assert!(kv_key("").is_err());
        assert_eq!(base64_url(b"hello"), "aGVsbG8=");
        assert_eq!(base64_url(b"\xfb\xff"), "-_8=");
        assert_eq!(base64_url(b"abc"), "YWJj");
    }
}
