//! The message schemas: one type per subject, JSON with a `"v"` version: 1, except
//! `stage-completed`, which is v2 since it names the handed-on state by digest instead of
//! carrying it ([`StageCompleted::state_digest`]).
//!
//! Unknown fields are ignored (a newer publisher may add some); a missing required field is an
//! error that names the field; a `v` other than the type's [`Message::VERSION`] is rejected.
//! [`decode`] does all three checks.
//! `docs/messages.md` shows an example of each message and `docs/schemas/*.json` holds the JSON
//! Schemas generated from these types by [`json_schemas`].

use super::subjects::{self, DeployKind, EventKind, Stage};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The message format version every message but `stage-completed` carries as `"v"`.
pub const VERSION: u32 = 1;
/// The version of `stage-completed`: v2 dropped `state` (the whole handed-on state) for
/// `state_digest`.
pub const COMPLETED_VERSION: u32 = 2;

/// Why a payload could not be read as a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, a wrong type, or a missing required field. serde's text (which names the
    /// field) is the reason, part of this message: it has no cause of its own.
    #[error("invalid {what} message: {error}")]
    Json {
        what: &'static str,
        error: serde_json::Error,
    },
    #[error(
        "unsupported {what} message version v={found}: this kiln reads v={expected}; upgrade kiln or publish v={expected}"
    )]
    Version {
        what: &'static str,
        found: u32,
        expected: u32,
    },
}

/// Implemented by every message type.
pub trait Message: Serialize + DeserializeOwned {
    /// Short name, used in errors and as the schema file name (`docs/schemas/<NAME>.json`).
    const NAME: &'static str;
    /// The `"v"` this kiln reads and writes for this message.
    const VERSION: u32 = VERSION;
    /// The message's `"v"`.
    fn version(&self) -> u32;
}

/// Parse a message: JSON, required fields present, `v` = the type's version. Unknown fields are
/// ignored.
pub fn decode<M: Message>(payload: &[u8]) -> Result<M, DecodeError> {
    let msg: M = serde_json::from_slice(payload).map_err(|error| DecodeError::Json {
        what: M::NAME,
        error,
    })?;
    if msg.version() != M::VERSION {
        return Err(DecodeError::Version {
            what: M::NAME,
            found: msg.version(),
            expected: M::VERSION,
        });
    }
    Ok(msg)
}

/// Serialize a message (compact JSON).
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    // Serializing these plain data types cannot fail (no maps with non-string keys).
    serde_json::to_vec(msg).unwrap_or_default()
}

fn default_true() -> bool {
    true
}

/// A point in time: RFC 3339 text (what kiln writes, UTC with milliseconds) or Unix milliseconds
/// (what a shell script can produce most easily).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EventTime {
    /// e.g. `2026-11-26T02:24:07.123Z`
    Rfc3339(String),
    /// Milliseconds since 1970-01-01T00:00:00Z.
    UnixMs(u64),
}

impl EventTime {
    /// The current time as RFC 3339 UTC.
    pub fn now() -> EventTime {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        EventTime::Rfc3339(crate::time::rfc3339(ms, crate::time::Precision::Millis))
    }
}

/// A new build id: `<UTC time>-<8 random hex digits>`, e.g. `20261126T022407Z-9f3a01c2`. Sorts
/// by submission time and is a valid subject token.
pub fn new_build_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = crate::time::basic_stamp(now.as_millis() as i64);
    let mut random = [0u8; 4];
    let got = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random));
    if got.is_err() {
        // No urandom: mix the clock's nanoseconds and the process id instead.
        let mix = now.subsec_nanos() ^ std::process::id().rotate_left(16);
        random = mix.to_le_bytes();
    }
    format!("{stamp}-{}", hex::encode(random))
}

/// The id the source stage gives a request without one, from the request's publication time
/// (Unix milliseconds) and stream sequence: every delivery of the request, and the build index,
/// find the same id.
pub fn assigned_build_id(published_ms: u64, sequence: u64) -> String {
    let stamp = crate::time::basic_stamp(i64::try_from(published_ms).unwrap_or(i64::MAX));
    format!("{stamp}-{sequence:08x}")
}

/// The id under which a request that cannot be used (unreadable, or with an invalid id) is
/// reported: `invalid-<stream sequence>`.
pub fn refused_build_id(sequence: u64) -> String {
    format!("invalid-{sequence}")
}

