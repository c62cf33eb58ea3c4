//! kiln's HTTP front end (axum) over the message bus, served by `kiln up`:
//!
//! - `POST /v1/builds`: a `kiln.build.requested` body (docs/messages.md), validated like the bus
//!   validates it, published; 202 with the build id and where to watch it.
//! - `GET /v1/builds?limit=N`: the most recently requested builds, newest first (default 20, at
//!   most [`LIST_MAX`]), from the build index ([`crate::bus::index`]), as `kiln status --json`
//!   prints them.
//! - `GET /v1/builds/{id}`: the build's status read back from the stream ([`BuildStatus`]).
//! - `GET /v1/builds/{id}/events`: server-sent events, the build's events so far then live ones,
//!   ending after its final event.
//! - `POST /v1/hooks/git`: a push (generic, GitHub or Gitea payload) → builds of the recipes
//!   whose inputs changed, through the watcher ([`hook`]).
//!
//! - `GET /metrics`: Prometheus metrics of this process ([`crate::metrics`]).
//! - `GET /v1/events`, `/v1/builds/{id}/serial`, `/v1/images`, `/v1/images/verify`,
//!   `/v1/farm`: the read-only views the dashboard is drawn from ([`views`]).
//! - `GET /`: the web dashboard ([`dashboard`]).
//!
//! Every POST needs `Authorization: Bearer <token>` (compared in constant time); GETs only read.
//! Errors are JSON `{"error": {"kind", "message", "field"?}}`. `kiln up` binds to loopback unless
//! told otherwise. Connections, request read times, bodies and live event followers are
//! bounded ([`serve`]).

pub mod dashboard;
pub mod hook;
pub mod serve;
pub mod views;

use crate::bus::status::{BuildStatus, ends_build};
use crate::bus::{BuildRequest, Bus, BusError, VERSION};
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, http};
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

pub use hook::HookConfig;
pub use serve::{ClientAddr, Limits};
pub use views::Trust;

/// The address `kiln up` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// The most builds `GET /v1/builds` lists at once.
pub const LIST_MAX: usize = 1000;
/// How many builds `GET /v1/builds` lists without `limit`.
const LIST_DEFAULT: usize = 20;

/// How many build ids submitted through this server are remembered as `queued` before their
/// first event arrives.
const REMEMBERED: usize = 4096;

/// An error answer: HTTP status and the JSON body `{"error": {kind, message, field?}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable: `unauthorized`, `invalid_request`, `not_found`, `forbidden`,
    /// `conflict`, `unreachable`, `bus`, `internal`.
    pub kind: &'static str,
    pub message: String,
    /// For `invalid_request`: the field at fault, dotted (`recipe.git.url`).
    pub field: Option<String>,
    /// Close the connection after this answer (the rest of the request was not read).
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            field: None,
            close: false,
        }
    }

    /// The same answer, closing the connection after it.
    pub fn closing(self) -> ApiError {
        ApiError {
            close: true,
            ..self
        }
    }

    /// 400 naming the field at fault.
    pub fn invalid(field: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            field,
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus",
            crate::error::chain_text(&e),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "kind": self.kind, "message": self.message });
        if let Some(f) = &self.field {
            error["field"] = json!(f);
        }
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED
            && let Ok(v) = header::HeaderValue::from_str("Bearer realm=\"kiln\"")
        {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        response
    }
}

/// What the API serves with.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The bearer token every POST must carry.
    pub token: String,
    pub hook: HookConfig,
    pub limits: Limits,
    /// The keys `GET /v1/images/verify` checks images with: None when this process publishes
    /// nothing.
    pub trust: Option<Trust>,
}

struct Inner {
    bus: Bus,
    /// sha256 of the token: compared in constant time against the sha256 of what a client sent,
    /// so neither the token's bytes nor its length leak through timing.
    token_digest: [u8; 32],
    hook: HookConfig,
    /// Ids submitted here, so a build is `queued` (not 404) until its first event.
    accepted: Mutex<(VecDeque<String>, HashSet<String>)>,
    /// One push at a time: the hook's watcher state is read, compared and saved per push.
    hook_lock: tokio::sync::Mutex<()>,
    limits: Limits,
    /// Live event streams, per client address and overall.
    followers: Arc<serve::Followers>,
    trust: Option<Trust>,
    /// Image verifications, reused for a while.
    verified: views::Verified,
}

