//! Recipes from git: a cached bare mirror of each repository under `$KILN_HOME/git/<sha256 of
//! url>.git` (cloned once, then fetched: every branch and tag), a ref resolved to a commit, and
//! that commit's tree checked out into a directory of its own, `$KILN_HOME/checkouts/<commit>-…`,
//! which is removed when the [`Checkout`] (and every clone of it) is dropped: a build's checkout
//! lives as long as the build needs it, the mirror stays as the cache. Directories that a killed
//! process left behind are swept after a day. File modes (the executable bit) and symlinks come
//! from git.
//!
//! Supported URLs: local paths and `file://` (libgit2's local transport), `http://` and
//! `https://` (git's smart HTTP protocol, fetch only, over kiln's own HTTP client — reqwest with
//! rustls — registered with libgit2 as its http transport, so no OpenSSL is linked). ssh is not
//! supported and fails with a clear error. The HTTP transport blocks: call from a plain thread
//! (or `spawn_blocking`), never directly inside an async runtime.
//!
//! Limits: a repository is untrusted input. A fetch may receive at most [`MAX_FETCH_BYTES`]; a
//! checkout at most [`MAX_CHECKOUT_FILES`] entries, [`MAX_CHECKOUT_BYTES`] of file content and
//! [`MAX_CHECKOUT_DEPTH`] nested directories (file contents are read whole from git: recipe
//! repositories are small). Two processes fetching into one mirror at the same moment may see a
//! libgit2 lock error and retry. URLs are shown without credentials ([`crate::net::redact`]).

use crate::net::redact;
use crate::recipe::{GitInfo, LoadOptions};
use git2::{AutotagOption, FetchOptions, FetchPrune, ObjectType, Oid, Repository, Tree};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most entries (files, directories, symlinks) one checkout may have.
pub const MAX_CHECKOUT_FILES: u64 = 100_000;
/// Most bytes of file content one checkout may have.
pub const MAX_CHECKOUT_BYTES: u64 = 2 << 30;
/// Deepest directory nesting of a checkout (and of a tree walk).
pub const MAX_CHECKOUT_DEPTH: usize = 64;
/// Most bytes one fetch may receive from the remote.
pub const MAX_FETCH_BYTES: u64 = 2 << 30;
/// Age after which a checkout directory is taken for one a killed process left behind.
const STALE_CHECKOUT: Duration = Duration::from_secs(24 * 3600);

/// The refspecs every fetch uses: all branches and all tags, forced (a rewritten branch follows
/// the remote).
const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// What went wrong getting a recipe from git.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "repository {url}: unsupported URL scheme `{scheme}`; kiln reads local paths, file://, \
         http:// and https:// (use the repository's https URL or a local mirror)"
    )]
    UnsupportedScheme { url: String, scheme: String },
    #[error(
        "repository {url} is not a local path that exists: {path}; check the path or use a URL"
    )]
    NoSuchPath { url: String, path: PathBuf },
    #[error(
        "cannot reach repository {url}: {message}; check the URL, that the repository exists and \
         that the server answers"
    )]
    Unreachable { url: String, message: String },
    #[error("repository {url}: {reference:?} is not a branch, tag or commit id{}", known_refs(.branches, .tags))]
    UnknownRef {
        url: String,
        reference: String,
        /// A few branch names of the repository, sorted.
        branches: Vec<String>,
        /// A few tag names of the repository, sorted.
        tags: Vec<String>,
    },
    #[error(
        "recipe path {path:?} must be relative and stay inside the repository (no `..`, no \
         leading `/`); give it relative to the repository root, e.g. recipes/minimal.yaml"
    )]
    BadRecipePath { path: String },
    #[error(
        "recipe {path:?} does not exist at {reference} (commit {commit}) of {url}; check the path \
         and the ref"
    )]
    MissingRecipe {
        url: String,
        reference: String,
        commit: String,
        path: String,
    },
    #[error(
        "recipe {path:?} at commit {commit} resolves to {target}, outside the checkout {dir}; a \
         symlink may not lead out of the repository"
    )]
    RecipeEscapes {
        path: String,
        commit: String,
        target: PathBuf,
        dir: PathBuf,
    },
    #[error("repository {url}: git error while {what}: {message}")]
    Git {
        url: String,
        what: String,
        message: String,
    },
    #[error(
        "checkout of commit {commit}: tree entry {name:?} in {parent:?} is not a safe file name"
    )]
    BadTreeEntry {
        commit: String,
        parent: String,
        name: String,
    },
    #[error(
        "repository {url}: {what} (limit {limit}); refusing it. Recipe repositories are small: \
         keep large files and generated trees out of the repository"
    )]
    TooLarge {
        url: String,
        what: String,
        limit: u64,
    },
    #[error("{what} {path}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn known_refs(branches: &[String], tags: &[String]) -> String {
    let mut s = String::new();
    if branches.is_empty() && tags.is_empty() {
        s.push_str("; the repository has no branches or tags");
        return s;
    }
    if !branches.is_empty() {
        s.push_str("; branches: ");
        s.push_str(&branches.join(", "));
    }
    if !tags.is_empty() {
        s.push_str("; tags: ");
        s.push_str(&tags.join(", "));
    }
    s
}

