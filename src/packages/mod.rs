//! kiln's Debian archive client: everything kiln installs comes from a Debian mirror, checked
//! the way apt checks it, and nothing comes from the build host's own files.
//!
//! - [`Archive::open`] fetches `dists/<suite>/InRelease`, verifies its OpenPGP signature against
//!   the Debian archive keyring (shipped in kiln, overridable with `KILN_DEBIAN_KEYRING`), then
//!   fetches `<component>/binary-<arch>/Packages.xz` (or `.gz`) and checks it against the SHA256
//!   that the signed InRelease lists.
//! - [`Archive::resolve`] picks packages (with or without their dependencies, see [`Deps`]).
//! - [`Archive::fetch`] downloads a `.deb` into the content-addressed cache, checked against the
//!   SHA256 of the index; [`deb::read_into_tree`] reads it into a [`Tree`](crate::tree::Tree).
//!
//! Caching (under `$KILN_HOME`): the verified InRelease is reused for an hour
//! (`ArchiveOptions::release_max_age`); indices and `.deb`s live in the [`BlobStore`] under their
//! SHA256, so a warm run makes no network request. `KILN_OFFLINE=1` uses the cache only. Nothing
//! is cached before it is verified (downloads go to a `.partial` file, renamed only after the
//! hash matched).
//!
//! Mirror: `KILN_DEBIAN_MIRROR`, else the first Debian URI (`…/debian`) in the host's apt sources,
//! else `http://deb.debian.org/debian`. HTTPS works with the system CA store or the bundled
//! webpki roots (rustls, no OpenSSL).
//!
//! The network calls block (reqwest's blocking client): from async code, call them inside
//! `tokio::task::spawn_blocking`.

pub mod deb;
pub mod fetch;
pub mod index;
pub mod release;
pub mod resolve;
pub mod version;

pub use deb::{DebInfo, DebLimits, read_into_tree};
pub use fetch::{FetchPolicy, Fetcher};
pub use index::{Index, PackageEntry};
pub use release::{Keyring, Release};
pub use resolve::{Deps, ResolveError};
pub use version::Version;

use crate::digest::Digest256;
use crate::home::{BlobStore, kiln_home, write_atomic};
use crate::net::redact;
use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The mirror used when neither `KILN_DEBIAN_MIRROR` nor the host's apt sources name one.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The suite used when a recipe names none.
pub const DEFAULT_SUITE: &str = "bookworm";

/// Largest InRelease accepted (Debian's are ~150 KiB).
const MAX_INRELEASE: u64 = 16 << 20;

/// Largest `Packages` index accepted, compressed or not (bookworm's main/amd64 is 50 MB
/// uncompressed). An index is read whole into memory, so a larger one is refused.
pub const MAX_INDEX: u64 = 512 << 20;

/// Everything that can go wrong talking to the archive. Each message says what failed, where,
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    #[error(
        "{url} did not answer after {tries} tries ({reason}); check KILN_DEBIAN_MIRROR or the network"
    )]
    Unreachable {
        url: String,
        tries: u32,
        reason: String,
    },
    #[error("{url}: {reason}; check the mirror (KILN_DEBIAN_MIRROR) and the suite name")]
    Http { url: String, reason: String },
    #[error(
        "KILN_OFFLINE is set and {what} is not in the cache (it would come from {url}); \
         run once with network access, or unset KILN_OFFLINE"
    )]
    Offline { what: String, url: String },
    #[error("refusing {url}: {reason}. Nothing was cached")]
    BadSignature { url: String, reason: String },
    #[error("keyring {path}: {reason}; point KILN_DEBIAN_KEYRING at an OpenPGP keyring")]
    Keyring { path: String, reason: String },
    #[error("{url}: {reason}")]
    BadRelease { url: String, reason: String },
    #[error(
        "{url} is out of date: Valid-Until {valid_until} has passed (a stale or replayed mirror); \
         use another mirror (KILN_DEBIAN_MIRROR)"
    )]
    Expired { url: String, valid_until: String },
    #[error(
        "{what} from {url} does not match the signed hash: expected {expected}, got {actual}. \
         Refused; nothing was cached. Retry later (the mirror may be mid-update) or use another \
         mirror"
    )]
    HashMismatch {
        what: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{what} from {url}: the mirror sent more than {limit} bytes ({}); refused, nothing was \
         cached. Use another mirror (KILN_DEBIAN_MIRROR)",
        if *.listed { "the size the signed index lists" } else { "kiln's cap for unlisted downloads" }
    )]
    TooLarge {
        what: String,
        url: String,
        limit: u64,
        listed: bool,
    },
    #[error("{what}: malformed index: {reason}")]
    BadIndex { what: String, reason: String },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cache {path} (check that $KILN_HOME is writable and has space)")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Deb(#[from] deb::DebError),
}

