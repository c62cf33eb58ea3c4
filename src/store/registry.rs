//! A small client for the OCI distribution API v2 (blobs, chunked uploads, manifests, tags,
//! catalog, referrers) with anonymous, basic and bearer-token authentication.
//!
//! Authentication follows the registry's lead: a request goes out with the current credentials;
//! on `401` the `WWW-Authenticate` challenge decides what comes next: `Basic` resends with the
//! user and password, `Bearer realm=…,service=…,scope=…` fetches a token from the realm (with the
//! user and password, if any, as basic auth) and resends with `Authorization: Bearer <token>`.

use super::StoreError;
use crate::digest::Digest256;
use crate::net::redact;
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{self, HeaderMap};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (what a referrers response is).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// User name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer` (lowercased).
    pub scheme: String,
    /// Parameters in order of appearance (names lowercased).
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse one challenge: `Scheme k1="v1",k2=v2`. Quoted values may hold commas and `\"`.
pub fn parse_challenge(text: &str) -> Option<Challenge> {
    let text = text.trim();
    let (scheme, rest) = match text.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (text, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return None,
                    Some('"') => break,
                    Some('\\') => value.push(chars.next()?),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((name.to_ascii_lowercase(), value));
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[derive(Debug, Clone)]
enum Auth {
    Anonymous,
    Basic,
    Bearer(String),
}

/// One registry (`http(s)://host:port`).
pub struct Registry {
    http: Client,
    base: String,
    credentials: Option<Credentials>,
    auth: Mutex<Auth>,
    /// How long the registry may send nothing (see [`crate::net::stall_timeout`]).
    stall: Duration,
    /// Set once the registry answered a POST with a body and a digest by opening an upload
    /// session (distribution 2.8 does): later small uploads send their body once, in the PUT.
    no_monolithic: std::sync::atomic::AtomicBool,
}

/// Longest a request that uploads a body (a blob chunk, a manifest) may take in all: uploads
/// are bounded as a whole, since kiln cannot tell a registry that stopped reading from a slow
/// link while it writes.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Most entries a paginated listing (tags, catalog) may return in all, and most pages.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// See [`MAX_LIST_ENTRIES`].
pub const MAX_LIST_PAGES: usize = 1_000;

/// A manifest as a registry served it.
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// `Content-Type` of the response.
    pub media_type: String,
    /// `Docker-Content-Digest` of the response, if sent.
    pub digest: Option<String>,
}

fn http_err(method: &str, url: &str, e: &reqwest::Error, stall: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Stalled {
            what: format!("{method} {}", redact(url)),
            seconds: stall.as_secs_f64(),
            kept: String::new(),
        };
    }
    let reason = crate::error::chain_text(e);
    StoreError::Http {
        method: method.to_string(),
        url: redact(url).into_owned(),
        // reqwest's own message quotes the URL.
        reason: redact(&reason).into_owned(),
    }
}