#[derive(Clone)]
struct AppState(Arc<Inner>);

impl AppState {
    fn remember(&self, id: &str) {
        let Ok(mut guard) = self.0.accepted.lock() else {
            return;
        };
        let (order, set) = &mut *guard;
        if set.insert(id.to_string()) {
            order.push_back(id.to_string());
            while order.len() > REMEMBERED {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }

    fn accepted(&self, id: &str) -> bool {
        self.0
            .accepted
            .lock()
            .map(|g| g.1.contains(id))
            .unwrap_or(false)
    }

    /// Check `Authorization: Bearer <token>`.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "this request changes something and needs `Authorization: Bearer <token>` (the token of `kiln up`: --token-file, $KILN_API_TOKEN or $KILN_HOME/api-token)",
            ));
        };
        let text = value.to_str().unwrap_or("");
        let given = match text.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => {
                return Err(ApiError::unauthorized(
                    "the Authorization header must be `Bearer <token>`",
                ));
            }
        };
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if bool::from(digest.ct_eq(&self.0.token_digest)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("the bearer token is not valid"))
        }
    }
}

/// The API's routes over `bus`.
pub fn router(bus: Bus, config: ApiConfig) -> Router {
    let state = AppState(Arc::new(Inner {
        bus,
        token_digest: Sha256::digest(config.token.trim().as_bytes()).into(),
        hook: config.hook,
        accepted: Mutex::new((VecDeque::new(), HashSet::new())),
        hook_lock: tokio::sync::Mutex::new(()),
        limits: config.limits,
        followers: Arc::new(serve::Followers::default()),
        trust: config.trust,
        verified: views::Verified::default(),
    }));
    Router::new()
        .route("/v1/builds", post(submit).get(list))
        .route("/v1/builds/{id}", get(status))
        .route("/v1/builds/{id}/events", get(events))
        .route("/v1/builds/{id}/serial", get(views::serial))
        .route("/v1/events", get(views::live))
        .route("/v1/images", get(views::images))
        .route("/v1/images/verify", get(views::verify))
        .route("/v1/farm", get(views::farm))
        .route("/v1/agents", get(agents))
        .route("/v1/rollouts", get(rollouts))
        .route("/v1/rollouts/{id}", get(rollout))
        .route("/v1/hooks/git", post(git_hook))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard::page))
        .route("/builds", get(dashboard::page))
        .route("/builds/{id}", get(dashboard::page))
        .route("/images", get(dashboard::page))
        .route("/fleet", get(dashboard::page))
        .route("/farm", get(dashboard::page))
        .route("/ui/app.js", get(dashboard::script))
        .route("/ui/app.css", get(dashboard::style))
        .route("/ui/icon.svg", get(dashboard::icon))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/api.md (POST /v1/builds, GET /v1/builds, GET /v1/builds/{id}, GET /v1/builds/{id}/events, GET /v1/builds/{id}/serial, GET /v1/events, GET /v1/images, GET /v1/images/verify, GET /v1/farm, GET /v1/agents, GET /v1/rollouts, GET /v1/rollouts/{id}, POST /v1/hooks/git, GET /metrics; the dashboard at /)",
            )
        })
        .with_state(state)
}

/// Serve `router` on `listener` within `limits` until `shutdown` completes ([`serve::serve`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve::serve(listener, router, &limits, shutdown).await
}

/// Parse and check a `kiln.build.requested` body exactly as the bus does ([`crate::bus::decode`]),
/// naming the field at fault.
pub fn parse_request(body: &[u8]) -> Result<BuildRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: BuildRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        ApiError::invalid(
            field_of(&path, &message),
            format!("invalid build request: {message}"),
        )
    })?;
    if req.v != VERSION {
        return Err(ApiError::invalid(
            Some("v".into()),
            format!(
                "unsupported message version v={}: this kiln reads v={VERSION}",
                req.v
            ),
        ));
    }
    if req.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
        return Err(ApiError::invalid(
            Some("id".into()),
            "`id` is empty: leave it out and kiln assigns one",
        ));
    }
    // The bus's own checks, so both accept exactly the same messages.
    let req = crate::bus::decode::<BuildRequest>(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("invalid build request: {}", crate::error::Chain(&e)),
        )
    })?;
    req.check().map_err(|e| {
        ApiError::invalid(Some(e.field.clone()), format!("invalid build request: {e}"))
    })?;
    Ok(req)
}

