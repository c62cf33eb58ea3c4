//! kiln's stages as NATS JetStream workers: one [`bus::Worker`] per stage, each running the
//! stage's work ([`super::stages::run_one`], the same code `kiln build --no-bus` runs) for the
//! messages of its durable consumer.
//!
//! Every `completed` message names the accumulated [`Handover`] by digest; the state itself is
//! in the hand-over records ([`super::handoff`]), and a worker uses it only when a worker
//! recorded that exact state for that build and stage (the message is a trigger, not a proof).
//! Before a stage runs, the worker makes every blob it needs local through the `kiln-blobs`
//! object store; after it runs, it uploads every blob the stage produced, then publishes
//! `completed`, so the next stage may run on another host. Stage records live in the local
//! records and in the `kiln-stages` KV bucket, written only once every blob they name is
//! uploaded; a blob that is lost (nowhere, or damaged here) is fetched again or made again by
//! the stage that produced it (see `pipeline::recovery`). Handed-on states live in
//! `kiln-states`. Every event a worker publishes that moves a build on updates its summary in
//! the build index (`kiln-builds`). Input errors (a recipe, a refused request, an image that
//! does not boot) and a full disk give one `failed` message and no retry; other errors are
//! retried, and the last attempt publishes `failed`.

use super::access::RecipeAccess;
use super::handoff;
use super::records::{HeldRecords, LocalRecords, MemoryRecords, StageRecords, stage_key};
use super::recovery::{MAX_RECOVERIES, forget_stage, lost_note, producer_of};
use super::stages::{
    Handover, Need, ProgressSink, ProgressUpdate, PublishTarget, StageEnv, StageError, needs,
    produced, run_one,
};
use crate::bus::{
    self, BlobError, Blobs, BuildIndex, BuildRequest, Bus, BusError, COMPLETED_VERSION,
    CacheStatus, Delivery, ErrorInfo, ErrorKind, EventTime, Outcome, RetryPolicy, StageCompleted,
    StageEvent, StageFailed, StageOutputs, StageProgress, StageStarted, VERSION,
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
    /// The verify stage's key for boot attestations (none: it signs none).
    pub verifier: Option<crate::store::SigningKey>,
    /// The disk stage's Secure Boot key (its certificate at `<key>.crt`); default
    /// `$KILN_HOME/secureboot.key`, made when a recipe first asks for Secure Boot.
    pub secure_boot_key: Option<std::path::PathBuf>,
    /// What build requests may reach on this worker (recipe roots, git repositories,
    /// environment variables): nothing by default.
    pub access: RecipeAccess,
    /// Bounds on loading a recipe (template fuel, time, output, file sizes).
    pub limits: crate::recipe::limits::Limits,
    /// Where a private bus (`local_blobs`) keeps the states stages hand on: this process's
    /// memory, shared with whoever reads the build's final state (`kiln build`).
    pub handoff: MemoryRecords,
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
            verifier: None,
            secure_boot_key: None,
            access: RecipeAccess::default(),
            limits: Default::default(),
            handoff: MemoryRecords::default(),
            cache_max: None,
        }
    }
}

/// `<hostname>/<pid>`.
pub fn default_worker_name() -> String {
    format!("{}/{}", host_name(), std::process::id())
}

/// This host's name (`localhost` when it cannot be read): what attestations name as the builder
/// and the verifier.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
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

/// A full (or over-quota, or read-only) disk under `home`: reported at once, not retried.
fn no_space_info(home: &std::path::Path, e: &(dyn std::error::Error + 'static)) -> ErrorInfo {
    let mut info = ErrorInfo::new(
        ErrorKind::NoSpace,
        &format!(
            "no space left on device under {}: {}",
            home.display(),
            crate::error::Chain(e)
        ),
    );
    info.help = Some(format!(
        "free space under {} (or give the worker another KILN_HOME) and submit the build again",
        home.display()
    ));
    info
}

/// A blob transfer's error: a full disk is final, anything else retried.
fn blob_failure(home: &std::path::Path, e: &BlobError) -> Failure {
    if crate::error::is_no_space(e) {
        Failure::Input(no_space_info(home, e))
    } else {
        transient(crate::error::Chain(e))
    }
}

/// A stage's error as a `failed` message's error: input errors are final, the rest retried.
fn stage_failure(home: &std::path::Path, e: &StageError) -> Failure {
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
        _ if kind == ErrorKind::NoSpace => no_space_info(home, e),
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

/// Records in one shared KV bucket. Used from blocking code: KV calls run on `rt`.
struct BucketRecords {
    kv: StageOutputs,
    rt: tokio::runtime::Handle,
}

impl StageRecords for BucketRecords {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value> {
        match self.rt.block_on(self.kv.get(&format!("{stage}/{key}"))) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, "reading the shared record: {e}");
                None
            }
        }
    }

    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        self.rt
            .block_on(self.kv.put(&format!("{stage}/{key}"), outputs))
            .map_err(std::io::Error::other)
    }

    fn remove(&self, stage: &str, key: &Digest256) -> std::io::Result<()> {
        self.rt
            .block_on(self.kv.remove(&format!("{stage}/{key}")))
            .map_err(std::io::Error::other)
    }
}