type Result<T, E = PackagesError> = std::result::Result<T, E>;

/// Where and what to read from the archive.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    /// Mirror root, e.g. `http://deb.debian.org/debian` (no trailing slash needed).
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
    pub arch: String,
    /// Keyring file; `None` = the Debian archive keyring shipped in kiln.
    pub keyring: Option<PathBuf>,
    /// Cache root (`$KILN_HOME`): blobs under `blobs/`, InRelease copies under `debian/`.
    pub home: PathBuf,
    /// How long a verified InRelease is reused without asking the mirror.
    pub release_max_age: Duration,
    pub fetch: FetchPolicy,
}

impl ArchiveOptions {
    /// Defaults for `home`: bookworm, main, amd64, the shipped keyring, the default mirror.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        ArchiveOptions {
            mirror: DEFAULT_MIRROR.to_string(),
            suite: DEFAULT_SUITE.to_string(),
            components: vec!["main".to_string()],
            arch: "amd64".to_string(),
            keyring: None,
            home: home.into(),
            release_max_age: Duration::from_secs(3600),
            fetch: FetchPolicy::default(),
        }
    }

    /// Defaults from the environment: `KILN_HOME`, `KILN_DEBIAN_MIRROR` (else the host's apt
    /// sources), `KILN_DEBIAN_KEYRING`, `KILN_OFFLINE`.
    pub fn from_env() -> Self {
        let mut opts = Self::new(kiln_home());
        opts.mirror = default_mirror();
        opts.keyring = std::env::var_os("KILN_DEBIAN_KEYRING")
            .filter(|k| !k.is_empty())
            .map(PathBuf::from);
        opts.fetch.read_timeout = crate::net::stall_timeout();
        opts.fetch.offline = std::env::var("KILN_OFFLINE")
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
        opts
    }
}

