//! Recipes from git: a cached bare mirror of each repository under `$KILN_HOME/git/<sha256 of
//! url>.git` (cloned once, then fetched: every branch and tag), a ref resolved to a commit, and
//! that commit's tree checked out into `$KILN_HOME/checkouts/<commit>`. A checkout is written to a
//! temporary directory and renamed into place when complete, so a half-written checkout is never
//! used; a complete one is reused. File modes (the executable bit) and symlinks come from git.
//!
//! Supported URLs: local paths and `file://` (libgit2's local transport), `http://` and
//! `https://` (git's smart HTTP protocol, fetch only, over kiln's own HTTP client — reqwest with
//! rustls — registered with libgit2 as its http transport, so no OpenSSL is linked). ssh is not
//! supported and fails with a clear error. The HTTP transport blocks: call from a plain thread
//! (or `spawn_blocking`), never directly inside an async runtime.
//!
//! Limits: file contents are read whole from git (recipe repositories are small); checkouts are
//! kept until something removes `$KILN_HOME/checkouts/<commit>` (nothing does yet); two
//! processes fetching into one mirror at the same moment may see a libgit2 lock error and retry.

use crate::recipe::{GitInfo, LoadOptions};
use git2::{AutotagOption, FetchOptions, FetchPrune, ObjectType, Oid, Repository, Tree};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

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
    #[error("{what} {path}: {source}")]
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

/// A commit's tree, checked out, and where the recipe is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The checkout directory (`$KILN_HOME/checkouts/<commit>`).
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
    /// True when the checkout directory already existed complete and was reused.
    pub reused: bool,
}

/// One repository, mirrored under a kiln home.
#[derive(Debug, Clone)]
pub struct GitSource {
    url: String,
    home: PathBuf,
}

impl GitSource {
    /// The repository at `url`, cached under `$KILN_HOME`.
    pub fn new(url: &str) -> Result<Self, SourceError> {
        Self::with_home(url, &crate::cache::kiln_home())
    }

