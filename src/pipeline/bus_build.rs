//! `kiln build` through NATS: submit the build request, follow the build's events on the stream
//! (for progress bars and logs) until the publish stage completes or a stage fails, then deliver
//! the image, serial logs and report like the in-process build.
//!
//! Without a URL ([`BusTarget::Private`]) kiln starts a private `nats-server` (JetStream in a
//! temp dir, a free loopback port) and runs every stage worker ([`super::worker::run_workers`])
//! in this process, on this host's `$KILN_HOME`, so blobs stay in the local store. The server
//! is stopped and its temp dir removed on every path out: success, failure, interruption. With a
//! URL ([`BusTarget::Remote`]) the workers run elsewhere (`kiln up`) and the image comes from the
//! `kiln-blobs` object store. Either way the same stage code runs.

use super::access::{RecipeAccess, is_forbidden_env};
use super::build::{BuildError, BuildOptions, BuildReport, deliver, deliver_recovering};
use super::handoff;
use super::records::{LocalRecords, MemoryRecords};
use super::stages::{NoProgress, StageEnv, StageError};
use super::worker::{WorkerConfig, WorkerError, run_workers};
use crate::bus::{
    self, BlobError, Blobs, BuildRequest, Bus, BusError, ConnectOptions, ErrorInfo, ErrorKind,
    PrivateServer, RecipeSource, RetryPolicy, ServerError, StageEvent, StageOutputs,
};
use crate::home::BlobStore;
use futures::StreamExt;
use std::future::Future;
use std::time::{Duration, Instant};

/// Which NATS server the build goes through.
#[derive(Debug, Clone)]
pub enum BusTarget {
    /// A private server started for this build, with every stage worker in this process.
    Private,
    /// A server whose workers run elsewhere.
    Remote(Box<ConnectOptions>),
}

/// Why a build through NATS did not deliver an image.
#[derive(Debug, thiserror::Error)]
pub enum BusBuildError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("the stage workers of this process")]
    Worker(#[from] WorkerError),
    #[error("fetching the build's image")]
    Blob(#[from] BlobError),
    /// A stage published `failed`: everything the user needs is in `error`.
    #[error("the {stage} stage of build {build} failed: {}", error.message)]
    Failed {
        build: String,
        stage: bus::Stage,
        error: Box<ErrorInfo>,
    },
    #[error(transparent)]
    Deliver(#[from] BuildError),
    #[error("interrupted; build {0} was stopped")]
    Interrupted(String),
    #[error("the event stream of build {0} ended before the build did")]
    StreamEnded(String),
    #[error("the stage workers of this process stopped before build {0} ended")]
    WorkersStopped(String),
    #[error("build {build}: the final state of the build cannot be read: {message}")]
    BadState { build: String, message: String },
}

impl BusBuildError {
    /// Whether the user's input is at fault (exit code 2) rather than the environment.
    pub fn is_input_error(&self) -> bool {
        match self {
            BusBuildError::Failed { error, .. } => matches!(
                error.kind,
                ErrorKind::Recipe | ErrorKind::InvalidMessage | ErrorKind::Verification
            ),
            BusBuildError::Deliver(e) => e.is_input_error(),
            _ => false,
        }
    }
}

/// The retry policy of `kiln build`'s own workers: one attempt (a stage that can retry, such
/// as a download, does so itself), and a dead worker noticed after 30 s.
pub fn private_policy() -> RetryPolicy {
    RetryPolicy {
        backoff: Vec::new(),
        ack_wait: Duration::from_secs(30),
        max_deliver: 1,
    }
}

/// The build request `kiln build` publishes for `opts` (recipe and templates as absolute paths).
pub fn request_for(opts: &BuildOptions, id: &str) -> Result<BuildRequest, StageError> {
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|source| StageError::Io {
            what: format!("resolving {}", p.display()),
            source,
        })
    };
    let requester = std::env::var("USER").unwrap_or_else(|_| "kiln build".into());
    let mut req = BuildRequest::new(
        RecipeSource::Path {
            path: absolute(&opts.recipe)?,
        },
        requester,
    );
    req.id = Some(id.to_string());
    req.params = opts.load.set.iter().cloned().collect();
    req.profiles = opts.profiles.clone();
    req.verify = opts.verify;
    req.templates = match &opts.load.templates_dir {
        Some(t) => Some(absolute(t)?),
        None => None,
    };
    Ok(req)
}

/// What `kiln build`'s own workers may reach: the recipe's project (the directory above its
/// nearest `templates/`, else its own directory) and the templates directory the caller gave,
/// no git repository, and the caller's environment (never kiln's credentials).
pub fn caller_access(req: &BuildRequest) -> Result<RecipeAccess, StageError> {
    let mut roots = Vec::new();
    if let RecipeSource::Path { path } = &req.recipe {
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        let project = crate::recipe::load::find_templates_dir(dir)
            .and_then(|t| t.parent().map(std::path::Path::to_path_buf))
            .unwrap_or_else(|| dir.to_path_buf());
        roots.push(project);
    }
    roots.extend(req.templates.clone());
    let env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !is_forbidden_env(k))
        .collect();
    RecipeAccess::new(&roots, &[], &env, &crate::home::kiln_home()).map_err(|message| {
        StageError::Io {
            what: message,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    })
}

