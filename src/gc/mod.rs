//! Retention and garbage collection of what kiln caches: `$KILN_HOME` (blobs, stage records, the
//! package cache, kernel builds, Debian bases) and, across hosts, the `kiln-blobs` object store
//! and the `kiln-stages` KV bucket ([`remote`]).
//!
//! A stage record is retained while it is younger than the keep time or, under a size budget,
//! while it is among the most recently used that fit (a hit refreshes a record's time). A blob is
//! kept while a retained record names it (a Tree manifest keeps the files it lists), while a
//! running build pins it ([`lease`]), or when it was written since a running stage started.
//! Everything else goes: records first, then the blobs they named, so a later build finds no
//! record that names a removed blob — it is a miss, never a broken hit.

pub mod lease;
pub mod remote;

use crate::digest::Digest256;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A collection failure.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("collecting the object store and KV bucket")]
    Remote(#[from] remote::RemoteError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> GcError + 'a {
    move |source| GcError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A size as the command line takes it: bytes, or a number with `K`, `M`, `G`, `T` (powers of
/// 1024, with or without `i`/`iB`/`B`): `500M`, `2G`, `10GiB`, `1.5G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; write e.g. 500M, 2G or 10GiB"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 500M, 2G or 10GiB"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Bytes as people read them (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What to keep.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keep records used within this long (none: no age limit).
    pub keep: Option<Duration>,
    /// Keep at most this many bytes, the most recently used first (none: no budget).
    pub max_size: Option<u64>,
    /// Say what would go; remove nothing.
    pub dry_run: bool,
    /// Blobs kept whatever their records' age (the images of published builds).
    pub pinned: Refs,
}

/// The blobs a record (or a build's hand-over) names: plain blobs, and Tree manifests, which name
/// files of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    pub blobs: BTreeSet<Digest256>,
    pub manifests: BTreeSet<Digest256>,
}

/// JSON fields whose digest names a Tree manifest (a rootfs, a Debian base).
const MANIFEST_FIELDS: [&str; 2] = ["manifest", "base"];

impl Refs {
    /// Every `sha256:<hex>` string in `v`; those under a manifest field are manifests.
    pub fn of(v: &Value) -> Refs {
        let mut refs = Refs::default();
        refs.add(v, false);
        refs
    }