/// How many branch and tag names an unknown-ref error lists.
const LIST_REFS: usize = 8;

/// Owns a checkout directory: removes it when the last [`Checkout`] holding it is dropped.
#[derive(Debug, Clone)]
pub struct CheckoutDir(Arc<tempfile::TempDir>);

impl CheckoutDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl PartialEq for CheckoutDir {
    fn eq(&self, other: &Self) -> bool {
        self.path() == other.path()
    }
}

impl Eq for CheckoutDir {}

/// A commit's tree, checked out, and where the recipe is in it. The directory exists while this
/// value (or a clone) does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The checkout directory (`$KILN_HOME/checkouts/<commit>-<random>`).
    pub dir: PathBuf,
    /// The commit id, 40 lowercase hex digits.
    pub commit: String,
    /// The ref as the caller gave it (branch, tag or commit id).
    pub reference: String,
    /// The commit time, seconds since the Unix epoch.
    pub time: i64,
    /// `dir.join(recipe path)`.
    pub recipe_path: PathBuf,
    /// True when this call created the bare mirror (a first clone); false when it fetched into
    /// an existing one.
    pub cloned: bool,
    /// Keeps `dir` on disk; dropping the last clone removes it.
    pub owner: CheckoutDir,
}

/// One repository, mirrored under a kiln home.
#[derive(Debug, Clone)]
pub struct GitMirror {
    url: String,
    home: PathBuf,
}

impl GitMirror {
    /// The repository at `url`, cached under `$KILN_HOME`.
    pub fn new(url: &str) -> Result<Self, SourceError> {
        Self::with_home(url, &crate::home::kiln_home())
    }

    /// The repository at `url`, cached under `home` (instead of `$KILN_HOME`). A local path is
    /// made absolute, so the same repository has one mirror whatever the working directory.
    pub fn with_home(url: &str, home: &Path) -> Result<Self, SourceError> {
        let url = normalize_url(url)?;
        Ok(GitMirror {
            url,
            home: home.to_path_buf(),
        })
    }

    /// The normalized URL (absolute for local paths).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the bare mirror lives: `<home>/git/<sha256 of url>.git`.
    pub fn mirror_dir(&self) -> PathBuf {
        let hash = hex::encode(Sha256::digest(self.url.as_bytes()));
        self.home.join("git").join(format!("{hash}.git"))
    }

    /// Where checkouts live: `<home>/checkouts` (each in a directory of its own).
    pub fn checkouts_dir(&self) -> PathBuf {
        self.home.join("checkouts")
    }

    /// The URL as messages show it: without credentials.
    fn shown_url(&self) -> String {
        redact(&self.url).into_owned()
    }

    /// Fetch, then resolve `reference` (branch, tag, full or abbreviated commit id) to a commit.
    /// A full commit id already in the mirror needs no fetch (works offline).
    pub fn resolve(&self, reference: &str) -> Result<(String, i64), SourceError> {
        let (repo, _) = self.mirror_for(reference)?;
        let oid = self.resolve_in(&repo, reference)?;
        let commit = repo
            .find_commit(oid)
            .map_err(|e| self.git("reading a commit", e))?;
        Ok((oid.to_string(), commit.time().seconds()))
    }

