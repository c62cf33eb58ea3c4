//! kiln's stages as NATS JetStream workers: one [`bus::Worker`] per stage, each running the
//! stage's work ([`super::stages::run_one`], the same code `kiln build --no-bus` runs) for the
//! messages of its durable consumer.
//!
//! Every `completed` message carries the accumulated [`Handover`] in `state`; a worker uses it
//! only when a worker recorded that exact state for that build and stage (the message is a
//! trigger, not a proof). Before a stage runs, the worker makes every blob it needs local through
//! the `kiln-blobs` object store; after it runs, it uploads every blob the stage produced, then
//! publishes `completed`, so the next stage may run on another host. Stage records live in the
//! local records and in the `kiln-stages` KV bucket. Input errors (a recipe, a refused request, an
//! image that does not boot) give one `failed` message and no retry; other errors are retried,
//! and the last attempt publishes `failed`.

use super::access::RecipeAccess;
use super::records::{LocalRecords, MemoryRecords, StageRecords, stage_key};
use super::stages::{
    Handover, Need, ProgressSink, ProgressUpdate, PublishTarget, StageEnv, StageError, needs,
    produced, run_one,
};
use crate::bus::{
    self, BlobError, Blobs, BuildRequest, Bus, BusError, CacheStatus, Delivery, ErrorInfo,
    ErrorKind, EventTime, Outcome, RetryPolicy, StageCompleted, StageEvent, StageFailed,
    StageOutputs, StageProgress, StageStarted, VERSION,
};
use crate::digest::Digest256;
use crate::gc::Refs;
use crate::gc::lease::Lease;
use crate::metrics;
use crate::packages::ArchiveOptions;
use crate::recipe::Diagnostic;
use crate::task::blocking;
use serde_json::{Value, json};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shortest time between two `progress` messages of one stage run.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

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
    /// Collect this worker's `$KILN_HOME` when it grows past this many bytes (after a stage).
    pub cache_max: Option<u64>,
}