/// Stage records in the local stage cache and the shared KV bucket (get: local, else KV; put:
/// both).
struct SharedRecords {
    local: LocalRecords,
    shared: BucketRecords,
}

impl StageRecords for SharedRecords {
    fn get(&self, stage: &str, key: &Digest256) -> Option<Value> {
        if let Some(v) = self.local.get(stage, key) {
            return Some(v);
        }
        let v = self.shared.get(stage, key)?;
        let _ = self.local.put(stage, key, &v);
        Some(v)
    }

    fn put(&self, stage: &str, key: &Digest256, outputs: &Value) -> std::io::Result<()> {
        self.local.put(stage, key, outputs)?;
        self.shared.put(stage, key, outputs)
    }

    fn remove(&self, stage: &str, key: &Digest256) -> std::io::Result<()> {
        self.local.remove(stage, key)?;
        self.shared.remove(stage, key)
    }
}

/// Everything the handlers share.
struct Ctx {
    bus: Bus,
    /// The build index, kept current with every event this worker publishes.
    index: BuildIndex,
    blobs: Blobs,
    kv: StageOutputs,
    /// The `kiln-states` bucket: the states stages hand on.
    states: StageOutputs,
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
    /// Where the records of what stages hand on (states; a private bus's build-id claims) live:
    /// with the stream they are about — the shared `kiln-states` bucket (never a worker's local
    /// cache, which outlives the stream), or this process for a private bus. Blocking.
    fn handoff_records(&self) -> Box<dyn StageRecords + Send> {
        if self.config.local_blobs {
            Box::new(self.memory.clone())
        } else {
            Box::new(BucketRecords {
                kv: self.states.clone(),
                rt: tokio::runtime::Handle::current(),
            })
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
                shared: BucketRecords {
                    kv: self.kv.clone(),
                    rt: tokio::runtime::Handle::current(),
                },
            })
        }
    }
}

/// Record the state `stage` of `build` hands on; returns the digest its `completed` names.
async fn record_state(
    ctx: &Arc<Ctx>,
    build: &str,
    stage: bus::Stage,
    state: Handover,
) -> Result<Digest256, Failure> {
    let c = ctx.clone();
    let build = build.to_string();
    blocking(move || {
        handoff::record_state(c.handoff_records().as_ref(), &build, stage, &state)
            .map_err(|e| transient(crate::error::Chain(&e)))
    })
    .await
}

/// The state the previous stage handed on, loaded by the digest its `completed` message names.
/// A digest that no worker recorded for that build and stage is refused (a forged or altered
/// message): an input error, not retried.
async fn load_state(ctx: &Arc<Ctx>, prev: &Previous) -> Result<Handover, Failure> {
    let (build, stage, digest) = (prev.build.clone(), prev.stage, prev.digest.clone());
    let loaded = if ctx.config.local_blobs {
        handoff::load_state(&ctx.memory, &build, stage, &digest)
    } else {
        // Read the bucket here rather than through `StageRecords`, so that a bucket that cannot
        // be reached is retried, not taken for a state nobody recorded.
        let record = match handoff::record_key(&digest) {
            Some(key) => ctx
                .states
                .get(&key)
                .await
                .map_err(|e| transient(crate::error::Chain(&e)))?,
            None => None,
        };
        handoff::state_from_record(record, &build, stage, &digest)
    };
    loaded.map_err(|e| {
        if !e.is_refusal() {
            return transient(crate::error::Chain(&e));
        }
        let mut info = ErrorInfo::from_error(ErrorKind::InvalidMessage, &e);
        info.help = Some(
            "only stage workers publish stage events; submit builds on kiln.build.requested \
             (see the README's Security model for the NATS permissions that enforce this)"
                .into(),
        );
        Failure::Input(info)
    })
}