    fn add(&mut self, v: &Value, manifest: bool) {
        match v {
            Value::String(s) => {
                if let Some(d) = Digest256::parse(s) {
                    if manifest {
                        self.manifests.insert(d.clone());
                    }
                    self.blobs.insert(d);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.add(i, manifest)),
            Value::Object(map) => {
                for (k, v) in map {
                    self.add(v, MANIFEST_FIELDS.contains(&k.as_str()));
                }
            }
            _ => {}
        }
    }

    pub fn extend(&mut self, other: &Refs) {
        self.blobs.extend(other.blobs.iter().cloned());
        self.manifests.extend(other.manifests.iter().cloned());
    }
}

/// The file blobs a manifest's bytes list (none when they are not a manifest).
pub fn manifest_files(bytes: &[u8]) -> Vec<Digest256> {
    match serde_json::from_slice::<crate::manifest::Manifest>(bytes) {
        Ok(m) => m
            .entries
            .into_iter()
            .filter_map(|e| match e.kind {
                crate::manifest::ManifestKind::File { digest, .. } => Some(digest),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// What one kind of thing came to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindReport {
    pub kind: &'static str,
    pub kept: u64,
    pub kept_bytes: u64,
    pub removed: u64,
    pub freed_bytes: u64,
}

/// What a collection of `$KILN_HOME` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub home: PathBuf,
    pub dry_run: bool,
    /// Bytes on disk (allocated) of what kiln collects, before and after.
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub kinds: Vec<KindReport>,
    /// Files that were there and could not be removed (another process took them first, or
    /// permissions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Report {
    pub fn freed_bytes(&self) -> u64 {
        self.kinds.iter().map(|k| k.freed_bytes).sum()
    }
}

/// A table of kinds: kept and removed counts and bytes.
pub fn render_table(title: &str, kinds: &[KindReport], dry_run: bool) -> String {
    use std::fmt::Write;
    let removed = if dry_run { "would remove" } else { "removed" };
    let mut out = format!(
        "{title}\n  {:<10} {:>8} {:>12} {:>13} {:>12}\n",
        "kind", "kept", "kept bytes", removed, "freed"
    );
    for k in kinds {
        let _ = writeln!(
            out,
            "  {:<10} {:>8} {:>12} {:>13} {:>12}",
            k.kind,
            k.kept,
            human_bytes(k.kept_bytes),
            k.removed,
            human_bytes(k.freed_bytes)
        );
    }
    out
}

/// Bytes a file takes on disk.
fn allocated(m: &std::fs::Metadata) -> u64 {
    m.blocks() * 512
}

fn mtime(m: &std::fs::Metadata) -> SystemTime {
    m.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

struct Blob {
    bytes: u64,
    mtime: SystemTime,
}

struct Record {
    path: PathBuf,
    bytes: u64,
    mtime: SystemTime,
    refs: Refs,
    /// A cached InRelease: it keeps the package indexes it names like a record, but is never
    /// removed itself (it is tiny, and the archive client decides when it is stale).
    release: bool,
}

/// A cache directory that is kept or removed whole (a kernel build, an unpacked kernel source,
/// a partial download).
struct Other {
    kind: &'static str,
    path: PathBuf,
    bytes: u64,
    mtime: SystemTime,
}

/// Size and newest mtime of a file or directory tree (links not followed).
fn tree_usage(path: &Path) -> (u64, SystemTime) {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return (0, SystemTime::UNIX_EPOCH);
    };
    let mut bytes = allocated(&m);
    let mut newest = mtime(&m);
    if m.is_dir()
        && let Ok(rd) = std::fs::read_dir(path)
    {
        for e in rd.flatten() {
            let (b, t) = tree_usage(&e.path());
            bytes += b;
            newest = newest.max(t);
        }
    }
    (bytes, newest)
}

fn is_temp(name: &str) -> bool {
    name.starts_with('.')
}

/// Progress of a long collection, for the command line.
pub type Progress<'a> = &'a dyn Fn(&str);

/// Collect `$KILN_HOME` at `home` by `policy`.
pub fn collect(home: &Path, policy: &Policy, progress: Progress<'_>) -> Result<Report, GcError> {
    let now = SystemTime::now();
    let cutoff = policy
        .keep
        .map(|k| now.checked_sub(k).unwrap_or(SystemTime::UNIX_EPOCH));
    let kept_by_age = |t: SystemTime| cutoff.is_none_or(|c| t >= c);

    // What is here.
    let blobs = scan_blobs(home)?;
    progress(&format!("{} blobs", blobs.len()));
    let records = scan_records(home, progress)?;
    progress(&format!(
        "{} stage records",
        records.iter().filter(|r| !r.release).count()
    ));
    let others = scan_others(home);
    let mut in_use = lease::read_all(home);
    in_use.refs.extend(&policy.pinned);

    let mut manifests: HashMap<Digest256, Vec<Digest256>> = HashMap::new();
    let store = crate::home::BlobStore::new(home);
    let mut closure = |refs: &Refs| -> Vec<Digest256> {
        let mut out: Vec<Digest256> = refs.blobs.iter().cloned().collect();
        for m in &refs.manifests {
            let files = manifests.entry(m.clone()).or_insert_with(|| {
                std::fs::read(store.path(m))
                    .map(|b| manifest_files(&b))
                    .unwrap_or_default()
            });
            out.extend(files.iter().cloned());
        }
        out
    };

    // Retention: in-flight first, then the most recently used, within age and budget.
    let mut live: HashSet<Digest256> = HashSet::new();
    let mut total = 0u64;
    let count = |d: &Digest256, live: &mut HashSet<Digest256>| -> u64 {
        if live.insert(d.clone()) {
            blobs.get(d).map_or(0, |b| b.bytes)
        } else {
            0
        }
    };
    for d in closure(&in_use.refs) {
        total += count(&d, &mut live);
    }
    for (d, b) in &blobs {
        if in_use.is_recent(b.mtime) {
            total += count(d, &mut live);
        }
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by(|&a, &b| records[b].mtime.cmp(&records[a].mtime));
    let mut keep_record = vec![false; records.len()];
    for &i in &order {
        let r = &records[i];
        if in_use.is_recent(r.mtime) {
            keep_record[i] = true;
            total += r.bytes;
            for d in closure(&r.refs) {
                total += count(&d, &mut live);
            }
        }
    }
    for &i in &order {
        let r = &records[i];
        if keep_record[i] || !kept_by_age(r.mtime) {
            continue;
        }
        let files = closure(&r.refs);
        let added: u64 = r.bytes
            + files
                .iter()
                .collect::<HashSet<_>>()
                .into_iter()
                .filter(|d| !live.contains(*d))
                .map(|d| blobs.get(d).map_or(0, |b| b.bytes))
                .sum::<u64>();
        if policy.max_size.is_some_and(|max| total + added > max) {
            continue;
        }
        keep_record[i] = true;
        total += r.bytes;
        for d in files {
            total += count(&d, &mut live);
        }
    }
    // Whole directories (kernel builds and sources, partial downloads): by age and budget, and
    // never while a stage of this home runs (a kernel build reads them for a long time).
    let mut keep_other = vec![true; others.len()];
    let mut by_age: Vec<usize> = (0..others.len()).collect();
    by_age.sort_by(|&a, &b| others[b].mtime.cmp(&others[a].mtime));
    for i in by_age {
        let o = &others[i];
        let fits = policy.max_size.is_none_or(|max| total + o.bytes <= max);
        if in_use.running || (kept_by_age(o.mtime) && fits) {
            total += o.bytes;
        } else {
            keep_other[i] = false;
        }
    }

    // Removal: records, then blobs, then directories.
    let mut report = Report {
        home: home.to_path_buf(),
        dry_run: policy.dry_run,
        before_bytes: 0,
        after_bytes: 0,
        kinds: Vec::new(),
        errors: Vec::new(),
    };
    let mut rec_report = KindReport {
        kind: "records",
        ..Default::default()
    };
    for (i, r) in records.iter().enumerate() {
        if r.release {
            continue;
        }
        if keep_record[i] {
            rec_report.kept += 1;
            rec_report.kept_bytes += r.bytes;
        } else if remove(&r.path, false, policy.dry_run, &mut report.errors) {
            rec_report.removed += 1;
            rec_report.freed_bytes += r.bytes;
        }
    }
    // A stage that started while this collection looked is protected as well.
    let late = lease::read_all(home);
    let late_pinned: HashSet<Digest256> = closure(&late.refs).into_iter().collect();
    let mut blob_report = KindReport {
        kind: "blobs",
        ..Default::default()
    };
    let mut done = 0usize;
    for (d, b) in &blobs {
        done += 1;
        if done.is_multiple_of(5000) {
            progress(&format!("blobs: {done}/{} looked at", blobs.len()));
        }
        let path = store.path(d);
        let recent = std::fs::symlink_metadata(&path)
            .map(|m| late.is_recent(mtime(&m)) || in_use.is_recent(mtime(&m)))
            .unwrap_or(false);
        if live.contains(d) || late_pinned.contains(d) || recent {
            blob_report.kept += 1;
            blob_report.kept_bytes += b.bytes;
        } else if remove(&path, false, policy.dry_run, &mut report.errors) {
            blob_report.removed += 1;
            blob_report.freed_bytes += b.bytes;
        }
    }
    let mut other_reports: Vec<KindReport> = Vec::new();
    for (i, o) in others.iter().enumerate() {
        let k = match other_reports.iter_mut().position(|k| k.kind == o.kind) {
            Some(p) => &mut other_reports[p],
            None => {
                other_reports.push(KindReport {
                    kind: o.kind,
                    ..Default::default()
                });
                other_reports.last_mut().expect("just pushed")
            }
        };
        if keep_other[i] || late.running {
            k.kept += 1;
            k.kept_bytes += o.bytes;
        } else if remove(&o.path, true, policy.dry_run, &mut report.errors) {
            k.removed += 1;
            k.freed_bytes += o.bytes;
        }
    }
    report.kinds.push(blob_report);
    report.kinds.push(rec_report);
    report.kinds.extend(other_reports);
    report.before_bytes = report
        .kinds
        .iter()
        .map(|k| k.kept_bytes + k.freed_bytes)
        .sum();
    report.after_bytes = report.kinds.iter().map(|k| k.kept_bytes).sum();
    Ok(report)
}

/// Remove a file or directory tree; false (and a note) when it could not be.
fn remove(path: &Path, tree: bool, dry_run: bool, errors: &mut Vec<String>) -> bool {
    if dry_run {
        return true;
    }
    let r = if tree && path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            errors.push(format!("cannot remove {}: {e}", path.display()));
            false
        }
    }
}

fn scan_blobs(home: &Path) -> Result<HashMap<Digest256, Blob>, GcError> {
    let dir = home.join("blobs").join("sha256");
    let mut out = HashMap::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("read the blob directory", &dir)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(d) = name
            .to_str()
            .and_then(|n| Digest256::parse(&format!("sha256:{n}")))
        else {
            continue;
        };
        let Ok(m) = entry.metadata() else { continue };
        if m.is_file() {
            out.insert(
                d,
                Blob {
                    bytes: allocated(&m),
                    mtime: mtime(&m),
                },
            );
        }
    }
    Ok(out)
}

/// The cached InRelease files (`$KILN_HOME/debian/<mirror_suite>/InRelease`) as records of
/// the package indexes they name by sha256 (an index is stored as a blob under that digest).
fn release_records(home: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(home.join("debian")) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path().join("InRelease");
        let (Ok(text), Ok(m)) = (std::fs::read_to_string(&path), std::fs::metadata(&path)) else {
            continue;
        };
        let blobs = text
            .split_whitespace()
            .filter(|w| w.len() == 64)
            .filter_map(|w| Digest256::parse(&format!("sha256:{w}")))
            .collect();
        out.push(Record {
            path,
            bytes: 0,
            mtime: mtime(&m),
            refs: Refs {
                blobs,
                manifests: BTreeSet::new(),
            },
            release: true,
        });
    }
    out
}

