//! `POST /v1/hooks/git`: a push to a git repository becomes builds of the recipes whose inputs
//! changed at the pushed commit.
//!
//! Payloads: GitHub's and Gitea's push event (told by the `X-GitHub-Event` / `X-Gitea-Event`
//! header: `repository.clone_url`, `ref`, `after`) and a generic `{repo, ref, commit?}` for
//! everything else. Only repositories in the allow-list of `kiln up --hook-repo` are built, and
//! always from the allow-list's URL, so a hook cannot make the server clone anything else. With
//! a secret configured, the body's HMAC-SHA256 (`X-Hub-Signature-256: sha256=<hex>`, or Gitea's
//! `X-Gitea-Signature: <hex>`) must match too.
//!
//! What changed is the watcher's decision ([`crate::watch::Watcher`]), with a state file per
//! repository, ref and glob under `$KILN_HOME/hooks/`: the first push seen compares with the
//! pushed commit's parent, later ones with the last commit processed; a push delivered twice
//! builds nothing the second time.

use super::ApiError;
use crate::bus::{Bus, new_build_id};
use crate::source::{GitMirror, SourceError};
use crate::watch::{WatchError, Watcher, state_file_for};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use subtle::ConstantTimeEq;

/// How the hook decides what to build.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Repositories that may be built (URLs or local paths, as `kiln up --hook-repo` got them).
    pub repos: Vec<String>,
    /// Which files of a repository are recipes, e.g. `recipes/*.yaml`.
    pub recipes: String,
    /// Shared secret for payload signatures; none = signatures are not checked.
    pub secret: Option<Vec<u8>>,
    /// Kiln home: git mirrors, checkouts and the hook's watcher state.
    pub home: PathBuf,
}

/// A push, whatever the payload's dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The repository as the payload names it.
    pub repo: String,
    /// The pushed ref, e.g. `refs/heads/main` (or `main`).
    pub reference: String,
    /// The commit the ref now points at; none = the ref's head when the hook runs.
    pub commit: Option<String>,
}

/// What a payload asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Push(Push),
    /// Nothing to build (a ping, another event, a deleted branch), and why.
    Ignored(String),
}

#[derive(Deserialize)]
struct Generic {
    repo: String,
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    commit: Option<String>,
}

#[derive(Deserialize)]
struct ForgePush {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    deleted: bool,
    repository: ForgeRepository,
}

#[derive(Deserialize)]
struct ForgeRepository {
    clone_url: String,
}

/// Read a hook payload: GitHub's or Gitea's push event by their event header, else the generic
/// `{repo, ref, commit?}`.
pub fn parse_push(headers: &HeaderMap, body: &[u8]) -> Result<Parsed, ApiError> {
    let event = ["x-github-event", "x-gitea-event", "x-gogs-event"]
        .iter()
        .find_map(|h| headers.get(*h))
        .map(|v| v.to_str().unwrap_or("").to_string());
    let parse_error = |e: serde_path_to_error::Error<serde_json::Error>| {
        let message = e.inner().to_string();
        ApiError::invalid(
            super::field_of(&e.path().to_string(), &message),
            format!("invalid push payload: {message}"),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    match event.as_deref() {
        Some("push") => {
            let p: ForgePush = serde_path_to_error::deserialize(&mut de).map_err(parse_error)?;
            let zero = p
                .after
                .as_deref()
                .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b == b'0'));
            if p.deleted || zero {
                return Ok(Parsed::Ignored(format!("{} was deleted", p.reference)));
            }
            let commit = p.after.filter(|a| !a.is_empty());
            check_commit(commit.as_deref(), "after")?;
            Ok(Parsed::Push(Push {
                repo: p.repository.clone_url,
                reference: p.reference,
                commit,
            }))
        }
        Some("ping") => Ok(Parsed::Ignored("ping: the hook is set up".into())),
        Some(other) => Ok(Parsed::Ignored(format!(
            "`{other}` events build nothing; send push events"
        ))),
        None => {
            let g: Generic = serde_path_to_error::deserialize(&mut de).map_err(parse_error)?;
            if g.reference.trim().is_empty() {
                return Err(ApiError::invalid(Some("ref".into()), "`ref` is empty"));
            }
            let commit = g.commit.filter(|c| !c.is_empty());
            check_commit(commit.as_deref(), "commit")?;
            Ok(Parsed::Push(Push {
                repo: g.repo,
                reference: g.reference,
                commit,
            }))
        }
    }
}