/// Where the recipe of a build comes from. Exactly one of `path`, `inline` (with `name`) or
/// `git` is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RecipeSource {
    /// A recipe file on the worker's file system (single-host setups and tests).
    Path {
        /// Path of the recipe file.
        path: PathBuf,
    },
    /// The recipe text itself. Includes and templates it names must be inline too or absent.
    Inline {
        /// The recipe YAML.
        inline: String,
        /// A file name for messages (`file:line:column`), e.g. `web.yaml`.
        name: String,
    },
    /// A recipe in a git repository at a ref.
    Git { git: GitSource },
}

/// A recipe file in a git repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GitSource {
    /// Clone URL.
    pub url: String,
    /// Branch, tag or commit.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Path of the recipe inside the repository.
    pub path: String,
}

/// What the wire form of a recipe source may contain; checked into [`RecipeSource`] with errors
/// that say which keys are wrong.
#[derive(Deserialize)]
struct RecipeSourceWire {
    path: Option<PathBuf>,
    inline: Option<String>,
    name: Option<String>,
    git: Option<GitSource>,
}

impl<'de> Deserialize<'de> for RecipeSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = RecipeSourceWire::deserialize(d)?;
        let given = [w.path.is_some(), w.inline.is_some(), w.git.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given != 1 {
            return Err(D::Error::custom(
                "recipe needs exactly one of `path`, `inline` (with `name`) or `git`",
            ));
        }
        if let Some(path) = w.path {
            return Ok(RecipeSource::Path { path });
        }
        if let Some(git) = w.git {
            return Ok(RecipeSource::Git { git });
        }
        match (w.inline, w.name) {
            (Some(inline), Some(name)) => Ok(RecipeSource::Inline { inline, name }),
            _ => Err(D::Error::missing_field("name")),
        }
    }
}

/// `kiln.build.requested`: start a build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildRequest {
    /// Message format version: 1.
    pub v: u32,
    /// Build id; the submitter may choose one (it is sanitized into a subject token), else the
    /// first stage assigns one. Unique per submission; it never changes what the image contains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The recipe to build.
    pub recipe: RecipeSource,
    /// Recipe parameters (`--set KEY=VALUE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Who asked: a user, `ci:<pipeline>`, `git:<repo>`…
    pub requester: String,
    /// Verification profiles to boot (default: the recipe's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Boot the image under QEMU before publishing it (default true).
    #[serde(default = "default_true")]
    pub verify: bool,
    /// Templates directory on the worker's file system (default: the nearest `templates/` above
    /// the recipe), as `kiln build --templates` gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<std::path::PathBuf>,
}

impl Message for BuildRequest {
    const NAME: &'static str = "build-requested";
    fn version(&self) -> u32 {
        self.v
    }
}

impl BuildRequest {
    /// A v1 request with defaults.
    pub fn new(recipe: RecipeSource, requester: impl Into<String>) -> Self {
        BuildRequest {
            v: VERSION,
            id: None,
            recipe,
            params: BTreeMap::new(),
            requester: requester.into(),
            profiles: Vec::new(),
            verify: true,
            templates: None,
        }
    }
}

/// Bounds on a build request's fields. A request is untrusted input: whoever may publish
/// `kiln.build.requested` (or holds the API token) chooses every byte of it.
pub mod limits {
    /// Longest build id (it becomes a subject token and a KV key).
    pub const ID_MAX: usize = 64;
    /// Longest `requester`.
    pub const REQUESTER_MAX: usize = 256;
    /// Most recipe parameters, and the longest name and value.
    pub const PARAMS_MAX: usize = 256;
    pub const PARAM_NAME_MAX: usize = 128;
    pub const PARAM_VALUE_MAX: usize = 64 * 1024;
    /// Most verification profiles one request may ask for.
    pub const PROFILES_MAX: usize = 16;
    /// Largest inline recipe (the whole message must also fit the server's max_payload).
    pub const INLINE_MAX: usize = 512 * 1024;
    /// Longest path, git URL, ref or recipe file name.
    pub const TEXT_MAX: usize = 4096;
}

/// Why a build request is refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct RequestError {
    pub field: String,
    pub message: String,
}

