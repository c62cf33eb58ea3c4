//! The build index: the KV bucket `kiln-builds`, one [`BuildSummary`] per build (id, recipe,
//! requester, state, current stage, times, image digest and reference, error), kept current by
//! the stage workers as they publish the build's events ([`BuildSummary::apply`]).
//!
//! Listing the most recent builds ([`BuildIndex::recent`]) reads the last `limit` build requests
//! back from the end of the `KILN` stream with direct gets (the stream keeps them in request
//! order; a request without an id maps to the id the source stage assigns it), then each
//! build's summary from the bucket by key: O(limit), not O(history). Entries expire with the
//! `KILN` stream's history ([`super::RETENTION`]).

use super::messages::{BuildRequest, ErrorInfo, RecipeSource, StageEvent};
use super::subjects::Stage;
use super::{Bus, BusError, RETENTION, nats_err};
use async_nats::jetstream::{kv, stream};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// KV bucket of build summaries, key = build id.
pub const BUILD_BUCKET: &str = "kiln-builds";
/// How many times an update retries when another worker updated the same build meanwhile.
const UPDATE_TRIES: usize = 8;

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildPhase {
    /// Requested; no stage has started.
    Queued,
    Running,
    /// The last stage of the pipeline, publish, completed.
    Completed,
    Failed,
}

impl BuildPhase {
    pub fn name(self) -> &'static str {
        match self {
            BuildPhase::Queued => "queued",
            BuildPhase::Running => "running",
            BuildPhase::Completed => "completed",
            BuildPhase::Failed => "failed",
        }
    }
}

/// One build in the index and in the list of recent builds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub id: String,
    /// The recipe: its path, inline name, or `git-url ref path`.
    #[serde(default)]
    pub recipe: Option<String>,
    #[serde(default)]
    pub requester: Option<String>,
    pub state: BuildPhase,
    /// The stage running now (or next to run), or, for an ended build, the one it ended at.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// When it was requested (the request's stream time; else when it was first seen), Unix
    /// milliseconds.
    pub requested_ms: u64,
    /// When its last event was published, Unix milliseconds.
    pub updated_ms: u64,
    /// The disk image's digest `sha256:…`, once the disk stage completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where the publish stage pushed it, `repo:tag@sha256:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The failure, for a failed build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// The recipe of a request, for people: its path, inline name, or `git-url ref path`.
pub fn recipe_text(r: &BuildRequest) -> String {
    match &r.recipe {
        RecipeSource::Path { path } => path.display().to_string(),
        RecipeSource::Inline { name, .. } => format!("{name} (inline)"),
        RecipeSource::Git { git } => format!(
            "{} {} {}",
            crate::net::redact(&git.url),
            git.git_ref,
            git.path
        ),
    }
}

impl BuildSummary {
    /// A build first seen at `at_ms`, queued.
    pub fn new(id: &str, at_ms: u64) -> Self {
        BuildSummary {
            id: id.to_string(),
            recipe: None,
            requester: None,
            state: BuildPhase::Queued,
            stage: None,
            requested_ms: at_ms,
            updated_ms: at_ms,
            image: None,
            reference: None,
            error: None,
        }
    }

    /// Take in the build's request, stored in the stream at `requested_ms`.
    pub fn apply_request(&mut self, request: &BuildRequest, requested_ms: u64) {
        self.recipe = Some(recipe_text(request));
        self.requester = Some(request.requester.clone());
        self.requested_ms = self.requested_ms.min(requested_ms);
    }

    /// Take in one of the build's events, published at `at_ms`. After a stage's `completed` the
    /// build's stage is the next one (running, or about to). An ended build stays as it ended,
    /// and an event of a stage the build is already past (a redelivery) changes only the time.
    pub fn apply(&mut self, event: &StageEvent, at_ms: u64) {
        self.updated_ms = self.updated_ms.max(at_ms);
        if matches!(self.state, BuildPhase::Failed | BuildPhase::Completed) {
            return;
        }
        let place = |s: Stage| Stage::ALL.iter().position(|x| *x == s).unwrap_or(0);
        let reaches = match event {
            StageEvent::Completed(c) => c.stage.next().map(place).unwrap_or(Stage::ALL.len()),
            e => place(e.stage()),
        };
        if !matches!(event, StageEvent::Failed(_))
            && self.stage.is_some_and(|current| reaches < place(current))
        {
            return;
        }
        match event {
            StageEvent::Failed(f) => {
                self.stage = Some(f.stage);
                self.state = BuildPhase::Failed;
                self.error = Some(f.error.clone());
            }
            StageEvent::Completed(c) => {
                if let Some(image) = c.outputs["disk"]["image"].as_str() {
                    self.image = Some(image.to_string());
                }
                if c.stage == Stage::Publish {
                    self.stage = Some(Stage::Publish);
                    self.state = BuildPhase::Completed;
                    self.reference = find_str(&c.outputs, "reference", 2);
                } else {
                    self.stage = c.stage.next();
                    self.state = BuildPhase::Running;
                }
            }
            e => {
                self.stage = Some(e.stage());
                self.state = BuildPhase::Running;
            }
        }
    }
}

