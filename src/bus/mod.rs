//! The message bus: NATS subjects, message schemas, the `KILN` stream and its per-stage durable
//! consumers, the worker loop helper, the blob object store and stage-output KV bucket, the
//! build index bucket ([`index`]), and a private `nats-server` for single-process use.
//!
//! Everything here works against NATS 2.9 (Debian 12's `nats-server` 2.9.10) and later servers:
//! async-nats is built without the `server_2_10+` features, and the KV buckets' backing streams are
//! created by hand because `create_key_value` cannot parse 2.9's account info. See
//! `docs/messages.md` for the subjects and the stream/consumer setup.

pub mod agents;
pub mod blobs;
pub mod cluster;
pub mod index;
pub mod messages;
pub mod rollouts;
pub mod server;
pub mod status;
pub mod subjects;
pub mod worker;

pub use blobs::{BLOB_BUCKET, BlobError, Blobs, STAGE_BUCKET, STATE_BUCKET, StageOutputs};
pub use cluster::{ClusterReport, TlsFiles};
pub use index::{BUILD_BUCKET, BuildIndex, BuildPhase, BuildSummary};
pub use messages::{
    AgentHealth, AgentHeartbeat, BuildRequest, COMPLETED_VERSION, CacheStatus, DecodeError,
    DeployCompleted, DeployFailed, DeployOrder, ErrorInfo, ErrorKind, EventTime, GitSource,
    HostState, ImagePublished, ImageRevoked, Message, Promotion, PullStats, RecipeSource,
    RequestError, Rollout, RolloutHost, RolloutState, StageCompleted, StageEvent, StageFailed,
    StageProgress, StageStarted, VERSION, assigned_build_id, decode, encode, is_valid_build_id,
    new_build_id, refused_build_id,
};
pub use server::{PrivateServer, ServerError};
pub use subjects::{DeployKind, EventKind, Stage};
pub use worker::{Delivery, Handled, Outcome, RetryPolicy, Worker};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Duration;

/// Name of the stream that keeps every kiln message.
pub const STREAM: &str = "KILN";
/// How long the stream keeps messages (build history).
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long requests to the JetStream API may take before they count as failed. APIs a server
/// lacks time out rather than fail, so this stays short.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure talking to NATS, with what kiln was doing.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "cannot connect to NATS at {url}: {message} (is the server running and the URL right? `kiln` starts a private one when no --nats URL is given)"
    )]
    Connect { url: String, message: String },
    #[error(
        "the TLS certificate of the NATS server at {url} does not verify: {message} (give the CA that signed the servers' certificates with --nats-tls-ca, and check that the certificate names the host in the URL)"
    )]
    Certificate { url: String, message: String },
    #[error(
        "the NATS server at {url} refused this client's TLS certificate: {message} (the servers verify clients: give --nats-tls-cert and --nats-tls-key, a certificate signed by a CA the servers trust)"
    )]
    ClientCertificate { url: String, message: String },
    #[error(
        "NATS URL {url:?} is not valid: {message} (give one URL or several separated by commas, e.g. nats://n1:4222,nats://n2:4222; schemes nats:// or tls://)"
    )]
    BadUrl { url: String, message: String },
    #[error("cannot read the NATS TLS {what} {path}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--nats-tls-cert and --nats-tls-key go together: give both, or neither")]
    TlsPair,
    #[error(
        "no JetStream quorum for stream {stream}: cannot {what} ({message}); the stream has no leader, so a majority of the NATS cluster's nodes that hold it are down or cut off (connected to {server}; see `kiln status --cluster` and the nats-server logs; kiln continues once the nodes are back)"
    )]
    NoQuorum {
        stream: String,
        server: String,
        what: String,
        message: String,
    },
    #[error(
        "cannot {what}: the NATS server {server} does not run JetStream (start it with `-js` or a `jetstream {{}}` block in its configuration)"
    )]
    NoJetStream { server: String, what: String },
    #[error("cannot read NATS credentials file {path}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NATS: cannot {what}: {message}")]
    Nats { what: String, message: String },
    #[error("invalid build request")]
    Request(#[from] RequestError),
    #[error(
        "NATS inbox prefix {prefix:?} is not a subject: give dot-separated tokens without spaces or wildcards, e.g. `_INBOX.ci` (--nats-inbox-prefix, $KILN_NATS_INBOX_PREFIX)"
    )]
    InboxPrefix { prefix: String },
    #[error(
        "the NATS server refused to let this user publish to {subject} ({message}): see docs/nats-roles.md for what each kiln role may publish, and check --nats-user"
    )]
    Refused { subject: String, message: String },
    #[error("message on {subject} (stream sequence {sequence})")]
    Decode {
        subject: String,
        sequence: u64,
        #[source]
        source: DecodeError,
    },
}