/// True for a valid build id: 1 to [`limits::ID_MAX`] characters of `[A-Za-z0-9_-]`, starting
/// with a letter or digit. Ids are used as they are (never sanitized), so two ids never share
/// a subject.
pub fn is_valid_build_id(id: &str) -> bool {
    id.len() <= limits::ID_MAX
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

impl BuildRequest {
    /// Check the request's fields against [`limits`]: the id's form, sizes, and that profiles
    /// are names (looked up in the worker's own profile directories, never paths).
    pub fn check(&self) -> Result<(), RequestError> {
        let bad = |field: &str, message: String| {
            Err(RequestError {
                field: field.to_string(),
                message,
            })
        };
        if let Some(id) = &self.id
            && !is_valid_build_id(id)
        {
            return bad(
                "id",
                format!(
                    "must be 1 to {} characters of A-Z a-z 0-9 _ - starting with a letter or \
                     digit (got {} bytes); leave it out and kiln assigns one",
                    limits::ID_MAX,
                    id.len()
                ),
            );
        }
        if self.requester.len() > limits::REQUESTER_MAX || has_control(&self.requester) {
            return bad(
                "requester",
                format!(
                    "must be at most {} characters with no control characters",
                    limits::REQUESTER_MAX
                ),
            );
        }
        if self.params.len() > limits::PARAMS_MAX {
            return bad(
                "params",
                format!(
                    "has {} entries; at most {}",
                    self.params.len(),
                    limits::PARAMS_MAX
                ),
            );
        }
        for (k, v) in &self.params {
            if k.is_empty() || k.len() > limits::PARAM_NAME_MAX || has_control(k) {
                return bad(
                    "params",
                    format!(
                        "names must be 1 to {} characters with no control characters",
                        limits::PARAM_NAME_MAX
                    ),
                );
            }
            if v.len() > limits::PARAM_VALUE_MAX {
                return bad(
                    &format!("params.{k}"),
                    format!("is {} bytes; at most {}", v.len(), limits::PARAM_VALUE_MAX),
                );
            }
        }
        if self.profiles.len() > limits::PROFILES_MAX {
            return bad(
                "profiles",
                format!(
                    "names {} profiles; at most {}",
                    self.profiles.len(),
                    limits::PROFILES_MAX
                ),
            );
        }
        for p in &self.profiles {
            if let Err(e) = crate::verify::profile::check_name(p) {
                return bad("profiles", e.to_string());
            }
        }
        let text = |field: &str, value: &str| {
            if value.len() > limits::TEXT_MAX || has_control(value) {
                bad(
                    field,
                    format!(
                        "must be at most {} characters with no control characters",
                        limits::TEXT_MAX
                    ),
                )
            } else {
                Ok(())
            }
        };
        match &self.recipe {
            RecipeSource::Path { path } => text("recipe.path", &path.to_string_lossy())?,
            RecipeSource::Inline { inline, name } => {
                text("recipe.name", name)?;
                if inline.len() > limits::INLINE_MAX {
                    return bad(
                        "recipe.inline",
                        format!("is {} bytes; at most {}", inline.len(), limits::INLINE_MAX),
                    );
                }
            }
            RecipeSource::Git { git } => {
                text("recipe.git.url", &git.url)?;
                text("recipe.git.ref", &git.git_ref)?;
                text("recipe.git.path", &git.path)?;
            }
        }
        if let Some(t) = &self.templates {
            text("templates", &t.to_string_lossy())?;
        }
        Ok(())
    }
}

/// How a stage got its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// Outputs were already recorded for this stage's key.
    Hit,
    /// The stage did the work.
    Miss,
}

impl std::fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        })
    }
}

/// What kind of failure: tells the user whether to fix the recipe, retry, or report a bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The recipe (or a parameter) is wrong; `file:line:column` say where. Not retried.
    Recipe,
    /// Network, crash, timeout: retried; `failed` with this kind means retries ran out.
    Transient,
    /// A bug or broken installation in kiln.
    Internal,
    /// The message that triggered the stage could not be read (e.g. a missing field).
    InvalidMessage,
    /// The boot check failed.
    Verification,
    /// The worker's disk is full, over quota or read-only (the message names the path): not
    /// retried; free space and submit again.
    NoSpace,
    /// A kind this version of kiln does not know.
    #[serde(other)]
    Other,
}

