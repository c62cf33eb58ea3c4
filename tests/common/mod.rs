//! The one home of test helpers; every test file has `mod common;`. Here: the `kiln` binary
//! under test ([`kiln`], [`kiln_no_home`]) and its JSON output, the project [`root`],
//! KILN_HOMEs sharing downloads between runs, a tokio runtime ([`rt`]), and real Debian
//! packages unpacked into a Tree (downloads cached in /var/tmp/kiln-test-debs so reruns do not
//! download). By concern: [`process`] (running commands, the child-process guard [`Running`],
//! [`free_port`], [`curl`]), [`hash`] (sha256), [`files`] ([`copy_dir`], [`walk`]), [`metrics`] (promtool), [`git`]
//! ([`commit_all`]), [`jetstream`] (kiln's buckets as a NATS client sees them), [`registry`], [`nats_roles`], [`raw_nats`] (the server asked in its own
//! protocol), [`cluster`] (a JetStream cluster of nodes that can be killed and restarted,
//! optionally with TLS), [`netns`] (a separate host in a network namespace), [`verify_support`],
//! [`agents`] (`kiln agent` processes, their VMs, `recipes/app.yaml` builds), [`up`] (`kiln up`
//! and its API's URL).
//!
//! Each test binary compiles this module on its own and uses a part of it, hence
//! `allow(dead_code)`.
#![allow(dead_code)]

pub mod agents;
pub mod cluster;
pub mod files;
pub mod git;
pub mod hash;
pub mod jetstream;
pub mod metrics;
pub mod nats_roles;
pub mod netns;
pub mod process;
pub mod raw_nats;
pub mod registry;
pub mod up;
pub mod verify_support;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use files::{
    Tmpfs, change_base64_digit, copy_dir, extract_partition, flip_byte, root_files, walk,
};
#[allow(unused_imports)]
pub use git::commit_all;
#[allow(unused_imports)]
pub use hash::{sha256, sha256_bytes, sha256_digest};
#[allow(unused_imports)]
pub use process::{Running, curl, free_port, is_root, output, run, succeeded};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use kiln::home::BlobStore;
use kiln::tree::Tree;

/// The project's root (the recipes, templates and profiles tests use).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `kiln` binary under test, run from the project root with `KILN_HOME=home` and no other
/// `KILN_*` variable of the environment, so a developer's shell cannot change a result (tests
/// set what they need).
pub fn kiln(home: &Path) -> Command {
    let mut c = kiln_no_home();
    c.env("KILN_HOME", home);
    c
}

/// The `kiln` binary under test, run from the project root with no `KILN_*` variable of the
/// environment (not even `KILN_HOME`), for commands that need no home of their own.
pub fn kiln_no_home() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.current_dir(root());
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("KILN_") {
            c.env_remove(var);
        }
    }
    c
}

/// `kiln up`/`kiln worker` arguments that open the recipe roots tests submit path recipes from:
/// the project and the temp directory (workers read no recipe files by default).
pub fn recipe_roots() -> Vec<std::ffi::OsString> {
    vec![
        "--recipes".into(),
        root().into_os_string(),
        "--recipes".into(),
        std::env::temp_dir().into_os_string(),
    ]
}

/// `kiln keygen -o KEY` (an ECDSA P-256 image signing key and `KEY.pub`); fails the test with
/// its output when it fails.
pub fn keygen(home: &Path, key: &Path) {
    let o = kiln(home).args(["keygen", "-o"]).arg(key).output().unwrap();
    assert!(o.status.success(), "kiln keygen: {o:?}");
}

/// The JSON report a successful `kiln ... --json` printed; fails the test with its output otherwise.
pub fn json_report(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "kiln failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON report")
}

/// Each stage of a build report (`kiln build --json`) with its cache result (`hit`, `miss`, …).
pub fn stage_caches(report: &serde_json::Value) -> Vec<(String, String)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["cache"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A `--set hostname=…` parameter no earlier run used, so that rootfs, kernel and disk really
/// run and the image is the test's own.
pub fn unique_hostname(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("hostname=k-{tag}-{nanos:x}")
}

/// The JSON values a `kiln ... --json` printed on stdout, one per line; panics naming a line that
/// is not JSON.
pub fn json_lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A current-thread tokio runtime, for the bus calls of a test that is not async.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The state a stage handed on, as the worker recorded it in the `kiln-states` KV bucket under
/// the digest its `completed` message names (the message carries only the digest).
pub fn handed_on_state(url: &str, completed: &kiln::bus::StageCompleted) -> serde_json::Value {
    rt().block_on(async {
        let bus = kiln::bus::Bus::connect_url(url).await.unwrap();
        let key = kiln::pipeline::handoff::record_key(&completed.state_digest).unwrap();
        let record = kiln::bus::StageOutputs::open_existing(&bus, kiln::bus::STATE_BUCKET)
            .await
            .unwrap()
            .get(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no state recorded under {key}"));
        assert_eq!(record["build"], completed.build.as_str(), "{record}");
        record["state"].clone()
    })
}

pub const DEB_CACHE: &str = "/var/tmp/kiln-test-debs";

static TREES: Mutex<BTreeMap<String, Tree>> = Mutex::new(BTreeMap::new());

fn cached_deb(package: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(DEB_CACHE)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The versioned package a metapackage depends on, e.g. `linux-image-cloud-amd64` →
/// `linux-image-6.1.0-56-cloud-amd64`. Falls back to a cached download when apt has no lists.
pub fn kernel_package(flavour: &str) -> String {
    let meta = format!("linux-image-{flavour}");
    let out = Command::new("apt-cache")
        .args(["depends", &meta])
        .output()
        .expect("run apt-cache");
    let text = String::from_utf8_lossy(&out.stdout);
    let suffix = format!("-{flavour}");
    if let Some(name) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|n| n.starts_with("linux-image-") && n.ends_with(&suffix))
    {
        return name.to_string();
    }
    let mut cached: Vec<String> = std::fs::read_dir(DEB_CACHE)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.split('_').next().map(str::to_string))
        .filter(|n| n.starts_with("linux-image-") && n.ends_with(&suffix))
        .collect();
    cached.sort();
    cached.pop().unwrap_or_else(|| {
        panic!("apt-cache depends {meta} found no kernel (run apt-get update) and none is cached")
    })
}

/// The .deb of `package`, downloaded with `apt-get download` unless cached.
pub fn deb_path(package: &str) -> PathBuf {
    std::fs::create_dir_all(DEB_CACHE).unwrap();
    if let Some(p) = cached_deb(package) {
        return p;
    }
    let status = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(DEB_CACHE)
        .status()
        .expect("run apt-get download");
    assert!(status.success(), "apt-get download {package} failed");
    cached_deb(package).unwrap_or_else(|| panic!("{package} not in {DEB_CACHE} after download"))
}

/// The files of `package` as a Tree (contents in a blob store under the cache dir).
pub fn deb_tree(package: &str) -> Tree {
    let mut trees = TREES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = trees.get(package) {
        return t.clone();
    }
    let deb = deb_path(package);
    let tree = unpack_deb(&deb);
    trees.insert(package.to_string(), tree.clone());
    tree
}

fn unpack_deb(deb: &Path) -> Tree {
    let store = BlobStore::new(Path::new(DEB_CACHE).join("blobs"));
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run dpkg-deb");
    let mut tree = Tree::new();
    tree.extend_from_tar(child.stdout.take().unwrap(), &mut |r, _len| {
        store.put_content(r)
    })
    .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "dpkg-deb {}",
        deb.display()
    );
    tree
}