    /// Fetch, then the first parent of the commit `reference` resolves to (`None` for a root
    /// commit).
    pub fn first_parent(&self, reference: &str) -> Result<Option<String>, SourceError> {
        let (repo, _) = self.mirror_for(reference)?;
        let oid = self.resolve_in(&repo, reference)?;
        let commit = repo
            .find_commit(oid)
            .map_err(|e| self.git("reading a commit", e))?;
        Ok(commit.parent_ids().next().map(|p| p.to_string()))
    }

    /// Fetch, then whether `commit` is the commit `reference` names or one of its ancestors:
    /// whether it is on that branch or tag.
    pub fn is_on(&self, reference: &str, commit: &str) -> Result<bool, SourceError> {
        let (repo, _) = self.mirror_for(reference)?;
        let tip = self.resolve_in(&repo, reference)?;
        let oid = self.resolve_in(&repo, commit)?;
        if oid == tip {
            return Ok(true);
        }
        repo.graph_descendant_of(tip, oid)
            .map_err(|e| self.git("walking the history", e))
    }

    /// Fetch, resolve `reference`, check the commit out and locate `recipe` (a path relative to
    /// the repository root) in it.
    pub fn checkout(&self, reference: &str, recipe: &str) -> Result<Checkout, SourceError> {
        let rel = safe_relative(recipe)?;
        let (repo, cloned) = self.mirror_for(reference)?;
        let oid = self.resolve_in(&repo, reference)?;
        let commit = repo
            .find_commit(oid)
            .map_err(|e| self.git("reading a commit", e))?;
        let hex = oid.to_string();
        let tree = commit.tree().map_err(|e| self.git("reading a tree", e))?;
        let missing = || SourceError::MissingRecipe {
            url: self.shown_url(),
            reference: reference.to_string(),
            commit: hex.clone(),
            path: recipe.to_string(),
        };
        // A path through a symlinked directory is not in the tree; the file system check after
        // the checkout decides for those.
        let in_tree = tree.get_path(&rel).is_ok();
        let owner = self.write_checkout(&repo, &tree, &hex)?;
        let dir = owner.path().to_path_buf();
        let recipe_path = dir.join(&rel);
        let real = match recipe_path.canonicalize() {
            Ok(r) => r,
            Err(_) if !in_tree => return Err(missing()),
            Err(_) => {
                // In the tree but not resolvable: a dangling symlink.
                let target = fs::read_link(&recipe_path).unwrap_or_else(|_| recipe_path.clone());
                return Err(SourceError::RecipeEscapes {
                    path: recipe.to_string(),
                    commit: hex,
                    target,
                    dir,
                });
            }
        };
        let real_dir = dir.canonicalize().map_err(|e| SourceError::Io {
            what: "resolving the checkout".into(),
            path: dir.clone(),
            source: e,
        })?;
        if !real.starts_with(&real_dir) {
            return Err(SourceError::RecipeEscapes {
                path: recipe.to_string(),
                commit: hex,
                target: real,
                dir,
            });
        }
        if !real.is_file() {
            return Err(missing());
        }
        Ok(Checkout {
            dir,
            commit: hex,
            reference: reference.to_string(),
            time: commit.time().seconds(),
            recipe_path,
            cloned,
            owner,
        })
    }

    /// Check out the commit `reference` resolves to, without locating a recipe.
    pub fn checkout_tree(&self, reference: &str) -> Result<Checkout, SourceError> {
        let (repo, cloned) = self.mirror_for(reference)?;
        let oid = self.resolve_in(&repo, reference)?;
        let commit = repo
            .find_commit(oid)
            .map_err(|e| self.git("reading a commit", e))?;
        let hex = oid.to_string();
        let tree = commit.tree().map_err(|e| self.git("reading a tree", e))?;
        let owner = self.write_checkout(&repo, &tree, &hex)?;
        let dir = owner.path().to_path_buf();
        Ok(Checkout {
            recipe_path: dir.clone(),
            dir,
            commit: hex,
            reference: reference.to_string(),
            time: commit.time().seconds(),
            cloned,
            owner,
        })
    }

