//! Collection of what workers share across hosts: the `kiln-stages` KV bucket and the
//! `kiln-blobs` object store, by the same rules as `$KILN_HOME` ([`super::collect`]). Other hosts'
//! running builds leave no lease here, so nothing younger than `min_age` is removed (a stage
//! writes its objects before its record, and its record before the next stage reads it).

use super::{KindReport, Policy, Progress, Refs, manifest_files};
use crate::bus::{BlobError, Blobs, Bus, StageOutputs};
use crate::digest::Digest256;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A failure talking to the buckets.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("reading kiln's buckets and stream")]
    Open(#[source] crate::bus::BusError),
    #[error("the buckets")]
    Blob(#[from] BlobError),
}

/// What collecting the buckets did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteReport {
    pub dry_run: bool,
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub kinds: Vec<KindReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The blobs published images still reference: the disk image of every build that a
/// `kiln.image.published.>` message in the `KILN` stream announces (as long as the stream keeps
/// those messages).
pub async fn published_refs(bus: &Bus) -> Result<Refs, RemoteError> {
    use crate::bus::{ImagePublished, Stage, StageEvent};
    let announced = bus
        .stored_messages("kiln.image.published.>")
        .await
        .map_err(RemoteError::Open)?;
    let builds: std::collections::BTreeSet<String> = announced
        .iter()
        .filter_map(|m| crate::bus::decode::<ImagePublished>(&m.payload).ok())
        .map(|p| p.build)
        .collect();
    let mut refs = Refs::default();
    for build in builds {
        for e in bus.build_events(&build).await.map_err(RemoteError::Open)? {
            if let Ok(StageEvent::Completed(c)) = &e.event
                && c.stage == Stage::Disk
            {
                refs.extend(&Refs::of(&c.outputs));
            }
        }
    }
    Ok(refs)
}

/// Manifests larger than this are not read (none is near it: a Debian base's is a few MiB).
const MAX_MANIFEST: u64 = 256 << 20;

/// Collect the KV bucket and the object store by `policy`; nothing younger than `min_age` goes.
pub async fn collect_remote(
    bus: &Bus,
    local: crate::home::BlobStore,
    policy: &Policy,
    min_age: Duration,
    progress: Progress<'_>,
) -> Result<RemoteReport, RemoteError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let young = |t: i64| now - t < min_age.as_secs() as i64;
    let kept_by_age = |t: i64| policy.keep.is_none_or(|k| now - t <= k.as_secs() as i64);
    let blobs = Blobs::open(bus, local.clone()).await?;
    let kv = StageOutputs::open(bus).await.map_err(RemoteError::Open)?;
    let objects: HashMap<Digest256, (u64, i64)> = blobs
        .remote_objects()
        .await?
        .into_iter()
        .filter_map(|(name, size, t)| Digest256::parse(&name).map(|d| (d, (size, t))))
        .collect();
    progress(&format!("{} objects in the object store", objects.len()));
    let mut records = kv.entries().await?;
    progress(&format!("{} records in the KV bucket", records.len()));
    records.sort_by_key(|r| std::cmp::Reverse(r.1));

    let mut manifests: HashMap<Digest256, Vec<Digest256>> = HashMap::new();
    let mut live: HashSet<Digest256> = policy.pinned.blobs.iter().cloned().collect();
    let mut total = 0u64;
    let mut keep = vec![false; records.len()];
    // Young records first (a build may be using them), then the most recent that fit.
    for pass in [true, false] {
        for (i, (_, created, value)) in records.iter().enumerate() {
            if keep[i] || young(*created) != pass || (!pass && !kept_by_age(*created)) {
                continue;
            }
            let refs = Refs::of(value);
            let mut files: Vec<Digest256> = refs.blobs.iter().cloned().collect();
            for m in &refs.manifests {
                if !manifests.contains_key(m) {
                    let bytes = match std::fs::read(local.path(m)) {
                        Ok(b) => Some(b),
                        Err(_) => blobs.read_remote(m, MAX_MANIFEST).await,
                    };
                    manifests.insert(
                        m.clone(),
                        bytes.map(|b| manifest_files(&b)).unwrap_or_default(),
                    );
                }
                files.extend(manifests[m].iter().cloned());
            }
            let unique: HashSet<&Digest256> = files.iter().filter(|d| !live.contains(*d)).collect();
            let added: u64 = unique
                .iter()
                .map(|d| objects.get(*d).map_or(0, |o| o.0))
                .sum();
            if !pass && policy.max_size.is_some_and(|max| total + added > max) {
                continue;
            }
            keep[i] = true;
            total += added;
            live.extend(files);
        }
    }

    let mut report = RemoteReport {
        dry_run: policy.dry_run,
        before_bytes: objects.values().map(|o| o.0).sum(),
        after_bytes: 0,
        kinds: Vec::new(),
        errors: Vec::new(),
    };
    let mut rec = KindReport {
        kind: "kv records",
        ..Default::default()
    };
    for (i, (key, _, _)) in records.iter().enumerate() {
        if keep[i] {
            rec.kept += 1;
            continue;
        }
        if !policy.dry_run
            && let Err(e) = kv.remove(key).await
        {
            report.errors.push(crate::error::Chain(&e).to_string());
            continue;
        }
        rec.removed += 1;
    }
    let mut obj = KindReport {
        kind: "objects",
        ..Default::default()
    };
    let mut done = 0usize;
    for (d, (size, modified)) in &objects {
        done += 1;
        if done.is_multiple_of(1000) {
            progress(&format!("objects: {done}/{} looked at", objects.len()));
        }
        if live.contains(d) || young(*modified) {
            obj.kept += 1;
            obj.kept_bytes += size;
            continue;
        }
        if !policy.dry_run
            && let Err(e) = blobs.remove_remote(d.as_str()).await
        {
            report.errors.push(crate::error::Chain(&e).to_string());
            obj.kept += 1;
            obj.kept_bytes += size;
            continue;
        }
        obj.removed += 1;
        obj.freed_bytes += size;
    }
    report.after_bytes = obj.kept_bytes;
    report.kinds = vec![obj, rec];
    Ok(report)
}
