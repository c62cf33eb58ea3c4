//! Image references: `host[:port]/path/name[:tag][@sha256:<hex>]` for a registry and
//! `oci:/path/to/dir[:tag]` for an OCI image layout directory. Parsing only, no I/O.

use crate::digest::Digest256;

/// Where an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A registry speaking the distribution API v2.
    Registry {
        /// `host` or `host:port`, as written.
        host: String,
        /// Repository path, e.g. `kiln/debian-minimal`.
        repository: String,
    },
    /// An OCI image layout directory.
    Layout { dir: std::path::PathBuf },
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub location: Location,
    /// Tag, if one was written (`latest` is assumed when neither tag nor digest is given).
    pub tag: Option<String>,
    pub digest: Option<Digest256>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad image reference {text:?}: {reason} (expected host[:port]/repo[:tag][@sha256:<hex>] or oci:/dir[:tag])"
)]
pub struct ReferenceError {
    pub text: String,
    pub reason: String,
}

fn bad(text: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        text: text.to_string(),
        reason: reason.into(),
    }
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A repository path component: lowercase alphanumerics separated by `.`, `_`, `__`, `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

impl Reference {
    /// Parse a reference. A registry reference must name its host (a first component with a `.`
    /// or `:`, or `localhost`): kiln has no default registry.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        if let Some(rest) = text.strip_prefix("oci:") {
            // A digest ends it (`@sha256:…`, as `with_digest` writes), when what follows the
            // last '@' is one: a directory may hold '@' itself.
            let (rest, digest) = match rest.rsplit_once('@') {
                Some((n, d)) if Digest256::parse(d).is_some() => (n, Digest256::parse(d)),
                _ => (rest, None),
            };
            // The tag is after the last ':' if that ':' comes after the last '/'.
            let (dir, tag) = match rest.rfind(':') {
                Some(i) if i > rest.rfind('/').map_or(0, |s| s) => {
                    (&rest[..i], Some(rest[i + 1..].to_string()))
                }
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad(text, "no directory after oci:"));
            }
            if let Some(t) = &tag
                && !valid_tag(t)
            {
                return Err(bad(text, format!("invalid tag {t:?}")));
            }
            return Ok(Reference {
                location: Location::Layout { dir: dir.into() },
                tag,
                digest,
            });
        }
        let (name_tag, digest) = match text.split_once('@') {
            Some((n, d)) => {
                let d = Digest256::parse(d)
                    .ok_or_else(|| bad(text, format!("{d:?} is not sha256:<64 lowercase hex>")))?;
                (n, Some(d))
            }
            None => (text, None),
        };
        let (host, path) = name_tag
            .split_once('/')
            .ok_or_else(|| bad(text, "no repository after the registry host"))?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(bad(
                text,
                format!("{host:?} does not look like a registry host; write host:port/repo"),
            ));
        }
        let (repository, tag) = match path.rfind(':') {
            Some(i) if i > path.rfind('/').map_or(0, |s| s) => {
                (&path[..i], Some(path[i + 1..].to_string()))
            }
            _ => (path, None),
        };
        if let Some(c) = repository.split('/').find(|c| !valid_component(c)) {
            return Err(bad(
                text,
                format!("repository component {c:?} must be lowercase letters, digits, . _ -"),
            ));
        }
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(bad(text, format!("invalid tag {t:?}")));
        }
        Ok(Reference {
            location: Location::Registry {
                host: host.to_string(),
                repository: repository.to_string(),
            },
            tag,
            digest,
        })
    }

    /// The tag, `latest` when none was written.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// What to ask the registry for: the digest if given, else the tag.
    pub fn manifest_ref(&self) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => self.tag_or_latest().to_string(),
        }
    }

    /// The same image pinned to a digest: `host/repo:tag@sha256:…` or `oci:/dir@sha256:…`.
    pub fn with_digest(&self, digest: &Digest256) -> String {
        let base = match &self.location {
            Location::Registry { host, repository } => format!("{host}/{repository}"),
            Location::Layout { dir } => format!("oci:{}", dir.display()),
        };
        match &self.tag {
            Some(t) => format!("{base}:{t}@{digest}"),
            None => format!("{base}@{digest}"),
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Location::Registry { host, repository } => write!(f, "{host}/{repository}")?,
            Location::Layout { dir } => write!(f, "oci:{}", dir.display())?,
        }
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_and_layout_references() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
            (
                "127.0.0.1:5000/kiln/img:v1",
                "127.0.0.1:5000",
                "kiln/img",
                Some("v1"),
                false,
            ),
            ("localhost/img", "localhost", "img", None, false),
            (
                "reg.example.com/a/b/c",
                "reg.example.com",
                "a/b/c",
                None,
                false,
            ),
        ];
        for (text, host, repo, tag, _) in cases {
            let r = Reference::parse(text).unwrap();
            assert_eq!(
                r.location,
                Location::Registry {
                    host: host.to_string(),
                    repository: repo.to_string()
                },
                "{text}"
            );
            assert_eq!(r.tag.as_deref(), *tag);
            assert_eq!(r.to_string(), *text);
        }
        let r = Reference::parse(&format!("127.0.0.1:5000/img:v2@{d}")).unwrap();
        assert_eq!(r.digest.as_ref().unwrap().as_str(), d);
        assert_eq!(r.manifest_ref(), d);
        let r = Reference::parse("oci:/tmp/x:y/lay:t1").unwrap();
        assert_eq!(
            r.location,
            Location::Layout {
                dir: "/tmp/x:y/lay".into()
            }
        );
        assert_eq!(r.tag.as_deref(), Some("t1"));
        let r = Reference::parse("oci:/tmp/lay").unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.tag_or_latest(), "latest");
        // A layout pinned to a digest reads back as written.
        let digest = Digest256::parse(&d).unwrap();
        for (text, tag) in [("oci:/tmp/lay:t1", Some("t1")), ("oci:/tmp/a@b/lay", None)] {
            let pinned = Reference::parse(text).unwrap().with_digest(&digest);
            let r = Reference::parse(&pinned).unwrap();
            assert_eq!(r.tag.as_deref(), tag, "{pinned}");
            assert_eq!(r.digest.as_ref(), Some(&digest), "{pinned}");
            assert_eq!(r.manifest_ref(), d);
        }
        assert_eq!(
            Reference::parse("oci:/tmp/a@b/lay").unwrap().location,
            Location::Layout {
                dir: "/tmp/a@b/lay".into()
            }
        );
    }

    #[test]
    fn rejects_bad_references() {
        for text in [
            "img:v1",
            "docker/img",
            "127.0.0.1:5000/Img",
            "127.0.0.1:5000/img:bad tag",
            "127.0.0.1:5000/img@sha256:12",
            "oci:",
            "127.0.0.1:5000/",
        ] {
            assert!(Reference::parse(text).is_err(), "{text}");
        }
    }
}
