//! Faults in the NATS pipeline, end to end with real `kiln` processes, a real `nats-server`, a
//! real recipe (recipes/minimal.yaml, Debian packages through the shared test cache) and real
//! QEMU boots:
//! - a `kiln worker` SIGKILLed while it writes the disk image: the message is redelivered to a
//!   fresh worker, the build completes once, nothing half-written is used or left behind;
//! - the `nats-server` stopped (SIGTERM, and SIGKILL) and started again on the same port and
//!   store while builds run: workers and followers reconnect by themselves and every build
//!   completes exactly once.

use kiln::bus::{Bus, PrivateServer, RecordedEvent, StageEvent};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Running, free_port, kiln, shared_home};

/// Short redelivery so a killed worker's message is taken over within seconds.
const ACK_WAIT: &str = "3";
const MAX_DELIVER: &str = "6";

fn worker(home: &Path, url: &str, stages: &str, log: &Path) -> Running {
    let mut c = kiln(home);
    c.args(["worker", "--nats", url, "--stages", stages])
        .args(common::recipe_roots())
        .args(["--ack-wait", ACK_WAIT, "--max-deliver", MAX_DELIVER]);
    Running::spawn(c, log)
}

fn submit_args(id: &str, set: &str) -> Vec<String> {
    [
        "submit",
        "recipes/minimal.yaml",
        "--profile",
        "direct",
        "--json",
        "--id",
        id,
        "--set",
        set,
    ]
    .map(String::from)
    .to_vec()
}

/// Reads builds' histories back from the stream (a new connection per call, so it works across
/// server restarts).
struct Observer {
    rt: tokio::runtime::Runtime,
    url: String,
}

impl Observer {
    fn new(url: &str) -> Observer {
        Observer {
            rt: tokio::runtime::Runtime::new().unwrap(),
            url: url.to_string(),
        }
    }

    /// The build's events, or None while the server cannot be reached.
    fn try_events(&self, build: &str) -> Option<Vec<RecordedEvent>> {
        self.rt.block_on(async {
            let bus = tokio::time::timeout(Duration::from_secs(3), Bus::connect_url(&self.url))
                .await
                .ok()?
                .ok()?;
            tokio::time::timeout(Duration::from_secs(15), bus.build_events(build))
                .await
                .ok()?
                .ok()
        })
    }

    fn events(&self, build: &str) -> Vec<StageEvent> {
        self.try_events(build)
            .expect("read the build's history")
            .into_iter()
            .map(|e| e.event.unwrap())
            .collect()
    }

    /// Poll until `done` holds for the build's events (every `every`), or panic after `limit`.
    fn wait_until(
        &self,
        build: &str,
        limit: Duration,
        every: Duration,
        what: &str,
        logs: &dyn Fn() -> String,
        done: impl Fn(&[StageEvent]) -> bool,
    ) -> Vec<StageEvent> {
        let start = Instant::now();
        loop {
            if let Some(events) = self.try_events(build) {
                let events: Vec<StageEvent> =
                    events.into_iter().filter_map(|e| e.event.ok()).collect();
                if let Some(f) = events.iter().find_map(|e| match e {
                    StageEvent::Failed(f) => Some(f),
                    _ => None,
                }) {
                    panic!("build {build} failed: {f:?}\n{}", logs());
                }
                if done(&events) {
                    return events;
                }
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what} of {build}\n{}",
                logs()
            );
            std::thread::sleep(every);
        }
    }
}

fn is(e: &StageEvent, kind: &str, stage: &str) -> bool {
    e.kind().name() == kind && e.stage().name() == stage
}

fn count(events: &[StageEvent], kind: &str, stage: &str) -> usize {
    events.iter().filter(|e| is(e, kind, stage)).count()
}