fn check_commit(commit: Option<&str>, field: &str) -> Result<(), ApiError> {
    match commit {
        Some(c) if c.len() != 40 || !c.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(ApiError::invalid(
                Some(field.into()),
                format!("`{field}` must be a full commit id (40 hex digits), not {c:?}"),
            ))
        }
        _ => Ok(()),
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        let d: [u8; 32] = Sha256::digest(key).into();
        k[..32].copy_from_slice(&d);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner_pad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let outer_pad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let mut inner = Sha256::new();
    inner.update(&inner_pad);
    inner.update(message);
    let inner: [u8; 32] = inner.finalize().into();
    let mut outer = Sha256::new();
    outer.update(&outer_pad);
    outer.update(inner);
    outer.finalize().into()
}

impl HookConfig {
    /// When a secret is configured: the body's signature must match it.
    pub fn check_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let given = headers
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256="))
            .or_else(|| {
                headers
                    .get("x-gitea-signature")
                    .and_then(|v| v.to_str().ok())
            });
        let Some(given) = given else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server checks hook signatures: send `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body, hex>` made with the hook secret",
            ));
        };
        let expected = hex::encode(hmac_sha256(secret, body));
        if bool::from(
            expected
                .as_bytes()
                .ct_eq(given.trim().to_ascii_lowercase().as_bytes()),
        ) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the payload signature does not match the hook secret",
            ))
        }
    }

    /// The allow-listed URL `repo` stands for, or 403.
    pub fn allowed(&self, repo: &str) -> Result<String, ApiError> {
        let wanted = crate::source::canonical_repo_url(repo, &self.home);
        let found = self.repos.iter().find(|r| {
            wanted.is_some() && crate::source::canonical_repo_url(r, &self.home) == wanted
        });
        match found {
            Some(r) => GitMirror::with_home(r, &self.home)
                .map(|s| s.url().to_string())
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        crate::error::chain_text(&e),
                    )
                }),
            None if self.repos.is_empty() => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "repository {} is not allowed: this server allows no repository; start `kiln up` with --hook-repo URL",
                    crate::net::redact(repo)
                ),
            )),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "repository {} is not in this server's allow-list (kiln up --hook-repo)",
                    crate::net::redact(repo)
                ),
            )),
        }
    }
}

/// A build the hook submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmittedBuild {
    pub build: String,
    /// The recipe's path in the repository.
    pub recipe: String,
    pub commit: String,
}

/// What a push led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The commit the recipes were read at.
    pub commit: String,
    pub builds: Vec<SubmittedBuild>,
}

impl From<WatchError> for ApiError {
    fn from(e: WatchError) -> ApiError {
        let (status, kind) = match &e {
            WatchError::Source(SourceError::Unreachable { .. }) => {
                (StatusCode::BAD_GATEWAY, "unreachable")
            }
            WatchError::Source(
                SourceError::UnknownRef { .. }
                | SourceError::BadRecipePath { .. }
                | SourceError::MissingRecipe { .. }
                | SourceError::UnsupportedScheme { .. }
                | SourceError::NoSuchPath { .. },
            ) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, crate::error::chain_text(&e))
    }
}

