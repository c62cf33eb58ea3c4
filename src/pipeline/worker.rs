//! kiln's build stages as NATS JetStream workers: one [`Worker`] per bus stage, each running the
//! pipeline work of [`super::stages`] for the messages of its durable consumer.
//!
//! Mapping of bus stages to pipeline work:
//! - `source`: resolve the recipe source (git: check out → commit; path: must exist on this host;
//!   inline: nothing to fetch) and assign the build id when the request has none.
//! - `render`: load the recipe (git recipes are checked out again by commit on this worker, inline
//!   recipes are written to a temp project directory) → a new [`BuildState`].
//! - `rootfs`: [`Stage::Packages`] then [`Stage::Rootfs`]; `kernel`, `disk`: the stage of that name;
//!   `verify`: one [`Stage::Verify`] per profile (the request's, else the recipe's).
//! - `publish`: push the verified disk to the worker's [`PublishTarget`] and announce it
//!   ([`super::publish`]); its `completed` message ends a build.
//!
//! Every `completed` message carries the accumulated [`PipelineState`] in `state`. Before a stage
//! runs, the worker makes every blob it needs local through the `kiln-blobs` object store; after
//! it runs, it uploads every blob the stage produced, then publishes `completed`, so the next stage
//! may run on another host. Stage records live in the local stage cache and in the `kiln-stages`
//! KV bucket. Recipe errors give one `failed` message (kind `recipe`, with file:line:column) and
//! no retry; other errors are retried, and the last attempt publishes `failed`.

use super::access::{AccessError, RecipeAccess};
use super::cache::StageCache;
use super::publish::{PublishTarget, Published, publish_build};
use super::stages::{
    BuildState, ProgressSink, ProgressUpdate, Stage, StageEnv, StageError, StageRecords,
    StageReport, VERIFIED, check_supported, is_debian, run_stage, verified_key,
};
use crate::bus::{
    self, BlobError, Blobs, BuildRequest, Bus, BusError, CacheStatus, Delivery, ErrorInfo,
    ErrorKind, EventTime, Outcome, RecipeSource, RetryPolicy, StageCompleted, StageEvent,
    StageFailed, StageOutputs, StageProgress, StageStarted, VERSION,
};
use crate::cache::Digest256;
use crate::manifest::{Manifest, ManifestKind};
use crate::packages::ArchiveOptions;
use crate::recipe::{Diagnostic, LoadOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shortest time between two `progress` messages of one stage run.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What a build carries from stage to stage (`state` of every `completed` message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineState {
    /// The request, with its build id filled in.
    pub request: BuildRequest,
    /// The git commit of a git recipe (set by `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The commit time (seconds since the epoch) of a git recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
    /// The pipeline state (set by `render`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildState>,
    /// Each pipeline stage run so far (packages, rootfs, …): cache hit or miss, time, key,
    /// outputs; what `kiln build` puts in its report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<StageReport>,
    /// Requests the stages made to the Debian mirror so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mirror_requests: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How the workers of one process run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `$KILN_HOME` of this worker.
    pub home: PathBuf,
    pub archive: ArchiveOptions,
    pub profiles_dir: Option<PathBuf>,
    /// The worker name in messages, e.g. `host/pid`.
    pub name: String,
    pub policy: RetryPolicy,
    /// Every worker of the bus shares this host's `$KILN_HOME` (`kiln build`'s private
    /// server): blobs stay in the local store and never go through the object store.
    pub local_blobs: bool,
    /// Where the publish stage pushes images (none: it completes as skipped).
    pub publish: Option<PublishTarget>,
    /// What build requests may reach on this worker (recipe roots, git repositories,
    /// environment variables): nothing by default.
    pub access: RecipeAccess,
    /// Bounds on loading a recipe (template fuel, time, output, file sizes).
    pub limits: crate::recipe::limits::Limits,
}

impl WorkerConfig {
    /// Defaults for this process: `$KILN_HOME`, archive settings from the environment, name
    /// `<hostname>/<pid>`.
    pub fn from_env() -> Self {
        WorkerConfig {
            home: crate::cache::kiln_home(),
            archive: ArchiveOptions::from_env(),
            profiles_dir: None,
            name: default_worker_name(),
            policy: RetryPolicy::default(),
            local_blobs: false,
            publish: None,
            access: RecipeAccess::default(),
            limits: Default::default(),
        }
    }
}

/// `<hostname>/<pid>`.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}", std::process::id())
}

/// The bus stages a worker can run (all of them).
pub const RUNNABLE: [bus::Stage; 7] = bus::Stage::ALL;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(
        "the {0} stage has no worker in this kiln; stages: source, render, rootfs, kernel, disk, verify, publish"
    )]
    NotRunnable(bus::Stage),
}

/// Why handling one message failed.
#[derive(Debug)]
enum Failure {
    /// The input is wrong: publish `failed` once, do not retry.
    Input(ErrorInfo),
    /// Anything else: retry; on the last attempt publish `failed`.
    Retry(ErrorInfo),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Input(e) | Failure::Retry(e) => f.write_str(&e.message),
        }
    }
}

fn transient(e: impl std::fmt::Display) -> Failure {
    Failure::Retry(ErrorInfo::new(ErrorKind::Transient, &e.to_string()))
}

/// Whether an I/O error's text says the worker ran out of a resource (file descriptors, memory)
/// rather than that a file is missing or unreadable: `std::io::Error` prints its OS error number.
fn out_of_resources(message: &str) -> bool {
    ["(os error 23)", "(os error 24)", "(os error 12)"]
        .iter()
        .any(|code| message.contains(code))
}

