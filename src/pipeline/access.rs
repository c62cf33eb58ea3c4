//! What build requests may reach on a worker: operator configuration (`kiln up`/`kiln worker`
//! flags), never request or recipe input. A request names a recipe by path (only under the
//! recipe roots), by git URL (only allow-listed repositories) or inline; a recipe reads only the
//! environment variables on the allow-list, and never kiln's own credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variables no allow-list can open to recipes: kiln's own settings and
/// credentials (`KILN_*`: API token, NATS and registry credentials, key paths), the NATS
/// client's, and anything that names itself a secret.
pub fn is_forbidden_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("KILN_")
        || upper.starts_with("NATS_")
        || [
            "TOKEN",
            "SECRET",
            "PASSWORD",
            "PASSWD",
            "CREDENTIAL",
            "CREDS",
            "PRIVATE",
        ]
        .iter()
        .any(|w| upper.contains(w))
}

/// Why a request may not reach what it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(
        "{what} {path} is outside this worker's recipe roots ({roots}); refused without reading it"
    )]
    OutsideRoots {
        what: &'static str,
        path: String,
        roots: String,
    },
    #[error("{what} {path} does not exist (under the recipe root {root})")]
    NotFound {
        what: &'static str,
        path: String,
        root: String,
    },
    #[error("this worker reads no recipe files (it has no recipe roots); refused {what} {path}")]
    NoRoots { what: &'static str, path: String },
    #[error("git repository {url} is not on this worker's allow-list ({allowed})")]
    GitNotAllowed { url: String, allowed: String },
    #[error(
        "environment variable {name} cannot be opened to recipes: kiln's own settings and \
         credentials (KILN_*, NATS_*) and names that say TOKEN, SECRET, PASSWORD, CREDS or \
         PRIVATE never are"
    )]
    ForbiddenEnv { name: String },
}

impl AccessError {
    /// What the operator or submitter can do about it.
    pub fn help(&self) -> &'static str {
        match self {
            AccessError::OutsideRoots { .. } | AccessError::NoRoots { .. } => {
                "send the recipe inline or from git, or start the worker with --recipes DIR \
                 for a directory of recipes it may read"
            }
            AccessError::NotFound { .. } => {
                "check the path: a relative one is taken relative to the project (kiln build) or \
                 to each recipe root (kiln up, kiln worker)"
            }
            AccessError::GitNotAllowed { .. } => {
                "start the worker with --allow-git URL for each repository it may build"
            }
            AccessError::ForbiddenEnv { .. } => {
                "pass the value as a recipe parameter (--set) instead of an environment variable"
            }
        }
    }
}

/// `path` with `.` and `..` taken out by name alone (no links followed): where it claims to be.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What requests may reach on this worker.
#[derive(Debug, Clone, Default)]
pub struct RecipeAccess {
    /// Directories under which path recipes and templates directories may lie (canonical).
    /// None: path recipes are refused.
    roots: Vec<PathBuf>,
    /// Repositories git recipes may come from, in canonical form. None: git recipes are refused.
    git: Vec<String>,
    /// Environment variables recipes may read.
    env: Vec<String>,
}

impl RecipeAccess {
    /// Access for these recipe roots (directories that do not exist are an error), git
    /// repositories and environment variables.
    pub fn new(
        roots: &[PathBuf],
        git: &[String],
        env: &[String],
        home: &Path,
    ) -> Result<RecipeAccess, String> {
        let mut out = RecipeAccess::default();
        for r in roots {
            let c = r
                .canonicalize()
                .map_err(|e| format!("recipe root {}: {e}", r.display()))?;
            if !c.is_dir() {
                return Err(format!("recipe root {} is not a directory", r.display()));
            }
            out.roots.push(c);
        }
        for url in git {
            out.git.push(
                crate::source::canonical_repo_url(url, home)
                    .ok_or_else(|| format!("--allow-git {url}: not a repository URL or path"))?,
            );
        }
        for name in env {
            if is_forbidden_env(name) {
                return Err(AccessError::ForbiddenEnv { name: name.clone() }.to_string());
            }
            out.env.push(name.clone());
        }
        Ok(out)
    }

    /// The canonical form of `path` (a recipe file or templates directory) when it lies under a
    /// recipe root; a relative path is taken relative to each root in turn. `what` names it in
    /// the error. Symbolic links and `..` are resolved first, so a link inside a root that points
    /// outside is refused.
    pub fn check_path(&self, what: &'static str, path: &Path) -> Result<PathBuf, AccessError> {
        let shown = crate::net::redact(&path.display().to_string()).into_owned();
        if self.roots.is_empty() {
            return Err(AccessError::NoRoots { what, path: shown });
        }
        let outside = || AccessError::OutsideRoots {
            what,
            path: shown.clone(),
            roots: self.roots_text(),
        };
        // A path that names a place inside a root (before links are followed) but is not there
        // is said to be missing; anything else that does not resolve is outside, so that the
        // error says nothing about files outside the roots.
        let missing = |candidate: &Path, e: std::io::Error| {
            let lexical = lexical(candidate);
            match self.roots.iter().find(|r| lexical.starts_with(r)) {
                Some(root) if e.kind() == std::io::ErrorKind::NotFound => AccessError::NotFound {
                    what,
                    path: shown.clone(),
                    root: root.display().to_string(),
                },
                _ => outside(),
            }
        };
        if !path.is_absolute() {
            let mut first_missing = None;
            for r in &self.roots {
                match r.join(path).canonicalize() {
                    Ok(real) if real.starts_with(r) => return Ok(real),
                    Ok(_) => {}
                    Err(e) => {
                        let err = missing(&r.join(path), e);
                        if first_missing.is_none() && matches!(err, AccessError::NotFound { .. }) {
                            first_missing = Some(err);
                        }
                    }
                }
            }
            return Err(first_missing.unwrap_or_else(outside));
        }
        let real = path.canonicalize().map_err(|e| missing(path, e))?;
        if self.roots.iter().any(|r| real.starts_with(r)) {
            Ok(real)
        } else {
            Err(outside())
        }
    }