/// Build `opts` through NATS. `observe` sees every event of the build as it arrives; the build
/// stops early when `interrupt` completes. Returns the build id with the report.
pub async fn build_over_bus(
    opts: &BuildOptions,
    target: &BusTarget,
    observe: &(dyn Fn(&StageEvent) + Sync),
    interrupt: impl Future<Output = ()>,
) -> Result<(String, BuildReport), BusBuildError> {
    let started = Instant::now();
    // Dropped (killed, temp dir removed) on every return from here on.
    let server = match target {
        BusTarget::Private => Some(PrivateServer::start()?),
        BusTarget::Remote(_) => None,
    };
    let connect = match (target, &server) {
        (BusTarget::Remote(c), _) => (**c).clone(),
        (BusTarget::Private, Some(s)) => ConnectOptions::new(s.url()),
        (BusTarget::Private, None) => return Err(BusBuildError::Server(ServerError::NotInstalled)),
    };
    let bus = Bus::connect(&connect).await?;
    bus.kiln_stream().await?;
    let id = bus::new_build_id();
    let deliver_err = |e| BusBuildError::Deliver(BuildError::Deliver(e));
    let req = request_for(opts, &id).map_err(deliver_err)?;
    let events = bus.follow(&id, true).await?;
    bus.publish_request(&req).await?;
    tracing::debug!(
        build = id,
        "request published to {}",
        crate::net::redact(&connect.url)
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let private = server.is_some();
    let handoff = MemoryRecords::default();
    let config = WorkerConfig {
        home: opts.home.clone(),
        archive: opts.archive.clone(),
        profiles_dir: opts.profiles_dir.clone(),
        policy: private_policy(),
        local_blobs: true,
        access: caller_access(&req).map_err(deliver_err)?,
        limits: opts.load.limits.clone(),
        handoff: handoff.clone(),
        ..WorkerConfig::from_env()
    };
    let workers = async {
        if private {
            let stop = async {
                let _ = stop_rx.await;
            };
            run_workers(&bus, &bus::Stage::ALL, config, stop).await
        } else {
            std::future::pending().await
        }
    };
    let follow = async {
        let id = &id;
        tokio::pin!(events);
        while let Some(ev) = events.next().await {
            let Ok(event) = ev?.event else { continue };
            observe(&event);
            match event {
                StageEvent::Failed(f) => {
                    return Err(BusBuildError::Failed {
                        build: f.build,
                        stage: f.stage,
                        error: Box::new(f.error),
                    });
                }
                StageEvent::Completed(c) if c.stage == bus::Stage::Publish => {
                    return Ok(c.state_digest);
                }
                _ => {}
            }
        }
        Err(BusBuildError::StreamEnded(id.clone()))
    };
    tokio::pin!(workers);
    tokio::pin!(follow);
    tokio::pin!(interrupt);
    let outcome = tokio::select! {
        r = &mut follow => r,
        r = &mut workers => Err(match r {
            Err(e) => e.into(),
            Ok(()) => BusBuildError::WorkersStopped(id.clone()),
        }),
        _ = &mut interrupt => Err(BusBuildError::Interrupted(id.clone())),
    };
    let _ = stop_tx.send(());
    if !matches!(outcome, Err(BusBuildError::Interrupted(_))) {
        // The last stage acks its message; nothing else is running.
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut workers).await;
    }
    let digest = outcome?;
    let bad = |message: String| BusBuildError::BadState {
        build: id.clone(),
        message,
    };
    // The final state, from the records its digest names: this process's memory for a private
    // bus, the shared `kiln-states` bucket for a remote one.
    let publish = bus::Stage::Publish;
    let state = if private {
        handoff::load_state(&handoff, &id, publish, &digest)
    } else {
        let key = handoff::record_key(&digest).unwrap_or_default();
        let record = StageOutputs::open_existing(&bus, bus::STATE_BUCKET)
            .await?
            .get(&key)
            .await?;
        handoff::state_from_record(record, &id, publish, &digest)
    }
    .map_err(|e| bad(crate::error::chain_text(&e)))?;
    let build = state
        .build
        .as_ref()
        .ok_or_else(|| bad("it carries no build state".into()))?;
    let local = BlobStore::new(&opts.home);
    if !private && let Some(disk) = &build.disk {
        let blobs = Blobs::open(&bus, local.clone()).await?;
        blobs.get_blob(&disk.image).await?;
        for d in build
            .boots
            .iter()
            .filter_map(|b| b.serial_log_blob.as_ref())
        {
            if let Err(e) = blobs.get_blob(d).await {
                tracing::warn!(
                    "the serial log {d} is not in the object store: {}",
                    crate::error::Chain(&e)
                );
            }
        }
    }
    let report = if private {
        // This host's workers made the image here: a damaged or missing blob is made again by
        // the stage that produced it, as `kiln build --no-bus` does.
        let mut env = StageEnv::new(
            opts.home.clone(),
            opts.archive.clone(),
            opts.profiles_dir.clone(),
        );
        env.access = caller_access(&state.request).map_err(deliver_err)?;
        env.limits = opts.load.limits.clone();
        let records = LocalRecords::new(&opts.home);
        let (opts, state) = (opts.clone(), state.clone());
        tokio::task::spawn_blocking(move || {
            deliver_recovering(&opts, &env, &records, &state, started, &NoProgress)
        })
        .await
        .map_err(|e| {
            BusBuildError::Deliver(BuildError::Deliver(StageError::Io {
                what: "delivering the image".into(),
                source: std::io::Error::other(e),
            }))
        })??
    } else {
        deliver(opts, &local, None, &state, started)?
    };
    if let Some(server) = server {
        // Close the connection before the server goes, so the client does not warn about a
        // server it can no longer reach.
        bus.close().await;
        drop(server);
    }
    Ok((id.clone(), report))
}