/// A git error: what no retry can heal (an unknown ref, a recipe path that is not in the
/// repository, an unsupported URL) is final; the rest (the network) is retried.
fn source_failure(e: crate::source::SourceError) -> Failure {
    use crate::source::SourceError as E;
    match e {
        E::UnknownRef { .. }
        | E::BadRecipePath { .. }
        | E::MissingRecipe { .. }
        | E::UnsupportedScheme { .. }
        | E::NoSuchPath { .. } => Failure::Input(ErrorInfo::new(ErrorKind::Recipe, &e.to_string())),
        e => transient(e),
    }
}

/// A recipe diagnostic as a `failed` message's error: place, help, and the whole rendering
/// (source line and caret) as detail.
pub fn diagnostic_info(d: &Diagnostic) -> ErrorInfo {
    use crate::recipe::diag::one_line;
    let mut info = ErrorInfo::new(ErrorKind::Recipe, &one_line(&d.message, 1000));
    if let Some(place) = &d.place {
        // A hostile file name must not bring control characters into the event.
        info.file = Some(one_line(&place.file.display().to_string(), 1000));
        info.line = u32::try_from(place.pos.line).ok();
        info.column = u32::try_from(place.pos.column).ok();
    }
    info.help = d.help.clone();
    info.detail = Some(d.to_string());
    info
}

/// The error and its causes, one per line, when that says more than the first line.
fn error_detail(e: &dyn std::error::Error) -> Option<String> {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!("\ncaused by: {cause}"));
        }
        source = s.source();
    }
    text.contains('\n').then_some(text)
}

fn stage_failure(e: &StageError) -> Failure {
    let message = e.to_string();
    let kind = match e {
        _ if !e.is_input_error() => ErrorKind::Transient,
        StageError::Verify(_) => ErrorKind::Verification,
        _ => ErrorKind::Recipe,
    };
    let mut info = ErrorInfo::new(kind, &message);
    info.detail = error_detail(e);
    if kind == ErrorKind::Transient {
        Failure::Retry(info)
    } else {
        Failure::Input(info)
    }
}

/// A stage's progress as rate-limited `progress` messages (at most one per
/// [`PROGRESS_INTERVAL`], and always the one that says it is done). Called from blocking code:
/// publishing runs on `rt` and is waited for, so a stage's progress lands before its
/// `completed`.
struct BusProgress {
    bus: Bus,
    rt: tokio::runtime::Handle,
    build: String,
    stage: bus::Stage,
    worker: String,
    last: Mutex<Option<Instant>>,
}

impl ProgressSink for BusProgress {
    fn progress(&self, stage: &Stage, update: ProgressUpdate) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let done = update.fraction.is_some_and(|f| f >= 1.0);
            if !done && last.is_some_and(|t| now.duration_since(t) < PROGRESS_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let message = if stage.name() == self.stage.name() {
            update.message
        } else {
            format!("{}: {}", stage.name(), update.message)
        };
        let msg = StageEvent::Progress(StageProgress {
            v: VERSION,
            build: self.build.clone(),
            stage: self.stage,
            worker: self.worker.clone(),
            time: EventTime::now(),
            fraction: update.fraction,
            message: Some(message),
        });
        if let Err(e) = self.rt.block_on(self.bus.publish_event(&msg)) {
            tracing::debug!(stage = %self.stage, "cannot publish progress: {e}");
        }
    }
}

/// Stage records in the local stage cache and the shared KV bucket (get: local, else KV; put:
/// both). Used from blocking code: KV calls run on `rt`.
struct SharedRecords {
    local: StageCache,
    kv: StageOutputs,
    rt: tokio::runtime::Handle,
}

impl StageRecords for SharedRecords {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value> {
        if let Some(v) = self.local.get(stage, key) {
            return Some(v);
        }
        let v = match self.rt.block_on(self.kv.get(&format!("{stage}/{key}"))) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, "reading the shared stage record: {e}");
                None
            }
        }?;
        let _ = self.local.put(stage, key, &v);
        Some(v)
    }

    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        self.local.put(stage, key, outputs)?;
        self.rt
            .block_on(self.kv.put(&format!("{stage}/{key}"), outputs))
            .map_err(std::io::Error::other)
    }
}

/// Records kept in this process only: what one host's private bus (`kiln build`) hands from
/// stage to stage lives as long as that bus, not in the stage cache.
#[derive(Clone, Default)]
struct MemoryRecords(Arc<Mutex<std::collections::HashMap<String, Value>>>);

impl StageRecords for MemoryRecords {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&format!("{stage}/{key}")).cloned()
    }

    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(format!("{stage}/{key}"), outputs.clone());
        Ok(())
    }
}

/// Everything the handlers share.
struct Ctx {
    bus: Bus,
    blobs: Blobs,
    kv: StageOutputs,
    env: StageEnv,
    config: WorkerConfig,
    /// The hand-over records of a private bus (see [`Ctx::handoff_records`]).
    memory: MemoryRecords,
}

impl Ctx {
    /// Where the records of what stages hand on (states, build-id claims) live: with the stream
    /// they are about — the shared bucket, or this process for a private bus.
    fn handoff_records(&self) -> Box<dyn StageRecords + Send> {
        if self.config.local_blobs {
            Box::new(self.memory.clone())
        } else {
            self.records()
        }
    }

    /// Where this worker's stage records live: the local stage cache, and the shared KV bucket
    /// unless every worker shares this host's `$KILN_HOME` (one host's workers keep their
    /// records local: a record in the shared bucket would name blobs the object store does not
    /// have). Blocking: call from blocking code.
    fn records(&self) -> Box<dyn StageRecords + Send> {
        if self.config.local_blobs {
            Box::new(StageCache::new(&self.config.home))
        } else {
            Box::new(SharedRecords {
                local: StageCache::new(&self.config.home),
                kv: self.kv.clone(),
                rt: tokio::runtime::Handle::current(),
            })
        }
    }
}

/// The records of the states that stages handed on: a `completed` message's `state` is used only
/// when a worker recorded that exact state (by its digest) for that build and stage. The message
/// is a trigger, not a proof.
const STATE_RECORD: &str = "state";