/// The first string under `key` in `v`, at most `depth` objects deep.
fn find_str(v: &serde_json::Value, key: &str, depth: usize) -> Option<String> {
    let o = v.as_object()?;
    if let Some(s) = o.get(key).and_then(|s| s.as_str()) {
        return Some(s.to_string());
    }
    if depth == 0 {
        return None;
    }
    o.values().find_map(|v| find_str(v, key, depth - 1))
}

/// The most recent of `summaries`: requested last first (then by id), at most `limit`.
pub fn newest_first(mut summaries: Vec<BuildSummary>, limit: usize) -> Vec<BuildSummary> {
    summaries.sort_by(|a, b| {
        b.requested_ms
            .cmp(&a.requested_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    summaries.truncate(limit);
    summaries
}

/// The KV backing stream, created by hand: `create_key_value` fails against NATS 2.9. The one
/// place the bucket's configuration (replicas included) is decided.
fn index_stream_config() -> stream::Config {
    super::blobs::kv_bucket_stream(
        BUILD_BUCKET,
        "kiln build index: build id -> summary",
        RETENTION,
    )
}

/// True when `id` can be a key of the bucket (build ids always can; an id taken from a foreign
/// subject may not).
fn is_key(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && !id.ends_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_/=.".contains(&b))
}

/// The build index bucket.
#[derive(Clone)]
pub struct BuildIndex {
    kv: kv::Store,
    /// The summaries this process wrote last, with their revisions: the next update of the same
    /// build (usually by this process: `kiln up` runs every stage) needs no read first.
    written: std::sync::Arc<std::sync::Mutex<HashMap<String, (u64, BuildSummary)>>>,
}

/// How many builds' last written summaries [`BuildIndex`] remembers.
const REMEMBERED: usize = 4096;

impl std::fmt::Debug for BuildIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildIndex").finish_non_exhaustive()
    }
}

impl BuildIndex {
    /// Create the bucket if missing (or bring its configuration up to date) and open it: the
    /// workers' way in.
    pub async fn open(bus: &Bus) -> Result<BuildIndex, BusError> {
        bus.ensure_stream(index_stream_config()).await?;
        Self::open_existing(bus)
            .await?
            .ok_or_else(|| BusError::Nats {
                what: format!("open KV bucket {BUILD_BUCKET}"),
                message: "it is missing right after it was created".into(),
            })
    }

    /// Open the bucket without creating it (readers may not create streams); `None` when no
    /// worker has created it yet.
    pub async fn open_existing(bus: &Bus) -> Result<Option<BuildIndex>, BusError> {
        Ok(super::blobs::existing_kv(bus, BUILD_BUCKET)
            .await?
            .map(|kv| BuildIndex {
                kv,
                written: Default::default(),
            }))
    }

    /// The summary of one build, if indexed.
    pub async fn get(&self, id: &str) -> Result<Option<BuildSummary>, BusError> {
        if !is_key(id) {
            return Ok(None);
        }
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(nats_err(format!("read {id} from {BUILD_BUCKET}")))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice(&e.value).ok()))
    }

    /// Change the summary of build `id` (a new one, first seen at `at_ms`, when there is none) by
    /// `change`, safely against other workers updating it at the same time (compare and set on
    /// the entry's revision). An id that cannot be a key is not indexed.
    pub async fn update(
        &self,
        id: &str,
        at_ms: u64,
        change: impl Fn(&mut BuildSummary),
    ) -> Result<(), BusError> {
        if !is_key(id) {
            return Ok(());
        }
        let what = || format!("write {id} to {BUILD_BUCKET}");
        let mut last = String::new();
        let remembered = self.remembered(id);
        for attempt in 0..UPDATE_TRIES {
            let entry = match (&remembered, attempt) {
                (Some((revision, summary)), 0) => Some((summary.clone(), Some(*revision))),
                _ => None,
            };
            let (mut summary, revision) = match entry {
                Some(known) => known,
                None => self.read(id, at_ms).await.map_err(nats_err(what()))?,
            };
            change(&mut summary);
            let bytes = serde_json::to_vec(&summary).unwrap_or_default();
            let written = match revision {
                Some(r) => self
                    .kv
                    .update(id, bytes.into(), r)
                    .await
                    .map_err(|e| e.to_string()),
                None => self
                    .kv
                    .create(id, bytes.into())
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(revision) => {
                    self.remember(id, revision, summary);
                    return Ok(());
                }
                // Another worker wrote it first: read it again and reapply.
                Err(e) => last = e,
            }
        }
        Err(BusError::Nats {
            what: what(),
            message: format!("{last} ({UPDATE_TRIES} tries)"),
        })
    }

    /// The summary of `id` as stored, and its revision (`None`: no entry yet).
    async fn read(
        &self,
        id: &str,
        at_ms: u64,
    ) -> Result<(BuildSummary, Option<u64>), kv::EntryError> {
        let entry = self.kv.entry(id).await?;
        Ok(match &entry {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice(&e.value).unwrap_or_else(|_| BuildSummary::new(id, at_ms)),
                Some(e.revision),
            ),
            Some(e) => (BuildSummary::new(id, at_ms), Some(e.revision)),
            None => (BuildSummary::new(id, at_ms), None),
        })
    }

    fn remembered(&self, id: &str) -> Option<(u64, BuildSummary)> {
        let map = self.written.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    fn remember(&self, id: &str, revision: u64, summary: BuildSummary) {
        let mut map = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= REMEMBERED {
            map.clear();
        }
        if matches!(summary.state, BuildPhase::Completed | BuildPhase::Failed) {
            map.remove(id);
        } else {
            map.insert(id.to_string(), (revision, summary));
        }
    }
}