fn header_str(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The body of an error response, shortened, for messages.
fn error_body(resp: Response) -> String {
    let mut s = String::new();
    let _ = resp.take(2048).read_to_string(&mut s);
    s.trim().chars().take(400).collect()
}

impl Registry {
    /// `host` is `host[:port]`; plain http when `insecure` or the host is loopback. The stall
    /// timeout is [`crate::net::stall_timeout`].
    pub fn new(
        host: &str,
        insecure: bool,
        credentials: Option<Credentials>,
    ) -> Result<Registry, StoreError> {
        Self::with_stall_timeout(host, insecure, credentials, crate::net::stall_timeout())
    }

    /// [`Registry::new`] with its own stall timeout: how long the registry may send nothing
    /// while kiln waits for an answer's headers or the next bytes of its body.
    pub fn with_stall_timeout(
        host: &str,
        insecure: bool,
        credentials: Option<Credentials>,
        stall: Duration,
    ) -> Result<Registry, StoreError> {
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let loopback =
            matches!(bare, "localhost" | "127.0.0.1" | "[::1]") || bare.starts_with("127.");
        let scheme = if insecure || loopback {
            "http"
        } else {
            "https"
        };
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(15))
            // The blocking client applies this to the wait for an answer's headers and to each
            // read of its body: a stall timeout, not a bound on a whole (large, slow) download.
            .timeout(stall)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| http_err("setup", host, &e, stall))?;
        Ok(Registry {
            http,
            base: format!("{scheme}://{host}"),
            credentials,
            auth: Mutex::new(Auth::Anonymous),
            stall,
            no_monolithic: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The stall timeout.
    pub fn stall_timeout(&self) -> Duration {
        self.stall
    }

    /// An error for a failed read of a response body from `url`: a stall, or `what` broke off.
    pub fn body_error(&self, what: &str, url: &str, e: &std::io::Error) -> StoreError {
        if crate::net::is_stall(e) {
            StoreError::Stalled {
                what: format!("{what} from {}", redact(url)),
                seconds: self.stall.as_secs_f64(),
                kept: String::new(),
            }
        } else {
            StoreError::Protocol {
                url: redact(url).into_owned(),
                reason: format!("{what} download broke off: {e}"),
            }
        }
    }

    /// Read a (small) JSON response body: at most [`MAX_MANIFEST`] bytes.
    fn json_body<T: serde::de::DeserializeOwned>(&self, r: Response) -> Result<T, String> {
        let mut bytes = Vec::new();
        r.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                if crate::net::is_stall(&e) {
                    format!(
                        "stalled: sent nothing for {:.1} s ({})",
                        self.stall.as_secs_f64(),
                        crate::net::STALL_TIMEOUT_ENV
                    )
                } else {
                    e.to_string()
                }
            })?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(format!("the answer is larger than {MAX_MANIFEST} bytes"));
        }
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }

    /// `http(s)://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    fn current_auth(&self) -> Auth {
        match self.auth.lock() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_auth(&self, auth: Auth) {
        match self.auth.lock() {
            Ok(mut a) => *a = auth,
            Err(p) => *p.into_inner() = auth,
        }
    }

    fn apply(&self, rb: RequestBuilder, auth: &Auth) -> RequestBuilder {
        match (auth, &self.credentials) {
            (Auth::Basic, Some(c)) => rb.basic_auth(&c.username, Some(&c.password)),
            (Auth::Bearer(t), _) => rb.bearer_auth(t),
            _ => rb,
        }
    }

    /// Send a request; on 401 answer the challenge once and resend. `build` makes a fresh request
    /// each time (bodies are not reusable).
    pub fn send(
        &self,
        method: &str,
        path_or_url: &str,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, StoreError> {
        let url = self.url(path_or_url);
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| StoreError::Http {
            method: method.to_string(),
            url: redact(&url).into_owned(),
            reason: "bad HTTP method".into(),
        })?;
        let auth = self.current_auth();
        let resp = self
            .send_retrying(&m, &url, &auth, build)
            .map_err(|e| http_err(method, &url, &e, self.stall))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = header_str(resp.headers(), header::WWW_AUTHENTICATE)
            .and_then(parse_challenge)
            .ok_or_else(|| StoreError::Unauthorized {
                url: redact(&url).into_owned(),
                reason: "401 without a usable WWW-Authenticate challenge".into(),
            })?;
        let next = self.answer(&challenge, &url)?;
        self.set_auth(next.clone());
        let resp = self
            .send_retrying(&m, &url, &next, build)
            .map_err(|e| http_err(method, &url, &e, self.stall))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(StoreError::Unauthorized {
                url: redact(&url).into_owned(),
                reason: format!(
                    "credentials refused ({}); set KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD",
                    if self.credentials.is_some() {
                        "user/password given"
                    } else {
                        "none given"
                    }
                ),
            });
        }
        Ok(resp)
    }

    /// Send once more, after a short pause, when the request never got an answer because the
    /// connection failed under it (a kept-alive connection the registry closed just then: every
    /// request kiln sends may be repeated). A timeout is not repeated.
    fn send_retrying(
        &self,
        m: &reqwest::Method,
        url: &str,
        auth: &Auth,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, reqwest::Error> {
        match build(self.apply(self.http.request(m.clone(), url), auth)).send() {
            Err(e) if !e.is_timeout() && (e.is_connect() || e.is_request()) => {
                tracing::debug!("{m} {}: {e}; sending it again", redact(url));
                std::thread::sleep(Duration::from_millis(100));
                build(self.apply(self.http.request(m.clone(), url), auth)).send()
            }
            other => other,
        }
    }

    fn answer(&self, ch: &Challenge, url: &str) -> Result<Auth, StoreError> {
        let url = &*redact(url);
        match ch.scheme.as_str() {
            "basic" if self.credentials.is_some() => Ok(Auth::Basic),
            "basic" => Err(StoreError::Unauthorized {
                url: url.to_string(),
                reason: "the registry wants a user and password; set KILN_REGISTRY_USER and \
                         KILN_REGISTRY_PASSWORD"
                    .into(),
            }),
            "bearer" => {
                let realm = ch.param("realm").ok_or_else(|| StoreError::Unauthorized {
                    url: url.to_string(),
                    reason: "Bearer challenge without realm".into(),
                })?;
                let mut query: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = ch.param("service") {
                    query.push(("service", s));
                }
                if let Some(s) = ch.param("scope") {
                    query.push(("scope", s));
                }
                let mut rb = self.http.get(realm).query(&query);
                if let Some(c) = &self.credentials {
                    rb = rb.basic_auth(&c.username, Some(&c.password));
                }
                let resp = rb
                    .send()
                    .map_err(|e| http_err("GET", realm, &e, self.stall))?;
                // The realm comes from the registry: shown without any credentials in it.
                let realm = &*redact(realm);
                if !resp.status().is_success() {
                    let status = resp.status();
                    return Err(StoreError::Unauthorized {
                        url: url.to_string(),
                        reason: format!(
                            "token service {realm} answered {status}: {}",
                            error_body(resp)
                        ),
                    });
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = self.json_body(resp).map_err(|e| StoreError::Unauthorized {
                    url: url.to_string(),
                    reason: format!("token service {realm} sent no JSON token: {e}"),
                })?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| StoreError::Unauthorized {
                        url: url.to_string(),
                        reason: format!("token service {realm} sent an empty token"),
                    })?;
                Ok(Auth::Bearer(token))
            }
            other => Err(StoreError::Unauthorized {
                url: url.to_string(),
                reason: format!("unsupported auth scheme {other:?}"),
            }),
        }
    }

    /// Turn a non-success response into an error.
    pub fn expect(
        &self,
        resp: Response,
        method: &str,
        what: &str,
        ok: &[StatusCode],
    ) -> Result<Response, StoreError> {
        if ok.contains(&resp.status()) {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let url = redact(resp.url().as_str()).into_owned();
        Err(StoreError::Status {
            method: method.to_string(),
            url,
            what: what.to_string(),
            status,
            body: error_body(resp),
        })
    }

    /// `GET /v2/`: is this a registry, and can we talk to it?
    pub fn ping(&self) -> Result<(), StoreError> {
        let r = self.send("GET", "/v2/", &|rb| rb)?;
        self.expect(r, "GET", "API version check", &[StatusCode::OK])?;
        Ok(())
    }

    /// HEAD a blob: `None` when absent.
    pub fn blob_exists(&self, repo: &str, digest: &Digest256) -> Result<Option<u64>, StoreError> {
        let r = self.send("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &|rb| rb)?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let r = self.expect(r, "HEAD", "blob check", &[StatusCode::OK])?;
        Ok(Some(
            header_str(r.headers(), header::CONTENT_LENGTH)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ))
    }

    fn location(&self, r: &Response, what: &str) -> Result<String, StoreError> {
        header_str(r.headers(), header::LOCATION)
            .map(|l| self.url(l))
            .ok_or_else(|| StoreError::Protocol {
                url: redact(r.url().as_str()).into_owned(),
                reason: format!("{what}: the registry sent no Location header"),
            })
    }

    /// Upload a blob in chunks of `chunk` bytes (POST, PATCH with Content-Range…, PUT ?digest=).
    /// The bytes are hashed as they go; if they do not hash to `digest` (the source changed since
    /// it was hashed) the upload is cancelled and nothing is committed.
    pub fn upload_blob(
        &self,
        repo: &str,
        digest: &Digest256,
        reader: &mut dyn Read,
        chunk: usize,
    ) -> Result<u64, StoreError> {
        let r = self.send("POST", &format!("/v2/{repo}/blobs/uploads/"), &|rb| {
            rb.header(header::CONTENT_LENGTH, "0")
        })?;
        let r = self.expect(r, "POST", "start blob upload", &[StatusCode::ACCEPTED])?;
        let mut location = self.location(&r, "start blob upload")?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let chunk = chunk.max(4096);
        loop {
            // A fresh buffer per chunk, moved into a `Bytes` that a resend can share: no copy.
            let mut buf = vec![0u8; chunk];
            let n = read_full(reader, &mut buf).map_err(|source| StoreError::Io {
                what: "read the image for upload".into(),
                path: Default::default(),
                source,
            })?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            let data = bytes::Bytes::from(buf);
            let range = format!("{}-{}", offset, offset + n as u64 - 1);
            let r = self.send("PATCH", &location, &|rb| {
                rb.timeout(UPLOAD_TIMEOUT)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_RANGE, range.as_str())
                    .body(data.clone())
            })?;
            let r = self.expect(r, "PATCH", "upload blob chunk", &[StatusCode::ACCEPTED])?;
            location = self.location(&r, "upload blob chunk")?;
            offset += n as u64;
            if n < chunk {
                break;
            }
        }
        let actual = Digest256::from_sha256(&hasher.finalize());
        if &actual != digest {
            let _ = self.send("DELETE", &location, &|rb| rb);
            return Err(StoreError::DigestMismatch {
                what: "image file (it changed while being uploaded)".into(),
                expected: digest.clone(),
                actual,
            });
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let r = self.send("PUT", &url, &|rb| rb.header(header::CONTENT_LENGTH, "0"))?;
        let r = self.expect(r, "PUT", "finish blob upload", &[StatusCode::CREATED])?;
        if let Some(d) = header_str(r.headers(), "docker-content-digest")
            && d != digest.as_str()
        {
            return Err(StoreError::Protocol {
                url: redact(&url).into_owned(),
                reason: format!("registry stored the blob as {d}, kiln sent {digest}"),
            });
        }
        Ok(offset)
    }

    /// Upload a small blob: one POST with the bytes (201), or POST then PUT ?digest= (202).
    pub fn upload_small_blob(&self, repo: &str, bytes: &[u8]) -> Result<Digest256, StoreError> {
        use std::sync::atomic::Ordering;
        let digest = Digest256::of(bytes);
        // A small blob is sent whole, without asking first whether the registry has it: in one
        // request where the registry takes a monolithic upload (POST with the digest: 201
        // Created), else the POST opens an upload session (202) that a PUT completes; once a
        // registry has been seen to do that, the POST goes without the body.
        let monolithic = !self.no_monolithic.load(Ordering::Relaxed);
        let r = if monolithic {
            self.send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
                &|rb| {
                    rb.timeout(UPLOAD_TIMEOUT)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .body(bytes.to_vec())
                },
            )?
        } else {
            self.send("POST", &format!("/v2/{repo}/blobs/uploads/"), &|rb| rb)?
        };
        let r = self.expect(
            r,
            "POST",
            "start blob upload",
            &[StatusCode::CREATED, StatusCode::ACCEPTED],
        )?;
        if r.status() == StatusCode::CREATED {
            return Ok(digest);
        }
        if monolithic {
            self.no_monolithic.store(true, Ordering::Relaxed);
        }
        let location = self.location(&r, "start blob upload")?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let r = self.send("PUT", &url, &|rb| {
            rb.timeout(UPLOAD_TIMEOUT)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec())
        })?;
        self.expect(r, "PUT", "upload blob", &[StatusCode::CREATED])?;
        Ok(digest)
    }

    /// PUT a manifest under a tag or digest; returns its digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest256, StoreError> {
        let digest = Digest256::of(bytes);
        let url = format!("/v2/{repo}/manifests/{reference}");
        let r = self.send("PUT", &url, &|rb| {
            rb.timeout(UPLOAD_TIMEOUT)
                .header(header::CONTENT_TYPE, media_type)
                .body(bytes.to_vec())
        })?;
        let r = self.expect(r, "PUT", "store manifest", &[StatusCode::CREATED])?;
        if let Some(d) = header_str(r.headers(), "docker-content-digest")
            && d != digest.as_str()
        {
            return Err(StoreError::Protocol {
                url: redact(&self.url(&url)).into_owned(),
                reason: format!("registry stored the manifest as {d}, kiln sent {digest}"),
            });
        }
        Ok(digest)
    }

    /// GET a manifest by tag or digest: its bytes, media type and the registry's digest header.
    /// `None` when the registry has no such manifest.
    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> Result<Option<FetchedManifest>, StoreError> {
        let r = self.send("GET", &format!("/v2/{repo}/manifests/{reference}"), &|rb| {
            rb.header(header::ACCEPT, accept)
        })?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let r = self.expect(r, "GET", "fetch manifest", &[StatusCode::OK])?;
        let media = header_str(r.headers(), header::CONTENT_TYPE)
            .unwrap_or("")
            .to_string();
        let digest = header_str(r.headers(), "docker-content-digest").map(str::to_string);
        let url = r.url().to_string();
        if r.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(StoreError::Protocol {
                url: redact(&url).into_owned(),
                reason: format!("the manifest is announced larger than {MAX_MANIFEST} bytes"),
            });
        }
        let mut bytes = Vec::new();
        r.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.body_error(&format!("manifest {reference}"), &url, &e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(StoreError::Protocol {
                url: redact(&url).into_owned(),
                reason: format!("manifest larger than {MAX_MANIFEST} bytes"),
            });
        }
        Ok(Some(FetchedManifest {
            bytes,
            media_type: media,
            digest,
        }))
    }

    /// GET a blob, from byte `from` on (a Range request when `from > 0`). Returns the response
    /// and where its body starts: `from` if the registry honoured the range (206), 0 if it sent
    /// the whole blob (200).
    pub fn get_blob(
        &self,
        repo: &str,
        digest: &Digest256,
        from: u64,
    ) -> Result<(Response, u64), StoreError> {
        let range = (from > 0).then(|| format!("bytes={from}-"));
        let r = self.blob_request(repo, digest, range.as_deref(), "fetch blob")?;
        if r.status() == StatusCode::PARTIAL_CONTENT {
            let cr = header_str(r.headers(), header::CONTENT_RANGE).unwrap_or("");
            if !cr.starts_with(&format!("bytes {from}-")) {
                return Err(StoreError::Protocol {
                    url: redact(r.url().as_str()).into_owned(),
                    reason: format!("asked for bytes {from}-, got Content-Range {cr:?}"),
                });
            }
            Ok((r, from))
        } else {
            Ok((r, 0))
        }
    }

    /// GET a blob, with a `Range` header when given: its answer (200 or 206), `NotFound` for a
    /// 404, an error for any other status.
    fn blob_request(
        &self,
        repo: &str,
        digest: &Digest256,
        range: Option<&str>,
        what: &str,
    ) -> Result<Response, StoreError> {
        let r = self.send(
            "GET",
            &format!("/v2/{repo}/blobs/{digest}"),
            &|rb| match range {
                Some(range) => rb.header(header::RANGE, range),
                None => rb,
            },
        )?;
        if r.status() == StatusCode::NOT_FOUND {
            return Err(StoreError::NotFound {
                what: format!("blob {digest}"),
                reference: repo.to_string(),
            });
        }
        self.expect(
            r,
            "GET",
            what,
            &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
        )
    }

    /// `len` bytes of a blob from byte `from` (a chunk of a disk layer): the registry must answer
    /// with exactly that range (206); one that ignores `Range` is a protocol error.
    pub fn get_blob_range(
        &self,
        repo: &str,
        digest: &Digest256,
        from: u64,
        len: u64,
    ) -> Result<Response, StoreError> {
        let last = from + len.max(1) - 1;
        let range = format!("bytes={from}-{last}");
        let r = self.blob_request(repo, digest, Some(&range), "fetch a range of a blob")?;
        let cr = header_str(r.headers(), header::CONTENT_RANGE).unwrap_or("");
        if r.status() != StatusCode::PARTIAL_CONTENT
            || !cr.starts_with(&format!("bytes {from}-{last}/"))
        {
            return Err(StoreError::Protocol {
                url: redact(r.url().as_str()).into_owned(),
                reason: format!(
                    "asked for bytes {from}-{last}, got {} with Content-Range {cr:?}: the registry does not serve ranges of blobs",
                    r.status()
                ),
            });
        }
        Ok(r)
    }

    /// A list endpoint with `Link: <…>; rel="next"` pagination; `key` is the JSON array field.
    fn list(&self, first: &str, key: &str, what: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut next = Some(first.to_string());
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > MAX_LIST_PAGES || out.len() > MAX_LIST_ENTRIES {
                return Err(StoreError::Protocol {
                    url: redact(&self.url(first)).into_owned(),
                    reason: format!(
                        "{what}: more than {MAX_LIST_ENTRIES} entries or {MAX_LIST_PAGES} pages; \
                         refusing an endless listing (name one repository instead)"
                    ),
                });
            }
            let r = self.send("GET", &url, &|rb| rb)?;
            if r.status() == StatusCode::NOT_FOUND && key == "tags" {
                return Ok(out);
            }
            let r = self.expect(r, "GET", what, &[StatusCode::OK])?;
            next = header_str(r.headers(), header::LINK).and_then(|l| {
                let (target, rel) = l.split_once(';')?;
                rel.contains("next").then(|| {
                    target
                        .trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string()
                })
            });
            let full = redact(r.url().as_str()).into_owned();
            let v: serde_json::Value = self.json_body(r).map_err(|e| StoreError::Protocol {
                url: full,
                reason: format!("{what}: not JSON: {e}"),
            })?;
            if let Some(items) = v.get(key).and_then(|t| t.as_array()) {
                out.extend(items.iter().filter_map(|t| t.as_str().map(str::to_string)));
            }
        }
        Ok(out)
    }

    /// `GET /v2/<repo>/tags/list`, all pages, sorted.
    pub fn tags(&self, repo: &str) -> Result<Vec<String>, StoreError> {
        let mut t = self.list(&format!("/v2/{repo}/tags/list"), "tags", "list tags")?;
        t.sort();
        Ok(t)
    }

    /// `GET /v2/_catalog`, all pages, sorted.
    pub fn catalog(&self) -> Result<Vec<String>, StoreError> {
        let mut t = self.list("/v2/_catalog", "repositories", "list repositories")?;
        t.sort();
        Ok(t)
    }

    /// `GET /v2/<repo>/referrers/<digest>?artifactType=…`: `None` when the registry has no
    /// referrers API (distribution 2.8 answers 404).
    pub fn referrers(
        &self,
        repo: &str,
        digest: &Digest256,
        artifact_type: &str,
    ) -> Result<Option<Vec<super::Descriptor>>, StoreError> {
        let filter = artifact_type.replace('+', "%2B");
        let url = format!("/v2/{repo}/referrers/{digest}?artifactType={filter}");
        let r = self.send("GET", &url, &|rb| rb.header(header::ACCEPT, OCI_INDEX))?;
        if !r.status().is_success() {
            return Ok(None);
        }
        let is_index =
            header_str(r.headers(), header::CONTENT_TYPE).is_some_and(|c| c.starts_with(OCI_INDEX));
        if !is_index {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<super::Descriptor>,
        }
        let full = redact(&self.url(&url)).into_owned();
        let idx: Index = self.json_body(r).map_err(|e| StoreError::Protocol {
            url: full,
            reason: format!("referrers response is not an OCI index: {e}"),
        })?;
        Ok(Some(
            idx.manifests
                .into_iter()
                .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
                .collect(),
        ))
    }
}

/// Manifests larger than this are refused (the OCI spec suggests registries accept 4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Fill `buf` as far as the reader allows; returns the bytes read (short only at end of input).
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:kiln/img:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example.com/token"));
        assert_eq!(c.param("service"), Some("registry.example.com"));
        assert_eq!(c.param("scope"), Some("repository:kiln/img:pull,push"));
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        let c = parse_challenge(r#"Bearer realm=http://a/t, error="invalid_token", x="q\"uote""#)
            .unwrap();
        assert_eq!(c.param("realm"), Some("http://a/t"));
        assert_eq!(c.param("error"), Some("invalid_token"));
        assert_eq!(c.param("x"), Some("q\"uote"));
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("").is_none());
    }
}