/// The stage whose `completed` message triggered this one, and the digest of its state.
struct Previous {
    build: String,
    stage: bus::Stage,
    digest: String,
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
    env.verifier = config.verifier.clone();
    env.secure_boot_key = config.secure_boot_key.clone();
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        index: BuildIndex::open(bus).await?,
        blobs: Blobs::open(bus, env.blobs.clone()).await?,
        kv: StageOutputs::open(bus).await?,
        states: StageOutputs::open_bucket(bus, bus::STATE_BUCKET).await?,
        env,
        config: config.clone(),
        memory: config.handoff.clone(),
        lease: Arc::new(Lease::new(&config.home)),
        collecting: Default::default(),
        measured: Mutex::new(None),
    });
    let mut workers = Vec::new();
    for stage in stages {
        workers.push(bus::Worker::new(bus, *stage, config.policy.clone()).await?);
    }
    tracing::info!(
        "worker {} ready: stream {}, stage consumers, {} and {} set up (asking for {} replica(s))",
        config.name,
        bus::STREAM,
        bus::STAGE_BUCKET,
        bus::BLOB_BUCKET,
        bus.replicas()
    );
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
    let watch = bus.watch_stream(bus::STREAM);
    tokio::pin!(watch);
    let results = tokio::select! {
        r = &mut all => r,
        never = &mut watch => match never {},
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
    // A message redelivered after its stage ended (the ack was lost, e.g. in a leader change):
    // the build has moved on, and running the stage again would hand its state on twice.
    if d.attempt() > 1 {
        match ctx.bus.stage_ended(&build, stage).await {
            Ok(true) => {
                tracing::info!(%stage, build, "already ended; redelivery acknowledged");
                return Ok(Outcome::Done);
            }
            Ok(false) => {}
            // Not knowing is no reason to spend an attempt: the stage runs (its records make a
            // second run cheap).
            Err(e) => tracing::debug!(%stage, build, "cannot tell whether the stage ended: {}",
                crate::error::Chain(&e)),
        }
    }
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
            Err(Failure::Retry(info)) => {
                // The last attempt says why, or whoever follows the build waits for ever.
                if d.is_last_attempt() {
                    publish_failed(&ctx, &build, stage, info.clone(), &d, started).await;
                }
                return Err(Failure::Retry(info));
            }
        }
    }
    let state = match (state, &prev) {
        (Some(state), _) => state,
        (None, Some(prev)) => match load_state(&ctx, prev).await {
            Ok(state) => state,
            Err(Failure::Input(info)) => {
                tracing::warn!(%stage, build, "{}", info.message);
                publish_failed(&ctx, &build, stage, info, &d, started).await;
                return Ok(Outcome::Final);
            }
            Err(e) => return Err(e),
        },
        (None, None) => {
            return Err(transient("a message with neither a request nor a state"));
        }
    };
    let started_event = StageEvent::Started(StageStarted {
        v: VERSION,
        build: build.clone(),
        stage,
        worker: ctx.config.name.clone(),
        time: EventTime::now(),
        attempt: Some(d.attempt()),
    });
    let _ = ctx.bus.publish_event(&started_event).await;
    // The index learns of a build when its source stage starts; after that, from each stage's
    // `completed` (which makes the next stage the build's current one) and `failed`.
    if stage == bus::Stage::Source {
        let request = Some((&state.request, published_ms(&d)));
        index_event(&ctx, &started_event, request).await;
    }
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
            let value = serde_json::to_value(&state).map_err(transient)?;
            ctx.lease.stage_ended(&build, Refs::of(&value));
            let digest = record_state(ctx, &build, stage, state).await?;
            let done = StageEvent::Completed(StageCompleted {
                v: COMPLETED_VERSION,
                build,
                stage,
                worker: ctx.config.name.clone(),
                time: EventTime::now(),
                outputs,
                state_digest: digest.to_string(),
                cache,
                duration_ms: started.elapsed().as_millis() as u64,
            });
            publish_reliably(&ctx.bus, &done).await.map_err(transient)?;
            index_event(ctx, &done, None).await;
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
    index_event(ctx, &msg, None).await;
}