impl WorkerConfig {
    /// Defaults for this process: `$KILN_HOME`, archive settings from the environment, name
    /// `<hostname>/<pid>`.
    pub fn from_env() -> Self {
        WorkerConfig {
            home: crate::home::kiln_home(),
            archive: ArchiveOptions::from_env(),
            profiles_dir: None,
            name: default_worker_name(),
            policy: RetryPolicy::default(),
            local_blobs: false,
            publish: None,
            access: RecipeAccess::default(),
            limits: Default::default(),
            cache_max: None,
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

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Blob(#[from] BlobError),
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

/// A stage's error as a `failed` message's error: input errors are final, the rest retried.
fn stage_failure(e: &StageError) -> Failure {
    let kind = e.kind();
    let info = match e {
        StageError::Recipe(d) => {
            let mut info = diagnostic_info(d);
            info.kind = kind;
            info
        }
        StageError::Refused(access) => {
            let mut info = ErrorInfo::from_error(kind, access);
            info.help = Some(access.help().to_string());
            info
        }
        StageError::NotVerified { .. } => {
            let mut info = ErrorInfo::from_error(kind, e);
            info.help = Some("build it again; the verify stage must boot this image".into());
            info
        }
        _ => ErrorInfo::from_error(kind, e),
    };
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
    fn progress(&self, update: ProgressUpdate) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let done = update.fraction.is_some_and(|f| f >= 1.0);
            if !done && last.is_some_and(|t| now.duration_since(t) < PROGRESS_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let msg = StageEvent::Progress(StageProgress {
            v: VERSION,
            build: self.build.clone(),
            stage: self.stage,
            worker: self.worker.clone(),
            time: EventTime::now(),
            fraction: update.fraction,
            message: Some(update.message),
        });
        if let Err(e) = self.rt.block_on(self.bus.publish_event(&msg)) {
            tracing::debug!(stage = %self.stage, "cannot publish progress: {e}");
        }
    }
}

/// Stage records in the local stage cache and the shared KV bucket (get: local, else KV; put:
/// both). Used from blocking code: KV calls run on `rt`.
struct SharedRecords {
    local: LocalRecords,
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

/// Everything the handlers share.
struct Ctx {
    bus: Bus,
    blobs: Blobs,
    kv: StageOutputs,
    env: StageEnv,
    config: WorkerConfig,
    /// The hand-over records of a private bus (see [`Ctx::handoff_records`]).
    memory: MemoryRecords,
    /// What this process's builds use, for collections.
    lease: Arc<Lease>,
    /// The `--cache-max` collection: running, and when the cache was last measured.
    collecting: Arc<std::sync::atomic::AtomicBool>,
    measured: Mutex<Option<Instant>>,
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
            Box::new(LocalRecords::new(&self.config.home))
        } else {
            Box::new(SharedRecords {
                local: LocalRecords::new(&self.config.home),
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
    stage_key(STATE_RECORD, 1, state)
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
            .map_err(|e| {
                transient(format!(
                    "recording the state handed on: {}",
                    crate::error::Chain(&e)
                ))
            })
    })
    .await
}

/// Refuse a `completed` message whose state no worker recorded for its build and stage: a
/// forged or altered message.
async fn check_state(ctx: &Arc<Ctx>, prev: &Previous) -> Result<(), Failure> {
    let key = prev.digest.clone();
    let c = ctx.clone();
    let record =
        blocking(move || Ok::<_, Failure>(c.handoff_records().get(STATE_RECORD, &key))).await?;
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
    bus.ensure_kiln_stream().await?;
    // What a killed worker left half-written (an image, a blob) must not pile up or be used.
    match crate::home::sweep_stale_temp(&config.home) {
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
    let mut env = StageEnv::new(
        config.home.clone(),
        config.archive.clone(),
        config.profiles_dir.clone(),
    );
    env.access = config.access.clone();
    env.limits = config.limits.clone();
    env.publish = config.publish.clone();
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        blobs: Blobs::open(bus, env.blobs.clone()).await?,
        kv: StageOutputs::open(bus).await?,
        env,
        config: config.clone(),
        memory: MemoryRecords::default(),
        lease: Arc::new(Lease::new(&config.home)),
        collecting: Default::default(),
        measured: Mutex::new(None),
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
    let pinned = serde_json::to_value(&state)
        .map(|v| Refs::of(&v))
        .unwrap_or_default();
    ctx.lease.stage_started(&build, pinned.clone());
    let result = run(&ctx, stage, state, &build).await;
    let outcome = finish(&ctx, stage, build.clone(), &d, started, result).await;
    match &outcome {
        Ok(Outcome::Done) if stage != bus::Stage::Publish => {}
        // Retried later (here or elsewhere): what it started with stays pinned meanwhile.
        Err(_) => ctx.lease.stage_ended(&build, pinned),
        _ => ctx.lease.build_ended(&build),
    }
    collect_if_full(&ctx);
    outcome
}

/// How often a worker with `--cache-max` measures its cache (after a stage).
const CACHE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// With `--cache-max`: after a stage, when the cache grew past it, collect it (in the
/// background, one collection at a time) down to 90% of it, so the next stages do not collect
/// again at once. What running builds use stays (their leases).
fn collect_if_full(ctx: &Arc<Ctx>) {
    use std::sync::atomic::Ordering;
    let Some(max) = ctx.config.cache_max else {
        return;
    };
    {
        let mut measured = ctx.measured.lock().unwrap_or_else(|e| e.into_inner());
        if measured.is_some_and(|t| t.elapsed() < CACHE_CHECK_INTERVAL) {
            return;
        }
        *measured = Some(Instant::now());
    }
    if ctx.collecting.swap(true, Ordering::SeqCst) {
        return;
    }
    let collecting = ctx.collecting.clone();
    let home = ctx.config.home.clone();
    tokio::task::spawn_blocking(move || {
        let bytes = crate::gc::cache_bytes(&home);
        if bytes > max {
            let policy = crate::gc::Policy {
                keep: None,
                max_size: Some(max / 10 * 9),
                ..Default::default()
            };
            match crate::gc::collect(&home, &policy, &|_| {}) {
                Ok(r) => tracing::info!(
                    "cache {} over --cache-max {}: collected {}, now {}",
                    crate::gc::human_bytes(bytes),
                    crate::gc::human_bytes(max),
                    crate::gc::human_bytes(r.freed_bytes()),
                    crate::gc::human_bytes(r.after_bytes)
                ),
                Err(e) => tracing::warn!(
                    "cannot collect the cache in {}: {}",
                    home.display(),
                    crate::error::Chain(&e)
                ),
            }
        }
        collecting.store(false, Ordering::SeqCst);
    });
}

/// Publish what became of a stage run: `completed`, or `failed` (now, or on the last attempt).
async fn finish(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    build: String,
    d: &Delivery,
    started: Instant,
    result: Result<StageResult, Failure>,
) -> Result<Outcome, Failure> {
    let m = metrics::global();
    match result {
        Ok((state, outputs, cache)) => {
            let state = serde_json::to_value(&state).map_err(transient)?;
            ctx.lease.stage_ended(&build, Refs::of(&state));
            record_state(ctx, &build, stage, &state).await?;
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
            let cache_name = match cache {
                CacheStatus::Hit => "hit",
                _ => "miss",
            };
            m.stage_completed(stage.name(), started.elapsed().as_secs_f64(), cache_name);
            if stage == bus::Stage::Publish {
                m.build_ended("succeeded");
            }
            Ok(Outcome::Done)
        }
        Err(Failure::Input(info)) => {
            publish_failed(ctx, &build, stage, info, d, started).await;
            Ok(Outcome::Final)
        }
        Err(Failure::Retry(info)) => {
            if d.is_last_attempt() {
                publish_failed(ctx, &build, stage, info.clone(), d, started).await;
            } else {
                m.retry(stage.name(), &error_kind_name(&info));
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
                        error_kind_name(&info),
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

/// An error kind as its messages spell it (`transient`, `recipe`, …).
fn error_kind_name(info: &ErrorInfo) -> String {
    serde_json::to_value(info.kind)
        .ok()
        .and_then(|k| k.as_str().map(str::to_string))
        .unwrap_or_default()
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
    let m = metrics::global();
    m.failure(stage.name(), &error_kind_name(&failed.error));
    m.build_ended("failed");
    let msg = StageEvent::Failed(failed);
    if let Err(e) = publish_reliably(&ctx.bus, &msg).await {
        tracing::warn!(%stage, build, "cannot publish failed: {}", crate::error::Chain(&e));
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
type Input = (String, Handover, Option<Previous>);

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
                return Err((id, invalid(&crate::error::Chain(&e))));
            }
        };
        if let Err(e) = request.check() {
            return Err((
                refused_id(request.id.as_deref()),
                invalid(&crate::error::Chain(&e)),
            ));
        }
        let id = request.id.clone().unwrap_or_else(|| assigned_id(d));
        request.id = Some(id.clone());
        return Ok((id, Handover::new(request), None));
    }
    let prev: StageCompleted = match d.decode() {
        Ok(p) => p,
        Err(e) => {
            let id = bus::subjects::parse_stage_subject(d.subject())
                .map(|s| s.build)
                .unwrap_or_else(|| format!("invalid-{}", d.stream_sequence()));
            return Err((id, invalid(&crate::error::Chain(&e))));
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
    match serde_json::from_value::<Handover>(prev.state) {
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
    let key = stage_key(BUILD_ID_RECORD, 1, &id);
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
                records.put(BUILD_ID_RECORD, &key, &mine).map_err(|e| {
                    transient(format!(
                        "recording the build id: {}",
                        crate::error::Chain(&e)
                    ))
                })?;
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
    let stamp = crate::time::basic_stamp(i64::try_from(published_ms).unwrap_or(i64::MAX));
    format!("{stamp}-{sequence:08x}")
}

type StageResult = (Handover, Value, CacheStatus);

/// Run `stage` on this worker: blobs in, [`run_one`], blobs out, and the image announcement of
/// the publish stage (before `completed`, so whoever sees the build end finds it announced).
async fn run(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    h: Handover,
    build_id: &str,
) -> Result<StageResult, Failure> {
    let needed = needs(&ctx.env, stage, &h);
    let mut again = false;
    let (h, ran) = loop {
        fetch(ctx, &needed).await?;
        let records = ctx.records();
        // A counter of its own, so this build's mirror requests are counted alone.
        let env = ctx.env.counting();
        let sink = BusProgress {
            bus: ctx.bus.clone(),
            rt: tokio::runtime::Handle::current(),
            build: build_id.to_string(),
            stage,
            worker: ctx.config.name.clone(),
            last: Mutex::new(None),
        };
        let mut h = h.clone();
        let ran = blocking(move || {
            let ran = run_one(&env, records.as_ref(), stage, &mut h, &sink)
                .map_err(|e| stage_failure(&e))?;
            h.mirror_requests += env.requests();
            Ok::<_, Failure>((h, ran))
        })
        .await;
        match ran {
            // A blob it needed vanished while it ran (a collection): fetch it and run again.
            Err(Failure::Retry(info))
                if !again && !ctx.config.local_blobs && vanished(ctx, &needed).await =>
            {
                tracing::warn!(
                    %stage,
                    build = build_id,
                    "a blob the stage needs left the local store while it ran ({}): fetching it again",
                    info.message
                );
                again = true;
            }
            ran => break ran?,
        }
    };
    if !ctx.config.local_blobs {
        upload(ctx, &produced(stage, &h)).await?;
    }
    if let Some(message) = &ran.announce {
        ctx.bus.publish_image(message).await.map_err(transient)?;
    }
    Ok((h, ran.report.outputs, ran.report.cache))
}

/// Make what a stage needs local (from the object store when needed). A worker sharing this
/// host's `$KILN_HOME` only checks that the blobs are here.
async fn fetch(ctx: &Arc<Ctx>, needs: &[Need]) -> Result<(), Failure> {
    if ctx.config.local_blobs {
        return match needs
            .iter()
            .find(|n| !ctx.blobs.local().contains(n.digest()))
        {
            Some(n) => Err(transient(format!(
                "blob {} is not in the local store {}",
                n.digest(),
                ctx.config.home.display()
            ))),
            None => Ok(()),
        };
    }
    for need in needs {
        ctx.blobs.get_blob(need.digest()).await.map_err(transient)?;
        for d in files_of(ctx, need).await? {
            ctx.blobs.get_blob(&d).await.map_err(transient)?;
        }
    }
    Ok(())
}

/// Whether a blob of `needed` (or a file its manifest lists) is not in the local store.
async fn vanished(ctx: &Arc<Ctx>, needed: &[Need]) -> bool {
    let blobs = ctx.env.blobs.clone();
    let needed = needed.to_vec();
    blocking(move || {
        Ok::<_, Failure>(
            needed
                .iter()
                .filter(|n| !matches!(n, Need::IfHere(_)))
                .any(|n| {
                    !blobs.contains(n.digest())
                        || n.files(&blobs)
                            .map_or(true, |files| files.iter().any(|d| !blobs.contains(d)))
                }),
        )
    })
    .await
    .unwrap_or(false)
}

/// Put what a stage produced in the object store (a blob that is not local must be there
/// already).
async fn upload(ctx: &Arc<Ctx>, produced: &[Need]) -> Result<(), Failure> {
    for need in produced {
        if let Need::Tree(m) | Need::KernelOf(m) = need {
            // Its manifest must be here to list its files.
            ctx.blobs.get_blob(m).await.map_err(transient)?;
        }
        let files = files_of(ctx, need).await?;
        // What this process remembers the bucket holds may have been collected since (`kiln gc
        // --nats`): the blob itself is asked about now, and when it went, its files are too.
        ctx.blobs.remote_has_now(need.digest(), &files).await;
        let mut digests = vec![need.digest().clone()];
        digests.extend(files);
        for d in &digests {
            if ctx.blobs.local().contains(d) {
                ctx.blobs.publish_local(d).await.map_err(transient)?;
            } else if matches!(need, Need::IfHere(_)) {
                continue;
            } else if !ctx.blobs.remote_has(d).await {
                return Err(transient(format!(
                    "blob {d} is neither local nor in the object store"
                )));
            }
        }
    }
    Ok(())
}

/// The files a manifest names (none for a single blob). Its blob must be local.
async fn files_of(ctx: &Arc<Ctx>, need: &Need) -> Result<Vec<Digest256>, Failure> {
    if let Need::Blob(_) | Need::IfHere(_) = need {
        return Ok(Vec::new());
    }
    let blobs = ctx.env.blobs.clone();
    let need = need.clone();
    blocking(move || need.files(&blobs).map_err(|e| stage_failure(&e))).await
}

impl From<tokio::task::JoinError> for Failure {
    fn from(e: tokio::task::JoinError) -> Failure {
        Failure::Retry(ErrorInfo::new(ErrorKind::Internal, &e.to_string()))
    }
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
        let mut state = Handover::new(request);
        state.commit = Some("0123".into());
        state.time = Some(1_700_000_000);
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["request"]["recipe"]["path"], "recipes/minimal.yaml");
        assert!(v.get("build").is_none());
        let back: Handover = serde_json::from_value(v).unwrap();
        assert_eq!(back.commit.as_deref(), Some("0123"));
        assert_eq!(back.request.requester, "alice");
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