fn scan_records(home: &Path, progress: Progress<'_>) -> Result<Vec<Record>, GcError> {
    let root = home.join("stages");
    let mut out = release_records(home);
    let steps = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("read the stage records", &root)(e)),
    };
    for step in steps.flatten() {
        let Ok(files) = std::fs::read_dir(step.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_temp(name) || !name.ends_with(".json") {
                continue;
            }
            let path = f.path();
            let Ok(m) = f.metadata() else { continue };
            // An unreadable record names nothing (and a lookup ignores it): it may go.
            let refs = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .map(|v| Refs::of(&v))
                .unwrap_or_default();
            out.push(Record {
                path,
                bytes: allocated(&m),
                mtime: mtime(&m),
                refs,
                release: false,
            });
            if out.len().is_multiple_of(10_000) {
                progress(&format!("{} stage records read", out.len()));
            }
        }
    }
    Ok(out)
}

fn scan_others(home: &Path) -> Vec<Other> {
    let mut out = Vec::new();
    let dirs: [(&'static str, PathBuf); 5] = [
        ("kernel", home.join("kernel").join("builds")),
        ("kernel", home.join("kernel").join("src")),
        ("kernel", home.join("kernel").join("base")),
        ("kernel", home.join("kernel").join("logs")),
        ("partial", home.join("blobs").join("partial")),
    ];
    for (kind, dir) in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_str().is_none_or(is_temp) {
                continue;
            }
            let (bytes, mtime) = tree_usage(&e.path());
            out.push(Other {
                kind,
                path: e.path(),
                bytes,
                mtime,
            });
        }
    }
    out
}