fn completed<'a>(events: &'a [StageEvent], stage: &str) -> &'a kiln::bus::StageCompleted {
    events
        .iter()
        .find_map(|e| match e {
            StageEvent::Completed(c) if c.stage.name() == stage => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {stage} completed in {events:?}"))
}

fn verified(events: &[StageEvent]) -> bool {
    events.iter().any(|e| is(e, "completed", "verify"))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(p.clone());
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Temp files and directories in a kiln home: kiln's own (`.kiln-tmp-<pid>-…`), an image
/// writer's (`.<name>.<random>.tmp`) or tempfile's default (`.tmp…`).
fn temp_entries(home: &Path) -> Vec<PathBuf> {
    walk(home)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".kiln-tmp-") || n.starts_with(".tmp") || n.ends_with(".tmp")
        })
        .collect()
}

/// Every `sha256:<hex>` digest in a text.
fn digests_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sha256:") {
        let hex: String = rest[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        if hex.len() == 64 {
            out.insert(format!("sha256:{hex}"));
        }
        rest = &rest[i + 7..];
    }
    out
}

/// The objects of the `kiln-blobs` bucket (name → nuid) and the chunk subjects its stream holds.
fn object_store_contents(url: &str) -> (Vec<(String, String)>, BTreeSet<String>) {
    use futures::StreamExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        let js = bus.jetstream();
        let store = js.get_object_store(kiln::bus::BLOB_BUCKET).await.unwrap();
        let mut list = store.list().await.unwrap();
        let mut objects = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.unwrap();
            if !info.deleted {
                objects.push((info.name.clone(), info.nuid.clone()));
            }
        }
        let stream = js
            .get_stream(format!("OBJ_{}", kiln::bus::BLOB_BUCKET))
            .await
            .unwrap();
        let chunk_filter = format!("$O.{}.C.>", kiln::bus::BLOB_BUCKET);
        let mut subjects = stream.info_with_subjects(chunk_filter).await.unwrap();
        let mut chunks = BTreeSet::new();
        while let Some(s) = subjects.next().await {
            chunks.insert(s.unwrap().0);
        }
        (objects, chunks)
    })
}

/// Download a blob from the bucket into a fresh local store (its sha256 is checked on the way).
fn download_blob(url: &str, digest: &str, dir: &Path) -> PathBuf {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        let blobs = kiln::bus::Blobs::open(&bus, kiln::home::BlobStore::new(dir))
            .await
            .unwrap();
        let d = kiln::digest::Digest256::parse(digest).unwrap();
        blobs.get_blob(&d).await.unwrap()
    })
}