    /// Whether git recipes may come from `url`.
    pub fn check_git(&self, url: &str, home: &Path) -> Result<(), AccessError> {
        let wanted = crate::source::canonical_repo_url(url, home);
        if wanted.is_some() && self.git.iter().any(|g| Some(g) == wanted.as_ref()) {
            return Ok(());
        }
        let allowed = if self.git.is_empty() {
            "none: start the worker with --allow-git URL".to_string()
        } else {
            self.git.join(", ")
        };
        Err(AccessError::GitNotAllowed {
            url: crate::net::redact(url).into_owned(),
            allowed,
        })
    }

    /// The values of the allowed environment variables that are set in this process: what
    /// recipes see as `env`. A declared variable that is not here reads as its default.
    pub fn env_values(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|n| std::env::var(n).ok().map(|v| (n.clone(), v)))
            .collect()
    }

    fn roots_text(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_can_never_be_opened() {
        for name in [
            "KILN_API_TOKEN",
            "KILN_NATS_PASSWORD",
            "kiln_home",
            "NATS_URL",
            "GITHUB_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "DB_PASSWORD",
            "REGISTRY_CREDS",
            "SSH_PRIVATE_KEY",
        ] {
            assert!(is_forbidden_env(name), "{name}");
        }
        for name in ["HOSTNAME_SUFFIX", "CI_PIPELINE_ID", "LANG"] {
            assert!(!is_forbidden_env(name), "{name}");
        }
        let home = tempfile::tempdir().unwrap();
        assert!(RecipeAccess::new(&[], &[], &["KILN_API_TOKEN".into()], home.path()).is_err());
    }

    #[test]
    fn paths_resolve_only_under_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("recipes");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("ok.yaml"), "name: ok\n").unwrap();
        std::fs::write(dir.path().join("secret.yaml"), "hunter2\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.yaml"), root.join("link.yaml")).unwrap();
        let access = RecipeAccess::new(std::slice::from_ref(&root), &[], &[], dir.path()).unwrap();
        assert!(access.check_path("recipe", &root.join("ok.yaml")).is_ok());
        assert_eq!(
            access.check_path("recipe", Path::new("ok.yaml")).unwrap(),
            root.canonicalize().unwrap().join("ok.yaml")
        );
        for bad in [
            dir.path().join("secret.yaml"),
            root.join("../secret.yaml"),
            root.join("link.yaml"),
            PathBuf::from("../secret.yaml"),
            PathBuf::from("/etc/passwd"),
        ] {
            let e = access.check_path("recipe", &bad).unwrap_err().to_string();
            assert!(e.contains("outside this worker's recipe roots"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        // A missing file inside a root is said to be missing; outside, it is only outside.
        for missing in [
            root.join("nope.yaml"),
            root.join("sub/../nope.yaml"),
            PathBuf::from("nope.yaml"),
            // Relative to the root, not to the current directory.
            PathBuf::from("recipes/ok.yaml"),
        ] {
            let e = access.check_path("recipe", &missing).unwrap_err();
            assert!(matches!(e, AccessError::NotFound { .. }), "{e}");
            assert!(e.to_string().contains("does not exist"), "{e}");
        }
        for outside in [
            dir.path().join("nope.yaml"),
            root.join("../nope.yaml"),
            PathBuf::from("../nope.yaml"),
        ] {
            let e = access.check_path("recipe", &outside).unwrap_err();
            assert!(matches!(e, AccessError::OutsideRoots { .. }), "{e}");
        }
        let none = RecipeAccess::default();
        let e = none
            .check_path("recipe", &root.join("ok.yaml"))
            .unwrap_err();
        assert!(matches!(e, AccessError::NoRoots { .. }), "{e}");
    }

    #[test]
    fn git_urls_must_be_allowed() {
        let home = tempfile::tempdir().unwrap();
        let access = RecipeAccess::new(
            &[],
            &["https://git.example/team/recipes.git".into()],
            &[],
            home.path(),
        )
        .unwrap();
        assert!(
            access
                .check_git("https://git.example/team/recipes", home.path())
                .is_ok()
        );
        let e = access
            .check_git("https://user:pw@evil.example/x", home.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not on this worker's allow-list"), "{e}");
        assert!(!e.contains("pw@"), "{e}");
    }
}