/// The `limit` most recently requested builds, newest first: the last `limit` requests in
/// the `KILN` stream (read back from its end, window by window, with direct gets that the
/// server answers from its subject index), each with its summary from the index; a request
/// that no worker has taken yet (or every request, without an `index`: no worker ever ran) is
/// `queued`. The cost follows `limit`, not the history.
pub async fn recent(
    bus: &Bus,
    index: Option<&BuildIndex>,
    limit: usize,
) -> Result<Vec<BuildSummary>, BusError> {
    let requests = last_requests(bus, limit).await?;
    let mut out: Vec<BuildSummary> = Vec::with_capacity(requests.len());
    for (sequence, published_ms, payload) in requests {
        let request = super::decode::<BuildRequest>(&payload).ok();
        let id = match &request {
            Some(r) => match &r.id {
                Some(id) if super::is_valid_build_id(id) => id.clone(),
                Some(_) => super::refused_build_id(sequence),
                None => super::assigned_build_id(published_ms, sequence),
            },
            None => super::refused_build_id(sequence),
        };
        if out.iter().any(|b| b.id == id) {
            continue; // a second request for a taken id: the build is listed once
        }
        let indexed = match index {
            Some(index) => index.get(&id).await?,
            None => None,
        };
        let summary = match indexed {
            Some(s) => s,
            None => {
                let mut s = BuildSummary::new(&id, published_ms);
                if let Some(r) = &request {
                    s.apply_request(r, published_ms);
                }
                s
            }
        };
        out.push(summary);
    }
    Ok(out)
}

