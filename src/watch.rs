//! The watcher: turns a new commit on a watched ref into build triggers. Each poll fetches the
//! repository; when the ref moved, the new commit is checked out, every recipe matching the glob
//! (`recipes/*.yaml`) is loaded, and a recipe triggers when its inputs changed since the last
//! value seen. The last values live in a JSON state file (written atomically), so a restart does
//! not rebuild everything.
//!
//! What counts as a change: the recipe's `build.inputs` digest (its `extends:` chain, templates,
//! parameters, environment and SOURCE_DATE_EPOCH) computed *without* the commit id, because the
//! loader folds the commit id into `build.inputs` and a commit that touches only a README must not
//! rebuild anything. Exceptions, both deliberate: a recipe or template that mentions `git.commit`
//! depends on the commit, so it triggers on every commit; a recipe without `source_date_epoch`
//! takes the commit time as its epoch, so its inputs (and image) change with every commit.
//!
//! A recipe that fails to load yields a trigger with `error` set (and no inputs), so the caller
//! can report the build as `failed`; it triggers again only when its error changes.
//!
//! Delivery: [`Watcher::poll`] saves the state before returning the triggers (at most once);
//! [`Watcher::run`] hands every trigger to its callback first and saves after (at least once);
//! [`Watcher::deliver`] saves only when every delivery succeeded, so a failed one is retried with
//! the others at the next call (at least once; `kiln watch` and the HTTP API's git hook use it).

use crate::net::redact;
use crate::recipe::{self, Diagnostic, GitInfo};
use crate::source::{Checkout, GitMirror, SourceError, load_options_for};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What went wrong watching a repository.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("recipe glob {glob:?} is not valid: {message}; write e.g. recipes/*.yaml")]
    BadGlob { glob: String, message: String },
    #[error(
        "watch state file {path}: {message}; fix or delete it (deleting triggers every recipe once)"
    )]
    State { path: PathBuf, message: String },
}

/// A recipe to build (or to report as failed).
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The recipe's path in the repository, e.g. `recipes/minimal.yaml`.
    pub recipe_path: String,
    /// The recipe file in the checkout.
    pub file: PathBuf,
    /// The commit the recipe was read at (40 hex digits).
    pub commit: String,
    /// The watched ref.
    pub reference: String,
    /// The commit time (the SOURCE_DATE_EPOCH when the recipe sets none).
    pub time: i64,
    /// The recipe's `build.inputs` at this commit (as the build will compute it); empty on error.
    pub inputs: String,
    /// Why the recipe did not load, when it did not: the caller reports the build `failed`.
    pub error: Option<Diagnostic>,
    /// The checkout `file` is in: it stays on disk while the trigger (or a clone) lives.
    pub checkout: Checkout,
}

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchState {
    pub url: String,
    pub reference: String,
    /// The last commit processed.
    pub commit: Option<String>,
    /// Per recipe path: the change key last seen (`sha256:` inputs without the commit id, or
    /// `error:<digest>`).
    pub recipes: BTreeMap<String, String>,
}

/// Watches one ref of one repository.
#[derive(Debug)]
pub struct Watcher {
    source: GitMirror,
    reference: String,
    pattern: glob::Pattern,
    state_file: PathBuf,
    state: WatchState,
}

impl Watcher {
    /// Watch `reference` of `repo_url` (mirrored under `$KILN_HOME`) for recipes matching
    /// `recipes_glob`; remember what was seen in `state_file`.
    pub fn new(
        repo_url: &str,
        reference: &str,
        recipes_glob: &str,
        state_file: &Path,
    ) -> Result<Self, WatchError> {
        Self::with_source(
            GitMirror::new(repo_url)?,
            reference,
            recipes_glob,
            state_file,
        )
    }

