//! Dependency resolution over an [`Index`]: requested packages → the closure over `Pre-Depends`
//! and `Depends`, taking for each `a | b` group the first alternative that some package satisfies
//! (a package already chosen wins over a new one), version constraints, virtual packages through
//! `Provides` (versioned provides honoured), and `:any` / `:native` / `:<arch>` qualifiers.
//!
//! The resolver is greedy and deterministic: the highest version of a real package wins, then
//! providers sorted by priority and name. It does not backtrack and ignores `Conflicts`/`Breaks`
//! (Debian's archive is consistent for the packages kiln installs). The result is sorted by name.

use super::index::{Index, Op, Relation};
use super::version::Version;
use std::collections::{BTreeMap, VecDeque};

/// Whether to follow dependencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deps {
    /// Only the named packages (a kernel or busybox-static used standalone).
    None,
    /// The named packages and everything they (pre-)depend on.
    All,
}

/// Why a set of packages cannot be resolved. `scope` names the archive, e.g.
/// `Debian bookworm (main, amd64)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("package `{name}` is not in {scope}{}", did_you_mean(suggestion))]
    Unknown {
        name: String,
        scope: String,
        suggestion: Option<String>,
    },
    #[error(
        "package `{name}` has no version {wanted} in {scope} (available: {available}); \
         ask for one of those"
    )]
    NoSuchVersion {
        name: String,
        wanted: String,
        scope: String,
        available: String,
    },
    #[error(
        "cannot satisfy `{relation}` needed by {chain} in {scope}: {reason}; \
         ask for a package that provides it, or use another suite"
    )]
    Unsatisfiable {
        /// `a -> b -> c`: who pulled in the package whose dependency fails.
        chain: String,
        relation: String,
        reason: String,
        scope: String,
    },
    #[error("package `{name}` in {scope} has a malformed dependency field: {reason}")]
    BadField {
        name: String,
        scope: String,
        reason: String,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => "; check the name (`apt-cache search` on a Debian host) or the suite".into(),
    }
}

/// Resolve `requests` (package names, optionally `name=version`) against `index` for
/// architecture `arch`. Returns index ids sorted by package name.
pub fn resolve(
    index: &Index,
    requests: &[&str],
    deps: Deps,
    arch: &str,
    scope: &str,
) -> Result<Vec<usize>, ResolveError> {
    let mut r = Resolver {
        index,
        arch,
        scope,
        selected: BTreeMap::new(),
        parent: BTreeMap::new(),
    };
    let mut queue = VecDeque::new();
    for request in requests {
        let id = r.request(request.trim())?;
        if r.select(id, None) {
            queue.push_back(id);
        }
    }
    if deps == Deps::All {
        r.close(queue, true)?;
    }
    Ok(r.selected.into_values().collect())
}

#[derive(Clone)]
struct Resolver<'a> {
    index: &'a Index,
    arch: &'a str,
    scope: &'a str,
    /// Package name → chosen id.
    selected: BTreeMap<String, usize>,
    /// Package name → the package that pulled it in.
    parent: BTreeMap<String, String>,
}