/// Wrap any NATS client error with what we were doing.
pub(crate) fn nats_err<E: std::fmt::Display>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> BusError {
    let what = what.into();
    move |e| BusError::Nats {
        what,
        message: e.to_string(),
    }
}

/// How to authenticate to the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file (JWT and NKey seed), as `nsc` writes it.
    CredsFile(PathBuf),
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// One URL or several separated by commas, e.g. `nats://127.0.0.1:4222` or
    /// `tls://n1:4222,tls://n2:4222` (see [`cluster::server_addrs`]).
    pub url: String,
    pub auth: Auth,
    /// A private CA and a client certificate for TLS (`tls://` URLs or a server that requires
    /// TLS).
    pub tls: TlsFiles,
    /// Replicas of the streams and buckets this connection creates; `None`: the cluster's size
    /// up to 3 ([`cluster::default_replicas`]).
    pub replicas: Option<usize>,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// Prefix of the reply subjects (inboxes) this client subscribes to; `None`: see
    /// [`ConnectOptions::inbox_prefix`].
    pub inbox_prefix: Option<String>,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            auth: Auth::None,
            tls: TlsFiles::default(),
            replicas: None,
            name: "kiln".to_string(),
            inbox_prefix: None,
        }
    }

    /// The prefix of this client's reply inboxes: the one given, else `_INBOX.<user>` for a
    /// user/password login (the user made a subject token), else NATS's usual `_INBOX`. Per-user
    /// inboxes let a server allow each user to subscribe to its own replies only
    /// (docs/nats-roles.md); a server that allows `_INBOX.>` accepts them all.
    pub fn inbox_prefix(&self) -> Result<String, BusError> {
        if let Some(prefix) = &self.inbox_prefix {
            let valid = !prefix.is_empty()
                && prefix.split('.').all(|t| {
                    !t.is_empty()
                        && t != "*"
                        && t != ">"
                        && !t.chars().any(|c| c.is_whitespace() || c.is_control())
                });
            if !valid {
                return Err(BusError::InboxPrefix {
                    prefix: prefix.clone(),
                });
            }
            return Ok(prefix.clone());
        }
        Ok(match &self.auth {
            Auth::UserPassword { user, .. } => {
                format!("_INBOX.{}", subjects::sanitize_token(user))
            }
            _ => "_INBOX".to_string(),
        })
    }
}

/// Log what the server says about this connection: a refused publish or subscription
/// (`Permissions Violation for Publish to "…"`) is otherwise only a request that times out.
async fn log_event(
    url: String,
    refusals: tokio::sync::broadcast::Sender<String>,
    event: async_nats::Event,
) {
    match event {
        async_nats::Event::ServerError(e) => {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("permissions violation") {
                // Nobody listening is fine: only a publish waiting for its ack listens.
                let _ = refusals.send(text.clone());
                tracing::warn!(
                    "NATS server {url} refused: {text}; this NATS user lacks that permission (see docs/nats-roles.md for what each kiln role needs)"
                );
            } else {
                tracing::warn!("NATS server {url}: {text}");
            }
        }
        async_nats::Event::ClientError(e) => tracing::warn!("NATS client ({url}): {e}"),
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!("NATS {url}: subscription {sid} is too slow, messages were dropped")
        }
        async_nats::Event::Disconnected => tracing::info!("NATS {url}: disconnected"),
        async_nats::Event::Connected => tracing::debug!("NATS {url}: connected"),
        other => tracing::debug!("NATS {url}: {other}"),
    }
}

