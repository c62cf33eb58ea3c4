//! HTTP downloads from the mirror: bounded retries with exponential backoff for connection
//! errors, timeouts and 5xx answers; resume of an interrupted download (`Range`) from a
//! `.partial` file; verification of size and SHA256 before anything is renamed into the
//! content-addressed [`BlobStore`]. A file that fails verification is deleted: nothing unverified
//! is ever cached. Blocking (reqwest's blocking client): call it from a thread that may block
//! (inside tokio, use `spawn_blocking`).

use super::PackagesError;
use crate::digest::{Digest256, hash_file};
use crate::home::BlobStore;
use crate::net::redact;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Retry policy and network switches.
#[derive(Clone, Debug)]
pub struct FetchPolicy {
    /// Attempts per URL (connection errors, timeouts, 5xx, 408, 429 are retried).
    pub tries: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub first_backoff: Duration,
    pub connect_timeout: Duration,
    /// The stall timeout: longest the mirror may send nothing, while kiln waits for the answer's
    /// headers or for any further byte of its body ([`crate::net::stall_timeout`] by default).
    pub read_timeout: Duration,
    /// Never touch the network (`KILN_OFFLINE=1`).
    pub offline: bool,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            tries: 4,
            first_backoff: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(10),
            read_timeout: crate::net::STALL_TIMEOUT,
            offline: false,
        }
    }
}