/// Bring the build's summary in the build index up to date with `event` it just published (and,
/// for the source stage, the request and when it was stored). The index is a view of the
/// stream: a failure to update it is logged and never fails the stage.
async fn index_event(ctx: &Ctx, event: &StageEvent, request: Option<(&BuildRequest, u64)>) {
    let now = crate::time::now_ms();
    let first_seen = request.map(|(_, at)| at).unwrap_or(now);
    let updated = ctx
        .index
        .update(event.build(), first_seen, |s| {
            if let Some((r, at)) = request {
                s.apply_request(r, at);
            }
            s.apply(event, now);
        })
        .await;
    if let Err(e) = updated {
        tracing::warn!(
            build = event.build(),
            "cannot update the build index: {}",
            crate::error::Chain(&e)
        );
    }
}

/// When the message `d` was stored in the stream, Unix milliseconds (now if unknown).
fn published_ms(d: &Delivery) -> u64 {
    d.message()
        .info()
        .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .unwrap_or_else(|_| crate::time::now_ms())
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

/// What a message carries: the build id, and the state of a request (source) or (for every stage
/// after source) the stage that handed its state on.
type Input = (String, Option<Handover>, Option<Previous>);

/// The build id and state (or where the state is) a message carries, or the build id (best
/// known) and why it is unusable.
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
        return Ok((id, Some(Handover::new(request)), None));
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
        digest: prev.state_digest,
    };
    Ok((prev.build, None, Some(previous)))
}

/// The id under which a request that cannot be used is reported: `invalid-<stream sequence>`.
fn refused_build_id(d: &Delivery) -> String {
    bus::refused_build_id(d.stream_sequence())
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
            bus::assigned_build_id(ms, d.stream_sequence())
        }
        Err(_) => bus::new_build_id(),
    }
}

type StageResult = (Handover, Value, CacheStatus);

/// Why one attempt at a stage did not complete.
enum Attempt {
    Failed(Box<Failure>),
    /// A blob is missing everywhere or damaged here (see [`StageError::Lost`]).
    Lost {
        digest: Digest256,
        corrupt: bool,
    },
    /// The stage's own records named lost blobs and were forgotten: run it again.
    Again,
}

impl From<Failure> for Attempt {
    fn from(f: Failure) -> Attempt {
        Attempt::Failed(Box::new(f))
    }
}

impl From<tokio::task::JoinError> for Attempt {
    fn from(e: tokio::task::JoinError) -> Attempt {
        Failure::from(e).into()
    }
}

/// Run `stage` on this worker: blobs in, [`run_one`], blobs out, its records (held back until
/// then) written, and the image announcement of the publish stage (before `completed`, so
/// whoever sees the build end finds it announced). A blob that is lost (missing here and in the
/// object store, or damaged) is fetched again, or made again by the stage of this build that
/// produced it, and the stage retried; a record whose blobs are nowhere is a miss, not a
/// failure.
async fn run(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    h: Handover,
    build_id: &str,
) -> Result<StageResult, Failure> {
    let mut recoveries = 0;
    loop {
        let lost = match attempt(ctx, stage, h.clone(), build_id).await {
            Ok(done) => return Ok(done),
            Err(Attempt::Failed(f)) => return Err(*f),
            Err(Attempt::Again) => None,
            Err(Attempt::Lost { digest, corrupt }) => Some((digest, corrupt)),
        };
        if recoveries >= MAX_RECOVERIES {
            let what = match &lost {
                Some((digest, corrupt)) => StageError::Lost {
                    digest: digest.clone(),
                    corrupt: *corrupt,
                }
                .to_string(),
                None => format!("the {stage} stage's outputs are lost"),
            };
            return Err(transient(format!(
                "{what}, again after {recoveries} recoveries"
            )));
        }
        recoveries += 1;
        if let Some((digest, corrupt)) = lost {
            recover(ctx, stage, &h, build_id, &digest, corrupt).await?;
        }
    }
}