/// Run the watcher for `push` of the allow-listed `url` and publish a build request per recipe
/// whose inputs changed. Blocking (git): call from `spawn_blocking`; `runtime` publishes.
pub fn run(
    config: &HookConfig,
    url: &str,
    push: &Push,
    bus: &Bus,
    runtime: &tokio::runtime::Handle,
) -> Result<Outcome, ApiError> {
    let source = GitMirror::with_home(url, &config.home).map_err(WatchError::from)?;
    // Build a commit only as what the payload says it is: a commit on the ref it names.
    if let Some(commit) = &push.commit
        && !source
            .is_on(&push.reference, commit)
            .map_err(WatchError::from)?
    {
        return Err(ApiError {
            field: Some("commit".into()),
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!(
                    "commit {commit} is not on {} of {}; refused (a hook builds only commits \
                     of the ref it names)",
                    push.reference,
                    crate::net::redact(url).into_owned()
                ),
            )
        });
    }
    let state_file = state_file_for(
        &config.home.join("hooks"),
        source.url(),
        &push.reference,
        &config.recipes,
    );
    let mut watcher = Watcher::with_source(source, &push.reference, &config.recipes, &state_file)?;
    let at = push
        .commit
        .clone()
        .unwrap_or_else(|| push.reference.clone());
    if watcher.state().commit.is_none()
        && let Some(parent) = watcher.parent_of(&at)?
    {
        // The first push this server sees: what changed relative to the commit before it.
        watcher.baseline(&parent)?;
    }
    let mut builds = Vec::new();
    // The requester is recorded in every message of the build: no credentials in it.
    let requester = format!("git:{}", crate::net::redact(url));
    let triggers = watcher.deliver(Some(&at), |t| {
        let mut req = t.build_request(url, requester.clone());
        let id = new_build_id();
        req.id = Some(id.clone());
        runtime
            .block_on(bus.publish_request(&req))
            .map_err(ApiError::from)?;
        builds.push(SubmittedBuild {
            build: id,
            recipe: t.recipe_path.clone(),
            commit: t.commit.clone(),
        });
        Ok::<(), ApiError>(())
    })?;
    let commit = match triggers.first() {
        Some(t) => t.commit.clone(),
        None => watcher.state().commit.clone().unwrap_or_else(|| at.clone()),
    };
    Ok(Outcome { commit, builds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test cases 1 and 2.
        let key = [0x0bu8; 20];
        assert_eq!(
            hex::encode(hmac_sha256(&key, b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaau8; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn payload_dialects() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let github = format!(
            r#"{{"ref":"refs/heads/main","before":"{c}","after":"{c}","repository":{{"clone_url":"https://example.org/a.git"}}}}"#
        );
        let p = parse_push(&headers(&[("x-github-event", "push")]), github.as_bytes()).unwrap();
        assert_eq!(
            p,
            Parsed::Push(Push {
                repo: "https://example.org/a.git".into(),
                reference: "refs/heads/main".into(),
                commit: Some(c.into()),
            })
        );
        let p = parse_push(&headers(&[("x-gitea-event", "push")]), github.as_bytes()).unwrap();
        assert!(matches!(p, Parsed::Push(_)));
        let p = parse_push(&headers(&[("x-github-event", "ping")]), b"{}").unwrap();
        assert!(matches!(p, Parsed::Ignored(_)));
        let deleted = r#"{"ref":"refs/heads/x","after":"0000000000000000000000000000000000000000","repository":{"clone_url":"u"}}"#;
        let p = parse_push(&headers(&[("x-github-event", "push")]), deleted.as_bytes()).unwrap();
        assert!(matches!(p, Parsed::Ignored(_)));
        let e = parse_push(
            &headers(&[("x-github-event", "push")]),
            br#"{"ref":"refs/heads/main","repository":{}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("repository.clone_url"), "{e}");
        let p = parse_push(&HeaderMap::new(), br#"{"repo":"/srv/r","ref":"main"}"#).unwrap();
        assert_eq!(
            p,
            Parsed::Push(Push {
                repo: "/srv/r".into(),
                reference: "main".into(),
                commit: None
            })
        );
        let e = parse_push(&HeaderMap::new(), br#"{"ref":"main"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("repo"));
        let e = parse_push(
            &HeaderMap::new(),
            br#"{"repo":"r","ref":"main","commit":"xyz"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("commit"));
    }

    #[test]
    fn allow_list_and_signatures() {
        let home = tempfile::tempdir().unwrap();
        let local = home.path().join("recipes");
        std::fs::create_dir_all(local.join("sub")).unwrap();
        let config = HookConfig {
            repos: vec![
                "https://git.example.org/team/images.git".into(),
                local.display().to_string(),
            ],
            recipes: "recipes/*.yaml".into(),
            secret: Some(b"s3cret".to_vec()),
            home: home.path().to_path_buf(),
        };
        assert_eq!(
            config
                .allowed("https://git.example.org/team/images")
                .unwrap(),
            "https://git.example.org/team/images.git"
        );
        assert!(
            config
                .allowed(&format!("file://{}/", local.display()))
                .is_ok()
        );
        assert!(
            config
                .allowed(&format!("{}/sub/..", local.display()))
                .is_ok()
        );
        assert!(
            config
                .allowed(&local.join("sub").display().to_string())
                .is_err()
        );
        let e = config
            .allowed("https://evil.example.org/team/images.git")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);

        let body = br#"{"repo":"r","ref":"main"}"#;
        let sig = format!("sha256={}", hex::encode(hmac_sha256(b"s3cret", body)));
        assert!(
            config
                .check_signature(&headers(&[("x-hub-signature-256", &sig)]), body)
                .is_ok()
        );
        let e = config
            .check_signature(&headers(&[("x-hub-signature-256", &sig)]), b"{}")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(config.check_signature(&HeaderMap::new(), body).is_err());
    }
}
