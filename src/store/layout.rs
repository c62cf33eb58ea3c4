//! An OCI image layout directory (`oci:/path/to/dir:tag`): `oci-layout`, `index.json` and
//! `blobs/sha256/<hex>`, per the OCI image-spec "image-layout". Tags are the
//! `org.opencontainers.image.ref.name` annotation of the index entries; kiln stores an image's
//! signature manifest under the ref name `sha256-<hex>.sig` like in a registry.

use super::{Descriptor, StoreError};
use crate::digest::Digest256;
use crate::home::write_atomic;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Annotation that names a tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image layout directory.
pub struct OciLayout {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

fn io_err(what: &str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    }
}

impl OciLayout {
    /// Open a layout; with `create`, make the directory and its `oci-layout`/`index.json` if
    /// missing.
    pub fn open(dir: &Path, create: bool) -> Result<OciLayout, StoreError> {
        let layout = OciLayout {
            dir: dir.to_path_buf(),
        };
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            if !create {
                return Err(StoreError::Layout {
                    dir: dir.into(),
                    reason: "no oci-layout file: not an OCI image layout".into(),
                });
            }
            let blobs = dir.join("blobs").join("sha256");
            fs::create_dir_all(&blobs).map_err(|e| io_err("create", &blobs, e))?;
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| io_err("write", &marker, e))?;
        }
        if !dir.join("index.json").exists() {
            if !create {
                return Err(StoreError::Layout {
                    dir: dir.into(),
                    reason: "no index.json".into(),
                });
            }
            layout.write_index(&Index {
                schema_version: 2,
                media_type: Some(super::registry::OCI_INDEX.into()),
                manifests: Vec::new(),
            })?;
        }
        Ok(layout)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &Digest256) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    pub fn blob_exists(&self, digest: &Digest256) -> Option<u64> {
        fs::metadata(self.blob_path(digest)).ok().map(|m| m.len())
    }

    /// Stream a blob in, hashing as it goes; it lands under its digest only if the bytes match.
    pub fn put_blob(&self, digest: &Digest256, reader: &mut dyn Read) -> Result<u64, StoreError> {
        let dest = self.blob_path(digest);
        let dir = self.dir.join("blobs").join("sha256");
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)
            .map_err(|e| io_err("create a temp file in", &dir, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = super::registry::read_full(reader, &mut buf)
                .map_err(|e| io_err("read blob for", &dest, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| io_err("write", tmp.path(), e))?;
            total += n as u64;
        }
        let actual = Digest256::from_sha256(&hasher.finalize());
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                what: "image file (it changed while being copied)".into(),
                expected: digest.clone(),
                actual,
            });
        }
        tmp.persist(&dest)
            .map_err(|e| io_err("rename into", &dest, e.error))?;
        Ok(total)
    }

    pub fn put_small_blob(&self, bytes: &[u8]) -> Result<Digest256, StoreError> {
        let digest = Digest256::of(bytes);
        if self.blob_exists(&digest).is_none() {
            let p = self.blob_path(&digest);
            write_atomic(&p, bytes).map_err(|e| io_err("write", &p, e))?;
        }
        Ok(digest)
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let p = self.dir.join("index.json");
        let bytes = fs::read(&p).map_err(|e| io_err("read", &p, e))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Layout {
            dir: self.dir.clone(),
            reason: format!("index.json is not an OCI index: {e}"),
        })
    }

    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let p = self.dir.join("index.json");
        let bytes = serde_json::to_vec(index).map_err(|e| StoreError::Layout {
            dir: self.dir.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&p, &bytes).map_err(|e| io_err("write", &p, e))
    }

    /// Store manifest bytes as a blob and point `tag` at them in `index.json` (replacing what the
    /// tag pointed at before).
    pub fn put_manifest(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
        artifact_type: Option<&str>,
    ) -> Result<Digest256, StoreError> {
        let digest = self.put_small_blob(bytes)?;
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(Descriptor {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            artifact_type: artifact_type.map(str::to_string),
            annotations: BTreeMap::from([(REF_NAME.to_string(), tag.to_string())]),
        });
        self.write_index(&index)?;
        Ok(digest)
    }

    /// Manifest bytes by tag or `sha256:` digest, with the media type the index gives; `None`
    /// when absent.
    pub fn get_manifest(&self, reference: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let index = self.read_index()?;
        let found = index.manifests.iter().find(|d| {
            d.digest.as_str() == reference
                || d.annotations.get(REF_NAME).map(String::as_str) == Some(reference)
        });
        let (digest, media) = match (found, Digest256::parse(reference)) {
            (Some(d), _) => (d.digest.clone(), d.media_type.clone()),
            (None, Some(d)) if self.blob_exists(&d).is_some() => {
                (d, super::registry::OCI_MANIFEST.to_string())
            }
            _ => return Ok(None),
        };
        let p = self.blob_path(&digest);
        let mut bytes = Vec::new();
        File::open(&p)
            .map_err(|e| io_err("open", &p, e))?
            .take(super::registry::MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io_err("read", &p, e))?;
        Ok(Some((bytes, media)))
    }

    /// Open a blob positioned at `from`.
    pub fn open_blob(&self, digest: &Digest256, from: u64) -> Result<File, StoreError> {
        let p = self.blob_path(digest);
        let mut f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::NotFound {
                    what: format!("blob {digest}"),
                    reference: format!("oci:{}", self.dir.display()),
                }
            } else {
                io_err("open", &p, e)
            }
        })?;
        f.seek(SeekFrom::Start(from))
            .map_err(|e| io_err("seek in", &p, e))?;
        Ok(f)
    }

    /// Tags (ref names) in `index.json`, sorted.
    pub fn tags(&self) -> Result<Vec<String>, StoreError> {
        let mut t: Vec<String> = self
            .read_index()?
            .manifests
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME).cloned())
            .collect();
        t.sort();
        t.dedup();
        Ok(t)
    }
}
