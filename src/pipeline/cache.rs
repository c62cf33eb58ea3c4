//! The stage cache: a stage's outputs recorded under a key that hashes the stage's name, its
//! format version and its inputs, so a stage run again with the same inputs is a lookup. Records
//! live in `$KILN_HOME/stages/<stage>/<key>.json`; the blobs they name live in the blob store.

use crate::cache::{Digest256, write_atomic};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Stage records under a cache directory.
#[derive(Debug, Clone)]
pub struct StageCache {
    root: PathBuf,
}

/// The cache key of one stage run.
pub fn stage_key(stage: &str, version: u32, inputs: &impl Serialize) -> Digest256 {
    let mut h = Sha256::new();
    h.update(b"kiln-stage\0");
    h.update(stage.as_bytes());
    h.update(b"\0");
    h.update(version.to_le_bytes());
    // serde_json writes struct fields in declaration order and maps (BTreeMap) sorted, so the
    // same inputs always give the same bytes.
    h.update(serde_json::to_vec(inputs).unwrap_or_default());
    Digest256::from_sha256(&h.finalize())
}

impl StageCache {
    pub fn new(home: &Path) -> Self {
        StageCache {
            root: home.join("stages"),
        }
    }

    fn path(&self, stage: &str, key: &Digest256) -> PathBuf {
        self.root.join(stage).join(format!("{}.json", key.hex()))
    }

    /// The recorded outputs for `key`, if any (an unreadable record counts as absent).
    pub fn get<T: DeserializeOwned>(&self, stage: &str, key: &Digest256) -> Option<T> {
        let bytes = std::fs::read(self.path(stage, key)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(stage, key = %key, "ignoring unreadable stage record: {e}");
                None
            }
        }
    }

    /// Record outputs for `key` (atomically).
    pub fn put<T: Serialize>(
        &self,
        stage: &str,
        key: &Digest256,
        outputs: &T,
    ) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(outputs).map_err(std::io::Error::other)?;
        write_atomic(&self.path(stage, key), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_inputs_and_records_round_trip() {
        let a = stage_key("disk", 1, &serde_json::json!({"x": 1}));
        assert_eq!(a, stage_key("disk", 1, &serde_json::json!({"x": 1})));
        assert_ne!(a, stage_key("disk", 2, &serde_json::json!({"x": 1})));
        assert_ne!(a, stage_key("disk", 1, &serde_json::json!({"x": 2})));
        assert_ne!(a, stage_key("rootfs", 1, &serde_json::json!({"x": 1})));
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(dir.path());
        assert!(cache.get::<u32>("disk", &a).is_none());
        cache.put("disk", &a, &42u32).unwrap();
        assert_eq!(cache.get::<u32>("disk", &a), Some(42));
    }
}
