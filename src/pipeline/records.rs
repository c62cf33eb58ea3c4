//! Stage records: a stage step's outputs recorded under a key that hashes the step's name, its
//! format version and its inputs, so a step run again with the same inputs is a lookup. The local
//! records live in `$KILN_HOME/stages/<step>/<key>.json` ([`LocalRecords`]); the blobs they name
//! live in the blob store. Workers on NATS also keep them in a shared KV bucket (see
//! `pipeline::worker`); a private bus keeps what it hands over in memory ([`MemoryRecords`]).
//! What a stage records while it runs is held back ([`HeldRecords`]) until its outputs are safely
//! stored, so a record never names a blob that is nowhere.

use crate::digest::Digest256;
use crate::home::write_atomic;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The key of one step run: SHA-256 over the step's name, its format version and the JSON of its
/// inputs.
pub fn stage_key(step: &str, version: u32, inputs: &impl Serialize) -> Digest256 {
    let mut h = Sha256::new();
    h.update(b"kiln-stage\0");
    h.update(step.as_bytes());
    h.update(b"\0");
    h.update(version.to_le_bytes());
    // serde_json writes struct fields in declaration order and maps (BTreeMap) sorted, so the
    // same inputs always give the same bytes.
    h.update(serde_json::to_vec(inputs).unwrap_or_default());
    Digest256::from_sha256(&h.finalize())
}

/// A nested part of a key (a recipe section, a machine profile) as JSON with its object keys
/// sorted, as keys have always hashed it: a struct's own field order does not count.
pub fn key_part(part: &impl Serialize) -> Value {
    serde_json::to_value(part).unwrap_or(Value::Null)
}

/// Where step results are recorded (the local records, a shared KV bucket, or memory).
pub trait StageRecords: Send + Sync {
    /// The recorded outputs for `key`, if any (an unreadable record counts as absent).
    fn get(&self, step: &str, key: &Digest256) -> Option<Value>;
    /// Record outputs for `key`.
    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()>;
    /// Forget the record of `key` (one whose blobs are lost): the step runs again next time.
    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()>;
}

/// The records a stage writes while it runs, held in memory until [`HeldRecords::commit`]: a
/// stage that fails (or whose outputs cannot be stored) leaves no record behind, and the
/// records reach the shared bucket only after every blob they name is in the object store.
/// Lookups see the held records first.
pub struct HeldRecords<R> {
    inner: R,
    held: Mutex<Vec<(String, Digest256, Value)>>,
}

impl<R: StageRecords> HeldRecords<R> {
    pub fn new(inner: R) -> Self {
        HeldRecords {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<(String, Digest256, Value)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the records go on [`HeldRecords::commit`].
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Write the held records, in the order they were made.
    pub fn commit(self) -> std::io::Result<()> {
        let held = std::mem::take(&mut *self.held());
        for (step, key, value) in held {
            self.inner.put(&step, &key, &value)?;
        }
        Ok(())
    }
}

impl<R: StageRecords> StageRecords for HeldRecords<R> {
    fn get(&self, step: &str, key: &Digest256) -> Option<Value> {
        let held = self
            .held()
            .iter()
            .rev()
            .find(|(s, k, _)| s == step && k == key)
            .map(|(_, _, v)| v.clone());
        held.or_else(|| self.inner.get(step, key))
    }

    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        self.held()
            .push((step.to_string(), key.clone(), outputs.clone()));
        Ok(())
    }

    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()> {
        self.held().retain(|(s, k, _)| !(s == step && k == key));
        self.inner.remove(step, key)
    }
}

impl<T: StageRecords + ?Sized> StageRecords for &T {
    fn get(&self, step: &str, key: &Digest256) -> Option<Value> {
        (**self).get(step, key)
    }
    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        (**self).put(step, key, outputs)
    }
    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()> {
        (**self).remove(step, key)
    }
}