/// `KILN_DEBIAN_MIRROR`, else the first Debian mirror in the host's apt sources, else
/// [`DEFAULT_MIRROR`].
pub fn default_mirror() -> String {
    if let Ok(m) = std::env::var("KILN_DEBIAN_MIRROR")
        && !m.trim().is_empty()
    {
        return m.trim().trim_end_matches('/').to_string();
    }
    host_apt_mirror(Path::new("/etc/apt")).unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// The first Debian mirror in `<etc_apt>/sources.list`, then `sources.list.d/*.list` and
/// `*.sources` (in name order).
pub fn host_apt_mirror(etc_apt: &Path) -> Option<String> {
    if let Ok(text) = fs::read_to_string(etc_apt.join("sources.list"))
        && let Some(m) = mirror_from_one_line(&text)
    {
        return Some(m);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(etc_apt.join("sources.list.d"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("list") => mirror_from_one_line(&text),
            Some("sources") => mirror_from_deb822(&text),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether a URI looks like a Debian archive root (`http(s)://host/…/debian`).
fn is_debian_uri(uri: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && uri.trim_end_matches('/').ends_with("/debian")
}

/// The first Debian `deb` URI of a one-line-style `sources.list`.
pub fn mirror_from_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: `[arch=amd64 signed-by=…]`, possibly several words.
            let mut rest = uri;
            while !rest.ends_with(']') {
                rest = words.next()?;
            }
            uri = words.next()?;
        }
        if is_debian_uri(uri) {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

/// The first Debian `deb` URI of a deb822 `.sources` file.
pub fn mirror_from_deb822(text: &str) -> Option<String> {
    let stanzas = index::parse_stanzas(text).ok()?;
    for s in stanzas {
        let types = s.get("Types").unwrap_or("");
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        if s.get("Enabled")
            .is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        if let Some(uri) = s
            .get("URIs")
            .unwrap_or("")
            .split_whitespace()
            .find(|u| is_debian_uri(u))
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

/// A package chosen from the index: enough to download and name it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Path below the mirror root (`pool/main/…/x.deb`).
    pub filename: String,
    pub size: u64,
    /// SHA256 of the `.deb`, from the signed index.
    pub sha256: Digest256,
    pub essential: bool,
    pub priority: Option<String>,
    /// `Installed-Size` from the signed index (KiB): bounds what reading the .deb may unpack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_size: Option<u64>,
    /// `Source` from the signed index, when the source package is named otherwise or has
    /// another version (see [`PackageRef::source_package`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl PackageRef {
    fn from_entry(e: &PackageEntry) -> PackageRef {
        PackageRef {
            name: e.name().to_string(),
            version: e.version_str().to_string(),
            architecture: e.architecture().to_string(),
            filename: e.filename().to_string(),
            size: e.size(),
            sha256: Digest256::from_sha256(e.sha256()),
            essential: e.essential(),
            priority: e.priority().map(str::to_string),
            installed_size: e.installed_size(),
            source: e.source().map(str::to_string),
        }
    }

    /// The source package's name and version: from `Source: name (version)`, `Source: name`
    /// (the binary's version), or the binary's own name and version.
    pub fn source_package(&self) -> (String, String) {
        match self.source.as_deref().map(str::trim) {
            Some(s) => match s.split_once(' ') {
                Some((name, v)) => (
                    name.to_string(),
                    v.trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .to_string(),
                ),
                None => (s.to_string(), self.version.clone()),
            },
            None => (self.name.clone(), self.version.clone()),
        }
    }

    /// What reading this package's .deb may unpack: bounded by its declared `Installed-Size`.
    pub fn deb_limits(&self) -> deb::DebLimits {
        deb::DebLimits::for_package(
            format!("package {} {}", self.name, self.version),
            self.installed_size,
        )
    }
}

/// An opened, verified view of one suite of a Debian mirror.
pub struct Archive {
    opts: ArchiveOptions,
    release: Release,
    release_digest: Digest256,
    inrelease: Vec<u8>,
    /// Loaded on first use ([`Archive::open_lazy`]) or at open.
    index: std::sync::OnceLock<Index>,
    fetcher: Fetcher,
    store: BlobStore,
}

impl Archive {
    /// Fetch (or reuse) and verify InRelease, then load the indices of every component.
    pub fn open(opts: ArchiveOptions) -> Result<Archive> {
        let archive = Self::open_lazy(opts)?;
        archive.loaded_index()?;
        Ok(archive)
    }

    /// Fetch (or reuse) and verify InRelease only; the indices are loaded when first needed
    /// (`resolve`, `index`). A caller that has already resolved its packages against this
    /// release (same [`Archive::release_digest`]) can `fetch` without paying for the index.
    pub fn open_lazy(mut opts: ArchiveOptions) -> Result<Archive> {
        opts.mirror = opts.mirror.trim().trim_end_matches('/').to_string();
        let keyring = load_keyring(opts.keyring.as_deref())?;
        let fetcher = Fetcher::new(opts.fetch.clone())?;
        let store = BlobStore::new(&opts.home);
        let (bytes, release) = load_release(&opts, &keyring, &fetcher)?;
        let release_digest = Digest256::of(&bytes);
        Ok(Archive {
            opts,
            release,
            release_digest,
            inrelease: bytes,
            index: std::sync::OnceLock::new(),
            fetcher,
            store,
        })
    }

    /// The merged index of all components, loading it on first use.
    fn loaded_index(&self) -> Result<&Index> {
        if let Some(index) = self.index.get() {
            return Ok(index);
        }
        let mut index = Index::new();
        for component in &self.opts.components {
            self.load_index(component, &mut index)?;
        }
        tracing::info!(
            suite = %self.opts.suite,
            packages = index.len(),
            release = %self.release_digest,
            "opened Debian archive {}",
            redact(&self.opts.mirror)
        );
        Ok(self.index.get_or_init(|| index))
    }

    /// `Debian bookworm (main, amd64)`: how errors name this archive.
    pub fn scope(&self) -> String {
        format!(
            "Debian {} ({}, {})",
            self.opts.suite,
            self.opts.components.join(", "),
            self.opts.arch
        )
    }

    pub fn options(&self) -> &ArchiveOptions {
        &self.opts
    }

    /// The verified Release fields.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// SHA256 of the verified InRelease: pins every package choice, so use it in cache keys.
    pub fn release_digest(&self) -> &Digest256 {
        &self.release_digest
    }

    /// The verified InRelease file as fetched (signature included).
    pub fn inrelease(&self) -> &[u8] {
        &self.inrelease
    }

    /// The merged index of all components (loaded now if it was not yet).
    pub fn index(&self) -> Result<&Index> {
        self.loaded_index()
    }

    /// HTTP requests this archive has made (0 on a warm cache).
    pub fn network_requests(&self) -> u64 {
        self.fetcher.requests()
    }

    /// The cache the archive stores indices and packages in.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Choose packages by name (`name`, `name=version`, `name:amd64`), with or without their
    /// dependencies. The result is sorted by package name.
    pub fn resolve(&self, names: &[&str], deps: Deps) -> Result<Vec<PackageRef>> {
        let index = self.loaded_index()?;
        let ids = resolve::resolve(index, names, deps, &self.opts.arch, &self.scope())?;
        Ok(ids
            .into_iter()
            .map(|id| PackageRef::from_entry(index.get(id)))
            .collect())
    }

    /// Download a package (unless it is already cached) and return the path of the verified
    /// `.deb` in the cache.
    pub fn fetch(&self, pkg: &PackageRef) -> Result<PathBuf> {
        let url = format!("{}/{}", self.opts.mirror, pkg.filename);
        self.fetcher.fetch_blob(
            &[url],
            &format!("package {} {}", pkg.name, pkg.version),
            &pkg.sha256,
            Some(pkg.size),
            &self.store,
            &self.partial_dir(),
        )
    }

    fn partial_dir(&self) -> PathBuf {
        self.opts.home.join("blobs").join("partial")
    }

    fn dists_url(&self) -> String {
        format!("{}/dists/{}", self.opts.mirror, self.opts.suite)
    }

    /// Load `<component>/binary-<arch>/Packages` into the index, from the cache when possible.
    fn load_index(&self, component: &str, index: &mut Index) -> Result<()> {
        let rel = format!("{component}/binary-{}/Packages", self.opts.arch);
        let what = format!("{} {rel}", self.opts.suite);
        let plain = self.release.sha256.get(&rel).cloned();
        let plain_digest = plain.as_ref().map(|f| digest_of_hex(&f.sha256));
        let path = match &plain_digest {
            Some(d) if self.store.contains(d) => self.store.path(d),
            _ => self.download_index(&rel, &what, plain.as_ref())?,
        };
        let file = fs::File::open(&path).map_err(|source| PackagesError::Cache {
            path: path.clone(),
            source,
        })?;
        let before = index.len();
        // Signed, but still bounded: the index is parsed into memory.
        let reader: Box<dyn Read> = match &plain_digest {
            Some(_) => Box::new(file),
            // Only a compressed index is listed: it is stored compressed.
            None => deb::decompressor(
                &format!("x.tar{}", sniff_compression(&path)),
                BufReader::new(file),
            )
            .map_err(|source| PackagesError::Cache {
                path: path.clone(),
                source,
            })?,
        };
        let mut reader = crate::bounded::LimitReader::new(reader, MAX_INDEX);
        let read = index.read_into(BufReader::with_capacity(1 << 20, &mut reader));
        if reader.exceeded() {
            return Err(PackagesError::BadIndex {
                what: what.clone(),
                reason: format!(
                    "larger than kiln's cap of {} MiB for an index ({}); use another mirror",
                    MAX_INDEX >> 20,
                    path.display()
                ),
            });
        }
        read.map_err(|e| PackagesError::BadIndex {
            what: what.clone(),
            reason: crate::error::chain_text(&e),
        })?;
        tracing::debug!(index = %what, packages = index.len() - before, "index loaded");
        Ok(())
    }

    /// Download the compressed index, verify it, and store its decompressed form (verified too,
    /// when InRelease lists the uncompressed hash).
    fn download_index(
        &self,
        rel: &str,
        what: &str,
        plain: Option<&release::ReleaseFile>,
    ) -> Result<PathBuf> {
        for ext in [".xz", ".gz"] {
            let Some(file) = self.release.sha256.get(&format!("{rel}{ext}")) else {
                continue;
            };
            let digest = digest_of_hex(&file.sha256);
            for (name, listed) in [
                (format!("{rel}{ext}"), Some(file)),
                (rel.to_string(), plain),
            ] {
                if let Some(f) = listed.filter(|f| f.size > MAX_INDEX) {
                    return Err(PackagesError::BadIndex {
                        what: format!("{} {name}", self.opts.suite),
                        reason: format!(
                            "InRelease lists it with {} bytes, above kiln's cap of {} MiB for an \
                             index; use another mirror or suite",
                            f.size,
                            MAX_INDEX >> 20
                        ),
                    });
                }
            }
            let mut urls = Vec::new();
            if self.release.acquire_by_hash
                && let Some((dir, _)) = rel.rsplit_once('/')
            {
                urls.push(format!(
                    "{}/{dir}/by-hash/SHA256/{}",
                    self.dists_url(),
                    file.sha256
                ));
            }
            urls.push(format!("{}/{rel}{ext}", self.dists_url()));
            let packed = self.fetcher.fetch_blob(
                &urls,
                &format!("index {what}{ext}"),
                &digest,
                Some(file.size),
                &self.store,
                &self.partial_dir(),
            )?;
            let Some(plain) = plain else {
                return Ok(packed);
            };
            return self.unpack_index(&packed, ext, plain, what);
        }
        match plain {
            Some(file) => self.fetcher.fetch_blob(
                &[format!("{}/{rel}", self.dists_url())],
                &format!("index {what}"),
                &digest_of_hex(&file.sha256),
                Some(file.size),
                &self.store,
                &self.partial_dir(),
            ),
            None => Err(PackagesError::BadRelease {
                url: redact(&format!("{}/InRelease", self.dists_url())).into_owned(),
                reason: format!(
                    "lists no {rel}(.xz|.gz): is the component or architecture in this suite? \
                     (components: {}, architectures: {})",
                    self.release.components.join(" "),
                    self.release.architectures.join(" ")
                ),
            }),
        }
    }

    fn unpack_index(
        &self,
        packed: &Path,
        ext: &str,
        plain: &release::ReleaseFile,
        what: &str,
    ) -> Result<PathBuf> {
        let cache_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PackagesError::Cache { path, source }
        };
        let file = fs::File::open(packed).map_err(cache_err(packed))?;
        let name = format!("x.tar{ext}");
        // Decompressed on a second thread while this one hashes and stores. The signed size of
        // the uncompressed index bounds the decompression (a byte more and the digest could not
        // match anyway).
        let stored = crate::readahead::read_ahead(
            move || deb::decompressor(&name, BufReader::new(file)),
            |reader| {
                let mut reader = crate::bounded::LimitReader::new(reader, plain.size);
                self.store.put(&mut reader)
            },
        );
        let expected = digest_of_hex(&plain.sha256);
        let (digest, len) = match stored {
            Ok(v) => v,
            Err(e) => {
                // A corrupt compressed blob: drop it so the next run downloads it again.
                let _ = fs::remove_file(packed);
                return Err(PackagesError::BadIndex {
                    what: what.to_string(),
                    reason: format!("decompressing {}: {e}", packed.display()),
                });
            }
        };
        if digest != expected || len != plain.size {
            let _ = fs::remove_file(self.store.path(&digest));
            let _ = fs::remove_file(packed);
            return Err(PackagesError::HashMismatch {
                what: format!("decompressed index {what}"),
                url: packed.display().to_string(),
                expected: format!("{expected} ({} bytes)", plain.size),
                actual: format!("{digest} ({len} bytes)"),
            });
        }
        Ok(self.store.path(&digest))
    }
}

fn digest_of_hex(hex_text: &str) -> Digest256 {
    Digest256::from_sha256(&hex::decode(hex_text).unwrap_or_default())
}

/// Blobs carry no name: tell a stored compressed index's format by its magic bytes.
fn sniff_compression(path: &Path) -> &'static str {
    let mut magic = [0u8; 6];
    let ok = fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match magic {
        _ if ok.is_err() => "",
        [0xfd, b'7', b'z', b'X', b'Z', 0] => ".xz",
        [0x1f, 0x8b, ..] => ".gz",
        _ => "",
    }
}

fn load_keyring(path: Option<&Path>) -> Result<Keyring> {
    match path {
        None => Keyring::debian().map_err(|e| PackagesError::Keyring {
            path: "(built in)".into(),
            reason: e.to_string(),
        }),
        Some(p) => {
            let bytes = fs::read(p).map_err(|e| PackagesError::Keyring {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            Keyring::from_bytes(&bytes).map_err(|e| PackagesError::Keyring {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        }
    }
}

/// Where the verified InRelease of a mirror and suite is kept.
fn release_cache_path(opts: &ArchiveOptions) -> PathBuf {
    // No credentials in a file name: they would show in every message that names the file.
    let key: String = format!("{}_{}", crate::net::redact(&opts.mirror), opts.suite)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    opts.home.join("debian").join(key).join("InRelease")
}

/// The verified InRelease bytes and their fields: from the cache when fresh enough (or offline),
/// else from the mirror, cached only after verification.
fn load_release(
    opts: &ArchiveOptions,
    keyring: &Keyring,
    fetcher: &Fetcher,
) -> Result<(Vec<u8>, Release)> {
    let url = format!("{}/dists/{}/InRelease", opts.mirror, opts.suite);
    let cached = release_cache_path(opts);
    let fresh = fs::metadata(&cached)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age <= opts.release_max_age);
    if (fresh || opts.fetch.offline)
        && let Ok(bytes) = fs::read(&cached)
    {
        match check_release(&bytes, keyring, &url, opts) {
            Ok(release) => {
                tracing::debug!(path = %cached.display(), "reusing cached InRelease");
                return Ok((bytes, release));
            }
            Err(e) if opts.fetch.offline => return Err(e),
            Err(e) => tracing::warn!(
                "cached InRelease rejected, fetching again: {}",
                crate::error::Chain(&e)
            ),
        }
    }
    let bytes = fetcher.get_bytes(&url, &format!("InRelease of {}", opts.suite), MAX_INRELEASE)?;
    let release = check_release(&bytes, keyring, &url, opts)?;
    if let Some(until) = release.valid_until {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if now > until {
            return Err(PackagesError::Expired {
                url: redact(&url).into_owned(),
                valid_until: release::format_date(until),
            });
        }
    }
    write_atomic(&cached, &bytes).map_err(|source| PackagesError::Cache {
        path: cached.clone(),
        source,
    })?;
    Ok((bytes, release))
}

/// Verify the signature, parse the signed fields, and check that they describe the suite asked
/// for.
fn check_release(
    bytes: &[u8],
    keyring: &Keyring,
    url: &str,
    opts: &ArchiveOptions,
) -> Result<Release> {
    let text = release::verify_clearsigned(bytes, keyring).map_err(|e| {
        let advice = match e {
            release::ReleaseError::BadSignature(ref r) if r.starts_with("BAD") => {
                "the file was altered on the way or on the mirror: use another mirror \
                 (KILN_DEBIAN_MIRROR)"
            }
            release::ReleaseError::NotSigned(_) => {
                "check that KILN_DEBIAN_MIRROR points at a Debian mirror"
            }
            _ => {
                "if the mirror is genuine, the keyring may be outdated: point \
                 KILN_DEBIAN_KEYRING at a current debian-archive-keyring.gpg"
            }
        };
        PackagesError::BadSignature {
            url: redact(url).into_owned(),
            reason: format!("{e}; {advice}"),
        }
    })?;
    let release = Release::parse(&text).map_err(|e| PackagesError::BadRelease {
        url: redact(url).into_owned(),
        reason: e.to_string(),
    })?;
    let names = [release.codename.as_deref(), release.suite.as_deref()];
    if names.iter().all(|n| n.is_some()) && !names.contains(&Some(opts.suite.as_str())) {
        return Err(PackagesError::BadRelease {
            url: redact(url).into_owned(),
            reason: format!(
                "signed for suite {} ({}), not {}: the mirror serves the wrong file",
                release.suite.as_deref().unwrap_or("?"),
                release.codename.as_deref().unwrap_or("?"),
                opts.suite
            ),
        });
    }
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_sources_formats() {
        let one = "# deb http://example.org/old/debian bookworm main\n\
                   deb-src http://deb.debian.org/debian bookworm main\n\
                   deb [arch=amd64 signed-by=/x.gpg] http://ftp.de.debian.org/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_one_line(one).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        assert_eq!(
            mirror_from_one_line("deb http://x/ubuntu jammy main\n"),
            None
        );
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(
            mirror_from_deb822(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let disabled = "Types: deb\nEnabled: no\nURIs: https://m/debian\n";
        assert_eq!(mirror_from_deb822(disabled), None);
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
        fs::write(dir.path().join("sources.list.d/a.sources"), deb822).unwrap();
        assert_eq!(
            host_apt_mirror(dir.path()).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        fs::write(dir.path().join("sources.list"), one).unwrap();
        assert_eq!(
            host_apt_mirror(dir.path()).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
    }
}