impl Resolver<'_> {
    /// Follow the dependencies of everything in `queue`. For a group of alternatives that nothing
    /// chosen satisfies, take the first alternative whose own closure resolves (checked on a
    /// copy of the state when `trials` is on; nested checks are greedy), else the first one that
    /// exists at all.
    fn close(&mut self, mut queue: VecDeque<usize>, trials: bool) -> Result<(), ResolveError> {
        while let Some(id) = queue.pop_front() {
            let entry = self.index.get(id);
            let groups = entry
                .dependencies()
                .map_err(|reason| ResolveError::BadField {
                    name: entry.name().to_string(),
                    scope: self.scope.to_string(),
                    reason,
                })?;
            for group in groups {
                if group.iter().any(|rel| self.satisfied_by_selected(rel)) {
                    continue;
                }
                // A package whose name is already chosen (in another version) cannot be added.
                let viable: Vec<usize> = group
                    .iter()
                    .filter_map(|rel| self.candidate(rel))
                    .filter(|&c| !self.selected.contains_key(self.index.get(c).name()))
                    .collect();
                let Some(&first) = viable.first() else {
                    return Err(self.unsatisfiable(id, &group));
                };
                let mut chosen = first;
                if trials && viable.len() > 1 {
                    for &cand in &viable {
                        let mut trial = self.clone();
                        if !trial.select(cand, Some(id))
                            || trial.close(VecDeque::from([cand]), false).is_ok()
                        {
                            chosen = cand;
                            break;
                        }
                    }
                }
                if self.select(chosen, Some(id)) {
                    queue.push_back(chosen);
                }
            }
        }
        Ok(())
    }

    /// Record a choice; false if that package name was already chosen.
    fn select(&mut self, id: usize, parent: Option<usize>) -> bool {
        let name = self.index.get(id).name();
        if self.selected.contains_key(name) {
            return false;
        }
        self.selected.insert(name.to_string(), id);
        if let Some(p) = parent {
            self.parent
                .insert(name.to_string(), self.index.get(p).name().to_string());
        }
        true
    }

    /// The package for a top-level request.
    fn request(&self, request: &str) -> Result<usize, ResolveError> {
        let (name, wanted) = match request.split_once('=') {
            Some((n, v)) => (n.trim(), Some(Version::new(v))),
            None => (request, None),
        };
        let (name, arch) = match name.split_once(':') {
            Some((n, a)) => (n, Some(a.to_string())),
            None => (name, None),
        };
        let rel = Relation {
            name: name.to_string(),
            arch,
            constraint: wanted.clone().map(|v| (Op::Eq, v)),
        };
        if let Some(id) = self.candidate(&rel) {
            return Ok(id);
        }
        let versions: Vec<String> = self
            .index
            .versions_of(name)
            .map(|(_, e)| e.version_str().to_string())
            .collect();
        match wanted {
            Some(v) if !versions.is_empty() => Err(ResolveError::NoSuchVersion {
                name: name.to_string(),
                wanted: v.to_string(),
                scope: self.scope.to_string(),
                available: versions.join(", "),
            }),
            _ => Err(ResolveError::Unknown {
                name: request.to_string(),
                scope: self.scope.to_string(),
                suggestion: suggest(self.index, name),
            }),
        }
    }

    /// Whether an architecture qualifier can be met by this (single-architecture) index.
    fn arch_ok(&self, rel: &Relation) -> bool {
        match rel.arch.as_deref() {
            None | Some("any") | Some("native") | Some("all") => true,
            Some(a) => a == self.arch,
        }
    }

    fn version_ok(rel: &Relation, have: &Version) -> bool {
        match &rel.constraint {
            None => true,
            Some((op, want)) => op.holds(have, want),
        }
    }

    /// A provide satisfies an unversioned relation always, a versioned one only when it is
    /// versioned itself and the version matches.
    fn provide_ok(rel: &Relation, provided: &Option<Version>) -> bool {
        match (&rel.constraint, provided) {
            (None, _) => true,
            (Some((op, want)), Some(have)) => op.holds(have, want),
            (Some(_), None) => false,
        }
    }

    fn satisfied_by_selected(&self, rel: &Relation) -> bool {
        if !self.arch_ok(rel) {
            return false;
        }
        if let Some(&id) = self.selected.get(&rel.name)
            && Self::version_ok(rel, &self.index.get(id).version())
        {
            return true;
        }
        self.index
            .providers_of(&rel.name)
            .iter()
            .any(|(id, provided)| {
                self.selected.get(self.index.get(*id).name()) == Some(id)
                    && Self::provide_ok(rel, provided)
            })
    }

    /// The best package for a relation: the highest satisfying version of the real package, else
    /// a provider (an already chosen one first, then by priority and name).
    fn candidate(&self, rel: &Relation) -> Option<usize> {
        if !self.arch_ok(rel) {
            return None;
        }
        let real = self
            .index
            .versions_of(&rel.name)
            .filter(|(_, e)| Self::version_ok(rel, &e.version()))
            .max_by(|(ia, a), (ib, b)| a.version().cmp(&b.version()).then(ib.cmp(ia)))
            .map(|(id, _)| id);
        if real.is_some() {
            return real;
        }
        let providers = self
            .index
            .providers_of(&rel.name)
            .iter()
            .filter(|(_, provided)| Self::provide_ok(rel, provided))
            .map(|(id, _)| *id);
        if let Some(chosen) = providers
            .clone()
            .find(|id| self.selected.get(self.index.get(*id).name()) == Some(id))
        {
            return Some(chosen);
        }
        providers.min_by(|&a, &b| {
            let (ea, eb) = (self.index.get(a), self.index.get(b));
            priority_rank(ea.priority())
                .cmp(&priority_rank(eb.priority()))
                .then_with(|| ea.name().cmp(eb.name()))
                .then_with(|| eb.version().cmp(&ea.version()))
                .then(a.cmp(&b))
        })
    }

    fn chain(&self, id: usize) -> String {
        let mut names = vec![self.index.get(id).name().to_string()];
        while let Some(p) = self
            .parent
            .get(names.last().map(String::as_str).unwrap_or(""))
        {
            if names.contains(p) {
                break;
            }
            names.push(p.clone());
        }
        names.reverse();
        names.join(" -> ")
    }

    fn unsatisfiable(&self, id: usize, group: &[Relation]) -> ResolveError {
        let mut reasons = Vec::new();
        for rel in group {
            if !self.arch_ok(rel) {
                reasons.push(format!(
                    "`{rel}` asks for architecture {}, but only {} is indexed",
                    rel.arch.as_deref().unwrap_or(""),
                    self.arch
                ));
                continue;
            }
            if let Some(&chosen) = self.selected.get(&rel.name) {
                let e = self.index.get(chosen);
                reasons.push(format!(
                    "{} {} is already chosen",
                    e.name(),
                    e.version_str()
                ));
                continue;
            }
            let mut available: Vec<String> = self
                .index
                .versions_of(&rel.name)
                .map(|(_, e)| format!("{} {}", e.name(), e.version_str()))
                .collect();
            available.extend(self.index.providers_of(&rel.name).iter().map(|(p, v)| {
                let e = self.index.get(*p);
                match v {
                    Some(v) => {
                        format!("{} {} provides {} {v}", e.name(), e.version_str(), rel.name)
                    }
                    None => format!(
                        "{} {} provides {} (unversioned)",
                        e.name(),
                        e.version_str(),
                        rel.name
                    ),
                }
            }));
            if available.is_empty() {
                reasons.push(format!("`{}` is not in the archive", rel.name));
            } else {
                reasons.push(format!("only {} available", available.join(", ")));
            }
        }
        let relation = group
            .iter()
            .map(Relation::to_string)
            .collect::<Vec<_>>()
            .join(" | ");
        ResolveError::Unsatisfiable {
            chain: self.chain(id),
            relation,
            reason: reasons.join("; "),
            scope: self.scope.to_string(),
        }
    }
}