    /// Like [`Watcher::new`] with an explicit source (e.g. another kiln home).
    pub fn with_source(
        source: GitMirror,
        reference: &str,
        recipes_glob: &str,
        state_file: &Path,
    ) -> Result<Self, WatchError> {
        let pattern = glob::Pattern::new(recipes_glob).map_err(|e| WatchError::BadGlob {
            glob: recipes_glob.to_string(),
            message: e.msg.to_string(),
        })?;
        let fresh = WatchState {
            url: source.url().to_string(),
            reference: reference.to_string(),
            ..WatchState::default()
        };
        let state = match std::fs::read(state_file) {
            Ok(bytes) => {
                let s: WatchState =
                    serde_json::from_slice(&bytes).map_err(|e| WatchError::State {
                        path: state_file.to_path_buf(),
                        message: format!("not valid watch state JSON: {e}"),
                    })?;
                // State for another repository or ref does not apply.
                if s.url == fresh.url && s.reference == fresh.reference {
                    s
                } else {
                    fresh
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(e) => {
                return Err(WatchError::State {
                    path: state_file.to_path_buf(),
                    message: format!("cannot read: {e}"),
                });
            }
        };
        Ok(Watcher {
            source,
            reference: reference.to_string(),
            pattern,
            state_file: state_file.to_path_buf(),
            state,
        })
    }

    /// The state as last saved or computed.
    pub fn state(&self) -> &WatchState {
        &self.state
    }

    /// Fetch; when the ref moved, return a trigger per recipe whose inputs changed (every recipe
    /// on the first poll) and save the state.
    pub fn poll(&mut self) -> Result<Vec<Trigger>, WatchError> {
        let Some((triggers, state)) = self.scan()? else {
            return Ok(Vec::new());
        };
        self.save(state)?;
        Ok(triggers)
    }

    /// The repository's normalized URL.
    pub fn url(&self) -> &str {
        self.source.url()
    }

    /// Fetch; when `at` (a commit id or ref; `None` = the watched ref's head) differs from the
    /// last commit processed, hand each trigger to `deliver` and save the state only when every
    /// delivery succeeded, so a failed delivery is retried at the next call (at least once).
    /// Returns the triggers delivered (none when nothing moved). A webhook passes the pushed
    /// commit, so the recipes are read at exactly that commit even if the ref moved since.
    pub fn deliver<E: From<WatchError>>(
        &mut self,
        at: Option<&str>,
        mut deliver: impl FnMut(&Trigger) -> Result<(), E>,
    ) -> Result<Vec<Trigger>, E> {
        let head = self.reference.clone();
        let Some((triggers, state)) = self.scan_at(at.unwrap_or(&head))? else {
            return Ok(Vec::new());
        };
        for t in &triggers {
            deliver(t)?;
        }
        self.save(state)?;
        Ok(triggers)
    }

    /// Record the recipes at `at` (a commit id or ref) as seen without triggering anything: the
    /// starting point when only later changes should build (a webhook's first push compares
    /// with the commit before it; `kiln watch --baseline`).
    pub fn baseline(&mut self, at: &str) -> Result<(), WatchError> {
        if let Some((_, state)) = self.scan_at(at)? {
            self.save(state)?;
        }
        Ok(())
    }

    /// The first parent of the commit `at` resolves to (`None` for a root commit).
    pub fn parent_of(&self, at: &str) -> Result<Option<String>, WatchError> {
        Ok(self.source.first_parent(at)?)
    }

    /// Poll every `interval` until `stop()` is true, handing each trigger to `on_trigger` before
    /// the state is saved. A poll that fails (repository unreachable, say) is logged and retried
    /// at the next interval.
    pub fn run(
        &mut self,
        interval: Duration,
        mut on_trigger: impl FnMut(&Trigger),
        stop: impl Fn() -> bool,
    ) {
        while !stop() {
            let started = Instant::now();
            match self.scan() {
                Ok(Some((triggers, state))) => {
                    for t in &triggers {
                        on_trigger(t);
                    }
                    if let Err(e) = self.save(state) {
                        tracing::warn!(
                            "watch {}: {}",
                            redact(self.source.url()),
                            crate::error::Chain(&e)
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    "watch {}: {}",
                    redact(self.source.url()),
                    crate::error::Chain(&e)
                ),
            }
            while !stop() && started.elapsed() < interval {
                let left = interval.saturating_sub(started.elapsed());
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
        }
    }

    /// The triggers and the new state, or None when the ref did not move.
    fn scan(&self) -> Result<Option<(Vec<Trigger>, WatchState)>, WatchError> {
        self.scan_at(&self.reference)
    }

    /// Like [`Watcher::scan`] at `at` (a commit id or ref) instead of the watched ref.
    fn scan_at(&self, at: &str) -> Result<Option<(Vec<Trigger>, WatchState)>, WatchError> {
        let (commit, _) = self.source.resolve(at)?;
        if self.state.commit.as_deref() == Some(commit.as_str()) {
            return Ok(None);
        }
        let checkout = self.source.checkout_tree(&commit)?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let recipes: Vec<String> = self
            .source
            .files_at(&checkout.commit)?
            .into_iter()
            .filter(|p| self.pattern.matches_with(p, options))
            .collect();
        let mut state = WatchState {
            url: self.state.url.clone(),
            reference: self.reference.clone(),
            commit: Some(commit),
            recipes: BTreeMap::new(),
        };
        let mut triggers = Vec::new();
        for path in recipes {
            let (trigger, key) = self.examine(&checkout, &path);
            if self.state.recipes.get(&path) != Some(&key) {
                triggers.push(trigger);
            }
            state.recipes.insert(path, key);
        }
        Ok(Some((triggers, state)))
    }

    /// Load one recipe: its trigger and its change key.
    fn examine(&self, checkout: &Checkout, path: &str) -> (Trigger, String) {
        let file = checkout.dir.join(path);
        let at = Checkout {
            recipe_path: file.clone(),
            reference: self.reference.clone(),
            ..checkout.clone()
        };
        let opts = load_options_for(&at, Vec::new());
        let mut trigger = Trigger {
            recipe_path: path.to_string(),
            file: file.clone(),
            commit: checkout.commit.clone(),
            reference: self.reference.clone(),
            time: checkout.time,
            inputs: String::new(),
            error: None,
            checkout: at,
        };
        let loaded = match recipe::load(&file, &opts) {
            Ok(l) => l,
            Err(d) => {
                // Key on the message without the checkout's location, which changes per commit.
                let text = d.to_string().replace(&*checkout.dir.to_string_lossy(), "");
                let key = format!("error:{}", crate::digest::Digest256::of(text.as_bytes()));
                trigger.error = Some(d);
                return (trigger, key);
            }
        };
        trigger.inputs = loaded.inputs.clone();
        if mentions_commit(&loaded.sources) {
            return (trigger, loaded.inputs);
        }
        // The same load without the commit id: the key a README-only commit does not change.
        let mut blank = opts;
        blank.git = GitInfo {
            commit: String::new(),
            ..blank.git
        };
        let key = match recipe::load(&file, &blank) {
            Ok(l) => l.inputs,
            Err(_) => loaded.inputs,
        };
        (trigger, key)
    }

    fn save(&mut self, state: WatchState) -> Result<(), WatchError> {
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| WatchError::State {
            path: self.state_file.clone(),
            message: format!("cannot encode: {e}"),
        })?;
        crate::home::write_atomic(&self.state_file, &bytes).map_err(|e| WatchError::State {
            path: self.state_file.clone(),
            message: format!("cannot write: {e}"),
        })?;
        self.state = state;
        Ok(())
    }
}

/// Whether any file the recipe read uses the commit id.
fn mentions_commit(sources: &[PathBuf]) -> bool {
    sources.iter().any(|p| {
        std::fs::read_to_string(p).is_ok_and(|t| {
            t.contains("git.commit") || t.contains("git[\"commit\"]") || t.contains("git['commit']")
        })
    })
}

impl Trigger {
    /// The build request for this trigger: the recipe at the trigger's commit id, not at the ref,
    /// which may have moved on by the time the build starts. A trigger whose recipe did not load
    /// is requested too: its render stage publishes the `failed` message with file:line:column.
    pub fn build_request(
        &self,
        url: &str,
        requester: impl Into<String>,
    ) -> crate::bus::BuildRequest {
        crate::bus::BuildRequest::new(
            crate::bus::RecipeSource::Git {
                git: crate::bus::GitSource {
                    url: url.to_string(),
                    git_ref: self.commit.clone(),
                    path: self.recipe_path.clone(),
                },
            },
            requester,
        )
    }
}

/// The state file for watching `reference` of `url` (normalized) for `recipes_glob`, in `dir`:
/// `<dir>/<sha256 of the three>.json`, so each combination keeps its own state.
pub fn state_file_for(dir: &Path, url: &str, reference: &str, recipes_glob: &str) -> PathBuf {
    let key = format!("{url}\n{reference}\n{recipes_glob}");
    dir.join(format!(
        "{}.json",
        crate::digest::Digest256::of(key.as_bytes()).hex()
    ))
}