    /// The paths of the regular files in the commit's tree (relative, `/`-separated, sorted).
    pub fn files_at(&self, commit: &str) -> Result<Vec<String>, SourceError> {
        let repo = self.open_mirror()?;
        let oid = Oid::from_str(commit).map_err(|e| self.git("parsing a commit id", e))?;
        let tree = repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(|e| self.git("reading a tree", e))?;
        let mut out = Vec::new();
        list_files(&repo, &tree, "", 0, &mut out).map_err(|e| match e {
            Walk::Git(e) => self.git("walking a tree", e),
            Walk::Source(e) => e,
            Walk::Limit { what, limit } => SourceError::TooLarge {
                url: self.shown_url(),
                what: format!("commit {commit}: {what}"),
                limit,
            },
        })?;
        out.sort();
        Ok(out)
    }

    fn open_mirror(&self) -> Result<Repository, SourceError> {
        Repository::open_bare(self.mirror_dir()).map_err(|e| self.git("opening the mirror", e))
    }

    /// The mirror, fetched unless `reference` is a full commit id it already has.
    fn mirror_for(&self, reference: &str) -> Result<(Repository, bool), SourceError> {
        let (repo, cloned) = self.open_or_clone()?;
        let have = reference.len() == 40
            && Oid::from_str(reference)
                .ok()
                .is_some_and(|oid| repo.find_commit(oid).is_ok());
        if !cloned && !have {
            self.fetch(&repo)?;
        }
        Ok((repo, cloned))
    }

    fn open_or_clone(&self) -> Result<(Repository, bool), SourceError> {
        let dir = self.mirror_dir();
        if dir.exists() {
            return Ok((self.open_mirror()?, false));
        }
        let parent = self.home.join("git");
        fs::create_dir_all(&parent)
            .map_err(|e| io_err("creating the mirror directory", &parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".clone-")
            .tempdir_in(&parent)
            .map_err(|e| io_err("creating a clone directory in", &parent, e))?;
        {
            let repo = Repository::init_bare(tmp.path())
                .map_err(|e| self.git("creating the mirror", e))?;
            self.fetch(&repo)?;
        }
        let tmp_path = tmp.keep();
        if let Err(e) = fs::rename(&tmp_path, &dir) {
            let _ = fs::remove_dir_all(&tmp_path);
            // Another process finished its clone first: use that one.
            if !dir.exists() {
                return Err(io_err("moving the clone into place at", &dir, e));
            }
            return Ok((self.open_mirror()?, false));
        }
        Ok((self.open_mirror()?, true))
    }

    fn fetch(&self, repo: &Repository) -> Result<(), SourceError> {
        if self.url.starts_with("http://") || self.url.starts_with("https://") {
            http::register().map_err(|message| SourceError::Git {
                url: self.url.clone(),
                what: "setting up the http transport".into(),
                message,
            })?;
        }
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| self.git("setting up the remote", e))?;
        let over = std::cell::Cell::new(false);
        let mut callbacks = git2::RemoteCallbacks::new();
        callbacks.transfer_progress(|p| {
            // Returning false makes libgit2 stop the transfer.
            let ok = p.received_bytes() as u64 <= MAX_FETCH_BYTES;
            if !ok {
                over.set(true);
            }
            ok
        });
        let mut opts = FetchOptions::new();
        opts.prune(FetchPrune::On)
            .download_tags(AutotagOption::All)
            .remote_callbacks(callbacks);
        let fetched = remote.fetch(&REFSPECS, Some(&mut opts), None);
        drop(opts);
        if over.get() {
            return Err(SourceError::TooLarge {
                url: self.shown_url(),
                what: format!("a fetch received more than {MAX_FETCH_BYTES} bytes"),
                limit: MAX_FETCH_BYTES,
            });
        }
        fetched.map_err(|e| SourceError::Unreachable {
            url: self.shown_url(),
            message: redact(e.message()).into_owned(),
        })
    }

    fn resolve_in(&self, repo: &Repository, reference: &str) -> Result<Oid, SourceError> {
        let peel = |name: &str| -> Option<Oid> {
            let r = repo.find_reference(name).ok()?;
            r.peel_to_commit().ok().map(|c| c.id())
        };
        let candidates = if reference.starts_with("refs/") {
            vec![reference.to_string()]
        } else {
            vec![
                format!("refs/heads/{reference}"),
                format!("refs/tags/{reference}"),
            ]
        };
        for name in &candidates {
            if let Some(oid) = peel(name) {
                return Ok(oid);
            }
        }
        let is_hex =
            (4..=40).contains(&reference.len()) && reference.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex
            && let Ok(obj) = repo.revparse_single(reference)
            && let Ok(c) = obj.peel_to_commit()
        {
            return Ok(c.id());
        }
        Err(SourceError::UnknownRef {
            url: self.shown_url(),
            reference: reference.to_string(),
            branches: ref_names(repo, "refs/heads/"),
            tags: ref_names(repo, "refs/tags/"),
        })
    }