/// Why something failed: enough that nobody needs a worker's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    /// One line.
    pub message: String,
    /// For recipe errors: the file…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// …line (1-based)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// …and column (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// What to do about it, when kiln knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    /// The full report, several lines: the recipe line with a caret under the column, the
    /// causes, the last lines of a failed boot's serial console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ErrorInfo {
    /// An error without a location; the message is cut to its first line.
    pub fn new(kind: ErrorKind, message: &str) -> Self {
        ErrorInfo {
            kind,
            message: message.lines().next().unwrap_or("").to_string(),
            file: None,
            line: None,
            column: None,
            help: None,
            detail: None,
        }
    }

    /// An error and its causes: the message is the chain on one line (`what: cause: cause`),
    /// the detail the chain one cause per line when there is more than one.
    pub fn from_error(kind: ErrorKind, e: &dyn std::error::Error) -> Self {
        let chain = error_chain(e);
        let mut info = ErrorInfo::new(kind, &chain.join(": "));
        if chain.len() > 1 {
            info.detail = Some(chain.join("\n  caused by: "));
        }
        info
    }

    /// `file:line:column` (or as much of it as is known).
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_ref()?;
        Some(match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
            (Some(l), None) => format!("{file}:{l}"),
            _ => file.clone(),
        })
    }
}

/// An error's message and those of its causes, each said once ([`crate::error::chain`]).
pub fn error_chain(e: &dyn std::error::Error) -> Vec<String> {
    crate::error::chain(e)
}

/// `kiln.build.<id>.<stage>.started`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageStarted {
    pub v: u32,
    /// Build id.
    pub build: String,
    pub stage: Stage,
    /// Which worker (host/process) runs it.
    pub worker: String,
    pub time: EventTime,
    /// Delivery attempt, 1 for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
}

/// `kiln.build.<id>.<stage>.progress`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageProgress {
    pub v: u32,
    pub build: String,
    pub stage: Stage,
    pub worker: String,
    pub time: EventTime,
    /// Done so far, 0.0–1.0, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// What is happening, one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `kiln.build.<id>.<stage>.completed`: triggers the next stage. Version 2
/// ([`COMPLETED_VERSION`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageCompleted {
    /// Message format version: 2.
    pub v: u32,
    pub build: String,
    pub stage: Stage,
    pub worker: String,
    pub time: EventTime,
    /// Content digests of what the stage produced (a JSON object, stage-specific).
    pub outputs: serde_json::Value,
    /// `sha256:<hex>` naming the build state accumulated so far (what later stages need): the
    /// worker that published this message recorded that state under this digest, for this build
    /// and stage, in the `kiln-states` KV bucket (key `state/sha256=<hex>`). The next stage
    /// loads it from there and refuses a digest no worker recorded.
    pub state_digest: String,
    pub cache: CacheStatus,
    pub duration_ms: u64,
}

/// `kiln.build.<id>.<stage>.failed`: the build stops here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageFailed {
    pub v: u32,
    pub build: String,
    pub stage: Stage,
    pub worker: String,
    pub time: EventTime,
    pub error: ErrorInfo,
    /// How many delivery attempts were made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Cut `text` to at most `max` bytes, keeping its start and its end (where a serial log's last
/// lines are) around a note of what was left out.
fn cut_middle(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let note_room = 64;
    let keep = max.saturating_sub(note_room) / 2;
    let mut head = keep.min(text.len());
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len().saturating_sub(keep);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n… ({} bytes left out) …\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

impl StageFailed {
    /// Make the encoded message fit in `limit` bytes (the server's max_payload less room for
    /// headers) by cutting the middle of its detail, then of its message: a failure is always
    /// reported, never dropped for its size.
    pub fn fit(&mut self, limit: usize) {
        for _ in 0..8 {
            let size = encode(self).len();
            if size <= limit {
                return;
            }
            let over = size - limit;
            if let Some(detail) = &self.error.detail {
                let target = detail.len().saturating_sub(over + 256);
                self.error.detail = (target >= 512).then(|| cut_middle(detail, target));
                continue;
            }
            let target = self.error.message.len().saturating_sub(over + 256).max(256);
            self.error.message = cut_middle(&self.error.message, target);
            if let Some(help) = &self.error.help {
                self.error.help = Some(cut_middle(help, 1024));
            }
        }
    }
}

/// `kiln.image.published.<repository>`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImagePublished {
    pub v: u32,
    pub build: String,
    /// Repository, unsanitized (e.g. `registry:5000/team/web`).
    pub repository: String,
    /// `repo:tag@sha256:…`
    pub reference: String,
    /// Manifest digest `sha256:…`.
    pub digest: String,
    /// Every tag the image was pushed under (the reference's tag first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The signature: the digest `sha256:…` of the signature artifact (an OCI referrer of the
    /// image manifest, also tagged `sha256-<manifest hex>.sig` in the same repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The verification report (profiles booted, markers seen, durations).
    #[serde(default)]
    pub verification: serde_json::Value,
    /// Set when `kiln promote` moved a channel to the image: the agents following the channel
    /// take it up like a new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
    pub time: EventTime,
}