/// The HTTP side of an archive. Counts its requests so callers (and tests) can prove that a warm
/// cache makes none.
pub struct Fetcher {
    client: reqwest::blocking::Client,
    policy: FetchPolicy,
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// One failed attempt: retry it or give up at once.
enum Attempt {
    Retry(String),
    Fatal(PackagesError),
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> Result<Fetcher, PackagesError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(policy.connect_timeout)
            // reqwest's blocking client applies this to the wait for the answer's headers and to
            // every read of its body: a stall timeout, not a bound on a whole (slow) download.
            .timeout(policy.read_timeout)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PackagesError::Http {
                url: String::new(),
                reason: format!("cannot set up the HTTP client: {}", error_chain(&e)),
            })?;
        Ok(Fetcher {
            client,
            policy,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// HTTP requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes of response bodies received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn offline_error(&self, url: &str, what: &str) -> PackagesError {
        PackagesError::Offline {
            what: what.to_string(),
            url: redact(url).into_owned(),
        }
    }

    /// Run `attempt` up to `tries` times with backoff.
    fn with_retries<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> Result<T, Attempt>,
    ) -> Result<T, PackagesError> {
        let mut last = String::new();
        let mut wait = self.policy.first_backoff;
        for n in 1..=self.policy.tries.max(1) {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => {
                    tracing::warn!(url = %redact(url), attempt = n, reason = %reason, "download failed");
                    last = reason;
                }
            }
            if n < self.policy.tries {
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
        Err(PackagesError::Unreachable {
            url: redact(url).into_owned(),
            tries: self.policy.tries.max(1),
            reason: last,
        })
    }

    fn send(&self, url: &str, range_from: u64) -> Result<reqwest::blocking::Response, Attempt> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self.client.get(url);
        if range_from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={range_from}-"));
        }
        let resp = req
            .send()
            .map_err(|e| Attempt::Retry(self.short_reason(&e)))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        let code = status.as_u16();
        if status.is_server_error() || code == 408 || code == 429 {
            return Err(Attempt::Retry(format!("HTTP {status}")));
        }
        Err(Attempt::Fatal(PackagesError::Http {
            url: redact(url).into_owned(),
            reason: format!("HTTP {status}"),
        }))
    }

    /// Why reading a body failed, for a retry message: a stall says so.
    fn body_error(&self, e: &io::Error) -> String {
        if crate::net::is_stall(e) {
            self.stalled()
        } else {
            format!("reading the body: {e}")
        }
    }

    fn stalled(&self) -> String {
        format!(
            "stalled: the mirror sent nothing for {:.1} s (the stall timeout, {})",
            self.policy.read_timeout.as_secs_f64(),
            crate::net::STALL_TIMEOUT_ENV
        )
    }

    /// The root cause of a failed request, short: `Connection refused (os error 111)`, or that
    /// the mirror stalled.
    fn short_reason(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return self.stalled();
        }
        short_reason(e)
    }

    /// GET a small file into memory (at most `limit` bytes).
    pub fn get_bytes(&self, url: &str, what: &str, limit: u64) -> Result<Vec<u8>, PackagesError> {
        if self.policy.offline {
            return Err(self.offline_error(url, what));
        }
        tracing::info!(url = %redact(url), "fetching {what}");
        self.with_retries(url, || {
            let resp = self.send(url, 0)?;
            let mut body = Vec::new();
            resp.take(limit + 1)
                .read_to_end(&mut body)
                .map_err(|e| Attempt::Retry(self.body_error(&e)))?;
            self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            if body.len() as u64 > limit {
                return Err(Attempt::Fatal(PackagesError::Http {
                    url: redact(url).into_owned(),
                    reason: format!("{what} is larger than {limit} bytes"),
                }));
            }
            Ok(body)
        })
    }

    /// Make sure the blob `sha256` is in `store`, downloading it from `urls` (tried in order:
    /// the next one only when the server says 404) if it is not. Returns its path in the store.
    /// `partial_dir` must be on the store's filesystem.
    pub fn fetch_blob(
        &self,
        urls: &[String],
        what: &str,
        sha256: &Digest256,
        size: Option<u64>,
        store: &BlobStore,
        partial_dir: &Path,
    ) -> Result<PathBuf, PackagesError> {
        let dest = store.path(sha256);
        if dest.is_file() {
            return Ok(dest);
        }
        let first = urls.first().cloned().unwrap_or_default();
        if self.policy.offline {
            return Err(self.offline_error(&first, what));
        }
        let cache_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PackagesError::Cache { path, source }
        };
        fs::create_dir_all(partial_dir).map_err(cache_err(partial_dir))?;
        let partial = partial_dir.join(format!("{}.partial", sha256.hex()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(cache_err(&partial))?;
        // One downloader per blob across processes; the others wait, then find it stored.
        lock(&file).map_err(cache_err(&partial))?;
        if dest.is_file() {
            return Ok(dest);
        }
        let mut result = Err(PackagesError::Http {
            url: redact(&first).into_owned(),
            reason: "no URL to download from".into(),
        });
        for url in urls {
            tracing::info!(
                url = %redact(url),
                size = size.unwrap_or(0),
                "downloading {what} ({})",
                human_size(size)
            );
            result = self.download_to(url, what, &mut file, &partial, size);
            match &result {
                Err(PackagesError::Http { reason, .. }) if reason.starts_with("HTTP 404") => {
                    continue;
                }
                _ => break,
            }
        }
        if let Err(e) = result {
            if !matches!(e, PackagesError::Unreachable { .. }) {
                // Keep a partial download only for a later resume after a network failure.
                let _ = fs::remove_file(&partial);
            }
            return Err(e);
        }
        let (actual, len) = hash_file(&mut file).map_err(cache_err(&partial))?;
        if actual != *sha256 || size.is_some_and(|s| s != len) {
            let _ = fs::remove_file(&partial);
            return Err(PackagesError::HashMismatch {
                what: what.to_string(),
                url: redact(&first).into_owned(),
                expected: format!("{sha256} ({} bytes)", size.unwrap_or(len)),
                actual: format!("{actual} ({len} bytes)"),
            });
        }
        file.sync_all().map_err(cache_err(&partial))?;
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(cache_err(dir))?;
        }
        fs::rename(&partial, &dest).map_err(cache_err(&dest))?;
        Ok(dest)
    }

    /// Download `url` into `file`, resuming from its current length. Never writes more than
    /// `size` (else [`MAX_UNSIZED_DOWNLOAD`]) bytes: a mirror that sends more is refused.
    fn download_to(
        &self,
        url: &str,
        what: &str,
        file: &mut File,
        partial: &Path,
        size: Option<u64>,
    ) -> Result<(), PackagesError> {
        let limit = size.unwrap_or(MAX_UNSIZED_DOWNLOAD);
        let cache_err = |source| PackagesError::Cache {
            path: partial.to_path_buf(),
            source,
        };
        self.with_retries(url, || {
            let mut have = file
                .seek(SeekFrom::End(0))
                .map_err(|e| Attempt::Fatal(cache_err(e)))?;
            if size.is_some_and(|s| have > s) {
                file.set_len(0).map_err(|e| Attempt::Fatal(cache_err(e)))?;
                have = 0;
            }
            if size == Some(have) && have > 0 {
                return Ok(());
            }
            let mut resp = self.send(url, have)?;
            match resp.status().as_u16() {
                206 => {
                    if have > 0 {
                        tracing::info!(url = %redact(url), from = have, "resuming download");
                    }
                }
                416 => {
                    // The partial file does not fit the server's copy: start over.
                    file.set_len(0).map_err(|e| Attempt::Fatal(cache_err(e)))?;
                    return Err(Attempt::Retry("HTTP 416 for a resumed download".into()));
                }
                _ => {
                    file.set_len(0).map_err(|e| Attempt::Fatal(cache_err(e)))?;
                    file.seek(SeekFrom::Start(0))
                        .map_err(|e| Attempt::Fatal(cache_err(e)))?;
                }
            }
            let mut got = file
                .stream_position()
                .map_err(|e| Attempt::Fatal(cache_err(e)))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match resp.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Attempt::Retry(self.body_error(&e))),
                };
                if got + n as u64 > limit {
                    return Err(Attempt::Fatal(PackagesError::TooLarge {
                        what: what.to_string(),
                        url: redact(url).into_owned(),
                        limit,
                        listed: size.is_some(),
                    }));
                }
                file.write_all(&buf[..n])
                    .map_err(|e| Attempt::Fatal(cache_err(e)))?;
                got += n as u64;
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            match size {
                Some(s) if got < s => Err(Attempt::Retry(format!(
                    "connection closed after {got} of {s} bytes"
                ))),
                _ => Ok(()),
            }
        })
    }
}

/// Most bytes a download whose size no signed index lists may have.
pub const MAX_UNSIZED_DOWNLOAD: u64 = 4 << 30;

/// Take an exclusive advisory lock on `file` (released when it is closed).
fn lock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid, owned descriptor has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The root cause of a failed request, short: `Connection refused (os error 111)`, `timed out`.
fn short_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    if e.is_connect() && !text.contains("onnect") {
        format!("cannot connect: {text}")
    } else {
        text
    }
}

/// An error and its causes on one line (reqwest's top-level message alone says little).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    crate::error::chain_text(e)
}

fn human_size(size: Option<u64>) -> String {
    match size {
        None => "size unknown".into(),
        Some(s) if s >= 1 << 20 => format!("{:.1} MiB", s as f64 / (1u64 << 20) as f64),
        Some(s) => format!("{:.1} KiB", s as f64 / 1024.0),
    }
}