/// The dotted field a serde error is about: the path, plus the name of a missing field.
fn field_of(path: &str, message: &str) -> Option<String> {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next());
    let path = (path != "." && !path.is_empty()).then_some(path);
    match (path, missing) {
        (Some(p), Some(m)) => Some(format!("{p}.{m}")),
        (None, Some(m)) => Some(m.to_string()),
        (Some(p), None) => Some(p.to_string()),
        (None, None) => None,
    }
}

/// `status_url` and `events_url` of a build: absolute when the request named its host.
fn build_links(headers: &HeaderMap, id: &str) -> serde_json::Value {
    let base = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .map(|h| format!("http://{h}"))
        .unwrap_or_default();
    let status = format!("{base}/v1/builds/{}", crate::net::percent_encode(id));
    json!({ "build": id, "status_url": status, "events_url": format!("{status}/events") })
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The token first: an unauthorized client cannot make the server read a body.
    state.authorize(&headers)?;
    let body = serve::read_body(body, &headers, &state.0.limits).await?;
    let mut req = parse_request(&body)?;
    if let Some(id) = &req.id
        && (state.accepted(id) || !state.0.bus.build_events(id).await?.is_empty())
    {
        return Err(ApiError {
            field: Some("id".into()),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("build {id:?} exists already; choose another id or leave `id` out"),
            )
        });
    }
    let id = req.id.clone().unwrap_or_else(crate::bus::new_build_id);
    req.id = Some(id.clone());
    state.0.bus.publish_request(&req).await?;
    state.remember(&id);
    tracing::info!("api: build {id} requested by {}", req.requester);
    Ok((StatusCode::ACCEPTED, axum::Json(build_links(&headers, &id))).into_response())
}

/// `limit` of a `GET /v1/builds` query string (`limit=N`; other parameters are ignored).
fn list_limit(query: Option<&str>) -> Result<usize, ApiError> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("limit="))
    else {
        return Ok(LIST_DEFAULT);
    };
    match value.parse::<usize>() {
        Ok(n) if (1..=LIST_MAX).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            Some("limit".into()),
            format!("limit must be a number from 1 to {LIST_MAX}"),
        )),
    }
}

async fn list(
    State(state): State<AppState>,
    uri: http::Uri,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let limit = list_limit(uri.query())?;
    let bus = &state.0.bus;
    let index = crate::bus::BuildIndex::open_existing(bus).await?;
    let builds = crate::bus::index::recent(bus, index.as_ref(), limit).await?;
    Ok(axum::Json(json!({ "builds": builds })))
}

/// `GET /v1/agents[?group=G]`: the fleet as `kiln agents --json` shows it.
async fn agents(
    State(state): State<AppState>,
    uri: http::Uri,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    use crate::bus::agents::{Inventory, in_group};
    let group = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("group="));
    if group.is_some_and(|g| !crate::bus::agents::valid_group(g)) {
        return Err(ApiError::invalid(
            Some("group".into()),
            "group is 1 to 64 letters, digits, `-`, `_` or `.`".to_string(),
        ));
    }
    let now = crate::time::now_ms() as i64;
    let entries = match Inventory::open_existing(&state.0.bus).await? {
        Some(inv) => in_group(inv.list(now).await?, group),
        None => Vec::new(),
    };
    Ok(axum::Json(json!({ "agents": entries })))
}

/// `GET /v1/rollouts`: every rollout in the `kiln-rollouts` bucket, oldest first.
async fn rollouts(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let list = match crate::bus::rollouts::Rollouts::open_existing(&state.0.bus).await? {
        Some(r) => r.list().await?.into_iter().map(|(r, _)| r).collect(),
        None => Vec::new(),
    };
    Ok(axum::Json(json!({ "rollouts": list })))
}