#[test]
fn worker_killed_mid_disk_stage_is_replaced_and_the_build_completes_once() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    // Every stage but disk runs on a worker sharing downloads with other test runs; disk runs on
    // a worker with a home of its own (so what it leaves behind is its alone), fed through the
    // object store.
    let main_home = shared_home();
    let disk_home = tempfile::tempdir().unwrap();
    let logs_dir = tempfile::tempdir().unwrap();
    let _others = worker(
        main_home.path(),
        &url,
        "source,render,rootfs,kernel,verify,publish",
        &logs_dir.path().join("others.log"),
    );
    let mut doomed = worker(
        disk_home.path(),
        &url,
        "disk",
        &logs_dir.path().join("disk-1.log"),
    );
    let logs = || {
        ["others.log", "disk-1.log", "disk-2.log"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(logs_dir.path().join(n)).unwrap_or_default();
                format!("--- {n}:\n{text}")
            })
            .collect::<String>()
    };

    let build = format!("fault-kill-{}", std::process::id());
    let set = common::unique_hostname("kill");
    let o: Output = kiln(main_home.path())
        .args(submit_args(&build, &set))
        .args(["--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}\n{}", logs());

    // Wait for the disk stage to start, then for the image being written, then kill.
    let observer = Observer::new(&url);
    observer.wait_until(
        &build,
        Duration::from_secs(900),
        Duration::from_millis(100),
        "disk started",
        &logs,
        |ev| count(ev, "started", "disk") >= 1,
    );
    let tmp = disk_home.path().join("tmp");
    let prefix = format!(".kiln-tmp-{}-image-", doomed.pid());
    let started = Instant::now();
    let partial = loop {
        let found = walk(&tmp).into_iter().find(|p| {
            p.is_file()
                && p.parent()
                    .and_then(|d| d.file_name())
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the disk worker never started writing an image\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    doomed.kill9();
    eprintln!(
        "killed disk worker {} while it wrote {}",
        doomed.pid(),
        partial.display()
    );
    // Proof that it died mid-stage: no disk `completed`, and its half-written image is there.
    let events = observer.events(&build);
    assert_eq!(count(&events, "completed", "disk"), 0, "{events:?}");
    assert!(partial.exists(), "{}", partial.display());
    drop(doomed);

    // A fresh worker process on the same home takes the redelivered message over.
    let replacement = worker(
        disk_home.path(),
        &url,
        "disk",
        &logs_dir.path().join("disk-2.log"),
    );
    let events = observer.wait_until(
        &build,
        Duration::from_secs(900),
        Duration::from_millis(500),
        "verify completed",
        &logs,
        verified,
    );

    // Exactly one disk `completed`, from the replacement, on the second delivery.
    assert_eq!(count(&events, "completed", "disk"), 1, "{events:?}");
    assert_eq!(count(&events, "started", "disk"), 2, "{events:?}");
    let attempts: Vec<Option<u64>> = events
        .iter()
        .filter_map(|e| match e {
            StageEvent::Started(s) if s.stage.name() == "disk" => Some(s.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [Some(1), Some(2)]);
    for stage in ["source", "render", "rootfs", "kernel", "verify"] {
        assert_eq!(count(&events, "completed", stage), 1, "{stage}: {events:?}");
    }
    let disk = completed(&events, "disk");
    assert!(
        disk.worker.ends_with(&format!("/{}", replacement.pid())),
        "{}",
        disk.worker
    );
    assert_eq!(disk.cache, kiln::bus::CacheStatus::Miss);
    let image = disk.outputs["disk"]["image"].as_str().unwrap().to_string();

    // The verify stage booted exactly that image to its marker.
    let verify = completed(&events, "verify");
    let verify_state = common::handed_on_state(&url, verify);
    let state_image = verify_state["build"]["disk"]["image"].as_str().unwrap();
    assert_eq!(state_image, image);
    let marker = verify.outputs["verify.direct"]["marker_line"]
        .as_str()
        .unwrap_or_default();
    assert!(!marker.is_empty(), "{:?}", verify.outputs);

    // The object store's image is the digest in the message (checked while downloading), and
    // a sound qcow2.
    let fetched = tempfile::tempdir().unwrap();
    let path = download_blob(&url, &image, fetched.path());
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // The replacement's local copy is the same image.
    let local = disk_home
        .path()
        .join("blobs/sha256")
        .join(image.trim_start_matches("sha256:"));
    assert_eq!(
        std::fs::read(&local).unwrap(),
        std::fs::read(&path).unwrap()
    );

    // Nothing half-written is left in the disk worker's home.
    let leftovers = temp_entries(disk_home.path());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!partial.exists());
    assert!(
        replacement.log().contains("removed"),
        "{}",
        replacement.log()
    );

    // Every object in the store is referenced by the build (its messages or the rootfs
    // manifest), and no chunk belongs to an object that is not there.
    let mut referenced = BTreeSet::new();
    for e in &events {
        if let StageEvent::Completed(c) = e {
            referenced.extend(digests_in(&c.outputs.to_string()));
            referenced.extend(digests_in(&common::handed_on_state(&url, c).to_string()));
        }
    }
    let manifest = completed(&events, "rootfs").outputs["rootfs"]["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest_path = download_blob(&url, &manifest, fetched.path());
    referenced.extend(digests_in(&std::fs::read_to_string(manifest_path).unwrap()));
    let (objects, chunks) = object_store_contents(&url);
    assert!(objects.iter().any(|(n, _)| *n == image), "{objects:?}");
    for (name, _) in &objects {
        assert!(referenced.contains(name), "unreferenced object {name}");
    }
    let nuids: BTreeSet<&str> = objects.iter().map(|(_, n)| n.as_str()).collect();
    for subject in &chunks {
        let nuid = subject.rsplit('.').next().unwrap();
        assert!(nuids.contains(nuid), "orphan chunks on {subject}");
    }
    drop(replacement);
}

/// Builds run, the server is stopped with `signal` and started again on the same port and store;
/// every build completes once and every follower sees it end.
fn server_restart_mid_build(signal: libc::c_int, tag: &str) {
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = PrivateServer::start_in(&store.path().join("jetstream"), port).unwrap();
    let url = server.url();
    let home_a = shared_home();
    let home_b = shared_home();
    let logs_dir = tempfile::tempdir().unwrap();
    let mut up = kiln(home_a.path());
    up.args(["up", "--nats", &url])
        .args(common::recipe_roots())
        .args(["--ack-wait", ACK_WAIT, "--max-deliver", MAX_DELIVER]);
    let _up = Running::spawn(up, &logs_dir.path().join("up.log"));
    let _w = worker(
        home_b.path(),
        &url,
        "rootfs,kernel,disk,verify",
        &logs_dir.path().join("worker.log"),
    );
    let logs = || {
        ["up.log", "worker.log"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(logs_dir.path().join(n)).unwrap_or_default();
                format!("--- {n}:\n{text}")
            })
            .collect::<String>()
    };
    // Let the workers create the stream and consumers, so no request precedes its consumer.
    let observer = Observer::new(&url);
    std::thread::sleep(Duration::from_secs(2));

    // Three builds, each followed by its own `kiln submit --follow`. Two share their
    // parameters (the second is mostly cache hits), one is unique.
    let shared = common::unique_hostname(tag);
    let params = [shared.clone(), common::unique_hostname(tag), shared];
    let mut followers = Vec::new();
    let mut ids = Vec::new();
    for (i, set) in params.iter().enumerate() {
        let id = format!("fault-{tag}-{}-{i}", std::process::id());
        let mut c = kiln(home_a.path());
        c.args(submit_args(&id, set))
            .args(["--follow", "--timeout", "600", "--nats", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        followers.push(c.spawn().unwrap());
        ids.push(id);
    }

    // Stop the server while stages run: once some build's kernel stage has started.
    observer.wait_until(
        &ids[0],
        Duration::from_secs(900),
        Duration::from_millis(200),
        "kernel started",
        &logs,
        |ev| count(ev, "started", "kernel") >= 1,
    );
    let unfinished = ids
        .iter()
        .filter(|id| !verified(&observer.events(id)))
        .count();
    assert!(unfinished > 0);
    eprintln!("stopping nats-server (signal {signal}) with {unfinished} builds running");
    match signal {
        libc::SIGTERM => server.terminate(Duration::from_secs(20)),
        _ => server.stop(),
    }
    std::thread::sleep(Duration::from_secs(3));
    server.restart().unwrap();

    // Every follower ends by itself, with the build's verify `completed`.
    let deadline = Instant::now() + Duration::from_secs(900);
    for (child, id) in followers.iter_mut().zip(&ids) {
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "follower of {id} still running\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for (child, id) in followers.into_iter().zip(&ids) {
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "follower of {id}: {:?}\n{stdout}\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            logs()
        );
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(
            (&last["kind"], &last["stage"]),
            (&"completed".into(), &"publish".into())
        );
    }

    // Read back from the restarted server: every request kept, every stage completed once.
    for id in &ids {
        let events = observer.events(id);
        for stage in [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish",
        ] {
            assert_eq!(
                count(&events, "completed", stage),
                1,
                "{id} {stage}: {events:#?}\n{}",
                logs()
            );
        }
        assert_eq!(
            count(&events, "failed", "source") + count(&events, "failed", "verify"),
            0
        );
        assert!(!events.iter().any(|e| e.kind().name() == "failed"));
    }
    // The two builds of the same parameters made the same image.
    let image = |id: &str| {
        completed(&observer.events(id), "disk").outputs["disk"]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(image(&ids[0]), image(&ids[2]));
    assert_ne!(image(&ids[0]), image(&ids[1]));
}

#[test]
fn nats_server_stopped_with_sigterm_and_restarted_mid_build_loses_nothing() {
    server_restart_mid_build(libc::SIGTERM, "term");
}

#[test]
fn nats_server_killed_and_restarted_mid_build_loses_nothing() {
    server_restart_mid_build(libc::SIGKILL, "kill");
}