    /// The repository at `url`, cached under `home` (instead of `$KILN_HOME`). A local path is
    /// made absolute, so the same repository has one mirror whatever the working directory.
    pub fn with_home(url: &str, home: &Path) -> Result<Self, SourceError> {
        let url = normalize_url(url)?;
        Ok(GitSource {
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

    /// Where a commit's checkout lives: `<home>/checkouts/<commit>`.
    pub fn checkout_dir(&self, commit: &str) -> PathBuf {
        self.home.join("checkouts").join(commit)
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
            url: self.url.clone(),
            reference: reference.to_string(),
            commit: hex.clone(),
            path: recipe.to_string(),
        };
        // A path through a symlinked directory is not in the tree; the file system check after
        // the checkout decides for those.
        let in_tree = tree.get_path(&rel).is_ok();
        let (dir, reused) = self.write_checkout(&repo, &tree, &hex)?;
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
            reused,
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
        let (dir, reused) = self.write_checkout(&repo, &tree, &hex)?;
        Ok(Checkout {
            recipe_path: dir.clone(),
            dir,
            commit: hex,
            reference: reference.to_string(),
            time: commit.time().seconds(),
            cloned,
            reused,
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
        list_files(&repo, &tree, "", &mut out).map_err(|e| self.git("walking a tree", e))?;
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
        let mut opts = FetchOptions::new();
        opts.prune(FetchPrune::On).download_tags(AutotagOption::All);
        remote
            .fetch(&REFSPECS, Some(&mut opts), None)
            .map_err(|e| SourceError::Unreachable {
                url: self.url.clone(),
                message: e.message().to_string(),
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
            url: self.url.clone(),
            reference: reference.to_string(),
            branches: ref_names(repo, "refs/heads/"),
            tags: ref_names(repo, "refs/tags/"),
        })
    }

    /// The checkout directory for `commit`, written now unless a complete one exists.
    fn write_checkout(
        &self,
        repo: &Repository,
        tree: &Tree<'_>,
        commit: &str,
    ) -> Result<(PathBuf, bool), SourceError> {
        let dir = self.checkout_dir(commit);
        if dir.is_dir() {
            return Ok((dir, true));
        }
        let parent = self.home.join("checkouts");
        fs::create_dir_all(&parent)
            .map_err(|e| io_err("creating the checkouts directory", &parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{commit}-"))
            .tempdir_in(&parent)
            .map_err(|e| io_err("creating a checkout directory in", &parent, e))?;
        write_tree(repo, tree, tmp.path(), "", commit, &self.url)?;
        let tmp_path = tmp.keep();
        if let Err(e) = fs::rename(&tmp_path, &dir) {
            let _ = fs::remove_dir_all(&tmp_path);
            if !dir.is_dir() {
                return Err(io_err("moving the checkout into place at", &dir, e));
            }
            return Ok((dir, true));
        }
        Ok((dir, false))
    }

    fn git(&self, what: &str, e: git2::Error) -> SourceError {
        SourceError::Git {
            url: self.url.clone(),
            what: what.to_string(),
            message: e.message().to_string(),
        }
    }
}

/// Fetch and check out `reference` of `url` under `$KILN_HOME` and locate `recipe` in it.
pub fn checkout(url: &str, reference: &str, recipe: &str) -> Result<Checkout, SourceError> {
    GitSource::new(url)?.checkout(reference, recipe)
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

/// Local paths become absolute (`file://` stays as given); unsupported schemes are refused.
fn normalize_url(url: &str) -> Result<String, SourceError> {
    if let Some((scheme, _)) = url.split_once("://") {
        return match scheme {
            "file" | "http" | "https" => Ok(url.to_string()),
            _ => Err(SourceError::UnsupportedScheme {
                url: url.to_string(),
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

/// Write `tree` into `dir`: directories, files (0644, or 0755 when git marks them executable),
/// symlinks; submodules become empty directories.
fn write_tree(
    repo: &Repository,
    tree: &Tree<'_>,
    dir: &Path,
    rel: &str,
    commit: &str,
    url: &str,
) -> Result<(), SourceError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let git = |what: &str, e: git2::Error| SourceError::Git {
        url: url.to_string(),
        what: what.to_string(),
        message: e.message().to_string(),
    };
    for entry in tree.iter() {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        if !safe_name(&name) || name == ".git" {
            return Err(SourceError::BadTreeEntry {
                commit: commit.to_string(),
                parent: rel.to_string(),
                name,
            });
        }
        let path = dir.join(&name);
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match entry.filemode() {
            MODE_TREE => {
                fs::create_dir(&path).map_err(|e| io_err("creating directory", &path, e))?;
                let sub = repo
                    .find_tree(entry.id())
                    .map_err(|e| git("reading a tree", e))?;
                write_tree(repo, &sub, &path, &child_rel, commit, url)?;
            }
            MODE_COMMIT => {
                fs::create_dir(&path).map_err(|e| io_err("creating directory", &path, e))?;
            }
            mode => {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(|e| git("reading a file", e))?;
                if mode == MODE_LINK {
                    let target = std::ffi::OsStr::from_bytes(blob.content());
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|e| io_err("creating symlink", &path, e))?;
                } else {
                    let mut f =
                        fs::File::create(&path).map_err(|e| io_err("creating file", &path, e))?;
                    f.write_all(blob.content())
                        .map_err(|e| io_err("writing file", &path, e))?;
                    let perm = if mode == MODE_EXEC { 0o755 } else { 0o644 };
                    f.set_permissions(fs::Permissions::from_mode(perm))
                        .map_err(|e| io_err("setting the mode of", &path, e))?;
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
    out: &mut Vec<String>,
) -> Result<(), git2::Error> {
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
                list_files(repo, &sub, &path, out)?;
            }
            Some(ObjectType::Blob) if entry.filemode() != MODE_LINK => out.push(path),
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
                .timeout(None)
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
            let response = request
                .send()
                .map_err(|e| io::Error::other(format!("{}: {e}", self.url)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(io::Error::other(format!(
                    "{} answered HTTP {status}",
                    self.url
                )));
            }
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with(self.expect) {
                return Err(io::Error::other(format!(
                    "{} answered {content_type:?}, not {}: not a git smart-HTTP server",
                    self.url, self.expect
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
                Some(r) => r.read(buf),
                None => Ok(0),
            }
        }
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