/// Bring back a lost blob: from the object store when it is there, else by running the stage
/// of this build that produced it again, its records forgotten.
async fn recover(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    h: &Handover,
    build_id: &str,
    digest: &Digest256,
    corrupt: bool,
) -> Result<(), Failure> {
    if !ctx.config.local_blobs {
        match ctx.blobs.get_blob(digest).await {
            Ok(_) => {
                let why = if corrupt {
                    "was damaged here"
                } else {
                    "was missing here"
                };
                note(
                    ctx,
                    build_id,
                    stage,
                    format!("blob {digest} {why}: fetched it again from the object store"),
                )
                .await;
                return Ok(());
            }
            Err(BlobError::NotFound { .. }) => {}
            Err(e) => return Err(blob_failure(&ctx.config.home, &e)),
        }
    }
    let c = ctx.clone();
    let (hc, d) = (h.clone(), digest.clone());
    let producer = blocking(move || Ok::<_, Failure>(producer_of(&c.env, &hc, &d))).await?;
    let Some(producer) = producer else {
        return Err(transient(format!(
            "{}, and no stage of this build produced it",
            StageError::Lost {
                digest: digest.clone(),
                corrupt
            }
        )));
    };
    note(ctx, build_id, stage, lost_note(digest, corrupt, producer)).await;
    let c = ctx.clone();
    let hc = h.clone();
    blocking(move || {
        forget_stage(&c.records(), &hc, producer).map_err(|e| {
            transient(format!(
                "forgetting the {producer} stage's records: {}",
                crate::error::Chain(&e)
            ))
        })
    })
    .await?;
    // The stages are reproducible: the producer makes the same blob again (and uploads it).
    Box::pin(run(ctx, producer, h.clone(), build_id)).await?;
    Ok(())
}

/// Say on the build's events what a worker does about a lost blob (a `progress` message).
async fn note(ctx: &Ctx, build: &str, stage: bus::Stage, message: String) {
    tracing::warn!(%stage, build, "{message}");
    let msg = StageEvent::Progress(StageProgress {
        v: VERSION,
        build: build.to_string(),
        stage,
        worker: ctx.config.name.clone(),
        time: EventTime::now(),
        fraction: None,
        message: Some(message),
    });
    if let Err(e) = ctx.bus.publish_event(&msg).await {
        tracing::debug!(%stage, build, "cannot publish progress: {e}");
    }
}

/// One attempt at `stage`.
async fn attempt(
    ctx: &Arc<Ctx>,
    stage: bus::Stage,
    h: Handover,
    build_id: &str,
) -> Result<StageResult, Attempt> {
    fetch(ctx, &needs(&ctx.env, stage, &h)).await?;
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
    let c = ctx.clone();
    let (h, ran, held) = blocking(move || {
        let mut h = h;
        // Held back until every blob the stage made is stored where the records say.
        let held = HeldRecords::new(c.records());
        let ran = match run_one(&env, &held, stage, &mut h, &sink) {
            Ok(ran) => ran,
            Err(StageError::Lost { digest, corrupt }) => {
                return Err(Attempt::Lost { digest, corrupt });
            }
            Err(e) => return Err(stage_failure(&c.config.home, &e).into()),
        };
        h.mirror_requests += env.requests();
        Ok::<_, Attempt>((h, ran, held))
    })
    .await?;
    if !ctx.config.local_blobs
        && let Err(lost) = upload(ctx, &produced(stage, &h)).await
    {
        if let Attempt::Lost { digest, .. } = &lost {
            // What this stage found recorded names a blob that is nowhere: forget those records
            // (held ones are dropped) so that the stage runs again, a miss.
            drop(held);
            let text = format!(
                "the {stage} stage's record names blob {digest}, which is neither here nor in the \
                 object store: forgetting the record and running the stage again"
            );
            note(ctx, build_id, stage, text).await;
            let c = ctx.clone();
            blocking(move || {
                forget_stage(&c.records(), &h, stage).map_err(|e| {
                    transient(format!(
                        "forgetting the {stage} stage's records: {}",
                        crate::error::Chain(&e)
                    ))
                })
            })
            .await?;
            return Err(Attempt::Again);
        }
        return Err(lost);
    }
    let home = ctx.config.home.clone();
    blocking(move || {
        held.commit().map_err(|e| {
            if crate::error::is_no_space(&e) {
                Failure::Input(no_space_info(&home, &e))
            } else {
                transient(format!(
                    "recording the {stage} stage's results: {}",
                    crate::error::Chain(&e)
                ))
            }
        })
    })
    .await?;
    if let Some(message) = &ran.announce {
        ctx.bus.publish_image(message).await.map_err(transient)?;
    }
    Ok((h, ran.report.outputs, ran.report.cache))
}