/// `kiln.image.revoked.<repository>`: `kiln revoke` pulled an image back. Every agent running it
/// returns to the image it ran before and reports; from then on pulls, promotions and agents
/// refuse it (the registry holds the revocation too, tagged `sha256-<hex>.revoked`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageRevoked {
    pub v: u32,
    /// Repository, unsanitized (e.g. `registry:5000/team/web`).
    pub repository: String,
    /// The image: `repo@sha256:…`.
    pub reference: String,
    /// Manifest digest `sha256:…`.
    pub digest: String,
    pub reason: String,
    /// Who revoked it (`user@host`).
    pub by: String,
    pub time: EventTime,
}

/// Who moved which channel to an image, and from which reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Promotion {
    /// The channel (a tag of the repository), e.g. `stable`.
    pub channel: String,
    /// Who promoted it: the user and host `kiln promote` ran as (`alice@ops-1`).
    pub by: String,
    /// The reference given to `kiln promote` (`repo@sha256:…`).
    pub from: String,
}

/// `kiln.deploy.<agent>.completed`: what runs where now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployCompleted {
    pub v: u32,
    /// Agent (host) name, unsanitized.
    pub agent: String,
    /// The build that produced the image (from its `kiln.image.published` message), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The application (VM) that was updated.
    pub application: String,
    /// Image now running: `repo:tag@sha256:…`
    pub reference: String,
    /// Image that ran before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// How the VM runs: QEMU pid, forwarded port, seconds from the published message to healthy…
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub vm: serde_json::Value,
    /// The rollout order this answers ([`DeployOrder::order`]), when a rollout asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Why the agent acted without an announcement or order: `revoked sha256:…: …` (it went
    /// back from a revoked image), `restarted: …` (the VM failed its health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// How the image got here, when the agent pulled it for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullStats>,
    pub time: EventTime,
}

/// What pulling an image cost an agent: the disk's size, the bytes fetched from the registry,
/// and, for a delta pull (the image has a chunk index and the agent kept earlier images), the
/// bytes taken from those images and the chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PullStats {
    pub bytes: u64,
    pub fetched_bytes: u64,
    #[serde(default)]
    pub reused_bytes: u64,
    /// Chunks in the image's index (0: the whole disk was downloaded).
    #[serde(default)]
    pub chunks: u64,
    #[serde(default)]
    pub fetched_chunks: u64,
    pub seconds: f64,
}

/// `kiln.deploy.<agent>.failed`: the new image did not take; says why and what runs now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployFailed {
    pub v: u32,
    pub agent: String,
    /// The build that produced the image that was tried, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    pub application: String,
    /// Image that was tried.
    pub reference: String,
    pub error: ErrorInfo,
    /// True when the previous image was restored.
    #[serde(default)]
    pub rolled_back: bool,
    /// Image running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The rollout order this answers ([`DeployOrder::order`]), when a rollout asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    pub time: EventTime,
}

/// `kiln.agent.<agent>.deploy`: a rollout controller asks one agent to deploy one image. The
/// agent deploys it as it would an announcement of its tag (same checks, same swap or
/// rollback) and answers on `kiln.deploy.<agent>.completed|failed` with the order's id. An
/// order it has answered already is answered again from what runs, never deployed twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployOrder {
    pub v: u32,
    /// Agent (host) name, unsanitized.
    pub agent: String,
    /// The rollout's id.
    pub rollout: String,
    /// This order's id, `<rollout>.<wave>.<agent>.<attempt>`: what the answer carries.
    pub order: String,
    /// The image, as announced (repository, `repo@sha256:…` reference, digest).
    pub image: ImagePublished,
    pub time: EventTime,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// A controller is moving it wave by wave.
    Running,
    /// Every wave deployed and baked.
    Completed,
    /// Stopped at a failure (`reason` says which host and why); `kiln rollout resume` goes on.
    Halted,
    /// Stopped by `kiln rollout abort`: nothing more is deployed.
    Aborted,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Completed => "completed",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
        }
    }
}