/// Bytes on disk of what [`collect`] manages in `home` (blobs, records, kernel builds,
/// partial downloads): what `--cache-max` compares with.
pub fn cache_bytes(home: &Path) -> u64 {
    ["blobs", "stages", "kernel"]
        .iter()
        .map(|d| tree_usage(&home.join(d)).0)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_parse_like_people_write_them() {
        for (text, bytes) in [
            ("0", 0),
            ("512", 512),
            ("500M", 500 << 20),
            ("2G", 2 << 30),
            ("10GiB", 10 << 30),
            ("1.5G", 3 << 29),
            ("64k", 64 << 10),
            ("3 MB", 3 << 20),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "G", "12Q", "-1G", "1..2M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn refs_find_digests_and_manifests() {
        let a = Digest256::of(b"a");
        let m = Digest256::of(b"m");
        let v = json!({
            "image": a.as_str(),
            "rootfs": { "manifest": m.as_str(), "entries": 3 },
            "note": "sha256:short",
            "list": [a.as_str()],
        });
        let refs = Refs::of(&v);
        assert_eq!(refs.blobs, [a.clone(), m.clone()].into());
        assert_eq!(refs.manifests, [m].into());
    }

    fn age(path: &Path, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn collects_what_no_retained_record_names_least_recently_used_first() {
        let home = tempfile::tempdir().unwrap();
        let store = crate::home::BlobStore::new(home.path());
        let records = crate::pipeline::records::LocalRecords::new(home.path());
        use crate::pipeline::records::StageRecords;
        let (file, _) = store.put_bytes(&[1u8; 10_000]).unwrap();
        let (old_img, _) = store.put_bytes(&[2u8; 50_000]).unwrap();
        let (new_img, _) = store.put_bytes(&[3u8; 50_000]).unwrap();
        let (stray, _) = store.put_bytes(b"nobody names me").unwrap();
        let manifest = serde_json::to_vec(&json!({
            "v": 1,
            "entries": [{ "path": "/f", "type": "file", "digest": file.as_str(), "len": 10000,
                          "mode": 420, "uid": 0, "gid": 0, "mtime": 0 }]
        }))
        .unwrap();
        assert_eq!(manifest_files(&manifest), vec![file.clone()]);
        let (m, _) = store.put_bytes(&manifest).unwrap();
        let k = |n: &str| Digest256::of(n.as_bytes());
        records
            .put("rootfs", &k("r"), &json!({ "manifest": m.as_str() }))
            .unwrap();
        records
            .put("disk", &k("old"), &json!({ "image": old_img.as_str() }))
            .unwrap();
        records
            .put("disk", &k("new"), &json!({ "image": new_img.as_str() }))
            .unwrap();
        let rec = |step: &str, n: &str| {
            home.path()
                .join(format!("stages/{step}/{}.json", k(n).hex()))
        };
        age(&rec("disk", "old"), 3 * 86_400);
        age(&rec("rootfs", "r"), 3600);
        for d in [&file, &old_img, &new_img, &stray, &m] {
            age(&store.path(d), 5 * 86_400);
        }
        let before = walk_files(home.path());

        // A dry run removes nothing.
        let policy = Policy {
            keep: Some(Duration::from_secs(86_400)),
            dry_run: true,
            ..Default::default()
        };
        let r = collect(home.path(), &policy, &|_| {}).unwrap();
        assert_eq!(walk_files(home.path()), before);
        assert_eq!(r.kinds[0].removed, 2, "{r:?}");

        // By age: the old disk record and its image go, and the stray blob; the manifest's file
        // stays.
        let policy = Policy {
            dry_run: false,
            ..policy
        };
        collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(!rec("disk", "old").exists());
        assert!(!store.contains(&old_img) && !store.contains(&stray));
        for d in [&file, &m, &new_img] {
            assert!(store.contains(d));
        }

        // By size: the newest record fits, the older rootfs record does not.
        let policy = Policy {
            keep: None,
            max_size: Some(60_000 + 8192),
            ..Default::default()
        };
        let r = collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(rec("disk", "new").exists() && store.contains(&new_img));
        assert!(!rec("rootfs", "r").exists());
        assert!(!store.contains(&m) && !store.contains(&file));
        assert!(r.after_bytes <= 60_000 + 8192, "{r:?}");

        // A running build's pins and what a running stage wrote are kept whatever the policy.
        let (fresh, _) = store.put_bytes(b"being written").unwrap();
        let lease = lease::Lease::new(home.path());
        lease.stage_started(
            "b",
            Refs {
                blobs: [new_img.clone()].into(),
                manifests: Default::default(),
            },
        );
        std::fs::remove_file(rec("disk", "new")).unwrap();
        let policy = Policy {
            keep: Some(Duration::ZERO),
            ..Default::default()
        };
        collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(store.contains(&new_img) && store.contains(&fresh));
        drop(lease);
        collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(!store.contains(&new_img) && !store.contains(&fresh));
    }

    #[test]
    fn a_cached_inrelease_keeps_the_package_indexes_it_names() {
        let home = tempfile::tempdir().unwrap();
        let store = crate::home::BlobStore::new(home.path());
        let (index, _) = store.put_bytes(b"Package: busybox\n").unwrap();
        let (other, _) = store.put_bytes(b"not an index").unwrap();
        let release = home.path().join("debian/mirror_bookworm/InRelease");
        std::fs::create_dir_all(release.parent().unwrap()).unwrap();
        std::fs::write(
            &release,
            format!("SHA256:\n {} 17 main/binary-amd64/Packages\n", index.hex()),
        )
        .unwrap();
        let policy = Policy {
            keep: Some(Duration::from_secs(3600)),
            ..Default::default()
        };
        collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(store.contains(&index) && !store.contains(&other));
        age(&release, 7200);
        collect(home.path(), &policy, &|_| {}).unwrap();
        assert!(!store.contains(&index) && release.exists());
    }

    fn walk_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }
}
