//! Tree manifests: a Tree written down as JSON with every file's content stored as a blob in the
//! cache and named by its digest. A manifest is what stages pass to each other (the rootfs stage's
//! output, the disk stage's input), small enough to hash, store and send, while the bytes stay in
//! the content-addressed store (locally, or in the object store across hosts).

use crate::digest::Digest256;
use crate::home::BlobStore;
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Absolute path in the image (`/` for the root).
    pub path: String,
    #[serde(flatten)]
    pub kind: ManifestKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Extended attributes, values hex-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// The kind of a manifest entry, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ManifestKind {
    File {
        digest: Digest256,
        len: u64,
    },
    /// A file of zeros (sparse, no blob).
    Zeros {
        len: u64,
    },
    Dir,
    Symlink {
        target: String,
    },
    HardLink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

/// A whole Tree as a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub v: u32,
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("storing the content of {path}")]
    Store {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "blob {digest} of {path} is not in the cache {store}; the cache was pruned or is incomplete — rebuild"
    )]
    MissingBlob {
        path: String,
        digest: Digest256,
        store: String,
    },
    #[error("xattr {name} of {path} is not hex")]
    BadXattr { path: String, name: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Write a Tree down: every file's content goes into `blobs` (files already there are recognised
/// by their path and not copied again).
pub fn to_manifest(tree: &Tree, blobs: &BlobStore) -> Result<Manifest, ManifestError> {
    let mut entries = Vec::with_capacity(tree.len());
    for (path, entry) in tree.iter() {
        let store_err = |source| ManifestError::Store {
            path: path.to_string(),
            source,
        };
        let kind = match &entry.kind {
            EntryKind::File(Content::Zeros { len }) => ManifestKind::Zeros { len: *len },
            EntryKind::File(content) => {
                let (digest, len) = match known_blob(content, blobs) {
                    Some(d) => (d, content.len()),
                    None => {
                        let mut reader = content.open().map_err(store_err)?;
                        blobs.put(&mut reader).map_err(store_err)?
                    }
                };
                ManifestKind::File { digest, len }
            }
            EntryKind::Dir => ManifestKind::Dir,
            EntryKind::Symlink { target } => ManifestKind::Symlink {
                target: target.clone(),
            },
            EntryKind::HardLink { target } => ManifestKind::HardLink {
                target: target.to_string(),
            },
            EntryKind::CharDevice { major, minor } => ManifestKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            EntryKind::BlockDevice { major, minor } => ManifestKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            EntryKind::Fifo => ManifestKind::Fifo,
            EntryKind::Socket => ManifestKind::Socket,
        };
        entries.push(ManifestEntry {
            path: path.to_string(),
            kind,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime: entry.mtime,
            xattrs: entry
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), hex::encode(v)))
                .collect(),
        });
    }
    Ok(Manifest { v: 1, entries })
}

/// The digest of content that is already a blob in `blobs` (a host file at its blob path).
fn known_blob(content: &Content, blobs: &BlobStore) -> Option<Digest256> {
    let Content::Host { path, .. } = content else {
        return None;
    };
    let name = path.file_name()?.to_str()?;
    let digest = Digest256::parse(&format!("sha256:{name}"))?;
    (blobs.path(&digest) == *path).then_some(digest)
}

/// Read a manifest back into a Tree whose contents are the blobs in `blobs`.
pub fn from_manifest(manifest: &Manifest, blobs: &BlobStore) -> Result<Tree, ManifestError> {
    let mut tree = Tree::new();
    for e in &manifest.entries {
        let kind = match &e.kind {
            ManifestKind::File { digest, len } => {
                let path = blobs.path(digest);
                if !path.is_file() {
                    return Err(ManifestError::MissingBlob {
                        path: e.path.clone(),
                        digest: digest.clone(),
                        store: blobs.path(digest).display().to_string(),
                    });
                }
                EntryKind::File(Content::Host { path, len: *len })
            }
            ManifestKind::Zeros { len } => EntryKind::File(Content::Zeros { len: *len }),
            ManifestKind::Dir => EntryKind::Dir,
            ManifestKind::Symlink { target } => EntryKind::Symlink {
                target: target.clone(),
            },
            ManifestKind::HardLink { target } => EntryKind::HardLink {
                target: TreePath::new(target)?,
            },
            ManifestKind::CharDevice { major, minor } => EntryKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            ManifestKind::BlockDevice { major, minor } => EntryKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            ManifestKind::Fifo => EntryKind::Fifo,
            ManifestKind::Socket => EntryKind::Socket,
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in &e.xattrs {
            let bytes = hex::decode(v).map_err(|_| ManifestError::BadXattr {
                path: e.path.clone(),
                name: k.clone(),
            })?;
            xattrs.insert(k.clone(), bytes);
        }
        let entry = Entry {
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs,
        };
        let path = TreePath::new(&e.path)?;
        if path.is_root() {
            if let Some(root) = tree.get_mut(&path) {
                *root = entry;
            }
        } else {
            tree.insert(path, entry)?;
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path());
        let mut t = Tree::new();
        t.add(
            "/usr/bin/ping",
            Entry::file(Content::inline("ping"), 0o4755)
                .owner(0, 7)
                .mtime(5)
                .xattr("security.capability", vec![1, 2, 3]),
        )
        .unwrap();
        t.add(
            "/usr/bin/ping2",
            Entry::new(
                EntryKind::HardLink {
                    target: TreePath::new("/usr/bin/ping").unwrap(),
                },
                0o4755,
            ),
        )
        .unwrap();
        t.add(
            "/sparse",
            Entry::file(Content::Zeros { len: 1 << 20 }, 0o600),
        )
        .unwrap();
        t.add(
            "/dev/null",
            Entry::new(EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
        )
        .unwrap();
        t.add("/l", Entry::symlink("usr/bin/ping")).unwrap();
        let m = to_manifest(&t, &blobs).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        let t2 = from_manifest(&back, &blobs).unwrap();
        assert_eq!(t.len(), t2.len());
        for ((p1, e1), (p2, e2)) in t.iter().zip(t2.iter()) {
            assert_eq!(p1, p2);
            assert_eq!(e1.mode, e2.mode);
            assert_eq!((e1.uid, e1.gid, e1.mtime), (e2.uid, e2.gid, e2.mtime));
            assert_eq!(e1.xattrs, e2.xattrs);
            match (&e1.kind, &e2.kind) {
                (EntryKind::File(a), EntryKind::File(b)) => {
                    assert_eq!(
                        crate::tree::read_content(a).unwrap(),
                        crate::tree::read_content(b).unwrap()
                    );
                }
                (a, b) => assert_eq!(a, b),
            }
        }
        // A second manifest of the restored tree reuses the blobs and is identical.
        assert_eq!(to_manifest(&t2, &blobs).unwrap(), m);
    }
}