/// Where one host of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Not asked yet.
    Pending,
    /// Sent a [`DeployOrder`], waiting for the answer.
    Ordered,
    /// Runs the image, healthy.
    Deployed,
    /// Refused the image or rolled it back (or did not answer in time).
    Failed,
}

/// One host of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutHost {
    pub agent: String,
    /// The wave it belongs to (0-based).
    pub wave: usize,
    pub state: HostState,
    /// The last order sent to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Orders sent to it so far (a resumed rollout asks a failed host again).
    #[serde(default)]
    pub attempts: u32,
    /// When the last order was sent (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_ms: Option<i64>,
    /// When it answered (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_ms: Option<i64>,
    /// The agent's answer: why it failed (with the serial console's last lines), or what
    /// runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `kiln.rollout.<id>.<event>` and the rollout's entry in the `kiln-rollouts` KV bucket: an
/// image moving through a group of agents in waves. Every change is put on the stream with
/// `event` saying what changed, so the stream is the rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rollout {
    pub v: u32,
    pub id: String,
    /// What just happened: `requested`, `ordered`, `deployed`, `failed`, `baking`, `wave`,
    /// `completed`, `halted`, `aborted`, `resumed`.
    pub event: String,
    /// The image: `repo@sha256:…`.
    pub reference: String,
    /// Repository, unsanitized (e.g. `registry:5000/team/web`).
    pub repository: String,
    /// Manifest digest `sha256:…`.
    pub digest: String,
    /// The group of agents it goes to.
    pub group: String,
    /// The waves as given (`1`, `25%`, …): each a number of hosts or a share of the group;
    /// the last takes every host left.
    pub waves: Vec<String>,
    /// The hosts of each wave, fixed when the rollout starts.
    #[serde(default)]
    pub plan: Vec<Vec<String>>,
    /// Hosts of a wave being deployed at once.
    pub max_unavailable: u32,
    /// Failed hosts tolerated before the rollout halts (0: the first failure halts it).
    #[serde(default)]
    pub max_failures: u32,
    /// Seconds every host of a wave must stay healthy before the next wave starts.
    pub bake_s: u64,
    /// Seconds an agent has to answer an order.
    pub deploy_timeout_s: u64,
    /// Who asked (`user@host`).
    pub by: String,
    pub state: RolloutState,
    /// The wave being deployed (0-based; `plan.len()` once completed).
    pub wave: usize,
    #[serde(default)]
    pub hosts: Vec<RolloutHost>,
    /// When the current wave's bake started (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_since_ms: Option<i64>,
    /// Why it halted or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The controller that moves it (its lease ends at `lease_until_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    #[serde(default)]
    pub lease_until_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub time: EventTime,
}

/// What an agent is doing, as its heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentHealth {
    /// Nothing runs (no image deployed yet).
    Idle,
    /// A new image is being pulled, booted and checked.
    Deploying,
    /// A VM runs and its QEMU is alive.
    Healthy,
    /// The VM that should run is not running (its QEMU is gone), or fails its health checks.
    Unhealthy,
}

impl AgentHealth {
    pub fn name(self) -> &'static str {
        match self {
            AgentHealth::Idle => "idle",
            AgentHealth::Deploying => "deploying",
            AgentHealth::Healthy => "healthy",
            AgentHealth::Unhealthy => "unhealthy",
        }
    }
}

/// `kiln.agent.<agent>.heartbeat`, and the agent's entry in the `kiln-agents` KV bucket: what
/// runs on one host. The bucket gets one every `interval_s`; the stream only when the health
/// or the running image changed, so it stays a history rather than a clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentHeartbeat {
    pub v: u32,
    /// Agent (host) name, unsanitized.
    pub agent: String,
    /// The groups it joined (`kiln agent --group`), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// `repository:tag` it follows.
    pub watch: String,
    pub health: AgentHealth,
    /// Image running now: `repo:tag@sha256:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Its manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Image that ran before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Image being deployed (health `deploying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploying: Option<String>,
    /// The running VM's QEMU process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Seconds since the running VM became healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// The stable address forwarded to the running VM (`kiln agent --listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    pub kiln_version: String,
    /// Seconds between heartbeats: an agent not heard from for three is `gone`.
    pub interval_s: u64,
    /// When it was sent, in milliseconds since the Unix epoch (what `gone` is judged by).
    pub sent_ms: i64,
    pub time: EventTime,
}