/// A connection to NATS with JetStream.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The server's `Permissions Violation …` errors for this connection, so that a refused
    /// publish fails at once instead of waiting for an ack that never comes.
    refusals: tokio::sync::broadcast::Sender<String>,
    /// Replicas of what this connection creates, when given ([`Bus::replicas`]).
    replicas: Option<usize>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

/// A stage event read back from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Stream sequence: the order in which the server stored it.
    pub sequence: u64,
    pub subject: String,
    /// The event, or why its payload could not be read (a foreign publisher may send junk; one
    /// bad message must not hide a build's history).
    pub event: Result<StageEvent, String>,
}

impl Bus {
    /// Connect to the first of the listed servers that answers. The client reconnects by
    /// itself when the server restarts, to it or to another server of the cluster.
    pub async fn connect(opts: &ConnectOptions) -> Result<Bus, BusError> {
        let servers = cluster::server_addrs(&opts.url)?;
        opts.tls.check()?;
        let base = match &opts.auth {
            Auth::None => async_nats::ConnectOptions::new(),
            Auth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Auth::Token(t) => async_nats::ConnectOptions::with_token(t.clone()),
            Auth::CredsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| BusError::Credentials {
                    path: path.clone(),
                    source,
                })?,
        };
        let inbox_prefix = opts.inbox_prefix()?;
        let url = opts.url.clone();
        let (refusals, _) = tokio::sync::broadcast::channel(64);
        let sender = refusals.clone();
        let tls = opts.tls.any() || servers.iter().any(|s| s.tls_required());
        let client = opts
            .tls
            .apply(base)
            .require_tls(tls)
            .name(&opts.name)
            .custom_inbox_prefix(inbox_prefix)
            .event_callback(move |event| log_event(url.clone(), sender.clone(), event))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|e| {
                let url = crate::net::redact(&opts.url).into_owned();
                let message = crate::net::redact(&crate::error::chain_text(&e)).into_owned();
                if message.contains("received fatal alert") {
                    // The server's alert: it did not take this client's certificate (or none).
                    BusError::ClientCertificate { url, message }
                } else if message.contains("certificate")
                    || e.kind() == async_nats::ConnectErrorKind::Tls
                {
                    BusError::Certificate { url, message }
                } else {
                    BusError::Connect { url, message }
                }
            })?;
        let mut bus = Self::from_client(client);
        bus.refusals = refusals;
        bus.replicas = opts.replicas;
        Ok(bus)
    }

    /// Connect to a URL without authentication.
    pub async fn connect_url(url: &str) -> Result<Bus, BusError> {
        Self::connect(&ConnectOptions::new(url)).await
    }

    /// Use an existing client.
    pub fn from_client(client: async_nats::Client) -> Bus {
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        Self::from_parts(client, js)
    }

    /// Use an existing client and JetStream context (e.g. one with another request timeout).
    pub fn from_parts(client: async_nats::Client, js: jetstream::Context) -> Bus {
        Bus {
            client,
            js,
            refusals: tokio::sync::broadcast::channel(1).0,
            replicas: None,
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Drain the connection (subscriptions end, what was published is flushed) and wait, at most
    /// two seconds, until the client has closed it.
    pub async fn close(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::debug!("draining the NATS connection: {e}");
            return;
        }
        // Once the connection is closed, commands fail at once: a flush that fails says so.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), self.client.flush()).await {
                Ok(Err(_)) => return,
                Ok(Ok(())) | Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The configuration of the `KILN` stream.
    pub fn stream_config() -> stream::Config {
        stream::Config {
            name: STREAM.to_string(),
            description: Some(
                "kiln build requests, stage events, publications, deployments".into(),
            ),
            subjects: vec![format!("{}.>", subjects::ROOT)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: RETENTION,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Create (or bring up to date) a stream, with [`Bus::replicas`] replicas. An existing
    /// stream is updated to `config`, except that its replicas are only ever raised
    /// ([`cluster::merged_replicas`]): NATS then copies what it holds to the new peers, and a
    /// count an operator raised by hand stays. (An update with `num_replicas` unset, as kiln
    /// sent before, asks for one replica: it scaled a hand-raised stream back down.)
    pub(crate) async fn ensure_stream(
        &self,
        config: stream::Config,
    ) -> Result<stream::Stream, BusError> {
        self.patiently(|| self.ensure_stream_once(config.clone()))
            .await
    }

    async fn ensure_stream_once(&self, config: stream::Config) -> Result<stream::Stream, BusError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::GetStreamErrorKind;
        let name = config.name.clone();
        let existing = match self.js.get_stream(&name).await {
            Ok(mut s) => Some(
                s.info()
                    .await
                    .map_err(|e| self.unavailable(&name, format!("read stream {name}"), e))?
                    .config
                    .clone(),
            ),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                None
            }
            Err(e) => return Err(self.unavailable(&name, format!("look up stream {name}"), e)),
        };
        if existing.is_none() {
            let created = match self
                .js
                .create_stream(self.with_replicas(config.clone(), None))
                .await
            {
                Ok(s) => return Ok(s),
                Err(e) => e,
            };
            // Made by another process at the same moment (the loser of that race hears "name
            // in use" or, on 2.9, "subjects overlap"): update it like an existing one.
            if self.js.get_stream(&name).await.is_err() {
                return Err(self.unavailable(&name, format!("create stream {name}"), created));
            }
        }
        let current = match existing {
            Some(c) => c,
            None => self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| self.unavailable(&name, format!("look up stream {name}"), e))?
                .cached_info()
                .config
                .clone(),
        };
        let wanted = self.with_replicas(config, Some(&current));
        let replicas = wanted.num_replicas;
        let scaling = replicas > current.num_replicas.max(1);
        if scaling {
            tracing::info!(
                "scaling stream {name} from {} to {replicas} replicas",
                current.num_replicas.max(1),
            );
        }
        let what = format!("update stream {name}");
        if let Err(e) = self.js.update_stream(wanted.clone()).await {
            // A stream another worker created a moment ago, or one just scaled, answers only
            // once it has elected its leader: wait for that, then update once more.
            let error = self.unavailable(&name, what.clone(), &e);
            // Without a metadata leader the whole cluster lacks a quorum: say so at once.
            if !matches!(error, BusError::NoQuorum { .. }) || !self.meta_answers().await {
                return Err(error);
            }
            tracing::debug!("{what}: {e}; waiting for the stream's leader");
            self.settle(&name, current.num_replicas.max(1)).await?;
            self.js
                .update_stream(wanted)
                .await
                .map_err(|e| self.unavailable(&name, what, e))?;
        }
        if scaling {
            self.settle(&name, replicas).await?;
        }
        self.js
            .get_stream(&name)
            .await
            .map_err(|e| self.unavailable(&name, format!("open stream {name}"), e))
    }

    /// Create the `KILN` stream if it is missing, or bring its configuration up to date
    /// (idempotent). Workers do this at start; it needs the permission to create and update
    /// the stream, which submitters and agents do not have ([`Bus::kiln_stream`] is theirs).
    pub async fn ensure_kiln_stream(&self) -> Result<stream::Stream, BusError> {
        self.ensure_stream(Self::stream_config()).await
    }

    /// The `KILN` stream for readers and submitters: looked up (`$JS.API.STREAM.INFO.KILN`, which
    /// every role may ask), and created only when the server says it does not exist yet, so a
    /// user without the permission to create streams never asks for it while the stream is
    /// there.
    pub async fn kiln_stream(&self) -> Result<stream::Stream, BusError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::GetStreamErrorKind;
        match self.js.get_stream(STREAM).await {
            Ok(s) => Ok(s),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                self.ensure_kiln_stream().await.map_err(|e| match e {
                    BusError::Nats { what, message } => BusError::Nats {
                        what: format!(
                            "{what}; the stream does not exist yet: start `kiln up` or a `kiln worker` first (they create it), or connect as a NATS user that may create it"
                        ),
                        message,
                    },
                    other => other,
                })
            }
            Err(e) => Err(match self.unavailable(STREAM, format!("look up stream {STREAM}"), e) {
                BusError::Nats { what, message } => BusError::Nats {
                    what: format!("{what} (may this NATS user read it?)"),
                    message,
                },
                other => other,
            }),
        }
    }

    /// The durable pull consumer config of one stage.
    pub fn consumer_config(stage: Stage, policy: &RetryPolicy) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(stage.consumer_name()),
            description: Some(format!("kiln {} stage", stage.name())),
            filter_subject: stage.trigger_subject(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: policy.ack_wait(),
            max_deliver: policy.max_deliver,
            backoff: policy.backoff.clone(),
            ..Default::default()
        }
    }

    /// Create the stream if needed and the stage's durable consumer (idempotent).
    pub async fn ensure_consumer(
        &self,
        stage: Stage,
        policy: &RetryPolicy,
    ) -> Result<consumer::PullConsumer, BusError> {
        policy.check()?;
        let stream = self.ensure_kiln_stream().await?;
        let config = Self::consumer_config(stage, policy);
        stream
            .create_consumer(config)
            .await
            .map_err(nats_err(format!(
                "create consumer {} on stream {STREAM}",
                stage.consumer_name()
            )))
    }

    /// The stream, every stage's consumer, the blob bucket, the stage KV bucket, the build
    /// index and the agents' inventory.
    pub async fn setup(&self, policy: &RetryPolicy) -> Result<(), BusError> {
        self.ensure_kiln_stream().await?;
        for stage in Stage::ALL {
            self.ensure_consumer(stage, policy).await?;
        }
        blobs::ensure_object_store(self).await?;
        StageOutputs::open(self).await?;
        StageOutputs::open_bucket(self, STATE_BUCKET).await?;
        BuildIndex::open(self).await?;
        agents::Inventory::open(self).await?;
        Ok(())
    }

    /// Publish raw bytes to the stream and wait for the server to store them; returns the stream
    /// sequence.
    pub async fn publish_raw(&self, subject: String, payload: Vec<u8>) -> Result<u64, BusError> {
        self.publish_checked(subject, async_nats::HeaderMap::new(), payload)
            .await
    }

    /// Publish and wait for the stream's ack, or fail at once when the server says this user
    /// may not publish there (its `-ERR` names the subject; the ack would never come).
    async fn publish_checked(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Vec<u8>,
    ) -> Result<u64, BusError> {
        let mut refusals = self.refusals.subscribe();
        let quoted = format!("Publish to \"{subject}\"");
        let refused = async {
            loop {
                match refusals.recv().await {
                    Ok(text) if text.contains(&quoted) => return text,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    // No sender left: never refused this way; the ack decides.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        };
        let acked = async {
            self.js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
                .map_err(|e| self.unavailable(STREAM, format!("publish to {subject}"), e))?
                .await
                .map_err(|e| {
                    match self.unavailable(STREAM, format!("get the stream's ack for {subject}"), e)
                    {
                        BusError::Nats { what, message } => BusError::Nats {
                            what: format!("{what} (is the {STREAM} stream set up?)"),
                            message,
                        },
                        other => other,
                    }
                })
        };
        tokio::select! {
            ack = acked => Ok(ack?.sequence),
            message = refused => Err(BusError::Refused { subject, message }),
        }
    }

    /// The largest message payload this server takes, less room for headers (`Nats-Msg-Id`).
    pub fn max_message_size(&self) -> usize {
        let max = self.client().server_info().max_payload;
        let max = if max == 0 { 1 << 20 } else { max };
        max.saturating_sub(4096)
    }

    /// Publish a build request on `kiln.build.requested`.
    pub async fn publish_request(&self, req: &BuildRequest) -> Result<u64, BusError> {
        // The source stage refuses what fails this check; say so before publishing.
        req.check()?;
        self.publish_raw(subjects::BUILD_REQUESTED.to_string(), encode(req))
            .await
    }

    /// Publish raw bytes with a `Nats-Msg-Id`: the stream stores a message with the same id only
    /// once within its duplicate window (2 minutes), so a publish retried after a lost ack, or
    /// repeated by a redelivered handler, is not stored twice.
    pub async fn publish_raw_once(
        &self,
        subject: String,
        msg_id: &str,
        payload: Vec<u8>,
    ) -> Result<u64, BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.publish_checked(subject, headers, payload).await
    }

    /// Publish a stage event on its subject. A build's `completed` and `failed` events of a
    /// stage are stored once (see [`Bus::publish_raw_once`]): a worker that dies between
    /// publishing `completed` and acking its input, or a publish retried while the server
    /// restarts, does not start the next stage twice.
    pub async fn publish_event(&self, event: &StageEvent) -> Result<u64, BusError> {
        match event {
            StageEvent::Completed(_) | StageEvent::Failed(_) => {
                let subject = event.subject();
                self.publish_raw_once(subject.clone(), &subject, event.encode())
                    .await
            }
            _ => self.publish_raw(event.subject(), event.encode()).await,
        }
    }

    /// Whether `build`'s `stage` already ended: the stream holds its `completed` or `failed`
    /// event. A worker asks before running a redelivered message again, because the stream
    /// drops a repeated event only within its duplicate window (two minutes), and a message
    /// whose ack was lost in a leader change may come back later than that.
    pub async fn stage_ended(&self, build: &str, stage: Stage) -> Result<bool, BusError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let stream = self.kiln_stream().await?;
        for kind in [EventKind::Completed, EventKind::Failed] {
            let subject = subjects::stage_event(build, stage, kind);
            match stream.direct_get_last_for_subject(&subject).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => {
                    return Err(self.unavailable(STREAM, format!("look up {subject}"), e));
                }
            }
        }
        Ok(false)
    }

    /// Publish `kiln.image.published.<repository>`.
    pub async fn publish_image(&self, msg: &ImagePublished) -> Result<u64, BusError> {
        self.publish_raw(msg.subject(), encode(msg)).await
    }

    /// Publish `kiln.deploy.<agent>.completed`.
    pub async fn publish_deploy_completed(&self, msg: &DeployCompleted) -> Result<u64, BusError> {
        self.publish_raw(msg.subject(), encode(msg)).await
    }

    /// Publish `kiln.deploy.<agent>.failed`.
    pub async fn publish_deploy_failed(&self, msg: &DeployFailed) -> Result<u64, BusError> {
        self.publish_raw(msg.subject(), encode(msg)).await
    }

    pub async fn publish_deploy_order(&self, msg: &DeployOrder) -> Result<u64, BusError> {
        self.publish_raw(msg.subject(), encode(msg)).await
    }

    /// An ordered consumer reading `filter` from the `KILN` stream. It carries a name of its
    /// own (`kiln-read-<random>`), so the client creates it on
    /// `$JS.API.CONSUMER.CREATE.KILN.<name>.<filter>`: a server can then let readers create
    /// consumers while refusing the stage workers' durable names, which it could not do for the
    /// unnamed form (`$JS.API.CONSUMER.CREATE.KILN` takes the name from the request body, and
    /// NATS 2.9 updates an existing durable consumer of that name). See docs/nats-roles.md.
    pub fn reader_config(
        &self,
        filter: impl Into<String>,
        deliver: consumer::DeliverPolicy,
    ) -> consumer::pull::OrderedConfig {
        let inbox = self.client.new_inbox();
        let unique = inbox.rsplit('.').next().unwrap_or_default();
        consumer::pull::OrderedConfig {
            name: Some(format!("kiln-read-{unique}")),
            filter_subject: filter.into(),
            deliver_policy: deliver,
            ..Default::default()
        }
    }

    /// An ordered consumer of `filter` on `stream` (see [`Bus::reader_config`]), created with a
    /// short timeout and tried again: NATS 2.9 places a one-replica consumer on any node that
    /// holds the stream, an unreachable one included until the cluster marks it offline, and a
    /// request placed there is never answered. Measured with one of three nodes SIGKILLed:
    /// about one creation in three timed out, the others took ~10 ms.
    pub(crate) async fn reader(
        &self,
        stream: &stream::Stream,
        filter: &str,
        deliver: consumer::DeliverPolicy,
        what: &str,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, BusError> {
        const ATTEMPTS: u32 = 4;
        const PATIENCE: Duration = Duration::from_secs(3);
        let mut attempt = 1;
        loop {
            let config = self.reader_config(filter, deliver);
            let error = match tokio::time::timeout(PATIENCE, stream.create_consumer(config)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {} s", PATIENCE.as_secs()),
            };
            if attempt == ATTEMPTS || !cluster::is_unavailable(&error) {
                return Err(self.unavailable(STREAM, what, error));
            }
            tracing::debug!("{what}: creating a reader failed ({error}); trying again");
            attempt += 1;
        }
    }

    /// Every stage event of one build stored in the stream, in stream order.
    pub async fn build_events(&self, build: &str) -> Result<Vec<RecordedEvent>, BusError> {
        let stream = self.kiln_stream().await?;
        let consumer = self
            .reader(
                &stream,
                &subjects::build_events(build),
                consumer::DeliverPolicy::All,
                &format!("read the history of build {build}"),
            )
            .await?;
        let pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats_err(format!("read the history of build {build}")))?;
        while let Some(msg) = tokio::time::timeout(API_TIMEOUT, messages.next())
            .await
            .map_err(nats_err(format!(
                "read the history of build {build} (timed out)"
            )))?
        {
            let msg = msg.map_err(nats_err(format!("read the history of build {build}")))?;
            let (sequence, remaining) = match msg.info() {
                Ok(i) => (i.stream_sequence, i.pending),
                Err(_) => (0, 0),
            };
            out.push(record(&msg.subject, sequence, &msg.payload));
            if remaining == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// A live stream of one build's events: the ones already stored first when `history` is
    /// true, then each new one as it is published. Ends only when dropped, or with an error when
    /// the server has been unreachable for [`FOLLOW_PATIENCE`]. Survives server restarts: the
    /// ordered consumer (which a restart removes) is created again after the last event seen,
    /// so no event is skipped or repeated.
    pub async fn follow(
        &self,
        build: &str,
        history: bool,
    ) -> Result<impl futures::Stream<Item = Result<RecordedEvent, BusError>> + use<>, BusError>
    {
        let mut stream = self.kiln_stream().await?;
        let after = if history {
            0
        } else {
            stream
                .info()
                .await
                .map_err(nats_err(format!("follow build {build}")))?
                .state
                .last_sequence
        };
        let mut follower = Follower {
            bus: self.clone(),
            build: build.to_string(),
            after,
            messages: None,
        };
        follower.messages =
            Some(Follower::open(&follower.bus, &follower.build, follower.after).await?);
        Ok(futures::stream::unfold(follower, |mut f| async move {
            let item = f.next().await;
            Some((item, f))
        }))
    }
}

/// How long [`Bus::follow`] waits for an unreachable server before it gives up.
pub const FOLLOW_PATIENCE: Duration = Duration::from_secs(600);

/// The state of [`Bus::follow`]: where it is in the stream, and its ordered consumer.
struct Follower {
    bus: Bus,
    build: String,
    /// Stream sequence of the last event delivered (or where following began).
    after: u64,
    messages: Option<consumer::pull::Ordered>,
}

impl Follower {
    /// An ordered consumer of `build`'s events after stream sequence `after`. Takes its parts,
    /// not `&Follower`: the stream it feeds must be `Send`, and a `Follower` is not `Sync`.
    async fn open(bus: &Bus, build: &str, after: u64) -> Result<consumer::pull::Ordered, BusError> {
        let what = || format!("follow build {build}");
        let deliver = if after == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            }
        };
        let stream = bus.kiln_stream().await?;
        bus.reader(&stream, &subjects::build_events(build), deliver, &what())
            .await?
            .messages()
            .await
            .map_err(nats_err(what()))
    }

    /// The next event; reopens the consumer after an error until [`FOLLOW_PATIENCE`] runs out.
    async fn next(&mut self) -> Result<RecordedEvent, BusError> {
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let error = match self.messages.as_mut() {
                None => match Follower::open(&self.bus, &self.build, self.after).await {
                    Ok(m) => {
                        self.messages = Some(m);
                        continue;
                    }
                    Err(e) => e,
                },
                Some(messages) => match messages.next().await {
                    Some(Ok(msg)) => {
                        let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                        self.after = self.after.max(sequence);
                        return Ok(record(&msg.subject, sequence, &msg.payload));
                    }
                    Some(Err(e)) => nats_err(format!("follow build {}", self.build))(e),
                    None => BusError::Nats {
                        what: format!("follow build {}", self.build),
                        message: "the consumer's message stream ended".into(),
                    },
                },
            };
            self.messages = None;
            let since = *failing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > FOLLOW_PATIENCE {
                return Err(error);
            }
            tracing::debug!("{error}; following again in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A message read back from the stream as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub sequence: u64,
    pub subject: String,
    /// When the server stored it, Unix milliseconds.
    pub published_ms: u64,
    pub payload: bytes::Bytes,
}

impl Bus {
    /// Every message stored on subjects matching `filter` (e.g. `kiln.build.>`), in stream
    /// order, read with an ordered consumer up to the last one stored when called.
    pub async fn stored_messages(&self, filter: &str) -> Result<Vec<StoredMessage>, BusError> {
        self.stored_messages_from(filter, consumer::DeliverPolicy::All)
            .await
    }

    /// Like [`Bus::stored_messages`], from stream sequence `start` on.
    pub async fn stored_messages_since(
        &self,
        filter: &str,
        start: u64,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let deliver = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        };
        self.stored_messages_from(filter, deliver).await
    }

    async fn stored_messages_from(
        &self,
        filter: &str,
        deliver: consumer::DeliverPolicy,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let what = format!("read {filter} from stream {STREAM}");
        let stream = self.kiln_stream().await?;
        let consumer = self.reader(&stream, filter, deliver, &what).await?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(nats_err(what.clone()))?;
        while let Some(msg) = tokio::time::timeout(API_TIMEOUT, messages.next())
            .await
            .map_err(nats_err(format!("{what} (timed out)")))?
        {
            let msg = msg.map_err(nats_err(what.clone()))?;
            let (sequence, published_ms, remaining) = match msg.info() {
                Ok(i) => (
                    i.stream_sequence,
                    (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
                    i.pending,
                ),
                Err(_) => (0, 0, 0),
            };
            out.push(StoredMessage {
                sequence,
                subject: msg.subject.to_string(),
                published_ms,
                payload: msg.payload.clone(),
            });
            if remaining == 0 {
                break;
            }
        }
        Ok(out)
    }
}

impl Bus {}

fn record(subject: &str, sequence: u64, payload: &[u8]) -> RecordedEvent {
    let event = match subjects::parse_stage_subject(subject) {
        Some(s) => StageEvent::decode(s.kind, payload).map_err(|e| crate::error::chain_text(&e)),
        None => Err(format!("{subject} is not a stage event subject")),
    };
    RecordedEvent {
        sequence,
        subject: subject.to_string(),
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_prefixes_follow_the_user_unless_given() {
        let user = |name: &str| Auth::UserPassword {
            user: name.into(),
            password: "p".into(),
        };
        let cases: [(Auth, Option<&str>, Result<&str, ()>); 7] = [
            (Auth::None, None, Ok("_INBOX")),
            (Auth::Token("t".into()), None, Ok("_INBOX")),
            (user("ci"), None, Ok("_INBOX.ci")),
            (user("agent hv.01"), None, Ok("_INBOX.agent_hv_01")),
            (user("ci"), Some("_R.ci"), Ok("_R.ci")),
            (Auth::None, Some("_INBOX.>"), Err(())),
            (Auth::None, Some("a..b"), Err(())),
        ];
        for (auth, given, want) in cases {
            let mut o = ConnectOptions::new("nats://127.0.0.1:4222");
            o.auth = auth;
            o.inbox_prefix = given.map(str::to_string);
            let got = o.inbox_prefix().map_err(|e| {
                assert!(e.to_string().contains("--nats-inbox-prefix"), "{e}");
            });
            assert_eq!(got.as_deref(), want.as_deref(), "{given:?}");
        }
    }
}