/// The digest of a state as a `completed` message carries it.
fn state_digest(state: &Value) -> Digest256 {
    super::cache::stage_key(STATE_RECORD, 1, state)
}

/// Record that this worker handed `state` on from `stage` of `build`.
async fn record_state(
    ctx: &Arc<Ctx>,
    build: &str,
    stage: bus::Stage,
    state: &Value,
) -> Result<(), Failure> {
    let key = state_digest(state);
    let record = json!({ "build": build, "stage": stage });
    let c = ctx.clone();
    blocking(move || {
        c.handoff_records()
            .put(STATE_RECORD, &key, &record)
            .map_err(|e| transient(format!("recording the state handed on: {e}")))
    })
    .await
}

/// Refuse a `completed` message whose state no worker recorded for its build and stage: a
/// forged or altered message.
async fn check_state(ctx: &Arc<Ctx>, prev: &Previous) -> Result<(), Failure> {
    let key = prev.digest.clone();
    let c = ctx.clone();
    let record = blocking(move || Ok(c.handoff_records().get(STATE_RECORD, &key))).await?;
    let agrees = record.as_ref().is_some_and(|r| {
        r["build"].as_str() == Some(prev.build.as_str())
            && r["stage"].as_str() == Some(prev.stage.name())
    });
    if agrees {
        return Ok(());
    }
    let mut info = ErrorInfo::new(
        ErrorKind::InvalidMessage,
        &format!(
            "the {} stage's completed message for build {} carries a state ({}) that no kiln \
             worker recorded for that build and stage: refused (a forged or altered message)",
            prev.stage, prev.build, prev.digest
        ),
    );
    info.help = Some(
        "only stage workers publish stage events; submit builds on kiln.build.requested \
         (see the README's Security model for the NATS permissions that enforce this)"
            .into(),
    );
    Err(Failure::Input(info))
}

/// The stage whose `completed` message triggered this one, and the digest of its state.
struct Previous {
    build: String,
    stage: bus::Stage,
    digest: Digest256,
}

/// Run workers for `stages` until `shutdown` completes.
pub async fn run_workers(
    bus: &Bus,
    stages: &[bus::Stage],
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    if let Some(s) = stages.iter().find(|s| !RUNNABLE.contains(s)) {
        return Err(WorkerError::NotRunnable(*s));
    }
    bus.ensure_kiln_stream().await?;
    // What a killed worker left half-written (an image, a blob) must not pile up or be used.
    match crate::cache::sweep_stale_temp(&config.home) {
        Ok(removed) if !removed.is_empty() => tracing::info!(
            "removed {} temp file(s) that stopped kiln processes left in {}",
            removed.len(),
            config.home.display()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "cannot sweep stale temp files in {}: {e}",
            config.home.display()
        ),
    }
    let env = StageEnv::new(
        config.home.clone(),
        config.archive.clone(),
        config.profiles_dir.clone(),
    );
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        blobs: Blobs::open(bus, env.blobs.clone()).await?,
        kv: StageOutputs::open(bus).await?,
        env,
        config: config.clone(),
        memory: MemoryRecords::default(),
    });
    let mut workers = Vec::new();
    for stage in stages {
        workers.push(bus::Worker::new(bus, *stage, config.policy.clone()).await?);
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let runs = workers.iter().map(|w| {
        let ctx = ctx.clone();
        let mut rx = rx.clone();
        let stage = w.stage();
        let handler = move |d: Delivery| handle(ctx.clone(), stage, d);
        async move {
            let stop = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            w.run(handler, stop).await
        }
    });
    let all = futures::future::join_all(runs);
    tokio::pin!(all);
    let results = tokio::select! {
        r = &mut all => r,
        _ = shutdown => {
            let _ = tx.send(true);
            all.await
        }
    };
    for r in results {
        r?;
    }
    Ok(())
}

