//! Blobs and stage outputs shared across hosts: the JetStream object store bucket `kiln-blobs`
//! (content-addressed, object name = `sha256:<hex>`) in front of which sits the local
//! [`BlobStore`], and the KV bucket `kiln-stages` (stage key → outputs JSON).
//!
//! Every blob fetched from the bucket is written to a temp file, its sha256 checked, and only then
//! renamed into the local store; a local blob is re-hashed before it is trusted, so a corrupted
//! file is replaced rather than used.

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
    #[error("stage outputs under {key} in {STAGE_BUCKET} are not JSON")]
    BadOutputs {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { what, path, source }
}

/// Create the blob bucket if missing (idempotent).
pub(crate) async fn ensure_object_store(bus: &Bus) -> Result<object_store::ObjectStore, BusError> {
    let js = bus.jetstream();
    if let Ok(store) = js.get_object_store(BLOB_BUCKET).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: BLOB_BUCKET.to_string(),
        description: Some("kiln content-addressed blobs (name = sha256:<hex>)".into()),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(nats_err(format!(
        "create object store bucket {BLOB_BUCKET}"
    )))
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
    remote: object_store::ObjectStore,
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
            remote: ensure_object_store(bus).await?,
            local,
            seen: Default::default(),
        })
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
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(io_err("open", path))?;
        let meta = object_store::ObjectMetadata {
            name: digest.to_string(),
            chunk_size: Some(CHUNK_SIZE),
            ..Default::default()
        };
        let info = self
            .remote
            .put(meta, &mut file)
            .await
            .map_err(|e| nats_err(format!("upload {digest} to {BLOB_BUCKET}"))(e))?;
        // The object store records `SHA-256=<base64url>`; it must match what we hashed.
        let expected = format!(
            "SHA-256={}",
            base64_url(&hex::decode(digest.hex()).unwrap_or_default())
        );
        if let Some(got) = info.digest
            && got != expected
        {
            let _ = self.remote.delete(digest.as_str()).await;
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

    /// Make sure the local store holds a blob already stored locally is also in the bucket.
    pub async fn publish_local(&self, digest: &Digest256) -> Result<(), BlobError> {
        if self.remote_has(digest).await {
            return Ok(());
        }
        let path = self.local.path(digest);
        let got = self.put_blob(&path).await?;
        if &got != digest {
            return Err(BlobError::Changed {
                path,
                before: digest.clone(),
                after: got.to_string(),
            });
        }
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
        let mut object = match self.remote.get(digest.as_str()).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
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
            .remote
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
        self.remote
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
        let info = self.remote.info(digest.as_str()).await.ok()?;
        if info.deleted || info.size as u64 > max {
            return None;
        }
        let mut object = self.remote.get(digest.as_str()).await.ok()?;
        let mut bytes = Vec::with_capacity(info.size);
        object.read_to_end(&mut bytes).await.ok()?;
        Some(bytes)
    }

    /// Ask the bucket whether it has the blob now (not what this process remembers: a collection
    /// may have removed it since). When it does not, the files of `listed` (a manifest's) are
    /// forgotten too, so they are asked about again.
    pub async fn remote_has_now(&self, digest: &Digest256, listed: &[Digest256]) -> bool {
        let has = self
            .remote
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
        let has = self
            .remote
            .info(digest.as_str())
            .await
            .is_ok_and(|i| !i.deleted);
        if has {
            self.seen().remote.insert(digest.clone());
        }
        has
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

/// The `kiln-stages` KV bucket: stage key → outputs JSON.
#[derive(Clone)]
pub struct StageOutputs {
    kv: kv::Store,
}

impl std::fmt::Debug for StageOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageOutputs").finish_non_exhaustive()
    }
}

/// The KV backing stream, created by hand: `create_key_value` fails against NATS 2.9.
fn kv_stream_config() -> stream::Config {
    stream::Config {
        name: format!("KV_{STAGE_BUCKET}"),
        description: Some("kiln stage key -> outputs".into()),
        subjects: vec![format!("$KV.{STAGE_BUCKET}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    }
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
    /// Open (creating if needed) the bucket.
    pub async fn open(bus: &Bus) -> Result<StageOutputs, BusError> {
        bus.ensure_stream(kv_stream_config()).await?;
        let kv = bus
            .jetstream()
            .get_key_value(STAGE_BUCKET)
            .await
            .map_err(nats_err(format!("open KV bucket {STAGE_BUCKET}")))?;
        Ok(StageOutputs { kv })
    }

    /// The outputs recorded for a stage key.
    pub async fn get(&self, key: &str) -> Result<Option<serde_json::Value>, BlobError> {
        let k = kv_key(key)?;
        let Some(bytes) = self
            .kv
            .get(k)
            .await
            .map_err(nats_err(format!("read {key} from {STAGE_BUCKET}")))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| BlobError::BadOutputs {
                key: key.to_string(),
                source,
            })
    }

    /// Every record: its stage key (as [`StageOutputs::get`] takes it), when it was written
    /// (Unix seconds) and its outputs (null when not JSON). For collections.
    pub async fn entries(&self) -> Result<Vec<(String, i64, serde_json::Value)>, BlobError> {
        use futures::StreamExt;
        let what = || format!("list the records of {STAGE_BUCKET}");
        let mut keys = self.kv.keys().await.map_err(nats_err(what()))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(nats_err(what()))?);
        }
        let mut out = Vec::new();
        for k in names {
            let Some(entry) = self.kv.entry(k.clone()).await.map_err(nats_err(what()))? else {
                continue;
            };
            let value = serde_json::from_slice(&entry.value).unwrap_or(serde_json::Value::Null);
            out.push((k.replace('=', ":"), entry.created.unix_timestamp(), value));
        }
        Ok(out)
    }

    /// Remove a stage key's record.
    pub async fn remove(&self, key: &str) -> Result<(), BlobError> {
        let k = kv_key(key)?;
        self.kv
            .purge(k)
            .await
            .map_err(nats_err(format!("delete {key} from {STAGE_BUCKET}")))?;
        Ok(())
    }

    /// Record a stage key's outputs.
    pub async fn put(&self, key: &str, outputs: &serde_json::Value) -> Result<(), BlobError> {
        let k = kv_key(key)?;
        let bytes = serde_json::to_vec(outputs).map_err(|source| BlobError::BadOutputs {
            key: key.to_string(),
            source,
        })?;
        self.kv
            .put(k, bytes.into())
            .await
            .map_err(nats_err(format!("write {key} to {STAGE_BUCKET}")))?;
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