impl<T: StageRecords + ?Sized> StageRecords for Box<T> {
    fn get(&self, step: &str, key: &Digest256) -> Option<Value> {
        (**self).get(step, key)
    }
    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        (**self).put(step, key, outputs)
    }
    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()> {
        (**self).remove(step, key)
    }
}

/// Step records under `$KILN_HOME/stages`.
#[derive(Debug, Clone)]
pub struct LocalRecords {
    root: PathBuf,
}

impl LocalRecords {
    pub fn new(home: &Path) -> Self {
        LocalRecords {
            root: home.join("stages"),
        }
    }

    fn path(&self, step: &str, key: &Digest256) -> PathBuf {
        self.root.join(step).join(format!("{}.json", key.hex()))
    }
}

impl StageRecords for LocalRecords {
    fn get(&self, step: &str, key: &Digest256) -> Option<Value> {
        let path = self.path(step, key);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => {
                // A hit is a use: collections remove the least recently used records first.
                crate::home::touch(&path);
                Some(v)
            }
            Err(e) => {
                tracing::warn!(step, key = %key, "ignoring unreadable stage record: {e}");
                None
            }
        }
    }

    /// Record outputs for `key` (atomically).
    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(outputs).map_err(std::io::Error::other)?;
        write_atomic(&self.path(step, key), &bytes)
    }

    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(step, key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Records kept in this process only: what one host's private bus (`kiln build`) hands from
/// stage to stage lives as long as that bus, not in the stage records.
#[derive(Debug, Clone, Default)]
pub struct MemoryRecords(Arc<Mutex<std::collections::HashMap<String, Value>>>);

impl StageRecords for MemoryRecords {
    fn get(&self, step: &str, key: &Digest256) -> Option<Value> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&format!("{step}/{key}")).cloned()
    }

    fn put(&self, step: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(format!("{step}/{key}"), outputs.clone());
        Ok(())
    }

    fn remove(&self, step: &str, key: &Digest256) -> std::io::Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&format!("{step}/{key}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_follow_inputs_and_records_round_trip() {
        let a = stage_key("disk", 1, &json!({"x": 1}));
        assert_eq!(a, stage_key("disk", 1, &json!({"x": 1})));
        assert_ne!(a, stage_key("disk", 2, &json!({"x": 1})));
        assert_ne!(a, stage_key("disk", 1, &json!({"x": 2})));
        assert_ne!(a, stage_key("rootfs", 1, &json!({"x": 1})));
        let dir = tempfile::tempdir().unwrap();
        let records = LocalRecords::new(dir.path());
        assert!(records.get("disk", &a).is_none());
        records.put("disk", &a, &json!(42)).unwrap();
        assert_eq!(records.get("disk", &a), Some(json!(42)));
        let memory = MemoryRecords::default();
        memory.put("disk", &a, &json!(7)).unwrap();
        assert_eq!(memory.get("disk", &a), Some(json!(7)));
        assert!(memory.get("rootfs", &a).is_none());
        records.remove("disk", &a).unwrap();
        assert!(records.get("disk", &a).is_none());
        records.remove("disk", &a).unwrap();
    }

    #[test]
    fn held_records_reach_the_store_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let records = LocalRecords::new(dir.path());
        let (a, b) = (stage_key("x", 1, &1), stage_key("x", 1, &2));
        let held = HeldRecords::new(&records);
        held.put("x", &a, &json!("a")).unwrap();
        assert_eq!(held.get("x", &a), Some(json!("a")));
        assert!(records.get("x", &a).is_none());
        drop(held);
        assert!(records.get("x", &a).is_none(), "dropped: nothing recorded");
        let held = HeldRecords::new(&records);
        held.put("x", &a, &json!("a")).unwrap();
        held.put("x", &b, &json!("b")).unwrap();
        held.remove("x", &b).unwrap();
        held.commit().unwrap();
        assert_eq!(records.get("x", &a), Some(json!("a")));
        assert!(records.get("x", &b).is_none());
    }
}