async fn handle(ctx: Arc<Ctx>, stage: bus::Stage, d: Delivery) -> Result<Outcome, Failure> {
    let started = Instant::now();
    // Which build: from the request (source) or the previous stage's completed message.
    let (build, state, prev) = match read_input(stage, &d) {
        Ok(v) => v,
        Err((build, info)) => {
            publish_failed(&ctx, &build, stage, *info, &d, started).await;
            return Ok(Outcome::Final);
        }
    };
    if stage == bus::Stage::Source {
        match claim_build_id(&ctx, &build, &d).await {
            Ok(()) => {}
            Err(Failure::Input(mut info)) => {
                tracing::warn!(build, "{}", info.message);
                info.detail = Some(format!("the refused request asked for build id {build:?}"));
                let refused = refused_build_id(&d);
                publish_failed(&ctx, &refused, stage, info, &d, started).await;
                return Ok(Outcome::Final);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(prev) = &prev {
        match check_state(&ctx, prev).await {
            Ok(()) => {}
            Err(Failure::Input(info)) => {
                tracing::warn!(%stage, build, "{}", info.message);
                publish_failed(&ctx, &build, stage, info, &d, started).await;
                return Ok(Outcome::Final);
            }
            Err(e) => return Err(e),
        }
    }
    let _ = ctx
        .bus
        .publish_event(&StageEvent::Started(StageStarted {
            v: VERSION,
            build: build.clone(),
            stage,
            worker: ctx.config.name.clone(),
            time: EventTime::now(),
            attempt: Some(d.attempt()),
        }))
        .await;
    match run(&ctx, stage, state).await {
        Ok((state, outputs, cache)) => {
            let state = serde_json::to_value(&state).map_err(transient)?;
            record_state(&ctx, &build, stage, &state).await?;
            let done = StageEvent::Completed(StageCompleted {
                v: VERSION,
                build,
                stage,
                worker: ctx.config.name.clone(),
                time: EventTime::now(),
                outputs,
                state,
                cache,
                duration_ms: started.elapsed().as_millis() as u64,
            });
            publish_reliably(&ctx.bus, &done).await.map_err(transient)?;
            Ok(Outcome::Done)
        }
        Err(Failure::Input(info)) => {
            publish_failed(&ctx, &build, stage, info, &d, started).await;
            Ok(Outcome::Final)
        }
        Err(Failure::Retry(info)) => {
            if d.is_last_attempt() {
                publish_failed(&ctx, &build, stage, info.clone(), &d, started).await;
            } else {
                // Say at once why the stage is retrying: `kiln status` and `kiln logs` show it.
                let note = StageEvent::Progress(StageProgress {
                    v: VERSION,
                    build: build.clone(),
                    stage,
                    worker: ctx.config.name.clone(),
                    time: EventTime::now(),
                    fraction: None,
                    message: Some(format!(
                        "attempt {} failed ({}), retrying: {}",
                        d.attempt(),
                        serde_json::to_value(info.kind)
                            .ok()
                            .and_then(|k| k.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        info.message
                    )),
                });
                if let Err(e) = ctx.bus.publish_event(&note).await {
                    tracing::debug!(%stage, build, "cannot publish the retry note: {e}");
                }
            }
            Err(Failure::Retry(info))
        }
    }
}

async fn publish_failed(
    ctx: &Ctx,
    build: &str,
    stage: bus::Stage,
    error: ErrorInfo,
    d: &Delivery,
    started: Instant,
) {
    let mut failed = StageFailed {
        v: VERSION,
        build: build.to_string(),
        stage,
        worker: ctx.config.name.clone(),
        time: EventTime::now(),
        error,
        attempts: Some(d.attempt()),
        duration_ms: Some(started.elapsed().as_millis() as u64),
    };
    failed.fit(ctx.bus.max_message_size());
    let msg = StageEvent::Failed(failed);
    if let Err(e) = publish_reliably(&ctx.bus, &msg).await {
        tracing::warn!(%stage, build, "cannot publish failed: {e}");
    }
}

/// How long a worker keeps trying to publish a stage's `completed` or `failed` event while the
/// server is unreachable (a restart) before the message is left to redelivery.
const PUBLISH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Publish a `completed` or `failed` event, retrying while the server restarts: the client
/// reconnects by itself, and the event's `Nats-Msg-Id` keeps a publish whose ack was lost from
/// being stored twice. Gives up after [`PUBLISH_PATIENCE`].
async fn publish_reliably(bus: &Bus, event: &StageEvent) -> Result<u64, BusError> {
    let deadline = Instant::now() + PUBLISH_PATIENCE;
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match bus.publish_event(event).await {
            Ok(seq) => return Ok(seq),
            Err(e) if Instant::now() + pause < deadline => {
                tracing::warn!(subject = %event.subject(), "publish failed, retrying in {pause:?}: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a message carries: the build id, its state, and (for every stage after source) the stage
/// that handed it on.
type Input = (String, PipelineState, Option<Previous>);

/// The build id and state a message carries, or the build id (best known) and why it is unusable.
fn read_input(stage: bus::Stage, d: &Delivery) -> Result<Input, (String, Box<ErrorInfo>)> {
    let invalid = |e: &dyn std::fmt::Display| {
        Box::new(ErrorInfo::new(ErrorKind::InvalidMessage, &e.to_string()))
    };
    if stage == bus::Stage::Source {
        // A request that cannot be used fails under its own id when that id is valid, else
        // under `invalid-<stream sequence>`.
        let refused_id = |id: Option<&str>| {
            id.filter(|id| bus::is_valid_build_id(id))
                .map(str::to_string)
                .unwrap_or_else(|| refused_build_id(d))
        };
        let mut request: BuildRequest = match d.decode() {
            Ok(r) => r,
            Err(e) => {
                let v = serde_json::from_slice::<Value>(d.payload()).ok();
                let id = refused_id(v.as_ref().and_then(|v| v["id"].as_str()));
                return Err((id, invalid(&e)));
            }
        };
        if let Err(e) = request.check() {
            return Err((refused_id(request.id.as_deref()), invalid(&e)));
        }
        let id = request.id.clone().unwrap_or_else(|| assigned_id(d));
        request.id = Some(id.clone());
        let state = PipelineState {
            request,
            commit: None,
            time: None,
            build: None,
            reports: Vec::new(),
            mirror_requests: 0,
        };
        return Ok((id, state, None));
    }
    let prev: StageCompleted = match d.decode() {
        Ok(p) => p,
        Err(e) => {
            let id = bus::subjects::parse_stage_subject(d.subject())
                .map(|s| s.build)
                .unwrap_or_else(|| format!("invalid-{}", d.stream_sequence()));
            return Err((id, invalid(&e)));
        }
    };
    let expected = stage.previous();
    if Some(prev.stage) != expected {
        return Err((
            prev.build,
            invalid(&format!(
                "a {} completed message cannot start the {stage} stage",
                prev.stage
            )),
        ));
    }
    let previous = Previous {
        build: prev.build.clone(),
        stage: prev.stage,
        digest: state_digest(&prev.state),
    };
    match serde_json::from_value::<PipelineState>(prev.state) {
        Ok(s) if s.request.id.as_deref() != Some(prev.build.as_str()) => Err((
            prev.build,
            invalid(&"the message's state belongs to another build"),
        )),
        Ok(s) => Ok((prev.build, s, Some(previous))),
        Err(e) => Err((
            prev.build,
            invalid(&format!(
                "the state of the {} stage's completed message: {e}",
                prev.stage
            )),
        )),
    }
}

/// The id under which a request that cannot be used is reported: `invalid-<stream sequence>`.
fn refused_build_id(d: &Delivery) -> String {
    format!("invalid-{}", d.stream_sequence())
}

/// The records of which request took a build id: a second request with an id already taken
/// (on any path: the API, `kiln submit`, a CI system publishing on NATS) is refused, and the
/// existing build's events stay untouched.
const BUILD_ID_RECORD: &str = "build-id";

/// Take `id` for the request `d`, or refuse it when another request took it first. A redelivery
/// of the same request finds its own record.
async fn claim_build_id(ctx: &Arc<Ctx>, id: &str, d: &Delivery) -> Result<(), Failure> {
    let key = super::cache::stage_key(BUILD_ID_RECORD, 1, &id);
    let published = d
        .message()
        .info()
        .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0);
    let mine = json!({ "id": id, "sequence": d.stream_sequence(), "published_ms": published });
    // Claims live with the stream they are about: in the shared bucket (never in a worker's
    // local cache, which outlives a stream), or, for one host's private bus, in this process.
    let taken = if ctx.config.local_blobs {
        let records = ctx.handoff_records();
        match records.get(BUILD_ID_RECORD, &key) {
            Some(other) => Some(other),
            None => {
                records
                    .put(BUILD_ID_RECORD, &key, &mine)
                    .map_err(|e| transient(format!("recording the build id: {e}")))?;
                None
            }
        }
    } else {
        let name = format!("{BUILD_ID_RECORD}/{key}");
        match ctx.kv.get(&name).await.map_err(transient)? {
            Some(other) => Some(other),
            None => {
                ctx.kv.put(&name, &mine).await.map_err(transient)?;
                None
            }
        }
    };
    match taken {
        Some(other) if other != mine => {
            let mut info = ErrorInfo::new(
                ErrorKind::InvalidMessage,
                &format!("build id {id:?} is taken by an earlier request; refused"),
            );
            info.help = Some("choose another id, or leave `id` out and kiln assigns one".into());
            Err(Failure::Input(info))
        }
        _ => Ok(()),
    }
}

/// The id of a request that has none: the request's publication time and stream sequence, in the
/// form of [`bus::new_build_id`], so every delivery attempt of the request assigns the same id.
fn assigned_id(d: &Delivery) -> String {
    match d.message().info() {
        Ok(info) => {
            let ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            assigned_build_id(ms, d.stream_sequence())
        }
        Err(_) => bus::new_build_id(),
    }
}

/// The id the source stage gives a request without one, from the request's publication time
/// (Unix milliseconds) and stream sequence.
pub fn assigned_build_id(published_ms: u64, sequence: u64) -> String {
    let stamp = bus::messages::format_rfc3339_ms(published_ms);
    let compact: String = stamp
        .chars()
        .take(19)
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("{compact}Z-{sequence:08x}")
}

type StageResult = (PipelineState, Value, CacheStatus);

async fn run(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    state: PipelineState,
) -> Result<StageResult, Failure> {
    match stage {
        bus::Stage::Source => source(ctx, state).await,
        bus::Stage::Render => render(ctx, state).await,
        bus::Stage::Rootfs => {
            pipeline(ctx, stage, state, vec![Stage::Packages, Stage::Rootfs]).await
        }
        bus::Stage::Kernel => pipeline(ctx, stage, state, vec![Stage::Kernel]).await,
        bus::Stage::Disk => pipeline(ctx, stage, state, vec![Stage::Disk]).await,
        bus::Stage::Verify => {
            let build = state.build.as_ref().ok_or_else(|| missing("render"))?;
            let stages = if !state.request.verify {
                Vec::new()
            } else if !state.request.profiles.is_empty() {
                state
                    .request
                    .profiles
                    .iter()
                    .cloned()
                    .map(Stage::Verify)
                    .collect()
            } else {
                let p = build.loaded.recipe.verify.profile.clone();
                vec![Stage::Verify(p.unwrap_or_else(|| "direct".into()))]
            };
            pipeline(ctx, stage, state, stages).await
        }
        bus::Stage::Publish => publish(ctx, state).await,
    }
}

/// The publish stage: see [`super::publish`]. The image message goes out before `completed`, so
/// whoever sees the build end finds the image announced.
async fn publish(ctx: &Arc<Ctx>, state: PipelineState) -> Result<StageResult, Failure> {
    let build = state.build.as_ref().ok_or_else(|| missing("render"))?;
    let id = state.request.id.clone().unwrap_or_default();
    let needs_disk = build.loaded.recipe.publish.is_some() && ctx.config.publish.is_some();
    let disk = match (&build.disk, needs_disk) {
        (Some(d), true) => {
            fetch(ctx, std::slice::from_ref(&d.image)).await?;
            ctx.env.blobs.path(&d.image)
        }
        (None, true) => return Err(missing("disk")),
        (_, false) => PathBuf::new(),
    };
    let st = state.clone();
    let target = ctx.config.publish.clone();
    let c = ctx.clone();
    let done = blocking(move || {
        let build = st.build.as_ref().ok_or_else(|| missing("render"))?;
        if needs_disk {
            check_verified(c.records().as_ref(), build)?;
        }
        publish_build(&id, build, st.commit.as_deref(), &disk, target.as_ref()).map_err(|e| {
            if e.kind == ErrorKind::Transient {
                Failure::Retry(e)
            } else {
                Failure::Input(e)
            }
        })
    })
    .await?;
    match done {
        Published::Skipped(why) => Ok((state, json!({ "skipped": why }), CacheStatus::Miss)),
        Published::Pushed { outputs, message } => {
            ctx.bus.publish_image(&message).await.map_err(transient)?;
            let cache = if outputs["uploaded"].as_u64() == Some(0) {
                CacheStatus::Hit
            } else {
                CacheStatus::Miss
            };
            Ok((state, outputs, cache))
        }
    }
}

/// Every boot the state reports must be one the verify stage recorded itself: this image, this
/// recipe's marker, this profile. Blocking.
fn check_verified(records: &dyn StageRecords, build: &BuildState) -> Result<(), Failure> {
    let Some(disk) = &build.disk else {
        return Err(missing("disk"));
    };
    let expect = &build.loaded.recipe.verify.expect;
    for boot in &build.boots {
        let key = verified_key(&disk.image, expect, &boot.profile);
        let recorded = records
            .get(VERIFIED, &key)
            .is_some_and(|r| r["image"].as_str() == Some(disk.image.to_string().as_str()));
        if !recorded {
            let mut info = ErrorInfo::new(
                ErrorKind::InvalidMessage,
                &format!(
                    "no verify stage recorded a passing {} boot of {} with this recipe's marker: \
                     refusing to sign and publish an image that was not seen to boot",
                    boot.profile, disk.image
                ),
            );
            info.help = Some("build it again; the verify stage must boot this image".into());
            return Err(Failure::Input(info));
        }
    }
    Ok(())
}

fn missing(what: &str) -> Failure {
    Failure::Input(ErrorInfo::new(
        ErrorKind::InvalidMessage,
        &format!("the message's state has no {what} outputs"),
    ))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Retry(ErrorInfo::new(ErrorKind::Internal, &e.to_string())))?
}

fn params(req: &BuildRequest) -> Vec<(String, String)> {
    req.params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A request that names what this worker's operator did not open to requests.
fn refused(e: AccessError) -> Failure {
    let mut info = ErrorInfo::new(ErrorKind::InvalidMessage, &e.to_string());
    info.help = Some(e.help().to_string());
    Failure::Input(info)
}

/// The request's recipe file and templates directory, checked against the recipe roots.
fn checked_paths(
    access: &RecipeAccess,
    request: &BuildRequest,
) -> Result<(Option<PathBuf>, Option<PathBuf>), Failure> {
    let recipe = match &request.recipe {
        RecipeSource::Path { path } => Some(access.check_path("recipe", path).map_err(refused)?),
        _ => None,
    };
    let templates = match &request.templates {
        Some(t) => Some(
            access
                .check_path("templates directory", t)
                .map_err(refused)?,
        ),
        None => None,
    };
    Ok((recipe, templates))
}

async fn source(ctx: &Arc<Ctx>, mut state: PipelineState) -> Result<StageResult, Failure> {
    checked_paths(&ctx.config.access, &state.request)?;
    if let RecipeSource::Git { git } = &state.request.recipe {
        ctx.config
            .access
            .check_git(&git.url, &ctx.config.home)
            .map_err(refused)?;
    }
    let outputs = match state.request.recipe.clone() {
        RecipeSource::Path { path } => {
            if !path.is_file() {
                let mut info = ErrorInfo::new(
                    ErrorKind::Recipe,
                    &format!(
                        "recipe {} does not exist on this worker (path recipes are read on the worker's file system; use an absolute path, or send it inline or from git)",
                        path.display()
                    ),
                );
                info.file = Some(path.display().to_string());
                return Err(Failure::Input(info));
            }
            json!({ "path": path })
        }
        RecipeSource::Inline { name, .. } => json!({ "inline": name }),
        RecipeSource::Git { git } => {
            let home = ctx.config.home.clone();
            let checkout = blocking(move || {
                crate::source::GitSource::with_home(&git.url, &home)
                    .and_then(|s| s.checkout(&git.git_ref, &git.path))
                    .map_err(source_failure)
            })
            .await?;
            state.commit = Some(checkout.commit.clone());
            state.time = Some(checkout.time);
            json!({ "commit": checkout.commit })
        }
    };
    Ok((state, outputs, CacheStatus::Miss))
}

async fn render(ctx: &Arc<Ctx>, mut state: PipelineState) -> Result<StageResult, Failure> {
    let home = ctx.config.home.clone();
    let st = state.clone();
    let access = ctx.config.access.clone();
    let limits = ctx.config.limits.clone();
    let loaded = blocking(move || {
        let set = params(&st.request);
        // Recipes see only the environment variables this worker's operator allowed.
        let env = Some(access.env_values());
        let load = |path: &std::path::Path, opts: &LoadOptions| {
            crate::recipe::load(path, opts).map_err(|d| {
                if d.kind == crate::recipe::DiagnosticKind::Io && out_of_resources(&d.message) {
                    // The worker ran out of descriptors or memory: not the recipe's fault.
                    transient(&d.message)
                } else {
                    Failure::Input(diagnostic_info(&d))
                }
            })
        };
        let (recipe_path, templates_dir) = checked_paths(&access, &st.request)?;
        let loaded = match &st.request.recipe {
            RecipeSource::Path { .. } => load(
                recipe_path.as_deref().ok_or_else(|| missing("source"))?,
                &LoadOptions {
                    set,
                    templates_dir,
                    env,
                    limits,
                    ..Default::default()
                },
            )?,
            RecipeSource::Inline { inline, name } => {
                let dir = tempfile::tempdir().map_err(transient)?;
                let file_name = std::path::Path::new(name)
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_else(|| "recipe.yaml".into());
                let path = dir.path().join(file_name);
                std::fs::write(&path, inline).map_err(transient)?;
                load(
                    &path,
                    &LoadOptions {
                        set,
                        env,
                        limits,
                        ..Default::default()
                    },
                )?
            }
            RecipeSource::Git { git } => {
                access.check_git(&git.url, &home).map_err(refused)?;
                let commit = st.commit.clone().ok_or_else(|| missing("source"))?;
                let checkout = crate::source::GitSource::with_home(&git.url, &home)
                    .and_then(|s| s.checkout(&commit, &git.path))
                    .map_err(source_failure)?;
                let mut opts = crate::source::load_options_for(&checkout, set);
                opts.git.reference = git.git_ref.clone();
                opts.env = env;
                opts.limits = limits;
                load(&checkout.recipe_path, &opts)?
            }
        };
        check_supported(&loaded).map_err(|e| stage_failure(&e))?;
        Ok(loaded)
    })
    .await?;
    let outputs = json!({ "inputs": loaded.inputs, "name": loaded.recipe.name });
    state.build = Some(BuildState::new(loaded));
    Ok((state, outputs, CacheStatus::Miss))
}

/// The file blobs a rootfs manifest names (the manifest blob must be local).
fn manifest_blobs(env: &StageEnv, manifest: &Digest256) -> Result<Vec<Digest256>, Failure> {
    let file = env.blobs.open(manifest).map_err(transient)?;
    let m: Manifest = serde_json::from_reader(std::io::BufReader::new(file)).map_err(transient)?;
    Ok(m.entries
        .into_iter()
        .filter_map(|e| match e.kind {
            ManifestKind::File { digest, .. } => Some(digest),
            _ => None,
        })
        .collect())
}

/// The file blobs of a Debian base's kernel (`/boot`, the module directories).
fn kernel_blobs(env: &StageEnv, base: &Digest256) -> Result<Vec<Digest256>, Failure> {
    let file = env.blobs.open(base).map_err(transient)?;
    let m: Manifest = serde_json::from_reader(std::io::BufReader::new(file)).map_err(transient)?;
    Ok(m.entries
        .into_iter()
        .filter(|e| crate::debian::holds_kernel(&e.path))
        .filter_map(|e| match e.kind {
            ManifestKind::File { digest, .. } => Some(digest),
            _ => None,
        })
        .collect())
}

/// Make `digests` local (from the object store when needed).
async fn fetch(ctx: &Ctx, digests: &[Digest256]) -> Result<(), Failure> {
    if ctx.config.local_blobs {
        return match digests.iter().find(|d| !ctx.blobs.local().contains(d)) {
            Some(d) => Err(transient(format!(
                "blob {d} is not in the local store {}",
                ctx.config.home.display()
            ))),
            None => Ok(()),
        };
    }
    for d in digests {
        ctx.blobs.get_blob(d).await.map_err(transient)?;
    }
    Ok(())
}

/// Put `digests` in the object store (a blob that is not local must be there already).
async fn upload(ctx: &Ctx, digests: &[Digest256]) -> Result<(), Failure> {
    if ctx.config.local_blobs {
        return Ok(());
    }
    for d in digests {
        if ctx.blobs.local().contains(d) {
            ctx.blobs.publish_local(d).await.map_err(transient)?;
        } else if !ctx.blobs.remote_has(d).await {
            return Err(transient(format!(
                "blob {d} is neither local nor in the object store"
            )));
        }
    }
    Ok(())
}

/// The blobs a pipeline stage produced.
async fn produced(ctx: &Ctx, state: &BuildState, stage: &Stage) -> Result<Vec<Digest256>, Failure> {
    Ok(match stage {
        Stage::Packages => state
            .packages
            .iter()
            .flat_map(|p| p.fetched(is_debian(&state.loaded)))
            .map(|p| p.sha256.clone())
            .collect(),
        Stage::Rootfs => {
            let Some(r) = &state.rootfs else {
                return Ok(Vec::new());
            };
            ctx.blobs.get_blob(&r.manifest).await.map_err(transient)?;
            let mut out = vec![r.manifest.clone()];
            // A Debian base's files are all in the image; its manifest is the kernel stage's.
            out.extend(r.base.clone());
            let env = ctx.env.clone();
            let m = r.manifest.clone();
            out.extend(blocking(move || manifest_blobs(&env, &m)).await?);
            out
        }
        Stage::Kernel => state
            .kernel
            .iter()
            .flat_map(|k| std::iter::once(k.vmlinuz.clone()).chain(k.initrd.clone()))
            .collect(),
        Stage::Disk => state.disk.iter().map(|d| d.image.clone()).collect(),
        Stage::Verify(_) => state
            .boots
            .iter()
            .filter_map(|b| b.serial_log_blob.clone())
            .filter(|d| ctx.blobs.local().contains(d))
            .collect(),
    })
}

/// Run pipeline `stages` in order on this worker: blobs in, run, blobs out.
async fn pipeline(
    ctx: &Arc<Ctx>,
    bus_stage: bus::Stage,
    mut state: PipelineState,
    stages: Vec<Stage>,
) -> Result<StageResult, Failure> {
    let mut build = state.build.take().ok_or_else(|| missing("render"))?;
    let build_id = state.request.id.clone().unwrap_or_default();
    let mut outputs = serde_json::Map::new();
    let mut all_hit = true;
    for stage in stages {
        let mut needed = build.blobs_needed(&stage);
        if stage == Stage::Disk
            && !ctx.config.local_blobs
            && let Some(r) = &build.rootfs
        {
            ctx.blobs.get_blob(&r.manifest).await.map_err(transient)?;
            let env = ctx.env.clone();
            let m = r.manifest.clone();
            needed.extend(blocking(move || manifest_blobs(&env, &m)).await?);
        }
        if stage == Stage::Kernel
            && !ctx.config.local_blobs
            && let Some(base) = build.rootfs.as_ref().and_then(|r| r.base.clone())
        {
            // The kernel of a Debian image is read from its base: its /boot and modules.
            ctx.blobs.get_blob(&base).await.map_err(transient)?;
            let env = ctx.env.clone();
            needed.extend(blocking(move || kernel_blobs(&env, &base)).await?);
        }
        fetch(ctx, &needed).await?;
        let records = ctx.records();
        // A counter of its own, so this build's mirror requests are counted alone.
        let mut env = ctx.env.clone();
        env.mirror_requests = Default::default();
        let st = stage.clone();
        let sink = BusProgress {
            bus: ctx.bus.clone(),
            rt: tokio::runtime::Handle::current(),
            build: build_id.clone(),
            stage: bus_stage,
            worker: ctx.config.name.clone(),
            last: Mutex::new(None),
        };
        let (b, report, requests) = blocking(move || {
            let mut b = build;
            let r = run_stage(&env, records.as_ref(), &st, &mut b, &sink)
                .map_err(|e| stage_failure(&e))?;
            let requests = env
                .mirror_requests
                .load(std::sync::atomic::Ordering::Relaxed);
            Ok((b, r, requests))
        })
        .await?;
        build = b;
        state.mirror_requests += requests;
        state.reports.push(report.clone());
        if !ctx.config.local_blobs {
            let blobs = produced(ctx, &build, &stage).await?;
            upload(ctx, &blobs).await?;
        }
        all_hit &= report.cache == "hit";
        let key = match &stage {
            Stage::Verify(p) => format!("verify.{p}"),
            s => s.name().to_string(),
        };
        outputs.insert(key, report.outputs);
    }
    state.build = Some(build);
    let cache = if all_hit && !outputs.is_empty() {
        CacheStatus::Hit
    } else {
        CacheStatus::Miss
    };
    Ok((state, Value::Object(outputs), cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_accepts_a_documented_request() {
        let request: BuildRequest = crate::bus::decode(
            br#"{ "v": 1, "recipe": { "path": "recipes/minimal.yaml" }, "requester": "alice" }"#,
        )
        .unwrap();
        let state = PipelineState {
            request,
            commit: Some("0123".into()),
            time: Some(1_700_000_000),
            build: None,
            reports: Vec::new(),
            mirror_requests: 0,
        };
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["request"]["recipe"]["path"], "recipes/minimal.yaml");
        assert!(v.get("build").is_none());
        let back: PipelineState = serde_json::from_value(v).unwrap();
        assert_eq!(back.commit.as_deref(), Some("0123"));
        assert_eq!(back.request.requester, "alice");
    }

    #[test]
    fn publish_signs_only_what_the_verify_stage_recorded() {
        use crate::pipeline::stages::{BootSummary, DiskOut};
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.yaml");
        std::fs::write(
            &recipe,
            "name: r\nkernel: { package: linux-image-cloud-amd64 }\nboot: { loader: none }\n\
             disk: { partitions: [ { name: root, type: root, size: auto } ] }\n\
             verify: { expect: marker-1 }\n",
        )
        .unwrap();
        let loaded = crate::recipe::load(&recipe, &LoadOptions::default()).unwrap();
        let mut build = BuildState::new(loaded);
        let image = Digest256::from_sha256(&[7u8; 32]);
        build.disk = Some(DiskOut {
            image: image.clone(),
            format: "raw".into(),
            disk_size: 1 << 20,
            file_size: 1 << 20,
        });
        build.boots.push(BootSummary {
            profile: "direct".into(),
            serial_log: None,
            serial_log_blob: None,
            accel: "tcg".into(),
            time_to_first_output: None,
            time_to_kernel: None,
            time_to_marker: 1.0,
            total: 1.0,
            marker_line: "marker-1".into(),
        });
        let records = StageCache::new(dir.path());
        let refused = check_verified(&records, &build).unwrap_err();
        assert!(
            refused.to_string().contains("not seen to boot"),
            "{refused}"
        );
        // A record for another image, marker or profile does not count.
        let expect = Some("marker-1".to_string());
        let other = Digest256::from_sha256(&[8u8; 32]);
        for (img, exp, profile) in [
            (&other, &expect, "direct"),
            (&image, &Some("marker-2".to_string()), "direct"),
            (&image, &expect, "uefi"),
        ] {
            let rec = json!({ "image": img });
            records
                .put(VERIFIED, &verified_key(img, exp, profile), &rec)
                .unwrap();
        }
        assert!(check_verified(&records, &build).is_err());
        records
            .put(
                VERIFIED,
                &verified_key(&image, &expect, "direct"),
                &json!({ "image": image }),
            )
            .unwrap();
        assert!(check_verified(&records, &build).is_ok());
    }

    #[test]
    fn running_out_of_descriptors_is_not_a_recipe_error() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(out_of_resources(&format!(
            "cannot read recipe /r.yaml: {emfile}"
        )));
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(!out_of_resources(&format!(
            "cannot read recipe /r.yaml: {missing}"
        )));
    }

    #[test]
    fn a_state_keeps_its_digest_through_a_message() {
        // Stage times are floats: the digest a worker records must be the one the next worker
        // computes from the message it receives.
        let mut floats = Vec::new();
        let mut x = 0.1f64;
        for i in 0..2000 {
            x = x * 1.000_123_7 + f64::from(i) * 1e-9;
            floats.push(x);
            floats.push(1.0 / (f64::from(i) + 3.0));
        }
        let state = json!({ "reports": floats, "n": u64::MAX, "neg": -1.5e-300 });
        let wire = serde_json::to_vec(&json!({ "state": state })).unwrap();
        let received: Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(state_digest(&state), state_digest(&received["state"]));
    }

    #[test]
    fn recipe_errors_keep_their_place_and_others_retry() {
        let d = Diagnostic::new(crate::recipe::diag::Kind::Schema, "unknown field `kernal`").at(
            Some(crate::recipe::diag::Place {
                file: PathBuf::from("/r/bad.yaml"),
                pos: crate::recipe::diag::Pos { line: 3, column: 1 },
                line_text: "kernal:".into(),
                rendered: None,
            }),
        );
        let info = diagnostic_info(&d);
        assert_eq!(info.kind, ErrorKind::Recipe);
        assert_eq!(
            (info.file.as_deref(), info.line, info.column),
            (Some("/r/bad.yaml"), Some(3), Some(1))
        );
        assert!(matches!(
            stage_failure(&StageError::Unsupported("kernel.build".into())),
            Failure::Input(ErrorInfo {
                kind: ErrorKind::Recipe,
                ..
            })
        ));
        assert!(matches!(
            stage_failure(&StageError::Missing("packages")),
            Failure::Retry(_)
        ));
    }
}