/// Make what a stage needs local (from the object store when needed). A worker sharing this
/// host's `$KILN_HOME` only checks that the blobs are here.
async fn fetch(ctx: &Arc<Ctx>, needs: &[Need]) -> Result<(), Attempt> {
    let lost = |digest: &Digest256| Attempt::Lost {
        digest: digest.clone(),
        corrupt: false,
    };
    if ctx.config.local_blobs {
        return match needs
            .iter()
            .find(|n| !ctx.blobs.local().contains(n.digest()))
        {
            Some(n) => Err(lost(n.digest())),
            None => Ok(()),
        };
    }
    let get = |d: Digest256| async move {
        match ctx.blobs.get_blob(&d).await {
            Ok(_) => Ok(()),
            Err(BlobError::NotFound { digest }) => Err(lost(&digest)),
            Err(e) => Err(blob_failure(&ctx.config.home, &e).into()),
        }
    };
    for need in needs {
        get(need.digest().clone()).await?;
        for d in files_of(ctx, need).await? {
            get(d).await?;
        }
    }
    Ok(())
}

/// Put what a stage produced in the object store (a blob that is not local must be there
/// already; one that is neither is lost).
async fn upload(ctx: &Arc<Ctx>, produced: &[Need]) -> Result<(), Attempt> {
    let failed = |e: &BlobError| blob_failure(&ctx.config.home, e).into();
    // What this process remembers the bucket holds is trusted only while it is the same bucket.
    ctx.blobs.revalidate().await.map_err(|e| failed(&e))?;
    for need in produced {
        if let Need::Tree(m) | Need::KernelOf(m) = need {
            // Its manifest must be here to list its files.
            match ctx.blobs.get_blob(m).await {
                Ok(_) => {}
                Err(BlobError::NotFound { digest }) => {
                    return Err(Attempt::Lost {
                        digest,
                        corrupt: false,
                    });
                }
                Err(e) => return Err(failed(&e)),
            }
        }
        let files = files_of(ctx, need).await?;
        // What this process remembers the bucket holds may have been collected since (`kiln gc
        // --nats`): the blob itself is asked about now, and when it went, its files are too.
        ctx.blobs.remote_has_now(need.digest(), &files).await;
        let mut digests = vec![need.digest().clone()];
        digests.extend(files);
        for d in &digests {
            if ctx.blobs.local().contains(d) {
                match ctx.blobs.publish_local(d).await {
                    Ok(()) => {}
                    Err(BlobError::NotFound { digest }) => {
                        return Err(Attempt::Lost {
                            digest,
                            corrupt: true,
                        });
                    }
                    Err(e) => return Err(failed(&e)),
                }
            } else if matches!(need, Need::IfHere(_)) {
                continue;
            } else if !ctx.blobs.remote_has(d).await {
                return Err(Attempt::Lost {
                    digest: d.clone(),
                    corrupt: false,
                });
            }
        }
    }
    Ok(())
}

/// The files a manifest names (none for a single blob). Its blob must be local.
async fn files_of(ctx: &Arc<Ctx>, need: &Need) -> Result<Vec<Digest256>, Attempt> {
    if let Need::Blob(_) | Need::IfHere(_) = need {
        return Ok(Vec::new());
    }
    let blobs = ctx.env.blobs.clone();
    let need = need.clone();
    let home = ctx.config.home.clone();
    blocking(move || {
        need.files(&blobs)
            .map_err(|e| Attempt::from(stage_failure(&home, &e)))
    })
    .await
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
        let home = std::path::Path::new("/h");
        assert!(matches!(
            stage_failure(home, &StageError::Unsupported("kernel.build".into())),
            Failure::Input(ErrorInfo {
                kind: ErrorKind::Recipe,
                ..
            })
        ));
        assert!(matches!(
            stage_failure(home, &StageError::Missing("packages")),
            Failure::Retry(_)
        ));
        let full = StageError::Io {
            what: "storing the image".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        match stage_failure(home, &full) {
            Failure::Input(info) => {
                assert_eq!(info.kind, ErrorKind::NoSpace);
                assert!(
                    info.message
                        .starts_with("no space left on device under /h: storing")
                );
            }
            other => panic!("a full disk must not be retried: {other}"),
        }
    }
}