    /// A new directory holding `commit`'s tree, removed when the returned owner is dropped (or
    /// at once, when writing it fails).
    fn write_checkout(
        &self,
        repo: &Repository,
        tree: &Tree<'_>,
        commit: &str,
    ) -> Result<CheckoutDir, SourceError> {
        let parent = self.checkouts_dir();
        fs::create_dir_all(&parent)
            .map_err(|e| io_err("creating the checkouts directory", &parent, e))?;
        sweep_stale(&parent);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{commit}-"))
            .tempdir_in(&parent)
            .map_err(|e| io_err("creating a checkout directory in", &parent, e))?;
        // Measured first: a tree past the limits is refused before a file is written.
        let mut budget = Budget::default();
        measure(repo, tree, "", 0, commit, &mut budget)
            .and_then(|()| write_tree(repo, tree, tmp.path(), "", commit))
            .map_err(|e| match e {
                Walk::Git(e) => self.git("writing the checkout", e),
                Walk::Source(e) => e,
                Walk::Limit { what, limit } => SourceError::TooLarge {
                    url: self.shown_url(),
                    what: format!("the checkout of commit {commit}: {what}"),
                    limit,
                },
            })?;
        Ok(CheckoutDir(Arc::new(tmp)))
    }

    fn git(&self, what: &str, e: git2::Error) -> SourceError {
        SourceError::Git {
            url: self.shown_url(),
            what: what.to_string(),
            message: redact(e.message()).into_owned(),
        }
    }
}

/// Fetch and check out `reference` of `url` under `$KILN_HOME` and locate `recipe` in it.
pub fn checkout(url: &str, reference: &str, recipe: &str) -> Result<Checkout, SourceError> {
    GitMirror::new(url)?.checkout(reference, recipe)
}

/// Load options for a recipe from `checkout`: the commit, ref and commit time (the
/// SOURCE_DATE_EPOCH when the recipe sets none), the `--set` overrides, and the nearest
/// `templates/` directory inside the checkout (never one above it).
pub fn load_options_for(checkout: &Checkout, set: Vec<(String, String)>) -> LoadOptions {
    let mut templates = None;
    let mut at = checkout.recipe_path.parent();
    while let Some(d) = at {
        if !d.starts_with(&checkout.dir) {
            break;
        }
        let t = d.join("templates");
        if t.is_dir() {
            templates = Some(t);
            break;
        }
        at = d.parent();
    }
    LoadOptions {
        set,
        // A directory that does not exist is ignored by the loader; it stops the search above
        // the checkout.
        templates_dir: Some(templates.unwrap_or_else(|| checkout.dir.join("templates"))),
        git: GitInfo {
            commit: checkout.commit.clone(),
            reference: checkout.reference.clone(),
            time: Some(checkout.time),
        },
        env: None,
        limits: crate::recipe::Limits::default(),
    }
}

/// Canonical form of a repository URL for allow-lists: normalized like [`GitMirror`] does
/// (local paths absolute), without `file://`, a trailing `/` or `.git`.
pub fn canonical_repo_url(url: &str, home: &Path) -> Option<String> {
    let url = url.strip_prefix("file://").unwrap_or(url);
    let normalized = GitMirror::with_home(url, home).ok()?.url().to_string();
    let trimmed = normalized.trim_end_matches('/');
    Some(trimmed.strip_suffix(".git").unwrap_or(trimmed).to_string())
}

/// Local paths become absolute (`file://` stays as given); unsupported schemes are refused.
fn normalize_url(url: &str) -> Result<String, SourceError> {
    if let Some((scheme, _)) = url.split_once("://") {
        return match scheme {
            "file" | "http" | "https" => Ok(url.to_string()),
            _ => Err(SourceError::UnsupportedScheme {
                url: redact(url).into_owned(),
                scheme: scheme.to_string(),
            }),
        };
    }
    if url.contains('@') && url.contains(':') && !Path::new(url).exists() {
        return Err(SourceError::UnsupportedScheme {
            url: url.to_string(),
            scheme: "ssh".to_string(),
        });
    }
    let path = Path::new(url);
    path.canonicalize()
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|_| SourceError::NoSuchPath {
            url: url.to_string(),
            path: path.to_path_buf(),
        })
}