macro_rules! message {
    ($t:ty, $name:literal) => {
        impl Message for $t {
            const NAME: &'static str = $name;
            fn version(&self) -> u32 {
                self.v
            }
        }
    };
}
message!(StageStarted, "stage-started");
message!(StageProgress, "stage-progress");
impl Message for StageCompleted {
    const NAME: &'static str = "stage-completed";
    const VERSION: u32 = COMPLETED_VERSION;
    fn version(&self) -> u32 {
        self.v
    }
}
message!(StageFailed, "stage-failed");
message!(ImagePublished, "image-published");
message!(DeployCompleted, "deploy-completed");
message!(DeployFailed, "deploy-failed");
message!(AgentHeartbeat, "agent-heartbeat");
message!(DeployOrder, "deploy-order");
message!(Rollout, "rollout");
message!(ImageRevoked, "image-revoked");

/// Any stage event, as read back from the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StageEvent {
    Started(StageStarted),
    Progress(StageProgress),
    Completed(StageCompleted),
    Failed(StageFailed),
}

impl StageEvent {
    /// Decode a payload published on `kiln.build.<id>.<stage>.<kind>`.
    pub fn decode(kind: EventKind, payload: &[u8]) -> Result<StageEvent, DecodeError> {
        Ok(match kind {
            EventKind::Started => StageEvent::Started(decode(payload)?),
            EventKind::Progress => StageEvent::Progress(decode(payload)?),
            EventKind::Completed => StageEvent::Completed(decode(payload)?),
            EventKind::Failed => StageEvent::Failed(decode(payload)?),
        })
    }

    pub fn kind(&self) -> EventKind {
        match self {
            StageEvent::Started(_) => EventKind::Started,
            StageEvent::Progress(_) => EventKind::Progress,
            StageEvent::Completed(_) => EventKind::Completed,
            StageEvent::Failed(_) => EventKind::Failed,
        }
    }

    pub fn build(&self) -> &str {
        match self {
            StageEvent::Started(e) => &e.build,
            StageEvent::Progress(e) => &e.build,
            StageEvent::Completed(e) => &e.build,
            StageEvent::Failed(e) => &e.build,
        }
    }

    pub fn stage(&self) -> Stage {
        match self {
            StageEvent::Started(e) => e.stage,
            StageEvent::Progress(e) => e.stage,
            StageEvent::Completed(e) => e.stage,
            StageEvent::Failed(e) => e.stage,
        }
    }

    /// The subject this event is published on.
    pub fn subject(&self) -> String {
        subjects::stage_event(self.build(), self.stage(), self.kind())
    }

    /// The JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StageEvent::Started(e) => encode(e),
            StageEvent::Progress(e) => encode(e),
            StageEvent::Completed(e) => encode(e),
            StageEvent::Failed(e) => encode(e),
        }
    }
}

impl ImagePublished {
    pub fn subject(&self) -> String {
        subjects::image_published(&self.repository)
    }
}

impl DeployCompleted {
    pub fn subject(&self) -> String {
        subjects::deploy(&self.agent, DeployKind::Completed)
    }
}

impl DeployFailed {
    pub fn subject(&self) -> String {
        subjects::deploy(&self.agent, DeployKind::Failed)
    }
}

impl AgentHeartbeat {
    pub fn subject(&self) -> String {
        subjects::agent_heartbeat(&self.agent)
    }
}

impl ImageRevoked {
    pub fn subject(&self) -> String {
        subjects::image_revoked(&self.repository)
    }
}

impl DeployOrder {
    pub fn subject(&self) -> String {
        subjects::agent_deploy(&self.agent)
    }
}

impl Rollout {
    pub fn subject(&self) -> String {
        subjects::rollout_event(&self.id, &self.event)
    }
}

fn schema_of<T: JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(serde_json::Value::Null)
}