fn priority_rank(priority: Option<&str>) -> u8 {
    match priority {
        Some("required") => 0,
        Some("important") => 1,
        Some("standard") => 2,
        Some("optional") => 3,
        Some("extra") => 4,
        _ => 5,
    }
}

/// The closest package name, if one is close enough to be a likely typo.
pub fn suggest(index: &Index, name: &str) -> Option<String> {
    let limit = (name.chars().count() / 3).clamp(1, 3);
    index
        .names()
        .map(|n| (strsim::levenshtein(name, n), n))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, n)| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{extra}\
             Filename: pool/{name}_{version}.deb\nSize: 1\nSHA256: {}\n\n",
            "0".repeat(64)
        )
    }

    fn index() -> Index {
        let mut t = String::new();
        t += &pkg(
            "app",
            "1.0",
            "Depends: libfoo (>= 2.0), mail-transport-agent\n",
        );
        t += &pkg("libfoo", "1.5", "");
        t += &pkg("libfoo", "2.1", "Pre-Depends: libc6 (>= 2.36)\n");
        t += &pkg("libc6", "2.36-9", "");
        t += &pkg(
            "exim",
            "4.96",
            "Provides: mail-transport-agent\nPriority: standard\n",
        );
        t += &pkg(
            "alpha-mta",
            "1",
            "Provides: mail-transport-agent\nPriority: extra\n",
        );
        t += &pkg(
            "tool",
            "1",
            "Depends: nothere | libfoo:any (>= 2), python3:native\n",
        );
        t += &pkg("python3", "3.11", "");
        t += &pkg("top", "1", "Depends: middle\n");
        t += &pkg("middle", "1", "Depends: bottom\n");
        t += &pkg("bottom", "1", "Depends: libc6 (>= 3.0) | libmissing\n");
        t += &pkg("vneed", "1", "Depends: awk (>= 1.2)\n");
        t += &pkg("gawk", "5", "Provides: awk (= 1.3)\n");
        t += &pkg("mawk", "1", "Provides: awk\n");
        t += &pkg("foreign", "1", "Depends: libc6:arm64\n");
        t += &pkg("picky", "1", "Depends: broken | fine\n");
        t += &pkg("broken", "1", "Depends: libgone\n");
        t += &pkg("fine", "1", "");
        Index::parse(&t).unwrap()
    }

    fn names(index: &Index, ids: &[usize]) -> Vec<String> {
        ids.iter()
            .map(|&i| format!("{}={}", index.get(i).name(), index.get(i).version_str()))
            .collect()
    }

    const SCOPE: &str = "Debian test (main, amd64)";

    #[test]
    fn closure_versions_and_virtuals() {
        let ix = index();
        let got = resolve(&ix, &["app"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(
            names(&ix, &got),
            ["app=1.0", "exim=4.96", "libc6=2.36-9", "libfoo=2.1"]
        );
        let got = resolve(&ix, &["app"], Deps::None, "amd64", SCOPE).unwrap();
        assert_eq!(names(&ix, &got), ["app=1.0"]);
        // An already chosen provider wins over the priority order.
        let got = resolve(&ix, &["alpha-mta", "app"], Deps::All, "amd64", SCOPE).unwrap();
        assert!(names(&ix, &got).contains(&"alpha-mta=1".to_string()));
        assert!(!names(&ix, &got).contains(&"exim=4.96".to_string()));
        // Alternatives, :any and :native.
        let got = resolve(&ix, &["tool"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(
            names(&ix, &got),
            ["libc6=2.36-9", "libfoo=2.1", "python3=3.11", "tool=1"]
        );
        // A versioned dependency on a virtual package needs a versioned provide.
        let got = resolve(&ix, &["vneed"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(names(&ix, &got), ["gawk=5", "vneed=1"]);
        // Pinned version.
        let got = resolve(&ix, &["libfoo=1.5"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(names(&ix, &got), ["libfoo=1.5"]);
        // Deterministic regardless of request order.
        let a = resolve(&ix, &["tool", "app"], Deps::All, "amd64", SCOPE).unwrap();
        let b = resolve(&ix, &["app", "tool"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn first_satisfiable_alternative_wins() {
        let ix = index();
        let got = resolve(&ix, &["picky"], Deps::All, "amd64", SCOPE).unwrap();
        assert_eq!(names(&ix, &got), ["fine=1", "picky=1"]);
    }

    #[test]
    fn unsatisfiable_prints_chain_and_constraint() {
        let ix = index();
        let err = resolve(&ix, &["top"], Deps::All, "amd64", SCOPE).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`libc6 (>= 3.0) | libmissing` needed by top -> middle -> bottom"),
            "{msg}"
        );
        assert!(msg.contains("only libc6 2.36-9 available"), "{msg}");
        assert!(msg.contains("`libmissing` is not in the archive"), "{msg}");
        let err = resolve(&ix, &["foreign"], Deps::All, "amd64", SCOPE).unwrap_err();
        assert!(err.to_string().contains("architecture arm64"), "{err}");
        // A version chosen earlier that does not fit a later constraint.
        let err = resolve(&ix, &["libfoo=1.5", "app"], Deps::All, "amd64", SCOPE).unwrap_err();
        assert!(
            err.to_string().contains("libfoo 1.5 is already chosen"),
            "{err}"
        );
        // Without dependencies the broken chain does not matter.
        assert!(resolve(&ix, &["top"], Deps::None, "amd64", SCOPE).is_ok());
    }

    #[test]
    fn unknown_names_suggest() {
        let ix = index();
        let err = resolve(&ix, &["libfo"], Deps::All, "amd64", SCOPE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "package `libfo` is not in Debian test (main, amd64); did you mean `libfoo`?"
        );
        let err = resolve(&ix, &["zzzzzzzzzz"], Deps::All, "amd64", SCOPE).unwrap_err();
        assert!(err.to_string().contains("is not in Debian test"), "{err}");
        assert!(!err.to_string().contains("did you mean"), "{err}");
        let err = resolve(&ix, &["libfoo=9"], Deps::All, "amd64", SCOPE).unwrap_err();
        assert!(err.to_string().contains("available: 1.5, 2.1"), "{err}");
    }
}