/// Where tests share package downloads between runs (kiln's own cache layout).
pub const SHARED_HOME: &str = "/var/tmp/kiln-test-cache";

/// A fresh KILN_HOME whose downloads (blobs, InRelease copies) and built kernels are shared with
/// other test runs, while its stage records are its own, so stages really run.
pub fn shared_home() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = Path::new(SHARED_HOME);
    for sub in ["blobs", "debian", "kernel"] {
        std::fs::create_dir_all(shared.join(sub)).expect("shared cache dir");
        std::os::unix::fs::symlink(shared.join(sub), dir.path().join(sub)).expect("symlink");
    }
    dir
}

/// Like [`shared_home`], but its blob store is a directory of its own in which every shared
/// blob is a symlink: what the builds write (images, Trees) lands here, not in the shared cache,
/// so a test may damage or remove a blob without touching other tests. Under `parent` when
/// given (a tmpfs, say), else in a temp dir.
pub fn own_blobs_home(parent: Option<&Path>) -> tempfile::TempDir {
    let dir = match parent {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let shared = Path::new(SHARED_HOME);
    for sub in ["debian", "kernel"] {
        std::fs::create_dir_all(shared.join(sub)).expect("shared cache dir");
        std::os::unix::fs::symlink(shared.join(sub), dir.path().join(sub)).expect("symlink");
    }
    let blobs = dir.path().join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).expect("blob dir");
    let from = shared.join("blobs").join("sha256");
    std::fs::create_dir_all(&from).expect("shared blob dir");
    for e in std::fs::read_dir(&from).expect("shared blobs").flatten() {
        let name = e.file_name();
        // Only finished blobs (no temp files of a running test).
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), blobs.join(&name)).expect("symlink a blob");
    }
    dir
}

/// Like [`shared_home`], and the Debian base records (`stages/debian-base`) are shared too, so
/// the mmdebstrap base of a Debian recipe is made once for all test runs.
pub fn shared_debian_home() -> tempfile::TempDir {
    let dir = shared_home();
    let shared = Path::new(SHARED_HOME).join("stages").join("debian-base");
    std::fs::create_dir_all(&shared).expect("shared stage dir");
    std::fs::create_dir_all(dir.path().join("stages")).expect("stage dir");
    std::os::unix::fs::symlink(&shared, dir.path().join("stages").join("debian-base"))
        .expect("symlink");
    dir
}

/// A fresh KILN_HOME for tests that collect their cache (`kiln gc`): its blobs are hard links
/// to the shared cache's (so downloads are not repeated, and removing them here leaves the
/// shared cache whole), its InRelease copies are shared, and nothing else is.
pub fn seeded_home() -> tempfile::TempDir {
    let shared = Path::new(SHARED_HOME);
    std::fs::create_dir_all(shared.join("blobs").join("sha256")).expect("shared cache dir");
    std::fs::create_dir_all(shared.join("debian")).expect("shared cache dir");
    // On the shared cache's file system, so the blobs can be linked.
    let dir = tempfile::tempdir_in(shared.parent().unwrap_or(shared)).expect("temp dir");
    link_shared_blobs(dir.path());
    std::os::unix::fs::symlink(shared.join("debian"), dir.path().join("debian")).expect("symlink");
    dir
}

/// Bytes on disk (allocated blocks) of the files under `dir`, links not followed.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Hard-link every blob of the shared cache into `home`'s blob store (those it lacks).
pub fn link_shared_blobs(home: &Path) {
    let blobs = home.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).expect("blob dir");
    let shared = Path::new(SHARED_HOME).join("blobs").join("sha256");
    for e in std::fs::read_dir(shared).expect("shared blobs").flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with('.') {
            let _ = std::fs::hard_link(e.path(), blobs.join(&name));
        }
    }
}