/// `(file name, JSON Schema)` of every message, for `docs/schemas/`.
pub fn json_schemas() -> Vec<(String, serde_json::Value)> {
    vec![
        (
            format!("{}.json", BuildRequest::NAME),
            schema_of::<BuildRequest>(),
        ),
        (
            format!("{}.json", StageStarted::NAME),
            schema_of::<StageStarted>(),
        ),
        (
            format!("{}.json", StageProgress::NAME),
            schema_of::<StageProgress>(),
        ),
        (
            format!("{}.json", StageCompleted::NAME),
            schema_of::<StageCompleted>(),
        ),
        (
            format!("{}.json", StageFailed::NAME),
            schema_of::<StageFailed>(),
        ),
        (
            format!("{}.json", ImagePublished::NAME),
            schema_of::<ImagePublished>(),
        ),
        (
            format!("{}.json", DeployCompleted::NAME),
            schema_of::<DeployCompleted>(),
        ),
        (
            format!("{}.json", DeployFailed::NAME),
            schema_of::<DeployFailed>(),
        ),
        (
            format!("{}.json", AgentHeartbeat::NAME),
            schema_of::<AgentHeartbeat>(),
        ),
        (
            format!("{}.json", DeployOrder::NAME),
            schema_of::<DeployOrder>(),
        ),
        (format!("{}.json", Rollout::NAME), schema_of::<Rollout>()),
        (
            format!("{}.json", ImageRevoked::NAME),
            schema_of::<ImageRevoked>(),
        ),
    ]
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_oversized_failure_is_cut_to_fit_not_dropped() {
        let mut f = StageFailed {
            v: VERSION,
            build: "b".into(),
            stage: Stage::Verify,
            worker: "w".into(),
            time: EventTime::UnixMs(0),
            error: ErrorInfo::new(ErrorKind::Verification, &"m".repeat(30_000)),
            attempts: Some(1),
            duration_ms: None,
        };
        let mut huge = f.clone();
        huge.error.message = "m".repeat(3_000_000);
        huge.error.detail = Some("d".repeat(3_000_000));
        huge.fit(100_000);
        assert!(encode(&huge).len() <= 100_000, "{}", encode(&huge).len());
        assert!(huge.error.message.contains("bytes left out"));
        f.error.detail = Some(format!(
            "first line\n{}\nlast line é",
            "é".repeat(2_000_000)
        ));
        f.fit(100_000);
        assert!(encode(&f).len() <= 100_000, "{}", encode(&f).len());
        let detail = f.error.detail.clone().unwrap_or_default();
        assert!(detail.starts_with("first line"), "{}", &detail[..40]);
        assert!(detail.ends_with("last line é"));
        assert!(detail.contains("bytes left out"));
        let small = f.clone();
        f.fit(100_000);
        assert_eq!(f, small, "fitting twice changes nothing");
    }

    use super::*;

    #[test]
    fn build_ids_are_tokens() {
        let id = new_build_id();
        assert!(subjects::is_clean_token(&id), "{id}");
        assert_eq!(id.len(), "20261126T022407Z-9f3a01c2".len(), "{id}");
    }

    #[test]
    fn requests_check_fields() {
        let ok = br#"{"v":1,"recipe":{"path":"r.yaml"},"requester":"ci","extra":true}"#;
        let r: BuildRequest = decode(ok).unwrap();
        assert!(r.verify);
        assert_eq!(
            r.recipe,
            RecipeSource::Path {
                path: "r.yaml".into()
            }
        );
        let e = decode::<BuildRequest>(br#"{"v":1,"recipe":{"path":"r"}}"#).unwrap_err();
        assert!(e.to_string().contains("requester"), "{e}");
        let e = decode::<BuildRequest>(br#"{"v":1,"recipe":{"inline":"x"},"requester":"a"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("`name`"), "{e}");
        let e = decode::<BuildRequest>(
            br#"{"v":1,"recipe":{"path":"a","git":{"url":"u","ref":"r","path":"p"}},"requester":"a"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let e = decode::<BuildRequest>(br#"{"v":2,"recipe":{"path":"r"},"requester":"a"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("v=2"), "{e}");
        let e = decode::<BuildRequest>(br#"{"recipe":{"path":"r"},"requester":"a"}"#).unwrap_err();
        assert!(e.to_string().contains("`v`"), "{e}");
    }

    #[test]
    fn unknown_error_kinds_are_kept_readable() {
        let e: ErrorInfo = serde_json::from_str(r#"{"kind":"cosmic_ray","message":"m"}"#).unwrap();
        assert_eq!(e.kind, ErrorKind::Other);
        assert_eq!(ErrorInfo::new(ErrorKind::Internal, "a\nb").message, "a");
    }
}