/// `GET /v1/rollouts/{id}`: one rollout, as `kiln rollout status ID --json` shows it.
async fn rollout(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<crate::bus::Rollout>, ApiError> {
    let found = match crate::bus::rollouts::Rollouts::open_existing(&state.0.bus).await? {
        Some(r) => r.get(&id).await?,
        None => None,
    };
    match found {
        Some((r, _)) => Ok(axum::Json(r)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no rollout {id:?} (GET /v1/rollouts lists them)"),
        )),
    }
}

/// How long a measured cache size is reused by scrapes (walking a large cache takes a while).
const CACHE_SIZE_REUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /metrics`: this process's metrics and the queue, object store and cache gauges.
async fn metrics(State(state): State<AppState>) -> Response {
    static MEASURED: Mutex<Option<(std::time::Instant, u64)>> = Mutex::new(None);
    let memo = *MEASURED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = match memo {
        Some((t, bytes)) if t.elapsed() < CACHE_SIZE_REUSE => Some(bytes),
        _ => {
            let home = state.0.hook.home.clone();
            let bytes = tokio::task::spawn_blocking(move || crate::gc::cache_bytes(&home))
                .await
                .ok();
            if let Some(b) = bytes {
                *MEASURED.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((std::time::Instant::now(), b));
            }
            bytes
        }
    };
    let gauges = crate::metrics::bus_gauges(&state.0.bus, cache).await;
    let body = crate::metrics::global().render(&gauges);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let events = state.0.bus.build_events(&id).await?;
    if events.is_empty() && !state.accepted(&id) {
        return Err(unknown_build(&id));
    }
    let status = BuildStatus::from_events(&id, &events);
    let deployments = crate::bus::status::deployments(&state.0.bus, &id).await?;
    let doc = crate::bus::status::status_document(&state.0.bus, &status, deployments).await?;
    Ok(axum::Json(doc))
}

fn unknown_build(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no build {id:?}: no event in the stream and not submitted here (is the id right? the stream keeps 7 days)"
        ),
    )
}

async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A place among the live followers, held by the stream until it ends or the client goes.
    let ip = ClientAddr::ip(client.as_ref().map(|Extension(c)| c));
    let slot = state.0.followers.follow(ip, &state.0.limits)?;
    // Resume after the last event a reconnecting client saw.
    let after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let history = state.0.bus.build_events(&id).await?;
    if history.is_empty() && !state.accepted(&id) {
        return Err(unknown_build(&id));
    }
    let follow = Box::pin(state.0.bus.follow(&id, true).await?);
    let stream = futures::stream::unfold(
        (follow, false, slot),
        move |(mut follow, done, slot)| async move {
            if done {
                return None;
            }
            loop {
                match follow.next().await {
                    None => return None,
                    Some(Err(e)) => {
                        let event = Event::default()
                            .event("error")
                            .data(crate::error::chain_text(&e));
                        return Some((Ok::<Event, Infallible>(event), (follow, true, slot)));
                    }
                    Some(Ok(recorded)) => {
                        let Ok(ev) = recorded.event else { continue };
                        let end = ends_build(&ev);
                        if recorded.sequence <= after && recorded.sequence != 0 {
                            if end {
                                return None;
                            }
                            continue;
                        }
                        let event = Event::default()
                            .event(ev.kind().name())
                            .id(recorded.sequence.to_string())
                            .data(String::from_utf8_lossy(&ev.encode()));
                        return Some((Ok(event), (follow, end, slot)));
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn git_hook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    let body: Bytes = serve::read_body(body, &headers, &state.0.limits).await?;
    let config = &state.0.hook;
    config.check_signature(&headers, &body)?;
    let push = match hook::parse_push(&headers, &body)? {
        hook::Parsed::Push(p) => p,
        hook::Parsed::Ignored(why) => {
            return Ok((
                StatusCode::OK,
                axum::Json(json!({ "ignored": why, "builds": [] })),
            )
                .into_response());
        }
    };
    let url = config.allowed(&push.repo)?;
    let _one_at_a_time = state.0.hook_lock.lock().await;
    let bus = state.0.bus.clone();
    let handle = tokio::runtime::Handle::current();
    let cfg = config.clone();
    let p = push.clone();
    let u = url.clone();
    let outcome = tokio::task::spawn_blocking(move || hook::run(&cfg, &u, &p, &bus, &handle))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the hook's worker thread failed: {e}"),
            )
        })??;
    let mut builds = Vec::new();
    for b in &outcome.builds {
        state.remember(&b.build);
        let mut links = build_links(&headers, &b.build);
        links["recipe"] = json!(b.recipe);
        links["commit"] = json!(b.commit);
        builds.push(links);
    }
    tracing::info!(
        "api: push to {url} {} at {}: {} build(s)",
        push.reference,
        outcome.commit,
        builds.len()
    );
    let code = if builds.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let body = json!({
        "repo": url,
        "ref": push.reference,
        "commit": outcome.commit,
        "builds": builds,
    });
    Ok((code, axum::Json(body)).into_response())
}

/// Where the API token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    File(PathBuf),
    Environment,
    /// Generated (or reused from an earlier start) at this path.
    Generated(PathBuf),
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the API token file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "API token file {path} is empty; write a long random token into it (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    Empty { path: PathBuf },
    #[error("$KILN_API_TOKEN is set but empty; set it to a long random token or unset it")]
    EmptyEnv,
}

/// The API token: from `file`, else `env` (`$KILN_API_TOKEN`), else `home/api-token`, generated
/// there (32 random bytes, hex, mode 0600) when missing.
pub fn load_token(
    file: Option<&FsPath>,
    env: Option<String>,
    home: &FsPath,
) -> Result<(String, TokenOrigin), TokenError> {
    let read = |path: &FsPath| -> Result<String, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(token)
    };
    if let Some(path) = file {
        return Ok((read(path)?, TokenOrigin::File(path.to_path_buf())));
    }
    if let Some(token) = env {
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(TokenError::EmptyEnv);
        }
        return Ok((token, TokenOrigin::Environment));
    }
    let path = home.join("api-token");
    if path.exists() {
        return Ok((read(&path)?, TokenOrigin::Generated(path)));
    }
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(home).map_err(io)?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .map_err(io)?;
    let token = hex::encode(random);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        writeln!(f, "{token}").map_err(io)?;
    }
    Ok((token, TokenOrigin::Generated(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_name_the_field() {
        let e = parse_request(br#"{"v":1,"recipe":{"path":"r"}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("requester"), "{e}");
        let e = parse_request(br#"{"v":1,"recipe":{"inline":"x"},"requester":"a"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("recipe.name"), "{e}");
        let e = parse_request(br#"{"v":1,"recipe":{"git":{"url":"u","ref":"r"}},"requester":"a"}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("recipe.git.path"), "{e}");
        let e = parse_request(br#"{"v":1,"recipe":{"path":"r"},"requester":"a","verify":"yes"}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("verify"), "{e}");
        let e = parse_request(br#"{"v":2,"recipe":{"path":"r"},"requester":"a"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("v"), "{e}");
        let e = parse_request(b"not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let ok = parse_request(br#"{"v":1,"recipe":{"path":"r"},"requester":"a","x":1}"#).unwrap();
        assert!(ok.verify);
    }

    #[test]
    fn tokens_are_generated_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let (t1, o1) = load_token(None, None, home.path()).unwrap();
        assert_eq!(t1.len(), 64);
        let path = home.path().join("api-token");
        assert_eq!(o1, TokenOrigin::Generated(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (t2, _) = load_token(None, None, home.path()).unwrap();
        assert_eq!(t1, t2, "a restart keeps the token");
        let (t3, o3) = load_token(None, Some("s3cret".into()), home.path()).unwrap();
        assert_eq!((t3.as_str(), o3), ("s3cret", TokenOrigin::Environment));
        let empty = home.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(load_token(Some(&empty), None, home.path()).is_err());
    }

    #[test]
    fn ids_are_encoded_in_links() {
        assert_eq!(crate::net::percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(
            crate::net::percent_encode("20261126T022407Z-9f3a01c2"),
            "20261126T022407Z-9f3a01c2"
        );
    }
}