/// A recipe path made only of normal components.
fn safe_relative(recipe: &str) -> Result<PathBuf, SourceError> {
    let bad = || SourceError::BadRecipePath {
        path: recipe.to_string(),
    };
    let mut out = PathBuf::new();
    for c in Path::new(recipe).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(out)
}

fn ref_names(repo: &Repository, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = repo
        .references_glob(&format!("{prefix}*"))
        .map(|refs| {
            refs.filter_map(|r| r.ok()?.name().ok().map(|n| n[prefix.len()..].to_string()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.truncate(LIST_REFS);
    names
}

fn io_err(what: &str, path: &Path, source: std::io::Error) -> SourceError {
    SourceError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    }
}

fn safe_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Git file modes.
const MODE_TREE: i32 = 0o040000;
const MODE_LINK: i32 = 0o120000;
const MODE_EXEC: i32 = 0o100755;
const MODE_COMMIT: i32 = 0o160000;

/// Why writing or walking a tree stopped.
enum Walk {
    Git(git2::Error),
    Limit { what: String, limit: u64 },
    Source(SourceError),
}

impl From<git2::Error> for Walk {
    fn from(e: git2::Error) -> Self {
        Walk::Git(e)
    }
}

/// What a checkout has used of its limits so far.
#[derive(Default)]
struct Budget {
    entries: u64,
    bytes: u64,
}

impl Budget {
    /// Count one more entry of `size` bytes at `path`.
    fn take(&mut self, path: &str, size: u64) -> Result<(), Walk> {
        self.entries += 1;
        if self.entries > MAX_CHECKOUT_FILES {
            return Err(Walk::Limit {
                what: format!("more than {MAX_CHECKOUT_FILES} files and directories"),
                limit: MAX_CHECKOUT_FILES,
            });
        }
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > MAX_CHECKOUT_BYTES {
            return Err(Walk::Limit {
                what: format!(
                    "more than {MAX_CHECKOUT_BYTES} bytes of files (reached at {path}, {size} bytes)"
                ),
                limit: MAX_CHECKOUT_BYTES,
            });
        }
        Ok(())
    }
}

fn check_depth(rel: &str, depth: usize) -> Result<(), Walk> {
    if depth > MAX_CHECKOUT_DEPTH {
        return Err(Walk::Limit {
            what: format!("directories nested more than {MAX_CHECKOUT_DEPTH} deep ({rel})"),
            limit: MAX_CHECKOUT_DEPTH as u64,
        });
    }
    Ok(())
}

/// Remove checkout directories older than [`STALE_CHECKOUT`]: ones a killed process left
/// behind (a live build uses its checkout for seconds). Best effort.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_CHECKOUT);
        if old {
            let path = entry.path();
            tracing::debug!(path = %path.display(), "removing a stale checkout");
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Walk `tree` as [`write_tree`] will, counting entries, bytes (from object headers: no file
/// content is read) and depth against the checkout limits, and checking every name.
fn measure(
    repo: &Repository,
    tree: &Tree<'_>,
    rel: &str,
    depth: usize,
    commit: &str,
    budget: &mut Budget,
) -> Result<(), Walk> {
    check_depth(rel, depth)?;
    let odb = repo.odb()?;
    for entry in tree.iter() {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        if !safe_name(&name) || name == ".git" {
            return Err(Walk::Source(SourceError::BadTreeEntry {
                commit: commit.to_string(),
                parent: rel.to_string(),
                name,
            }));
        }
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        match entry.filemode() {
            MODE_TREE => {
                budget.take(&child_rel, 0)?;
                let sub = repo.find_tree(entry.id())?;
                measure(repo, &sub, &child_rel, depth + 1, commit, budget)?;
            }
            MODE_COMMIT => budget.take(&child_rel, 0)?,
            _ => {
                let (size, _) = odb.read_header(entry.id())?;
                budget.take(&child_rel, size as u64)?;
            }
        }
    }
    Ok(())
}

/// Write `tree` into `dir`: directories, files (0644, or 0755 when git marks them executable),
/// symlinks; submodules become empty directories. [`measure`] has checked it.
fn write_tree(
    repo: &Repository,
    tree: &Tree<'_>,
    dir: &Path,
    rel: &str,
    commit: &str,
) -> Result<(), Walk> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &str, path: &Path, e: std::io::Error| Walk::Source(io_err(what, path, e));
    for entry in tree.iter() {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        if !safe_name(&name) || name == ".git" {
            return Err(Walk::Source(SourceError::BadTreeEntry {
                commit: commit.to_string(),
                parent: rel.to_string(),
                name,
            }));
        }
        let path = dir.join(&name);
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match entry.filemode() {
            MODE_TREE => {
                fs::create_dir(&path).map_err(|e| io("creating directory", &path, e))?;
                let sub = repo.find_tree(entry.id())?;
                write_tree(repo, &sub, &path, &child_rel, commit)?;
            }
            MODE_COMMIT => {
                fs::create_dir(&path).map_err(|e| io("creating directory", &path, e))?;
            }
            mode => {
                let blob = repo.find_blob(entry.id())?;
                if mode == MODE_LINK {
                    let target = std::ffi::OsStr::from_bytes(blob.content());
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|e| io("creating symlink", &path, e))?;
                } else {
                    let mut f =
                        fs::File::create(&path).map_err(|e| io("creating file", &path, e))?;
                    f.write_all(blob.content())
                        .map_err(|e| io("writing file", &path, e))?;
                    let perm = if mode == MODE_EXEC { 0o755 } else { 0o644 };
                    f.set_permissions(fs::Permissions::from_mode(perm))
                        .map_err(|e| io("setting the mode of", &path, e))?;
                }
            }
        }
    }
    Ok(())
}

fn list_files(
    repo: &Repository,
    tree: &Tree<'_>,
    rel: &str,
    depth: usize,
    out: &mut Vec<String>,
) -> Result<(), Walk> {
    check_depth(rel, depth)?;
    for entry in tree.iter() {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        match entry.kind() {
            Some(ObjectType::Tree) => {
                let sub = repo.find_tree(entry.id())?;
                list_files(repo, &sub, &path, depth + 1, out)?;
            }
            Some(ObjectType::Blob) if entry.filemode() != MODE_LINK => {
                if out.len() as u64 >= MAX_CHECKOUT_FILES {
                    return Err(Walk::Limit {
                        what: format!("more than {MAX_CHECKOUT_FILES} files"),
                        limit: MAX_CHECKOUT_FILES,
                    });
                }
                out.push(path)
            }
            _ => {}
        }
    }
    Ok(())
}

/// git's smart HTTP protocol (fetch side) over reqwest, as a libgit2 subtransport.
mod http {
    use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
    use std::io::{self, Read, Write};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    const LS: &str = "/info/refs?service=git-upload-pack";

    /// Register the transport for http:// and https:// once per process.
    pub fn register() -> Result<(), String> {
        static DONE: OnceLock<Result<(), String>> = OnceLock::new();
        DONE.get_or_init(|| {
            let client = reqwest::blocking::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                // Headers and every read of a body: how long the server may send nothing.
                .timeout(crate::net::stall_timeout())
                .user_agent(concat!("git/2.0 (kiln ", env!("CARGO_PKG_VERSION"), ")"))
                .build()
                .map_err(|e| format!("building the HTTP client: {e}"))?;
            for scheme in ["http", "https"] {
                let client = client.clone();
                // SAFETY: runs once (OnceLock), before this process's first HTTP fetch; kiln
                // creates no other libgit2 transports concurrently with it.
                unsafe {
                    git2::transport::register(scheme, move |remote| {
                        Transport::smart(
                            remote,
                            true,
                            Subtransport {
                                client: client.clone(),
                                base: Arc::new(Mutex::new(None)),
                            },
                        )
                    })
                }
                .map_err(|e| format!("registering {scheme}: {}", e.message()))?;
            }
            Ok(())
        })
        .clone()
    }

    struct Subtransport {
        client: reqwest::blocking::Client,
        /// The repository URL, updated when the server redirects the ref listing.
        base: Arc<Mutex<Option<String>>>,
    }

    impl SmartSubtransport for Subtransport {
        fn action(
            &self,
            url: &str,
            action: Service,
        ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
            let base = {
                let mut b = self
                    .base
                    .lock()
                    .map_err(|_| git2::Error::from_str("http transport state poisoned"))?;
                b.get_or_insert_with(|| url.trim_end_matches('/').to_string())
                    .clone()
            };
            let (post, path, expect) = match action {
                Service::UploadPackLs => (false, LS, "application/x-git-upload-pack-advertisement"),
                Service::UploadPack => (
                    true,
                    "/git-upload-pack",
                    "application/x-git-upload-pack-result",
                ),
                Service::ReceivePackLs | Service::ReceivePack => {
                    return Err(git2::Error::from_str(
                        "kiln only fetches over http; pushing is not supported",
                    ));
                }
            };
            Ok(Box::new(Stream {
                client: self.client.clone(),
                url: format!("{base}{path}"),
                post,
                expect,
                body: Vec::new(),
                response: None,
                base: Arc::clone(&self.base),
            }))
        }

        fn close(&self) -> Result<(), git2::Error> {
            Ok(())
        }
    }

    /// One request: written body, then the streamed response.
    struct Stream {
        client: reqwest::blocking::Client,
        url: String,
        post: bool,
        expect: &'static str,
        body: Vec<u8>,
        response: Option<reqwest::blocking::Response>,
        base: Arc<Mutex<Option<String>>>,
    }

    impl Stream {
        fn send(&mut self) -> io::Result<reqwest::blocking::Response> {
            let request = if self.post {
                self.client
                    .post(&self.url)
                    .header("Content-Type", "application/x-git-upload-pack-request")
                    .header("Accept", self.expect)
                    .body(std::mem::take(&mut self.body))
            } else {
                self.client.get(&self.url)
            };
            let shown = crate::net::redact(&self.url).into_owned();
            let response = request.send().map_err(|e| {
                if e.is_timeout() {
                    stalled(&shown)
                } else {
                    // reqwest's message quotes the URL: redacted too.
                    io::Error::other(crate::net::redact(&format!("{shown}: {e}")).into_owned())
                }
            })?;
            let status = response.status();
            if !status.is_success() {
                return Err(io::Error::other(format!("{shown} answered HTTP {status}")));
            }
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with(self.expect) {
                return Err(io::Error::other(format!(
                    "{shown} answered {content_type:?}, not {}: not a git smart-HTTP server",
                    self.expect
                )));
            }
            // Follow a redirect of the ref listing for the requests after it.
            if !self.post
                && let Some(moved) = response.url().as_str().strip_suffix(LS)
                && let Ok(mut b) = self.base.lock()
            {
                *b = Some(moved.to_string());
            }
            Ok(response)
        }
    }

    impl Read for Stream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.response.is_none() {
                self.response = Some(self.send()?);
            }
            match &mut self.response {
                Some(r) => r.read(buf).map_err(|e| {
                    if crate::net::is_stall(&e) {
                        stalled(&crate::net::redact(&self.url))
                    } else {
                        e
                    }
                }),
                None => Ok(0),
            }
        }
    }

    fn stalled(url: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{url}: the server stalled (sent nothing for {:.1} s; {} raises the limit)",
                crate::net::stall_timeout().as_secs_f64(),
                crate::net::STALL_TIMEOUT_ENV
            ),
        )
    }

    impl Write for Stream {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.body.extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_paths_stay_relative() {
        assert!(safe_relative("recipes/a.yaml").is_ok());
        assert_eq!(
            safe_relative("./recipes/a.yaml").unwrap(),
            PathBuf::from("recipes/a.yaml")
        );
        for bad in ["../x.yaml", "recipes/../../x", "/etc/passwd", "", "."] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schemes() {
        assert!(matches!(
            normalize_url("ssh://host/repo"),
            Err(SourceError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            normalize_url("git@host:repo.git"),
            Err(SourceError::UnsupportedScheme { .. })
        ));
        assert_eq!(normalize_url("http://h/r").unwrap(), "http://h/r");
        assert!(matches!(
            normalize_url("/no/such/repo/anywhere"),
            Err(SourceError::NoSuchPath { .. })
        ));
    }
}
