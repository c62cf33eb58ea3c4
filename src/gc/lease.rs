//! What running builds use, written down for collections: each kiln process that runs stages keeps
//! `$KILN_HOME/leases/<pid>.json` with the blobs its builds hand on from stage to stage and the
//! time its oldest running stage started. A collection (`kiln gc`, a worker's `--cache-max`)
//! never removes a pinned blob, nor a blob or record written since a running stage started (what
//! that stage is producing and has not recorded yet). A lease of a process that no longer runs
//! counts for nothing.

use super::Refs;
use crate::digest::Digest256;
use crate::home::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The directory of lease files under `$KILN_HOME`.
pub fn lease_dir(home: &Path) -> PathBuf {
    home.join("leases")
}

/// How long a build's pins outlive its last stage in this process: its next stage may run in
/// another process, which then pins it; this process never hears that it ended.
const BUILD_PIN_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// File times are coarse and clocks of one host agree only roughly: a running stage protects
/// what was written a little before it started.
const MTIME_MARGIN: Duration = Duration::from_secs(2);

/// One lease file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LeaseFile {
    pid: u32,
    /// Unix seconds when the oldest stage running now started (minus a margin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    running_since: Option<u64>,
    #[serde(default)]
    blobs: BTreeSet<Digest256>,
    #[serde(default)]
    manifests: BTreeSet<Digest256>,
}

/// One build's pins in this process.
struct Pin {
    refs: Refs,
    /// When its running stage started (none between stages).
    running: Option<SystemTime>,
    touched: Instant,
}

/// This process's lease: pins per build, written to its lease file on every change.
pub struct Lease {
    path: PathBuf,
    builds: Mutex<HashMap<String, Pin>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("path", &self.path).finish()
    }
}

impl Lease {
    /// The lease of this process in `home` (no file until something is pinned).
    pub fn new(home: &Path) -> Lease {
        Lease {
            path: lease_dir(home).join(format!("{}.json", std::process::id())),
            builds: Mutex::new(HashMap::new()),
        }
    }

    /// A stage of `build` starts with `refs` (what its handover names) in hand.
    pub fn stage_started(&self, build: &str, refs: Refs) {
        self.update(|builds| {
            builds.insert(
                build.to_string(),
                Pin {
                    refs,
                    running: Some(SystemTime::now() - MTIME_MARGIN),
                    touched: Instant::now(),
                },
            );
        });
    }

    /// A stage of `build` ended; the build goes on with `refs`.
    pub fn stage_ended(&self, build: &str, refs: Refs) {
        self.update(|builds| {
            builds.insert(
                build.to_string(),
                Pin {
                    refs,
                    running: None,
                    touched: Instant::now(),
                },
            );
        });
    }

    /// `build` ended (its last stage completed, or it failed for good).
    pub fn build_ended(&self, build: &str) {
        self.update(|builds| {
            builds.remove(build);
        });
    }

    /// How many stages of this process are running.
    pub fn running(&self) -> usize {
        let builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        builds.values().filter(|p| p.running.is_some()).count()
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<String, Pin>)) {
        let mut builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut builds);
        builds.retain(|_, p| p.running.is_some() || p.touched.elapsed() < BUILD_PIN_LIFETIME);
        let mut file = LeaseFile {
            pid: std::process::id(),
            ..Default::default()
        };
        for pin in builds.values() {
            file.blobs.extend(pin.refs.blobs.iter().cloned());
            file.manifests.extend(pin.refs.manifests.iter().cloned());
            if let Some(t) = pin.running {
                let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                file.running_since = Some(file.running_since.map_or(secs, |s| s.min(secs)));
            }
        }
        // Written under the lock, so the file never goes back to an older state.
        let written = if builds.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(&file)
                .map_err(std::io::Error::other)
                .and_then(|bytes| write_atomic(&self.path, &bytes))
        };
        if let Err(e) = written {
            tracing::warn!(
                "cannot write the lease file {} (a collection may remove what a running build uses): {e}",
                self.path.display()
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the live processes of a home hold.
#[derive(Debug, Default, Clone)]
pub struct InUse {
    pub refs: Refs,
    /// The start of the oldest running stage: everything written since is kept.
    pub since: Option<SystemTime>,
    /// Stages running now.
    pub running: bool,
}

impl InUse {
    /// Whether a file last modified at `mtime` may belong to a running stage.
    pub fn is_recent(&self, mtime: SystemTime) -> bool {
        self.since.is_some_and(|s| mtime >= s)
    }
}

/// Read the leases of the processes that still run (unreadable or stale files count for
/// nothing; a stale one is removed).
pub fn read_all(home: &Path) -> InUse {
    let mut out = InUse::default();
    let Ok(entries) = std::fs::read_dir(lease_dir(home)) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if !crate::home::process_alive(pid) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some(file) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<LeaseFile>(&b).ok())
        else {
            continue;
        };
        out.refs.blobs.extend(file.blobs);
        out.refs.manifests.extend(file.manifests);
        if let Some(secs) = file.running_since {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            out.since = Some(out.since.map_or(t, |s| s.min(t)));
            out.running = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_pins_until_its_build_ends() {
        let home = tempfile::tempdir().unwrap();
        let lease = Lease::new(home.path());
        assert!(read_all(home.path()).refs.blobs.is_empty());
        let d = Digest256::of(b"x");
        let refs = Refs {
            blobs: [d.clone()].into(),
            manifests: Default::default(),
        };
        lease.stage_started("b1", refs.clone());
        let used = read_all(home.path());
        assert!(used.refs.blobs.contains(&d));
        assert!(used.running && used.is_recent(SystemTime::now()));
        assert!(!used.is_recent(SystemTime::now() - Duration::from_secs(3600)));
        lease.stage_ended("b1", refs);
        let used = read_all(home.path());
        assert!(used.refs.blobs.contains(&d) && !used.running);
        lease.build_ended("b1");
        assert!(read_all(home.path()).refs.blobs.is_empty());
        assert!(!lease.path.exists());
    }
}