/// The last `limit` messages on `kiln.build.requested` in the `KILN` stream, newest first, as
/// (stream sequence, stored time in Unix milliseconds, payload). Reads windows of stream
/// sequences back from the end, each twice as wide as the one before, until it has `limit`.
async fn last_requests(bus: &Bus, limit: usize) -> Result<Vec<(u64, u64, bytes::Bytes)>, BusError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let what = || format!("list the last build requests of stream {}", super::STREAM);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut stream = bus.kiln_stream().await?;
    let info = stream.info().await.map_err(nats_err(what()))?;
    // Without a leader, a replica answers for the stream: what it says may be behind.
    if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
        return Err(bus.no_leader(super::STREAM, &what()));
    }
    let state = info.state.clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut found: Vec<(u64, u64, bytes::Bytes)> = Vec::new();
    let mut hi = state.last_sequence;
    // A build is some 16 messages; start with room for `limit` builds and then some.
    let mut window = (limit as u64).saturating_mul(32).max(256);
    loop {
        let lo = hi.saturating_sub(window - 1).max(state.first_sequence);
        let mut batch = Vec::new();
        let mut seq = lo;
        while seq <= hi {
            let m = match stream
                .direct_get_next_for_subject(super::subjects::BUILD_REQUESTED, Some(seq))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(nats_err(what())(e)),
            };
            if m.sequence > hi {
                break;
            }
            seq = m.sequence + 1;
            let at = (m.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            batch.push((m.sequence, at, m.payload));
        }
        // Newest first: this window's, latest first, after the newer windows'.
        found.extend(batch.into_iter().rev());
        if found.len() >= limit || lo <= state.first_sequence {
            break;
        }
        hi = lo - 1;
        window = window.saturating_mul(2);
    }
    found.truncate(limit);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::messages::{
        COMPLETED_VERSION, CacheStatus, ErrorKind, EventTime, StageCompleted, StageFailed,
        StageStarted,
    };

    fn started(build: &str, stage: Stage) -> StageEvent {
        StageEvent::Started(StageStarted {
            v: 1,
            build: build.into(),
            stage,
            worker: "w".into(),
            time: EventTime::UnixMs(0),
            attempt: Some(1),
        })
    }

    fn completed(build: &str, stage: Stage, outputs: serde_json::Value) -> StageEvent {
        StageEvent::Completed(StageCompleted {
            v: COMPLETED_VERSION,
            build: build.into(),
            stage,
            worker: "w".into(),
            time: EventTime::UnixMs(0),
            outputs,
            state_digest: format!("sha256:{}", "0".repeat(64)),
            cache: CacheStatus::Hit,
            duration_ms: 1,
        })
    }

    #[test]
    fn a_summary_follows_its_builds_events() {
        let mut req = BuildRequest::new(
            RecipeSource::Path {
                path: "/r/minimal.yaml".into(),
            },
            "alice",
        );
        req.id = Some("b1".into());
        let mut s = BuildSummary::new("b1", 5_000);
        s.apply_request(&req, 4_000);
        s.apply(&started("b1", Stage::Source), 5_000);
        assert_eq!(
            (s.state, s.stage),
            (BuildPhase::Running, Some(Stage::Source))
        );
        assert_eq!(s.recipe.as_deref(), Some("/r/minimal.yaml"));
        assert_eq!((s.requested_ms, s.updated_ms), (4_000, 5_000));
        let image = format!("sha256:{}", "1".repeat(64));
        s.apply(
            &completed(
                "b1",
                Stage::Disk,
                serde_json::json!({"disk": {"image": image}}),
            ),
            6_000,
        );
        assert_eq!(s.image.as_deref(), Some(image.as_str()));
        assert_eq!(
            (s.state, s.stage),
            (BuildPhase::Running, Some(Stage::Verify))
        );
        // A redelivered earlier stage does not move the build back.
        s.apply(
            &completed("b1", Stage::Rootfs, serde_json::json!({})),
            6_500,
        );
        assert_eq!(s.stage, Some(Stage::Verify));
        s.apply(
            &completed(
                "b1",
                Stage::Publish,
                serde_json::json!({"pushed": {"reference": "r/x:1@sha256:00"}}),
            ),
            7_000,
        );
        assert_eq!(s.state, BuildPhase::Completed);
        assert_eq!(s.reference.as_deref(), Some("r/x:1@sha256:00"));

        let mut f = BuildSummary::new("b2", 1_000);
        f.apply(
            &StageEvent::Failed(StageFailed {
                v: 1,
                build: "b2".into(),
                stage: Stage::Render,
                worker: "w".into(),
                time: EventTime::UnixMs(0),
                error: ErrorInfo::new(ErrorKind::Recipe, "unknown field `kernal`"),
                attempts: Some(1),
                duration_ms: None,
            }),
            2_000,
        );
        // A late event of a failed build does not bring it back.
        f.apply(&started("b2", Stage::Rootfs), 3_000);
        assert_eq!(
            (f.state, f.stage),
            (BuildPhase::Failed, Some(Stage::Render))
        );
        assert_eq!(f.updated_ms, 3_000);

        let list = newest_first(vec![f.clone(), s.clone()], 10);
        assert_eq!(list[0].id, "b1");
        assert_eq!(newest_first(vec![f, s], 1).len(), 1);
        assert!(is_key("20261126T022407Z-9f3a01c2") && !is_key("a b") && !is_key(""));
    }
}
